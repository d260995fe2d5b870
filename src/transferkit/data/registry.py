"""The dataset registry: a name resolves to a local image folder.

Lookup order for a registered name: the mirror folder (``--data-mirror``, then
``$TRANSFERKIT_DATA_MIRROR``, then ``$TRANSFERKIT_CACHE/datasets``, by default
``~/.cache/transferkit/datasets``), which may hold a copy
under any of the entry's folder names; otherwise, when downloads are allowed, the public archive
is downloaded into the cache mirror, its checksum verified, and unpacked.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transferkit._io import cache_home, content_digest
from transferkit.errors import DataError, close_matches

log = logging.getLogger(__name__)

DATA_HELP = (
    "an image folder (DATA/<class>/* or DATA/{train,val[,test]}/<class>/*), a manifest (a .csv or .jsonl file "
    "of path,label[,split]; a folder with Hugging Face imagefolder's metadata.csv) or a registered dataset's name"
)
DATA_REQUIRED = "DATA is required: give an image folder or a registered dataset name"


def source_problems(source: str | os.PathLike[str] | None) -> list[str]:
    """The data source's problems, to be raised with the config's: empty is the only one known
    before the folder is read."""
    return [] if source is not None and os.fspath(source).strip() else [DATA_REQUIRED]


MIRROR_ENV = "TRANSFERKIT_DATA_MIRROR"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    url: str
    sha256: str | None
    """Published checksum of the archive; None where the publisher gives none (then the
    computed digest is logged so a user can pin it)."""
    description: str
    folder_names: tuple[str, ...] = ()
    """Folder names that hold this dataset in a mirror, first one preferred."""
    archive_root: str = ""
    """Folder inside the archive that holds the split or class folders."""
    prepare: Callable[[Path, Path], None] | None = field(default=None, compare=False)
    """Turns the unpacked archive into a class-folder tree when it is not one already."""

    @property
    def mirror_names(self) -> tuple[str, ...]:
        return self.folder_names or (self.name,)


def _cifar10_to_folders(unpacked: Path, target: Path) -> None:
    """CIFAR-10's binary batches (1 label byte + 3072 pixel bytes a record) to PNG folders."""
    import numpy as np
    from PIL import Image

    source = unpacked / "cifar-10-batches-bin"
    classes = (source / "batches.meta.txt").read_text().split()
    batches = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    for split, files in batches.items():
        for name in files:
            records = np.fromfile(source / name, dtype=np.uint8).reshape(-1, 3073)
            for index, record in enumerate(records):
                folder = target / split / classes[record[0]]
                folder.mkdir(parents=True, exist_ok=True)
                pixels = record[1:].reshape(3, 32, 32).transpose(1, 2, 0)
                Image.fromarray(pixels).save(folder / f"{Path(name).stem}_{index:05d}.png")


REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="hymenoptera",
            url="https://download.pytorch.org/tutorial/hymenoptera_data.zip",
            sha256=None,
            description="ants vs bees from the PyTorch transfer-learning tutorial (2 classes, 397 images)",
            archive_root="hymenoptera_data",
        ),
        DatasetSpec(
            name="tf_flowers",
            url="http://download.tensorflow.org/example_images/flower_photos.tgz",
            sha256="4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c",
            description="TensorFlow flower_photos (5 classes, 3,670 images, CC-BY)",
            archive_root="flower_photos",
        ),
        DatasetSpec(
            name="cifar10",
            url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
            description="CIFAR-10 (10 classes, 32x32); a mirror may hold the cifar10_subset copy",
            folder_names=("cifar10", "cifar10_subset"),
            prepare=_cifar10_to_folders,
        ),
        DatasetSpec(
            name="chest_xray_pneumonia",
            url="https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
            "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded",
            sha256=None,
            description="Kermany et al. 2018 paediatric chest X-rays, NORMAL vs PNEUMONIA (CC BY 4.0)",
            archive_root="chest_xray",
        ),
    )
}


def list_datasets() -> list[str]:
    return sorted(REGISTRY)


def default_mirror() -> Path:
    return cache_home() / "datasets"


def mirror_folders(data_mirror: str | os.PathLike[str] | None) -> list[Path]:
    folders = [Path(p) for p in (data_mirror, os.environ.get(MIRROR_ENV)) if p]
    return folders + [default_mirror()]


def resolve_data_source(
    source: str, data_mirror: str | os.PathLike[str] | None = None, download: bool = True
) -> Path:
    """An existing folder or manifest file is used as is; a registered name is found in a mirror
    or downloaded."""
    path = Path(source).expanduser()
    if path.is_dir() or path.is_file():
        return path
    spec = REGISTRY.get(source)
    if spec is None:
        raise DataError(
            f"{source!r} is neither a folder nor a registered dataset "
            f"({', '.join(list_datasets())}).{close_matches(source, REGISTRY)}"
        )
    for mirror in mirror_folders(data_mirror):
        for name in spec.mirror_names:
            if (mirror / name).is_dir():
                log.info("dataset %s: using the local copy %s", spec.name, mirror / name)
                return mirror / name
    searched = ", ".join(str(m) for m in mirror_folders(data_mirror))
    if not download:
        raise DataError(
            f"dataset {spec.name!r} is not in the mirror folders ({searched}) and downloads are off; "
            f"put a copy at <mirror>/{spec.name} or allow downloads"
        )
    return download_dataset(spec, default_mirror())


def download_dataset(spec: DatasetSpec, mirror: Path) -> Path:
    """Download, verify, unpack into ``mirror/<name>``; a failure leaves no partial folder."""
    from transferkit._notebook import tqdm_bar

    tqdm = tqdm_bar()

    mirror.mkdir(parents=True, exist_ok=True)
    target = mirror / spec.name
    with tempfile.TemporaryDirectory(dir=mirror, prefix=f".{spec.name}-") as work:
        archive = Path(work) / "archive"
        try:
            with urllib.request.urlopen(spec.url, timeout=30) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with archive.open("wb") as out, tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"downloading {spec.name}"
                ) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
        except OSError as error:
            raise DataError(
                f"could not download dataset {spec.name!r} from {spec.url} ({error}); "
                f"when offline, put a copy at {target} or pass --data-mirror FOLDER"
            ) from None
        digest = content_digest(archive).hex()
        if spec.sha256 is None:
            log.warning("dataset %s: no published checksum; downloaded archive sha256=%s", spec.name, digest)
        elif digest != spec.sha256:
            raise DataError(
                f"dataset {spec.name!r}: checksum mismatch for {spec.url} "
                f"(got {digest}, expected {spec.sha256}); the download is corrupt, try again"
            )
        unpacked = Path(work) / "unpacked"
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                bundle.extractall(unpacked)
        else:
            with tarfile.open(archive) as bundle:
                bundle.extractall(unpacked, filter="data")
        staged = Path(work) / "staged"
        if spec.prepare is not None:
            spec.prepare(unpacked, staged)
        else:
            shutil.move(unpacked / spec.archive_root if spec.archive_root else unpacked, staged)
        os.replace(staged, target)
    return target
