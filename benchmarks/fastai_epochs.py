"""fastai's ``fine_tune`` at a scale where a whole run takes hours on 2 cores: each phase's epoch
time, projected from a measured fraction of one epoch, beside transferkit's whole default
``train`` on the same data (its ``activations-4`` row in finetune_inputs.json: the default recipe
in float32 with the top 3 blocks, which on cifar10 ``--finetune-unfreeze auto`` now makes 6).

    python benchmarks/fastai_epochs.py --peer-python /tmp/peers/bin/python [--dataset cifar10] [--fraction 0.02]
    python benchmarks/fastai_epochs.py --from-json   # the table again, from the stored measurement

fastai runs as in peers.py (``vision_learner(dls, "tf_efficientnet_lite0")``, the embedded
weights loaded into its body, ``Resize(224)``, batch 64), trains on ``DATA/train`` and validates
on ``DATA/test``. Each phase (frozen: one epoch of the head; unfrozen: one epoch of the whole
network at discriminative rates, as ``fine_tune`` runs them) runs ``--fraction`` of its
training and validation batches through fastai's ``ShortEpochCallback``, and a callback stamps
the end of every batch. An epoch is projected as the time to the first batch (worker start-up,
counted once) plus the median time between batches after it times the batches left, for
training and validation each: scaling the whole short epoch up would multiply the start-up too.
``fine_tune(N)`` is one frozen epoch and N unfrozen ones; N is transferkit's fine-tuning epochs in
the row beside it (a head phase, then N fine-tuning epochs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from _results import cpu_name, row_cpu, write_section
from finetune_inputs import VARIANTS
from peers import fastai_learner, run_child

HERE = Path(__file__).resolve().parent
RAW = HERE / "fastai_epochs.json"
OURS, SEED = "activations-4", 42
"""finetune_inputs.py's variant that was transferkit's default recipe when measured, and the seed of its row here."""


def measure(data: Path, fraction: float) -> dict[str, float]:
    """In the peer interpreter: seconds to set up, and each phase's projected epoch seconds."""
    from fastai.callback.core import Callback
    from fastai.callback.training import ShortEpochCallback

    started = time.perf_counter()
    learn = fastai_learner(data, "test")
    dls = learn.dls
    setup = time.perf_counter() - started

    class BatchEnds(Callback):
        order = -10  # before ShortEpochCallback cancels the epoch in the same hook

        def before_epoch(self) -> None:
            self.started, self.ends = time.perf_counter(), {True: [], False: []}

        def after_batch(self) -> None:
            self.ends[self.training].append(time.perf_counter())

    def projected(start: float, ends: list[float], batches: int) -> float:
        between = statistics.median(b - a for a, b in zip(ends, ends[1:]))
        return ends[0] - start + between * (batches - 1)

    def epoch(lr: object) -> float:
        stamps = BatchEnds()
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(1, lr, cbs=[stamps, ShortEpochCallback(pct=fraction, short_valid=True)])
        train_ends, valid_ends = stamps.ends[True], stamps.ends[False]
        return (projected(stamps.started, train_ends, len(dls.train))
                + projected(train_ends[-1], valid_ends, len(dls.valid)))

    learn.freeze()
    frozen = epoch(2e-3)  # fine_tune's defaults: base_lr 2e-3 frozen, then slice(base_lr / 200, base_lr / 2)
    learn.unfreeze()
    unfrozen = epoch(slice(1e-5, 1e-3))
    return {"setup_seconds": setup, "frozen_epoch_seconds": frozen, "unfrozen_epoch_seconds": unfrozen,
            "train_images": len(dls.train_ds), "test_images": len(dls.valid_ds)}


def table(row: dict, ours: dict | None) -> str:
    options = VARIANTS[OURS]
    epochs = int(options[options.index("--finetune-epochs") + 1])
    projected = row["setup_seconds"] + row["frozen_epoch_seconds"] + epochs * row["unfrozen_epoch_seconds"]
    lines = [
        f"fastai measured {row['date']} on {row['machine']} with {row['cores']} cores "
        f"(`python benchmarks/fastai_epochs.py`): fastai's epochs projected from the batches of {row['fraction']:.0%} of each, "
        f"{row['train_images']:,} training images, validation on the {row['test_images']:,} test images.",
        "",
        "| dataset | contender | frozen epoch (min) | unfrozen epoch (min) | whole run (min) | test accuracy | "
        "peak memory (MiB) | its time / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if ours:
        lines.append(
            f"| {row['dataset']} | transferkit `train`, {epochs} fine-tuning epochs of the top 3 blocks on cached "
            f"activations (its defaults then; cold caches, seed {ours['seed']}, {ours['date']}) | | | "
            f"{ours['cold_seconds'] / 60:.1f} measured | {ours['test_accuracy']:.4f} | {ours['peak_mib']} | 1.0x |"
        )
    ratio = f"{projected / ours['cold_seconds']:.1f}x" if ours else ""
    lines.append(
        f"| {row['dataset']} | fastai `fine_tune({epochs})` | {row['frozen_epoch_seconds'] / 60:.1f} | "
        f"{row['unfrozen_epoch_seconds'] / 60:.1f} | {projected / 60:.1f} projected | not measured | "
        f"{row['peak_mib']:.0f} | {ratio} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--fraction", type=float, default=0.02)
    parser.add_argument("--mirror", default=str(HERE.parents[1] / "shared" / "datasets"))
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter with fastai installed")
    parser.add_argument("--from-json", action="store_true", help="rebuild the table from the stored measurement")
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = Path(args.mirror) / args.dataset
    if args.child_output:  # the measuring process, in the peer interpreter
        Path(args.child_output).write_text(json.dumps(measure(data, args.fraction)))
        return
    if args.from_json:
        row = json.loads(RAW.read_text())
    else:
        output = HERE / "fastai_epochs.child.json"
        usage = run_child([args.peer_python, __file__, "--dataset", args.dataset, "--fraction", str(args.fraction),
                           "--mirror", args.mirror, "--child-output", str(output)])
        row = {**json.loads(output.read_text()), "dataset": args.dataset, "fraction": args.fraction,
               "peak_mib": usage["peak_mib"], "date": str(date.today()), "machine": platform.machine(), "cpu": cpu_name(),
               "cores": subprocess.getoutput("nproc")}
        output.unlink()
        RAW.write_text(json.dumps(row, indent=1) + "\n")
    inputs = HERE / "finetune_inputs.json"
    # Ours from the same CPU as fastai's row: a row of another machine would make the ratio meaningless.
    ours = next((r for r in json.loads(inputs.read_text()) if (r["dataset"], r["variant"], r["seed"], row_cpu(r))
                 == (row["dataset"], OURS, SEED, row_cpu(row))), None) if inputs.exists() else None
    write_section("fastai_epochs", f"At scale: {row['dataset']} against fastai's epochs", table(row, ours))
    print(table(row, ours))


if __name__ == "__main__":
    main()
