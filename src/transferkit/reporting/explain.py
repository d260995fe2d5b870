"""Class-activation heat maps: where in an image a trained classifier found its answer.

The maps come from the ``grad-cam`` library (``pip install 'transferkit[explain]'``), taken on
the map timm's ``forward_features`` returns: the last spatial map before pooling, which every
timm model has under the same name, so no layer is hard-coded per family. A ViT that pools its
class token is the exception: its last tokens do not reach the logits except through that
token, so the map is taken where the last block reads them (``blocks[-1].norm1``), reshaped
to the patch grid. Which CAM method is the default was measured by the deletion test
(``benchmarks/explain_deletion.py``; numbers in DEVELOPERS.md).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.errors import ConfigError, TransferkitError, close_matches

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

    from transferkit.inference.predictor import Predictor

log = logging.getLogger(__name__)

METHODS = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
}
"""The CAM methods of ``pytorch_grad_cam`` offered, by the name options use. All need one
forward and one backward pass; ScoreCAM and AblationCAM (a forward per channel) are left out."""

DEFAULT_METHOD = "gradcam"


class ExplainUnavailable(TransferkitError):
    """Explanations cannot be made for this model or in this installation."""


def require_grad_cam() -> Any:
    """The ``pytorch_grad_cam`` module, or a one-line error saying how to install it."""
    try:
        import pytorch_grad_cam
    except ImportError:
        raise ExplainUnavailable(
            "explanations need the grad-cam package; install it with pip install 'transferkit[explain]'"
        ) from None
    return pytorch_grad_cam


def grad_cam_available() -> bool:
    """Whether grad-cam is installed; looked up without importing it (and OpenCV with it), so a
    server that is never asked for a heat map does not grow by them."""
    import importlib.util

    return importlib.util.find_spec("pytorch_grad_cam") is not None


def _hooked_classifier(model: nn.Module) -> nn.Module:
    """The classifier with an identity module on ``forward_features``' output, the one place the
    CAM hooks for every timm model; made per call, so the caller's model never keeps a hook."""
    from torch import nn

    class HookedClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.feature_map = nn.Identity()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model.forward_head(self.feature_map(self.model.forward_features(images)))

    return HookedClassifier()


def _token_pooled(model: nn.Module) -> bool:
    return getattr(model, "global_pool", None) in ("token", "map")


def target_layer(model: nn.Module, input_size: tuple[int, ...]) -> tuple[str, Callable[[Any], Any] | None]:
    """(name of the module whose output the CAM weighs, in the hooked classifier; the
    transform of that output to an NCHW map, or None when it is one already).

    Raises ``ExplainUnavailable`` for a model whose last map is neither a spatial map nor a
    grid of tokens."""
    import torch

    architecture = model.pretrained_cfg.get("architecture", type(model).__name__)
    name = "feature_map"
    if _token_pooled(model):
        blocks = getattr(model, "blocks", None)
        if blocks is None or not hasattr(blocks[-1], "norm1"):
            raise ExplainUnavailable(
                f"{architecture} pools a class token and has no blocks[-1].norm1 to take a heat map from; "
                "explanations support CNNs and timm's ViT family"
            )
        name = f"model.blocks.{len(blocks) - 1}.norm1"
    probe = _hooked_classifier(model)
    seen: list[torch.Tensor] = []
    handle = probe.get_submodule(name).register_forward_hook(lambda _m, _i, output: seen.append(output))
    # A GPU server's predictor has moved the model there.
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            probe.eval()(torch.zeros(1, *input_size, device=device))
    finally:
        handle.remove()
    shape = tuple(seen[0].shape)
    if len(shape) == 4:
        return name, (_channels_first if getattr(model, "output_fmt", "NCHW") == "NHWC" else None)
    if len(shape) == 3:
        prefix = getattr(model, "num_prefix_tokens", 0)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is None or grid[0] * grid[1] != shape[1] - prefix:
            side = math.isqrt(shape[1] - prefix)
            grid = (side, side) if side * side == shape[1] - prefix else None
        if grid is not None:
            return name, _TokensToMap(prefix, int(grid[0]), int(grid[1]))
    raise ExplainUnavailable(
        f"{architecture}'s last map has shape {shape}, neither a spatial map nor a grid of tokens; "
        "heat maps cannot be placed on the image for this backbone"
    )


def _channels_first(output: torch.Tensor) -> torch.Tensor:
    return output.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class _TokensToMap:
    """ViT tokens (N, prefix + rows * columns, C) as an NCHW map, the prefix tokens dropped."""

    prefix: int
    rows: int
    columns: int

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, self.prefix:, :]
        return patches.reshape(patches.shape[0], self.rows, self.columns, patches.shape[2]).permute(0, 3, 1, 2)


@dataclass
class Explanation:
    """One image's predicted class and heat map.

    ``heatmap``: float32 (H, W) in [0, 1] at the model's input resolution, 1 where the evidence
    for ``label`` is strongest; ``image``: the uint8 (H, W, 3) crop the model saw.
    """

    path: str
    label: str
    probability: float
    heatmap: np.ndarray
    image: np.ndarray
    method: str


class Explainer:
    """A trained model and a CAM method: heat maps of preprocessed batches or of image files."""

    def __init__(self, model: nn.Module, predictor: Predictor, method: str = DEFAULT_METHOD):
        if method not in METHODS:
            raise ConfigError([f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}."
                               + close_matches(method, METHODS)])
        self._cam_class = getattr(require_grad_cam(), METHODS[method])
        self.model = model.eval()
        self.predictor = predictor
        self.method = method
        self.layer, self.reshape = target_layer(model, tuple(predictor.preprocessing["input_size"]))

    def maps(self, batch: np.ndarray, targets: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(heat maps (N, H, W) in [0, 1], class probabilities (N, classes)) of a preprocessed
        float32 batch; each map explains ``targets[i]``, by default the predicted class."""
        import torch
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        hooked = _hooked_classifier(self.model)
        chosen = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
        # The input asks for gradients so the map gets them even where the caller froze the backbone.
        images = torch.from_numpy(np.ascontiguousarray(batch)).requires_grad_(True)
        with self._cam_class(hooked, [hooked.get_submodule(self.layer)], reshape_transform=self.reshape) as cam:
            heatmaps = cam(images, targets=chosen)
            # The calibrated probability, as predict prints it beside the overlay.
            probabilities = torch.softmax(cam.outputs.detach().float() / self.predictor.temperature, dim=1).cpu().numpy()
        self.model.zero_grad(set_to_none=True)
        return heatmaps.astype(np.float32), probabilities

    def explain(
        self, paths: list[str], batch_size: int = 16, unreadable: dict[str, str] | None = None
    ) -> list[Explanation]:
        """The predicted class and its heat map for each readable image in ``paths``, in order;
        ``unreadable`` as in ``inference.predictor.preprocessed_batches``."""
        from transferkit.inference.predictor import preprocessed_batches

        failed: dict[str, str] = {} if unreadable is None else unreadable
        # preprocessed_batches leaves out the files that fail, and records them before it yields
        # the batch they were in: the batch's names are the next paths that did not fail.
        remaining = iter(paths)
        explanations: list[Explanation] = []
        for batch in preprocessed_batches(paths, self.predictor.preprocessing, batch_size, 1, unreadable):
            heatmaps, probabilities = self.maps(batch)
            names = [next(p for p in remaining if p not in failed) for _ in range(len(batch))]
            for path, image, heatmap, row in zip(names, batch, heatmaps, probabilities):
                best = int(row.argmax())
                explanations.append(Explanation(path, self.predictor.classes[best], float(row[best]), heatmap,
                                                self.seen_image(image), self.method))
        log.info("explained %d images with %s on %s", len(explanations), self.method, self.layer)
        return explanations

    def seen_image(self, preprocessed: np.ndarray) -> np.ndarray:
        """The uint8 (H, W, 3) image a preprocessed CHW array shows: the normalisation undone."""
        mean = np.asarray(self.predictor.preprocessing["mean"], np.float32)
        std = np.asarray(self.predictor.preprocessing["std"], np.float32)
        return np.clip((preprocessed.transpose(1, 2, 0) * std + mean) * 255 + 0.5, 0, 255).astype(np.uint8)


def load_explainer(run: str | os.PathLike[str], method: str = DEFAULT_METHOD) -> Explainer:
    """An Explainer for a run folder or its ``model/`` folder; an exported ``.onnx`` file is
    refused, since heat maps need the gradients of the torch model."""
    from transferkit.inference.loading import load_run_model
    from transferkit.run.folder import is_exported_file

    if is_exported_file(run):
        raise ExplainUnavailable(f"{run} is an exported model without gradients; to explain, pass the run folder "
                                 "it was exported from")
    require_grad_cam()
    model, predictor = load_run_model(run)
    return Explainer(model, predictor, method)


# --- overlays -------------------------------------------------------------------------------------

OVERLAY_SIDE = 320
"""Each panel is drawn at least this many pixels wide: a 64 or 224 px input is too small to read."""


def heat_overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """``heatmap`` in the jet colours over ``image`` (uint8 (H, W, 3), as ``Explanation.image``)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(image.astype(np.float32) / 255, heatmap, use_rgb=True, image_weight=0.55)


def overlay_image(explanation: Explanation) -> Image.Image:
    """A PNG-ready picture: the crop the model saw and the heat map over it, side by side,
    under a title with the predicted label, its probability and the method."""
    from PIL import Image, ImageDraw, ImageFont

    image = explanation.image
    heat = heat_overlay(image, explanation.heatmap)
    scale = max(1, math.ceil(OVERLAY_SIDE / image.shape[1]))
    size = (image.shape[1] * scale, image.shape[0] * scale)
    panels = [Image.fromarray(a).resize(size, Image.BICUBIC) for a in (image, heat)]
    font = ImageFont.load_default(size=18)
    title_height, gap = 34, 8
    canvas = Image.new("RGB", (2 * size[0] + gap, size[1] + title_height), "white")
    for n, panel in enumerate(panels):
        canvas.paste(panel, (n * (size[0] + gap), title_height))
    title = f"{explanation.label}  {explanation.probability:.1%}   (red: evidence for it, {explanation.method})"
    ImageDraw.Draw(canvas).text((6, 7), title, fill="black", font=font)
    return canvas


def write_overlays(explanations: list[Explanation], folder: str | os.PathLike[str]) -> list[Path]:
    """One ``<image name>.png`` overlay per explanation in ``folder``, in order; a name that
    two images share gets ``-2``, ``-3`` ... so no overlay replaces another."""
    from transferkit._io import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    taken: set[str] = set()
    for explanation in explanations:
        stem = Path(explanation.path).stem or "image"
        name, count = f"{stem}.png", 1
        while name in taken:
            count += 1
            name = f"{stem}-{count}.png"
        taken.add(name)
        picture = overlay_image(explanation)
        atomic_write(folder / name, lambda path: picture.save(path, format="PNG"))
        written.append(folder / name)
    log.info("wrote %d overlays to %s", len(written), folder)
    return written
