"""The five pipeline stages, one module each: a pure function over arrays, models and parameters, and a thin
Prefect task that resolves artifact references from the store and writes results back."""

from ptqflow.tasks.installation import check_tensorflow_install

# Before any stage imports TensorFlow: two builds installed over each other fail later, far from the cause.
check_tensorflow_install()
