"""Batch inference over image files: the predictor, its input pipeline and its forward on a named backend."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.data.config import default_num_workers
from transferkit.data.images import load_image, preprocess_image, read_image, resize_side
from transferkit.errors import DataError, ModelOutputError
from transferkit.inference.metrics import softmax
from transferkit.inference.onnx_runtime import cached_session, session_forward

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)


Forward = Callable[[np.ndarray], Any]
"""A float32 (N, 3, H, W) batch in, (N, classes or features) out; a scored classifier gives the
tuple (logits, unknown scores)."""


def preprocessed_batches(
    paths: list[str],
    preprocessing: dict[str, Any],
    batch_size: int = 64,
    num_workers: int = 0,
    unreadable: dict[str, str] | None = None,
    digests: dict[str, bytes] | None = None,
    transform: Callable[[Any, bytes], np.ndarray] | None = None,
) -> Iterator[np.ndarray]:
    """Decoded, preprocessed images in order, ``batch_size`` at a time (fewer where files fail).

    ``unreadable``: when given, a file that cannot be used is recorded there with its reason and
    left out, so each image is decoded once; without it, such a file is an error.
    ``digests``: when given, each file is read once and the SHA-256 of the bytes decoded is
    recorded there, so what is keyed by content is keyed by the content actually used.
    ``transform``: when given, what each decoded image and the SHA-256 of its file's bytes give in
    place of the evaluation transform (``data.loaders.AugmentedView``: a view seeded by the content).

    Threads, not processes: Pillow's decoder and resize and NumPy's arithmetic release the GIL,
    and there is no process start-up (benchmarks/RESULTS.md, "Measurements behind defaults").
    At most two batches are in flight, so a slow model never makes the images pile up in memory.
    """
    min_side = resize_side(preprocessing)

    def load(path: str) -> np.ndarray | None:
        try:
            if digests is None and transform is None:
                return preprocess_image(load_image(path, min_side), preprocessing)
            image, digest = read_image(path, min_side)
            if digests is not None:
                digests[path] = digest
            return transform(image, digest) if transform else preprocess_image(image, preprocessing)
        except Exception as error:
            if unreadable is None:
                raise DataError(f"{path} could not be read ({error}); remove or replace the file") from None
            unreadable[path] = str(error)
            return None

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        remaining = iter(paths)
        while True:
            for path in remaining:
                pending.append(pool.submit(load, path))
                if len(pending) >= 2 * batch_size:
                    break
            if not pending:
                return
            images = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            images = [image for image in images if image is not None]
            if images:
                yield np.stack(images)


def run_forward(
    forward: Forward,
    paths: list[str],
    preprocessing: dict[str, Any],
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = False,
    description: str = "",
    unreadable: dict[str, str] | None = None,
    digests: dict[str, bytes] | None = None,
    transform: Callable[[Any, bytes], np.ndarray] | None = None,
) -> Any:
    """``forward`` of every image, in order, without augmentation unless ``transform`` says (a
    tuple of arrays where ``forward`` gives a tuple); see ``preprocessed_batches`` for
    ``unreadable``, ``digests`` and ``transform``."""
    from transferkit._notebook import tqdm_bar

    tqdm = tqdm_bar()

    workers = default_num_workers() if num_workers is None else num_workers
    batches = preprocessed_batches(paths, preprocessing, batch_size, workers, unreadable, digests, transform)
    total = -(-len(paths) // batch_size)
    outputs = [forward(batch) for batch in tqdm(batches, total=total, desc=description, disable=not progress,
                                                leave=False, unit="batch")]
    if outputs and isinstance(outputs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outputs))
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)


_FLOAT32_SWITCH = threading.RLock()


@contextmanager
def exact_float32(device: Any) -> Iterator[None]:
    """Full float32 in cuDNN's convolutions and cuBLAS's products on a CUDA ``device``, which
    PyTorch runs in TF32 on Ampere and newer GPUs by default; a no-op elsewhere. On an H200,
    TF32 moved probabilities and unknown scores by up to 3e-4 between batch sizes and from the
    CPU's and the ONNX export's answers, which can move an image across the unknown threshold
    set on them. Inference is cheap next to training, so it stays exact; training keeps TF32.

    The switches are process-wide, so one thread holds them at a time: another thread's
    inference waits rather than turn TF32 back on halfway through this one's."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    backends = torch.backends
    # torch's newer fp32_precision switches, where they exist: once anyone has set them,
    # reading the older allow_tf32 ones raises.
    if hasattr(getattr(backends.cudnn, "conv", None), "fp32_precision"):
        switches = [(backends.cudnn.conv, "fp32_precision", "ieee"), (backends.cuda.matmul, "fp32_precision", "ieee")]
    else:
        switches = [(backends.cudnn, "allow_tf32", False), (backends.cuda.matmul, "allow_tf32", False)]
    with _FLOAT32_SWITCH:
        saved = [getattr(owner, name) for owner, name, _ in switches]
        for owner, name, exact in switches:
            setattr(owner, name, exact)
        try:
            yield
        finally:
            for (owner, name, _), value in zip(switches, saved):
                setattr(owner, name, value)


def torch_forward(module: nn.Module, device: str) -> Forward:
    import torch

    module = module.eval().to(device)
    if device == "cpu":
        module = module.to(memory_format=torch.channels_last)

    def forward(batch: np.ndarray) -> Any:
        images = torch.from_numpy(batch).to(device)
        if device == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), exact_float32(device):
            outputs = module(images)
        if isinstance(outputs, tuple):
            return tuple(output.float().cpu().numpy() for output in outputs)
        return outputs.float().cpu().numpy()

    return forward


BACKENDS = ("onnx", "cpu", "cuda")
"""Where a module runs: "onnx" is ONNX Runtime on CPU through the export cache (eager PyTorch on
CPU where ONNX cannot express the module); "cpu" and "cuda" are eager PyTorch on that device."""


def default_backend(device: str) -> str:
    """ONNX Runtime on CPU (several times eager PyTorch's speed there), eager PyTorch on a GPU."""
    return "onnx" if device == "cpu" else device


def create_forward(module: nn.Module, input_size: tuple[int, ...], backend: str) -> Forward:
    """``module`` as a forward function on ``backend`` (one of ``BACKENDS``)."""
    if backend == "onnx":
        session = cached_session(module, input_size)
        if session is not None:
            return session_forward(session)
        backend = "cpu"
    return torch_forward(module, backend)


class Predictor:
    """A trained classifier with its class names and preprocessing, ready for batch inference.

    ``info`` says where it came from (architecture, source file), and holds the model's
    ``calibration`` and ``unknown`` records where it has them (see ``trust``); servers show it.
    ``forward`` gives calibrated logits, and the unknown score beside them where the model has
    one. ``module`` is the torch module behind ``forward`` where there is one (not for a
    ``.onnx`` file).
    """

    def __init__(
        self, forward: Forward, classes: list[str], preprocessing: dict[str, Any], info: dict[str, Any] | None = None,
        module: nn.Module | None = None,
    ):
        self.forward = forward
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.info = info or {}
        self.module = module

    @property
    def temperature(self) -> float:
        return float((self.info.get("calibration") or {}).get("temperature", 1.0))

    @property
    def unknown(self) -> dict[str, Any] | None:
        """The unknown score's record (method, threshold, the share of validation images it keeps)."""
        return self.info.get("unknown")

    def scored_batch(self, batch: np.ndarray, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(class probabilities, unknown scores or None) of a preprocessed batch; ``tta`` averages
        each image with its mirror image."""

        def once(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            outputs = self.forward(images)
            logits, scores = outputs if isinstance(outputs, tuple) else (outputs, None)
            return self.checked(softmax(self.checked_logits(np.asarray(logits))), scores)

        probabilities, scores = once(batch)
        if tta:
            mirrored, mirrored_scores = once(np.ascontiguousarray(batch[..., ::-1]))
            probabilities = (probabilities + mirrored) / 2
            scores = None if scores is None else (scores + mirrored_scores) / 2
        return probabilities, scores

    def checked_logits(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` when they hold one column per class: a file whose outputs outnumber its class
        names would otherwise shift every later image onto the earlier ones' outputs."""
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise ModelOutputError(
                f"{self.info.get('source', 'the model')} gave outputs of shape {logits.shape} for "
                f"{len(self.classes)} class names; {EXPORT_AGAIN}"
            )
        return logits

    def checked(
        self, probabilities: np.ndarray, scores: np.ndarray | None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities, scores) when they can be answered: a NaN probability ranks first and a
        NaN score is above no threshold, so either would answer wrong in silence."""
        if np.isfinite(probabilities).all() and (scores is None or not np.isnan(scores).any()):
            return probabilities, scores
        raise ModelOutputError(
            f"{self.info.get('source', 'the model')} gave NaN or infinite probabilities or unknown scores, "
            "which no answer can be made of (its weights hold NaN or infinity); "
            "train or export the model again"
        )

    def probabilities_of_batch(self, batch: np.ndarray, tta: bool = False) -> np.ndarray:
        return self.scored_batch(batch, tta)[0]

    def scored(
        self,
        paths: list[str],
        batch_size: int = 64,
        num_workers: int | None = None,
        tta: bool = False,
        progress: bool = False,
        unreadable: dict[str, str] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(class probabilities, unknown scores or None), one row per image path, in order. With
        ``unreadable``, files that cannot be used are recorded there, with the reason, and get no row."""
        classes = len(self.classes)
        scored = False

        def forward(batch: np.ndarray) -> np.ndarray:
            nonlocal scored
            probabilities, scores = self.scored_batch(batch, tta)
            if scores is None:
                return probabilities
            scored = True  # one array through the pipeline: the score is the last column
            return np.column_stack([probabilities, scores])

        outputs = run_forward(
            forward, paths, self.preprocessing, batch_size, num_workers,
            progress=progress and len(paths) > batch_size, description="predict", unreadable=unreadable,
        ) if paths else np.zeros((0, classes), dtype=np.float32)
        if not scored:
            return outputs.reshape(-1, classes), None
        outputs = outputs.reshape(-1, classes + 1)
        return outputs[:, :classes], outputs[:, classes]

    def probabilities(self, paths: list[str], **options: Any) -> np.ndarray:
        """Class probabilities, one row per image path, in order (``options`` as for ``scored``)."""
        return self.scored(paths, **options)[0]


EXPORT_AGAIN = "export it again with `transferkit export RUN`"
