"""Two-phase transfer learning on Lightning.

Phase 1 ("frozen"): the backbone is frozen and only the head trains. Without augmentation,
every image's pooled backbone features are computed once and the head trains on those, so
each epoch costs milliseconds instead of a pass through the backbone.
Phase 2 ("finetune"): the top blocks are unfrozen and train at a lower learning rate on
augmented images. The final model is the checkpoint with the lowest validation loss over both.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from transferkit import models, runs
from transferkit.checkpoints import SafeCheckpointIO, checkpoint_problem, load_checkpoint
from transferkit.config import PhaseConfig, TrainConfig, parse_devices, parse_unfreeze, source_problems
from transferkit.data.folders import DatasetIndex, discover
from transferkit.data.images import scan_images
from transferkit.data.loaders import image_loader, resolve_preprocessing
from transferkit.data.registry import resolve_data_source
from transferkit.errors import ConfigError, Interrupted, RunFolderError, TrainingDivergedError
from transferkit.evaluate import compute_metrics, evaluation_from_probabilities, headline
from transferkit.features import FeatureCache, FeatureStats, extract_features
from transferkit.inference import create_forward, default_backend, run_forward, softmax
from transferkit.runs import EpochRecord, PhaseRecord, RunFolder, RunMetrics

log = logging.getLogger(__name__)
epoch_log = logging.getLogger("transferkit.epochs")
"""One line per epoch: the console a person reads, as Keras, fastai and Ultralytics print."""

RUN_DIR_ENV = "TRANSFERKIT_RUN_DIR"


class ClassifierModule(L.LightningModule):
    """One training phase of a timm classifier, on images or on cached pooled features.

    On features, each Lightning step is a whole epoch (the loader yields the epoch's features in
    its shuffled or sampled order as one batch) and the step trains on it in minibatches of
    ``batch_size``: the same updates as one step per minibatch, without Lightning's per-step cost,
    which was most of the phase when a step is one linear layer.
    """

    def __init__(
        self,
        model: nn.Module,
        phase: PhaseConfig,
        inputs: str,
        drop_rate: float,
        batchnorm: str,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
        batch_size: int = 32,
    ):
        super().__init__()
        self.model = model
        self.phase = phase
        self.inputs = inputs
        self.batch_size = batch_size
        self.automatic_optimization = inputs == "images"
        self.drop_rate = drop_rate
        self.batchnorm = batchnorm
        self.loss = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
        self.channels_last = inputs == "images"
        # On features only the head changes, so only the head is checkpointed (see on_save_checkpoint)
        # and a resumed phase keeps the frozen backbone it was built with.
        self.strict_loading = inputs == "images"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "features":
            return models.classify_pooled(self.model, x, self.drop_rate)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
        # Lightning keeps whatever mode each submodule is in when fit starts (inference on the
        # features, an ONNX export, left the backbone in eval mode, so dropout was off) and restores
        # it around validation, bypassing any train() override: the modes are set before every step.
        if self.inputs == "features":
            # Only the head runs; walking every backbone module each step cost more than the step.
            self.training = True
            self.model.get_classifier().train()
            return
        self.train()
        models.set_batchnorm_mode(self.model, self.batchnorm)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        # Validation loss is a measurement, not an objective: plain log loss, so that phases and
        # runs trained with different smoothing or class weights compare on one scale.
        loss = self.loss(logits, y) if stage == "train" else F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log(f"{stage}_acc", accuracy, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=len(y), sync_dist=True)
        return loss

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        if self.automatic_optimization:
            return self._step(batch, "train")
        return self._train_epoch_on_features(batch)

    def _train_epoch_on_features(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        features, targets = batch
        losses, correct = [], []
        for x, y in zip(features.split(self.batch_size), targets.split(self.batch_size)):
            logits = self(x)
            loss = self.loss(logits, y)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            if self.phase.scheduler == "cosine":
                scheduler.step()
            losses.append(loss.detach() * len(y))
            correct.append((logits.argmax(dim=1) == y).sum())
        if self.phase.scheduler == "step":  # after the epoch's last batch, where Lightning steps it
            scheduler.step()
        count = len(targets)
        loss, accuracy = torch.stack(losses).sum() / count, torch.stack(correct).sum() / count
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=count, sync_dist=True)
        self.log("train_acc", accuracy, prog_bar=True, on_step=True, on_epoch=True, batch_size=count, sync_dist=True)
        return loss

    def on_train_epoch_end(self) -> None:
        # Lightning steps schedulers only under automatic optimization; plateau needs the epoch's
        # validation loss, which is known by now.
        if not self.automatic_optimization and self.phase.scheduler == "plateau":
            self.lr_schedulers().step(self.trainer.callback_metrics["val_loss"])

    def validation_step(self, batch: Any, batch_index: int) -> None:
        self._step(batch, "val")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restores weights, optimizer and loop position but not the random generators;
        # with them, a resumed run draws the shuffles, augmentations and dropout masks of a run
        # that was never stopped, and ends with the same metrics.
        states = _collect_rng_states()
        if "numpy" in states:  # plain lists, so the checkpoint loads with weights_only=True
            kind, keys, position, has_gauss, gauss = states["numpy"]
            states["numpy"] = (kind, keys.tolist(), position, has_gauss, gauss)
        checkpoint["rng_states"] = states
        if self.inputs == "features":
            # The backbone is the pretrained one, unchanged: saving it twice an epoch cost more than
            # training the head (13.6 MB each for the default). _Run._load_checkpoint restores it.
            head = f"model.{models.classifier_path(self.model)}."
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if k.startswith(head) or not k.startswith("model.")
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is None:
            return
        if "numpy" in states:
            kind, keys, position, has_gauss, gauss = states["numpy"]
            states = {**states, "numpy": (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss)}
        if not torch.cuda.is_available():
            states = {k: v for k, v in states.items() if k != "torch.cuda"}
        _set_rng_states(states)

    def configure_optimizers(self) -> Any:
        from timm.optim import create_optimizer_v2

        phase = self.phase
        groups = models.parameter_groups(self.model, phase.lr, phase.weight_decay)
        optimizer = create_optimizer_v2(groups, opt=phase.optimizer, lr=phase.lr, weight_decay=phase.weight_decay)
        if phase.scheduler == "constant":
            return optimizer
        if phase.scheduler == "step":
            step = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, phase.epochs // 3), gamma=0.1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": step, "interval": "epoch"}}
        if phase.scheduler == "plateau":
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.1, patience=1)
            # Under manual optimization on_train_epoch_end steps it; Lightning would warn that it ignores a monitor.
            monitor = {"monitor": "val_loss"} if self.automatic_optimization else {}
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "interval": "epoch", **monitor}}
        total = max(1, int(self.trainer.estimated_stepping_batches))  # this also sets up the train loader
        if not self.automatic_optimization:
            # One loader batch an epoch, split into minibatches; each process trains on its share.
            samples = math.ceil(len(self.trainer.train_dataloader.dataset) / self.trainer.world_size)
            total = math.ceil(samples / self.batch_size) * phase.epochs
        warmup = int(round(phase.warmup_epochs * total / max(1, phase.epochs)))

        def cosine_with_warmup(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

        cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


class HistoryCallback(L.Callback):
    """One history row per epoch of ``phase``."""

    def __init__(self, folder: RunFolder, phase: str):
        self.folder = folder
        self.phase = phase
        self.started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics

        def value(name: str) -> float | None:
            return round(float(metrics[name]), 6) if name in metrics else None

        record = EpochRecord(
            phase=self.phase,
            epoch=trainer.current_epoch + 1,
            train_loss=value("train_loss_epoch"),
            train_acc=value("train_acc_epoch"),
            val_loss=value("val_loss"),
            val_acc=value("val_acc"),
            lr=trainer.optimizers[0].param_groups[0]["lr"],
            seconds=round(time.perf_counter() - self.started, 3),
        )
        self.folder.write_epoch(record)
        epoch_log.info(format_epoch(record, trainer.max_epochs))


def format_epoch(record: EpochRecord, epochs: int | None) -> str:
    """``frozen    3/30  train loss 0.4127 acc 0.8934  val loss 0.3018 acc 0.9346  lr 9.71e-04  0.1 s``"""

    def number(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "-"

    width = len(str(epochs or record.epoch))
    return (
        f"{record.phase:<8} {record.epoch:>{width}}/{epochs or '?'}  "
        f"train loss {number(record.train_loss)} acc {number(record.train_acc)}  "
        f"val loss {number(record.val_loss)} acc {number(record.val_acc)}  lr {record.lr or 0:.2e}  {record.seconds or 0:.1f} s"
    )


@dataclass
class TrainResult:
    """What a finished run reports; everything is also in ``run_dir``."""

    run_dir: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    best_phase: str = ""
    duplicates: dict[str, int] = field(default_factory=dict)
    """Counts of identical-image groups: groups, across_splits, across_classes."""

    @property
    def model_dir(self) -> Path:
        return RunFolder(self.run_dir).model_dir

    @property
    def run_metrics(self) -> RunMetrics:
        """``metrics`` as typed records (rank zero of a multi-process run has them)."""
        return RunMetrics.from_dict(self.metrics)


def _process_rank() -> int:
    """This process's global rank: from Lightning once training set it up, else from the
    launcher's environment (0 when training alone)."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0))


def _default_run_dir(source: str, config: TrainConfig) -> Path:
    name = Path(source).name or "data"
    return Path("runs") / f"{name}-{config.model.name.replace('/', '_')}-{datetime.now():%Y%m%d-%H%M%S}"


def _class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse class frequency, 1.0 for balanced data: loss weights, and per-sample sampling
    weights when indexed by label (the sampler only needs them proportional)."""
    counts = torch.bincount(torch.tensor(targets), minlength=num_classes).float()
    return counts.sum() / (num_classes * counts.clamp(min=1))


class FeatureTensors(TensorDataset):
    """Cached features indexed a whole batch at once: one sample at a time, then stacked, took as
    long as training the head on them."""

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return [tensor[indices] for tensor in self.tensors]


def _whole_split_loader(dataset: FeatureTensors, shuffle: bool = False, sampler: Any = None) -> DataLoader:
    """The whole split as one batch, in the sampler's order: ClassifierModule splits it into minibatches."""
    return DataLoader(dataset, batch_size=len(dataset), shuffle=shuffle, sampler=sampler, collate_fn=list)


def _train_loader(
    dataset_or_items: Any, config: TrainConfig, preprocessing: dict[str, Any], augment: str, targets: list[int]
) -> DataLoader:
    sampler = None
    if config.class_balance == "sample":
        weights = _class_weights(targets, max(targets) + 1)[torch.tensor(targets)]
        generator = torch.Generator().manual_seed(config.seed)
        sampler = WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)
    if isinstance(dataset_or_items, FeatureTensors):
        return _whole_split_loader(dataset_or_items, shuffle=sampler is None, sampler=sampler)
    return image_loader(
        dataset_or_items, preprocessing, config.data.batch_size, config.data.resolved_num_workers(),
        augment=augment, shuffle=True, sampler=sampler,
    )


def _inference_backend(config: TrainConfig) -> str:
    wants_gpu = config.accelerator in ("auto", "gpu", "cuda")
    return default_backend("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


class _Run:
    """State shared by the phases of one run; ``train`` drives it top to bottom."""

    def __init__(self, config: TrainConfig, run_dir: Path, index: DatasetIndex):
        self.config = config
        self.run_dir = run_dir
        self.folder = RunFolder(run_dir)
        self.index = index
        self.progress = self.folder.read_progress()
        self.model = models.create_classifier(config.model, len(index.classes), config.data.image_size)
        self.preprocessing = resolve_preprocessing(self.model, config.data.image_size)
        self.class_weights = (
            _class_weights(index.targets("train"), len(index.classes)) if config.class_balance == "weight" else None
        )
        self.features: dict[str, torch.Tensor] = {}
        self.feature_stats: FeatureStats | None = None
        self.backbone_pretrained = True

    def _module(self, phase: PhaseConfig, inputs: str) -> ClassifierModule:
        return ClassifierModule(
            self.model, phase, inputs, self.config.model.drop_rate, self.config.batchnorm,
            self.config.label_smoothing, self.class_weights, self.config.data.batch_size,
        )

    def _trainer(self, name: str, phase: PhaseConfig, progress_bar: bool) -> tuple[L.Trainer, ModelCheckpoint]:
        config = self.config
        checkpoint = ModelCheckpoint(
            dirpath=self.folder.checkpoints_dir,
            filename=RunFolder.checkpoint_stem(name, "best"),
            monitor="val_loss",
            mode="min",
            save_top_k=1,
            save_last=True,
            enable_version_counter=False,
        )
        checkpoint.CHECKPOINT_NAME_LAST = RunFolder.checkpoint_stem(name, "last")
        callbacks = [
            checkpoint,
            EarlyStopping(monitor="val_loss", mode="min", patience=phase.patience),
            HistoryCallback(self.folder, name),
        ]
        trainer = L.Trainer(
            max_epochs=phase.epochs,
            accelerator=config.accelerator,
            devices=parse_devices(config.devices),
            num_nodes=config.num_nodes,
            strategy=config.strategy,
            precision=config.precision,
            callbacks=callbacks,
            logger=False,
            enable_model_summary=False,
            enable_progress_bar=progress_bar,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            default_root_dir=self.run_dir,
            plugins=[SafeCheckpointIO()],
        )
        return trainer, checkpoint

    def _finished(self, name: str) -> bool:
        """Whether phase ``name`` finished in an earlier invocation and its best checkpoint still
        loads; a damaged one sends the phase back to training, with a warning."""
        record = self.progress.get(name)
        if record is None or not record.done:
            return False
        best = self.run_dir / record.best_checkpoint
        problem = checkpoint_problem(best)
        if problem is None:
            return True
        log.warning("phase %s: its best checkpoint %s is damaged (%s); training the phase again", name, best, problem)
        del self.progress[name]
        if _process_rank() == 0:
            os.replace(best, best.with_name(best.name + ".damaged"))
            # The last checkpoint of a finished phase resumes to its end, with no epochs left to train.
            self.folder.checkpoint(name, "last").unlink(missing_ok=True)
        return False

    def _resume_from(self, name: str) -> Path | None:
        """The checkpoint an interrupted phase continues from: the last one, else the best one
        (a few epochs lost), else none (the phase starts again); never a traceback."""
        for kind in ("last", "best"):
            path = self.folder.checkpoint(name, kind)
            if not path.is_file():
                continue
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if _process_rank() == 0:  # every process makes the same choice; one renames
                damaged = path.with_name(path.name + ".damaged")
                os.replace(path, damaged)
                log.warning("phase %s: checkpoint %s is damaged (%s), kept as %s; trying an earlier one",
                            name, path, problem, damaged.name)
        return None

    def _fit(self, name: str, phase: PhaseConfig, module: ClassifierModule, train: DataLoader, val: DataLoader) -> None:
        if self._finished(name):
            self._load_best_weights()
            log.info("phase %s already finished; reusing its best checkpoint", name)
            return
        trainable, total = models.count_parameters(self.model)
        log.info("phase %s: trainable %s / %s parameters", name, f"{trainable:,}", f"{total:,}")
        L.seed_everything(self.config.seed, workers=True, verbose=False)
        # On cached features an epoch is one step of milliseconds: its line says all a bar would.
        trainer, checkpoint = self._trainer(name, phase, self.config.progress and module.inputs == "images")
        resume_from = self._resume_from(name)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            try:
                trainer.fit(module, train, val, ckpt_path=resume_from, weights_only=True)
            except SystemExit:
                # Lightning ends a fit stopped by Ctrl-C with sys.exit(1), and one stopped by SIGTERM
                # with a SystemExit without a code, which would exit 0 with no model and no word.
                raise Interrupted(signal.SIGTERM if trainer.received_sigterm else signal.SIGINT) from None
        if trainer.interrupted:
            raise Interrupted(signal.SIGTERM if trainer.received_sigterm else signal.SIGINT)
        fit_seconds = time.perf_counter() - started
        best = str(Path(checkpoint.best_model_path).relative_to(self.run_dir))
        # Lightning scores a NaN validation loss as infinite; EarlyStopping ends the phase there.
        diverged = checkpoint.best_model_score is None or not math.isfinite(float(checkpoint.best_model_score))
        record = PhaseRecord(done=True, best_checkpoint=best, diverged=diverged)
        self.progress[name] = record
        # Every process continues from the best weights; only rank zero records the phase.
        self._load_best_weights()
        if not trainer.is_global_zero:
            return
        epochs = [e for e in self.folder.read_history() if e.phase == name and e.val_loss is not None]
        if diverged:
            log.warning(
                "phase %s diverged: its validation loss is not finite, so its weights are not used; "
                "lower --%s-lr (now %g)", name, name, phase.lr,
            )
        else:
            best_epoch = min((e for e in epochs if math.isfinite(e.val_loss)), key=lambda e: e.val_loss)
            record.best_val_loss, record.best_val_acc = best_epoch.val_loss, best_epoch.val_acc
            record.best_epoch = best_epoch.epoch
        record.epochs, record.trainable_parameters, record.total_parameters = len(epochs), trainable, total
        # Training only, this process: features computed before the phase are in metrics["features"].
        record.fit_seconds = round(fit_seconds, 3)
        self.folder.write_progress(self.progress)

    def _usable_phases(self) -> dict[str, PhaseRecord]:
        return {name: phase for name, phase in self.progress.items() if not phase.diverged}

    def _load_best_weights(self) -> None:
        """The best weights so far: the last phase that did not diverge (the next phase starts from them)."""
        usable = self._usable_phases()
        if usable:
            self._load_checkpoint(usable[list(usable)[-1]].best_checkpoint)

    def _load_checkpoint(self, relative: str) -> None:
        checkpoint = load_checkpoint(self.run_dir / relative)
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        if len(state) < len(self.model.state_dict()) and not self.backbone_pretrained:
            # A head-only checkpoint of the features phase, loaded after fine-tuning changed the
            # backbone: that phase's model is the pretrained backbone under its head.
            with torch.random.fork_rng():
                state = {**models.create_classifier(self.config.model, len(self.index.classes), self.config.data.image_size).state_dict(), **state}
        self.model.load_state_dict(state, strict=len(state) == len(self.model.state_dict()))

    def frozen_phase(self) -> None:
        phase = self.config.frozen
        models.freeze_backbone(self.model)
        cached = self.config.feature_cache and phase.augment == "none"
        if cached:
            self._compute_features()
            train_data: Any = FeatureTensors(self.features["train"], torch.tensor(self.index.targets("train")))
            val: DataLoader = _whole_split_loader(
                FeatureTensors(self.features["val"], torch.tensor(self.index.targets("val")))
            )
        else:
            train_data = self.index.splits["train"]
            val = self._image_loader("val")
        train = _train_loader(train_data, self.config, self.preprocessing, phase.augment, self.index.targets("train"))
        self._fit("frozen", phase, self._module(phase, "features" if cached else "images"), train, val)

    def finetune_phase(self) -> None:
        phase = self.config.finetune
        self.backbone_pretrained = False
        count = models.unfreeze_top(self.model, parse_unfreeze(phase.unfreeze))
        log.info("phase finetune: %d of %d backbone blocks train", count, len(models.backbone_blocks(self.model)))
        train = _train_loader(
            self.index.splits["train"], self.config, self.preprocessing, phase.augment, self.index.targets("train")
        )
        self._fit("finetune", phase, self._module(phase, "images"), train, self._image_loader("val"))

    def _image_loader(self, split: str) -> DataLoader:
        return image_loader(
            self.index.splits[split], self.preprocessing, self.config.data.batch_size,
            self.config.data.resolved_num_workers(),
        )

    def _run_on_split(self, module: nn.Module, split: str, description: str) -> torch.Tensor:
        """Outputs of ``module`` for every image of ``split``, in order, without augmentation."""
        items = self.index.splits[split]
        if not items:
            return torch.empty(0)
        forward = create_forward(module, self.preprocessing["input_size"], _inference_backend(self.config))
        outputs = run_forward(
            forward, [path for path, _ in items], self.preprocessing, batch_size=64,
            num_workers=self.config.data.resolved_num_workers(), progress=self.config.progress,
            description=f"{description} {split}",
        )
        return torch.from_numpy(outputs)

    def _compute_features(self) -> None:
        """Pooled features of every split, from the persistent cache where it has them."""
        cache = FeatureCache.for_backbone(
            self.model, self.preprocessing, self.config.model.global_pool, self.config.cache_dir
        )
        paths = [path for items in self.index.splits.values() for path, _ in items]

        def compute(missing: list[str], digests: dict[str, bytes]) -> np.ndarray:
            return extract_features(
                self.model, missing, self.preprocessing, backend=_inference_backend(self.config),
                num_workers=self.config.data.resolved_num_workers(), progress=self.config.progress, digests=digests,
            )

        features, stats = cache.features(paths, compute)
        start = 0
        for split, items in self.index.splits.items():
            self.features[split] = torch.from_numpy(features[start : start + len(items)])
            start += len(items)
        self.feature_stats = stats

    def best_phase(self) -> str:
        usable = self._usable_phases()
        if not usable:
            raise TrainingDivergedError(
                f"every phase diverged (validation loss not finite) in {self.run_dir}; "
                "train again with lower --frozen-lr and --finetune-lr"
            )
        return min(usable, key=lambda name: usable[name].best_val_loss)

    def logits(self, split: str, phase: str) -> torch.Tensor:
        if phase == "frozen" and split in self.features:
            with torch.inference_mode():
                return models.classify_pooled(self.model.eval(), self.features[split], 0.0)
        return self._run_on_split(self.model, split, "evaluate")

    def evaluate_phases(self) -> RunMetrics:
        """Judge every phase's best checkpoint on val and test, so the report can set frozen
        features against fine-tuning; then save the best phase's model and its evaluations."""
        splits = [split for split in ("val", "test") if split in self.index.splits]
        best = self.best_phase()
        phases = self._usable_phases()
        probabilities: dict[str, dict[str, Any]] = {}
        # The best phase goes last, so its weights are the ones left loaded for saving.
        for name in sorted(phases, key=lambda name: name == best):
            self._load_checkpoint(phases[name].best_checkpoint)
            probabilities[name] = {split: softmax(self.logits(split, name).numpy()) for split in splits}
            for split in splits:
                setattr(phases[name], split, headline(
                    compute_metrics(probabilities[name][split], self.index.targets(split), self.index.classes)
                ))
        models.save_model_folder(
            self.model, self.folder.model_dir, self.index.classes, self.preprocessing, self.config.model
        )
        metrics = RunMetrics(best_phase=best, phases=self.progress)
        for split in splits:
            evaluation = evaluation_from_probabilities(
                split, self.index.classes, self.index.splits[split], probabilities[best][split]
            )
            evaluation.write(self.folder.evaluation_dir(split))
            metrics.splits[split] = headline(evaluation.metrics)
        return metrics


def _prepare_index(
    source: str, config: TrainConfig, run_dir: Path, resuming: bool, write: bool = True
) -> DatasetIndex:
    root = resolve_data_source(source, config.data.data_mirror, config.data.download)
    folder = RunFolder(run_dir)
    if resuming and folder.has_index():
        return folder.read_index(root)
    if config.data.splits_from:
        index = RunFolder(config.data.splits_from).read_index(root)
    else:
        index = discover(root, config.data.split, config.seed, config.data.max_per_class)
        paths = [path for items in index.splits.values() for path, _ in items]
        index.drop(scan_images(paths, config.data.resolved_num_workers()))
        index.find_duplicates()
        if index.duplicates and write:
            kinds = index.duplicate_kinds()
            log.warning(
                "%d groups of identical images (%d across splits, %d under two classes), listed in %s%s",
                kinds["groups"], kinds["across_splits"], kinds["across_classes"], folder.duplicates_file.name,
                "; dropping them" if config.data.drop_duplicates else "; --drop-duplicates drops them",
            )
        if config.data.drop_duplicates:
            index.drop_duplicates()
    if not write:
        return index
    if index.skipped:
        log.warning("skipped %d files (listed in %s)", len(index.skipped), folder.skipped_file.name)
    folder.write_index(index)
    return index


def _check_engine(config: TrainConfig) -> None:
    """Lightning's judgement of accelerator, devices, strategy and precision on this machine
    (``--accelerator gpu`` where no GPU is visible), before the data scan rather than after it."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        L.Trainer(
            accelerator=config.accelerator, devices=parse_devices(config.devices), num_nodes=config.num_nodes,
            strategy=config.strategy, precision=config.precision, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
    except MisconfigurationException as error:
        raise ConfigError([f"--accelerator {config.accelerator} --devices {config.devices} --strategy "
                           f"{config.strategy} --precision {config.precision}: {error}"]) from None


def train(data: str | os.PathLike[str], config: TrainConfig | None = None) -> TrainResult:
    """Train a classifier on ``data`` as ``config`` says (default: ``TrainConfig()``) and write
    the run folder, ``config.output``.

    ``data`` is an image folder (``DATA/<class>/*`` or ``DATA/{train,val[,test]}/<class>/*``) or
    the name of a registered dataset.
    """
    problems = source_problems(data)
    if problems:
        raise ConfigError(problems)
    return _train(os.fspath(data), config if config is not None else TrainConfig(), resume=False)


def _train(source: str, config: TrainConfig, resume: bool) -> TrainResult:
    """``resume=True`` continues the run in ``config.output``: finished phases are skipped and an
    interrupted phase continues from its last checkpoint."""
    started = time.perf_counter()
    _check_engine(config)
    # Several processes (DDP) each run this function; the others are launched by Lightning with
    # the same command line, or by torchrun / SLURM. Only rank zero writes the run folder.
    main_process = _process_rank() == 0
    if config.output:
        output = Path(config.output)
    elif not main_process and os.environ.get(RUN_DIR_ENV):
        output = Path(os.environ[RUN_DIR_ENV])  # the folder rank zero named with its own clock
    else:
        output = _default_run_dir(source, config)
    # Absolute, because Lightning reports checkpoint paths absolute and they are stored relative.
    run_dir = output.absolute()
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if not main_process:  # rank zero holds the folder for the whole run
        return _train_in(run_dir, source, config, resume, started)
    runs.prepare_folder(run_dir)
    with runs.claim(run_dir):
        if not resume and RunFolder(run_dir).config_file.exists():
            if runs.holds_work(run_dir):
                raise RunFolderError(
                    f"{run_dir} already holds a run; resume it with --resume {run_dir} or choose another --output"
                )
            log.info("%s holds a start that failed before training; starting again", run_dir)
        return _train_in(run_dir, source, config, resume, started)


def _train_in(run_dir: Path, source: str, config: TrainConfig, resume: bool, started: float) -> TrainResult:
    main_process = _process_rank() == 0
    config.output = str(run_dir)
    index = _prepare_index(source, config, run_dir, resume, write=main_process)
    # The new head's initialisation draws from the global generator: seed before building it.
    L.seed_everything(config.seed, workers=True, verbose=False)
    run = _Run(config, run_dir, index)
    # Saved once the data and the model are usable: a bad folder, model name or weights file
    # leaves no half-made run, so the same command can simply run again.
    if main_process:
        run.folder.write_config(source, config)
    if config.frozen.epochs > 0:
        run.frozen_phase()
    if config.finetune.epochs > 0:
        run.finetune_phase()
    if _process_rank() != 0:
        # Another process of a multi-process run: rank zero evaluates and writes the results.
        return TrainResult(run_dir=run_dir, classes=index.classes, counts=index.counts(), metrics={})

    metrics = run.evaluate_phases()
    metrics.train_seconds = round(time.perf_counter() - started, 2)
    if run.feature_stats is not None:
        metrics.features = run.feature_stats.as_dict()
    run.folder.write_metrics(metrics)
    if config.report:
        from transferkit.report import write_report

        write_report([run_dir])
    return TrainResult(
        run_dir=run_dir, classes=index.classes, counts=index.counts(), metrics=metrics.to_dict(),
        skipped=index.skipped, best_phase=metrics.best_phase, duplicates=index.duplicate_kinds(),
    )


def resume(run_dir: str | Path) -> TrainResult:
    """Finish an interrupted run from its folder."""
    source, config = RunFolder(run_dir).read_record()
    return _train(source, config, resume=True)
