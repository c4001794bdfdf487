"""Safe writes: build in a temporary sibling, then move it into place only if nothing is there.

* A save never removes or replaces anything it did not create. The finished temporary result is moved onto
  the target with an atomic no-replace rename (``renameat2(RENAME_NOREPLACE)`` on Linux; ``link`` for files
  elsewhere), so of two saves into one path exactly one wins, and a folder or file that appeared at the target
  during the save is left alone: the save fails with an EditError naming where its finished result was kept.
* A save works in a temporary folder ``.NAME.XXXXXXXX.partial`` beside the target, which holds the result
  (file or folder, under the target's own name) and a marker ``.kn-edit-partial`` written at its creation
  (JSON: a fixed tag, the process id, and a random token whose first 8 hex digits are the folder's XXXXXXXX).
  The process writing it holds a lock (``flock``) on the folder for as long as it writes. A process killed
  meanwhile (SIGKILL, power loss) leaves the folder behind; the next save into that folder removes such
  leftovers (marker valid, lock free: their writer is gone), logging each one with its size. Anything else
  named like one (no valid marker: the user's, or an older kn-edit's) is left alone, with a warning.
  Interrupts (Ctrl-C, and SIGTERM in the CLI) remove the temporary folder on the way out. The marker never
  reaches the target: only the result inside is moved there.
* Results get the user's umask, every file and folder in them (``mkdtemp`` / ``mkstemp`` and some writers
  would leave them 0700 / 0600).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import EditError

log = logging.getLogger(__name__)

_SUFFIX = ".partial"
# The names of temporary folders (8 random hex digits; older kn-edits used mkstemp/mkdtemp's [a-z0-9_]).
_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.partial$")
_MARKER = ".kn-edit-partial"  # inside each temporary folder: proof that a kn-edit save made it
_MARKER_TAG = "kn-edit temporary save"
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
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
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _marker_ok(folder: Path) -> bool:
    """Whether ``folder`` holds the marker a kn-edit save writes at creation, its token matching the name."""
    marker = folder / _MARKER
    try:
        if folder.is_symlink() or marker.is_symlink():
            return False
        with open(marker, "rb") as handle:
            raw = json.loads(handle.read(4096))
    except (OSError, ValueError):  # absent, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return False
    if not isinstance(raw, dict):
        return False
    token = raw.get("token")
    return (raw.get("tag") == _MARKER_TAG and isinstance(raw.get("pid"), int) and isinstance(token, str)
            and bool(_TOKEN.match(token)) and folder.name.endswith(f".{token[:8]}{_SUFFIX}"))


def clean_leftovers(folder: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporary folders (``.NAME.XXXXXXXX.partial``, with a valid marker) that killed saves left in
    ``folder``; a save still running holds its lock and is left alone, and so is anything named like a leftover
    without the marker (logged). Returns [(path, bytes)] of what was removed."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        if not _LEFTOVER.match(path.name):
            continue
        if not _marker_ok(path):
            log.warning("left %s alone: it is named like a leftover of an interrupted save but kn-edit did not make "
                        "it (no valid %s marker); remove it yourself if it is one", path, _MARKER)
            continue
        fd = _open_lock(path)
        if fd is None:  # its save is still running
            continue
        try:
            if not _marker_ok(path):  # its save finished (and removed it) meanwhile
                continue
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
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


def check_new_file(path: str | Path, overwrite: bool = False, flag: str | None = None) -> Path:
    """``path`` for a new file (a patch, a plot): an EditError where it is a folder, exists (unless ``overwrite``
    and it is a plain file) or its folder is not writable. ``flag`` names the option that allows replacing it,
    for the message. Callers check before long work so a bad path fails at once."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise EditError(f"{target} is a folder; name a file to write (nothing was written)")
    if target.exists() or target.is_symlink():
        if not overwrite:
            hint = f", or pass {flag} to replace it" if flag else ""
            raise EditError(f"{target} already exists; choose a new path{hint} (nothing was written)")
        if not target.is_file():  # a dangling link or a device: not ours to replace
            raise EditError(f"{target} exists and is not a plain file; choose a new path (nothing was written)")
    return check_writable(target)


def check_new_folder(target: str | Path) -> Path:
    """Refuse (EditError), before any long work, an output folder that exists, even empty (a folder is never
    merged into or replaced), or that cannot be created."""
    if os.path.lexists(Path(target).expanduser()):
        raise EditError(f"{target} already exists; choose a new output folder (nothing was computed)")
    return check_writable(target)


def _exists_error(target: Path) -> EditError:
    return EditError(f"{target} already exists; choose a new path (nothing was written)")


def _follow_umask(path: Path) -> None:
    """Give ``path`` and everything in it the user's umask (mkstemp, mkdtemp and some writers, e.g.
    ``save_pretrained``'s, create 0600 / 0700); executable files stay executable. Links are left as they are."""
    mask = _umask()
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        paths += [Path(root, name) for root, dirs, files in os.walk(path) for name in dirs + files]
    for p in paths:
        mode = os.lstat(p).st_mode
        if stat.S_ISLNK(mode):
            continue
        full = 0o777 if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0o666
        os.chmod(p, full & ~mask)


def _tag(work: Path) -> str:
    """The random XXXXXXXX of a temporary folder ``.NAME.XXXXXXXX.partial``."""
    return work.name.rsplit(".", 2)[-2]


def _publish(tmp: Path, target: Path, overwrite: bool, what: str) -> None:
    """Move the finished ``tmp`` onto ``target``; never over something that appeared there meanwhile."""
    _follow_umask(tmp)
    if overwrite and target.is_file() and tmp.is_file():
        os.replace(tmp, target)  # files the caller owns and rewrites (caches, downloads)
        return
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        kept = target.with_name(f"{target.name}.{_tag(tmp.parent)}.unsaved")
        try:
            rename_noreplace(tmp, kept)
        except OSError:
            kept = tmp
            (tmp.parent / _MARKER).unlink()  # no longer a leftover: later saves must not remove it
        raise EditError(
            f"{target} appeared while the {what} was being saved and was left untouched; the finished {what} is "
            f"at {kept} (move it where you want it)"
        ) from None
    except OSError as exc:
        raise EditError(f"cannot write {target}: {exc.strerror or exc}") from exc


def _new_work_folder(target: Path) -> tuple[Path, int | None]:
    """A new temporary folder beside ``target``, locked (the fd holding the lock), then marked as ours."""
    for _ in range(100):
        token = secrets.token_hex(16)
        work = target.with_name(f".{target.name}.{token[:8]}{_SUFFIX}")
        try:
            os.mkdir(work, 0o700)
        except FileExistsError:
            continue
        # Locked before it is marked: a folder other saves can see as ours is always locked while we live.
        fd = _open_lock(work)
        try:
            (work / _MARKER).write_text(json.dumps({"tag": _MARKER_TAG, "pid": os.getpid(), "token": token}))
        except BaseException:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(work, ignore_errors=True)
            raise
        return work, fd
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


@contextmanager
def _work_folder(target: Path, clean: bool) -> Iterator[Path]:
    """The locked, marked temporary folder of one save into ``target`` (``clean``: first remove the leftovers
    of killed saves beside it); removed on the way out unless a result the caller was told of is kept in it."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if clean:
            clean_leftovers(target.parent)
        work, fd = _new_work_folder(target)
    except OSError as exc:
        raise EditError(f"cannot write {target}: {exc.strerror or exc}") from exc
    try:
        yield work
    finally:
        if (work / _MARKER).exists():
            shutil.rmtree(work, ignore_errors=True)
        if fd is not None:  # released only once the folder is gone
            os.close(fd)


def _result_path(work: Path, target: Path) -> Path:
    """Where the result is built inside ``work``: under the target's own name (writers may look at its suffix)."""
    return work / (target.name if target.name != _MARKER else "result")


@contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False, what: str = "folder") -> Iterator[Path]:
    """Yield a temporary folder for ``target``; it becomes ``target`` only if the block finishes and nothing
    is at ``target`` then (else EditError naming where the finished folder was kept). ``overwrite`` allows a
    folder that existed when the save began to be replaced (it is moved aside first, then removed)."""
    target = Path(target)
    if os.path.lexists(target) and not overwrite:
        raise _exists_error(target)
    with _work_folder(target, clean=True) as work:
        tmp = _result_path(work, target)
        tmp.mkdir()
        yield tmp
        if overwrite and target.is_dir():
            old = target.with_name(f".{target.name}.{_tag(work)}.old{_SUFFIX}")
            rename_noreplace(target, old)
            try:
                _publish(tmp, target, False, what)
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            _publish(tmp, target, False, what)


@contextmanager
def atomic_file(target: str | Path, overwrite: bool = False, what: str = "file") -> Iterator[Path]:
    """Yield a temporary file path for ``target``; it becomes ``target`` only if the block finishes and
    nothing is at ``target`` then (else EditError naming where the finished file was kept). ``overwrite``
    replaces an existing file (caches and downloads, which rewrite their own files)."""
    target = Path(target)
    if os.path.lexists(target) and not overwrite:
        raise _exists_error(target)
    with _work_folder(target, clean=not overwrite) as work:  # caches write often; their folders are theirs
        tmp = _result_path(work, target)
        tmp.touch(0o600)
        yield tmp
        _publish(tmp, target, overwrite, what)
