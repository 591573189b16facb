"""Multi-turn chat on one KV cache (pudding_mlx.chat.ChatSession) against from-scratch runs, the
cache rule's bookkeeping, interruption, and the one-shot `route` / `info` commands and the default
bundle's no-router path on tiny models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_map

import mlx_lm.models.llama as llama_mod
from pudding_mlx.chat import ChatSession, common_prefix
from pudding_mlx.weights import weights_summary
from pudding_mlx.errors import PuddingError
from pudding_mlx.generate import generate
from pudding_mlx.hidden_router import block_output
from pudding_mlx.load import load
from pudding_mlx.shapes import build_model

N_NEW = 8
MESSAGES = [
    "Which gas do plants take in from the air to make food?",
    "Why is that gas important for animals too?",
    "Name one planet with a thick atmosphere of it.",
    "How far is that planet from the sun?",
    "Thanks. Summarise our chat in one line.",
]
# 6 blocks. Turn by turn: first set; a change at block 0; only a trailing omission added (nothing to
# re-run); a change at late block 4 (blocks 1 and 3 keep their caches, block 5 is rebuilt); same set.
SETS = [(2,), (0, 2), (0, 2, 5), (0, 2, 4), (0, 2, 4)]


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return load(str(tiny_llm_dir))


def render(tokenizer, messages):
    return [int(i) for i in tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)]


def from_scratch(model, tokenizer, messages, omitted, max_tokens=N_NEW):
    """The reference: fresh cache, prefill the whole rendered conversation under `omitted`, greedy."""
    return generate(model, tokenizer, render(tokenizer, messages), omitted, max_tokens=max_tokens)


class BlockCounter:
    """Counts the tokens each decoder block processes (llama blocks, patched at class level)."""

    def __init__(self, monkeypatch, model):
        self.index = {id(layer): i for i, layer in enumerate(model.model.layers)}
        self.tokens = [0] * len(model.model.layers)
        original = llama_mod.TransformerBlock.__call__
        counter = self

        def counting(block, x, *args, **kwargs):
            counter.tokens[counter.index[id(block)]] += x.shape[1]
            return original(block, x, *args, **kwargs)

        monkeypatch.setattr(llama_mod.TransformerBlock, "__call__", counting)

    def take(self):
        out, self.tokens = self.tokens, [0] * len(self.tokens)
        return out


def cache_objects(session):
    kept = [i for i in range(session.n_blocks) if i not in session.omitted]
    return dict(zip(kept, session.cache))


class StubRouter:
    """Picks a fixed candidate per message (the real router is tested in test_router.py)."""

    def __init__(self, picks, n):
        self.picks, self.n = picks, n

    def best(self, text):
        i = self.picks[text]
        return i, [1.0 if j == i else 0.0 for j in range(self.n)], 0.1


def test_routed_multi_turn_equals_from_scratch_and_follows_the_cache_rule(tiny, monkeypatch):
    from pudding_mlx.bundle import Candidate, Manifest
    from pudding_mlx.load import Loaded

    model, tok = tiny.model, tiny.tokenizer
    cands = sorted(set(SETS), key=SETS.index)
    router = StubRouter({m: cands.index(s) for m, s in zip(MESSAGES, SETS)}, len(cands))
    routed = Loaded(model, tok, tiny.path, Manifest(6, [Candidate(c) for c in cands]), router)
    session = ChatSession.from_loaded(routed)
    counter = BlockCounter(monkeypatch, model)
    ref_messages = []
    for turn, (text, omitted) in enumerate(zip(MESSAGES, SETS)):
        before_ids = list(session.cached_ids)
        before_set = session.omitted
        before_objs = cache_objects(session) if session.cache else {}
        before_state = {b: (c.keys[..., : c.offset, :], c.offset) for b, c in before_objs.items()}

        counter.take()
        result = session.routed_reply(text, max_tokens=N_NEW)  # routed on this message alone
        work = counter.take()
        assert result.choice.how == "routed" and result.omitted == omitted

        # 1. the reply is the from-scratch reply under the same set
        ref_messages.append({"role": "user", "content": text})
        ref = from_scratch(model, tok, ref_messages, omitted)
        assert result.token_ids == ref.token_ids, f"turn {turn}"
        ref_messages.append({"role": "assistant", "content": ref.text})
        assert session.messages == ref_messages
        assert len(set(result.token_ids)) > 2  # the output depends on the context

        # 2. the cache rule's bookkeeping
        prompt = render(tok, ref_messages[:-1])
        p = result.prepared
        expected_p = 0 if turn == 0 else min(common_prefix(before_ids, prompt), len(prompt) - 1)
        assert p.prompt_tokens == len(prompt) and p.reused == expected_p
        if turn > 0:
            assert expected_p >= len(render(tok, ref_messages[:-3])) - 1  # the earlier prompt at least
        kept = [i for i in range(6) if i not in omitted]
        objs = cache_objects(session)
        if turn == 0:
            assert p.rebuilt == 0 and p.first_changed is None
        elif omitted == before_set:  # same set: every cache object kept, only new tokens prefilled
            assert p.rebuilt == 0 and p.reused_blocks == tuple(kept)
            assert all(objs[b] is before_objs[b] for b in kept)
        else:
            f = min(set(before_set) ^ set(omitted))
            lead = [b for b in kept if b < f]
            assert p.first_changed == f and p.reused_blocks == tuple(lead)
            assert all(objs[b] is before_objs[b] for b in lead)  # the same objects ...
            for b in lead:  # ... whose entries for the common prefix were not rewritten
                keys, _ = before_state[b]
                assert mx.array_equal(objs[b].keys[..., : p.reused, :], keys[..., : p.reused, :])
            assert all(objs[b] is not before_objs.get(b) for b in kept if b >= f)
            # blocks from f on are re-run over the prefix, unless none is kept from f on
            assert p.rebuilt == (p.reused if any(b >= f for b in kept) else 0)
        if turn == 1:
            assert p.first_changed == 0 and p.reused_blocks == ()
        if turn == 2:
            assert p.first_changed == 5 and p.rebuilt == 0 and p.reused_blocks == (1, 3, 4)
        if turn == 3:
            assert p.first_changed == 4 and p.reused_blocks == (1, 3) and p.fresh_blocks == (5,)
            assert p.rebuilt == p.reused > 0

        # 3. work done: each kept block ran the re-run prefix, the new prompt tokens and one step
        # per generated token; omitted blocks never ran
        per_block = p.rebuilt + p.new_tokens + len(result.token_ids)
        assert work == [per_block if b in kept else 0 for b in range(6)], f"turn {turn}"
        if turn == 4:
            assert per_block == p.new_tokens + len(result.token_ids) < len(prompt)

        # 4. the cache holds exactly the prompt + the reply
        assert session.cached_ids == prompt + result.token_ids
        assert all(c.offset == len(session.cached_ids) for c in session.cache)
        assert session.omitted == tuple(omitted)


# after = 0: block 0 is the router's. Turn by turn: first set; a change at block 1; only a trailing
# omission added (nothing re-run); a change at block 4 (blocks 0 and 3 keep their caches); same set.
HIDDEN_SETS = [(2,), (1, 2), (1, 2, 5), (1, 2, 4), (1, 2, 4)]


def _hidden_session(tiny, cands, decide, **kwargs):
    """A session whose bundle has a hidden-state router reading after block 0 (random head);
    `decide(scores)` stands in for its decision rule."""
    from pudding_mlx.bundle import Candidate, Manifest
    from pudding_mlx.hidden_router import HiddenRouter
    from pudding_mlx.load import Loaded

    model, tok = tiny.model, tiny.tokenizer
    settings = {"after": 0, "pooling": "mean", "fallback": 0, "margin_is": "-inf (always the argmax)",
                "max_tokens": 4096, "sets": [list(c) for c in cands]}

    class Scripted(HiddenRouter):
        def decide(self, scores):
            return decide(scores)

    weight = mx.random.normal((len(cands), model.args.hidden_size), key=mx.random.key(3))
    router = Scripted(model, tok, settings, weight, mx.zeros((len(cands),)), None)
    loaded = Loaded(model, tok, tiny.path, Manifest(6, [Candidate(c) for c in cands]), router)
    return ChatSession.from_loaded(loaded, **kwargs), router


def test_hidden_router_routes_the_first_turn_inside_its_prefill(tiny, monkeypatch):
    """With a hidden-state router the first turn routes for free: blocks 0..after run once over the
    prompt (the message alone through the template: the router's training input), their output gives
    the scores, and the chosen set continues from there; later turns route the message alone with a
    pass of its own (their prompts hold the conversation). Each reply equals the from-scratch reply
    under the set the router chose; the scores are the router's own on the message; the cache rule
    holds; block 0 runs the first prompt once (plus its last token in generation) and, on later turns,
    the message alone once more."""
    model, tok = tiny.model, tiny.tokenizer
    cands = sorted(set(HIDDEN_SETS), key=HIDDEN_SETS.index)
    seen = []
    session, router = _hidden_session(tiny, cands, lambda scores: seen.append(list(scores))
                                      or cands.index(HIDDEN_SETS[len(seen) - 1]))
    counter = BlockCounter(monkeypatch, model)
    ref_messages = []
    for turn, (text, omitted) in enumerate(zip(MESSAGES, HIDDEN_SETS)):
        before_ids, before_set = list(session.cached_ids), session.omitted
        before_objs = cache_objects(session) if session.cache else {}
        counter.take()
        result = session.routed_reply(text, max_tokens=N_NEW)
        work = counter.take()
        assert result.choice.how == "routed" and result.omitted == omitted and result.choice.router_ms > 0

        ref_messages.append({"role": "user", "content": text})
        ref = from_scratch(model, tok, ref_messages, omitted)
        assert result.token_ids == ref.token_ids, f"turn {turn}"
        ref_messages.append({"role": "assistant", "content": ref.text})

        prompt = render(tok, ref_messages[:-1])
        alone = router.prompt_ids(text)
        h = block_output(model, mx.array([alone]), 0)[0].astype(mx.float32)
        assert mx.allclose(mx.array(seen[-1]), router.weight @ mx.mean(h, axis=0), atol=1e-4), f"turn {turn}"
        assert result.choice.scores == seen[-1]
        p = result.prepared
        kept = [i for i in range(6) if i not in omitted]
        per_block = p.rebuilt + p.new_tokens + len(result.token_ids)
        if turn == 0:  # inside the prefill: the prompt is the message alone
            assert prompt == alone and p.held == len(prompt) - 1 and p.reused == 0
            assert work == [per_block + (b == 0) if b in kept else 0 for b in range(6)]
        else:  # a routing pass of its own over the message alone, then the cache rule
            assert p.held is None
            assert p.reused == min(common_prefix(before_ids, prompt), len(prompt) - 1)
            assert work == [per_block + (b == 0) * len(alone) if b in kept else 0 for b in range(6)], f"turn {turn}"
            if omitted == before_set:
                assert p.rebuilt == 0 and all(cache_objects(session)[b] is before_objs[b] for b in kept)
            else:
                f = min(set(before_set) ^ set(omitted))
                assert p.first_changed == f and 0 in p.reused_blocks
                assert cache_objects(session)[0] is before_objs[0]
        if turn == 3:
            assert p.first_changed == 4 and p.rebuilt == p.reused > 0 and p.fresh_blocks == (5,)
        assert session.cached_ids == prompt + result.token_ids
        assert all(c.offset == len(session.cached_ids) for c in session.cache)


@pytest.mark.parametrize("when", ["before", "routing", "after the decision"])
def test_first_turn_stopped_while_routing_inside_the_prefill(tiny, when):
    """Ctrl-C in a first turn routed inside its prefill (before it starts, during blocks 0..after,
    or after the decision, in the set's other blocks) drops the message and keeps no cache; the
    turn sent again is the from-scratch reply."""
    model, tok = tiny.model, tiny.tokenizer
    cands = [(2,), (1, 2, 4)]
    decided = []
    session, _ = _hidden_session(tiny, cands, lambda scores: decided.append(1) or 1, prefill_step_size=8)
    polls = []

    def stop():
        polls.append(1)
        return {"before": True, "routing": len(polls) > 1, "after the decision": bool(decided)}[when]

    stopped = session.routed_reply(MESSAGES[0], max_tokens=N_NEW, should_stop=stop)
    assert stopped.choice is None and not stopped.kept and stopped.token_ids == []
    assert len(decided) == (when == "after the decision") and session.messages == [] and session.cache is None
    again = session.routed_reply(MESSAGES[0], max_tokens=N_NEW)
    assert again.omitted == cands[1] and again.prepared.held is not None
    ref = from_scratch(model, tok, [{"role": "user", "content": MESSAGES[0]}], again.omitted)
    assert again.token_ids == ref.token_ids

    # a system message of the user's: not the router's training input, so a pass of its own
    with_system, _ = _hidden_session(tiny, cands, lambda scores: 1, system="Answer briefly.")
    assert with_system.routed_reply(MESSAGES[0], max_tokens=2).prepared.held is None


def test_first_turn_of_one_chunk_stopped_after_picking_the_fallback(tiny):
    """A first turn of one chunk whose router picks the fallback set runs the graph built before the
    decision; its prefill is still announced, so Ctrl-C there drops the message and keeps no cache,
    and the turn sent again is the from-scratch reply under the fallback set."""
    model, tok = tiny.model, tiny.tokenizer
    cands = [(2,), (1, 2, 4)]
    decided = []
    session, _ = _hidden_session(tiny, cands, lambda scores: decided.append(1) or 0)  # 0: the fallback
    stopped = session.routed_reply(MESSAGES[0], max_tokens=N_NEW, should_stop=lambda: bool(decided))
    assert decided and stopped.choice is None and not stopped.kept and stopped.token_ids == []
    assert session.messages == [] and session.cache is None
    again = session.routed_reply(MESSAGES[0], max_tokens=N_NEW)
    assert again.omitted == cands[0] and again.prepared.held is not None
    ref = from_scratch(model, tok, [{"role": "user", "content": MESSAGES[0]}], again.omitted)
    assert again.token_ids == ref.token_ids


def test_interrupted_reply_is_kept_and_the_next_turn_is_exact(tiny):
    model, tok = tiny.model, tiny.tokenizer
    session = ChatSession(model, tok)
    produced = []
    result = session.reply(MESSAGES[0], (1,), max_tokens=30, on_token=produced.append,
                           should_stop=lambda: len(produced) >= 3)
    assert result.finish_reason == "interrupted" and result.kept
    assert len(result.token_ids) == 3
    full = from_scratch(model, tok, [{"role": "user", "content": MESSAGES[0]}], (1,), max_tokens=30)
    assert result.token_ids == full.token_ids[:3]  # what was shown is a prefix of the full reply
    partial = tok.decode(result.token_ids)
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    prompt = render(tok, session.messages[:1])
    assert session.cached_ids == prompt + result.token_ids
    assert all(c.offset == len(session.cached_ids) for c in session.cache)

    nxt = session.reply(MESSAGES[1], (3,), max_tokens=N_NEW)
    ref = from_scratch(model, tok, session.messages[:2] + [{"role": "user", "content": MESSAGES[1]}], (3,))
    assert nxt.token_ids == ref.token_ids and nxt.prepared.reused > len(prompt) - 1


def test_interrupt_before_the_first_token_drops_the_turn(tiny):
    model, tok = tiny.model, tiny.tokenizer
    session = ChatSession(model, tok)
    session.reply(MESSAGES[0], (), max_tokens=4)
    messages = list(session.messages)
    result = session.reply(MESSAGES[1], (0,), max_tokens=4, should_stop=lambda: True)
    assert result.finish_reason == "interrupted" and not result.kept and result.token_ids == []
    assert session.messages == messages
    assert all(c.offset == len(session.cached_ids) for c in session.cache)
    again = session.reply(MESSAGES[1], (0,), max_tokens=N_NEW)
    ref = from_scratch(model, tok, messages + [{"role": "user", "content": MESSAGES[1]}], (0,))
    assert again.token_ids == ref.token_ids


def test_keyboard_interrupt_inside_a_reply_leaves_a_consistent_cache(tiny):
    model, tok = tiny.model, tiny.tokenizer
    session = ChatSession(model, tok)
    seen = []

    def on_token(piece):
        seen.append(piece)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.reply(MESSAGES[0], (2,), max_tokens=30, on_token=on_token)
    assert session.messages[-1]["role"] == "assistant"
    assert all(c.offset == len(session.cached_ids) for c in session.cache)
    nxt = session.reply(MESSAGES[1], (2,), max_tokens=N_NEW)
    ref = from_scratch(model, tok, session.messages[:2] + [{"role": "user", "content": MESSAGES[1]}], (2,))
    assert nxt.token_ids == ref.token_ids


def test_rerendered_history_falls_back_to_the_first_differing_token(tiny):
    model, tok = tiny.model, tiny.tokenizer
    session = ChatSession(model, tok, system="You are terse.")
    session.reply(MESSAGES[0], (1,), max_tokens=N_NEW)
    cached = list(session.cached_ids)
    # the template (here: we) renders an earlier turn differently
    session.messages[0]["content"] = MESSAGES[0].replace("plants", "trees")
    result = session.reply(MESSAGES[1], (1,), max_tokens=N_NEW)
    prompt = render(tok, [{"role": "system", "content": "You are terse."}] + session.messages[:2]
                    + [{"role": "user", "content": MESSAGES[1]}])
    first_turn = render(tok, [{"role": "system", "content": "You are terse."}, session.messages[0]])
    assert 0 < result.prepared.reused == common_prefix(cached, prompt) < len(first_turn) - 2
    ref = generate(model, tok, prompt, (1,), max_tokens=N_NEW)
    assert result.token_ids == ref.token_ids


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "llama_sliding"])
def test_other_families_and_windowed_caches(tiny, arch):
    """build_model families: gemma3 (its adapter, rotating caches of 32), a llama whose sliding
    window (5) is shorter than the conversation (caches that cannot be trimmed: fresh fallback)."""
    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-5, vocab_size=49152, max_position_embeddings=1024, num_hidden_layers=6)
    config = {
        "qwen3": dict(base, model_type="qwen3", head_dim=16, tie_word_embeddings=True, rope_theta=10000.0),
        "gemma3_text": dict(base, model_type="gemma3_text", head_dim=16, num_key_value_heads=1,
                            sliding_window=32, sliding_window_pattern=3, query_pre_attn_scalar=16),
        "llama_sliding": dict(base, model_type="llama", sliding_window=5,
                              layer_types=["sliding_attention", "full_attention"] * 3),
    }[arch]
    model = build_model(config, mx.float32, seed=1)
    layers = model.model.parameters()["layers"]
    model.model.update({"layers": tree_map(lambda p: p * 4 if p.ndim == 2 else p, layers)})
    tok = tiny.tokenizer
    session = ChatSession(model, tok)
    ref_messages = []
    for text, omitted in zip(MESSAGES[:4], [(1,), (1,), (0, 4), (0, 5)]):
        result = session.reply(text, omitted, max_tokens=6)
        ref_messages.append({"role": "user", "content": text})
        ref = from_scratch(model, tok, ref_messages, omitted, max_tokens=6)
        assert result.token_ids == ref.token_ids, (arch, omitted)
        ref_messages.append({"role": "assistant", "content": ref.text})
        assert all(c.offset == len(session.cached_ids) for c in session.cache)


def test_prompt_longer_than_the_context_is_one_error_before_generating(tiny):
    session = ChatSession(tiny.model, tiny.tokenizer)  # TINY_LLAMA: context 256
    with pytest.raises(PuddingError, match="context is 256"):
        session.reply("word " * 400, (), max_tokens=4)
    assert session.messages == [] and session.cache is None and session.turns == []


def test_weights_summary_counts_quantized_parameters(tmp_path, tiny_llm_dir):
    import mlx.nn as nn
    from mlx_lm.utils import save_config, save_model

    plain = weights_summary(tiny_llm_dir, 4)
    model = load(str(tiny_llm_dir)).model
    nn.quantize(model, group_size=32, bits=4)
    save_model(tmp_path, model)
    config = json.loads((tiny_llm_dir / "config.json").read_text())
    save_config(dict(config, quantization={"group_size": 32, "bits": 4}), tmp_path / "config.json")
    quant = weights_summary(tmp_path)
    assert quant["parameters"] == plain["parameters"]
    assert quant["bytes"] < plain["bytes"] / 4


# -- CLI: route, info, errors -----------------------------------------------------------------


def run_cli(*args, env=None, pre=""):
    code = "import sys\n" + pre + ("from pudding_mlx.app.cli import main\n"
                                   "sys.argv = ['pudding-mlx'] + sys.argv[1:]\nmain()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_llm_dir, tmp_path_factory):
    from pudding_mlx.convert.bundle import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-bundle"
    return build_bundle(tiny_llm_dir, out, [[1, 3], [2, 4], [0]])


def test_info_on_a_plain_dir_and_a_bundle(tiny_llm_dir, tiny_bundle):
    done = run_cli("info", str(tiny_llm_dir), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["kind"] == "mlx-lm" and data["model_type"] == "llama" and data["blocks"] == 6
    assert data["hidden_size"] == 64 and data["quantization"] is None and data["router"] is None
    model = load(str(tiny_llm_dir)).model
    from mlx.utils import tree_flatten
    assert data["parameters"] == sum(v.size for _, v in tree_flatten(model.parameters()))
    assert data["weights_bytes"] == (tiny_llm_dir / "model.safetensors").stat().st_size - 8 - int.from_bytes(
        (tiny_llm_dir / "model.safetensors").read_bytes()[:8], "little")
    assert data["disk"]["total"] >= data["disk"]["llm_weights"] > 0

    done = run_cli("info", str(tiny_bundle), "--json")
    data = json.loads(done.stdout)
    assert data["kind"] == "bundle" and data["candidates"]["count"] == 3
    assert data["candidates"]["sets"] == [[1, 3], [2, 4], [0]] and data["router"] is None
    done = run_cli("info", str(tiny_bundle))
    assert done.returncode == 0 and "3: 1,3; 2,4; 0" in done.stdout and "none (serves" in done.stdout


def test_route_without_a_router_is_one_line(tiny_llm_dir, tiny_bundle):
    for target, message in ((tiny_bundle, "has no router"), (tiny_llm_dir, "not a pudding-mlx bundle")):
        done = run_cli("route", str(target), "--prompt", "hi", "--json")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""


@pytest.mark.parametrize("case", ["missing", "corrupt", "too-big", "too-big-generate", "too-big-eval", "too-long"])
def test_chat_errors_are_one_line(tmp_path, tiny_llm_dir, tiny_bundle, case):
    pre, args = "", []
    if case == "missing":
        args = ["chat", str(tmp_path / "nope")]
        message = "no such directory"
    elif case == "corrupt":
        import shutil
        bad = tmp_path / "bad"
        shutil.copytree(tiny_bundle, bad)
        (bad / "pudding.json").write_text("{not json")
        args, message = ["chat", str(bad)], "not valid JSON"
    elif case.startswith("too-big"):  # a device with 1 MB of memory: every command refuses to load
        pre = "import mlx.core as mx\nmx.device_info = lambda: {'memory_size': 1_000_000}\n"
        args = {"too-big": ["chat", str(tiny_llm_dir)],
                "too-big-generate": ["generate", str(tiny_llm_dir), "-p", "hi"],
                "too-big-eval": ["eval", str(tiny_llm_dir), "--tasks", "piqa", "--limit", "1",
                                 "--data-dir", str(Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks")]}[case]
        message = "GB of memory"
    else:
        args, message = ["generate", str(tiny_llm_dir), "-p", "word " * 400], "context is 256"
    done = run_cli(*args, pre=pre)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_route_and_info_on_other_errors(tmp_path):
    for cmd in ("route", "info"):
        extra = ["--prompt", "x"] if cmd == "route" else []
        done = run_cli(cmd, str(tmp_path / "missing"), *extra)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


# -- the default bundle, without a shipped router ---------------------------------------------


def test_default_bundle_without_router_runs_dense(tiny_default_build):
    """No head.safetensors shipped: the bundle is built without a router (candidates kept), the
    status note says so, a second call reuses it, a stale or half-built folder is rebuilt."""
    from pudding_mlx.convert import default_bundle as db
    from pudding_mlx.bundle import read_manifest

    data, calls = tiny_default_build

    target = db.bundle_path()
    target.mkdir(parents=True)  # a half-built folder from an earlier crash: never used
    (target / "pudding.json").write_text("{}")
    path = db.ensure_default_bundle(data_dir=data)
    assert path == target and len(calls) == 1 and db.is_complete(path, data)
    manifest = read_manifest(path)
    assert manifest.router is None and [list(c.omitted) for c in manifest.candidates] == [[1, 3], [2, 4]]
    assert db.note_for(manifest) == "no trained router shipped: running dense"
    assert db.ensure_default_bundle(data_dir=data) == path and len(calls) == 1  # cached
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no leftovers

    # the CLI's status line says so
    loaded = load(str(path))
    assert loaded.router is None
    from pudding_mlx.app.session_cmd import _ChatState
    session = ChatSession.from_loaded(loaded)
    state = _ChatState(loaded, session, None, 3, False, None, db.note_for(loaded.manifest))
    result = session.routed_reply("hi", max_tokens=3)
    assert result.choice.how == "no-router" and result.omitted == ()
    assert "dense (6/6 blocks): no trained router shipped: running dense" in state.status(result.choice, result)

    # a shipped-data change makes it stale: rebuilt
    (data / "candidates.json").write_text(json.dumps([[1, 3]]))
    db.ensure_default_bundle(data_dir=data)
    assert len(calls) == 2 and len(read_manifest(path).candidates) == 1


def test_lossless_multi_turn_equals_dense_from_scratch(tiny):
    """--lossless chat: each turn's set only drafts, so every reply is the dense from-scratch reply;
    the dense cache is never rebuilt (only extended), the draft's cache follows the set."""
    model, tok = tiny.model, tiny.tokenizer
    session = ChatSession(model, tok, lossless=True, draft_tokens=3)
    ref_messages, drafted = [], 0
    for turn, (text, omitted) in enumerate(zip(MESSAGES, [(3,), (5,), (3, 5), (3, 5), ()])):
        result = session.reply(text, omitted, max_tokens=N_NEW)
        ref_messages.append({"role": "user", "content": text})
        ref = from_scratch(model, tok, ref_messages, ())
        assert result.token_ids == ref.token_ids, f"turn {turn}"
        ref_messages.append({"role": "assistant", "content": ref.text})
        assert session.messages == ref_messages
        prompt = render(tok, ref_messages[:-1])
        assert session.omitted == () and len(session.cache) == 6  # the dense cache
        # speculative decoding leaves the last token unprocessed; the cache holds a prefix
        assert len(session.cached_ids) >= len(prompt) + len(result.token_ids) - 1
        assert session.cached_ids == (prompt + result.token_ids)[: len(session.cached_ids)]
        if omitted:
            drafted += result.drafted
            kept = [i for i in range(6) if i not in omitted]
            assert session.draft.omitted == tuple(omitted) and len(session.draft.cache) == len(kept)
            assert session.cached_ids[: len(session.draft.cached_ids)] == session.draft.cached_ids
            assert len(session.draft.cached_ids) >= len(prompt)
        else:
            assert result.drafted is None  # a dense turn has nothing to draft with
        if turn > 0:
            assert result.prepared.reused > 0  # both caches carried over from the previous turn
    assert drafted > 0  # the drafts were used
    session.reset()
    assert session.draft.cache is None and session.draft.cached_ids == []


def test_chat_cli_lossless_prints_the_dense_reply(tiny_llm_dir):
    """`chat --lossless --omit …` from a pipe: the same reply as `chat --dense`, and the status line
    says how many tokens the draft supplied."""
    def chat(*flags):
        code = ("import sys\nfrom pudding_mlx.app.cli import main\n"
                "sys.argv = ['pudding-mlx'] + sys.argv[1:]\nmain()\n")
        return subprocess.run([sys.executable, "-c", code, "chat", str(tiny_llm_dir), "--max-tokens", "12", *flags],
                              input=MESSAGES[0] + "\n/quit\n", capture_output=True, text=True, timeout=300)

    dense, lossless = chat("--dense"), chat("--omit", "3", "--lossless")
    assert dense.returncode == 0 and lossless.returncode == 0, lossless.stderr
    reply = lambda out: out.split(">>> ", 1)[1].splitlines()[0]
    assert reply(lossless.stdout) == reply(dense.stdout) and len(reply(dense.stdout)) > 5
    assert "lossless, dense output · draft --omit: omitted [3]" in lossless.stdout
    assert "tokens accepted from the draft" in lossless.stdout


# -- /stats, progress during a re-prefill, the cut-off note, Ctrl-C between tokens ---------------------


def test_stats_count_only_tokens_not_run_again(tiny):
    """A set change re-runs the reused prefix: those tokens are re-prefilled, not "from cache"; a
    dropped turn (no prefill, no token) does not pull the speeds down."""
    session = ChatSession(tiny.model, tiny.tokenizer)
    session.reply(MESSAGES[0], (2,), max_tokens=N_NEW)
    same = session.reply(MESSAGES[1], (2,), max_tokens=N_NEW)  # same set: the prefix is cached
    changed = session.reply(MESSAGES[2], (0, 2), max_tokens=N_NEW)  # change at block 0: all re-run
    dropped = session.reply(MESSAGES[3], (0, 2), max_tokens=N_NEW, should_stop=lambda: True)
    assert same.prepared.cached == same.prepared.reused > 0 and same.prepared.rebuilt == 0
    assert changed.prepared.rebuilt == changed.prepared.reused > 0 and changed.prepared.cached == 0
    assert not dropped.kept and dropped.prompt_tps == 0 and dropped.generation_tps == 0
    stats = session.stats()
    assert stats["prompt_from_cache"] == same.prepared.reused + dropped.prepared.cached
    assert stats["prompt_from_cache"] < sum(t.prepared.reused for t in session.turns)  # the old count
    assert stats["prompt_re_prefilled"] == changed.prepared.rebuilt
    assert (stats["turns"], stats["interrupted"], stats["dropped"]) == (4, 1, 1)
    ran = session.turns[:3]
    gen_time = sum(t.generation_tokens / t.generation_tps for t in ran)
    assert stats["generation_tps"] == pytest.approx(sum(t.generation_tokens for t in ran) / gen_time)
    assert stats["generation_tps"] >= min(t.generation_tps for t in ran)  # no 0 tok/s averaged in


def test_re_prefill_after_a_set_change_reports_progress(tiny):
    session = ChatSession(tiny.model, tiny.tokenizer, prefill_step_size=16)
    session.reply(MESSAGES[0], (2,), max_tokens=N_NEW)
    session.reply(MESSAGES[1], (2,), max_tokens=N_NEW)
    calls = []
    result = session.reply(MESSAGES[2], (0, 2), max_tokens=N_NEW, on_prefill=lambda *a: calls.append(a))
    p = result.prepared.rebuilt
    assert p > 32
    rebuild = [c for c in calls if c[0] == "re-prefill"]
    assert rebuild == [("re-prefill", done, p) for done in range(0, p, 16)] + [("re-prefill", p, p)]
    assert calls.index(rebuild[-1]) < len(calls) - 1 and calls[-1][0] == "prefill"  # then the new tokens


def test_a_token_computed_after_ctrl_c_is_not_shown(tiny):
    """Ctrl-C lands while a token is being computed (here: inside the sampler of the 5th token):
    that token and any later one are neither printed nor kept; the reply is what was shown."""
    from mlx_lm.sample_utils import make_sampler

    greedy, flag, shown, samples = make_sampler(temp=0.0), [False], [], [0]

    def sampler(logprobs):
        samples[0] += 1
        if samples[0] == 5:
            flag[0] = True  # SIGINT arrives now
        return greedy(logprobs)

    def on_token(piece):
        assert not flag[0], f"{piece!r} was printed after Ctrl-C"
        shown.append(piece)

    session = ChatSession(tiny.model, tiny.tokenizer)
    result = session.reply(MESSAGES[0], (1,), max_tokens=30, sampler=sampler, on_token=on_token,
                           should_stop=lambda: flag[0])
    assert result.finish_reason == "interrupted" and 0 < len(result.token_ids) < 30
    # (the streaming detokenizer drops the reply's leading space; the kept text is decode(ids))
    assert session.messages[-1]["content"] == tiny.tokenizer.decode(result.token_ids)
    assert session.messages[-1]["content"].strip() == "".join(shown).strip()
    prompt = render(tiny.tokenizer, session.messages[:1])
    assert session.cached_ids == prompt + result.token_ids
    assert all(c.offset == len(session.cached_ids) for c in session.cache)


def _chat_state(tiny, max_tokens, session=None):
    import io

    from rich.console import Console

    from pudding_mlx.app.session_cmd import _ChatState

    out, err = io.StringIO(), io.StringIO()
    session = session or ChatSession(tiny.model, tiny.tokenizer)
    state = _ChatState(tiny, session, None, max_tokens, True, None, None,
                       Console(file=err, force_terminal=True, width=120))
    return state, Console(file=out, width=120), out, err


def test_chat_turn_notes_a_reply_cut_off_by_max_tokens(tiny):
    state, console, out, _ = _chat_state(tiny, max_tokens=3)
    state.turn(console, MESSAGES[0])
    assert state.session.turns[-1].finish_reason == "length"
    assert "[cut off: the reply reached 3 tokens (--max-tokens 3); it may be unfinished]" in out.getvalue()
    state, console, out, _ = _chat_state(tiny, max_tokens=10_000)  # the context (256) ends it first
    state.turn(console, "Hi")
    n = state.session.turns[-1].generation_tokens
    assert state.session.turns[-1].finish_reason == "length" and n < 256
    assert f"[cut off: the reply reached {n} tokens (the model's context); it may be unfinished]" in out.getvalue()


def test_chat_turn_shows_progress_while_re_prefilling(tiny):
    session = ChatSession(tiny.model, tiny.tokenizer, prefill_step_size=16)
    state, console, out, err = _chat_state(tiny, max_tokens=N_NEW, session=session)
    state.turn(console, " ".join(MESSAGES))
    state.dense = False
    state.base_omit = [0, 2]  # a set change at block 0: the whole history is re-run
    state.turn(console, MESSAGES[1])
    assert session.turns[-1].prepared.rebuilt >= 64
    assert "re-prefilling the conversation under the new set" in err.getvalue()
    assert "re-prefilled" in out.getvalue()


# -- the presets ----------------------------------------------------------------------------------


def test_hidden_router_preset_builds_routes_and_is_cached(tiny_default_build, monkeypatch):
    """The Qwen preset's builder (hidden-state router, 4-bit conversion) with the tiny model standing
    in: the LLM is fetched through assets.qwen25_coder_gguf and converted with quantize_bits=4 (here
    the tiny model, quantized to those bits for real), the shipped router.json + head.safetensors
    become the bundle's hidden router (no encoder fetched), the bundle routes per prompt with it on
    the 4-bit model (the shipped head on the quantized model's own mean state after block 1, the
    argmax), a second call reuses it, and a changed head rebuilds it."""
    import contextlib
    import io

    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx_lm.convert import convert as mlx_lm_convert
    from mlx_lm.models.base import create_attention_mask

    from pudding_mlx.bundle import read_manifest
    from pudding_mlx.convert import default_bundle as db
    from pudding_mlx.routing import route

    data, calls = tiny_default_build
    sets = [[2, 3], [3, 4], [2, 5]]
    (data / "candidates.json").write_text(json.dumps(sets))
    (data / "router.json").write_text(json.dumps({
        "format": "pudding-mlx-router", "kind": "hidden", "after": 1, "pooling": "mean", "sets": sets,
        "fallback": 0, "margin": None, "margin_is": "-inf (always the argmax)", "max_tokens": 64}))
    mx.save_safetensors(str(data / "head.safetensors"),
                        {"weight": mx.random.normal((3, 64), key=mx.random.key(1)), "bias": mx.zeros((3,))})
    fetched, bits = [], []
    monkeypatch.setattr(db.assets, "qwen25_coder_gguf", lambda *a, **k: fetched.append(1) or Path("Qwen.gguf"))
    stand_in = __import__("pudding_mlx.convert.llm", fromlist=["convert_llm"]).convert_llm  # the fixture's copy

    def convert(src, out, quantize_bits=None, **kw):
        bits.append(quantize_bits)
        tiny = stand_in(src, Path(out).with_name("tiny-float"), **kw)
        if quantize_bits is None:
            return Path(tiny).rename(out)
        with contextlib.redirect_stdout(io.StringIO()):
            mlx_lm_convert(str(tiny), mlx_path=str(out), quantize=True, q_bits=quantize_bits, q_group_size=64)
        return Path(out)

    monkeypatch.setattr("pudding_mlx.convert.llm.convert_llm", convert)
    path = db.ensure_default_bundle(data_dir=data, preset="qwen2.5-coder-1.5b")
    assert path == db.bundle_path("qwen2.5-coder-1.5b") and path.name == "preset-qwen2.5-coder-1.5b"
    assert fetched == [1] and bits == [4] and calls == [Path("Qwen.gguf")]
    manifest = read_manifest(path)
    assert manifest.router.kind == "hidden" and manifest.provenance["preset"] == "qwen2.5-coder-1.5b"
    assert manifest.default_routing is None  # nothing shipped: the bundle routes by default
    loaded = load(str(path))
    assert loaded.router.kind == "hidden" and loaded.router.after == 1 and loaded.dense_by_default is None
    layers = loaded.model.model.layers
    assert isinstance(layers[0].self_attn.q_proj, nn.QuantizedLinear) and layers[0].self_attn.q_proj.bits == 4
    weight = np.array(mx.load(str(data / "head.safetensors"))["weight"])
    chosen = []
    for text in ("hi", "What is the capital of France?", "Tell me a story", "def add(a, b):", "2 + 2 = ?",
                 "Translate 'cat' into French."):
        choice = route(loaded, text)
        h = loaded.model.model.embed_tokens(mx.array([loaded.router.prompt_ids(text)]))
        for layer in layers[:2]:  # blocks 0..1 of the 4-bit model, by hand
            h = layer(h, create_attention_mask(h, None), None)
        want = weight @ np.array(h[0].astype(mx.float32)).mean(0)
        np.testing.assert_allclose(choice.scores, want, rtol=1e-4, atol=1e-4)
        assert choice.candidate == int(np.argmax(want)) and choice.omitted == tuple(sets[choice.candidate])
        chosen.append(choice.candidate)
    assert len(set(chosen)) >= 2, chosen  # the head follows the prompt
    assert db.ensure_default_bundle(data_dir=data, preset="qwen2.5-coder-1.5b") == path and len(calls) == 1
    # a shipped default_routing.json (the preset's measured quality says dense): rebuilt, and every command
    # runs dense unless --routed; routed, the same choices as above
    (data / "default_routing.json").write_text(json.dumps({"mode": "dense", "reason": "measured: code suffers"}))
    db.ensure_default_bundle(data_dir=data, preset="qwen2.5-coder-1.5b")
    assert len(calls) == 2 and read_manifest(path).default_routing == {"mode": "dense", "reason": "measured: code suffers"}
    from pudding_mlx.routing import choose, choose_and_prefill

    dense_default = load(str(path))
    assert dense_default.dense_by_default == "measured: code suffers"
    choice = choose(dense_default, "def add(a, b):")
    assert (choice.how, choice.omitted, choice.candidate) == ("dense-default", (), None)
    ids = dense_default.tokenizer.encode("def add(a, b):")
    assert choose_and_prefill(dense_default, "def add(a, b):", ids)[0].how == "dense-default"
    routed = load(str(path), routed=True)
    assert routed.dense_by_default is None and choose(routed, "def add(a, b):").candidate == chosen[3]
    def ok(*args):
        done = run_cli(*map(str, args))
        assert done.returncode == 0, done.stderr
        return done

    out = json.loads(ok("generate", path, "-p", "def add(a, b):", "-m", "2", "--json").stdout)
    assert (out["routing"], out["omitted"]) == ("dense-default", [])
    out = json.loads(ok("generate", path, "-p", "def add(a, b):", "-m", "2", "--json", "--routed").stdout)
    assert (out["routing"], out["candidate"]) == ("routed", chosen[3])
    footer = ok("generate", path, "-p", "hi", "-m", "2").stderr
    assert "Route: dense (6/6 blocks), running dense by default: measured: code suffers (--routed to route)" in footer
    bad = run_cli("generate", str(path), "-p", "hi", "--routed", "--dense")
    assert bad.returncode == 2 and "--routed and --dense contradict each other" in bad.stderr
    mx.save_safetensors(str(data / "head.safetensors"), {"weight": mx.ones((3, 64)), "bias": mx.zeros((3,))})
    db.ensure_default_bundle(data_dir=data, preset="qwen2.5-coder-1.5b")
    assert len(calls) == 3  # the shipped head changed: rebuilt
    # the SmolLM2 preset lives in its own folder, untouched
    assert not db.bundle_path("smollm2-135m").exists()


def test_shipped_preset_data_is_consistent():
    """What the package ships for each preset: the candidate sets, and a router scoring exactly those
    sets (the Qwen head: [10 sets, 1536 x pools] reading after block 3, which no set omits)."""
    import mlx.core as mx

    from pudding_mlx.candidates import read_candidates
    from pudding_mlx.convert import default_bundle as db

    assert db.DEFAULT_PRESET == "qwen2.5-coder-1.5b" and db.preset_of(None).name == db.DEFAULT_PRESET
    for p in db.PRESETS.values():
        assert db.has_shipped_router(preset=p.name), p.name
        sets = [sorted(c["omitted"]) for c in read_candidates(p.data_dir / "candidates.json") if c.get("task") != "mix"]
        if p.router_kind == "hidden":
            r = json.loads((p.data_dir / "router.json").read_text())
            assert [sorted(s) for s in r["sets"]] == sets and len(sets) == 10
            assert min(min(s) for s in sets) > r["after"] == 3
            w = mx.load(str(p.data_dir / "head.safetensors"))
            assert w["weight"].shape == (10, 1536 * len(r["pooling"].split("+"))) and w["bias"].shape == (10,)


@pytest.mark.parametrize("args, message", [
    (["--preset", "llama-70b"], "--preset 'llama-70b': choose one of qwen2.5-coder-1.5b, smollm2-135m"),
    (["some-bundle", "--preset", "smollm2-135m"], "give either MODEL or --preset"),
])
def test_bad_preset_is_one_line(args, message):
    from helpers import run_cli

    done = run_cli("chat", *args, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
