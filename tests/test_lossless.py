"""--lossless: the pruned view drafts, the dense model verifies (mlx-lm's speculative decoding with
a SkipView as the draft model). Greedy output is token-identical to dense; with sampling, the
output distribution is the dense one (chi-square on a tiny vocabulary), which the pruned model's
own distribution fails."""


import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from pudding_mlx.generate import generate, prompt_tokens, stream_generate
from pudding_mlx.load import load
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
