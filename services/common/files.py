"""Files written whole or not at all: the one way encinfer replaces a file on disk.

Readers see the old file or the new one, never half of either: the bytes go to a
temporary file in the same directory (same filesystem, so the rename is atomic),
created with its final mode (a secret is never readable by others, not even briefly),
flushed to the disk, then renamed over the target. An interrupted write leaves the old
file and no temporary one.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask narrowed what os.open was given
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
