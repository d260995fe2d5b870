"""Image data: discovery of class folders and manifests (``folders``, ``manifests``), the index and
its splits (``index``, ``splits``, ``groups``), torch-free decoding (``images``), augmentation
(``transforms``), torch loaders (``loaders``) and the dataset registry (``registry``)."""
