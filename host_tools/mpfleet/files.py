"""Writing the host's own files: whole or not at all, with their mode from the start.

Which room: shared by every room (like `mpfleet.errors`); imports nothing of mpfleet.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` through a temporary file beside it, renamed over it: a reader
    sees the old file or the new one, never half of one; `mode` is the file's from its
    first byte (a key is never readable by others, not even briefly). Makes the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".part")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
