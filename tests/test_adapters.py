"""Healing adapters in the runtime (issue "Healed omission sets", item 4): a PEFT LoRA adapter trained on
PyTorch, converted, in a bundle, runs in MLX exactly as PEFT runs it (parity), only while its set is
skipped (dense stays stock mlx-lm, token for token), follows the set through chat's cache rule, and bad
adapter files fail in one line."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import run_cli  # noqa: E402

HEALED = (2, 3)  # the adapter's set; (1,) runs unhealed
MESSAGES = ["Write a haiku about rivers.", "Now one about mountains, please.", "Which one do you prefer?"]


@pytest.fixture(scope="module")
def healed_bundle(tiny_hf_dir, tmp_path_factory):
    """(bundle dir, PEFT model, PEFT folder): a tiny llama with a LoRA adapter of random (nonzero) weights on
    every linear of blocks 1..5, for the set [2, 3], converted to MLX (float32) with candidates [2, 3] and [1]."""
    from transformers import AutoModelForCausalLM

    from pudding_mlx.convert.bundle import build_bundle
    from pudding_mlx.convert.llm import convert_llm
    from pudding_mlx.train.heal import add_lora, save_adapter

    tmp = tmp_path_factory.mktemp("healed")
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    peft_model = add_lora(model, rank=4, alpha=8, layers=[1, 2, 3, 4, 5])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)  # PEFT starts B at zero: an adapter that does nothing
    save_adapter(peft_model, tmp / "peft", [list(HEALED)], {"note": "random weights, for the tests"})
    convert_llm(str(tiny_hf_dir), tmp / "llm", dtype="float32")
    bundle = build_bundle(tmp / "llm", tmp / "bundle", candidates=[list(HEALED), [1]], adapters=[tmp / "peft"])
    return bundle, peft_model, tmp / "peft"


def _torch_logits(peft_model, ids, omitted, adapter_on):
    from pudding_mlx.train.scoring import skip_blocks

    base = peft_model.get_base_model()
    with torch.no_grad(), skip_blocks(base, omitted):
        if adapter_on:
            return base(torch.tensor([ids]), use_cache=False).logits[0].numpy()
        with peft_model.disable_adapter():
            return base(torch.tensor([ids]), use_cache=False).logits[0].numpy()


@pytest.mark.parametrize("lora_terms", [False, True], ids=["fused", "lora-terms"])
def test_mlx_runs_the_adapter_as_peft_does_and_only_on_its_set(healed_bundle, lora_terms):
    """Both ways of running an adapter (merged copies, the default; LoRA terms) give PEFT's logits on an
    unquantized model (the merge is exact there up to float rounding)."""
    from pudding_mlx.adapters import LoRASwitch
    from pudding_mlx.load import load
    from pudding_mlx.skip import SkipView, decoder

    bundle, peft_model, _ = healed_bundle
    loaded = load(str(bundle), lora_terms=lora_terms)
    q = decoder(loaded.model).layers[1].self_attn.q_proj
    assert isinstance(q, LoRASwitch) and (q._lora.fused == {}) == lora_terms
    assert [a.name for a in loaded.adapters] == ["peft"] and loaded.adapters[0].blocks == [1, 2, 3, 4, 5]
    ids = loaded.tokenizer.encode("def add(a, b):\n    return a + b\n# and now multiply")
    healed = SkipView(loaded.model, HEALED)
    assert healed.adapter == "peft"
    got = np.array(healed(mx.array([ids])))[0]
    want = _torch_logits(peft_model, ids, HEALED, adapter_on=True)
    unhealed = _torch_logits(peft_model, ids, HEALED, adapter_on=False)
    assert np.abs(want - unhealed).max() > 0.05  # the adapter changes the outputs...
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)  # ...and MLX changes them as PEFT does
    off = np.array(SkipView(loaded.model, HEALED, healed=False)(mx.array([ids])))[0]
    np.testing.assert_allclose(off, unhealed, atol=2e-4, rtol=1e-4)
    other = SkipView(loaded.model, (1,))  # a set no adapter names runs as it is
    assert other.adapter is None
    np.testing.assert_allclose(np.array(other(mx.array([ids])))[0], _torch_logits(peft_model, ids, (1,), False),
                               atol=2e-4, rtol=1e-4)
    # --unhealed: nothing attached at all
    assert load(str(bundle), healed=False).adapters == [] and SkipView(load(str(bundle), healed=False).model,
                                                                       HEALED).adapter is None


def test_dense_is_stock_mlx_lm_token_for_token(healed_bundle):
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate as mlx_lm_generate

    from pudding_mlx.generate import generate
    from pudding_mlx.load import load

    bundle, _, _ = healed_bundle
    loaded = load(str(bundle))
    stock, tok = mlx_lm_load(str(bundle))
    stock.set_dtype(mx.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": MESSAGES[0]}], add_generation_prompt=True)
    ours = generate(loaded.model, loaded.tokenizer, prompt, (), max_tokens=16)
    theirs = mlx_lm_generate(stock, tok, prompt, max_tokens=16)
    assert ours.text == theirs
    ids = mx.array([prompt])
    assert mx.array_equal(loaded.model(ids), stock(ids)).item()  # the same logits, bit for bit


def test_chat_switches_adapters_with_the_set(healed_bundle):
    """Turn by turn: healed set, unhealed set, healed again, dense: each reply is the from-scratch reply of
    its set (fresh cache, whole conversation prefilled under the set and its adapter), and a change of
    adapter re-runs the cache from the first block an adapter touches."""
    from pudding_mlx.chat import ChatSession
    from pudding_mlx.generate import generate
    from pudding_mlx.load import load

    bundle, _, _ = healed_bundle
    loaded = load(str(bundle))
    model, tok = loaded.model, loaded.tokenizer
    session = ChatSession(model, tok)
    history = []
    for turn, (text, omitted) in enumerate(zip(MESSAGES + ["Thanks!"], [HEALED, (1,), HEALED, ()])):
        result = session.reply(text, omitted, max_tokens=8)
        history.append({"role": "user", "content": text})
        prompt = tok.apply_chat_template(history, add_generation_prompt=True)
        ref = generate(model, tok, prompt, omitted, max_tokens=8)
        assert result.token_ids == ref.token_ids, f"turn {turn}"
        history.append({"role": "assistant", "content": ref.text})
        if turn == 1:  # [2, 3] healed -> [1] unhealed: the old adapter touched block 1 first
            assert result.prepared.first_changed == 1
        if turn == 3:  # [2, 3] healed -> dense: the set changes at 2, the adapter at block 1
            assert result.prepared.first_changed == 1


def test_bad_adapter_files_are_one_line(healed_bundle, tmp_path, tiny_llm_dir):
    from safetensors.numpy import load_file, save_file

    bundle, _, peft_dir = healed_bundle
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    weights_path = broken / "adapters" / "peft" / "adapter.safetensors"
    w = load_file(str(weights_path))
    key = "layers.2.self_attn.q_proj.lora_a"
    w[key] = np.zeros((w[key].shape[0] + 1, w[key].shape[1]), np.float32)
    save_file(w, str(weights_path))
    done = run_cli("generate", str(broken), "--omit", "2,3", "-p", "hi", "-m", "2")
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert f"tensor '{key}' is [65, 4]" in lines[0] and "trained for another model" in lines[0]

    dora = tmp_path / "dora"
    shutil.copytree(peft_dir, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    done = run_cli("convert", "adapter", str(dora), str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "DoRA is not supported" in done.stderr
    assert not (tmp_path / "out").exists()


def test_convert_adapter_cli_and_info(healed_bundle, tmp_path):
    from pudding_mlx.adapters import read_adapter
    from pudding_mlx.load import load

    bundle, _, peft_dir = healed_bundle
    done = run_cli("convert", "adapter", str(peft_dir), str(tmp_path / "a"), "--sets", "2,3;4")
    assert done.returncode == 0, done.stderr
    loaded = load(str(bundle), healed=False)
    adapter = read_adapter(tmp_path / "a", loaded.model.model.layers)
    assert adapter.sets == [(2, 3), (4,)] and adapter.rank == 4 and adapter.scale == 2.0
    assert {k: v.shape for k, v in adapter.weights.items()} == \
        {k: v.shape for k, v in loaded_adapter_weights(bundle).items()}
    info = run_cli("info", str(bundle), "--json")
    assert info.returncode == 0, info.stderr
    got = json.loads(info.stdout)["adapters"]
    w = loaded_adapter_weights(bundle)
    merged = sum(a.shape[0] * w[k[:-len("lora_a")] + "lora_b"].shape[1] for k, a in w.items() if k.endswith("lora_a"))
    assert got == [{"name": "peft", "sets": [[2, 3]], "rank": 4, "blocks": [1, 2, 3, 4, 5], "modules": 35,
                    "parameters": got[0]["parameters"], "fused_bytes": merged + merged * 4 // 64}]
    assert got[0]["parameters"] > 0 and merged == 5 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # q,o k,v mlp


def loaded_adapter_weights(bundle):
    return mx.load(str(bundle / "adapters" / "peft" / "adapter.safetensors"))


def test_generate_says_which_adapter_ran(healed_bundle):
    bundle, _, _ = healed_bundle
    healed = run_cli("generate", str(bundle), "--omit", "2,3", "-p", "hi", "-m", "3")
    assert healed.returncode == 0, healed.stderr
    assert "omitted [2, 3] (4/6 blocks), healed by adapter 'peft'" in healed.stderr
    off = run_cli("generate", str(bundle), "--omit", "2,3", "-p", "hi", "-m", "3", "--unhealed")
    assert "omitted [2, 3] (4/6 blocks), unhealed (--unhealed)" in off.stderr
    other = run_cli("generate", str(bundle), "--omit", "1", "-p", "hi", "-m", "3", "--json")
    assert json.loads(other.stdout)["adapter"] is None
    assert json.loads(run_cli("generate", str(bundle), "--omit", "2,3", "-p", "hi", "-m", "3", "--json")
                      .stdout)["adapter"] == "peft"


def test_a_routed_prefill_needs_adapters_off_the_blocks_the_router_reads(healed_bundle):
    """The free routed prefill runs blocks 0..after before the set is known: an adapter there is refused."""
    from pudding_mlx.adapters import check_routable
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.load import load

    loaded = load(str(healed_bundle[0]))
    check_routable(loaded.model, 0, "b")  # the adapter starts at block 1
    with pytest.raises(PuddingError, match="adapter 'peft' changes block 1, which the router reads after"):
        check_routable(loaded.model, 1, "b")


def test_the_routed_prefill_continues_under_the_chosen_sets_adapter(healed_bundle):
    """A hidden-state router reading after block 0 picks [2, 3] inside the first turn's prefill: blocks 1..5
    then run with the set's adapter, and the reply is the from-scratch healed reply (not the unhealed one)."""
    from pudding_mlx.bundle import Candidate, Manifest
    from pudding_mlx.chat import ChatSession
    from pudding_mlx.generate import generate
    from pudding_mlx.hidden_router import HiddenRouter
    from pudding_mlx.load import Loaded, load

    bundle, _, _ = healed_bundle
    loaded = load(str(bundle))
    model, tok = loaded.model, loaded.tokenizer
    cands = [list(HEALED), [1]]
    settings = {"after": 0, "pooling": "mean", "fallback": 1, "margin_is": "-inf (always the argmax)",
                "max_tokens": 4096, "sets": cands}

    class PicksTheHealedSet(HiddenRouter):
        def decide(self, scores):
            return 0

    router = PicksTheHealedSet(model, tok, settings, mx.zeros((2, model.args.hidden_size)), mx.zeros((2,)), None)
    session = ChatSession.from_loaded(Loaded(model, tok, bundle, Manifest(6, [Candidate(tuple(c)) for c in cands]),
                                             router, adapters=loaded.adapters))
    result = session.routed_reply(MESSAGES[0], max_tokens=8)
    assert result.omitted == HEALED and result.prepared.held is not None  # routed inside the prefill
    prompt = tok.apply_chat_template([{"role": "user", "content": MESSAGES[0]}], add_generation_prompt=True)
    assert result.token_ids == generate(model, tok, prompt, HEALED, max_tokens=8).token_ids
    plain = load(str(bundle), healed=False)
    assert result.token_ids != generate(plain.model, tok, prompt, HEALED, max_tokens=8).token_ids  # it mattered


def test_bench_times_the_adapter_against_the_same_set_unhealed(healed_bundle, tmp_path):
    """bench on a bundle whose static set is healed: the unhealed set is timed in the same rounds and the
    row gives healed_over_unhealed = unhealed / healed time, from the per-round times it keeps."""
    bundle, _, _ = healed_bundle
    out = tmp_path / "b.json"
    done = run_cli("bench", str(bundle), "--omit", "2,3", "--runs", "5", "--cells", "16+4", "--no-memory",
                   "--json", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["static_adapter"] == "peft"
    row = result["rows"][0]
    per_round = [u / s for u, s in zip(row["times"]["unhealed"], row["times"]["static"])]
    assert row["healed_over_unhealed"] == pytest.approx(float(np.median(per_round)))
    assert "healed/unhealed" in done.stdout + done.stderr
    assert any("the adapter's cost" in line for line in result["summary"])


@pytest.mark.parametrize("flag", [[], ["--unhealed"]])
def test_eval_runs_healed_and_unhealed(healed_bundle, tmp_path, flag):
    from pathlib import Path

    bundle, _, _ = healed_bundle
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
    done = run_cli("eval", str(bundle), "--omit", "2,3", "--tasks", "piqa", "--limit", "2", "--data-dir", str(data),
                   "--json", str(tmp_path / "e.json"), *flag)
    assert done.returncode == 0, done.stderr


def test_adaptive_depth_runs_the_chosen_sets_adapter(healed_bundle):
    """--max-loss (issue "Adaptive depth") picks [2, 3] inside the routed prefill (the predictor reads after
    block 0, the adapter starts at block 1): the set's adapter runs, token for token as --omit 2,3 healed."""
    import numpy as np

    from pudding_mlx.adaptive import LossPredictor, write_predictor
    from pudding_mlx.convert.bundle import build_bundle

    _, _, peft = healed_bundle
    tmp = peft.parent
    hidden = json.loads((tmp / "llm" / "config.json").read_text())["hidden_size"]
    sets = [[], list(HEALED), [1]]
    write_predictor(tmp / "pred", LossPredictor(sets, 0, "mean", 64, np.zeros((3, hidden), np.float32),
                                                np.array([0.0, 0.125, 0.5], np.float32), 0.0, {"loss": "test"}))
    bundle = build_bundle(tmp / "llm", tmp / "adaptive-bundle", candidates=[list(HEALED), [1]],
                          adapters=[peft], predictor=tmp / "pred")

    def gen(*flags):
        done = run_cli("generate", str(bundle), "-p", "hi", "-m", "6", "--json", *flags)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    got, fixed = gen("--max-loss", "0.2"), gen("--omit", "2,3")
    assert got["omitted"] == list(HEALED) and got["adapter"] == "peft" and got["token_ids"] == fixed["token_ids"]
    unhealed = gen("--max-loss", "0.2", "--unhealed")
    assert unhealed["token_ids"] == gen("--omit", "2,3", "--unhealed")["token_ids"]
    assert unhealed["token_ids"] != got["token_ids"]  # the adapter mattered
    assert gen("--max-loss", "0.1")["omitted"] == []  # nothing fits: dense, no adapter


def test_a_fused_adapter_on_a_quantized_model_keeps_its_effect(healed_bundle, tiny_hf_dir, tmp_path):
    """On a 4-bit model the merged copy is quantized again (pudding_mlx.adapters, "fused") at 8 bits and the
    base's group size: it lands far nearer the exact LoRA-term output than the unhealed set does, where a
    4-bit copy (mlx-lm's plain fuse) would not; dense is untouched either way (bit for bit the same logits)."""
    import mlx.nn as nn

    from pudding_mlx.convert.bundle import build_bundle
    from pudding_mlx.convert.llm import convert_llm
    from pudding_mlx.load import load
    from pudding_mlx.skip import SkipView, decoder

    _, _, peft_dir = healed_bundle
    convert_llm(str(tiny_hf_dir), tmp_path / "llm", quantize_bits=4, group_size=32, dtype="float32")
    bundle = build_bundle(tmp_path / "llm", tmp_path / "bundle", candidates=[list(HEALED), [1]], adapters=[peft_dir])
    fused, exact = load(str(bundle)), load(str(bundle), lora_terms=True)
    q = decoder(fused.model).layers[1].self_attn.q_proj
    assert isinstance(q.base, nn.QuantizedLinear)
    copy = q._lora.fused["peft"]
    assert isinstance(copy, nn.QuantizedLinear) and (copy.bits, copy.group_size) == (8, q.base.group_size)
    ids = mx.array([fused.tokenizer.encode("def add(a, b):\n    return a + b\n# and now multiply")])
    got = np.array(SkipView(fused.model, HEALED)(ids))[0]
    want = np.array(SkipView(exact.model, HEALED)(ids))[0]
    unhealed = np.array(SkipView(exact.model, HEALED, healed=False)(ids))[0]
    effect, error = np.abs(want - unhealed).mean(), np.abs(got - want).mean()
    assert effect > 0.05 and error < 0.25 * effect, (effect, error)
    assert mx.array_equal(fused.model(ids), exact.model(ids)).item()  # dense: the base weights, not the copies
    # why 8 bits: the same merge quantized at the base's 4 bits keeps far less of the adapter's effect
    from mlx_lm.tuner.lora import LoRALinear

    for block in decoder(fused.model).layers:
        for switch in [m for _, m in block.named_modules() if hasattr(m, "_lora") and "peft" in m._lora.fused]:
            a, b, scale = switch._lora.by_name["peft"]
            lora = LoRALinear.from_base(switch.base, r=a.shape[1], scale=scale)
            lora.lora_a, lora.lora_b = a, b
            switch._lora.fused["peft"] = lora.fuse()  # mlx-lm's default: the base's own 4 bits
    four_bit = np.array(SkipView(fused.model, HEALED)(ids))[0]
    assert np.abs(four_bit - want).mean() > 2 * error


def test_merged_copies_count_against_memory(healed_bundle, monkeypatch):
    """`fused_bytes` is what the copies take (within 5%), and a device that holds the weights but not the
    copies refuses the fused load in one line naming --lora-terms; --lora-terms then loads."""
    import mlx.utils

    from pudding_mlx import weights as W
    from pudding_mlx.adapters import fused_bytes
    from pudding_mlx.errors import PuddingError
    from pudding_mlx.load import load
    from pudding_mlx.skip import decoder

    bundle, _, _ = healed_bundle
    loaded = load(str(bundle))
    layers = decoder(loaded.model).layers
    copies = [m._lora.fused["peft"] for block in layers for _, m in block.named_modules()
              if hasattr(m, "_lora") and "peft" in m._lora.fused]
    made = sum(v.nbytes for c in copies for _, v in mlx.utils.tree_flatten(c.parameters()) if v.ndim == 2)
    assert len(copies) == 5 * 7 and abs(fused_bytes(layers, loaded.adapters) - made) <= 0.05 * made
    weights = W.weights_summary(bundle, 4)["loaded_bytes"]
    monkeypatch.setattr(W, "memory_size", lambda: weights + made // 2)
    with pytest.raises(PuddingError, match="--lora-terms") as e:
        load(str(bundle))
    assert len(str(e.value).splitlines()) == 1
    assert load(str(bundle), lora_terms=True).adapters
