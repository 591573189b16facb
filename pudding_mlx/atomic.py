"""Writes that are never seen half-done: build beside the target, then rename into place.

Used by every converter and by the training side (this module imports neither mlx nor torch)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import PuddingError


def write_json(path, data) -> None:
    """Write JSON through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def install_dir(new, out, force: bool = False) -> None:
    """Move the finished folder `new` to `out` (same file system). An existing `out` is refused
    unless `force`; then it is moved aside first and restored if the move fails, so `out` is at
    every moment either the old folder or the new one."""
    new, out = Path(new), Path(out)
    if not (out.exists() or out.is_symlink()):
        os.replace(new, out)
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
