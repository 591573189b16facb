"""The benchmark tasks read from the Hugging Face hub (`pudding_mlx.hub_datasets`), offline: real rows
of our files converted back to each dataset's own fields and laid out as its hub repository
(tests/fixtures/hub, made by tests/fixtures/make_fixtures.py) are read with `datasets.load_dataset`
and mapped; the result must be our rows exactly (round trip), and `load_task` must give the same
Examples from the hub as from the local files."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pudding_mlx import hub_datasets as H
from pudding_mlx.errors import PuddingError
from pudding_mlx import tasks as T

pytest.importorskip("datasets")
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
FILES = sorted((FIXTURES / "benchmarks").glob("*.jsonl.gz"))
ALIASES = {"val": "validation"}


def read(path, n=None):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n or 10**9), f)]


@pytest.fixture
def mirror(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setenv(H.MIRROR_ENV, str(FIXTURES / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.delenv(T.DATA_ENV, raising=False)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"benchmark data not at {SHARED}")
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_fixtures_are_the_real_first_rows(path):
    rows = read(path)
    assert rows == read(SHARED / path.name, len(rows))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_hub_rows_map_to_our_schema(mirror, path):
    task, split = path.name.split(".")[:2]
    ours = read(path)
    mapped = [row for _, row in H.rows(task, split)]
    assert len(mapped) == len(ours) == 5
    for want, got in zip(ours, mapped):
        assert {k: want[k] for k in ("task", "id", "query", "choices", "label")} == \
               {k: got[k] for k in ("task", "id", "query", "choices", "label")}
        assert ALIASES.get(want["split"], want["split"]) == got["split"]
        if split == "validation":  # these files are the hub's own rows: the raw fields kept in src agree too
            assert want["src"] == got["src"]
        if task == "mmlu":
            assert want["src"]["subject"] == got["src"]["subject"]


@pytest.mark.parametrize("task", ["arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "winogrande"])
def test_load_task_from_hub_equals_local(mirror, task):
    local = T.load_task(task, None, FIXTURES / "benchmarks", limit=4)
    assert T.load_task(task, None, "hub", limit=4) == local
    assert T.load_task(task, None, None, limit=4) == local  # no --data-dir, no PUDDING_MLX_DATA: the hub
    assert T.load_task(task, "train" if task != "mmlu" else "dev", "hub", limit=3) == \
        T.load_task(task, "train" if task != "mmlu" else "dev", FIXTURES / "benchmarks", limit=3)


def test_hub_errors_are_one_line(mirror, monkeypatch, tmp_path):
    with pytest.raises(PuddingError, match="no split 'test' on the hub"):
        T.load_task("piqa", "test", "hub")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(PuddingError, match=r"needs the `datasets` library.*--data-dir"):
        T.load_task("piqa", None, "hub", limit=1)
    monkeypatch.delitem(sys.modules, "datasets")
    monkeypatch.setenv(H.MIRROR_ENV, str(tmp_path))
    with pytest.raises(PuddingError, match="no folder ybisk/piqa"):
        T.load_task("piqa", None, "hub", limit=1)


def test_offline_cache_miss_is_one_line(tmp_path):
    """No network and nothing cached: one line naming the dataset and the local way out."""
    code = "from pudding_mlx.tasks import load_task\nload_task('piqa', limit=1)\n"
    env = {k: v for k, v in os.environ.items() if k not in (T.DATA_ENV, H.MIRROR_ENV)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0
    assert "cannot read ybisk/piqa split 'validation' from the Hugging Face hub" in done.stderr
    assert "--data-dir DIR or set PUDDING_MLX_DATA" in done.stderr


def test_train_calibration_reads_the_hub(mirror):
    """`train search` draws its calibration sample through load_task: with no local folder (or
    `hub`) it draws the same examples from the hub as from the local files."""
    from pudding_mlx.train.search import calibration_sets

    tasks = ["arc_easy", "piqa", "winogrande", "mix"]
    local = calibration_sets(tasks, 3, 0, FIXTURES / "benchmarks")
    for source in ("hub", None):
        hub = calibration_sets(tasks, 3, 0, source)
        assert {t: [e.id for e in v] for t, v in hub.items()} == {t: [e.id for e in v] for t, v in local.items()}
        assert hub == local
