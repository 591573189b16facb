"""--lossless: the pruned view drafts, the dense model verifies (mlx-lm's speculative decoding with
a SkipView as the draft model). What these tests show, in float32 on this CPU: greedy output is
token-identical to one-token dense decoding; with sampling, the output distribution is the dense
one (chi-square on a tiny vocabulary), which the pruned model's own distribution fails. In bf16/fp16
the verify forward over several tokens rounds differently from one-token decoding, so near-tied
tokens can differ (seen on the H200); `benchmarks/lossless.py` measures that divergence rate, and
its strict mode (float32) fails on any mismatch (tested below)."""

import dataclasses
import importlib.util
import json
from pathlib import Path


import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from pudding_mlx.generate import generate, prompt_tokens, stream_generate
from pudding_mlx.load import load
from pudding_mlx.errors import PuddingError
from pudding_mlx.omission import ideal_speedup, lossless_share_needed, lossless_speedup_bound
from helpers import TINY, tiny_model
from pudding_mlx.shapes import build_model
from pudding_mlx.skip import SkipView

PROMPT = [7, 99, 3, 250, 17, 42, 8, 301, 77, 5, 66, 123]


def dense_greedy(model, n):
    return [int(t) for t, _ in generate_step(mx.array(PROMPT), SkipView(model, ()), max_tokens=n)]


def lossless_greedy(model, omitted, n, draft):
    from mlx_lm.generate import speculative_generate_step

    out = speculative_generate_step(mx.array(PROMPT), SkipView(model, ()), SkipView(model, omitted),
                                    num_draft_tokens=draft, max_tokens=n)
    return [(int(t), bool(d)) for t, _, d in out]


@pytest.mark.parametrize("draft", [1, 3, 5])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_lossless_is_dense(arch, draft):
    model = tiny_model(arch)
    assert model.model.embed_tokens.weight.dtype == mx.float32  # the identity is claimed for float32
    dense = dense_greedy(model, 20)
    for omitted in [(0, 2, 5), (3,), (1, 2, 3, 4, 5, 6)]:
        got = lossless_greedy(model, omitted, 20, draft)
        assert [t for t, _ in got] == dense
    # the draft is used: a one-block skip is accepted at least sometimes
    assert any(d for _, d in lossless_greedy(model, (3,), 20, draft))


def test_lossless_generate_on_real_tokenizer(tiny_llm_dir):
    loaded = load(str(tiny_llm_dir))
    ids = prompt_tokens(loaded.tokenizer, "Name three primary colours.")
    dense = generate(loaded.model, loaded.tokenizer, ids, (), max_tokens=24)
    for omitted in [(1,), (2, 4)]:
        lossless = generate(loaded.model, loaded.tokenizer, ids, omitted, max_tokens=24, lossless=True, draft_tokens=3)
        assert lossless.token_ids == dense.token_ids
        assert 0 <= lossless.extra["accepted_from_draft"] <= 1


# df = 63 (64 cells), p = 0.001: the chi-square critical value
CHI2_CRIT_63 = 103.44


def joint_two_tokens(model, prompt):
    """Exact p(t1, t2) of dense sampling at temperature 1, from the logits."""
    logits = model(mx.array(prompt)[None])[0, -1]
    p1 = np.array(mx.softmax(logits.astype(mx.float32)))
    joint = np.zeros((len(p1), len(p1)))
    for t1 in range(len(p1)):
        l2 = model(mx.array(prompt + [t1])[None])[0, -1]
        joint[t1] = p1[t1] * np.array(mx.softmax(l2.astype(mx.float32)))
    return joint


def chi2(counts, probs):
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_sampling_keeps_the_dense_distribution():
    config = dict(TINY["llama"], vocab_size=8, num_hidden_layers=6)
    model = build_model(config, mx.float32, seed=5)
    omitted = (1, 2, 3, 4)
    prompt = [1, 5, 2]
    dense = joint_two_tokens(SkipView(model, ()), prompt)
    draft = joint_two_tokens(SkipView(model, omitted), prompt)
    assert 0.5 * np.abs(dense - draft).sum() > 0.1, "draft too close to dense: the test would be blind"

    class Tok:  # the smallest tokenizer mlx-lm's stream_generate accepts
        eos_token_ids = set()
        bos_token = None

        class detokenizer:
            last_segment = ""

            @staticmethod
            def reset(): pass

            @staticmethod
            def add_token(t): pass

            @staticmethod
            def finalize(): pass

    n = 1500
    counts_lossless = np.zeros((8, 8))
    counts_draft = np.zeros((8, 8))
    mx.random.seed(0)
    for i in range(n):
        toks = [int(r.token) for r in stream_generate(model, _wrap(Tok), prompt, omitted, max_tokens=2,
                                                      temp=1.0, lossless=True, draft_tokens=2)]
        counts_lossless[toks[0], toks[1]] += 1
        toks = [int(t) for t, _ in generate_step(mx.array(prompt), SkipView(model, omitted), max_tokens=2,
                                                 sampler=lambda lp: mx.random.categorical(lp))]
        counts_draft[toks[0], toks[1]] += 1
    assert chi2(counts_lossless, dense) < CHI2_CRIT_63
    assert chi2(counts_draft, dense) > CHI2_CRIT_63  # the same test rejects the pruned model's own sampling


def _wrap(tok_cls):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    class Wrapped(TokenizerWrapper):
        def __init__(self):
            self._tokenizer = tok_cls
            self._detokenizer = tok_cls.detokenizer
            self._eos_token_ids = set()

    return Wrapped()


# -- benchmarks/lossless.py: divergence measured, strict mode, router warmed up ----------------------

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"


def _script():
    spec = importlib.util.spec_from_file_location("lossless_benchmark", ROOT / "benchmarks" / "lossless.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_divergence_measures():
    L = _script()
    assert L.divergence([1, 2, 3, 4], [1, 2, 3, 4]) == {"identical": True, "first": None, "differing": 0,
                                                        "positions": 4}
    assert L.divergence([1, 2, 3, 4], [1, 2, 5, 6, 7]) == {"identical": False, "first": 2, "differing": 3,
                                                           "positions": 5}
    runs = [L.divergence([1, 2, 3, 4], [1, 2, 3, 4]), L.divergence([1, 2, 3, 4], [1, 9, 9, 9]),
            L.divergence([1, 2, 3, 4], [1, 2, 3, 9])]
    s = L.divergence_summary(runs)
    assert (s["prompts_diverged"], s["prompts"], s["share_tokens"]) == (2, 3, 4 / 12)
    assert s["first_divergence"] == {"min": 1, "median": 2.0, "max": 3}


class TextRouter:
    """Candidate = len(text) % 3; records every text it is asked about."""

    def __init__(self):
        self.calls = []

    def best(self, text):
        self.calls.append(text)
        m = len(text) % 3
        return m, [float(i == m) for i in range(3)], 1.0


@pytest.fixture
def routed_tiny(tiny_llm_dir, monkeypatch):
    import pudding_mlx.load as L
    from pudding_mlx.bundle import Candidate, Manifest

    real, router = L.load, TextRouter()

    def load_routed(model, **kw):
        loaded = real(model, **kw)
        loaded.manifest = Manifest(num_blocks=6, candidates=[Candidate((1, 3)), Candidate((2,)), Candidate((4,))])
        loaded.router = router
        return loaded

    monkeypatch.setattr(L, "load", load_routed)
    return tiny_llm_dir, router


ARGS = ["--static", "1,2", "--tasks", "arc_easy,piqa,winogrande,arc_challenge", "--per-task", "1", "--max-tokens", "6", "--draft-tokens", "1,2", "--data-dir", str(FIXTURES)]


def test_lossless_benchmark_float32_is_strict_and_warms_the_router(routed_tiny, tmp_path):
    model_dir, router = routed_tiny
    out = tmp_path / "l.json"
    _script().main([str(model_dir), *ARGS, "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["dtype"] == "float32" and result["strict"] is True  # float32: identity asserted
    assert all(run["identical"] for row in result["rows"] for run in row["runs"].values())
    assert all(e["divergence"]["share_prompts"] == 0 for e in result["summary"].values())
    # the bound at each measured acceptance, worked from the runs' own shares and the drafts' sizes
    for e in result["summary"].values():
        if e["mean_accepted"] < 1:
            k = np.mean([len(row["sets"][e["draft"]]) for row in result["rows"]])
            assert e["speedup_bound"] == pytest.approx(
                lossless_speedup_bound(e["mean_accepted"], e["draft_tokens"], k, result["n_blocks"]))
    texts = router.calls[:8]  # every prompt routed once before anything is timed...
    assert len(set(texts)) == 8 and router.calls[8:] == texts  # ...then once more, timed


def test_lossless_benchmark_measures_divergence(routed_tiny, monkeypatch, tmp_path):
    """A verification that rounds differently (as bf16 on the GPU): outputs that differ from dense
    from token 3 on, on every prompt with an even length. Strict mode stops with one line; otherwise
    the share of prompts and tokens and the first position are reported."""
    import pudding_mlx.generate as G

    model_dir, _ = routed_tiny
    real = G.generate

    def rounding_differently(model, tokenizer, prompt, omitted=(), **kw):
        out = real(model, tokenizer, prompt, omitted, **kw)
        if kw.get("lossless") and len(prompt) % 2 == 0:
            out = dataclasses.replace(out, token_ids=out.token_ids[:3] + [t + 1 for t in out.token_ids[3:]])
        return out

    monkeypatch.setattr(G, "generate", rounding_differently)
    L = _script()
    with pytest.raises(SystemExit, match="lossless output differs from dense .* first at token 3"):
        L.main([str(model_dir), *ARGS, "--strict"])
    out = tmp_path / "l.json"
    L.main([str(model_dir), *ARGS, "--no-strict", "--json", str(out), "--md", str(tmp_path / "l.md")])
    result = json.loads(out.read_text())
    even = [row["prompt_tokens"] % 2 == 0 for row in result["rows"]]
    assert 0 < sum(even) < len(even), "the fixture needs prompts of both parities"
    for key, entry in result["summary"].items():
        dv = entry["divergence"]
        assert dv["prompts_diverged"] == sum(even) and dv["prompts"] == len(even)
        assert dv["first_divergence"] == {"min": 3, "median": 3, "max": 3}
        n_tokens = sum(row["generated"] for row in result["rows"])
        assert dv["share_tokens"] == pytest.approx(sum((row["generated"] - 3) for row, e in zip(result["rows"], even)
                                                       if e) / n_tokens)
    assert "prompts diverged" in (tmp_path / "l.md").read_text()


def test_lossless_speedup_bound():
    """A round emits its accepted draft tokens and one of dense's: with every draft token accepted (a share of
    g / (g + 1) of the output), g pruned steps and one verify buy g + 1 tokens."""
    n, k, g = 28, 3, 4
    step = (n - k) / n
    assert lossless_speedup_bound(g / (g + 1), g, k, n) == pytest.approx((g + 1) / (g * step + 1))
    assert lossless_speedup_bound(g / (g + 1), g, 0, n) == pytest.approx(1.0)  # a full-depth draft gains nothing
    assert lossless_speedup_bound(0.0, g, k, n) < 1  # nothing accepted: the drafting is pure cost
    # never above skipping the blocks outright, however long the draft and high the acceptance
    assert lossless_speedup_bound(0.999, 1000, k, n) < ideal_speedup(n, k)
    assert lossless_speedup_bound(0.99, g, k, n) == lossless_speedup_bound(g / (g + 1), g, k, n)  # at most g + 1 a round
    assert lossless_speedup_bound(0.5, g, 14, n) > lossless_speedup_bound(0.5, g, 3, n)  # a cheaper draft
    for share in (0.0, 0.3, 0.6):  # the share needed for a speedup is the inverse of the bound
        for kk, gg in ((3, 2), (14, 4)):
            b = lossless_speedup_bound(share, gg, kk, n)
            assert lossless_share_needed(b, gg, kk, n) == pytest.approx(share)
    assert lossless_share_needed(1.2, g, k, n) > g / (g + 1)  # beyond skipping 3 of 28 outright (1.12): out of reach
    with pytest.raises(PuddingError, match="share of tokens from the draft"):
        lossless_speedup_bound(1.0, g, k, n)
    with pytest.raises(PuddingError, match="at least one block must run"):
        ideal_speedup(n, n)
