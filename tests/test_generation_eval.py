"""Generation measured on MLX: batched = one at a time, fidelity's agreement, and `pudding-mlx eval --tasks
humaneval` end to end on the real SmolLM2 on this CPU (code run in the sandbox)."""

import json

import pytest

from pudding_mlx import generation_eval as G
from pudding_mlx import humaneval as he
from pudding_mlx.generate import generate, prompt_tokens
from pudding_mlx.load import load

from helpers import run_cli


def test_first_difference_and_agreement():
    assert G.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert G.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert G.first_difference([1, 2], [1, 2, 3]) == 2  # a longer reply differs where the shorter ends
    a = G.agreement([[1, 2, 3, 4], [7, 8], [1]], [[1, 2, 3, 4], [7, 9], [2]])
    assert a["identical"] == pytest.approx(100 / 3) and a["first_difference_median"] == 1
    assert a["per_prompt"] == [1.0, 0.5, 0.0] and a["prefix_kept"] == pytest.approx(50.0)


def test_chat_prompts_are_fixed_and_not_humaneval():
    prompts = G.chat_prompts()
    assert len(prompts) == 48 and {p["kind"] for p in prompts} == {"chat", "code"}
    assert len({p["id"] for p in prompts}) == 48
    texts = {p["text"] for p in prompts}
    assert not any(pr.prompt.strip() in t for pr in he.load_problems() for t in texts)


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return load(str(tiny_llm_dir))


def test_batched_replies_equal_one_at_a_time(tiny):
    """mlx-lm's batch_generate on a SkipView gives each prompt the tokens `generate` gives it alone (float32,
    CPU), without the stop token; `finished` says whether it stopped before the limit."""
    msgs = ["Write a function that adds two numbers.", "hi", "Why is the sky blue? Explain it in detail, please."]
    for omitted in ((), (1, 3)):
        one = G.generate_replies(tiny, msgs, omitted, max_tokens=12, batch_size=1)
        batch = G.generate_replies(tiny, msgs, omitted, max_tokens=12, batch_size=3)
        assert [r.token_ids for r in one] == [r.token_ids for r in batch]
        assert [r.batch for r in batch] == [3, 3, 3] and all(r.omitted == list(omitted) for r in batch)
        for m, r in zip(msgs, one):
            ref = generate(tiny.model, tiny.tokenizer, prompt_tokens(tiny.tokenizer, m), omitted, max_tokens=12)
            stop = ref.finish_reason == "stop"
            assert r.finished == stop and r.token_ids == (ref.token_ids[:-1] if stop else ref.token_ids)
            assert r.text == tiny.tokenizer.decode(r.token_ids)


def test_fidelity_compares_with_dense_in_the_same_run(tiny):
    prompts = G.chat_prompts()[:3]
    same = G.fidelity(tiny, prompts, (), max_tokens=10, batch_size=3)
    assert same["identical"] == 100.0 and same["prefix_kept"] == 100.0
    other = G.fidelity(tiny, prompts, (1, 2, 3), max_tokens=10, batch_size=3)
    dense = G.generate_replies(tiny, [p["text"] for p in prompts], (), max_tokens=10, batch_size=3)
    mine = G.generate_replies(tiny, [p["text"] for p in prompts], (1, 2, 3), max_tokens=10, batch_size=3)
    want = G.agreement([r.token_ids for r in dense], [r.token_ids for r in mine])
    assert other["identical"] == want["identical"] and other["prefix_kept"] == pytest.approx(want["prefix_kept"])
    assert [r["prefix_kept"] for r in other["records"]] == want["per_prompt"]
    assert other["by_kind"]["chat"]["identical"] == want["identical"]


@pytest.fixture(scope="module")
def smol_float(tmp_path_factory, smollm2_gguf):
    out = tmp_path_factory.mktemp("smol") / "smol-f32"
    done = run_cli("convert", "llm", smollm2_gguf, out, "--dequantize", "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    return out


def test_eval_humaneval_end_to_end_on_smollm2(smol_float, tmp_path):
    """The real model, the real problems, the real sandbox: three problems generated (blocks 5-24 skipped, to
    keep this CPU's run short) and run; every record's verdict is what the sandbox says of its text."""
    out = tmp_path / "he.json"
    omit = ",".join(map(str, range(5, 25)))
    done = run_cli("eval", smol_float, "--tasks", "humaneval", "--limit", "3", "--max-tokens", "8",
                   "--omit", omit, "--batch-size", "3", "--json", out)
    assert done.returncode == 0, done.stderr
    assert "humaneval: pass@1" in done.stdout and "Route: omit, omitted" in done.stderr
    payload = json.loads(out.read_text())
    task = payload["tasks"]["humaneval"]
    assert payload["omitted"] == list(range(5, 25)) and task["n"] == 3 and task["max_tokens"] == 8
    problems = he.load_problems(limit=3)
    assert [r["task_id"] for r in task["records"]] == [p.task_id for p in problems]
    for p, r in zip(problems, task["records"]):
        assert 1 <= r["tokens"] <= 8 and r["finished"] == (r["tokens"] < 8) and r["omitted"] == list(range(5, 25))
        again = he.check(p, r["text"])
        assert (again.passed, again.result) == (r["passed"], r["result"])
    assert task["pass@1"] == pytest.approx(100 * sum(r["passed"] for r in task["records"]) / 3)
    assert sum(task["outcomes"].values()) == 3 and task["hit_limit"] == sum(not r["finished"] for r in task["records"])


@pytest.mark.parametrize("args, message", [
    (["--tasks", "humaneval", "--routed", "--dense"], "--routed and --dense contradict each other"),
    (["--tasks", "humaneval,nosuchtask"], "nosuchtask"),
])
def test_eval_generation_bad_input_is_one_line(tiny_llm_dir, args, message):
    done = run_cli("eval", tiny_llm_dir, *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
