"""Generation on the PyTorch side (`train generate`): skipped blocks with a KV cache equal a cache-free greedy
decode; the set list; resumable, sharded runs; the report on the committed Qwen run."""

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pudding_mlx import humaneval as he  # noqa: E402
from pudding_mlx.train import generation as G  # noqa: E402
from pudding_mlx.train.features import prompt_ids  # noqa: E402
from pudding_mlx.train.scoring import find_decoder, skip_blocks  # noqa: E402

pytestmark = pytest.mark.torch
RUN = Path(__file__).resolve().parents[1] / "results" / "qwen2.5-coder-1.5b"


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers' init is too weak for the context to matter: scale the blocks up
        for p in model.model.layers.parameters():
            if p.ndim == 2:
                p.mul_(4)
    return model, AutoTokenizer.from_pretrained(tiny_hf_dir)


def _greedy_no_cache(model, tokenizer, text, omitted, n):
    x = torch.tensor([prompt_ids(tokenizer, text, 1 << 30)])
    out = []
    with torch.no_grad(), skip_blocks(model, omitted):
        for _ in range(n):
            nxt = int(model(x, use_cache=False).logits[0, -1].argmax())
            if nxt in G.stop_ids(model, tokenizer):
                break
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


def test_generate_with_skipped_blocks_equals_a_cache_free_decode(tiny):
    """Batched, left-padded, KV-cached generation with blocks skipped (the kept attention modules renumbered
    as cache keys) gives each prompt the tokens a full recompute without a cache gives it."""
    model, tok = tiny
    msgs = ["Write a function", "Why is the sky blue? Explain in detail please.", "hi"]
    idx = [l.self_attn.layer_idx for l in find_decoder(model).layers]
    for omitted in ([], [2, 4], [1, 2, 3]):
        replies = G.generate(model, tok, msgs, omitted, max_new_tokens=10, batch_size=3)
        for m, r in zip(msgs, replies):
            want = _greedy_no_cache(model, tok, m, omitted, 10)
            assert r["token_ids"] == want and r["finished"] == (len(want) < 10) and r["batch"] == 3
        assert len({tuple(r["token_ids"]) for r in replies}) > 1  # the replies depend on the prompt
    assert [l.self_attn.layer_idx for l in find_decoder(model).layers] == idx  # restored


def test_generate_splits_a_batch_the_gpu_cannot_hold(tiny, monkeypatch):
    """A batch that runs out of GPU memory is answered in halves (down to one prompt): the same replies as
    one batch, and an out-of-memory on a single prompt still raises."""
    model, tok = tiny
    msgs = ["Write a function", "Why is the sky blue? Explain in detail please.", "hi"]
    want = G.generate(model, tok, msgs, [2], max_new_tokens=8, batch_size=3)
    real, sizes = model.generate, []

    def small_gpu(input_ids, **kw):
        sizes.append(len(input_ids))
        if len(input_ids) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(input_ids=input_ids, **kw)

    monkeypatch.setattr(model, "generate", small_gpu)
    got = G.generate(model, tok, msgs, [2], max_new_tokens=8, batch_size=3)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in want]
    assert [r["finished"] for r in got] == [r["finished"] for r in want]
    assert sizes == [3, 1, 2, 1, 1]
    monkeypatch.setattr(model, "generate", lambda **kw: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("x")))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        G.generate(model, tok, ["hi"], [], max_new_tokens=4, batch_size=1)


def test_the_sets_of_the_committed_qwen_run():
    sets = G.sets_to_run([RUN / f"cand-k{k}.json" for k in (3, 5, 7)], RUN / "cand.state.json", [1, 2])
    counts = {}
    for s in sets.values():
        counts[s["k"]] = counts.get(s["k"], 0) + 1
    assert counts == {0: 1, 1: 7, 2: 12, 3: 12, 5: 12, 7: 11}
    assert sets["omit-14"]["sources"] == ["k1/arc_easy/likelihood", "k1/hellaswag/likelihood", "k1/mix/likelihood"]
    state = json.loads((RUN / "cand.state.json").read_text())
    first_two = {G.set_name([p["removed"] for p in ph[:2]]) for ph in state["chains"].values()}
    assert first_two == {n for n, s in sets.items() if s["k"] == 2}


def test_run_generation_resumes_and_shards(tiny, tmp_path):
    model, tok = tiny
    sets = {"dense": {"omitted": [], "k": 0, "sources": ["dense"]},
            "omit-2": {"omitted": [2], "k": 1, "sources": ["x"]},
            "omit-4": {"omitted": [4], "k": 1, "sources": ["x"]},
            "omit-1-3": {"omitted": [1, 3], "k": 2, "sources": ["x"]}}
    logs = []
    G.run_generation(model, tok, {"dense": sets["dense"]}, tmp_path, limit=2, max_new_tokens=6, log=logs.append)
    G.run_generation(model, tok, sets, tmp_path, limit=2, max_new_tokens=6, shard=(1, 2), log=logs.append,
                     fidelity_max_k=1)
    assert sorted(p.stem for p in (tmp_path / "sets").glob("*.json")) == ["dense", "omit-4"]  # every 2nd from the 2nd
    assert any("dense: done before" in line for line in logs)
    four = json.loads((tmp_path / "sets" / "omit-4.json").read_text())
    assert four["humaneval"]["n"] == 2 and four["fidelity"]["n"] == 2
    # shard 0 starting after shard 1 has written its set still gets its whole share, [omit-2, omit-1-3] (a
    # split of what is left would give it [omit-2] only, and omit-1-3 to no one)
    G.run_generation(model, tok, sets, tmp_path, limit=2, max_new_tokens=6, shard=(0, 2), fidelity_max_k=1,
                     log=logs.append)
    assert sorted(p.stem for p in (tmp_path / "sets").glob("*.json")) == ["dense", "omit-1-3", "omit-2", "omit-4"]
    one_three = json.loads((tmp_path / "sets" / "omit-1-3.json").read_text())
    assert "fidelity" not in one_three  # k = 2 > fidelity_max_k
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in summary["sets"]] == ["dense", "omit-2", "omit-4", "omit-1-3"]
    # the stored replies are what the tests ran on: a recheck here gives the same verdicts
    before = {p.stem: json.loads(p.read_text())["humaneval"]["records"] for p in (tmp_path / "sets").glob("*.json")}
    G.recheck(tmp_path, log=logs.append)
    after = {p.stem: json.loads(p.read_text())["humaneval"]["records"] for p in (tmp_path / "sets").glob("*.json")}
    assert {k: [r["passed"] for r in v] for k, v in before.items()} == {k: [r["passed"] for r in v] for k, v in after.items()}


def test_the_generation_report_of_the_committed_run():
    """generation.md's figures come from the committed per-problem records: dense, every set, oracle, best
    static chosen on the fidelity prompts (never on HumanEval), the MLX rows and the parity."""
    from pudding_mlx.train.generation_report import build, load_sets, passed

    mc = json.loads((RUN / "report.json").read_text())
    answers = [RUN.parent / "bench" / f"answers_qwen_preset_{b}.json" for b in ("cuda", "cpu")]
    rep = build(RUN, RUN / "generation", "Qwen", mc, RUN / "mlx" / "generation", answers, ["answers_qwen_preset_cuda:chat-00"])
    sets = load_sets(RUN / "generation")
    ids = [r["task_id"] for r in sets["dense"]["humaneval"]["records"]]
    rows = {(r["method"], r["k"], r["name"]): r for r in rep["rows"]}
    assert rows[("dense", 0, "dense")]["pass@1"] == pytest.approx(100 * passed(sets["dense"], ids).mean())
    for k in (1, 2):
        names = [n for n, s in sets.items() if s["k"] == k]
        hits = np.stack([passed(sets[n], ids) for n in names], 1)
        assert rows[("oracle", k, f"best of the {len(names)} sets run, per problem")]["pass@1"] == \
            pytest.approx(100 * hits.any(1).mean())
        fid = {n: sets[n]["fidelity"]["prefix_kept"] for n in names}
        best = rows[("best static", k, "best static (fidelity prompts)")]
        assert best["set"] == sets[max(sorted(fid), key=lambda n: fid[n])]["omitted"]
        lo, hi = best["minus_dense_ci95"]
        assert lo <= best["pass@1"] - rows[("dense", 0, "dense")]["pass@1"] <= hi
    mlx = {r["mode"]: r for r in rep["mlx"]["rows"] if r["mode"] in ("dense", "routed")}
    assert mlx["routed"]["usage"] == {"[15, 17, 18]": 164}
    parity = {tuple(p["set"]): p for p in rep["mlx"]["parity"]}
    assert set(parity) == {(), (5,), (9, 13, 19), (15, 17, 18)}  # every fixed MLX set the PyTorch side ran
    assert parity[()]["torch"] == pytest.approx(rows[("dense", 0, "dense")]["pass@1"])
    assert parity[(15, 17, 18)]["mlx"] == pytest.approx(mlx["routed"]["pass@1"])  # routed went there for all 164
    # the time-to-answer frontier: each timed configuration beside the quality of the same configuration
    timed = {a["configuration"]: a for a in rep["answers"] if a["backend"] == "cuda"}
    on_cpu = {a["configuration"]: a for a in rep["answers"] if a["backend"] == "cpu"}
    assert on_cpu["routed"]["n_prompts"] == 8 and on_cpu["routed"]["dropped"] == []  # the drop named the CUDA file only
    assert on_cpu["routed"]["answer_speedup"] == pytest.approx(
        json.loads(answers[1].read_text())["rows"]["routed"]["answer_speedup"])
    assert timed["routed"]["pass@1_mlx"] == pytest.approx(mlx["routed"]["pass@1"]) and timed["routed"]["n_prompts"] == 23
    assert timed["omit 13,14,15"]["pass@1_torch"] == pytest.approx(rows[("static", 3, "omit-13-14-15")]["pass@1"])
    assert timed["dense"]["answer_speedup"] == 1.0
    k3_task = next(p for p in rep["router_picks"] if p["k"] == 3 and p["router"] == "hidden, task")
    assert k3_task["usage"] == {"[15, 17, 18]": 164}  # the PyTorch features pick what the MLX preset picked
