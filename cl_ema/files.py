"""Every file cl_ema writes goes through here: atomically, with the user's umask, errors in one line.

``atomic_write`` writes to a temporary file in the same folder, flushes it to disk and renames it
over the target, so a reader (or a crash) never sees half a file and the previous version stays
until the new one is complete. A write that fails (disk full, file-size limit, quota,
permission, read-only file system) is a ``UserError`` naming the file and the cause; the
temporary file is removed and the previous version is untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cl_ema.errors import UserError, write_error


def file_mode() -> int:
    """The mode ``open()`` gives a new file under the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into a one-line UserError."""
    try:
        yield
    except OSError as err:
        raise write_error(err, path) from err


def atomic_write(path: Path, data: str | bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` all at once (see the module docstring). ``durable=False`` skips the flush
    to disk, for files written often whose writer calls ``sync`` before anything durable refers to them."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, file_mode())  # mkstemp makes 0600; results are as shareable as any file the user writes
            with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as handle:
                handle.write(data)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def append(path: Path, pieces: Sequence[bytes | memoryview], at: int) -> None:
    """Add ``pieces``, one after the other, at the end of ``path``, which holds ``at`` bytes; ``at=0`` starts the
    file (replacing one left from elsewhere). A file that holds another length was changed by someone else, and
    is refused rather than written at the wrong place."""
    with writing(path), open(path, "wb" if at == 0 else "ab") as handle:
        if handle.tell() != at:
            raise UserError(
                f"{path}: {handle.tell():,} bytes, not the {at:,} written into it (changed by another process?)"
            )
        for piece in pieces:
            handle.write(piece)


def sync(paths: list[Path]) -> None:
    """Flush files written without a flush (``atomic_write(durable=False)``, ``append``) to disk."""
    for path in paths:
        with writing(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
