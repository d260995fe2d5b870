"""The command line: one command per public function, options generated from the config
dataclasses so ``--help`` and the Python API never drift apart."""

from __future__ import annotations

import argparse
import difflib
import gc
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from transferkit.cli import console
from transferkit.cli.handlers import COMMANDS
from transferkit.cli.options import DESCRIPTION, add_commands
from transferkit.errors import ConfigError, TransferkitError


class _Parser(argparse.ArgumentParser):
    """Errors as one line naming the fix, with the closest option for a misspelt one.

    Abbreviations are off: ``--frozen-epoch 3`` is reported as a typo of ``--frozen-epochs``
    instead of being taken silently, and a new option can never change what an old one meant.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse lists every choice; a misspelt command or choice gets the closest one instead.
        choices = list(action.choices) if action.choices is not None else []
        if isinstance(value, str) and value not in choices:
            closest = difflib.get_close_matches(value, [str(choice) for choice in choices], n=1, cutoff=0.6)
            if closest:
                raise argparse.ArgumentError(action, f"invalid choice: {value!r} (did you mean {closest[0]}?)")
        super()._check_value(action, value)

    def unknown_options(self, unknown: list[str]) -> NoReturn:
        options = [name for action in self._actions for name in action.option_strings]
        described = []
        for word in unknown:
            name = word.split("=", 1)[0]
            closest = difflib.get_close_matches(name, options, n=1, cutoff=0.6) if word.startswith("-") else []
            described.append(f"{word} (did you mean {closest[0]}?)" if closest else word)
        self.error(f"unrecognized arguments: {', '.join(described)}")


def _import_lightning(ends_process: bool) -> None:
    """Lightning sets its loggers to INFO when imported: import it first, so they are quieted after."""
    if ends_process:
        # Its imports make over half a million objects that live as long as the process; a
        # collection during them would walk them all, and the little garbage they leave is frozen with them.
        gc.disable()
    try:
        import lightning  # noqa: F401
    finally:
        if ends_process:
            gc.enable()


def command() -> int:
    """The ``transferkit`` program: :func:`main` in a process that ends when it returns."""
    return main(ends_process=True)


def main(argv: Sequence[str] | None = None, *, ends_process: bool = False) -> int:
    """Run one command; its exit status. ``ends_process``: the process exits right after, so
    everything alive when the heavy imports are done, and when the command ends, is kept for
    good (``gc.freeze``): the cyclic collector then no longer walks the half million objects of
    torch, Lightning and their imports, during a train or in the interpreter's last collections."""
    parser = _Parser(prog="transferkit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = add_commands(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        subparsers.choices[args.command].unknown_options(unknown)
    console.tolerate_odd_file_names()
    console.stop_on_sigterm()
    try:
        if args.command in ("train", "lr-find", "compare"):
            _import_lightning(ends_process)
        if ends_process:
            gc.freeze()
        console.quiet_libraries(getattr(args, "verbose", False))
        return COMMANDS[args.command](args)
    except ConfigError as error:
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    except TransferkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print("\ninterrupted", file=sys.stderr)
        return console.exit_status(interrupt)
    except BrokenPipeError:
        # The reader (``| head``) has gone; Python would print a traceback flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:
        print(f"error: {console.os_error(error)}", file=sys.stderr)
        return 1
    except Exception:
        # The stop raised inside a library that wrapped it in an error of its own (matplotlib,
        # drawing, turned one into a TypeError): it is still the stop the user asked for.
        if console.stopped_by is None:
            raise
        print("\ninterrupted", file=sys.stderr)
        return 128 + console.stopped_by
    finally:
        if ends_process:
            gc.freeze()
