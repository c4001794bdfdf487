"""Safe writes: build in a temporary sibling, then move it into place only if nothing is there.

* A save never removes or replaces anything it did not create. The finished temporary result is moved onto
  the target with an atomic no-replace rename (``renameat2(RENAME_NOREPLACE)`` on Linux; ``link`` for files
  elsewhere), so of two saves into one path exactly one wins, and a folder or file that appeared at the target
  during the save is left alone: the save fails with an EditError naming where its finished result was kept.
* A temporary sibling is named ``.NAME.XXXXXXXX.partial`` and is locked (``flock``) by the process writing it
  for as long as it writes. A process killed meanwhile (SIGKILL, power loss) leaves it behind; the next save
  into that folder finds such leftovers (unlocked: their writer is gone) and removes them, logging each one
  with its size. Interrupts (Ctrl-C, and SIGTERM in the CLI) remove the temporary sibling on the way out.
* Results get the user's umask (``mkdtemp`` / ``mkstemp`` would leave them 0700 / 0600).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import EditError

log = logging.getLogger(__name__)

_SUFFIX = ".partial"
# What tempfile.mkstemp/mkdtemp produce for prefix ".NAME." and our suffix (8 random [a-z0-9_]).
_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.partial$")
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


# ----- small primitives ----------------------------------------------------------------------------------
def _renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError, TypeError):  # not glibc >= 2.28 (macOS, musl, Windows)
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_RENAMEAT2 = _renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` atomically, failing with FileExistsError where ``dst`` exists (even an empty
    folder, which a plain ``rename`` would silently replace)."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: a file system without the flag
            raise OSError(err, os.strerror(err), str(dst))
    if src.is_dir() and not src.is_symlink():
        # Without the flag: rename fails onto a non-empty folder or a file, but replaces an empty folder;
        # the check closes all but a microseconds-wide window for that last case.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "target exists", str(dst))
        os.rename(src, dst)
        return
    os.link(src, dst)  # fails with EEXIST, atomically
    os.unlink(src)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lock(fd: int) -> bool:
    """An exclusive, non-blocking flock on ``fd``: False where another process holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): leftovers are never taken for stale
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _open_lock(path: Path) -> int | None:
    """An fd on ``path`` holding its lock, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    except OSError:
        return None
    if _lock(fd):
        return fd
    os.close(fd)
    return None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def clean_leftovers(folder: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporary siblings (``.NAME.XXXXXXXX.partial``) that killed saves left in ``folder``;
    a save still running holds its lock and is left alone. Returns [(path, bytes)] of what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        if not _LEFTOVER.match(path.name):
            continue
        fd = _open_lock(path)
        if fd is None:
            continue
        try:
            size = _size(path)
            _remove(path)
        finally:
            os.close(fd)
        log.warning("removed %s, left by an interrupted save (%.1f MB)", path, size / 1e6)
        removed.append((path, size))
    return removed


def check_writable(target: str | Path) -> Path:
    """Refuse (EditError) a new path whose folder cannot be written, before any long work: the nearest existing
    folder above ``target`` must be a folder in which a file can be created (tried, then removed)."""
    target = Path(target).expanduser().absolute()
    parent = target.parent
    while not parent.exists():
        if parent.is_symlink() or parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise EditError(f"cannot write {target}: {parent} is not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".kn-edit-write-test.", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise EditError(f"cannot write {target}: folder {parent} is not writable ({exc.strerror}); "
                        "choose another path (nothing was written)") from exc
    return target


def check_new_folder(target: str | Path) -> Path:
    """Refuse (EditError), before any long work, an output folder that exists, even empty (a folder is never
    merged into or replaced), or that cannot be created."""
    if os.path.lexists(Path(target).expanduser()):
        raise EditError(f"{target} already exists; choose a new output folder (nothing was computed)")
    return check_writable(target)


def _exists_error(target: Path) -> EditError:
    return EditError(f"{target} already exists; choose a new path (nothing was written)")


def _publish(tmp: Path, target: Path, overwrite: bool, what: str) -> None:
    """Move the finished ``tmp`` onto ``target``; never over something that appeared there meanwhile."""
    mode = (0o777 if tmp.is_dir() else 0o666) & ~_umask()
    os.chmod(tmp, mode)
    if overwrite and target.is_file() and tmp.is_file():
        os.replace(tmp, target)  # files the caller owns and rewrites (caches, downloads)
        return
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        kept = target.with_name(f"{target.name}.{tmp.name.rsplit('.', 2)[-2]}.unsaved")
        try:
            rename_noreplace(tmp, kept)
        except OSError:
            kept = tmp
        raise EditError(
            f"{target} appeared while the {what} was being saved and was left untouched; the finished {what} is "
            f"at {kept} (move it where you want it)"
        ) from None
    except OSError as exc:
        raise EditError(f"cannot write {target}: {exc.strerror or exc}") from exc


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False, what: str = "folder") -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it becomes ``target`` only if the block finishes and nothing
    is at ``target`` then (else EditError naming where the finished folder was kept). ``overwrite`` allows a
    folder that existed when the save began to be replaced (it is moved aside first, then removed)."""
    target = Path(target)
    if os.path.lexists(target) and not overwrite:
        raise _exists_error(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_SUFFIX, dir=target.parent))
    except OSError as exc:
        raise EditError(f"cannot write {target}: {exc.strerror or exc}") from exc
    fd = _open_lock(tmp)
    published = False
    try:
        yield tmp
        if overwrite and target.is_dir():
            old = target.with_name(f".{target.name}.{tmp.name.rsplit('.', 2)[-2]}.old{_SUFFIX}")
            rename_noreplace(target, old)
            try:
                _publish(tmp, target, False, what)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            _publish(tmp, target, False, what)
        published = True
    finally:
        if fd is not None:
            os.close(fd)
        if not published and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path, overwrite: bool = False, what: str = "file") -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; it becomes ``target`` only if the block finishes and
    nothing is at ``target`` then (else EditError naming where the finished file was kept). ``overwrite``
    replaces an existing file (caches and downloads, which rewrite their own files)."""
    target = Path(target)
    if os.path.lexists(target) and not overwrite:
        raise _exists_error(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not overwrite:  # caches write often; their folders are theirs
            clean_leftovers(target.parent)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise EditError(f"cannot write {target}: {exc.strerror or exc}") from exc
    tmp = Path(name)
    _lock(fd)
    published = False
    try:
        yield tmp
        _publish(tmp, target, overwrite, what)
        published = True
    finally:
        os.close(fd)
        if not published and tmp.exists():
            tmp.unlink()
