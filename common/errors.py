"""How a command line ends on bad input: one ``error: <file or field>: <reason>`` line on stderr, exit 2.

``train.py``, ``evaluate.py``, ``bench.py`` and ``python -m shard_tools`` run their command through
``run_cli``. A bad config, a bad input file, or an output that cannot be written (read-only, full
disk) is a ``USER_ERRORS`` exception whose message names the field or file; anything else is a bug and
keeps its traceback. ``writing_to`` names the output in the errors a write raises without one.
"""
from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Callable, Iterator, Sequence

from common.disk import disk_problem

__all__ = ["USER_ERRORS", "OutputError", "error_line", "run_cli", "writing_to"]

# What a command line reports as one line and exit status 2: the messages name the field or file.
USER_ERRORS = (ValueError, OSError)


class OutputError(OSError):
    """An output could not be written; the message names it and says how to go on."""


def error_line(exc: BaseException, where: object = None) -> str:
    """One line for a bad-input error: ``<file or field>: <reason>``.

    Args:
        exc: the error (its message already names the field or file, or it is an OSError with a
            ``filename``).
        where: the file or folder to name when an OSError has none (a full disk reported by a
            buffered write names no file).
    """
    if isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else where
        text = f"{name}: {exc.strerror}" if name is not None else exc.strerror
        if exc.filename2 is not None:
            text += f" -> {exc.filename2}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def writing_to(*paths, hint: str | None = None) -> Iterator[None]:
    """Errors raised inside name the output ``paths[0]`` (or whichever of ``paths`` the file system
    blames) and, for a full disk, end with ``hint`` (how to go on after freeing space).

    An OSError that names no file (a full disk reported by a buffered write) and a RuntimeError that
    the file system explains (torch.save reports a full disk from its C++ writer, with no errno)
    become an ``OutputError``; other errors pass through unchanged.
    """
    names = [p for p in paths if p is not None]
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        full = exc.errno == errno.ENOSPC and hint
        if exc.filename is not None and not full:
            raise
        raise OutputError(error_line(exc, where=names[0] if names else None) + (f" ({hint})" if full else "")) from exc
    except RuntimeError as exc:
        problem = disk_problem(names)
        if problem is None:
            raise
        suffix = f"; {hint}" if hint and "no space" in problem else ""
        raise OutputError(f"{problem} ({type(exc).__name__} while writing){suffix}") from exc


def run_cli(main: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    """``main(argv)``'s exit status, or 2 after one ``error: ...`` line for a ``USER_ERRORS`` exception."""
    try:
        return int(main(list(argv)) or 0)
    except USER_ERRORS as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
