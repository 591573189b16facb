"""Routers on joined router data (`train.heal_routers`), on the committed SmolLM2 run: a "heal run" folder holding
some of the run's sets re-scored (here: the run's own columns, perturbed, so that a wrong source shows) joins the
run's rows; the dense columns always stay the run's; a source with other rows is one clear error; the routers
trained on the joined run pick only among its sets and the run report is written."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from pudding_mlx.atomic import write_json, write_npz  # noqa: E402
from pudding_mlx.errors import PuddingError  # noqa: E402
from pudding_mlx.train import heal_routers as H  # noqa: E402

pytestmark = pytest.mark.torch
RUN = Path(__file__).resolve().parents[1] / "results" / "smollm2-135m"


def _fake_source(folder: Path, split: str, sets, shift: float, rows=None, label=None):
    """A router data folder with SETS' columns of RUN's data (named LABEL if given), y shifted by SHIFT and
    correctness (both kinds) flipped."""
    with np.load(RUN / f"data-{split}.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads((RUN / f"data-{split}.json").read_text())
    have = [tuple(sorted(s)) for s in meta["sets"]]
    idx = [have.index(tuple(sorted(s))) for s in sets]
    for k in H.PER_SET:
        arrays[k] = arrays[k][:, idx]
    arrays["y"] = arrays["y"] + shift
    arrays["correct"] = ~arrays["correct"].astype(bool)
    arrays["correct_norm"] = ~arrays["correct_norm"].astype(bool)
    arrays["dense"] = arrays["dense"] - 5.0  # a heal run's dense column: never to be used
    if rows is not None:
        arrays["id"] = arrays["id"][::-1].copy()
    folder.mkdir(parents=True)
    write_npz(folder / "router_data.npz", **arrays)
    write_json(folder / "router_data.json", {**meta, "sets": [sorted(s) for s in (label or sets)]})
    return folder


@pytest.fixture(scope="module")
def pool():
    return [c["omitted"] for c in json.loads((RUN / "cand-k3.json").read_text())["candidates"]][:4]


def test_joined_columns_come_from_the_named_source_and_dense_from_the_run(tmp_path, pool):
    src = _fake_source(tmp_path / "healed-val", "val", pool, shift=1.0)
    sources = {"val": [src], **{s: [_fake_source(tmp_path / f"healed-{s}", s, pool, 1.0)] for s in ("train", "test")}}
    out = H.write_joined_run(RUN, tmp_path / "healed", sources, pool, from_run=())
    with np.load(RUN / "data-val.npz") as run, np.load(out / "data-val.npz") as got:
        meta = json.loads((RUN / "data-val.json").read_text())
        cols = [[tuple(sorted(x)) for x in meta["sets"]].index(tuple(sorted(s))) for s in pool]
        assert np.allclose(got["y"], run["y"][:, cols].astype(np.float32) + 1.0, atol=1e-2)
        assert np.array_equal(got["correct"], ~run["correct"][:, cols].astype(bool))
        assert np.array_equal(got["dense"], run["dense"])  # the run's dense, not the source's
    assert json.loads((out / "cand-k3.json").read_text()) == [sorted(s) for s in pool]

    # unhealed join: the run's own columns where it has the set; a set it lacks comes from the extra source
    assert [3, 4, 5] not in [sorted(x) for x in meta["sets"]]
    extra = _fake_source(tmp_path / "extra-val", "val", pool[:1], shift=2.0, label=[[3, 4, 5], ])
    arrays, meta2 = H.joined_split(RUN, "val", [extra], [pool[1], [3, 4, 5]])
    with np.load(RUN / "data-val.npz") as run:
        assert np.array_equal(arrays["y"][:, 0], run["y"][:, cols[1]])  # the run's own column first
        assert np.allclose(arrays["y"][:, 1], run["y"][:, cols[0]].astype(np.float32) + 2.0, atol=1e-2)
    assert meta2["sets"] == [sorted(pool[1]), [3, 4, 5]]
    with pytest.raises(PuddingError, match="in none of"):
        H.joined_split(RUN, "val", [], [[3, 4, 5]])


def test_a_source_with_other_rows_is_refused(tmp_path, pool):
    src = _fake_source(tmp_path / "rows-val", "val", pool[:1], shift=0.0, rows="reversed", label=[[3, 4, 5]])
    with pytest.raises(PuddingError, match="other rows"):
        H.joined_split(RUN, "val", [src], [[3, 4, 5]])


def test_routers_on_a_joined_run_pick_among_its_sets(tmp_path, pool):
    sources = {s: [_fake_source(tmp_path / f"h-{s}", s, pool, shift=0.0)] for s in H.SPLITS}
    run = H.write_joined_run(RUN, tmp_path / "run", sources, pool, from_run=())
    H.train_routers(run)
    for objective in H.OBJECTIVES:
        with np.load(run / "routers" / "preds" / f"hidden-{objective}-k3-test.npz") as z:
            assert z["scores"].shape[1] == len(pool)
            assert set(np.unique(z["chosen"])) <= set(range(len(pool)))
    from pudding_mlx.train.report import report_run_dir

    report_run_dir(run, model="smollm2")
    rep = json.loads((run / "report.json").read_text())
    assert any(r.get("router") for r in rep["rows"])


QWEN = Path(__file__).resolve().parents[1] / "results" / "qwen2.5-coder-1.5b"


def test_generation_routers_on_the_committed_heal_run():
    """The committed Qwen heal run: the static rival is the lowest mean train-prompt loss (recomputed by hand from
    nll.npz), and each routed HumanEval figure is the committed per-problem record of the set picked for it."""
    heal = QWEN / "heal"
    got = H.generation_routers(heal / "adaptive" / "nll.npz", QWEN, heal)
    with np.load(heal / "adaptive" / "nll.npz") as z:
        sets, pool, train = [str(s) for s in z["sets"]], [str(s) for s in z["pool"]], z["split"] == "train"
        tok = lambda a: a[..., 0] / np.maximum(a[..., 1], 1)  # noqa: E731
        dense = tok(z["unhealed"])[:, sets.index("")]
        healed_loss = (tok(z["healed"]) - dense[:, None])[train].mean(0)
    assert got["runs"]["healed"]["static"] == "omit-" + pool[int(healed_loss.argmin())].replace(",", "-")
    row = got["runs"]["healed"]
    assert sum(row["usage"].values()) == 164 and set(row["usage"]) <= set(got["pool"])
    passed = {}
    for name in set(row["picks"].values()):
        recs = json.loads((heal / "gen-pool" / "sets" / f"{name}.json").read_text())["humaneval"]["records"]
        passed[name] = {r["task_id"]: r["passed"] for r in recs}
    by_hand = 100 * np.mean([passed[n][i] for i, n in row["picks"].items()])
    assert row["routed_humaneval"] == pytest.approx(by_hand)
    lo, hi = row["routed_minus_dense_ci95"]
    assert lo <= row["routed_humaneval"] - got["dense_humaneval"] <= hi


def test_without_a_healed_train_split_both_runs_train_on_the_unhealed_rows(tmp_path, pool):
    """A heal run that scored only the evaluation rows healed (MC_SPLITS=test,val): the healed run's routers and
    best static set are chosen on the unhealed training rows, so both runs pick alike; the evaluation rows are the
    healed source's (here flipped correctness, so the two runs' MC must differ), and the comparison says so."""
    work = tmp_path / "work"
    for split in ("val", "test"):
        _fake_source(work / f"data-healed-{split}", split, pool, shift=0.0)
    written = H.build(work, RUN, tmp_path / "out", model="smollm2")
    compare = json.loads((tmp_path / "out" / "healed_vs_unhealed.json").read_text())
    assert compare["train_rows"] == "unhealed" and compare["pool"] == [sorted(s) for s in pool]
    picks = {name: json.loads((path / "he_picks.json").read_text()) for name, path in written.items()}
    assert picks["healed"] == picks["unhealed"]
    reps = {name: json.loads((path / "report.json").read_text()) for name, path in written.items()}
    best = {name: next(d["best_static_set"] for d in rep["deltas"] if d["k"] == 3) for name, rep in reps.items()}
    assert best["healed"] == best["unhealed"]
    for objective, row in compare["mc"].items():  # correctness flipped on every evaluation row: far apart
        assert abs(row["healed"] - row["unhealed"]) > 5, objective

    (work / "data-healed-test" / "router_data.npz").unlink()
    with pytest.raises(PuddingError, match="data-healed-test missing"):
        H.build(work, RUN, tmp_path / "out2", model="smollm2")


def test_the_committed_qwen_routers_are_what_the_command_writes(tmp_path):
    """results/qwen2.5-coder-1.5b/heal/routers/healed_vs_unhealed.json and both run reports come from
    `build` on the committed heal folder (all three splits healed: the healed routers train on the healed training
    rows, so their picks are their own)."""
    heal = QWEN / "heal"
    H.build(heal, QWEN, tmp_path, model="Qwen2.5-Coder-1.5B-Instruct")
    got = json.loads((tmp_path / "healed_vs_unhealed.json").read_text())
    want = json.loads((heal / "routers" / "healed_vs_unhealed.json").read_text())
    assert got["train_rows"] == want["train_rows"] == "healed" and got["pool"] == want["pool"]
    assert json.loads((tmp_path / "healed" / "he_picks.json").read_text()) != json.loads(
        (tmp_path / "unhealed" / "he_picks.json").read_text())
    for objective, row in want["mc"].items():
        assert got["mc"][objective]["healed"] == pytest.approx(row["healed"])
        assert got["mc"][objective]["unhealed"] == pytest.approx(row["unhealed"])
    for name in ("healed", "unhealed"):
        assert (tmp_path / name / "report.md").read_text() == (heal / "routers" / name / "report.md").read_text()
        assert json.loads((tmp_path / name / "he_picks.json").read_text()) == json.loads(
            (heal / "routers" / name / "he_picks.json").read_text())
