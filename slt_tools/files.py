"""The package's one way to write a file safely: :func:`atomic_write` (whole files) and :func:`append_to`.

Every file slt_tools writes — results stores, checkpoints, CSV tables, experiment summaries — goes through here, so
the same promises hold everywhere:

- **Only regular files are written.** The target is resolved first: a symlink (also a dangling one) is followed and
  its *target* is written, so the link stays a link and keeps pointing at the updated file. A target that exists and
  is not a regular file (a device node such as ``/dev/null``, a FIFO, a socket, a directory) is refused with
  :class:`UnsafeTargetError` before anything is created — it is never replaced, truncated or chmod-ed.
- **All or nothing.** :func:`atomic_write` writes a temporary file in the target's directory, flushes and ``fsync``-s
  it, renames it over the target (``os.replace``, atomic on POSIX) and ``fsync``-s the directory. Readers see the old
  content or the new, never a mix. If anything fails, the temporary file is removed and the old content is untouched.
  With ``exclusive=True`` the file is only created, never replaced (``os.link``: exactly one of several concurrent
  creators wins, the others get :class:`FileExistsError`).
- **Permissions as the user expects.** A new file gets ``0o666 & ~umask`` (what ``open(path, "w")`` would give, not
  ``mkstemp``'s 0600); a replaced file keeps its mode.
"""
from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["UnsafeTargetError", "append_to", "atomic_write", "atomic_write_path", "current_umask", "resolve_target"]


class UnsafeTargetError(OSError):
    """The path names something slt_tools must not write to (a device node, a FIFO, a directory, ...)."""


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux ``/proc``), else set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def resolve_target(path: str | os.PathLike[str]) -> Path:
    """The regular file that writing to ``path`` should change: symlinks (even dangling ones) are followed.

    Raises :class:`UnsafeTargetError` if the resolved target exists and is not a regular file.
    """
    target = Path(os.path.realpath(os.fspath(path)))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target
    if not stat.S_ISREG(st.st_mode):
        shown = f"{path} (-> {target})" if str(target) != os.path.abspath(os.fspath(path)) else str(path)
        raise UnsafeTargetError(f"{shown} is {_kind(st.st_mode)}, not a regular file; slt_tools only writes regular "
                                "files and will not replace or modify it — choose another path")
    return target


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], content: str | bytes | Callable[[IO[Any]], None], *,
                 binary: bool | None = None, newline: str | None = None, exclusive: bool = False) -> Path:
    """Write ``content`` to ``path`` atomically (see the module docstring); returns the file actually written.

    Args:
        path: destination; a symlink is followed (the link is kept and its target written).
        content: the text or bytes to write, or a callable ``write(f)`` that writes into the open temporary file
            (for ``csv`` / ``json.dump`` style writers; text mode unless ``binary=True``). For writers that insist on a
            file name (``safetensors.torch.save_file``) use :func:`atomic_write_path`.
        binary: open the temporary file in binary mode (default: ``isinstance(content, bytes)``).
        newline: passed to ``open`` in text mode (``""`` for the csv module).
        exclusive: create only — raise :class:`FileExistsError` if the target already exists.
    """
    return _atomic(path, exclusive, lambda tmp: _write_into(tmp, content, binary, newline))


def atomic_write_path(path: str | os.PathLike[str], write_path: Callable[[str], None], *,
                      exclusive: bool = False) -> Path:
    """:func:`atomic_write` for writers that need a file *name* (e.g. ``safetensors.torch.save_file``)."""
    return _atomic(path, exclusive, write_path)


def _write_into(tmp: str, content: str | bytes | Callable[[IO[Any]], None], binary: bool | None,
                newline: str | None) -> None:
    is_binary = isinstance(content, bytes) if binary is None else binary
    mode = "wb" if is_binary else "w"
    with open(tmp, mode, **({} if is_binary else {"encoding": "utf-8", "newline": newline})) as f:
        if callable(content):
            content(f)
        else:
            f.write(content)


def _atomic(path: str | os.PathLike[str], exclusive: bool, fill: Callable[[str], None]) -> Path:
    target = resolve_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if exclusive:
            os.link(tmp, target)  # fails if the target exists: one creator wins
        else:
            resolve_target(path)  # it may have become something else meanwhile
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return target


def append_to(path: str | os.PathLike[str]) -> int:
    """Open ``path`` (symlinks followed; created ``0o666 & ~umask`` if missing) for appending; returns an OS file
    descriptor opened ``O_RDWR | O_APPEND``. Refuses anything that is not a regular file (:class:`UnsafeTargetError`),
    also when it changes between the check and the open (``O_NOFOLLOW`` on the resolved target, then ``fstat``)."""
    target = resolve_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(target, flags, 0o666)  # the kernel applies the umask
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeTargetError(f"{path} is {_kind(st.st_mode)}, not a regular file; refusing to write to it")
    return fd
