"""Adaptive depth (issue #23): the decision rule, the loss predictor's folder, the generation source's
loader (on a synthetic nll.npz in the GPU run's layout), and the frontier report on the committed
Qwen2.5-Coder-1.5B data, checked against the npz and the HumanEval records directly."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pudding_mlx.adaptive import (LossPredictor, choose, choose_many, read_predictor, reason,
                                  write_predictor)
from pudding_mlx.atomic import write_npz
from pudding_mlx.errors import PuddingError
from pudding_mlx.tasks import eval_metric

RUN = Path(__file__).resolve().parents[1] / "results" / "qwen2.5-coder-1.5b"
NLL = RUN / "heal" / "adaptive" / "nll.npz"
AGREE = RUN / "heal" / "adaptive" / "agree.npz"  # the GPU run of 2026-12-07: reply NLL and greedy agreement
EXTRA = RUN / "heal"  # its data-extra-{train,val,test}: the MC rows scored for the k = 1 and 2 sets
SPEED = RUN.parents[1] / "results" / "bench" / "depth_speed_qwen_cpu.json"  # per-depth decode times, this CPU
SPEEDS = [SPEED] + sorted((RUN.parents[1] / "results" / "bench").glob("depth_speed_qwen_cuda.json"))  # and the GPU's
SIZES = [0, 3, 3, 5, 5]


# -- the decision rule ---------------------------------------------------------------------------------


def test_budget_edges_equal_is_allowed_just_below_is_not():
    pred = [0.0, 0.2, 0.3, 0.5, 0.6]
    assert choose(pred, SIZES, 0.5) == 3  # k = 5 at exactly the budget
    assert choose(pred, SIZES, np.nextafter(0.5, 0)) == 1  # just below: the best k = 3
    assert choose(pred, SIZES, 0.2) == 1
    assert choose(pred, SIZES, np.nextafter(0.2, 0)) == 0  # nothing fits: dense


def test_zero_and_negative_budgets_run_dense_unless_a_candidate_predicts_that_low():
    assert choose([0.0, 0.1, 0.2, 0.3, 0.4], SIZES, 0.0) == 0
    assert choose([0.0, 0.1, 0.2, 0.3, 0.4], SIZES, -1.0) == 0
    assert choose([0.0, 0.1, -0.2, 0.3, 0.4], SIZES, 0.0) == 2  # a set predicted to help fits a zero budget
    assert choose([0.0, 0.1, -0.2, 0.3, -1.5], SIZES, -1.5) == 4
    assert choose([0.0, 0.1, 0.2, 0.3, 0.4], SIZES, -math.inf) == 0


def test_dense_is_always_allowed_whatever_its_prediction():
    for dense_pred in (5.0, math.inf, math.nan, -3.0):
        assert choose([dense_pred, 1.0, 1.0, 2.0, 2.0], SIZES, 0.5) == 0
    # and its loss counts as 0: a dense entry never wins a tie it should not
    assert choose([7.0, 0.0, 0.0, 0.0, 0.0], [0, 0, 3, 3, 3], -0.1) == 0


def test_ties_largest_k_then_lower_loss_then_lower_index():
    assert choose([0, 0.1, 0.05, 0.4, 0.3], SIZES, 1.0) == 4  # both k = 5 fit: the lower loss
    assert choose([0, 0.1, 0.05, 0.3, 0.3], SIZES, 1.0) == 3  # equal loss: the lower index
    assert choose([0, 0.1, 0.05, 0.3, 0.9], SIZES, 0.5) == 3  # only one k = 5 fits
    assert choose([0, 0.1, 0.1, 0.9, 0.9], SIZES, 0.5) == 1


def test_infinite_budget_picks_the_largest_k_and_nan_never_fits():
    assert choose([0, 9, 9, 9, 8], SIZES, math.inf) == 4
    assert choose([0, 0.1, 0.1, math.nan, 0.2], SIZES, math.inf) == 4
    assert choose([0, 0.1, math.nan, math.nan, math.nan], SIZES, math.inf) == 1


def test_vectorised_form_matches_one_prompt_at_a_time():
    rng = np.random.default_rng(0)
    pred = rng.normal(0.2, 0.3, size=(200, 5)).round(1)  # rounding makes ties
    pred[rng.random(pred.shape) < 0.05] = np.nan
    budgets = rng.normal(0.2, 0.3, size=200).round(1)
    got = choose_many(pred, SIZES, budgets)
    assert got.tolist() == [choose(p, SIZES, b) for p, b in zip(pred, budgets)]
    assert (choose_many(pred, SIZES, 0.2) == [choose(p, SIZES, 0.2) for p in pred]).all()


def test_bad_inputs_are_one_line_errors():
    for call in (lambda: choose([0.1, 0.2], [3, 5], 1.0),  # no dense
                 lambda: choose([0.1, 0.2], [0, 3, 5], 1.0),  # sizes do not match
                 lambda: choose([0.1, 0.2], [0, -3], 1.0),
                 lambda: choose([0.0, 0.2], [0, 3], math.nan),
                 lambda: choose_many([0.0, 0.2], [0, 3], 1.0)):
        with pytest.raises(PuddingError) as e:
            call()
        assert "\n" not in str(e.value)


def test_reason_says_why():
    assert reason([0, 0.1, 0.05, 0.3, 0.4], SIZES, 0.1, 2) == "k = 3, predicted loss 0.05 <= budget 0.1; k = 5 predicted 0.3 > 0.1"
    assert reason([0, 0.2, 0.3, 0.4, 0.5], SIZES, 0.1, 0) == "dense; k = 3 predicted 0.2 > 0.1"
    assert reason([0, 0.1, 0.05, 0.3, 0.4], SIZES, 1.0, 3) == "k = 5, predicted loss 0.3 <= budget 1 (the largest k)"


# -- the predictor's folder -----------------------------------------------------------------------------


def _predictor(width=8, sets=([], [4, 5, 6], [4, 6, 9], [4, 5, 6, 7, 9])):
    rng = np.random.default_rng(1)
    return LossPredictor([list(s) for s in sets], 3, "mean+last", 512,
                         rng.normal(size=(len(sets), 2 * width)).astype(np.float32),
                         rng.normal(size=len(sets)).astype(np.float32), 0.25, {"ridge": 0.1, "loss": "nats"})


def test_predictor_round_trip(tmp_path):
    p = _predictor()
    write_predictor(tmp_path / "pred", p)
    q = read_predictor(tmp_path / "pred", hidden_size=8)
    assert q.sets == p.sets and (q.after, q.pooling, q.max_tokens, q.default_max_loss) == (3, "mean+last", 512, 0.25)
    assert np.array_equal(q.weight, p.weight) and np.array_equal(q.bias, p.bias)
    assert q.settings["ridge"] == 0.1 and q.sizes.tolist() == [0, 3, 3, 5]
    x = np.random.default_rng(2).normal(size=(30, 16))
    pred = q.predict(x)
    assert (pred[:, 0] == 0).all()  # dense predicts no loss
    assert np.allclose(pred[:, 1:], (x @ p.weight.T.astype(np.float64) + p.bias)[:, 1:])
    assert q.choose(x).tolist() == choose_many(pred, q.sizes, 0.25).tolist()
    with pytest.raises(PuddingError, match="already exists"):
        write_predictor(tmp_path / "pred", p)
    write_predictor(tmp_path / "pred", p, force=True)


def _one_line(call, match):
    with pytest.raises(PuddingError, match=match) as e:
        call()
    assert "\n" not in str(e.value)


def test_bad_predictor_files_are_one_line_errors(tmp_path):
    _one_line(lambda: read_predictor(tmp_path / "nowhere"), "missing")
    good = write_predictor(tmp_path / "good", _predictor())
    _one_line(lambda: read_predictor(good, hidden_size=16), "weight")  # another model's width

    def broken(name, edit=None, tensors=None):
        folder = tmp_path / name
        write_predictor(folder, _predictor())
        if edit is not None:
            s = json.loads((folder / "predictor.json").read_text())
            edit(s)
            (folder / "predictor.json").write_text(json.dumps(s))
        if tensors is not None:
            from safetensors.numpy import save_file

            save_file(tensors, str(folder / "predictor.safetensors"))
        return folder

    _one_line(lambda: read_predictor(broken("fmt", lambda s: s.update(format="pudding-mlx-router"))), "'format'")
    _one_line(lambda: read_predictor(broken("ver", lambda s: s.update(schema_version=2))), "'schema_version'")
    _one_line(lambda: read_predictor(broken("pool", lambda s: s.update(pooling="max"))), "'pooling'")
    _one_line(lambda: read_predictor(broken("nodense", lambda s: s.update(sets=[[4], [5], [6], [7]]))), "'sets'")
    _one_line(lambda: read_predictor(broken("low", lambda s: s.update(sets=[[], [2], [5], [6]]))), "'sets'")  # reads block 3
    _one_line(lambda: read_predictor(broken("budget", lambda s: s.pop("default_max_loss"))), "'default_max_loss'")
    _one_line(lambda: read_predictor(broken("shape", tensors={"weight": np.zeros((3, 16), np.float32),
                                                                "bias": np.zeros(3, np.float32)})), "'weight'")
    _one_line(lambda: read_predictor(broken("nobias", tensors={"weight": np.zeros((4, 16), np.float32)})), "'bias'")
    _one_line(lambda: read_predictor(broken("nan", tensors={"weight": np.full((4, 16), np.nan, np.float32),
                                                             "bias": np.zeros(4, np.float32)})), "NaN")
    junk = broken("junk")
    (junk / "predictor.safetensors").write_bytes(b"not safetensors")
    _one_line(lambda: read_predictor(junk), "not a readable safetensors file")
    (junk / "predictor.json").write_text("{")
    _one_line(lambda: read_predictor(junk), "not valid JSON")


# -- the generation source (nll.npz of the GPU run, benchmarks/heal_gpu.py adaptive-data) -------------


def _basis(width=12, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for k in ("mean_3", "last_3"):
        q, _ = np.linalg.qr(rng.normal(size=(width, dim)))
        out[f"basis_{k}"], out[f"center_{k}"] = q.T, rng.normal(size=width)
    return out


def _write_nll(path, n=6, width=12, sets=("", "5,9", "5,9,13"), **change):
    rng = np.random.default_rng(3)
    tokens = rng.integers(5, 40, size=n).astype(np.float32)
    per_token = np.stack([np.full(n, 1.0), np.full(n, 1.5), np.linspace(2.0, 3.0, n)], 1)[:, :len(sets)]
    arrays = dict(id=np.array([f"code-{i}" for i in range(n)]), kind=np.array(["code", "task"] * (n // 2)),
                  split=np.array(["train", "train", "val"] * (n // 3)), sets=np.array(list(sets)),
                  unhealed=np.stack([per_token * tokens[:, None], np.repeat(tokens[:, None], len(sets), 1)], -1).astype(np.float32),
                  pool=np.array(["5,9,13"]), healed=np.zeros((n, 1, 2), np.float32),
                  mean_3=rng.normal(size=(n, width)).astype(np.float16), last_3=rng.normal(size=(n, width)).astype(np.float16))
    arrays.update(change)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    write_npz(path, **arrays)
    return arrays


def test_nll_source_reads_the_gpu_runs_layout(tmp_path):
    from pudding_mlx.train.adaptive import nll_source, targets_on

    arrays = _write_nll(tmp_path / "nll.npz")
    basis = _basis()
    s = nll_source(tmp_path / "nll.npz", basis)
    assert s["sets"] == [(), (5, 9), (5, 9, 13)]
    assert np.allclose(s["loss"][:, 0], 0) and np.allclose(s["loss"][:, 1], 0.5, atol=1e-5)
    assert np.allclose(s["loss"][:, 2], np.linspace(1.0, 2.0, 6), atol=1e-5)
    want = (arrays["mean_3"].astype(np.float64) - basis["center_mean_3"]) @ basis["basis_mean_3"].T
    assert s["feats"]["mean_3"].shape == (6, 4) and np.allclose(s["feats"]["mean_3"], want)
    assert s["split"].tolist() == ["train", "train", "val"] * 2
    t = targets_on(s, [(), (5, 9, 13), (7, 8, 9)])  # a menu set the source lacks: NaN
    assert np.allclose(t[:, :2], s["loss"][:, [0, 2]]) and np.isnan(t[:, 2]).all()


def test_agreement_columns_give_the_agree_loss(tmp_path):
    """agree.npz (`distill.target_nll(agreement=True)`: 4 columns): "agree" is the share of the reply after the
    first token the set departs at, minus dense's own share; "verbatim" where the set decodes as far as dense."""
    from pudding_mlx.train.adaptive import nll_source

    n = 6
    count = np.array([10, 20, 10, 40, 10, 5], np.float32)
    first = np.stack([count, count / 2, np.zeros(n, np.float32)], 1)  # dense whole, half, from the first token
    first[1, 0] = 15  # dense itself departs (the numerics of a full pass): the loss is against that
    arrays = _write_nll(tmp_path / "agree.npz")
    hits = first.copy()
    arrays["unhealed"] = np.concatenate([arrays["unhealed"][..., :1], np.repeat(count[:, None, None], 3, 1),
                                         hits[..., None], first[..., None]], -1)
    arrays["unhealed"][..., 0] *= count[:, None] / arrays["unhealed"][:, :1, 0].clip(1)  # any NLL will do
    write_npz(tmp_path / "agree.npz", **arrays)
    s = nll_source(tmp_path / "agree.npz", _basis())
    assert s["name"] == "agree" and set(s["losses"]) == {"nll", "agree"} and s["loss"] is s["losses"]["nll"]
    want = np.stack([np.zeros(n), np.full(n, 0.5), np.ones(n)], 1)
    want[1] = [0.0, 0.5 - 0.25, 1 - 0.25]  # dense's own lost share 0.25 is subtracted
    assert np.allclose(s["losses"]["agree"], want)
    assert s["verbatim"][:, 0].all() and not s["verbatim"][:, 1:].any()
    assert np.isclose(s["dense_verbatim"], 5 / 6)  # row 1: dense departs at 15 of 20
    _write_nll(tmp_path / "nll.npz")  # two columns: no agreement
    assert nll_source(tmp_path / "nll.npz", _basis())["verbatim"] is None


def test_verbatim_frontier_counts_the_chosen_sets_word_for_word_replies():
    from pudding_mlx.train.adaptive import frontier_area, verbatim_frontier

    sizes = np.array([0, 1, 3])
    pred = np.array([[0, 0.1, 0.5], [0, 0.4, 0.2], [0, 0.3, 0.9]])
    verbatim = np.array([[1, 1, 0], [1, 0, 1], [1, np.nan, 0]], float)  # NaN: the source lacks the set
    rows = {r["budget"]: r for r in verbatim_frontier(pred, sizes, verbatim)}
    assert rows[-np.inf]["mean_k"] == 0 and rows[-np.inf]["average"] == 100
    assert rows[np.inf]["mean_k"] == 3 and np.isclose(rows[np.inf]["average"], 100 / 3)
    # budget 0.3: row 0 takes k 1 (0.1), row 1 k 3 (0.2), row 2 k 1 (0.3, NaN: not word for word)
    assert np.isclose(rows[0.3]["mean_k"], 5 / 3) and np.isclose(rows[0.3]["average"], 200 / 3)
    area = frontier_area(list(rows.values()), 3)
    assert 100 / 3 < area < 100


def test_nll_source_bad_files(tmp_path):
    from pudding_mlx.train.adaptive import nll_source

    _write_nll(tmp_path / "a.npz", last_3=None)
    _one_line(lambda: nll_source(tmp_path / "a.npz", _basis()), "'last_3' is missing")
    _write_nll(tmp_path / "b.npz", unhealed=np.zeros((6, 2, 2), np.float32))  # 3 sets
    _one_line(lambda: nll_source(tmp_path / "b.npz", _basis()), "unhealed")
    _write_nll(tmp_path / "c.npz", sets=np.array(["5", "5,9", "5,9,13"]))
    _one_line(lambda: nll_source(tmp_path / "c.npz", _basis()), "no dense")
    _write_nll(tmp_path / "w.npz", width=10)  # another model's hidden size
    _one_line(lambda: nll_source(tmp_path / "w.npz", _basis()), "another model")
    (tmp_path / "d.npz").write_bytes(b"junk")
    _one_line(lambda: nll_source(tmp_path / "d.npz", _basis()), "not a readable")


def test_masked_fit_is_probe_fit_on_full_columns_and_ignores_missing_rows():
    from pudding_mlx.train.adaptive import fit_masked
    from pudding_mlx.train.probe import fit

    rng = np.random.default_rng(4)
    x = rng.normal(size=(80, 5))
    t = x @ rng.normal(size=(5, 3)) + rng.normal(scale=0.1, size=(80, 3))
    a, b = fit_masked(x, t, 0.1), fit(x, t, 0.1)
    assert all(np.allclose(a[k], b[k]) for k in ("mu", "sd", "w", "b"))
    t2 = t.copy()
    t2[:30, 2] = np.nan  # column 2 known on rows 30.. only
    c = fit_masked(x, t2, 0.1)
    assert np.allclose(c["w"][:, :2], b["w"][:, :2]) and np.allclose(c["b"][:2], b["b"][:2])
    z = (x[30:] - c["mu"]) / c["sd"]
    zc = z - z.mean(0)
    w = np.linalg.solve(zc.T @ zc + 0.1 * 50 * np.eye(5), zc.T @ (t[30:, 2] - t[30:, 2].mean()))
    assert np.allclose(c["w"][:, 2], w)


def test_a_second_source_joins_the_fit(tmp_path):
    """The generation source adds rows where the menu's sets are in it; other columns keep MC's fit."""
    from pudding_mlx.train.adaptive import fit_and_select, mc_source, nll_source

    train = mc_source(RUN, "train")
    menu = [(), (13, 14, 15), (11, 12, 13, 14, 15)]
    with np.load(RUN / "features-train.npz") as z:
        basis = {k: z[k].astype(np.float64) for k in z.files if k.startswith(("basis_", "center_"))}
    n, width = 9, basis["center_mean_3"].shape[0]
    _write_nll(tmp_path / "nll.npz", n=n, width=width, sets=("", "13,14,15", "4,5,6"))
    nll = nll_source(tmp_path / "nll.npz", basis)
    held = [np.arange(len(train["loss"])) % 5 == 0, nll["split"] != "train"]
    one = fit_and_select([train], menu, held[:1])
    two = fit_and_select([train, nll], menu, held)
    assert (two["pooling"], two["ridge"]) in {(t["pooling"], t["ridge"]) for t in two["tried"]}
    if (one["pooling"], one["ridge"]) == (two["pooling"], two["ridge"]):
        assert not np.allclose(one["head"]["w"][:, 1], two["head"]["w"][:, 1])  # (13, 14, 15): in both sources


# -- the report on the committed data ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def built():
    from pudding_mlx.train.adaptive import build

    # as the committed report is made: the MC router data (with the mc-extra sets) and the GPU run's agree.npz
    return build(RUN, RUN / "generation", "qwen2.5-coder-1.5b", nll_path=AGREE, extra=EXTRA,
                 bench_file=RUN.parents[1] / "results" / "bench" / "bench_qwen_preset_cuda.json", speed_files=SPEEDS)


def test_the_gpu_runs_replies_are_a_training_source(built):
    """The committed agree.npz (594 distillation replies, train and val splits, never HumanEval or an
    evaluation split): every menu set is in it, dense's losses are 0 by definition, the generation loss was
    chosen by its held-out replies' word-for-word frontier, and the fit used it."""
    from pudding_mlx.train.adaptive import GEN_LOSSES, basis_of, nll_source

    rep, predictor = built
    src = nll_source(AGREE, basis_of(RUN))
    assert set(src["split"]) == {"train", "val"} and not any(i.startswith("HumanEval") for i in src["id"])
    assert {tuple(s) for s in rep["menu"]} <= set(src["sets"])
    for g in GEN_LOSSES:
        assert np.all(src["losses"][g][:, src["sets"].index(())] == 0)
    pred = rep["predictor"]
    assert set(pred["gen_loss_area"]) == set(GEN_LOSSES)
    assert pred["gen_loss"] == max(GEN_LOSSES, key=lambda g: pred["gen_loss_area"][g])
    assert pred["sources"] == ["mc-train", "agree"] and "agree" in predictor.settings["trained_on"]
    # dense's own column: the share of its replies a full-sequence pass decodes word for word (the numerics' floor)
    with np.load(AGREE) as z:
        dense = list(z["sets"]).index("")
        assert pred["gen_dense_verbatim"] == pytest.approx(np.mean(z["unhealed"][:, dense, 3] >= z["unhealed"][:, dense, 1]))


def test_with_agreement_the_generation_loss_is_chosen_on_held_out_replies(tmp_path):
    """An agree.npz (here: the committed nll.npz's rows with made-up agreement columns) makes `build` choose the
    generation loss by the held-out replies' word-for-word frontier: both are tried, the larger area wins, and the
    predictor's unit says which; the MC loss is chosen as before."""
    from pudding_mlx.train.adaptive import GEN_LOSSES, build, to_markdown

    with np.load(NLL, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    u = arrays["unhealed"]
    per_tok = u[..., 0] / u[..., 1]
    first = np.floor(u[..., 1] * np.clip(1.2 - (per_tok - per_tok[:, :1]), 0, 1))  # departs earlier as NLL rises
    arrays["unhealed"] = np.concatenate([u, first[..., None], first[..., None]], -1).astype(np.float32)
    write_npz(tmp_path / "agree.npz", **arrays)
    rep, predictor = build(RUN, RUN / "generation", "qwen2.5-coder-1.5b", nll_path=tmp_path / "agree.npz")
    p = rep["predictor"]
    assert set(p["gen_loss_area"]) == set(GEN_LOSSES) and p["gen_loss"] == max(GEN_LOSSES, key=p["gen_loss_area"].get)
    assert p["mc_loss"] == "margin" and p["sources"] == ["mc-train", "agree"]
    assert ("word for word" in predictor.settings["loss"]) == (p["gen_loss"] == "agree")
    aucs = rep["humaneval_oracle"]["predictor_auc_by_gen_loss"]
    assert set(aucs) == set(GEN_LOSSES) and np.isclose(aucs[p["gen_loss"]], rep["humaneval_oracle"]["predictor_auc"]["mean"])
    assert "each generation loss" in to_markdown(rep)


def _eval_hits():
    """From the npz directly: per evaluation row its task, the dense hit and the hits per set column."""
    tasks, dense, hit, sets = [], [], [], None
    for split in ("val", "test"):
        with np.load(RUN / f"data-{split}.npz", allow_pickle=False) as z:
            norm = np.array([eval_metric(str(t)) == "acc_norm" for t in z["task"]])
            tasks.append(z["task"])
            dense.append(np.where(norm, z["dense_correct_norm"], z["dense_correct"]))
            hit.append(np.where(norm[:, None], z["correct_norm"], z["correct"]))
        sets = [tuple(s) for s in json.loads((RUN / f"data-{split}.json").read_text())["sets"]]
    return np.concatenate(tasks), np.concatenate(dense), np.concatenate(hit), sets


def _six_task_average(tasks, got):
    main = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")
    return float(np.mean([100 * got[tasks == t].mean() for t in main]))


def _he_passes(name):
    d = json.loads((RUN / "generation" / "sets" / f"{name}.json").read_text())
    return {r["task_id"]: bool(r["passed"]) for r in d["humaneval"]["records"]}


def test_the_menu_is_dense_and_the_sets_with_both_measures(built):
    rep, _ = built
    assert rep["menu"][0] == [] and sorted(set(rep["sizes"])) == [0, 1, 2, 3, 5]
    run = {p.stem for p in (RUN / "generation" / "sets").glob("*.json")}
    mc = {tuple(s) for f in (RUN / "data-train.json", EXTRA / "data-extra-train" / "router_data.json")
          for s in json.loads(f.read_text())["sets"]}
    for s in rep["menu"][1:]:
        assert "omit-" + "-".join(map(str, s)) in run and tuple(s) in mc


def test_no_budget_skips_nothing(built):
    rep, _ = built
    row = next(r for r in rep["frontier"] if r["budget"] == -math.inf)
    tasks, dense, _, _ = _eval_hits()
    assert row["mc"]["mean_k"] == 0 and row["mc"]["average"] == pytest.approx(_six_task_average(tasks, dense), abs=1e-9)
    assert row["mc"]["average"] == pytest.approx(63.05, abs=0.005)  # report.md's dense row
    passes = _he_passes("dense")
    assert row["humaneval"]["mean_k"] == 0
    assert row["humaneval"]["pass@1"] == pytest.approx(100 * np.mean(list(passes.values())))
    assert row["mc"]["speedup_ideal"] == 1.0


def test_an_infinite_budget_runs_the_largest_k_everywhere_as_the_npz_says(built):
    """The saved predictor (folded onto the raw hidden state) applied to the PCA features mapped back
    chooses the same sets as the report's PCA head; the accuracies are then recomputed from the npz."""
    rep, predictor = built
    row = next(r for r in rep["frontier"] if r["budget"] == math.inf)
    assert row["mc"]["mean_k"] == 5 and row["humaneval"]["mean_k"] == 5
    assert row["mc"]["speedup_ideal"] == pytest.approx(28 / 23)
    with np.load(RUN / "features-train.npz") as z:
        basis = {k: z[k].astype(np.float64) for k in z.files if k.startswith(("basis_", "center_"))}
    raw = []
    for split in ("val", "test"):
        with np.load(RUN / f"features-{split}.npz") as z:  # PCA rows -> the raw state they stand for
            raw.append(np.concatenate([basis[f"center_{p}_3"] + z[f"{p}_3"].astype(np.float64) @ basis[f"basis_{p}_3"]
                                       for p in predictor.pooling.split("+")], 1))
    chosen = predictor.choose(np.concatenate(raw), math.inf)
    tasks, _, hit, sets = _eval_hits()
    cols = [sets.index(tuple(predictor.sets[c])) for c in chosen]
    assert all(len(predictor.sets[c]) == 5 for c in chosen)
    assert row["mc"]["average"] == pytest.approx(_six_task_average(tasks, hit[np.arange(len(cols)), cols]), abs=1e-9)
    assert sum(row["mc"]["usage"].values()) == len(tasks)
    with np.load(RUN / "generation" / "features.npz") as z:
        ids = [str(i) for i in z["id"]]
        he_raw = np.concatenate([z[f"{p}_3"].astype(np.float64) for p in predictor.pooling.split("+")], 1)
    he_ids = list(_he_passes("dense"))
    he_chosen = predictor.choose(he_raw[[ids.index(i) for i in he_ids]], math.inf)
    passed = [_he_passes("omit-" + "-".join(map(str, predictor.sets[c])))[i] for i, c in zip(he_ids, he_chosen)]
    assert row["humaneval"]["pass@1"] == pytest.approx(100 * np.mean(passed))


def test_budgets_trade_blocks_for_quality_monotonically(built):
    rep, _ = built
    ks = [r["mc"]["mean_k"] for r in rep["frontier"]]
    assert ks == sorted(ks) and [r["budget"] for r in rep["frontier"]] == sorted(r["budget"] for r in rep["frontier"])
    assert [r["humaneval"]["mean_k"] for r in rep["frontier"]] == sorted(r["humaneval"]["mean_k"] for r in rep["frontier"])


def test_the_default_budget_was_chosen_on_held_out_training_rows(built):
    rep, predictor = built
    sel = rep["selection"]
    assert predictor.default_max_loss == sel["default_max_loss"] == rep["default"]["budget"]
    ok = [r for r in sel["grid"] if r["average"] >= 0.95 * sel["dense_average"]]
    assert next(r for r in sel["grid"] if r["budget"] == sel["default_max_loss"]) in ok
    assert max(r["mean_k"] for r in ok) == next(r["mean_k"] for r in ok if r["budget"] == sel["default_max_loss"])


def test_the_mc_loss_is_the_gold_margin_and_is_chosen_on_held_out_training_rows(built):
    from pudding_mlx.train.adaptive import MC_LOSS_TEXT, MC_LOSSES, frontier_area, mc_source

    rep, predictor = built
    pred = rep["predictor"]
    assert set(pred["mc_loss_area"]) == set(MC_LOSSES)
    assert pred["mc_loss"] == max(MC_LOSSES, key=lambda k: pred["mc_loss_area"][k])
    if pred["gen_loss"] in (None, "nll"):  # the grid is the MC-loss fit's; with "agree", the refit's (test_with_agreement_...)
        assert pred["mc_loss_area"][pred["mc_loss"]] == pytest.approx(frontier_area(rep["selection"]["grid"], max(rep["sizes"])))
    assert MC_LOSS_TEXT[pred["mc_loss"]] in predictor.settings["loss"]
    # the margin loss, one row worked out from the npz by hand: gold's ell-bar minus the best wrong one's
    src = mc_source(RUN, "train")
    with np.load(RUN / "data-train.npz", allow_pickle=False) as z:
        i, m = 7, 2
        n, g = int(z["n_choices"][i]), int(z["gold"][i])

        def margin(ll):
            ll = ll.astype(np.float64)[:n]
            return ll[g] - max(ll[c] for c in range(n) if c != g)

        want = margin(z["dense_mean_ll"][i]) - margin(z["mean_ll"][i, m])
        assert src["losses"]["margin"][i, m] == pytest.approx(want)
        assert src["losses"]["gold"][i, m] == pytest.approx(float(z["dense"][i]) - float(z["y"][i, m]))


def test_frontier_area_is_the_mean_average_over_mean_k():
    from pudding_mlx.train.adaptive import frontier_area

    line = [{"mean_k": 0.0, "average": 60.0}, {"mean_k": 5.0, "average": 50.0}]
    assert frontier_area(line, 5) == pytest.approx(55.0)
    # budgets of equal mean k count once, at their mean; a frontier ending early holds its last value
    assert frontier_area(line + [{"mean_k": 5.0, "average": 40.0}], 5) == pytest.approx(52.5)
    assert frontier_area([{"mean_k": 0.0, "average": 60.0}, {"mean_k": 2.5, "average": 50.0}], 5) == pytest.approx(
        np.interp(np.linspace(0, 5, 101), [0, 2.5], [60, 50]).mean())


def test_the_oracle_ceiling_is_the_best_choice_per_prompt_found_by_brute_force():
    """oracle_mean_k against every assignment of candidates to prompts (column 0 dense), on small random result
    tables."""
    import itertools

    from pudding_mlx.train.adaptive import oracle_mean_k

    rng = np.random.default_rng(0)
    sizes = np.array([0, 1, 3, 5])
    for _ in range(40):
        hit = rng.random((5, 4)) < rng.uniform(0.2, 0.9)
        for keep in (0.95, 1.0, 0.5):
            need = math.ceil(keep * hit[:, 0].sum() - 1e-9)
            best = max(sizes[list(c)].mean() for c in itertools.product(range(4), repeat=5)
                       if hit[np.arange(5), list(c)].sum() >= need)
            assert oracle_mean_k(hit, sizes, keep) == pytest.approx(best)
    assert oracle_mean_k(np.array([[1, 0], [1, 0]]), np.array([0, 3]), 1.0) == 0.0
    assert oracle_mean_k(np.array([[1, 1], [0, 0]]), np.array([0, 3]), 1.0) == 3.0  # a prompt nobody gets right skips most


def test_ranking_auc_is_the_mann_whitney_statistic():
    from pudding_mlx.train.adaptive import ranking_auc

    rng = np.random.default_rng(1)
    for _ in range(20):
        score = rng.integers(0, 6, 30).astype(float)  # ties on purpose
        positive = rng.random(30) < 0.4
        # U from the ranks (ties at their mean rank)
        order = np.argsort(score, kind="stable")
        ranks = np.empty(30)
        ranks[order] = np.arange(1, 31)
        for v in np.unique(score):
            ranks[score == v] = ranks[score == v].mean()
        n1, n0 = positive.sum(), (~positive).sum()
        want = (ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
        assert ranking_auc(score, positive) == pytest.approx(want)
    assert ranking_auc([1.0, 2.0], [False, True]) == 1.0 and ranking_auc([1.0, 2.0], [True, False]) == 0.0
    assert ranking_auc([1.0, 2.0], [True, True]) is None


def test_the_reports_humaneval_ceiling_is_read_off_the_committed_replies(built):
    from pudding_mlx.train import generation_report as G
    from pudding_mlx.train.adaptive import oracle_mean_k

    rep, _ = built
    sets = G.load_sets(RUN / "generation")
    by_key = {tuple(s["omitted"]): s for s in sets.values()}
    ids = [r["task_id"] for r in sets["dense"]["humaneval"]["records"]]
    menu = [tuple(m) for m in rep["menu"]]
    hit = np.stack([G.passed(by_key[m], ids) for m in menu], 1)
    sizes = np.array([len(m) for m in menu])
    assert rep["humaneval_oracle"]["menu"]["1.00"]["mean_k"] == pytest.approx(oracle_mean_k(hit, sizes, 1.0))
    small = [0] + [menu.index(tuple(s)) for s in rep["humaneval_oracle"]["best_static_per_k_sets"]]
    assert [menu[c] for c in small[1:]] == [tuple(rep["best_static"][k]["set"]) for k in sorted(rep["best_static"])
                                            if tuple(rep["best_static"][k]["set"]) in menu]
    got = rep["humaneval_oracle"]["best_static_per_k"]["0.95"]
    assert got["mean_k"] == pytest.approx(oracle_mean_k(hit[:, small], sizes[small], 0.95))
    auc = rep["humaneval_oracle"]["predictor_auc"]
    assert set(auc["per_set"]) == {str(list(m)) for m in menu[1:]}
    vals = [a for a in auc["per_set"].values() if a is not None]
    assert auc["mean"] == pytest.approx(np.mean(vals)) and all(0 <= a <= 1 for a in vals)
    for c, m in enumerate(menu[1:], 1):  # None exactly where a set keeps or breaks all of dense's passes
        broke = ~hit[hit[:, 0], c]
        assert (auc["per_set"][str(list(m))] is None) == (broke.all() or not broke.any())
    # a ceiling: at least what the predictor reaches at any budget keeping as much
    kept = [r["humaneval"]["mean_k"] for r in rep["frontier"] if r["humaneval"]["pass@1"] >= 0.95 * rep["dense"]["humaneval"]["pass@1"]]
    assert rep["humaneval_oracle"]["menu"]["0.95"]["mean_k"] >= max(kept)


def test_best_static_sets_and_routers_agree_with_the_other_reports(built):
    rep, _ = built
    main = json.loads((RUN / "report.json").read_text())
    for k in (3, 5, 7):
        best = next(r for r in main["rows"] if r["method"] == "static" and r["k"] == k and r.get("best"))
        assert rep["best_static"][k]["set"] == best["set"] and rep["best_static"][k]["mc_average"] == pytest.approx(best["average"])
        routed = next(r for r in main["rows"] if r["method"] == "routed" and r["k"] == k and r["router"] == "hidden-task") if k < 7 else None
        if routed:
            mine = next(r for r in rep["routers"] if r["k"] == k and r["router"] == "hidden, task")
            assert mine["mc_average"] == pytest.approx(routed["average"])
    gen = json.loads((RUN / "generation.json").read_text())
    for r in rep["routers"]:
        other = next(p for p in gen["router_picks"] if p["k"] == r["k"] and p["router"] == r["router"])
        assert r["pass@1"] == pytest.approx(other["pass@1"])
    for m in rep["matched"]:
        for part in ("mc", "humaneval"):
            lo, hi = m[part]["ci95"]
            assert lo <= m[part]["adaptive_minus_static"] <= hi and m[part]["adaptive_mean_k"] >= m["k"]


def test_the_report_command_writes_its_files(tmp_path):
    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app

    args = ["train", "adaptive-report", str(RUN), "--gen", str(RUN / "generation"), "--model", "q", "--out", str(tmp_path / "a")]
    got = CliRunner().invoke(app, [*args, "--nll", str(tmp_path / "none.npz")])
    assert got.exit_code != 0 and isinstance(got.exception, PuddingError) and "--nll" in str(got.exception)
    got = CliRunner().invoke(app, [*args, "--speed", str(tmp_path / "none.json")])
    assert got.exit_code != 0 and isinstance(got.exception, PuddingError) and "--speed" in str(got.exception)
    got = CliRunner().invoke(app, [*args, "--extra", str(tmp_path)])  # no mc-extra data there
    assert got.exit_code != 0 and isinstance(got.exception, PuddingError) and "data-extra-train" in str(got.exception)
    got = CliRunner().invoke(app, args)
    assert got.exit_code == 0, got.output
    for name in ("adaptive.md", "adaptive.json", "predictor/predictor.json", "predictor/predictor.safetensors"):
        assert (tmp_path / "a" / name).is_file()
    # strict JSON: the open budgets are the strings "-inf" / "inf", not Infinity (other parsers refuse it)
    rep = json.loads((tmp_path / "a" / "adaptive.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert rep["frontier"][0]["budget"] == "-inf" and rep["frontier"][-1]["budget"] == "inf"
    assert read_predictor(tmp_path / "a" / "predictor", hidden_size=1536).sets[0] == []


def _depth_speed_file(path, blocks=28, ms=None, backend="cpu"):
    """A benchmarks/depth_speed.py JSON (its fields; the times made up)."""
    ms = ms or {0: 100.0, 3: 90.0, 5: 84.0}
    rows = [{"omitted": list(range(10, 10 + k)), "k": k, "ms_per_token": t,
             "speedup": {"median": ms[0] / t, "ci95": [ms[0] / t - 0.01, ms[0] / t + 0.01]}, "ideal": blocks / (blocks - k)}
            for k, t in ms.items() if k]
    path.write_text(json.dumps({"backend": backend, "blocks": blocks, "decode_prompt": 16, "decode_tokens": 8, "runs": 5,
                                "dense_ms_per_token": ms[0], "rows": rows}))
    return path


def test_the_measured_mix_is_dense_time_over_the_mean_time_of_the_depths_chosen(tmp_path):
    from pudding_mlx.train.adaptive import depth_speeds, depth_speeds_of, measured_mix, measured_mixes

    sp = depth_speeds(_depth_speed_file(tmp_path / "s.json"), 28)
    assert measured_mix(np.array([0, 3, 5, 5]), sp) == pytest.approx(100 / np.mean([100, 90, 84, 84]))
    assert measured_mix(np.array([0, 0]), sp) == 1.0
    assert measured_mix(np.array([0, 2]), sp) is None  # k = 2 was not measured: no figure rather than a guess
    assert measured_mix(np.array([3]), None) is None
    with pytest.raises(PuddingError, match="28 blocks"):
        depth_speeds(_depth_speed_file(tmp_path / "other.json", blocks=30), 28)
    with pytest.raises(PuddingError, match="second depth_speed.py result for backend cpu"):
        depth_speeds_of([tmp_path / "s.json", _depth_speed_file(tmp_path / "again.json")], 28)
    two = depth_speeds_of([tmp_path / "s.json", _depth_speed_file(tmp_path / "gpu.json", ms={0: 10.0, 3: 8.0}, backend="cuda")], 28)
    assert measured_mixes(np.array([3, 3]), two) == {"cpu": pytest.approx(100 / 90), "cuda": pytest.approx(10 / 8)}
    assert measured_mixes(np.array([5]), two) == {"cpu": pytest.approx(100 / 84), "cuda": None}  # k = 5 not timed on cuda
    (tmp_path / "junk.json").write_text('{"blocks": 28}')
    with pytest.raises(PuddingError, match="not a depth_speed.py result") as e:
        depth_speeds(tmp_path / "junk.json", 28)
    assert "\n" not in str(e.value)


def test_with_measured_depths_every_budget_gets_its_measured_mix(tmp_path):
    """build with --speed, one file per backend: each frontier row's measured mix on each backend follows its
    usage; dense is 1; the markdown shows a column per backend, the per-depth lines and the fastest budget that keeps
    95% of dense's HumanEval."""
    from pudding_mlx.train.adaptive import build, plot, to_markdown

    files = [_depth_speed_file(tmp_path / "s.json"), _depth_speed_file(tmp_path / "g.json", ms={0: 10.0, 3: 8.0, 5: 7.0}, backend="cuda")]
    rep, _ = build(RUN, RUN / "generation", "q", speed_files=files)
    plot(rep, tmp_path / "a.png")  # the measured-mix line drawn beside the ideal one
    assert (tmp_path / "a.png").stat().st_size > 10_000
    assert sorted(set(rep["sizes"])) == [0, 3, 5]
    for r in rep["frontier"]:
        for part in ("mc", "humaneval"):
            usage = r[part]["usage"]
            k_of = {("dense" if not m else "omit-" + "-".join(map(str, m))): len(m) for m in rep["menu"]}
            for backend, ms in (("cpu", {0: 100.0, 3: 90.0, 5: 84.0}), ("cuda", {0: 10.0, 3: 8.0, 5: 7.0})):
                times = [ms[k_of[name]] for name, c in usage.items() for _ in range(c)]
                assert r[part]["speedup_measured_mix"][backend] == pytest.approx(ms[0] / np.mean(times))
    assert next(r for r in rep["frontier"] if r["budget"] == -math.inf)["mc"]["speedup_measured_mix"] == {"cpu": 1.0, "cuda": 1.0}
    f95 = rep["targets"]["humaneval_95_fastest"]
    kept = [r for r in rep["frontier"] if r["humaneval"]["pass@1"] >= 0.95 * rep["dense"]["humaneval"]["pass@1"]]
    assert f95["speedup_ideal"] == max(r["humaneval"]["speedup_ideal"] for r in kept) and f95["pass@1"] >= 0.95 * rep["dense"]["humaneval"]["pass@1"]
    md = to_markdown(rep)
    assert "MC measured mix (cpu)" in md and "HE measured mix (cuda)" in md and "k = 3 [10, 11, 12] 1.111" in md
    assert "k = 3 [10, 11, 12] 1.250" in md and "The fastest budget that keeps 95% of dense's HumanEval" in md


def test_depth_speed_measures_what_the_report_reads(tmp_path, monkeypatch, tiny_llm_dir):
    """benchmarks/depth_speed.py on a real (tiny) model directory: each set's speedup is the median of dense's time
    over its own, round by round, from the times it records; `train.adaptive.depth_speeds` reads its JSON back
    (the round trip the report relies on); a set outside the model is one line."""
    import importlib.util

    from pudding_mlx.bench import interval
    from pudding_mlx.train.adaptive import depth_speeds

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))  # it imports skip_speed, as when run from the repository root
    spec = importlib.util.spec_from_file_location("depth_speed", bench / "depth_speed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "speed.json"
    res = script.main([str(tiny_llm_dir), "--omit", "1;1,2", "--runs", "3", "--decode-tokens", "2", "--json", str(out)])
    assert [r["omitted"] for r in res["rows"]] == [[1], [1, 2]] and len(res["times_s"]["dense"]) == 3
    for r in res["rows"]:
        ratios = [d / t for d, t in zip(res["times_s"]["dense"], res["times_s"][",".join(map(str, r["omitted"]))])]
        assert r["speedup"]["median"] == pytest.approx(interval(ratios)["median"])
    sp = depth_speeds(out, res["blocks"])
    assert sorted(sp["ms"]) == [0, 1, 2] and sp["dense_ms"] == pytest.approx(res["dense_ms_per_token"])
    assert sp["speedup"][2]["omitted"] == [1, 2]
    with pytest.raises(SystemExit) as e:
        script.main([str(tiny_llm_dir), "--omit", "99", "--runs", "1"])
    assert "depth_speed:" in str(e.value) and "\n" not in str(e.value)


def test_the_committed_measured_mix_is_the_benchmarks_times_weighted_by_the_routing(built):
    """With the committed CPU timing (benchmarks/depth_speed.py): every frontier row's measured mix is dense's
    median time over the usage-weighted mean of the measured depths' median times, read from the raw JSON."""
    rep, _ = built
    raw = json.loads(SPEED.read_text())
    ms = {0: raw["dense_ms_per_token"], **{r["k"]: r["ms_per_token"] for r in raw["rows"]}}
    k_of = {("dense" if not m else "omit-" + "-".join(map(str, m))): len(m) for m in rep["menu"]}
    for r in rep["frontier"]:
        for part in ("mc", "humaneval"):
            times = [ms[k_of[name]] for name, c in r[part]["usage"].items() for _ in range(c)]
            assert r[part]["speedup_measured_mix"][raw["backend"]] == pytest.approx(ms[0] / np.mean(times))
    assert rep["speed"]["depths"][0]["backend"] == raw["backend"] and set(rep["speed"]["depths"][0]["ms"]) == set(ms)


def test_the_code_static_baseline_is_chosen_on_training_code_replies_and_scored_on_its_records(built):
    """The second static baseline for HumanEval: per k, the set of lowest mean generation loss on agree.npz's
    training-split code replies (recomputed here from the raw arrays, val and task replies left out), among
    the sets with HumanEval results; its pass@1 is its committed records', and the interval holds the delta."""
    from pudding_mlx.train.adaptive import _key, basis_of, nll_source
    from pudding_mlx.train import generation_report as G

    rep, _ = built
    src = nll_source(AGREE, basis_of(RUN))
    gen_sets = G.load_sets(RUN / "generation")
    he = {_key(s["omitted"]): s for s in gen_sets.values() if s["omitted"]}
    rows = (src["split"] == "train") & (src["kind"] == "code")
    loss = src["losses"][rep["predictor"]["gen_loss"]][rows].mean(0)
    ids = [r["task_id"] for r in gen_sets["dense"]["humaneval"]["records"]]
    assert rep["matched_code_static"] and {r["k"] for r in rep["matched_code_static"]} <= set(rep["best_static"])
    for r in rep["matched_code_static"]:
        same_k = [i for i, s in enumerate(src["sets"]) if len(s) == r["k"] and s in he]
        assert _key(r["set"]) == src["sets"][min(same_k, key=lambda i: loss[i])]
        assert r["train_loss"] == pytest.approx(loss[src["sets"].index(_key(r["set"]))])
        assert r["static"] == pytest.approx(100 * G.passed(he[_key(r["set"])], ids).mean())
        lo, hi = r["ci95"]
        assert lo <= r["adaptive_minus_static"] <= hi
        # the adaptive side is the main table's at that k
        main = next(m for m in rep["matched"] if m["k"] == r["k"])
        assert r["adaptive"] == main["humaneval"]["adaptive"]


# -- the healed menu (issue #23: "healed sets where healing provides them") ------------------------------------


def test_join_sets_replaces_the_columns_both_hold_only_when_asked():
    from pudding_mlx.train.report import join_sets

    def data(sets, base):
        n = 4
        cols = {k: np.arange(n * len(sets), dtype=float).reshape(n, len(sets)) + base
                for k in ("correct", "correct_norm", "y", "hit", "margin")}
        return {"task": np.array(["piqa"] * n), "id": np.arange(n), "sets": sets, "dense_hit": np.ones(n), **cols}

    a, b = data([(1,), (2, 3)], 0.0), data([(2, 3), (4,)], 100.0)
    kept, replaced = join_sets(a, b, "b"), join_sets(a, b, "b", replace=True)
    for got in (kept, replaced):
        assert got["sets"] == [(1,), (2, 3), (4,)] and np.array_equal(got["hit"][:, 2], b["hit"][:, 1])
        assert np.array_equal(got["hit"][:, 0], a["hit"][:, 0]) and np.array_equal(got["dense_hit"], a["dense_hit"])
    assert np.array_equal(kept["margin"][:, 1], a["margin"][:, 1])
    assert np.array_equal(replaced["margin"][:, 1], b["margin"][:, 0])
    assert np.array_equal(a["margin"][:, 1], np.arange(4) * 2 + 1.0)  # the input is left as it was


def test_nll_source_healed_takes_the_pools_healed_nll_and_only_the_nll_loss(tmp_path):
    from pudding_mlx.train.adaptive import nll_source

    n, sets = 6, ("", "5,9", "5,9,13")
    tokens = np.arange(10, 10 + n, dtype=np.float32)
    healed = np.stack([np.stack([1.25 * tokens, tokens], -1), np.stack([4.0 * tokens, tokens], -1)], 1)
    unhealed = np.stack([np.stack([1.0 * tokens, tokens], -1), np.stack([1.5 * tokens, tokens], -1),
                         np.stack([2.5 * tokens, tokens], -1)], 1)
    agree = np.concatenate([unhealed, unhealed[..., 1:], unhealed[..., 1:]], -1)  # agreement columns: ignored healed
    _write_nll(tmp_path / "nll.npz", n=n, sets=sets, unhealed=agree.astype(np.float32),
               pool=np.array(["5,9,13", "6,7,8"]), healed=healed.astype(np.float32))
    plain = nll_source(tmp_path / "nll.npz", _basis())
    got = nll_source(tmp_path / "nll.npz", _basis(), healed=True)
    assert "agree" in plain["losses"] and set(got["losses"]) == {"nll"} and got["verbatim"] is None
    assert got["sets"] == [(), (5, 9), (5, 9, 13), (6, 7, 8)] and got["healed_sets"] == [(5, 9, 13), (6, 7, 8)]
    assert np.allclose(got["loss"][:, 1], plain["loss"][:, 1])  # not in the pool: unhealed
    assert np.allclose(got["loss"][:, 2], 0.25) and np.allclose(plain["loss"][:, 2], 1.5)
    assert np.allclose(got["loss"][:, 3], 3.0)  # a pool set the unhealed columns lack joins
    _write_nll(tmp_path / "bare.npz", pool=None, healed=None)
    with pytest.raises(PuddingError, match="no 'healed' and 'pool' arrays"):
        nll_source(tmp_path / "bare.npz", _basis(), healed=True)
    # with agreement on both sides (heal_gpu.py agree-healed), the healed columns give the agree loss too
    first = np.stack([tokens, tokens // 2], -1)  # dense's reply decoded whole; (5, 9, 13) healed departs halfway
    healed4 = np.concatenate([healed, np.stack([first, first], 1)], -1)
    _write_nll(tmp_path / "agree-healed.npz", n=n, sets=sets, unhealed=agree.astype(np.float32),
               pool=np.array(["5,9,13", "6,7,8"]), healed=healed4.astype(np.float32))
    both = nll_source(tmp_path / "agree-healed.npz", _basis(), healed=True)
    assert set(both["losses"]) == {"nll", "agree"} and np.allclose(both["loss"][:, 2], 0.25)
    assert np.allclose(both["losses"]["agree"][:, 2], 1 - (tokens // 2) / tokens)
    assert np.allclose(both["losses"]["agree"][:, 1], plain["losses"]["agree"][:, 1])
    assert not both["verbatim"][:, 2].any() and both["verbatim"][:, 1].all()


@pytest.fixture(scope="module")
def built_healed():
    from pudding_mlx.train.adaptive import build

    return build(RUN, RUN / "generation", "qwen2.5-coder-1.5b", nll_path=NLL, extra=EXTRA, healed=EXTRA,
                 speed_files=SPEEDS)


def test_the_healed_menu_runs_the_pools_sets_healed_and_the_rest_as_before(built_healed, built):
    """Checked against the heal report (its own code over the same files): every menu set of the pool has the
    healed MC average and HumanEval pass@1 the heal report gives it; every other set keeps the unhealed report's.
    The best static set per k is chosen over the same (healed) columns, the fixed-k routers (unhealed) are left
    out, and the predictor says which of its sets are healed."""
    from pudding_mlx.train.adaptive import to_markdown

    rep, predictor = built_healed
    heal = json.loads((EXTRA / "heal_report.json").read_text())
    mc = {r["set"]: r["healed"] for r in heal["mc_pool_all"]["sets"]}
    he = {r["set"]: r["healed"] for r in heal["humaneval"]["sets"]}
    name = lambda s: "omit-" + "-".join(map(str, s))  # noqa: E731
    healed = [s for s in rep["menu"] if name(s) in he]
    assert rep["healed"]["sets"] == healed and predictor.settings["healed_sets"] == healed
    assert [13, 14, 15] in healed and len(healed) == len(he)  # every pool set is in the menu
    unhealed = {tuple(r["set"]): r for r in built[0]["statics"]}
    for r in rep["statics"]:
        if r["set"] in healed:
            assert r["mc_average"] == pytest.approx(mc[name(r["set"])], abs=1e-9)
            assert r["pass@1"] == pytest.approx(he[name(r["set"])], abs=1e-9)
        elif tuple(r["set"]) in unhealed:
            assert (r["mc_average"], r["pass@1"]) == (unhealed[tuple(r["set"])]["mc_average"],
                                                      unhealed[tuple(r["set"])]["pass@1"])
    best3 = rep["best_static"][3]
    assert best3["set"] in healed and best3["mc_average"] == pytest.approx(mc[name(best3["set"])])
    assert rep["routers"] == [] and rep["predictor"]["gen_loss"] == "nll"
    assert rep["predictor"]["sources"] == ["mc-train", "nll-healed"] and "Healed menu" in to_markdown(rep)


def test_with_healed_agreement_the_healed_menus_generation_loss_is_chosen_as_the_unhealed_ones(tmp_path):
    """What heal_gpu.py agree-healed will bring (here: the committed nll.npz with made-up agreement columns on both
    sides, as in the unhealed test above): the healed menu then tries both generation losses and keeps the one
    its held-out replies prefer, and the report says the healed columns had agreement."""
    from pudding_mlx.train.adaptive import GEN_LOSSES, build, to_markdown

    with np.load(NLL, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert str(arrays["sets"][0]) == ""  # dense's column
    dense = (arrays["unhealed"][..., 0] / arrays["unhealed"][..., 1])[:, :1]

    def with_agreement(u):
        per_tok = u[..., 0] / u[..., 1]
        first = np.floor(u[..., 1] * np.clip(1.2 - (per_tok - dense), 0, 1))
        return np.concatenate([u, first[..., None], first[..., None]], -1).astype(np.float32)

    arrays["unhealed"], arrays["healed"] = with_agreement(arrays["unhealed"]), with_agreement(arrays["healed"])
    write_npz(tmp_path / "agree-healed.npz", **arrays)
    rep, predictor = build(RUN, RUN / "generation", "q", nll_path=tmp_path / "agree-healed.npz", extra=EXTRA,
                           healed=EXTRA)
    p = rep["predictor"]
    assert set(p["gen_loss_area"]) == set(GEN_LOSSES) and p["gen_loss"] == max(GEN_LOSSES, key=p["gen_loss_area"].get)
    assert rep["healed"]["gen"] == "reply NLL and greedy agreement" and "greedy agreement)" in to_markdown(rep)
    assert predictor.settings["healed_sets"] == rep["healed"]["sets"] and len(rep["healed"]["sets"]) == 14


def test_the_healed_menu_needs_one_pool_in_every_source(tmp_path):
    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app
    from pudding_mlx.train.adaptive import build

    with np.load(NLL, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    write_npz(tmp_path / "nll.npz", **dict(arrays, pool=arrays["pool"][1:], healed=arrays["healed"][:, 1:]))
    with pytest.raises(PuddingError, match="not the same pool"):
        build(RUN, RUN / "generation", "q", nll_path=tmp_path / "nll.npz", extra=EXTRA, healed=EXTRA)
    got = CliRunner().invoke(app, ["train", "adaptive-report", str(RUN), "--gen", str(RUN / "generation"), "--model",
                                   "q", "--out", str(tmp_path / "a"), "--healed", str(tmp_path)])
    assert isinstance(got.exception, PuddingError) and "--healed" in str(got.exception)
    assert "data-healed-train" in str(got.exception) and not (tmp_path / "a").exists()
