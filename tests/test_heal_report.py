"""The healing report (`train heal-report`) on the committed Qwen heal run (results/qwen2.5-coder-1.5b/heal): its
figures are the committed per-problem and per-example records, recomputed here by hand (HumanEval healed and
unhealed, from the model run or the heal run's own unhealed folder; the multiple-choice average; the
generation-aware sets against today's best static set); a heal folder without an adapter is one line, exit 2."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import assert_one_line, run_cli  # noqa: E402
from pudding_mlx.train import heal_report as R  # noqa: E402
from pudding_mlx.train.report import average, load_eval, per_task  # noqa: E402

pytestmark = pytest.mark.torch
RUN = Path(__file__).resolve().parents[1] / "results" / "qwen2.5-coder-1.5b"
HEAL = RUN / "heal"
DISTILL = RUN.parent / "distill"


def _pass_rate(folder: Path, name: str) -> float:
    records = json.loads((folder / "sets" / f"{name}.json").read_text())["humaneval"]["records"]
    assert len(records) == 164
    return 100 * float(np.mean([r["passed"] for r in records]))


@pytest.fixture(scope="module")
def report():
    return R.build(HEAL, RUN, "Qwen2.5-Coder-1.5B-Instruct")


def test_humaneval_rows_are_the_committed_records(report):
    he = report["humaneval"]
    assert he["n"] == 164 and he["dense"] == pytest.approx(_pass_rate(RUN / "generation", "dense"))
    rows = {r["set"]: r for r in he["sets"]}
    assert set(rows) == {p.stem for p in (HEAL / "gen-pool" / "sets").glob("omit-*.json")}
    for name, row in rows.items():
        assert row["healed"] == pytest.approx(_pass_rate(HEAL / "gen-pool", name))
        lo, hi = row["healed_minus_dense_ci95"]
        assert lo <= row["healed"] - he["dense"] <= hi
    # unhealed from the model's generation run, or (a generation-aware set) from the heal run's own folder
    assert rows["omit-13-14-15"]["unhealed"] == pytest.approx(_pass_rate(RUN / "generation", "omit-13-14-15"))
    assert not (RUN / "generation" / "sets" / "omit-6-13-14.json").exists()
    assert rows["omit-6-13-14"]["unhealed"] == pytest.approx(_pass_rate(HEAL / "gen-unhealed", "omit-6-13-14"))


@pytest.mark.parametrize("key, prefix", [("mc", "mc-pool"), ("mc_pool_all", "data-healed")])
def test_multiple_choice_rows_are_the_committed_scores(report, key, prefix):
    mc = report[key]
    healed = load_eval([HEAL / f"{prefix}-val", HEAL / f"{prefix}-test"])
    assert mc["n"] == len(healed["task"]) == 6000 and len(mc["tasks"]) == 6
    ref = {"task": healed["task"]}
    for c, s in enumerate(healed["sets"]):
        row = next(r for r in mc["sets"] if r["set"] == "omit-" + "-".join(map(str, sorted(s))))
        assert row["healed"] == pytest.approx(average(per_task(ref, healed["hit"][:, c])))
        assert "unhealed" in row  # every healed set was also scored unhealed (model run or mc-unhealed)
    dense = next(r for r in json.loads((RUN / "report.json").read_text())["rows"] if r["method"] == "dense")
    assert mc["dense"] == pytest.approx(dense["average"], abs=0.01)


def test_generation_aware_sets_against_todays_best_static(report):
    ga = report["generation_aware"]
    ks = sorted({r["k"] for r in ga["sets"]})
    assert ks == [1, 2, 3, 5]
    today = {r["k"]: r for r in json.loads((RUN / "generation.json").read_text())["rows"]
             if r["method"] == "best static" and "fidelity" in r["name"]}
    assert [r["k"] for r in ga["against_best_static"]] == [1, 2, 3]
    for r in ga["against_best_static"]:
        assert r["best_static"] == "omit-" + "-".join(map(str, today[r["k"]]["set"]))
        assert r["best_static_humaneval"] == pytest.approx(today[r["k"]]["pass@1"])
        assert r["humaneval"] == pytest.approx(_pass_rate(HEAL / "gen-unhealed", r["set"]))
        lo, hi = r["minus_best_static_ci95"]
        assert lo <= r["humaneval"] - r["best_static_humaneval"] <= hi
    md = R.to_markdown(report)
    assert all(f"| {r['set']} |" in md for r in ga["sets"])
    # MC where a run scored the set on the evaluation rows: here omit-14 (k = 1) from the mc-extra run, by hand
    extra = load_eval([HEAL / "data-extra-val", HEAL / "data-extra-test"])
    run = load_eval([RUN / "data-val.npz", RUN / "data-test.npz"])
    assert [list(k) for k in zip(extra["task"], extra["id"])] == [list(k) for k in zip(run["task"], run["id"])]
    col = [sorted(s) for s in extra["sets"]].index([14])
    row = next(r for r in ga["sets"] if r["set"] == "omit-14")
    assert row["mc"] == pytest.approx(average(per_task({"task": extra["task"]}, extra["hit"][:, col])))
    assert ga["mc_dense"] == pytest.approx(average(per_task({"task": run["task"]}, run["dense_hit"])))
    lo, hi = row["mc_minus_dense_ci95"]
    assert lo <= row["mc"] - ga["mc_dense"] <= hi


def test_the_committed_report_is_what_the_command_writes(tmp_path):
    done = run_cli("train", "heal-report", HEAL, "--run", RUN, "--out", tmp_path, "--model", "Qwen2.5-Coder-1.5B-Instruct")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "heal_report.md").read_text() == (HEAL / "heal_report.md").read_text()


def test_a_heal_folder_without_its_adapter_is_one_line(tmp_path):
    done = run_cli("train", "heal-report", tmp_path, "--run", RUN, "--out", tmp_path / "o", "--model", "m")
    assert_one_line(done, "adapters/pool-k3/heal.json")
    assert not (tmp_path / "o").exists()


def test_the_fused_rows_are_the_gpu_runs_files(report):
    """heal/fuse (benchmarks/fuse_gpu.sh): the share of the NLL gain the merged copy keeps is recomputed from
    the committed NLLs, and the decode-cost lines are the bench's own summaries."""
    fu = report["fused"]
    raw = json.loads((HEAL / "fuse" / "fuse_13-14-15_cuda.json").read_text())
    n = raw["nll_per_token"]
    row = fu["keeps"]["13-14-15_cuda"]
    assert row["kept"] == pytest.approx((n["unhealed"] - n["fused"]) / (n["unhealed"] - n["lora"]))
    assert n["dense"] < n["fused"] < n["unhealed"] and row["replies"] == 64
    bench = json.loads((HEAL / "fuse" / "cost_fused_13-14-15_cuda.json").read_text())
    assert fu["cost"]["fused_13-14-15_cuda"] == bench["summary"] and len(bench["summary"]) == 2


def test_a_retrained_pool_adapters_val_nll_is_a_column_beside_the_committed_one(tmp_path):
    """heal_gpu.py nll-check writes heal/val_nll_retrained.json: each set's retrained NLL is read from it, beside
    the committed healed one, and the markdown gains the column; without it the table is as before."""
    got = json.loads((HEAL / "heal" / "val_nll.json").read_text())
    (tmp_path / "heal").mkdir()
    (tmp_path / "heal" / "val_nll.json").write_text(json.dumps(got))
    assert R.val_nll(tmp_path)["retrained"] is False
    again = {"examples": got["examples"], "table": {n: {**v, "default": v["default"] + 0.01 * i}
                                                     for i, (n, v) in enumerate(got["table"].items()) if "default" in v}}
    (tmp_path / "heal" / "val_nll_retrained.json").write_text(json.dumps(again))
    rows = R.val_nll(tmp_path)
    assert rows["retrained"] is True
    for r in rows["sets"]:
        want = again["table"].get(r["set"], {}).get("default")
        assert r["retrained"] == want and (want is None or r["healed"] == got["table"][r["set"]]["default"])
    md = R.to_markdown({**R.build(HEAL, RUN, "m"), "val_nll": rows})
    assert "| healed, retrained |" in md
    first = rows["sets"][0]
    assert f"| {first['set']} | {first['unhealed']:.3f} | {first['healed']:.3f} | {first['retrained']:.3f} |" in md


def test_the_per_set_adapters_row_is_its_committed_records_against_the_pool_adapters(report):
    """heal_gpu.py per-set (the GPU run of 2026-12-07): the per-set adapter's HumanEval, MC average and val NLL
    are recomputed from its own folders (gen-set-*, mc-set-*-{val,test}, val_nll_per_set.json), beside the pool
    adapter's on the same set and the same rows."""
    rows = {r["set"]: r for r in report["per_set"]["sets"]}
    assert set(rows) == {p.name[len("gen-set-"):] for p in HEAL.glob("gen-set-*")}
    nll = json.loads((HEAL / "heal" / "val_nll_per_set.json").read_text())
    for name, row in rows.items():
        assert row["humaneval"] == pytest.approx(_pass_rate(HEAL / f"gen-set-{name}", name))
        assert row["pool_humaneval"] == pytest.approx(_pass_rate(HEAL / "gen-pool", name))
        assert row["val_nll"] == nll[name][f"set-{name}"] and row["pool_val_nll"] == nll[name]["default"]
        own, pool = load_eval([HEAL / f"mc-set-{name}-val", HEAL / f"mc-set-{name}-test"]), \
            load_eval([HEAL / "mc-pool-val", HEAL / "mc-pool-test"])
        assert [list(s) for s in own["sets"]] == [[int(b) for b in name.split("-")[1:]]] and len(own["task"]) == 6000
        col = next(c for c, s in enumerate(pool["sets"]) if "omit-" + "-".join(map(str, sorted(s))) == name)
        pool_hit = {(t, i): h for t, i, h in zip(pool["task"], pool["id"], pool["hit"][:, col])}
        ref = {"task": own["task"]}  # the pool adapter's hits on the same questions, in the per-set run's order
        assert row["pool_mc"] == pytest.approx(average(per_task(ref, np.array([pool_hit[(t, i)] for t, i in zip(own["task"], own["id"])]))))
        assert row["mc"] == pytest.approx(average(per_task(ref, own["hit"][:, 0])))
        lo, hi = row["mc_minus_pool_ci95"]
        assert lo <= row["mc"] - row["pool_mc"] <= hi


def test_a_wide_data_adapters_row_is_recomputed_from_its_folders(tmp_path):
    """heal_gpu.py wide writes adapters/wide<S>-<set>/, gen-wide<S>-<set>/, mc-wide<S>-<set>-{val,test}/ and
    heal/val_nll_wide-*.json. Stand-ins with known relations: the pool adapter's HumanEval records and the per-set
    adapter's MC rows as the wide adapter's, beside the per-set adapter's own. The row is recomputed from them: pass
    rates, paired intervals that hold the difference, MC equal to itself (a zero-width interval)."""
    name, tag = "omit-5-13-14", "wide240-omit-5-13-14"
    for sub in (f"adapters/set-{name}", f"gen-set-{name}", f"mc-set-{name}-val", f"mc-set-{name}-test"):
        shutil.copytree(HEAL / sub, tmp_path / sub)
    shutil.copytree(HEAL / "gen-pool", tmp_path / f"gen-{tag}")  # the pool adapter's replies stand in
    for part in ("val", "test"):
        shutil.copytree(HEAL / f"mc-set-{name}-{part}", tmp_path / f"mc-{tag}-{part}")
    (tmp_path / "heal").mkdir()
    shutil.copy(HEAL / "heal" / "val_nll_per_set.json", tmp_path / "heal")
    headers = [json.loads(gzip.open(DISTILL / f, "rt").readline()) for f in ("answers.jsonl.gz", "answers-code.jsonl.gz")]
    (tmp_path / "adapters" / tag).mkdir()
    (tmp_path / "adapters" / tag / "heal.json").write_text(json.dumps({"steps": 240, "sets": [[5, 13, 14]],
                                                                       "rank": 16, "batch": 16, "lr": 2e-4,
                                                                       "data": headers}))
    nll = {"dense": {"unhealed": {"val": 0.35, "code_val": 0.17}},  # the reader's input, not a measurement
           name: {"unhealed": {"val": 0.56, "code_val": 0.30}, tag: {"val": 0.37, "code_val": 0.2}}}
    (tmp_path / "heal" / "val_nll_wide-240.json").write_text(json.dumps(nll))
    got = R.wide_data(tmp_path, RUN)
    (row,) = got["rows"]
    assert row["train_prompts"] == headers[0]["counts"]["train"] + headers[1]["counts"]["train"] == 1456 + 2465
    assert row["humaneval"] == pytest.approx(_pass_rate(HEAL / "gen-pool", name))
    assert row["per_set_humaneval"] == pytest.approx(_pass_rate(HEAL / f"gen-set-{name}", name))
    lo, hi = row["minus_per_set_ci95"]
    assert lo <= row["humaneval"] - row["per_set_humaneval"] <= hi and lo < hi
    lo, hi = row["minus_dense_ci95"]
    assert lo <= row["humaneval"] - _pass_rate(RUN / "generation", "dense") <= hi < 0
    assert row["mc"] == row["per_set_mc"] and row["mc_minus_per_set_ci95"] == pytest.approx([0.0, 0.0])
    assert row["val_nll"] == nll[name][tag] and row["per_set_val_nll"] == json.loads(
        (HEAL / "heal" / "val_nll_per_set.json").read_text())[name][f"set-{name}"]
    md = R.to_markdown({**R.build(HEAL, RUN, "m"), "wide": got})
    assert f"| {tag} | {name} | 240 | 3921 | 0.560 |" in md
    assert "(rank 16, batch 16, lr 0.0002) on the first answers file and the dense replies to 2,830 more" in md


def test_the_committed_wide_adapters_row_is_its_own_records(report):
    """The eighth GPU run's wide adapter (results/qwen2.5-coder-1.5b/heal/*wide240-omit-5-13-14*): HumanEval its
    per-problem records, MC its 6,000 scored questions against the per-set adapter's on the same ones, val NLL the
    run's file; the committed report holds this row."""
    name, tag = "omit-5-13-14", "wide240-omit-5-13-14"
    (row,) = report["wide"]["rows"]
    assert row["adapter"] == tag and row["set"] == name and row["steps"] == 240
    assert row["humaneval"] == pytest.approx(_pass_rate(HEAL / f"gen-{tag}", name))
    lo, hi = row["minus_per_set_ci95"]
    assert lo <= row["humaneval"] - _pass_rate(HEAL / f"gen-set-{name}", name) <= hi
    wide = load_eval([HEAL / f"mc-{tag}-val", HEAL / f"mc-{tag}-test"])
    own = load_eval([HEAL / f"mc-set-{name}-val", HEAL / f"mc-set-{name}-test"])
    assert len(wide["task"]) == 6000 and list(zip(wide["task"], wide["id"])) == list(zip(own["task"], own["id"]))
    assert row["mc"] == pytest.approx(average(per_task(wide, wide["hit"][:, 0])))
    lo, hi = row["mc_minus_per_set_ci95"]
    assert lo <= row["mc"] - average(per_task(own, own["hit"][:, 0])) <= hi
    nll = json.loads((HEAL / "heal" / "val_nll_wide-240.json").read_text())
    assert row["val_nll"] == nll[name][tag] and row["unhealed_val_nll"] == nll[name]["unhealed"]
    assert json.loads((HEAL / "heal_report.json").read_text())["wide"]["rows"][0]["humaneval"] == row["humaneval"]


def test_the_failure_kinds_are_the_committed_records_counted(report):
    """How the HumanEval replies end: dense from the model's generation run, each adapter of [5, 13, 14] from its
    own folder, and the pool's sets run both ways averaged; each row's kinds add up to the 164 problems."""
    from pudding_mlx.humaneval import failure_kind

    def counts(folder, name):
        records = json.loads((folder / "sets" / f"{name}.json").read_text())["humaneval"]["records"]
        return [failure_kind(r) for r in records]

    rows = {(r["set"], r["model"]): r["counts"] for r in report["failures"]["rows"]}
    for (name, _), row in rows.items():  # the means are rounded to 0.1 a kind
        assert sum(row.values()) == (pytest.approx(164, abs=0.05 * len(row)) if name.startswith("mean") else 164)
    dense = counts(RUN / "generation", "dense")
    assert rows[("dense", "dense")] == {k: dense.count(k) for k in report["failures"]["kinds"]}
    wide = counts(HEAL / "gen-wide240-omit-5-13-14", "omit-5-13-14")
    assert rows[("omit-5-13-14", "wide240 adapter")]["passed"] == wide.count("passed")
    assert rows[("omit-5-13-14", "set adapter")]["wrong answer"] == counts(HEAL / "gen-set-omit-5-13-14",
                                                                         "omit-5-13-14").count("wrong answer")
    (n_pool,) = {int(s.split()[2]) for s, m in rows if s.startswith("mean of")}
    assert n_pool == sum(1 for r in report["humaneval"]["sets"] if "unhealed" in r)
    assert rows[(f"mean of {n_pool} pool sets", "pool adapter")]["passed"] == pytest.approx(
        np.mean([r["healed"] for r in report["humaneval"]["sets"] if "unhealed" in r]) * 164 / 100, abs=0.051)


def test_the_targets_are_the_best_of_the_committed_records_and_their_margins(report):
    """The targets section: the best healed k = 3 HumanEval figure is the highest pass rate of the committed
    healed records (pool adapter per set, per-set and wide adapters), the routed one the generation router's
    picks scored on the healed records, the MC static best the highest healed MC average; a miss is stated with
    its margin in the markdown."""
    t = report["targets"]
    dense = report["humaneval"]["dense"]
    rates = [_pass_rate(HEAL / "gen-pool", p.stem) for p in (HEAL / "gen-pool" / "sets").glob("omit-*.json")]
    for folder in HEAL.glob("gen-*-omit-*"):  # the per-set and wide adapters' own HumanEval runs
        rates += [_pass_rate(folder, p.stem) for p in (folder / "sets").glob("omit-*.json")]
    assert t["humaneval_static"]["best"]["value"] == pytest.approx(max(rates))
    assert t["humaneval_routed"]["target"] == pytest.approx(0.9 * dense)
    gen = json.loads((HEAL / "routers" / "generation.json").read_text())["runs"]["healed"]
    picks = gen["picks"]
    hit = [next(r["passed"] for r in json.loads((HEAL / "gen-pool" / "sets" / f"{picks[i]}.json").read_text())["humaneval"]["records"]
                if r["task_id"] == i) for i in picks]
    assert t["humaneval_routed"]["best"]["value"] >= 100 * np.mean(hit) - 1e-9
    mc_best = max([r["healed"] for r in report["mc"]["sets"] + report["mc_pool_all"]["sets"]]
                  + [r["mc"] for r in report["per_set"]["sets"]]
                  + [r["mc"] for r in report["wide"]["rows"]])
    assert t["mc"]["best_static"]["value"] == pytest.approx(mc_best) and t["mc"]["target"] == pytest.approx(report["mc"]["dense"] - 2)
    md = R.to_markdown(report)
    gap = t["humaneval_routed"]["target"] - t["humaneval_routed"]["best"]["value"]
    assert gap > 0 and f"**missed by {gap:.1f}**" in md
    for run, r in t["lossless_fastest"].items():  # the fastest draft of each lossless run, from its own summary
        summary = report["mlx"]["lossless"][run]
        assert r["speedup"] == max(e["mean_speedup"] for e in summary.values() if isinstance(e, dict) and "mean_speedup" in e)
        # its label says what it drafted with, read from its own rows: the static set's size and the bundle
        payload = json.loads((HEAL / "mlx-out" / f"mlx_lossless_{run}.json").read_text())
        k = {len(row["sets"]["static"]) for row in payload["rows"]}
        healed = {Path(payload["bundle"]).name == "healed-preset"}
        assert len(k) == 1 and f"k = {k.pop()} static draft" in r["label"] and f"lossless ({r['label']})" in md
        assert r["label"].startswith("healed" if healed.pop() else "unhealed")
    assert {d["static_k"] for d in report["mlx"]["lossless_drafts"].values()} >= {3, 7}  # the aggressive draft is there


def test_the_routed_mc_target_is_the_healed_routers_best_and_the_adapter_check_recounts(report):
    """The routed MC target's figure is the best hidden-state router of the committed healed routers' report
    (routers/healed/report.json); with no healed train split it says the routers were trained on the unhealed rows;
    the same-adapter line recounts, from the two committed npz files per split, the row-set answers on which the
    healed router data and the pool sets' healed MC differ."""
    rep = json.loads((HEAL / "routers" / "healed" / "report.json").read_text())
    routed = [r["average"] for r in rep["rows"] if r["method"] == "routed" and str(r.get("router", "")).startswith("hidden-")]
    best = report["targets"]["mc"]["best_routed"]
    assert best["value"] == pytest.approx(max(routed))
    train_rows = json.loads((HEAL / "routers" / "healed_vs_unhealed.json").read_text())["train_rows"]
    assert (train_rows == "unhealed") == ("unhealed train rows" in best["what"])
    differing = rows = 0
    for split in ("val", "test"):
        new, old = (np.load(HEAL / f"{d}-{split}" / "router_data.npz") for d in ("data-healed", "mc-pool"))
        new_sets = [tuple(s) for s in json.loads((HEAL / f"data-healed-{split}" / "router_data.json").read_text())["sets"]]
        for j, s in enumerate(json.loads((HEAL / f"mc-pool-{split}" / "router_data.json").read_text())["sets"]):
            a, b = new["correct"][:, new_sets.index(tuple(s))], old["correct"][:, j]
            differing, rows = differing + int((a != b).sum()), rows + len(a)
    check = report["mc_pool_all"]["same_adapter"]
    assert (check["differing"], check["rows"]) == (differing, rows) and 0 < differing < rows
    assert f"{differing} of {rows} row-set answers differ" in R.to_markdown(report)


def test_the_routers_section_says_which_training_rows_the_healed_routers_had(report):
    """The committed routers train on the healed training rows; a heal run with only the evaluation splits healed
    trains them on the unhealed rows, and the section's title, its text and the MC target's label say so."""
    import copy

    md = R.to_markdown(report)
    assert report["routers"]["train_rows"] == "healed"
    assert "## Routers retrained on the healed scores" in md and "(hidden-task, healed scores)" in md
    eval_only = copy.deepcopy(report)
    eval_only["routers"]["train_rows"] = "unhealed"
    eval_only["targets"] = R.targets(eval_only)
    md = R.to_markdown(eval_only)
    assert "## Routers on the healed multiple-choice scores" in md and "the healed train split was not scored" in md
    assert "unhealed train rows" in eval_only["targets"]["mc"]["best_routed"]["what"]
    assert "## Routers retrained on the healed scores" not in md
