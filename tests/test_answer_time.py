"""Time to a complete answer (`bench --answers`): the prompt order, the paired comparison with dense, and real
answers on a small model (dense equal to `generate`, routed through the router even where the bundle's default
is dense)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from pudding_mlx import answer_bench as AB
from pudding_mlx import answer_time as A
from pudding_mlx.generate import generate, prompt_tokens
from pudding_mlx.load import load

from helpers import run_cli


def test_prompts_alternate_chat_and_code():
    prompts = A.answer_prompts()
    assert len(prompts) == 48 and len({p["id"] for p in prompts}) == 48
    assert [p["kind"] for p in prompts[:4]] == ["chat", "code", "chat", "code"]
    assert [p["id"] for p in A.answer_prompts(5)] == [p["id"] for p in prompts[:5]]


def _rec(seconds, tokens, finished=True, omitted=()):
    return {"seconds": seconds, "token_ids": list(range(tokens)), "finished": finished, "omitted": list(omitted)}


def test_compare_is_paired_per_prompt():
    dense = [_rec(2.0, 20), _rec(4.0, 40), _rec(1.0, 10)]
    fast_but_long = [_rec(1.0, 20), _rec(5.0, 80, False, (3,)), _rec(0.5, 10)]
    rows = A.compare({"dense": dense, "x": fast_but_long})
    x = rows["x"]
    assert x["answer_speedup"] == pytest.approx(np.median([2.0, 0.8, 2.0]))
    assert x["total_speedup"] == pytest.approx(7.0 / 6.5)
    assert x["token_speedup"] == pytest.approx((110 / 6.5) / (70 / 7.0))
    assert x["tokens_vs_dense"] == pytest.approx(110 / 70) and x["hit_limit"] == 1
    assert x["identical"] == pytest.approx(100 * 2 / 3)  # the same token ids on prompts 1 and 3
    assert rows["dense"]["answer_speedup"] == 1.0 and rows["dense"]["identical"] == 100.0
    lo, hi = x["answer_speedup_ci95"]
    assert 0.8 <= lo <= x["answer_speedup"] <= hi <= 2.0
    assert "too few prompts" in A.row_summary(x)  # 3 < MIN_CLAIM_PROMPTS: no verdict


class PicksSecond:
    """A stand-in router (the decision path is what is tested here): always candidate 1."""

    def best(self, text):
        return 1, [0.1, 0.9], 0.5


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    loaded = load(str(tiny_llm_dir))
    loaded.manifest = SimpleNamespace(candidates=[SimpleNamespace(omitted=(1, 3)), SimpleNamespace(omitted=(2,))])
    loaded.router = PicksSecond()
    loaded.dense_by_default = "measured: routing costs quality"  # the routed row must route anyway
    return loaded


def test_answers_are_what_generate_gives(tiny):
    configs = AB.configurations(tiny)
    assert configs == {"dense": (), "omit 1,3": (1, 3), "omit 2": (2,), "routed": None}
    prompts = A.answer_prompts(3)
    result = AB.measure_answers(tiny, configs, prompts, max_tokens=8, rounds=2, progress=lambda line: None)
    assert tiny.dense_by_default == "measured: routing costs quality"  # lifted only inside the routed answers
    assert result["default"] == "dense" and result["rounds"] == 2 and result["prompts"] == [p["id"] for p in prompts]
    for p, rec in zip(prompts, result["answers"]["dense"]):
        ref = generate(tiny.model, tiny.tokenizer, prompt_tokens(tiny.tokenizer, p["text"]), (), max_tokens=8)
        stop = ref.finish_reason == "stop"
        assert rec["tokens"] == len(ref.token_ids) - stop and rec["finished"] == stop
        assert len(rec["seconds_rounds"]) == 2 and rec["seconds"] == pytest.approx(np.median(rec["seconds_rounds"]), abs=1e-4)
    assert all(r["omitted"] == [2] and r["router_ms"] == 0.5 for r in result["answers"]["routed"])
    rows = result["rows"]
    assert rows["routed"]["sets"] == {"2": 3}
    # routed went to [2] for every prompt: the same answers as the fixed set
    assert [r["tokens"] for r in result["answers"]["routed"]] == [r["tokens"] for r in result["answers"]["omit 2"]]
    assert rows["routed"]["identical"] == rows["omit 2"]["identical"]
    assert set(rows) == set(configs) and len(result["summary"]) == 3
    again = A.rescore(result, drop=[prompts[0]["id"]])
    assert again["omit 2"]["n"] == 2 and again["omit 2"]["identical"] is None


def test_bench_answers_cli(tiny_llm_dir, tmp_path):
    done = run_cli("bench", tiny_llm_dir, "--answers", "--omit", "1,3;2", "--limit", "2", "-m", "4",
                   "--json", tmp_path / "a.json", "--plot", tmp_path / "a.png")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "a.json").read_text())
    assert list(result["rows"]) == ["dense", "omit 1,3", "omit 2"]  # no router: no routed row
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    assert "time to a complete answer" in done.stderr + done.stdout


@pytest.mark.parametrize("args, message", [
    (["--shape", "small", "--answers"], "--answers needs MODEL"),
    (["MODEL", "--answers", "--omit", ";"], "no set given"),
])
def test_bench_answers_bad_input_is_one_line(tiny_llm_dir, args, message):
    done = run_cli("bench", *[str(tiny_llm_dir) if a == "MODEL" else a for a in args])
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
