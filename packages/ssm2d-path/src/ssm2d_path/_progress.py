"""Progress bars drawn only on a terminal: in a log file a bar is thousands of carriage-return updates."""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


def progress_bar(iterable=None, *, enabled: bool = True, file=None, **kw):
    """A tqdm bar drawn only when ``enabled`` and ``file`` (default stderr) is a terminal; otherwise a
    silent tqdm (it still counts, so ``update``/``set_postfix``/``n`` work)."""
    from tqdm.auto import tqdm

    stream = file if file is not None else sys.stderr
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):
        tty = False
    return tqdm(iterable, file=stream, disable=not (enabled and tty), **kw)
