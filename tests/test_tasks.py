"""Task adapters over the real benchmark files (gzip JSONL in $PUDDING_MLX_DATA)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pudding_mlx.errors import PuddingError
from pudding_mlx import tasks as T

# the real files: ../shared/data/benchmarks beside the repository (or $PUDDING_MLX_DATA)
DATA = Path(os.environ.get("PUDDING_MLX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
            / "benchmarks")
pytestmark = pytest.mark.skipif(not (DATA / "README.md").is_file(),
                                reason=f"benchmark data not found at {DATA}")


def first(task, split=None):
    return T.load_task(task, split, data_dir=DATA, limit=1)[0]


@pytest.mark.parametrize("task", list(T.TASKS))
def test_every_task_and_split_loads(task):
    spec = T.TASKS[task]
    assert spec.eval_split in spec.splits and spec.metric in ("acc", "acc_norm")
    for split in spec.splits:
        exs = T.load_task(task, split, data_dir=DATA, limit=5)
        assert len(exs) == 5
        assert len({e.id for e in exs}) == 5
        for e in exs:
            assert e.task == task and e.split == split
            assert e.n_choices == len(e.choices) == len(e.norm_texts) >= 2
            assert 0 <= e.gold < e.n_choices
            assert all(c.startswith(" ") and len(c) > 1 for _, c in e.requests)
            assert e.router_text.strip()
    # default split is the standard eval split
    assert T.load_task(task, data_dir=DATA, limit=1)[0].split == spec.eval_split


def test_standard_eval_splits_and_metrics():
    want = {"arc_challenge": ("test", "acc_norm"), "arc_easy": ("test", "acc"),
            "boolq": ("validation", "acc"), "hellaswag": ("validation", "acc_norm"),
            "piqa": ("validation", "acc"), "winogrande": ("validation", "acc"),
            "openbookqa": ("test", "acc_norm"), "mmlu": ("test", "acc")}
    assert {t: (T.eval_split(t), T.eval_metric(t)) for t in T.TASKS} == want


def test_arc_template():
    e = first("arc_challenge")
    q = ("An astronomer observes that a planet rotates faster after a meteorite impact. Which is "
         "the most likely effect of this increase in rotation?")
    assert e.id == "Mercury_7175875" and e.gold == 2
    assert e.requests[0] == ("Question: " + q + "\nAnswer:", " Planetary density will decrease.")
    assert [c for _, c in e.requests][2] == " Planetary days will become shorter."
    assert e.router_text == q
    assert e.norm_texts[0] == "Planetary density will decrease."
    e = first("arc_easy", "validation")
    assert e.requests[0] == ("Question: Which technology was developed most recently?\nAnswer:",
                             " cellular telephone")


def test_piqa_template():
    e = first("piqa")
    q = "How do I ready a guinea pig cage for it's new occupants?"
    assert e.requests[0].context == f"Question: {q}\nAnswer:"
    assert e.requests[1].continuation.startswith(" Provide the guinea pig with a cage full")
    assert e.router_text == q and e.gold == 0


def test_openbookqa_template_is_question_answer():
    e = first("openbookqa")
    stem = ("A person wants to start saving money so that they can afford a nice vacation at the "
            "end of the year. After looking over their budget and expenses, they decide the best "
            "way to save money is to")
    assert [r.context for r in e.requests] == [f"Question: {stem}\nAnswer:"] * 4
    assert e.requests[1].continuation == " quit eating lunch out" and e.gold == 1
    assert e.router_text == stem


def test_hellaswag_template():
    e = first("hellaswag")
    assert e.id == "24" and e.gold == 3
    assert e.requests[3] == ("Roof shingle removal: A man is sitting on a roof. He",
                             " starts pulling up roofing on a roof.")
    assert e.router_text == "Roof shingle removal: A man is sitting on a roof. He"
    assert e.norm_texts[0] == "is using wrap to wrap a pair of skis."


def test_boolq_template():
    e = first("boolq")
    row = json.loads(gzip.open(DATA / "boolq.validation.jsonl.gz", "rt").readline())
    src = row["src"]
    ctx = f"{src['passage']}\nQuestion: {src['question']}?\nAnswer:"
    assert [tuple(r) for r in e.requests] == [(ctx, " no"), (ctx, " yes")]
    assert src["answer"] is False and e.gold == 0
    assert e.router_text == f"{src['passage']}\nQuestion: {src['question']}?"
    assert e.norm_texts == ("no", "yes")


def test_winogrande_partial_split():
    e = first("winogrande")
    s = "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert e.router_text == s
    assert e.requests == (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    )
    assert e.gold == 1  # answer "2" -> Maria
    assert e.norm_texts == tuple(r.context for r in e.requests)


def test_mmlu_template():
    e = first("mmlu")
    ctx = ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
           "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
           "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert [tuple(r) for r in e.requests] == [(ctx, " A"), (ctx, " B"), (ctx, " C"), (ctx, " D")]
    assert e.gold == 1 and e.norm_texts == ("A", "B", "C", "D")
    assert e.router_text == ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), "
                             "sqrt(18)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6")
    # the 'val' spelling of the split is accepted
    assert T.load_task("mmlu", "val", data_dir=DATA, limit=1)[0].split == "validation"


def test_data_dir_from_env_and_errors(monkeypatch, tmp_path):
    monkeypatch.setenv(T.DATA_ENV, str(DATA))
    assert T.load_task("piqa", limit=2)[0].id == "0"
    monkeypatch.delenv(T.DATA_ENV)
    with pytest.raises(PuddingError, match="no split 'test' on the hub"):  # no folder: the hub
        T.load_task("piqa", "test")
    with pytest.raises(PuddingError, match="does not exist"):
        T.load_task("piqa", data_dir=tmp_path / "nope", limit=1)
    with pytest.raises(PuddingError, match="missing benchmark file"):
        T.load_task("piqa", data_dir=tmp_path, limit=1)
    with pytest.raises(PuddingError, match="no split 'test'"):
        T.load_task("piqa", "test", data_dir=DATA)
    with pytest.raises(PuddingError, match="unknown task"):
        T.load_task("squad", data_dir=DATA)


def test_user_jsonl(tmp_path):
    rows = [
        {"task": "mine", "split": "train", "id": "a", "query": "2+2?", "choices": ["3", "4"],
         "label": 1, "src": {}},
        {"task": "winogrande", "split": "test", "id": "a", "query": "Tom beat Al so _ won.",
         "choices": ["Tom", "Al"], "label": 0, "src": {}},
        {"task": "mine", "split": "test", "id": "b", "query": "1+1?", "choices": ["2", "5"],
         "label": 0},
    ]
    p = tmp_path / "mine.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    exs = T.load_task(str(p))
    assert [e.id for e in exs] == ["a", "a#1", "b"]
    assert exs[0].task == "mine" and exs[0].requests[1] == ("Question: 2+2?\nAnswer:", " 4")
    assert exs[1].task == "winogrande" and exs[1].requests[1] == ("Tom beat Al so Al", " won.")
    assert [e.id for e in T.load_task(str(p), "test")] == ["a#1", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "label": 2}) + "\n")
    with pytest.raises(PuddingError, match=r"bad.jsonl:1: 'label'"):
        T.load_task(str(bad))


def test_sample_is_seeded_and_records_ids():
    exs = T.load_task("arc_easy", "validation", data_dir=DATA, limit=50)
    a, b, c = T.sample(exs, 10, seed=0), T.sample(exs, 10, seed=0), T.sample(exs, 10, seed=1)
    assert len(a) == 10 and a.ids == b.ids and a.ids != c.ids and a.seed == 0 and a.n_from == 50
    pos = [exs.index(e) for e in a]
    assert pos == sorted(pos)  # original order kept
    assert T.select(exs, a.ids) == list(a)
    assert T.sample(exs, 100, seed=0).ids == [e.id for e in exs]


def test_no_mlx_or_torch_import():
    code = ("import sys, pudding_mlx.errors, pudding_mlx.tasks; "
            "assert 'mlx' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
