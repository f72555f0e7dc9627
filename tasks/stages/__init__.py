"""The pipeline's Prefect tasks, side by side: sample, train, calibrate, convert, validate (and repair, the
sweep's tasks, the report and release tasks). Each is a thin ``@task`` that resolves artifact references from
the store, calls pure code from the role packages and writes results back."""
