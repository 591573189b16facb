"""Log-likelihood scoring with blocks skipped, on tiny random HF models and the real SmolLM2
tokenizer (CPU, float32)."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from pudding_mlx.errors import PuddingError  # noqa: E402
from pudding_mlx.train import scoring as S  # noqa: E402
from pudding_mlx import tasks as T  # noqa: E402
from pudding_mlx.tasks import Example, Request  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.assets]
# a few real rows of every file (tests/fixtures/make_fixtures.py): these tests need no more
DATA = Path(__file__).resolve().parent / "fixtures" / "benchmarks"


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def tiny_llama(vocab, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).float().eval()


def tiny_gemma3(vocab, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16, sliding_window=4, max_position_embeddings=1024,
                           layer_types=["sliding_attention", "full_attention"] * 2,
                           initializer_range=0.2)
    return Gemma3ForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(len(tok))


@pytest.fixture(scope="module")
def requests():
    """Real requests of mixed lengths (a long BoolQ passage, short MMLU letters, shared contexts),
    plus an empty context and a context with a trailing space."""
    reqs = []
    for task, n in (("arc_easy", 2), ("hellaswag", 1), ("winogrande", 2), ("mmlu", 1),
                    ("boolq", 1), ("piqa", 1)):
        for e in T.load_task(task, data_dir=DATA, limit=n):
            reqs.extend(e.requests)
    reqs += [Request("", " The sky is blue."), Request("Question: Is it?\nAnswer: ", "yes")]
    return reqs


def ref_encode(tok, ctx, cont):
    """lm-eval's _encode_pair, written out independently."""
    n = len(ctx) - len(ctx.rstrip())
    if n:
        ctx, cont = ctx[:-n], ctx[-n:] + cont
    if not ctx:
        return [tok.bos_token_id], tok(cont, add_special_tokens=False)["input_ids"]
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    return c, whole[len(c):]


def ref_score(model, tok, reqs):
    """One request at a time, no padding, full logits."""
    out = []
    with torch.no_grad():
        for ctx, cont in reqs:
            c, k = ref_encode(tok, ctx, cont)
            full = torch.tensor([c + k])
            logits = model(input_ids=full[:, :-1], use_cache=False).logits[0, -len(k):]
            lp = torch.log_softmax(logits.float(), -1)
            tgt = torch.tensor(k)
            out.append((float(lp.gather(-1, tgt[:, None]).sum()), len(k),
                        bool((lp.argmax(-1) == tgt).all())))
    return out


def test_encode_boundary_rule(tok):
    ctx, cont = "Question: Is it?\nAnswer:", " yes"
    [(c, k)] = S.encode_requests(tok, [Request(ctx, cont)])
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    assert c == tok(ctx, add_special_tokens=False)["input_ids"] and c + k == whole
    # a trailing space of the context moves to the continuation
    assert S.encode_requests(tok, [Request(ctx + " ", "yes")]) == [(c, k)]
    # empty context -> the prefix (BOS) token
    [(c0, k0)] = S.encode_requests(tok, [Request("", " yes")])
    assert c0 == [tok.bos_token_id] and k0 == tok(" yes", add_special_tokens=False)["input_ids"]


def test_batched_equals_unbatched_reference(llama, tok, requests):
    ref = ref_score(llama, tok, requests)
    for bs in (32, 3):
        got = S.score_requests(llama, tok, requests, batch_size=bs)
        assert len(got) == len(requests)
        for g, (lp, n, greedy), r in zip(got, ref, requests):
            assert g.n_tokens == n and g.is_greedy == greedy
            assert g.logprob == pytest.approx(lp, abs=1e-4)
            assert g.n_bytes == len(r.continuation.encode())
            assert g.mean_logprob == pytest.approx(lp / n, abs=1e-4)
    lens = {len(S.encode_requests(tok, [r])[0][0]) for r in requests}
    assert max(lens) > 5 * min(lens)  # the batch really mixes lengths


def test_logit_budget_cuts_batches_and_changes_no_score(llama, tok, requests):
    """A long context with a one-token answer next to short ones must not blow up the logits
    window: batches are cut by the position budget, and the scores stay the same."""
    encoded = S.encode_requests(tok, requests)
    inputs, conts = S.model_inputs(encoded)
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    for budget in (1, 40, 10**6):
        batches = list(S._batches(order, inputs, conts, 32, True, budget))
        assert [i for b in batches for i in b] == order
        for b in batches:  # within the budget unless a request stands alone
            window = max(len(inputs[i]) for i in b) - min(len(inputs[i]) - len(conts[i]) for i in b)
            assert len(b) == 1 or len(b) * window <= budget
    assert len(list(S._batches(order, inputs, conts, 32, True, 1))) == len(requests)
    ref = S.score_requests(llama, tok, requests, batch_size=32)
    for budget in (1, 40):
        got = S.score_requests(llama, tok, requests, batch_size=32, max_positions=budget)
        for g, r in zip(got, ref):
            assert g.logprob == pytest.approx(r.logprob, abs=1e-4) and g.is_greedy == r.is_greedy


@pytest.mark.parametrize("omit", [(1, 2), (0,), (3,)])
def test_skip_equals_physically_deleted(llama, tok, requests, omit):
    ref_model = copy.deepcopy(llama)
    ref_model.model.layers = torch.nn.ModuleList(
        [l for i, l in enumerate(ref_model.model.layers) if i not in omit])
    ref_model.config.num_hidden_layers = len(ref_model.model.layers)
    want = S.score_requests(ref_model, tok, requests)
    got = S.score_requests(llama, tok, requests, omitted=omit)
    dense = S.score_requests(llama, tok, requests)
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
    assert max(abs(g.logprob - d.logprob) for g, d in zip(got, dense)) > 1e-2


def test_gemma3_skip_keeps_each_blocks_attention_type(tok, requests):
    model = tiny_gemma3(len(tok))
    omit = (0,)  # kept: full, sliding, full -- positions no longer say the type
    ref_model = copy.deepcopy(model)
    ref_model.model.layers = torch.nn.ModuleList(
        [l for i, l in enumerate(ref_model.model.layers) if i not in omit])
    ref_model.config.num_hidden_layers = 3
    ref_model.config.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    reqs = requests[:6]
    want = S.score_requests(ref_model, tok, reqs)
    got = S.score_requests(model, tok, reqs, omitted=omit)
    for g, w in zip(got, want):
        assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    # the naive swap (layers only) would be wrong: the test can tell the difference
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(layers[i] for i in (1, 2, 3))
    try:
        naive = S.score_requests(model, tok, reqs)
    finally:
        model.model.layers = layers
    assert max(abs(n.logprob - w.logprob) for n, w in zip(naive, want)) > 1e-3


def test_layers_restored_also_after_exception(llama, tok, requests):
    layers, n = llama.model.layers, llama.config.num_hidden_layers
    S.score_requests(llama, tok, requests[:2], omitted=(0, 2))
    assert llama.model.layers is layers and llama.config.num_hidden_layers == n == 4
    seen = []

    def boom(module, args):
        seen.append(len(llama.model.layers))
        raise RuntimeError("boom")

    h = layers[3].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            S.score_requests(llama, tok, requests[:2], omitted=(1,))
    finally:
        h.remove()
    assert seen == [3]  # the swap was in effect during the forward
    assert llama.model.layers is layers and llama.config.num_hidden_layers == 4
    assert not llama.training


def test_bad_omission_sets_and_unsupported_family(llama, tok, requests):
    for bad, msg in (((4,), "out of range"), ((1, 1), "repeated"), ((0, 1, 2, 3), "all 4"),
                     (("1",), "not an integer")):
        with pytest.raises(PuddingError, match=msg):
            S.score_requests(llama, tok, requests[:1], omitted=bad)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2))
    with pytest.raises(PuddingError, match="not supported"):
        S.score_requests(gpt2, tok, requests[:1], omitted=(0,))
    assert len(S.score_requests(gpt2, tok, requests[:1])) == 1  # dense needs no block access


def test_acc_and_acc_norm_by_hand():
    # ex1: sums (-2, -4), choice lengths (1, 4) -> acc picks 0 (wrong), acc_norm -2/1 < -4/4 picks 1
    # ex2: sums (-1, -3), lengths (2, 1) -> acc picks 0 (right), acc_norm -0.5 > -3 picks 0 (right)
    def ex(i, texts, gold):
        return Example("t", "s", i, tuple(Request("c", " " + t) for t in texts), gold, "c",
                       tuple(texts), tuple(texts))

    exs = [ex("x1", ["a", "bbbb"], 1), ex("x2", ["cc", "d"], 0)]
    scores = [S.Score(-2.0, 2, False, 2), S.Score(-4.0, 1, False, 5),
              S.Score(-1.0, 1, True, 3), S.Score(-3.0, 3, False, 2)]
    m = S.metrics(exs, scores)
    assert m["acc"] == 50.0 and m["acc_norm"] == 100.0 and m["n"] == 2
    assert m["correct"].tolist() == [False, True] and m["correct_norm"].tolist() == [True, True]
    # ell-bar: ex1 (-1, -4), ex2 (-1, -1)
    assert [x.tolist() for x in m["mean_ll"]] == [[-1.0, -4.0], [-1.0, -1.0]]
    assert m["gold_mean_ll"].tolist() == [-4.0, -1.0]
    assert m["likelihood"] == 5.0  # -(-4 + -1)
    assert m["likelihood_diff"] == 3.0  # -((-4 - -1) + (-1 - -1))


def test_evaluate_end_to_end(llama, tok):
    exs = T.load_task("arc_easy", data_dir=DATA, limit=3) + T.load_task("winogrande",
                                                                       data_dir=DATA, limit=2)
    calls = []
    m = S.evaluate(llama, tok, exs, omitted=(2,), batch_size=4,
                   progress=lambda d, t: calls.append((d, t)))
    flat = S.score_requests(llama, tok, S.flatten(exs), omitted=(2,))
    assert m["n"] == 5 and m["ids"] == [e.id for e in exs]
    assert calls[-1] == (len(flat), len(flat)) and len(calls) == -(-len(flat) // 4)
    means = np.concatenate(m["mean_ll"])
    np.testing.assert_allclose(means, [s.mean_logprob for s in flat], atol=1e-5)
    assert 0 <= m["acc"] <= 100 and 0 <= m["acc_norm"] <= 100
    assert m["likelihood"] == pytest.approx(-m["gold_mean_ll"].sum())


def test_scoring_imports_no_mlx():
    code = "import sys, pudding_mlx.train.scoring; assert 'mlx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
