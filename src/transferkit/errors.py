"""Errors a user can act on. The CLI prints their message on one line, without a traceback."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class TransferkitError(Exception):
    """Base class: the message says what was found, what is expected and how to fix it."""


class ConfigError(TransferkitError, ValueError):
    """One or more options are invalid; every problem is listed at once."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class DataError(TransferkitError):
    """The image folder cannot be used as it is."""


class WeightsUnavailableError(TransferkitError):
    """Pretrained weights were asked for but cannot be loaded here."""


class RunFolderError(TransferkitError):
    """A run folder is missing, incomplete or from an incompatible version."""


class ModelOutputError(RunFolderError):
    """A model answered what cannot be an answer (NaN probabilities, another number of outputs
    than it has class names), so its file is not what it says it is."""


class CacheError(TransferkitError):
    """The feature cache holds something this run cannot use, and the fix is the user's."""


class TrainingDivergedError(TransferkitError):
    """No phase left usable weights: every validation loss was NaN or infinite."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGINT or SIGTERM) and stopped where it was; ``signum``
    says which, so the exit status can follow the shell's 128 + signal convention."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def raise_together(found: list[str], build: Callable[[], T]) -> T:
    """``build()``'s result; or, when ``found`` holds problems or ``build`` raises a
    ``ConfigError``, one ``ConfigError`` with all of them, so a user fixes them in one go."""
    try:
        result = build()
    except ConfigError as error:
        raise ConfigError(found + error.problems) from None
    if found:
        raise ConfigError(found)
    return result


def refused_pickle(error: BaseException) -> str | None:
    """The line of torch's ``weights_only`` refusal that names what it refused ("Unsupported
    global: GLOBAL builtins.print"), or None for any other error; the rest is a dozen lines of advice."""
    refused = re.search(r"Unsupported global[^\n]*", str(error))
    return refused.group(0).strip() if refused else None


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> str:
    """' Did you mean: a, b, c?' or '' when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(matches)}?" if matches else ""


def non_finite_problems(section: object, flag_prefix: str = "") -> list[str]:
    """NaN or infinity in any number of a config ``section``: every range check compares false
    with NaN, so ``--split nan,0.5,0.5`` would pass them all and train on two images."""
    import dataclasses
    import math

    found = []
    for spec in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, spec.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(n, float) and not math.isfinite(n) for n in numbers):
            shown = ",".join(map(str, numbers)) if isinstance(value, tuple) else value
            found.append(f"--{flag_prefix}{spec.name.replace('_', '-')} must be a finite number, got {shown}")
    return found
