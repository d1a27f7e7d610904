"""Crash-safe directory writes: a run (or a model) is written into a sibling temporary folder and
swapped in at once, so a kill at any moment leaves the complete old directory or the complete new one.

On Linux the swap is one `renameat2(RENAME_EXCHANGE)`; where that is missing, two renames with the
old directory kept beside until the new one stands. Leftovers of a writer that died (their names
carry its pid) are cleaned, or recovered when the directory itself is gone, by the next write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from surgeon.errors import SurgeonError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_MARK = ".surgeon-"


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system cannot (then the caller renames twice)."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(final: Path) -> list[tuple[Path, str]]:
    """(path, "new" or "old") of temporaries that a dead writer left beside `final`."""
    found = []
    for path in final.parent.glob(f".{final.name}{_MARK}*"):
        kind, _, rest = path.name.removeprefix(f".{final.name}{_MARK}").partition("-")
        pid = rest.partition("-")[0]
        if kind in ("new", "old") and pid.isdigit() and not _alive(int(pid)):
            found.append((path, kind))
    return found


def _recover_or_clean(final: Path) -> None:
    leftovers = _leftovers(final)
    if not final.exists():  # a two-rename swap died between its renames: the old one goes back
        for path, kind in leftovers:
            if kind == "old":
                path.rename(final)
                break
    for path, _ in leftovers:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def _fail(action: str, path: Path, problem: OSError) -> SurgeonError:
    return SurgeonError(f"cannot {action} {path}: {problem.strerror or problem}")


def write_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a directory by calling `write(staging)` on a fresh sibling folder, then put it in
    place of `final` (replacing what stood there) in one step. The folder gets the user's umask."""
    final = Path(os.path.abspath(final))
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _recover_or_clean(final)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}{_MARK}new-{os.getpid()}-", dir=final.parent))
        staging.chmod(0o777 & ~_umask())
    except OSError as problem:
        raise _fail("write", final, problem) from None
    try:
        write(staging)
        _apply_umask(staging)
        _swap_in(staging, final)
    except BaseException as problem:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(problem, OSError):
            raise _fail("write", final, problem) from None
        raise
    return final


def _apply_umask(staging: Path) -> None:
    """Files as the user's umask allows (some writers, safetensors among them, create 0600)."""
    mask = _umask()
    for path in staging.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _swap_in(staging: Path, final: Path) -> None:
    if not final.exists() and not final.is_symlink():
        staging.rename(final)
        return
    if final.is_dir() and not final.is_symlink() and _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # it holds the old directory now
        return
    if not final.is_dir() or final.is_symlink():
        final.unlink()
        staging.rename(final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}{_MARK}old-{os.getpid()}-", dir=final.parent))
    old.rmdir()
    final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def same_or_nested(a: Path, b: Path) -> bool:
    """Whether a and b are the same path or one lies inside the other (symlinks resolved)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)
