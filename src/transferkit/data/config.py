"""The data section of a run's options (``--split``, ``--batch-size``, ``--data-mirror`` ...),
read by train, compare and audit alike. Its checks need nothing of the training sections, so it
lives beside the data it describes, as the audit's options live beside the audit; ``config``
holds it with the others.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

SPLIT_GROUPS = ("near-copies", "none")
"""near-copies: near-identical and byte-identical images share a side of a carved split; none: at random."""

VIEW_POLICIES = {
    "light": "",
    "randaugment": "rand-m9-mstd0.5",
    "trivialaugment": "rand-n1-m10-mstd101-inc1-p1.0",
}
"""``--finetune-view-policy``: after the light crop and mirror, nothing more, or timm's RandAugment
with this config string (``trivialaugment``: one op a view at a uniformly drawn magnitude, as
TrivialAugment draws it, in timm's RandAugment terms)."""


def help_text(text: str, **kwargs: Any) -> dict[str, Any]:
    """A field's metadata: ``help`` becomes the option's ``--help``; ``flag`` renames the option."""
    return {"help": text, **kwargs}


def flat_options(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"frozen": {"epochs": 3}}`` as ``{"frozen.epochs": 3}``, the keys ``from_options`` takes."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_options(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def default_num_workers() -> int:
    """Image-decoding worker processes when none are asked for: one per core, at most 8."""
    return min(os.cpu_count() or 1, 8)


@dataclass
class DataConfig:
    split: tuple[float, float, float] = field(
        default=(0.8, 0.16, 0.04),
        metadata=help_text("train,val,test fractions used when DATA has no split folders"),
    )
    image_size: int | None = field(
        default=None,
        metadata=help_text("input size in pixels; default: the backbone's pretrained size"),
    )
    batch_size: int = field(default=32, metadata=help_text("images per batch"))
    num_workers: int | None = field(
        default=None, metadata=help_text("image-decoding worker processes; default: one per core")
    )
    max_per_class: int | None = field(
        default=None,
        metadata=help_text("keep at most N images per class in each split (stratified, seeded)"),
    )
    drop_duplicates: bool = field(
        default=False,
        metadata=help_text(
            "drop byte-identical copies of an image (one is kept, train first) and every copy of an "
            "image filed under two classes; without it they are only listed in duplicates.csv"
        ),
    )
    split_groups: str = field(
        default="near-copies",
        metadata=help_text(
            "when a split is carved from one folder: near-copies keeps near-identical and byte-identical "
            "images (the audit's similarity) on one side; none splits at random, copies and all"
        ),
    )
    group_by: str | None = field(
        default=None,
        metadata=help_text(
            "regular expression on each image's path below DATA: images whose match (its first group, if it "
            "has one) is the same stay on one side of a carved split, e.g. 'patient\\d+'"
        ),
    )
    splits_from: str | None = field(
        default=None,
        metadata=help_text("reuse the train/val/test split of an earlier run folder, so runs compare on the same images"),
    )
    exclude: str | None = field(
        default=None,
        metadata=help_text("leave out the images named in the path column of this CSV file (such as an audit's "
                       "audit.csv); they are listed in skipped.csv with the reason"),
    )
    data_mirror: str | None = field(
        default=None,
        metadata=help_text(
            "folder holding local copies of registered datasets "
            "(default: $TRANSFERKIT_DATA_MIRROR, then $TRANSFERKIT_CACHE/datasets, ~/.cache/transferkit/datasets)"
        ),
    )
    download: bool = field(
        default=True,
        metadata=help_text("download a registered dataset that is not in the mirror folder"),
    )

    def problems(self) -> list[str]:
        found = []
        if not all(math.isfinite(f) for f in self.split):
            found.append(f"--split needs three finite fractions, got {','.join(map(str, self.split))}; e.g. --split 0.8,0.16,0.04")
        elif len(self.split) != 3 or any(f < 0 for f in self.split):
            found.append(f"--split needs three non-negative fractions, got {self.split}")
        elif abs(sum(self.split) - 1.0) > 1e-6 or self.split[0] <= 0 or self.split[1] <= 0:
            found.append(
                f"--split fractions must sum to 1 with train and val above 0, got {self.split}; "
                "e.g. --split 0.8,0.16,0.04"
            )
        if self.image_size is not None and not 32 <= self.image_size <= 4096:
            found.append(f"--image-size must be between 32 and 4096, got {self.image_size}")
        if self.batch_size < 1:
            found.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            found.append(f"--num-workers must be 0 or more, got {self.num_workers}")
        if self.split_groups not in SPLIT_GROUPS:
            found.append(f"--split-groups must be one of {', '.join(SPLIT_GROUPS)}, got {self.split_groups!r}")
        if self.group_by is not None:
            try:
                re.compile(self.group_by)
            except re.error as error:
                found.append(f"--group-by {self.group_by!r} is not a regular expression: {error}")
        if self.max_per_class is not None and self.max_per_class < 1:
            found.append(f"--max-per-class must be at least 1, got {self.max_per_class}")
        return found

    def resolved_num_workers(self) -> int:
        return self.num_workers if self.num_workers is not None else default_num_workers()
