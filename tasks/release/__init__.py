"""What leaves a run: the run manifest, the export folder and its pointer, promotion against the champion,
garbage collection, and the typed outcome of a run."""
