"""The evaluation report, rebuilt from the committed SmolLM2 run (results/smollm2-135m): every row
is consistent with the per-example table it is read from."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pudding_mlx.train.report import MAIN_TASKS, load_eval, report_run_dir
from pudding_mlx.train.search import split_pool

RUN = Path(__file__).resolve().parents[1] / "results" / "smollm2-135m"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    for p in RUN.iterdir():
        if p.name.startswith(("data-", "cand-k")) or p.name == "routers":
            (shutil.copytree if p.is_dir() else shutil.copy)(p, run / p.name)
    md = report_run_dir(run, "SmolLM2-135M-Instruct")
    assert md.is_file() and (run / "report.json").is_file()
    return json.loads((run / "report.json").read_text()), run


def rows(report, method, k=None):
    return [r for r in report["rows"] if r["method"] == method and (k is None or r["k"] == k)]


def test_schema(report):
    rep, _ = report
    assert rep["model"] == "SmolLM2-135M-Instruct"
    for r in rep["rows"]:
        assert r["method"] in {"dense", "static", "task-static", "sleb", "routed", "random", "oracle"}
        assert set(MAIN_TASKS) <= set(r["tasks"]) and isinstance(r["average"], float)
        assert abs(r["average"] - np.mean([r["tasks"][t] for t in MAIN_TASKS])) < 1e-9
    assert {d["k"] for d in rep["deltas"]} == {3, 5, 7}
    for d in rep["deltas"]:
        lo, hi = d["ci95"]
        assert lo <= d["routed_minus_best_static"] <= hi


def test_rows_agree_with_the_per_example_table(report):
    rep, run = report
    data = load_eval(sorted(p for p in run.glob("data-*.npz") if p.stem != "data-train"))
    for k in (3, 5, 7):
        statics = rows(rep, "static", k)
        pool, _ = split_pool(run / f"cand-k{k}.json")
        assert [r["set"] for r in statics] == [c["omitted"] for c in pool]
        # the best static set is chosen on the training data (disjoint from these examples), not here
        assert "data-train" in rep["best_static_chosen_on"]
        train = load_eval([run / "data-train.npz"])
        cols = [train["sets"].index(tuple(r["set"])) for r in statics]
        train_avg = [np.mean([train["hit"][train["task"] == t, c].mean() for t in np.unique(train["task"])])
                     for c in cols]
        best = statics[int(np.argmax(train_avg))]
        assert best.get("best") and sum(bool(r.get("best")) for r in statics) == 1
        (oracle,), (random,) = rows(rep, "oracle", k), rows(rep, "random", k)
        for t in MAIN_TASKS:
            # the oracle is at least every static set; a random set is their mean
            assert oracle["tasks"][t] >= max(r["tasks"][t] for r in statics) - 1e-9
            assert abs(random["tasks"][t] - np.mean([r["tasks"][t] for r in statics])) < 1e-6
        for routed in rows(rep, "routed", k):
            assert routed["tasks"]["arc_easy"] <= oracle["tasks"]["arc_easy"] + 1e-9
            assert abs(sum(routed["set_usage"]) - 1) < 1e-3
        # dense is the table's own dense column
        (dense,) = rows(rep, "dense")
        for t in MAIN_TASKS:
            assert abs(dense["tasks"][t] - 100 * data["dense_hit"][data["task"] == t].mean()) < 1e-9


def test_join_sets_adds_the_columns_of_the_same_rows_scored_for_other_sets():
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.train.report import join_sets

    full = load_eval([RUN / "data-val.npz"])
    n = len(full["sets"])
    cols = ("correct", "correct_norm", "y", "hit", "margin")

    def only(idx):  # full, as if scored for the sets idx alone
        return {**full, "sets": [full["sets"][i] for i in idx], **{k: full[k][:, idx] for k in cols}}

    half = n // 2
    # the second part repeats one set of the first: the first part's column is kept, not doubled
    got = join_sets(only(list(range(half))), only(list(range(half - 1, n))), "extra")
    assert got["sets"] == full["sets"]
    for k in cols:
        np.testing.assert_array_equal(got[k], full[k])
    # scored on other rows: one clear error, nothing joined
    shuffled = {**only(list(range(half, n))), "id": full["id"][::-1]}
    with pytest.raises(PuddingError, match="other rows"):
        join_sets(only(list(range(half))), shuffled, "extra")
