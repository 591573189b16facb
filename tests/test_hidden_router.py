"""The hidden-state router on the MLX side: the block output it reads equals a hand-run of the
blocks; the routed prefill (blocks 0..after once, then the chosen set from there, their KV reused)
generates exactly what the chosen set generates from scratch; and on a model converted from the
training side's PyTorch model, it pools the same states and picks the same sets as `train predict`."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.base import create_attention_mask

from pudding_mlx.hidden_router import HiddenRouter, block_output, routed_prefill
from helpers import tiny_model
from pudding_mlx.skip import SkipView


def _router(model, after, sets, weight=None, pooling="mean+last", margin_is="-inf (always argmax)", margin=None):
    hidden = model.args.hidden_size
    pools = len(pooling.split("+"))
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(size=(len(sets), hidden * pools)).astype(np.float32)) if weight is None else weight
    settings = {"after": after, "pooling": pooling, "fallback": 0, "margin": margin, "margin_is": margin_is,
                "max_tokens": 4096, "sets": sets}
    return HiddenRouter(model, None, settings, w, mx.zeros((len(sets),)), path=None)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_block_output_is_the_blocks_run_by_hand(family):
    model = tiny_model(family, seed=1)
    mx.eval(model.parameters())
    ids = mx.array([[5, 9, 200, 17, 3, 44, 8]])
    h = model.model.embed_tokens(ids)
    for layer in model.model.layers[:3]:
        h = layer(h, create_attention_mask(h, None), None)
    np.testing.assert_allclose(np.array(block_output(model, ids, 2)), np.array(h), atol=1e-5)


def _greedy(view, prompt, cache, n=12):
    out = []
    for (tok, _), _ in zip(generate_step(mx.array(prompt), view, max_tokens=n, prompt_cache=cache), range(n)):
        out.append(int(tok))
    return out


@pytest.mark.parametrize("family,speculate", [("llama", False), ("llama", True), ("qwen2", True), ("qwen3", False)])
def test_routed_prefill_equals_the_chosen_set_from_scratch(family, speculate):
    # the fallback set (candidate 0) is built as a lazy graph before the decision (speculate: and
    # queued); every other pick is a miss whose graph or work must leave no trace in what the
    # chosen set generates
    model = tiny_model(family, seed=2)
    mx.eval(model.parameters())
    sets = [[3, 4], [2, 5], [4], []]
    prompt = [int(x) for x in np.random.default_rng(1).integers(3, 400, 23)]
    for pick in range(len(sets)):  # force each candidate through the weights: only `pick` scores
        weight = mx.zeros((len(sets), model.args.hidden_size * 2))
        bias = mx.array([1.0 if m == pick else 0.0 for m in range(len(sets))])
        router = _router(model, after=1, sets=sets, weight=weight)
        router.bias = bias
        candidate, scores, ms, omitted, cache = routed_prefill(model, router, prompt, sets, speculate=speculate)
        assert candidate == pick and omitted == tuple(sets[pick]) and ms > 0
        view = SkipView(model, omitted)
        assert len(cache) == len(view.kept) and all(c.offset == len(prompt) - 1 for c in cache)
        got = _greedy(view, prompt[-1:], cache)
        want = _greedy(view, prompt, view.make_cache())
        assert got == want


def test_routed_prefill_scores_equal_a_separate_routing_pass():
    model = tiny_model("llama", seed=4)
    mx.eval(model.parameters())
    sets = [[3], [4], [2, 5]]
    router = _router(model, after=1, sets=sets)
    prompt = list(range(10, 40))
    _, scores, _, _, _ = routed_prefill(model, router, prompt, sets)
    _, separate, _ = router.best_ids(prompt)
    np.testing.assert_allclose(scores, separate, rtol=1e-5, atol=1e-5)


def test_a_set_that_omits_the_routers_block_is_refused():
    from pudding_mlx.errors import PuddingError

    model = tiny_model("llama", seed=4)
    router = _router(model, after=2, sets=[[2, 4]], margin_is="-inf (always argmax)")
    with pytest.raises(PuddingError, match="omits block 2"):
        routed_prefill(model, router, list(range(10, 20)), [[2, 4]])


def test_decision_rule():
    model = tiny_model("llama", seed=4)
    r = _router(model, 1, [[3], [4], [5]], margin_is="finite", margin=0.5)
    assert r.decide([0.0, 0.4, 0.2]) == 0 and r.decide([0.0, 0.6, 0.2]) == 1
    r = _router(model, 1, [[3], [4], [5]], margin_is="+inf (always static)")
    assert r.decide([0.0, 9.0, 0.2]) == 0
    r = _router(model, 1, [[3], [4], [5]], margin_is="-inf (always argmax)")
    assert r.decide([0.0, 0.01, -1.0]) == 1
    assert r.decide([float("nan"), 0.01, 0.01]) == 1  # NaN never wins; ties: the first maximum


@pytest.fixture(scope="module")
def probe_bundle(tiny_hf_dir, tmp_path_factory):
    """The whole path on a tiny random llama: PyTorch router data + features + PCA + probe router
    (train side), the same weights converted to MLX, and a bundle of the two."""
    from pathlib import Path

    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app

    tmp = tmp_path_factory.mktemp("probe-bundle")
    data_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
    cand = tmp / "cand.json"
    cand.write_text(json.dumps([[3], [4], [3, 5], [2, 4]]))
    run = CliRunner()
    env = {"PUDDING_MLX_DATA": str(data_dir)}
    for args in (["train", "data", str(tiny_hf_dir), "--candidates", str(cand), "--tasks", "arc_easy,piqa,hellaswag",
                  "--max-per-task", "40", "--out", str(tmp / "d")],
                 ["train", "features", str(tiny_hf_dir), "--data", str(tmp / "d"), "--after", "auto",
                  "--candidates", str(cand)],
                 ["train", "pca", "--fit", str(tmp / "d"), "--dim", "16"],
                 ["train", "router", str(tmp / "d"), "--candidates", str(cand), "--variant", "probe",
                  "--objective", "centered", "--out", str(tmp / "r")],
                 ["train", "predict", str(tmp / "r"), "--data", str(tmp / "d"), "--out", str(tmp / "p.npz")],
                 ["convert", "llm", str(tiny_hf_dir), str(tmp / "mlx"), "--dtype", "float32"],
                 ["convert", "bundle", "--llm", str(tmp / "mlx"), "--router", str(tmp / "r"),
                  "--candidates", str(cand), str(tmp / "b")]):
        result = run.invoke(app, args, env=env)
        assert result.exit_code == 0, (args, result.output)
    return tmp


def test_the_training_side_writes_what_the_runtime_reads(probe_bundle):
    """train router --variant probe: router.json names the block, the sets and the rule; the folder
    has the usual permissions; head.safetensors is the folded [M, hidden x pools] map; train predict
    writes one score row and one decision per text."""
    from safetensors.numpy import load_file

    meta = json.loads((probe_bundle / "r" / "router.json").read_text())
    assert meta["kind"] == "hidden" and meta["after"] == 1 and meta["sets"] == [[3], [4], [3, 5], [2, 4]]
    assert meta["objective"] == "centered" and meta["validation"]["n_val"] > 0
    assert (probe_bundle / "r").stat().st_mode & 0o777 == 0o755
    head = load_file(str(probe_bundle / "r" / "head.safetensors"))
    pools = len(meta["pooling"].split("+"))
    assert head["weight"].shape == (4, 64 * pools) and head["bias"].shape == (4,)  # tiny model: hidden 64
    with np.load(probe_bundle / "p.npz") as z:
        assert z["scores"].shape == (120, 4) and set(z["chosen"].tolist()) <= {0, 1, 2, 3}


def test_parity_with_the_training_side(probe_bundle):
    """The MLX router reads the same pooled states as the PyTorch features and picks the same set
    as `train predict` (issue target: >= 98% of texts)."""
    from pudding_mlx.load import load
    from pudding_mlx.train.router_data import load_router_data

    loaded = load(str(probe_bundle / "b"), dtype="float32")
    router = loaded.router
    assert router.kind == "hidden" and router.after == 1
    data = load_router_data(probe_bundle / "d")
    with np.load(probe_bundle / "d" / "features.npz") as z:
        torch_mean = z["mean_1"].astype(np.float32)
    with np.load(probe_bundle / "p.npz") as z:
        torch_chosen = z["chosen"]
    same, worst = 0, 0.0
    for i, text in enumerate(data["text"]):
        h = block_output(loaded.model, mx.array([router.prompt_ids(text)]), router.after)
        worst = max(worst, float(np.abs(np.array(h[0].astype(mx.float32)).mean(0) - torch_mean[i]).max()))
        same += router.best(text)[0] == int(torch_chosen[i])
    assert worst < 2e-2  # torch's features are stored as float16
    assert same / len(data["text"]) >= 0.98, (same, len(data["text"]))


def test_bundle_generates_with_the_free_routed_prefill(probe_bundle):
    """`generate --json` on the hidden-router bundle routes on the prompt's own blocks 0..after,
    and produces exactly what `--omit <the chosen set>` produces."""
    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app

    run = CliRunner()
    routed = run.invoke(app, ["generate", str(probe_bundle / "b"), "-p", "Why is the sky blue?", "-m", "8",
                              "--json", "--dtype", "float32"])
    assert routed.exit_code == 0, routed.output
    r = json.loads(routed.stdout.strip().splitlines()[-1])
    assert r["routing"] == "routed" and r["routed_prefill"] and r["router_ms"] > 0 and len(r["scores"]) == 4
    omit = ",".join(map(str, r["omitted"])) or None
    fixed = run.invoke(app, ["generate", str(probe_bundle / "b"), "-p", "Why is the sky blue?", "-m", "8",
                             "--json", "--dtype", "float32"] + (["--omit", omit] if omit else ["--dense"]))
    f = json.loads(fixed.stdout.strip().splitlines()[-1])
    assert f["token_ids"] == r["token_ids"] and f["prompt_tokens"] == r["prompt_tokens"]
    info = run.invoke(app, ["route", str(probe_bundle / "b"), "-p", "Why is the sky blue?", "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["candidate"] == r["candidate"]
    shown = run.invoke(app, ["info", str(probe_bundle / "b"), "--json"])
    assert shown.exit_code == 0, shown.output
    router = json.loads(shown.stdout)["router"]
    assert router["kind"] == "hidden" and router["after"] == 1 and router["outputs"] == 4
    assert json.loads((probe_bundle / "b" / "pudding.json").read_text())["schema_version"] == 2
