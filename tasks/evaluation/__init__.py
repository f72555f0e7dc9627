"""Measuring models: the LiteRT interpreter, task metrics and fidelity, device figures, per-layer error and
repair, and the gates a run is judged by."""
