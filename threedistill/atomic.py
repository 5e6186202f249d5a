"""Atomic file writes: write to a temporary name in the destination folder, then rename.

Readers (the web app polling a run folder, a resumed run reading its checkpoint) never see a
half-written file, and a failed write leaves the previous file, if any, untouched and no temp
file behind. The rename is atomic because the temp file lives in the same folder (same file
system) as the destination.

* :func:`atomic_write` - a file object to write into (``"wb"`` or text ``"w"``).
* :func:`atomic_write_text` / :func:`atomic_write_bytes` - one-shot helpers.
* :func:`atomic_path` - a temporary *path* for libraries that insist on writing by file name
  (ffmpeg, some exporters); it keeps the final suffix so format detection by extension works.
* :func:`leftover_temp_files` / :func:`remove_leftover_temp_files` - the temp files a killed
  process left behind (a kill -9 gives the writer no chance to remove its temp file). Only names
  of the two exact forms this module creates match; a user's file never does unless it copies
  them (a dot, the destination's name, the random part, ``.tmp``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import IO, Iterator, List, Union

PathLike = Union[str, "os.PathLike[str]"]


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _publish(tmp: Path, final: Path) -> None:
    """Give ``tmp`` the permissions of a normally created file, then rename it onto ``final``."""
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
    except OSError:  # pragma: no cover - e.g. file systems without permissions
        pass
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort; not supported everywhere, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success flush, fsync and rename it
    onto ``path``; on an exception remove it (an existing ``path`` is left as it was).

    ``mode`` is ``"wb"`` or ``"w"`` (text; ``encoding`` defaults to UTF-8). Extra keyword
    arguments go to :func:`open` (``encoding``, ``newline``)."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write supports modes 'w', 'wt' and 'wb', got {mode!r}")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, final)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path in ``path``'s folder that ends with ``path``'s suffix
    (``model.glb`` -> ``.model.<random>.tmp.glb``) for a library to write by name; on success
    it is fsynced and renamed onto ``path``; on an exception it is removed.

    The temp path does not exist when yielded (some writers refuse to overwrite); the body
    must create it, else :class:`FileNotFoundError` is raised and ``path`` is left alone."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.stem}.{secrets.token_hex(6)}.tmp{final.suffix}"
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to the temporary file for {final}")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _publish(tmp, final)
    except BaseException:
        _remove_quietly(tmp)
        raise


#: The temp names this module creates, and nothing else:
#: :func:`atomic_write` (``tempfile.mkstemp``): ``.<name>.<8 of [a-z0-9_]>.tmp``;
#: :func:`atomic_path`: ``.<stem>.<12 hex digits>.tmp<suffix>`` (``suffix`` empty or ``.<word>``).
_TEMP_NAMES = (re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$"), re.compile(r"^\..*\.[0-9a-f]{12}\.tmp(\.[A-Za-z0-9_-]+)?$"))


def is_temp_name(name: str) -> bool:
    """Whether ``name`` has the form of a temporary file of :func:`atomic_write` or :func:`atomic_path`."""
    return any(p.match(name) for p in _TEMP_NAMES)


def leftover_temp_files(folder: PathLike) -> List[Path]:
    """The regular files directly in ``folder`` (not in its subfolders; symlinks never) whose
    names are temp names of this module, sorted. Call it only when no process is writing there."""
    d = Path(folder)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if is_temp_name(p.name) and p.is_file() and not p.is_symlink())


def remove_leftover_temp_files(folder: PathLike) -> List[Path]:
    """Remove :func:`leftover_temp_files` of ``folder``; returns what was removed."""
    removed = []
    for p in leftover_temp_files(folder):
        try:
            os.unlink(p)
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_path", "is_temp_name",
           "leftover_temp_files", "remove_leftover_temp_files"]
