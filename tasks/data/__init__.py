"""Data sources and what is drawn from them: reading a source (the source registry), decoding images, the
splits and the calibration draw. Pure functions over tables; nothing here runs a model."""
