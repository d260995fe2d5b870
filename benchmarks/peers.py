"""transferkit's default ``train`` side by side with fastai, the PyTorch tutorial and the seeds'
Keras recipe, on the same data, machine and weights; and transferkit's throughput against the
backbone's raw forward pass.

    python benchmarks/peers.py [--datasets hymenoptera,tf_flowers] [--peer-python PYTHON]

Every contender runs in its own process, timed from its start (imports, decoding and
validation included) until it exits, with its peak resident memory from ``wait4``. All of them
train on ``DATA/train`` and report accuracy on ``DATA/val``; the three PyTorch contenders start
from the same embedded EfficientNet-Lite0 ImageNet weights at 224 px:

- transferkit: ``transferkit train DATA`` with defaults and an empty feature cache;
- fastai: ``vision_learner(dls, "tf_efficientnet_lite0").fine_tune(3)``, the weights loaded
  into its body, ``Resize(224)``, batch 64, the stats normalisation the weights need;
- tutorial: the PyTorch transfer-learning tutorial's "ConvNet as fixed feature extractor":
  its transforms, batch 4, 4 workers, SGD 1e-3 momentum 0.9, StepLR(7, 0.1), 25 epochs, best
  validation accuracy kept;
- keras: the seeds' recipe (TensorFlow's transfer-learning tutorial, which the seed follows):
  MobileNetV2 at 160 px, flip and rotation augmentation, 10 frozen epochs with Adam 1e-4, then
  5 epochs with the layers from 100 up unfrozen at RMSprop 1e-5, batch 32, on the torch backend
  (Keras 3). Keras cannot load ImageNet weights offline, so it starts from random weights: it
  counts for time only, and the table says so. Its images are decoded once, before training,
  which only flatters its time.

The peers need fastai and keras, which transferkit does not depend on; install them into a
separate environment and pass its interpreter:

    python -m venv --system-site-packages /tmp/peers && /tmp/peers/bin/pip install fastai keras
    python benchmarks/peers.py --peer-python /tmp/peers/bin/python

Throughput (transferkit's own process, same data): the frozen phase's feature pass from image
files against the backbone's forward pass on tensors decoded beforehand (the machine's limit for
that phase); ``predict`` on 1,000 images against the whole classifier's forward pass on decoded
tensors; and the frozen phase of a second ``train`` with a warm feature cache against the first.

Raw results go to benchmarks/peers.json; the tables between the markers in RESULTS.md are
rebuilt from them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

from _results import UNRECORDED_CPU, cpu_name, row_cpu, write_section

HERE = Path(__file__).resolve().parent
RAW = HERE / "peers.json"
CONTENDERS = ("transferkit", "fastai", "tutorial", "keras")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
MODEL = "tf_efficientnet_lite0"


# --- measuring a process ---------------------------------------------------------------------


def run_child(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``command`` and return its wall time and its own peak RSS."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, **(env or {})})
    stderr_chunks = []
    assert process.stderr is not None
    while chunk := process.stderr.read(65536):
        stderr_chunks.append(chunk)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        text = b"".join(stderr_chunks).decode(errors="replace")
        raise SystemExit(f"{' '.join(command[:5])} ... failed ({process.returncode}):\n{text[-3000:]}")
    return {"wall_seconds": wall, "peak_mib": usage.ru_maxrss / 1024}


def labelled_files(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    items = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((folder / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    return classes, items


# --- the contenders, each run in a child process -------------------------------------------------


def embedded_state(model: Any) -> dict[str, Any]:
    """The embedded EfficientNet-Lite0 ImageNet weights as ``model``'s state dict (head excluded)."""
    from transferkit.models.weights import embedded_weights_file, load_embedded_state_dict

    reference = __import__("timm").create_model(MODEL, pretrained=False)
    state = load_embedded_state_dict(reference, embedded_weights_file(MODEL))
    wanted = model.state_dict()
    return {k: v for k, v in state.items() if k in wanted}


def fastai_learner(data: Path, valid: str, metrics: tuple = ()) -> Any:
    """fastai's ``vision_learner`` on ``DATA/train`` (validating on ``DATA/<valid>``) with the
    embedded weights in its body, ``Resize(224)``, batch 64."""
    import pandas as pd
    from fastai.vision.all import (
        CategoryBlock, ColReader, DataBlock, ImageBlock, IndexSplitter, Normalize, Resize, vision_learner,
    )

    classes, train = labelled_files(data / "train")
    _, held_out = labelled_files(data / valid)
    frame = pd.DataFrame([(p, classes[y]) for p, y in train + held_out], columns=["path", "label"])
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock), get_x=ColReader("path"), get_y=ColReader("label"),
        splitter=IndexSplitter(list(range(len(train), len(frame)))), item_tfms=Resize(224),
        # The embedded weights expect mean = std = 0.5; fastai adds ImageNet stats only when it
        # downloads the weights itself.
        batch_tfms=Normalize.from_stats([0.5] * 3, [0.5] * 3),
    )
    dls = block.dataloaders(frame, bs=64, num_workers=os.cpu_count())
    learn = vision_learner(dls, MODEL, pretrained=False, metrics=list(metrics))
    body = learn.model[0].model
    missing, unexpected = body.load_state_dict(embedded_state(body), strict=False)
    assert not unexpected and all(k.startswith("classifier") for k in missing), (missing, unexpected)
    return learn


def fastai_contender(data: Path, epochs: int) -> float:
    from fastai.vision.all import accuracy

    learn = fastai_learner(data, "val", metrics=(accuracy,))
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs)
        return float(learn.validate()[1])


def tutorial_contender(data: Path, epochs: int) -> float:
    import copy

    import timm
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    normalize = transforms.Normalize([0.5] * 3, [0.5] * 3)
    data_transforms = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), normalize]),
        "val": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize]),
    }
    image_datasets = {x: datasets.ImageFolder(str(data / x), data_transforms[x]) for x in ("train", "val")}
    loaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=4)
               for x in ("train", "val")}
    model = timm.create_model(MODEL, pretrained=False)
    model.load_state_dict(embedded_state(model), strict=False)
    for parameter in model.parameters():
        parameter.requires_grad = False
    model.reset_classifier(len(image_datasets["train"].classes))  # new parameters train
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.get_classifier().parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    best_weights, best_acc = copy.deepcopy(model.state_dict()), 0.0
    for _ in range(epochs):
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            corrects = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                corrects += int((outputs.argmax(1) == labels).sum())
            if phase == "train":
                scheduler.step()
            accuracy = corrects / len(image_datasets[phase])
            if phase == "val" and accuracy > best_acc:
                best_acc, best_weights = accuracy, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_weights)
    return best_acc


def keras_contender(data: Path, frozen_epochs: int, finetune_epochs: int) -> float:
    import keras
    import numpy as np
    from PIL import Image

    size = 160

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        classes, items = labelled_files(data / split)
        images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p, _ in items])
        return images.astype("float32"), np.array([y for _, y in items])

    (x_train, y_train), (x_val, y_val) = arrays("train"), arrays("val")
    classes = int(y_train.max()) + 1
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.2)])
    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), include_top=False, weights=None)
    base.trainable = False
    inputs = keras.Input(shape=(size, size, 3))
    x = keras.applications.mobilenet_v2.preprocess_input(augmentation(inputs))
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    model = keras.Model(inputs, keras.layers.Dense(classes)(x))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss, metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=frozen_epochs, validation_data=(x_val, y_val), verbose=0)
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.RMSprop(1e-5), loss=loss, metrics=["accuracy"])
    history = model.fit(x_train, y_train, batch_size=32, epochs=frozen_epochs + finetune_epochs,
                        initial_epoch=frozen_epochs, validation_data=(x_val, y_val), verbose=0)
    return float(history.history["val_accuracy"][-1])


def throughput(data: Path, run_dir: Path, batch_size: int = 64) -> dict[str, float]:
    """Images per second: pipelines from files against forward passes on decoded tensors."""
    import numpy as np
    import torch

    import transferkit
    from transferkit.models.create import PooledFeatures
    from transferkit.models.folder import load_model
    from transferkit.data.loaders import resolve_preprocessing
    from transferkit.cache.passes import extract_features
    from transferkit.inference.predictor import create_forward

    torch.set_num_threads(os.cpu_count() or 1)
    _, items = labelled_files(data / "train")
    model, _ = load_model(run_dir / "model")
    preprocessing = resolve_preprocessing(model)
    size = preprocessing["input_size"]
    workers = os.cpu_count() or 1

    def forward_rate(module: Any, images: int) -> float:
        forward = create_forward(module, size, "onnx")
        batch = np.random.default_rng(0).standard_normal((batch_size, *size)).astype(np.float32)
        forward(batch)  # warm-up: first-call allocations are not throughput
        started = time.perf_counter()
        for _ in range(images // batch_size):
            forward(batch)
        return (images // batch_size) * batch_size / (time.perf_counter() - started)

    features = PooledFeatures(model)
    raw_features = forward_rate(features, 512)
    paths = [path for path, _ in items]
    extract_features(model, paths[:batch_size], preprocessing, "onnx", batch_size, workers)  # warm-up, as above
    started = time.perf_counter()
    extract_features(model, paths, preprocessing, "onnx", batch_size, workers)
    feature_pass = len(items) / (time.perf_counter() - started)

    raw_classifier = forward_rate(model, 512)
    files = [path for path, _ in (items * 4)[:1000]]
    transferkit.predict(run_dir, files[:batch_size], batch_size=batch_size)
    started = time.perf_counter()
    result = transferkit.predict(run_dir, files, batch_size=batch_size)
    predict_rate = len(result.predictions) / (time.perf_counter() - started)
    return {
        "raw_feature_forward": raw_features, "feature_pass": feature_pass,
        "raw_classifier_forward": raw_classifier, "predict_1000": predict_rate,
    }


def child(args: argparse.Namespace) -> None:
    data = Path(args.data)
    if args.contender == "fastai":
        result: dict[str, Any] = {"val_accuracy": fastai_contender(data, args.fastai_epochs)}
    elif args.contender == "tutorial":
        result = {"val_accuracy": tutorial_contender(data, args.tutorial_epochs)}
    elif args.contender == "keras":
        result = {"val_accuracy": keras_contender(data, 10, 5)}
    elif args.contender == "throughput":
        result = throughput(data, Path(args.run_dir))
    else:
        raise SystemExit(f"unknown contender {args.contender}")
    Path(args.result).write_text(json.dumps(result))


# --- the parent: one dataset at a time -----------------------------------------------------------


def frozen_phase_seconds(run_dir: Path) -> float:
    """Computing (or reading) the features plus training the head on them."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics["features"]["seconds"] + metrics["phases"]["frozen"]["fit_seconds"]


def benchmark(dataset: str, mirror: Path, contenders: list[str], peer_python: str, args: argparse.Namespace) -> dict[str, Any]:
    data = mirror / dataset
    entry: dict[str, Any] = {"dataset": dataset, "date": str(date.today()), "contenders": {}}
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        cache = work / "cache"
        train = [sys.executable, "-m", "transferkit.cli", "train", str(data), "--output", str(work / "run"),
                 "--no-progress", "--no-report", "--cache-dir", str(cache)]
        # A cache home of its own (ONNX exports), so the first train starts as cold as a new user's.
        cold = {"TRANSFERKIT_CACHE": str(work / "cache-home")}
        timing = run_child(train, env=cold)
        metrics = json.loads((work / "run" / "metrics.json").read_text())
        entry["contenders"]["transferkit"] = {**timing, "val_accuracy": metrics["val"]["accuracy"], "date": str(date.today())}
        print(f"{dataset} transferkit: {entry['contenders']['transferkit']}", flush=True)

        # The same command again: the features come from the cache the first run filled.
        run_child([*train[:6], str(work / "again"), *train[7:]], env=cold)
        entry["warm_cache"] = {"first": frozen_phase_seconds(work / "run"), "second": frozen_phase_seconds(work / "again")}

        result = work / "throughput.json"
        run_child([sys.executable, __file__, "--child", "throughput", "--data", str(data), "--run-dir", str(work / "run"),
                   "--result", str(result)])
        entry["throughput"] = json.loads(result.read_text())
        print(f"{dataset} throughput: {entry['throughput']} warm cache: {entry['warm_cache']}", flush=True)

        for name in [c for c in contenders if c != "transferkit"]:
            result = work / f"{name}.json"
            command = [peer_python, __file__, "--child", name, "--data", str(data), "--result", str(result),
                       "--fastai-epochs", str(args.fastai_epochs), "--tutorial-epochs", str(args.tutorial_epochs)]
            timing = run_child(command, env={"KERAS_BACKEND": "torch"})
            entry["contenders"][name] = {**timing, **json.loads(result.read_text()), "date": str(date.today())}
            print(f"{dataset} {name}: {entry['contenders'][name]}", flush=True)
    return entry


def table(entries: list[dict[str, Any]]) -> str:
    lines = [
        f"Measured on {platform.machine()} with {os.cpu_count()} cores (`python benchmarks/peers.py`); every "
        "contender trains on `DATA/train` and is scored on `DATA/val`. Peak memory is the largest "
        "process's resident set. Keras starts from random weights (none can be loaded offline): its "
        "accuracy is not comparable, its time is.",
        "",
        "| dataset | CPU | contender | val accuracy | wall time (s) | peak memory (MiB) | its time / ours | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    entries = sorted(entries, key=lambda entry: (entry["dataset"], row_cpu(entry) != UNRECORDED_CPU))
    for entry in entries:
        ours = entry["contenders"]["transferkit"]["wall_seconds"]
        for name, row in entry["contenders"].items():
            accuracy = f"{row['val_accuracy']:.4f}" + (" (random init)" if name == "keras" else "")
            lines.append(f"| {entry['dataset']} | {row_cpu(entry)} | {name} | {accuracy} | {row['wall_seconds']:.1f} | "
                         f"{row['peak_mib']:.0f} | {row['wall_seconds'] / ours:.1f}x | {row.get('date', entry['date'])} |")
    lines += [
        "",
        "Throughput (images per second, transferkit's process, batch 64):",
        "",
        "| dataset | CPU | feature pass from files | backbone forward on decoded tensors | ratio (target >= 0.80) | "
        "predict, 1,000 files | classifier forward on decoded tensors | ratio (target >= 0.80) | "
        "frozen phase, first / warm-cache train (s) | speed-up (target >= 20x) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        t, warm = entry["throughput"], entry["warm_cache"]
        lines.append(
            f"| {entry['dataset']} | {row_cpu(entry)} | {t['feature_pass']:.1f} | {t['raw_feature_forward']:.1f} | "
            f"{t['feature_pass'] / t['raw_feature_forward']:.2f} | {t['predict_1000']:.1f} | "
            f"{t['raw_classifier_forward']:.1f} | {t['predict_1000'] / t['raw_classifier_forward']:.2f} | "
            f"{warm['first']:.2f} / {warm['second']:.2f} | {warm['first'] / warm['second']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="hymenoptera,tf_flowers")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter with fastai and keras installed")
    parser.add_argument("--mirror", default=str(HERE.parent.parent / "shared" / "datasets"))
    parser.add_argument("--fastai-epochs", type=int, default=3)
    parser.add_argument("--tutorial-epochs", type=int, default=25)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.contender = args.child
        child(args)
        return
    contenders = [c for c in args.contenders.split(",") if c]
    raw = json.loads(RAW.read_text()) if RAW.is_file() else {}
    for dataset in [d for d in args.datasets.split(",") if d]:
        entry = benchmark(dataset, Path(args.mirror), contenders, args.peer_python, args)
        # Peers not rerun keep their earlier rows from the same CPU; their ratio is then to
        # today's transferkit time. Another CPU's rows stay under their own key.
        entry["cpu"] = cpu_name()
        key = f"{dataset} on {entry['cpu']}"
        entry["contenders"] = {**raw.get(key, {}).get("contenders", {}), **entry["contenders"]}
        raw[key] = entry
        RAW.write_text(json.dumps(raw, indent=2) + "\n")
    write_section("peers", "Against fastai, the PyTorch tutorial and Keras", table(list(raw.values())))
    print(table(list(raw.values())))


if __name__ == "__main__":
    main()
