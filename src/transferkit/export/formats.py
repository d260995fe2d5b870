"""Every format ``transferkit export`` writes: its file name, the packages it needs and the
module (``export/<format>.py``) that writes the file and runs it in its own runtime.

A format module has ``write(module, metadata, path, calibration, quantize)``, ``load(path)`` (a
Predictor that runs the file in that runtime) and ``read_metadata`` / ``write_metadata`` (the
JSON record every exported file carries: classes, preprocessing, temperature, unknown threshold).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from transferkit.errors import ConfigError, RunFolderError


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    """How the file's name ends; OpenVINO's ``.xml`` has its weights in a ``.bin`` beside it."""
    writes_with: tuple[str, ...]
    """Import names needed to write the file (and check it)."""
    runs_with: tuple[str, ...]
    """Import names needed to run it (predict, evaluate, serve)."""
    install: str
    quantizations: tuple[str, ...] = ()
    deprecated: str = ""

    def module(self) -> ModuleType:
        return importlib.import_module(f"transferkit.export.{self.name}")

    def missing(self, names: tuple[str, ...] | None = None) -> list[str]:
        """The import names among ``names`` (default: what writing needs) not installed here."""
        return [name for name in (names or self.writes_with) if importlib.util.find_spec(name) is None]

    def needs(self, quantize: str | None = None) -> tuple[str, ...]:
        """Import names needed to write the file with ``quantize`` (NNCF quantises OpenVINO's)."""
        return self.writes_with + (("nncf",) if self.name == "openvino" and quantize else ())

    def installed(self, quantize: str | None = None) -> bool:
        return not self.missing(self.needs(quantize))

    def default_file(self, quantize: str | None = None) -> str:
        # A bare model.pt could be any torch file; the default name says what it holds.
        suffix = ".torchscript.pt" if self.name == "torchscript" else self.suffix
        return f"model{'.' + quantize if quantize else ''}{suffix}"

    def sidecars(self, path: Path) -> list[Path]:
        """Files the format keeps beside ``path`` (OpenVINO's weights)."""
        return [path.with_suffix(".bin")] if self.name == "openvino" else []


FORMATS: dict[str, Format] = {
    "onnx": Format("onnx", ".onnx", ("onnx", "onnxruntime"), ("onnxruntime",), "pip install onnx onnxruntime",
                   ("int8", "int8-dynamic")),
    "openvino": Format("openvino", ".xml", ("openvino", "onnx", "onnxruntime"), ("openvino",),
                       "pip install 'transferkit[openvino]'", ("int8",)),
    "litert": Format("litert", ".tflite", ("litert_torch", "ai_edge_litert"), ("ai_edge_litert",),
                     "pip install 'transferkit[litert]'"),
    "executorch": Format("executorch", ".pte", ("executorch",), ("executorch",), "pip install 'transferkit[executorch]'"),
    "pt2": Format("pt2", ".pt2", ("torch",), ("torch",), "pip install torch"),
    "torchscript": Format("torchscript", ".pt", ("torch",), ("torch",), "pip install torch",
                          deprecated="torch.jit is deprecated upstream; use --format pt2 or executorch"),
}

ALL_CHOICES = (("onnx", None), ("onnx", "int8"), ("openvino", None), ("openvino", "int8"), ("litert", None),
               ("executorch", None), ("pt2", None))
"""What ``--format all`` writes where installed: every runtime, float and the int8 that is faster
(neither TorchScript, deprecated upstream, nor dynamic int8, kept for the record)."""

QUANTIZATIONS = ("int8", "int8-dynamic")


def check_choice(format: str, quantize: str | None) -> Format:
    """The Format of a ``--format``/``--quantize`` pair, or every problem with it in one error."""
    problems = []
    if format not in FORMATS:
        problems.append(f"--format must be one of {', '.join([*FORMATS, 'all'])}, got {format!r}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        problems.append(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if not problems and quantize is not None and quantize not in FORMATS[format].quantizations:
        formats = [name for name, f in FORMATS.items() if quantize in f.quantizations]
        problems.append(f"--quantize {quantize} works with --format {' or '.join(formats)}, not {format}")
    if problems:
        raise ConfigError(problems)
    chosen = FORMATS[format]
    missing = chosen.missing(chosen.needs(quantize))
    if missing:
        option = f"--format {format}" + (f" --quantize {quantize}" if quantize else "")
        raise ConfigError([f"{option} needs {', '.join(missing)}, not installed here: {chosen.install}"])
    return chosen


def format_of_file(path: str | os.PathLike[str]) -> Format | None:
    """The format an exported file's name says, or None (a folder, or another file)."""
    name = Path(path).name.lower()
    if not Path(path).is_file():
        return None
    return next((chosen for chosen in FORMATS.values() if name.endswith(chosen.suffix)), None)


def load_exported(path: str | os.PathLike[str]) -> object:
    """The Predictor of an exported file, through its own runtime; one line naming the install
    command where that runtime is missing."""
    chosen = format_of_file(path)
    if chosen is None:
        raise RunFolderError(f"{path} is not a file transferkit exports")
    missing = chosen.missing(chosen.runs_with)
    if missing:
        raise RunFolderError(f"{path} is a {chosen.name} file; running it needs {', '.join(missing)}: {chosen.install}")
    return chosen.module().load(Path(path))


def read_exported(path: Path, kind: str, read: Callable[[Path], tuple[Any, Any]]) -> tuple[Any, Any]:
    """``read(path)`` -> (the loaded program, its metadata record), refusing in one line a file the
    runtime cannot read (``kind`` names what it should be) or one that carries no record."""
    try:
        program, metadata = read(path)
    except Exception as error:
        raise RunFolderError(f"{path} is not a readable {kind} ({str(error).splitlines()[0]})") from None
    if metadata is None:
        raise RunFolderError(f"{path} carries no class names or preprocessing; export it with `transferkit export RUN`")
    return program, metadata
