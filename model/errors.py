"""The error types users see, and the small helpers that phrase them: kept in their own module so the CLI
can use them without importing pydantic."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path


class UserError(Exception):
    """An error the CLI shows as its one line (`error: ...`, exit 2, no traceback): its message says what
    failed and what to do. Subclasses say what kind of thing failed."""


class PermanentError(Exception):
    """An error that comes back however often the same run is retried (its config, its data). Ray restarts
    workers for failures that go away (a killed worker, a lost node, a store that hiccupped); a run that hits
    one of these fails at once instead, with this error's message as its cause (orchestrator/failures.py)."""


class ConfigError(UserError, PermanentError, ValueError):
    """A config or override the user typed is wrong; the message says what and what is allowed."""


class DataError(ConfigError):
    """The data the config points at cannot be trained on (a token id outside the vocabulary, a shard that
    does not match its manifest): fixed by staging again or by another config, never by a retry."""

    def __str__(self) -> str:  # here, not in __init__: a pickled copy (Ray sends it to the driver) keeps one
        return f"data error: {super().__str__()}"


def did_you_mean(word: str, known: Iterable[str], show: Callable[[str], str] = str) -> str:
    """'did you mean train.steps?' for the known names closest to a mistyped `word`; '' when none is close,
    so a typo is answered with the fix rather than with the whole list."""
    import difflib

    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(map(show, close))}?" if close else ""


def make_parent_folder(path: Path) -> None:
    """Create the missing folders above an output path (as `mkdir -p` would); one that cannot be created (a
    file in the way, no permission) is one ConfigError line rather than a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the folder {path.parent}: {e.strerror or e}") from None


def positive_int(text: str, what: str = "steps") -> int:
    """argparse type of a whole count >= 1 (ASCII digits: int() would also read "٨"); one line otherwise."""
    import argparse

    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of {what} >= 1")
    return int(text)
