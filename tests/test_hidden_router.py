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


# -- the training side and the runtime on one model ------------------------------------------------

SETS = [[3], [4], [3, 5], [2, 4]]
# The relabelled router data (below): each task's best set; set 1, fair on every task, is the best
# static set, so the routers fall back to it for hellaswag (a guess hit) and leave it for the others.
BEST = {"arc_easy": 0, "piqa": 2, "hellaswag": 1}
# One router per pooling; mean+last with the task objective is what the shipped preset runs.
ROUTERS = {"mean": "accuracy", "last": "accuracy", "mean+last": "task"}
# |MLX score - train predict's score|: PyTorch's features pass through float16 twice (features.npz,
# features_pca.npz); measured at most 5e-4 on this fixture, for scores spread ~0.4 over the sets.
TOL = 2e-3


def _relabel(data_dir):
    """Replace the router data's hits (correct, correct_norm) with seeded draws in which each task
    has its own best set (BEST, 85% correct), set 1 is fair everywhere (50%) and the rest poor (30%).

    A random tiny model answers about equally under every set, so its own hits hold nothing to
    learn: every router trained on them always falls back (margin +inf), and a parity test on such
    a router passes whatever its head, bias or pooling compute. The texts, y and features stay
    the model's own."""
    path = data_dir / "router_data.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    rate = np.full(arrays["correct"].shape, 0.3)
    rate[:, 1] = 0.5
    for task, best in BEST.items():
        rate[arrays["task"] == task, best] = 0.85
    hit = np.random.default_rng(0).random(rate.shape) < rate
    arrays["correct"] = arrays["correct_norm"] = hit
    np.savez(path, **arrays)


def _context_sensitive(hf_dir, out):
    """`hf_dir`'s model with its blocks' matrices scaled by 4 (as `helpers.tiny_model` does): with
    transformers' initialisation the tiny model answers every prompt under every set with the same
    token ("\\n" forever), so generated tokens could not tell one set's prefill from another's."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.ndim == 2:
                p.mul_(4)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(hf_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def probe_bundle(tiny_hf_dir, tmp_path_factory):
    """The whole path on a tiny random llama (`_context_sensitive`, in hf/): PyTorch router data
    (hits relabelled, `_relabel`) + features + PCA + one probe router per pooling (train side), the
    same weights converted to MLX (float32, and 4-bit with float16 scales as the default preset's
    GGUF becomes), and bundles: b-<pooling> (float32 LLM), b-q4 (4-bit LLM, the mean+last router)."""
    import functools
    from pathlib import Path

    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app
    from pudding_mlx.train import probe

    tmp = tmp_path_factory.mktemp("probe-bundle")
    data_dir = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
    cand = tmp / "cand.json"
    cand.write_text(json.dumps(SETS))
    run = CliRunner()
    hf = _context_sensitive(tiny_hf_dir, tmp / "hf")

    def invoke(*args):
        args = [str(a) for a in args]
        result = run.invoke(app, args, env={"PUDDING_MLX_DATA": str(data_dir)})
        assert result.exit_code == 0, (args, result.output)

    invoke("train", "data", hf, "--candidates", cand, "--tasks", "arc_easy,piqa,hellaswag",
           "--max-per-task", "40", "--out", tmp / "d")
    _relabel(tmp / "d")
    invoke("train", "features", hf, "--data", tmp / "d", "--after", "auto", "--candidates", cand)
    invoke("train", "pca", "--fit", tmp / "d", "--dim", "16")
    invoke("convert", "llm", hf, tmp / "mlx", "--dtype", "float32")
    invoke("convert", "llm", hf, tmp / "mlx-q4", "--quantize", "4", "--dtype", "float16")
    real = probe.train_probe
    for pooling, objective in ROUTERS.items():
        # the CLI chooses the pooling on validation; here each router is held to one (ridge and
        # margin are still chosen by the CLI's own selection)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(probe, "train_probe", functools.partial(real, poolings=(pooling,)))
            invoke("train", "router", tmp / "d", "--candidates", cand, "--variant", "probe",
                   "--objective", objective, "--out", tmp / f"r-{pooling}")
        invoke("train", "predict", tmp / f"r-{pooling}", "--data", tmp / "d", "--out", tmp / f"p-{pooling}.npz")
        invoke("convert", "bundle", "--llm", tmp / "mlx", "--router", tmp / f"r-{pooling}",
               "--candidates", cand, tmp / f"b-{pooling}")
    invoke("convert", "bundle", "--llm", tmp / "mlx-q4", "--router", tmp / "r-mean+last",
           "--candidates", cand, tmp / "b-q4")
    return tmp


def _margin(meta):
    return {"finite": meta["margin"]}.get(meta["margin_is"], np.inf if meta["margin_is"].startswith("+inf") else -np.inf)


def test_the_training_side_writes_what_the_runtime_reads(probe_bundle):
    """train router --variant probe: router.json names the block, the sets and the rule; the folder
    has the usual permissions; head.safetensors is the folded [M, hidden x pools] map, which on the
    raw features gives train predict's scores; train predict decides by router.json's rule."""
    from safetensors.numpy import load_file

    from pudding_mlx.train import probe

    with np.load(probe_bundle / "d" / "features.npz") as z:
        raw = {k: z[k].astype(np.float32) for k in ("mean_1", "last_1")}
    # the two poolings differ (their order matters): a mean and a last state as far apart as the states are large
    assert np.abs(raw["mean_1"] - raw["last_1"]).mean() > 0.5 * np.abs(raw["last_1"]).mean()
    for pooling, objective in ROUTERS.items():
        meta = json.loads((probe_bundle / f"r-{pooling}" / "router.json").read_text())
        assert meta["kind"] == "hidden" and meta["after"] == 1 and meta["sets"] == SETS
        assert meta["pooling"] == pooling and meta["objective"] == objective
        assert meta["validation"]["n_val"] > 0 and meta["fallback"] == 1  # set 1: the best on average
        assert meta["validation"]["accuracy"] > meta["validation"]["static_accuracy"], meta["validation"]
        assert (probe_bundle / f"r-{pooling}").stat().st_mode & 0o777 == 0o755
        head = load_file(str(probe_bundle / f"r-{pooling}" / "head.safetensors"))
        pools = pooling.split("+")
        assert head["weight"].shape == (4, 64 * len(pools)) and head["bias"].shape == (4,)  # tiny model: hidden 64
        with np.load(probe_bundle / f"p-{pooling}.npz") as z:
            scores, chosen = z["scores"], z["chosen"]
        assert scores.shape == (120, 4) and chosen.shape == (120,)
        np.testing.assert_array_equal(chosen, probe.decide(scores, meta["fallback"], _margin(meta)))
        folded = np.concatenate([raw[f"{p}_1"] for p in pools], axis=1) @ head["weight"].T + head["bias"]
        assert np.abs(folded - scores).max() < TOL, (pooling, np.abs(folded - scores).max())


@pytest.mark.parametrize("pooling", list(ROUTERS))
def test_parity_with_the_training_side(probe_bundle, pooling):
    """The MLX router reads the same pooled states as the PyTorch features, scores every text as
    `train predict` does (within TOL) and picks the same set (issue target: >= 98% of texts; a
    text decided otherwise must be a near-tie). Each router ranks: its margin is not +inf and its
    choices follow the prompt (three sets, the fallback for some texts only)."""
    from pudding_mlx.load import load
    from pudding_mlx.train.router_data import load_router_data

    loaded = load(str(probe_bundle / f"b-{pooling}"), dtype="float32")
    router = loaded.router
    meta = json.loads((probe_bundle / f"r-{pooling}" / "router.json").read_text())
    assert router.kind == "hidden" and router.after == 1 and router.pooling == pooling
    assert not meta["margin_is"].startswith("+inf"), meta["margin_is"]
    data = load_router_data(probe_bundle / "d")
    with np.load(probe_bundle / "d" / "features.npz") as z:
        torch_mean = z["mean_1"].astype(np.float32)
    with np.load(probe_bundle / f"p-{pooling}.npz") as z:
        torch_scores, torch_chosen = z["scores"], z["chosen"]
    ours, chosen, worst = [], [], 0.0
    for i, text in enumerate(data["text"]):
        h = block_output(loaded.model, mx.array([router.prompt_ids(text)]), router.after)
        worst = max(worst, float(np.abs(np.array(h[0].astype(mx.float32)).mean(0) - torch_mean[i]).max()))
        candidate, scores, _ = router.best(text)
        chosen.append(candidate)
        ours.append(scores)
    ours, chosen = np.array(ours), np.array(chosen)
    assert worst < 2e-2  # torch's features are stored as float16
    assert np.abs(ours - torch_scores).max() < TOL, np.abs(ours - torch_scores).max()
    assert len(set(torch_chosen.tolist())) >= 3 and 0.1 < np.mean(torch_chosen == router.fallback) < 0.9, \
        np.bincount(torch_chosen, minlength=4)
    same = chosen == torch_chosen
    assert same.mean() >= 0.98, (int(same.sum()), len(same))
    for i in np.flatnonzero(~same):  # a near-tie: at the margin, or between the two best sets
        s = np.sort(torch_scores[i])
        gain = torch_scores[i].max() - torch_scores[i, router.fallback]
        assert min(abs(gain - router.margin), s[-1] - s[-2]) < 2 * TOL, (i, torch_scores[i])


def _hit_and_miss(bundle, texts, dtype=None, lossless=True):
    """`generate --json` on a hidden-router bundle for a prompt whose router picks the fallback set
    (whose graph the routed prefill builds before the decision: a guess hit) and one whose router
    picks another (a miss): routed on the prompt's own blocks 0..after, each produces exactly what
    `--omit <the chosen set>` produces (and not what dense produces), `route` picks the same set,
    and `--lossless` routes the same way and produces the dense model's tokens."""
    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app
    from pudding_mlx.load import load

    router = load(str(bundle), dtype=dtype).router
    picks = {}
    for text in texts:
        candidate = router.best(text)[0]
        picks.setdefault(candidate == router.fallback, (text, candidate))
        if len(picks) == 2:
            break
    assert set(picks) == {True, False}, picks
    run = CliRunner()
    opts = ["-m", "8", "--json"] + (["--dtype", dtype] if dtype else [])

    def generate(prompt, *args):
        done = run.invoke(app, ["generate", str(bundle), "-p", prompt, *opts, *args])
        assert done.exit_code == 0, done.output
        return json.loads(done.stdout.strip().splitlines()[-1])

    for hit, (prompt, candidate) in picks.items():
        r = generate(prompt)
        assert r["routing"] == "routed" and r["routed_prefill"] and r["router_ms"] > 0 and len(r["scores"]) == 4
        assert r["candidate"] == candidate and (candidate == router.fallback) == hit
        omit = ",".join(map(str, r["omitted"]))
        f = generate(prompt, "--omit", omit)
        assert f["token_ids"] == r["token_ids"] and f["prompt_tokens"] == r["prompt_tokens"]
        dense = generate(prompt, "--dense")["token_ids"]
        assert dense != r["token_ids"]  # the tokens tell the sets apart (see _context_sensitive)
        info = run.invoke(app, ["route", str(bundle), "-p", prompt, "--json"])
        assert info.exit_code == 0, info.output
        assert json.loads(info.stdout)["candidate"] == candidate
        if lossless:
            drafted = generate(prompt, "--lossless")
            assert drafted["candidate"] == candidate and "routed_prefill" not in drafted
            assert drafted["token_ids"] == dense
    return picks


def test_bundle_generates_with_the_free_routed_prefill(probe_bundle):
    """`_hit_and_miss` on the float32 bundle of the preset's pooling (mean+last); `info` describes
    the hidden router and the manifest is schema 2."""
    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app
    from pudding_mlx.train.router_data import load_router_data

    bundle = probe_bundle / "b-mean+last"
    picks = _hit_and_miss(bundle, load_router_data(probe_bundle / "d")["text"], dtype="float32")
    # the footer says what the routed prefill's time is (issue: a 12-second "router" that was the prefill)
    prompt, candidate = picks[True]
    done = CliRunner().invoke(app, ["generate", str(bundle), "-p", prompt, "-m", "2", "--dtype", "float32"])
    assert done.exit_code == 0, done.output
    footer = " ".join(done.output.split())
    assert f"Route: candidate {candidate}: omitted" in footer and "blocks), chosen inside the prefill" in footer
    assert ("routed prefill: blocks 0-1 ran the prompt and the router's head read their output in" in footer
            and "ms, part of this prefill (not an extra pass); the chosen set's other blocks then ran it" in footer)
    assert ", router" not in footer.split("Route:")[1].split("Prompt:")[0]  # no "router N ms" for the prefill's time
    shown = CliRunner().invoke(app, ["info", str(bundle), "--json"])
    assert shown.exit_code == 0, shown.output
    router = json.loads(shown.stdout)["router"]
    assert router["kind"] == "hidden" and router["after"] == 1 and router["outputs"] == 4
    assert router["pooling"] == "mean+last"
    assert json.loads((bundle / "pudding.json").read_text())["schema_version"] == 2


def test_hidden_router_on_a_quantized_model(probe_bundle):
    """What the default preset runs: a hidden-state router on a 4-bit LLM (float16 scales, cast to
    float32 by the CPU default). The router reads the quantized model's own states: its scores are
    the head applied to the training side's features (`train.features.hidden_features`, PyTorch)
    of the same weights dequantized, its choices follow the prompt, and the routed prefill
    generates what the chosen set generates, hit or miss."""
    import mlx.nn as nn
    import torch
    from mlx.utils import tree_flatten
    from transformers import AutoTokenizer, LlamaForCausalLM

    from pudding_mlx.load import load
    from pudding_mlx.train.features import hidden_features
    from pudding_mlx.train.router_data import load_router_data

    assert json.loads((probe_bundle / "mlx-q4" / "config.json").read_text())["quantization"]["bits"] == 4
    loaded = load(str(probe_bundle / "b-q4"))  # the default dtype
    router = loaded.router
    assert router.kind == "hidden" and router.pooling == "mean+last"
    modules = dict(loaded.model.named_modules())
    q = modules["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 4 and q.scales.dtype == mx.float32
    assert isinstance(modules["model.embed_tokens"], nn.QuantizedEmbedding)
    # the same weights, dequantized (float32), in the training side's PyTorch model
    params = dict(tree_flatten(loaded.model.parameters()))
    state = {}
    for name, value in params.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and module + ".weight" in params and module + ".scales" in params:
            continue
        if name.endswith(".weight") and module + ".scales" in params:
            m = modules[module]
            value = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        state[name] = torch.from_numpy(np.array(value.astype(mx.float32)))
    ref = LlamaForCausalLM.from_pretrained(str(probe_bundle / "hf"), dtype=torch.float32).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embeddings
    texts = list(load_router_data(probe_bundle / "d")["text"])[::2]  # 20 texts of each task
    feats = hidden_features(ref, AutoTokenizer.from_pretrained(str(probe_bundle / "hf")), texts, [1])
    w, b = np.array(router.weight), np.array(router.bias)
    want = np.concatenate([feats["mean_1"], feats["last_1"]], axis=1) @ w.T + b
    got = np.array([router.best(t)[1] for t in texts])
    assert np.abs(got - want).max() < TOL, np.abs(got - want).max()
    with np.load(probe_bundle / "p-mean+last.npz") as z:  # the float model's scores: quantization shows
        assert np.abs(got - z["scores"][::2]).max() > 5 * TOL
    chosen = [router.decide(s) for s in got.tolist()]
    assert len(set(chosen)) >= 3 and router.fallback in chosen
    _hit_and_miss(probe_bundle / "b-q4", texts, lossless=False)
