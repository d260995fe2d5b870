"""Image data: folder discovery and splits (``folders``), torch-free decoding (``images``), torch
loaders and augmentation (``loaders``), and the dataset registry (``registry``)."""
