"""Writing files so that an interrupted write never leaves a file that looks complete.

Shared by ssm2d-vision (converted checkpoints) and ssm2d-path (features, checkpoints, splits,
results, manifests): every file is written under a temporary name in the destination folder and
renamed over the destination (``os.replace``, atomic on POSIX and Windows) only once it is complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` to write to; on a clean exit it replaces ``path``,
    on an exception it is removed and ``path`` is left as it was. Creates the parent folder.

        with atomic_output("model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
