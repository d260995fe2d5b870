"""Torch-free image decoding (``load_image``, ``UnreadableImage``, scanning) and the evaluation
transform: nothing here imports torch, so an exported ``.onnx`` model is read, preprocessed and
run with Pillow, NumPy and ONNX Runtime alone."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from transferkit._io import NotRegularFile, open_regular
from transferkit.errors import DataError

# Pillow refuses images over twice this many pixels by default; a decompression bomb of
# 20,000 x 20,000 px would otherwise take 1.2 GB to decode. 64 megapixels covers real photos.
MAX_IMAGE_PIXELS = 64_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False


def image_extensions() -> set[str]:
    """Every file extension Pillow decodes (``.jpg``, ``.png``, ``.webp`` ...), lower case."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and floating-point images scaled to 8 bits; a plain convert would
    clip at 255, and turn a float image in [0, 1] (the usual scientific TIFF) black."""
    array = np.asarray(image).astype(np.float32)
    finite = array[np.isfinite(array)]
    peak = float(finite.max()) if finite.size else 0.0
    if image.mode == "F" and peak <= 1.0:
        top = 1.0
    else:
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    # NaN marks missing data: black, as is the bottom of the range; +inf is the top.
    array = np.nan_to_num(array, nan=0.0, posinf=top, neginf=0.0)
    return Image.fromarray((array * np.float32(255.0 / top)).clip(0, 255).astype(np.uint8))


class UnreadableImage(DataError):
    """A file transferkit cannot use as an image; ``str()`` is the one-line reason.

    ``too_large``: over the pixel limit (a decompression-bomb guard) rather than broken.
    """

    def __init__(self, reason: str, too_large: bool = False):
        super().__init__(reason)
        self.too_large = too_large


def _size_of(source: str | os.PathLike[str] | IO[bytes]) -> int:
    if hasattr(source, "seek"):
        return source.seek(0, os.SEEK_END)
    return os.stat(source).st_size


def _reason(error: Exception, source: str | os.PathLike[str] | IO[bytes]) -> str:
    """What a user can act on, instead of the decoder's exception."""
    if isinstance(error, NotRegularFile):
        return error.strerror
    if isinstance(error, FileNotFoundError):
        return "file not found (a broken symbolic link, or removed while running)"
    if isinstance(error, PermissionError):
        return "permission denied; make the file readable"
    if isinstance(error, OSError) and error.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(error, UnidentifiedImageError):
        return "empty file (0 bytes)" if _size_of(source) == 0 else "not an image in any format Pillow reads"
    detail = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
    return f"truncated or corrupt image data ({detail})"


def load_image(
    source: str | os.PathLike[str] | IO[bytes], min_side: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode any image Pillow reads (a path or a binary file) as RGB, EXIF orientation applied.

    ``min_side``: JPEGs are decoded at a reduced scale (Pillow's draft mode) as long as both
    sides stay at least this large, which cuts decoding time several-fold for large photos.
    Transparent images are composited on white, so their background does not turn black; an
    animated image gives its first frame. The pixel count is checked from the header, before
    anything is decoded. Any failure is an :class:`UnreadableImage` with a one-line reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # A path is opened here, not by Pillow, so a FIFO or device is refused before a read
            # that would block forever.
            opened: Any = contextlib.nullcontext(source) if hasattr(source, "read") else open_regular(source)
            with opened as handle, Image.open(handle) as image:
                if image.width * image.height > max_pixels:
                    raise UnreadableImage(
                        f"{image.width}x{image.height} pixels is over the {max_pixels:,}-pixel limit", too_large=True
                    )
                if min_side and image.format == "JPEG":
                    image.draft("RGB", (min_side, min_side))
                image.load()
                return _to_rgb(ImageOps.exif_transpose(image))
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard fires on the header, above its limit, before ours can read the size.
        raise UnreadableImage(f"over the {max_pixels:,}-pixel limit", too_large=True) from None
    except Exception as error:  # any decoder failure means the file cannot be used
        raise UnreadableImage(_reason(error, source)) from None


def read_image(path: str | os.PathLike[str], min_side: int | None = None) -> tuple[Image.Image, bytes]:
    """``load_image`` of a path, with the SHA-256 of exactly the bytes decoded: the file is read
    once, so a file rewritten meanwhile can never have one content's digest and another's pixels."""
    try:
        with open_regular(path) as handle:
            data = handle.read()
    except OSError as error:
        raise UnreadableImage(_reason(error, path)) from None
    return load_image(io.BytesIO(data), min_side), hashlib.sha256(data).digest()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def check_image(path: str) -> str | None:
    """None if the image decodes, else a one-line reason."""
    try:
        load_image(path, min_side=32)
    except UnreadableImage as error:
        return str(error)
    return None


def scan_images(paths: list[str], num_workers: int = 0) -> dict[str, str]:
    """Decode every image once (JPEGs at reduced scale) and return {path: reason} for failures."""
    if num_workers > 1 and len(paths) > 64:
        with ProcessPoolExecutor(num_workers) as pool:
            reasons = list(pool.map(check_image, paths, chunksize=32))
    else:
        reasons = [check_image(p) for p in paths]
    return {path: reason for path, reason in zip(paths, reasons) if reason is not None}


# --- transforms -------------------------------------------------------------------------------


def resize_side(preprocessing: dict[str, Any]) -> int:
    """The shorter side an image is resized to before the centre crop."""
    size = preprocessing["input_size"][-1]
    return int(np.floor(size / preprocessing.get("crop_pct", 1.0)))


RESAMPLING = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def preprocess_image(image: Image.Image, preprocessing: dict[str, Any]) -> np.ndarray:
    """The evaluation transform as a float32 CHW array: resize the shorter side, centre crop,
    scale to [0, 1], normalize. It computes exactly what timm's eval transform (torchvision's
    Resize, CenterCrop, ToTensor, Normalize) computes, without torch; a test holds them equal."""
    size = preprocessing["input_size"][-1]
    short = resize_side(preprocessing)
    width, height = image.size
    if width <= height:
        new_size = (short, int(short * height / width))
    else:
        new_size = (int(short * width / height), short)
    image = image.resize(new_size, RESAMPLING[preprocessing.get("interpolation", "bilinear")])
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    return normalize_image(image.crop((left, top, left + size, top + size)), preprocessing)


def normalize_image(image: Image.Image, preprocessing: dict[str, Any]) -> np.ndarray:
    """An image of the input size as a float32 CHW array, as torchvision's ToTensor and Normalize give it."""
    array = np.asarray(image, dtype=np.float32) / np.float32(255)
    array = (array - np.asarray(preprocessing["mean"], np.float32)) / np.asarray(preprocessing["std"], np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))
