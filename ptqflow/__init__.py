"""ptqflow: a Keras model to a validated, fully-integer TensorFlow Lite model, as a cached Prefect pipeline.

The command line is ``ptqflow``; from Python, the same runs with the same options::

    import ptqflow

    summary = ptqflow.run(epochs=3, store="./ptqflow-store")
    print(summary.status, summary.metrics.quantized_accuracy, summary.artifacts["tflite"].uri)

``ptqflow.run`` and ``ptqflow.sweep`` are ``ptqflow.flows.api.run`` and ``.sweep``. The stages live in
``ptqflow.tasks``, the flows in ``ptqflow.flows`` and the artifact store in ``ptqflow.storage``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ptqflow.flows.api import InvalidOption, run, sweep

__all__ = ["InvalidOption", "run", "sweep"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import ptqflow.tasks.x` (a Dask worker, a deployment) need not load Prefect's flows.
    if name in __all__:
        from ptqflow.flows import api

        return getattr(api, name)
    raise AttributeError(f"module 'ptqflow' has no attribute {name!r}")
