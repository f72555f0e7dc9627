"""Shared types and plumbing every layer above uses: the parameter models, the records stages hand each other,
the report's typed document, errors, cache keys, progress and the TensorFlow install check."""
