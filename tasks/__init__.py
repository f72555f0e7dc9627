"""The five pipeline stages, one module each: a pure function over arrays, models and parameters, and a thin
Prefect task that resolves artifact references from the store and writes results back."""
