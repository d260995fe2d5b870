"""``--config FILE.yaml``: options read from a file in the schema of a run folder's ``config.yaml``
(sections ``data``, ``model``, ``frozen``, ``finetune``, the rest at the top), so a run's own
file trains it again. Flags given with it override the file's values; beside ``--resume``, which
trains as the run's own file says, none are taken."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transferkit.cli.values import as_words
from transferkit.config import DataConfig, ModelConfig, PhaseConfig, TrainConfig
from transferkit.errors import ConfigError, close_matches

SECTIONS = {"data": DataConfig, "model": ModelConfig, "frozen": PhaseConfig, "finetune": PhaseConfig}


def option_types(*kinds: type) -> dict[str, str]:
    """Each flat option (``frozen.epochs``, ``seed``) of ``kinds``' fields and sections, with its type."""
    types: dict[str, str] = {}
    for kind in kinds:
        for spec in dataclasses.fields(kind):
            if spec.name in SECTIONS:
                types.update({f"{spec.name}.{inner.name}": str(inner.type)
                              for inner in dataclasses.fields(SECTIONS[spec.name])})
            else:
                types[spec.name] = str(spec.type)
    return types


def read_config_file(path: str | Path, accepted: Mapping[str, str], schema: Mapping[str, str]) -> tuple[str | None, dict[str, Any]]:
    """(the data source it names, else None; its options that ``accepted`` holds, flat). A key of
    ``schema`` that this command does not take is left out (a run's ``frozen`` section means nothing
    to the audit); a key of neither, or a value of the wrong type, is one line naming it and the file.
    A run folder's own file names that folder as its output: a new train must not write there."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"--config {path} not found; give a YAML file such as a run folder's config.yaml"]) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())[:160]
        raise ConfigError([f"--config {path} cannot be read ({reason}); it must be YAML like a run's config.yaml"]) from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError([f"--config {path}: expected a mapping of options (key: value), got {type(values).__name__}"])
    from_run = "format_version" in values
    values = {key: value for key, value in values.items() if key != "format_version"}
    flat, problems = _flatten(values, path)
    source = flat.pop("data.source", None)
    if source is not None and not isinstance(source, str):
        problems.append(f"{path}: data.source must be a folder, manifest or dataset name, got {source!r}")
        source = None
    options = {}
    for key, value in flat.items():
        if key not in schema:
            problems.append(f"{path}: unknown key {key!r}.{close_matches(key, list(schema))}")
        elif key in accepted and not (key == "output" and from_run):
            checked = _checked(value, accepted[key])
            if isinstance(checked, _Wrong):
                problems.append(f"{path}: {key} must be {checked.expected}, got {value!r}")
            else:
                options[key] = checked
    if problems:
        raise ConfigError(problems)
    return source, options


def _flatten(values: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[str]]:
    flat, problems = {}, []
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                problems.append(f"{path}: {key} must be a section of options (key: value), got {value!r}")
                continue
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[str(key)] = value
    return flat, problems


@dataclasses.dataclass
class _Wrong:
    expected: str


def _checked(value: Any, kind: str) -> Any:
    """``value`` as a field of type ``kind`` holds it, or what was expected."""
    if value is None:
        return None if "None" in kind else _Wrong("given (a value, not empty)")
    if "bool" in kind:
        return value if isinstance(value, bool) else _Wrong("true or false")
    if isinstance(value, bool):
        return _Wrong(f"a {'number' if 'int' in kind or 'float' in kind else 'text'}, not true or false")
    if kind.startswith("tuple[str"):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return tuple(value) if ok else _Wrong("a list of option names")
    if "tuple" in kind:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return tuple(float(v) for v in value) if ok else _Wrong("a list of numbers, e.g. [0.8, 0.16, 0.04]")
    if "int" in kind:
        return value if isinstance(value, int) else _Wrong("a whole number")
    if "float" in kind:
        return float(value) if isinstance(value, (int, float)) else _Wrong("a number")
    # Text options that YAML may read as numbers (unfreeze: 3, devices: 1) mean what their flags do.
    return str(value) if isinstance(value, (str, int, float)) else _Wrong("text")


TRAIN_OPTIONS = option_types(TrainConfig)
LR_FIND_SKIP = frozenset({"output", "time_limit", "calibrate", "unknown_score", "unknown_keep", "audit", "report",
                          "logger", "mlflow_uri"})
"""Train's options that change nothing before a phase trains: lr-find has no flag for them."""
LR_FIND_OPTIONS = {key: kind for key, kind in TRAIN_OPTIONS.items() if key not in LR_FIND_SKIP}


def flag_for(dest: str) -> str:
    """The flag that sets option ``dest``: ``finetune.epochs`` is ``--finetune-epochs``, ``data.image_size``
    ``--image-size`` (the phases' flags carry their name, the other sections' do not)."""
    section, _, name = dest.rpartition(".")
    kind = SECTIONS.get(section, TrainConfig)
    spec = next((field for field in dataclasses.fields(kind) if field.name == name), None)
    prefix = f"{section}-" if kind is PhaseConfig else ""
    return (spec.metadata.get("flag") if spec else None) or f"--{prefix}{name.replace('_', '-')}"


def resume_conflict(run_dir: str, source: str | None, config: str | None, options: dict[str, Any]) -> str | None:
    """Why what is given beside ``--resume`` cannot be, and the way to a run that takes it: a resumed
    run finishes as its config.yaml says, so they would be dropped without a word."""
    ignored = ([source] if source else []) + (["--config", config] if config else [])
    for dest, value in options.items():
        if dest != "progress":  # how the run is shown, not what it trains
            ignored += as_words(flag_for(dest), value)
    if not ignored:
        return None
    given, own = " ".join(ignored), Path(run_dir) / "config.yaml"
    return (f"--resume finishes {run_dir} as its config.yaml says and would ignore {given}: drop "
            f"{'it' if len(ignored) == 1 else 'them'}, or train a new run with --config {own} --output NEW_RUN {given}")
