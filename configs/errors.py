"""One error style for every entry point.

A mistake in what the user asked for (a config value, a path, a checkpoint that is not one) raises
:class:`UserError` (or a subclass: ``ConfigError``, ``SlurmError``, ``SweepError``, ``PrepareError``,
``CacheError``, ``ModelSourceError``, ``CheckpointError``). Every entry point's ``main`` is wrapped by
:func:`entry_point`, which prints such an error as one paragraph, ``<prog>: error: <message>``, and returns
exit code 2, with no traceback. Any other exception is a bug or an environment failure and propagates
with its traceback: nothing is swallowed.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable

USAGE_EXIT_CODE = 2  # what argparse uses for a bad command line


class UserError(Exception):
    """A mistake the user can fix: the message names the bad value, why it is wrong and what would do."""


class ConfigError(UserError, ValueError):
    """A configuration mistake, with a message that says what to change."""


class SlurmError(UserError, RuntimeError):
    """sbatch is missing, refused the job, or the `slurm:` config section is invalid."""


def one_paragraph(message: str) -> str:
    """The message on one line: newlines and runs of spaces become single spaces."""
    return re.sub(r"\s+", " ", str(message)).strip()


def report(prog: str, error: BaseException) -> None:
    print(f"{prog}: error: {one_paragraph(str(error))}", file=sys.stderr, flush=True)


def entry_point(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorates an entry point's ``main``: a :class:`UserError` becomes one paragraph on stderr and exit
    code 2 (the return value, so tests calling ``main`` in-process see it too)."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except UserError as error:
                report(prog, error)
                return USAGE_EXIT_CODE

        return wrapped

    return decorate
