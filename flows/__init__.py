"""Prefect flows: wiring of the stages in ``tasks`` and the ``ptqflow`` command line."""
