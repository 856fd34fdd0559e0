"""Write a directory so that readers see either nothing or the complete result.

Everything is written into a sibling temporary directory, flushed, and renamed into place; a crash
or an error leaves the previous contents (if any) untouched and no partial output behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from nemo_neo import chaos
from nemo_neo.errors import OutputExistsError, disk_write_error

# errnos that mean "this filesystem will not take the write", which the user fixes (space, rights)
_WRITE_REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG}


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(
            f"output directory {out} already exists and is not empty; choose another path or pass --overwrite."
        )
    return out


def _finish_files(root: Path) -> None:
    """fsync every file and give it the permissions the user's umask asks for: safetensors (0.8)
    creates its files 0600, which would leave a shared checkpoint unreadable by anyone else. The mode
    is read off `root`, which was made by a plain mkdir (0777 minus the umask): os.umask() itself can
    only be read by setting it, which races with threads creating files meanwhile."""
    mode = stat.S_IMODE(root.stat().st_mode) & 0o666
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            if not path.is_symlink():  # chmod would follow it out of the tree
                os.chmod(path, mode | (path.stat().st_mode & 0o111))  # keep execute bits


def tmp_path_for(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp"


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out`, replacing what was there."""
    _finish_files(tmp)
    chaos.point("publish")  # a test hook, inert unless NEMO_NEO_CHAOS_KILL is set
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def cleaned_up_on_error(tmp: Path, out: Path):
    """Around the writes into `tmp` (to be published as `out`): any error removes `tmp`, and a write
    the filesystem refuses (full disk, no permission) becomes one `DiskWriteError` naming `out` and
    the free space. What `out` held before is untouched either way."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _WRITE_REFUSED:
            raise disk_write_error(e, out) from e
        raise


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory; on success it becomes `out`, on error it is removed."""
    out = check_output_dir(out, overwrite)
    tmp = tmp_path_for(out)
    with cleaned_up_on_error(tmp, out):
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a run that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
        yield tmp
        publish(tmp, out)
