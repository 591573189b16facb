"""Writes that are never seen half-done: build beside the target, then rename into place. The one
owner of atomic writes, for files and folders, used by every converter, the preset bundles and the
training side (this module imports neither mlx nor torch).

Published folders get the modes a plain mkdir / open would have under the user's umask, not the
0700 that `tempfile.mkdtemp` gives its folder.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import PuddingError


def check_output(path, flag: str, replace: bool = True, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: one whose folder is missing or read-only, a
    folder given where a file is wanted (`folder` False), or one that exists when `replace` is False (the
    user's --force). Returns the path, `~` expanded. `flag` names the option in the one-line error."""
    path = Path(path).expanduser()
    if path.exists() and not replace:
        raise PuddingError(f"{flag} {path}: already exists; pass --force to replace it")
    if path.is_dir() and not folder:
        raise PuddingError(f"{flag} {path}: is a folder; give a file name")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise PuddingError(f"{flag} {path}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PuddingError(f"{flag} {path}: the folder {parent} is not writable")
    return path


def write_text(path, text: str) -> None:
    """Write a text file through a temporary file beside it and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path, data, indent: int = 1) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


def write_jsonl_gz(path, rows) -> None:
    """Write one JSON object per line, gzip-compressed, through a temporary file and an atomic rename."""
    import gzip

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_npz(path, **arrays) -> None:
    """Write a numpy .npz (no pickled objects) through a temporary file, fsync and an atomic rename."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a name
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def usual_permissions(folder) -> None:
    """Give `folder` and everything in it the modes a plain mkdir / open would have under the current
    umask (mkdtemp makes a 0700 folder, and some writers 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    folder = Path(folder)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def scratch_dir(beside, tag: str = "build") -> Iterator[Path]:
    """A fresh private folder next to `beside` (same file system, so a rename out of it is atomic),
    removed with whatever is left in it when the block ends."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{beside.name}.{tag}-", dir=beside.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def publish_dir(new, out, force: bool = False, keep: Optional[Callable[[Path], bool]] = None) -> None:
    """Give the finished folder `new` the usual permissions and move it to `out` (`install_dir`)."""
    usual_permissions(new)
    install_dir(new, out, force, keep)


@contextmanager
def building(out, force: bool = False) -> Iterator[Path]:
    """Build a folder and publish it at `out` only if the block finishes: yields an empty folder
    beside `out`; on success it becomes `out` (usual permissions), on failure it is removed and
    `out` is untouched."""
    with scratch_dir(out) as work:
        new = work / Path(out).name
        new.mkdir()
        yield new
        publish_dir(new, out, force)


def install_dir(new, out, force: bool = False, keep: Optional[Callable[[Path], bool]] = None) -> None:
    """Move the finished folder `new` to `out` (same file system). An existing `out` is refused
    unless `force`; then it is moved aside first and restored if the move fails, so `out` is at
    every moment either the old folder or the new one. `keep(out)` true: an `out` that is already
    what `new` would be (another process published it first) stays, and `new` is left where it is."""
    new, out = Path(new), Path(out)
    if keep is not None and out.exists() and keep(out):
        return
    if not (out.exists() or out.is_symlink()):
        try:
            os.replace(new, out)
        except OSError:  # another process published `out` meanwhile: fine if it is what we built
            if keep is None or not keep(out):
                raise
        return
    if not force:
        raise PuddingError(f"{out}: already exists; pass --force to replace it")
    aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, aside / "old")  # os.replace cannot overwrite a non-empty folder
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(aside / "old", out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
