"""Errors raised by the slide readers: each message names the file and what is wrong with it."""

from __future__ import annotations

__all__ = ["EmptySlideError", "SlideFileError"]


class SlideFileError(ValueError):
    """A feature/coordinate file that is corrupt, truncated, mismatched or unreadable."""


class EmptySlideError(SlideFileError):
    """The file holds 0 patches (a slide without tissue); callers report it and skip the slide."""
