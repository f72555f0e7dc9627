"""Keras models: building and training the default ones, loading a user's file, feeding inputs by name, reading
outputs and the layer graph."""
