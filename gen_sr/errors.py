"""Errors that mean "the user gave us something we cannot use".

The CLI prints such an error as one line and exits with code 2 (no traceback unless ``--debug``). Library callers
can catch :class:`InputError` like any ``ValueError``.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["InputError"]


class InputError(ValueError):
    """A bad input file, argument or output path.

    Args:
        message: what is wrong, in one line.
        path: the file concerned, named first in the message.
        hint: what to do about it, appended after the message.
    """

    def __init__(self, message: str, path: str | PathLike[str] | None = None, hint: str | None = None) -> None:
        self.path = None if path is None else str(path)
        self.hint = hint
        text = message if self.path is None else f"{self.path}: {message}"
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)
