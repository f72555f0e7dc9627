"""The preload of the sweep's LocalCluster workers (flows/dask_worker.py)."""

from __future__ import annotations

import gc
import sys


def test_a_closing_worker_freezes_the_garbage_collector():
    from ptqflow.flows.dask_worker import dask_teardown

    before = gc.get_freeze_count()
    try:
        dask_teardown(worker=None)
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def _preloaded() -> bool:
    return "ptqflow.flows.dask_worker" in sys.modules


def test_the_sweeps_local_cluster_workers_load_the_preload():
    from distributed import Client, LocalCluster

    from ptqflow.flows.cluster import dask_task_runner

    kwargs = {**dask_task_runner(workers=2).cluster_kwargs, "dashboard_address": None}
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        assert set(client.run(_preloaded).values()) == {True}
        assert len(client.scheduler_info()["workers"]) == 2
