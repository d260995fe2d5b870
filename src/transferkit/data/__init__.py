"""Image data: folder discovery and splits (``folders``, ``groups``), torch-free decoding (``images``),
augmentation (``transforms``), torch loaders (``loaders``) and the dataset registry (``registry``)."""
