"""`pudding-mlx eval`: MLX zero-shot scoring. Batched == unbatched (right padding, no mask); parity
with the PyTorch path (`train.scoring`) on the same weights, on real examples of every task, dense and
with blocks omitted; routed grouping; bad input is one line and exit 2; the --json schema."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from pudding_mlx.app.eval_cmd import register
from pudding_mlx.bundle import Candidate, Manifest
from pudding_mlx.errors import PuddingError
from helpers import evaluate_examples
from pudding_mlx.evaluate import _batches, evaluate, score_requests
from pudding_mlx.load import load
from pudding_mlx.requests import flatten, metrics
from pudding_mlx.tasks import TASKS, Request, load_task

pytestmark = pytest.mark.assets
# a few real rows of every file (tests/fixtures/make_fixtures.py): these tests need no more
DATA = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not at {DATA}")


@pytest.fixture(scope="module")
def tiny(tiny_llm_dir):
    return load(str(tiny_llm_dir))


@pytest.fixture(scope="module")
def mixed_requests():
    reqs = [Request("Question: What is the capital of France?\nAnswer:", " Paris"),
            Request("Question: What is the capital of France?\nAnswer:", " the city of Lyon, on the Rhone"),
            Request("The cat sat on the", " mat"),
            Request("", " an empty context uses the prefix token"),
            Request("A context with trailing space ", "moves to the continuation"),
            Request("x", " y")]
    if DATA.is_dir():
        for task in ("arc_easy", "hellaswag", "winogrande"):
            reqs += flatten(load_task(task, None, DATA, limit=2))
    return reqs


def cli_app():
    app = typer.Typer()
    register(app)

    @app.command("noop", hidden=True)  # a second command keeps `eval` a named subcommand
    def _noop():
        pass

    return app


def run_cli(*args, env=None):
    result = CliRunner().invoke(cli_app(), ["eval", *map(str, args)], env=env)
    return result


# -- (a) batching --------------------------------------------------------------------------------------


def test_batches_respect_limits():
    lengths = [50, 40, 30, 30, 10, 5, 5, 5]
    order = list(range(8))
    b = _batches(order, lengths, batch_size=3, batch_tokens=100)
    assert [i for x in b for i in x] == order
    for x in b:
        assert len(x) <= 3 and (len(x) == 1 or max(lengths[i] for i in x) * len(x) <= 100)
    assert _batches([0], [500], 4, 100) == [[0]]  # a long request still runs, alone


@pytest.mark.parametrize("omitted", [(), (1, 4)])
def test_batched_equals_unbatched(tiny, mixed_requests, omitted):
    # one call per request: no padding, no shared forward passes
    one = [score_requests(tiny.model, tiny.tokenizer, [r], omitted)[0] for r in mixed_requests]
    many = score_requests(tiny.model, tiny.tokenizer, mixed_requests, omitted, batch_size=64,
                          batch_tokens=100_000)
    split = score_requests(tiny.model, tiny.tokenizer, mixed_requests, omitted, batch_size=5,
                           batch_tokens=300)
    assert len(one) == len(many) == len(split) == len(mixed_requests)
    for a, b, c in zip(one, many, split):
        assert abs(a.logprob - b.logprob) < 1e-4 and abs(a.logprob - c.logprob) < 1e-4
        assert a.n_tokens == b.n_tokens == c.n_tokens and a.n_bytes == b.n_bytes
    # a skipped block changes the scores (the omission set really is applied)
    if omitted:
        dense = score_requests(tiny.model, tiny.tokenizer, mixed_requests[:3], (), batch_size=8)
        assert max(abs(a.logprob - d.logprob) for a, d in zip(one, dense)) > 1e-3


def test_shared_forward_passes():
    from pudding_mlx.evaluate import _carriers

    encoded = [([1, 2], [3]), ([1, 2], [4]), ([1, 2], [3, 5, 6]), ([1, 2], [3, 5]), ([7], [3]), ([1, 2], [9, 9])]
    inputs = [c + t[:-1] for c, t in encoded]
    # identical inputs and prefixes of a longer input (same context) ride on it; other contexts never
    assert _carriers(encoded, inputs) == [2, 2, 2, 2, 4, 5]


@pytest.mark.parametrize("omitted", [(), (2,)])
def test_shared_context_requests(tiny, omitted):
    reqs = [Request("Passage text here.\nQuestion: is it?\nAnswer:", c) for c in (" no", " yes", " yes indeed", " y")]
    together = score_requests(tiny.model, tiny.tokenizer, reqs, omitted, batch_size=1)
    alone = [score_requests(tiny.model, tiny.tokenizer, [r], omitted)[0] for r in reqs]
    for a, b in zip(together, alone):
        assert abs(a.logprob - b.logprob) < 1e-4 and a.is_greedy == b.is_greedy


@pytest.mark.parametrize("arch, bits", [("llama", None), ("llama_sliding", None), ("qwen2", None),
                                        ("qwen3", None), ("gemma3_text", None), ("llama", 4)])
def test_head_on_selected_positions_equals_full_logits(arch, bits):
    import mlx.core as mx

    from pudding_mlx.evaluate import _Scorer
    from helpers import tiny_model
    from pudding_mlx.skip import SkipView

    model = tiny_model(arch, bits)
    ids = mx.array(np.random.default_rng(0).integers(1, 200, size=(3, 14)), dtype=mx.int32)
    rows, cols = mx.array([0, 0, 1, 2, 2, 2]), mx.array([3, 13, 0, 5, 6, 13])
    for omitted in [(), (0, 2)]:
        scorer = _Scorer(model, omitted)
        assert scorer.split == (arch != "gemma3_text")
        full = SkipView(model, omitted)(ids)[rows, cols]
        got = scorer.logits_at(ids, rows, cols)
        assert got.shape == full.shape
        assert float(mx.max(mx.abs(got - full))) < 1e-4


def test_scores_are_log_probs(tiny):
    s = score_requests(tiny.model, tiny.tokenizer, [Request("The cat sat on the", " mat")])[0]
    assert s.logprob < 0 and s.n_tokens >= 1 and s.mean_logprob == s.logprob / s.n_tokens


def test_bad_omission_set(tiny):
    with pytest.raises(PuddingError, match="out of range"):
        score_requests(tiny.model, tiny.tokenizer, [Request("a", " b")], (6,))


# -- (b) parity with the PyTorch path -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tiny_hf_dir, tmp_path_factory):
    """The same tiny random Llama weights on both sides: PyTorch float32 CPU, and MLX float32."""
    pytest.importorskip("torch")
    from pudding_mlx.convert.llm import convert_llm
    from helpers import load_model

    out = convert_llm(tiny_hf_dir, tmp_path_factory.mktemp("conv") / "mlx", dtype="float32")
    from transformers import AutoTokenizer

    return load(str(out)), load_model(str(tiny_hf_dir), device="cpu"), AutoTokenizer.from_pretrained(tiny_hf_dir)


@pytest.mark.torch
@needs_data
@pytest.mark.parametrize("omitted", [(), (1, 3)])
def test_parity_with_pytorch(pair, omitted):
    from pudding_mlx.train import scoring

    mlx_side, torch_model, hf_tok = pair
    for task in TASKS:
        examples = load_task(task, None, DATA, limit=3)
        reqs = flatten(examples)
        ref = scoring.score_requests(torch_model, hf_tok, reqs, omitted, batch_size=4, device="cpu")
        got = score_requests(mlx_side.model, mlx_side.tokenizer, reqs, omitted, batch_size=4)
        diff = max(abs(a.logprob - b.logprob) for a, b in zip(ref, got))
        assert diff < 1e-3, (task, diff)
        assert [a.n_tokens for a in ref] == [b.n_tokens for b in got], task
        assert [a.n_bytes for a in ref] == [b.n_bytes for b in got], task
        m_ref, m_got = metrics(examples, ref), metrics(examples, got)
        assert m_ref["acc"] == m_got["acc"] and m_ref["acc_norm"] == m_got["acc_norm"], task
        assert (m_ref["correct"] == m_got["correct"]).all() and (m_ref["correct_norm"] == m_got["correct_norm"]).all()
        via = evaluate_examples(mlx_side.model, mlx_side.tokenizer, examples, omitted)
        assert via["acc"] == m_got["acc"] and via["n"] == 3


# -- routed ---------------------------------------------------------------------------------------------


class FakeRouter:
    """Deterministic: candidate = len(text) % 3; `best` as pudding_mlx.router.Router.best."""

    def best(self, text):
        m = len(text) % 3
        return m, [float(i == m) for i in range(3)], 1.5


@pytest.fixture
def routed(tiny_llm_dir):
    loaded = load(str(tiny_llm_dir))
    loaded.manifest = Manifest(num_blocks=6, candidates=[Candidate((1, 3)), Candidate((2,)), Candidate((0, 4, 5))])
    loaded.router = FakeRouter()
    return loaded


@needs_data
def test_routed_groups_by_candidate(routed):
    examples = {t: load_task(t, None, DATA, limit=4) for t in ("arc_easy", "boolq")}
    res = evaluate(routed, examples, None, batch_size=3)
    cands = [c.omitted for c in routed.manifest.candidates]
    assert res["routing"]["candidates"] == [list(c) for c in cands]
    assert sum(res["routing"]["usage"]) == 8 and res["routing"]["router_ms_mean"] == pytest.approx(1.5)
    assert "omitted" not in res
    for task, exs in examples.items():
        # reference: each example scored alone with its router-chosen set
        scores = []
        for e in exs:
            scores += score_requests(routed.model, routed.tokenizer, e.requests, cands[len(e.router_text) % 3])
        ref = metrics(exs, scores)
        r = res["tasks"][task]
        assert (r["acc"], r["acc_norm"], r["n"]) == (ref["acc"], ref["acc_norm"], 4)
        assert r["usage"] == [sum(len(e.router_text) % 3 == m for e in exs) for m in range(3)]
    assert res["routing"]["usage"] == [sum(x) for x in zip(*(res["tasks"][t]["usage"] for t in examples))]


@needs_data
def test_fixed_set_matches_evaluate_examples(tiny):
    examples = {"piqa": load_task("piqa", None, DATA, limit=3)}
    res = evaluate(tiny, examples, (2, 3))
    ref = evaluate_examples(tiny.model, tiny.tokenizer, examples["piqa"], (2, 3))
    assert res["omitted"] == [2, 3] and "routing" not in res
    assert res["tasks"]["piqa"] == {"acc": ref["acc"], "acc_norm": ref["acc_norm"], "n": 3, "metric": "acc"}


def test_routed_needs_a_router(tiny):
    with pytest.raises(PuddingError, match="no router"):
        evaluate(tiny, {"piqa": []}, None)


# -- (c) bad input -------------------------------------------------------------------------------------


def _one_line_error(result, needle):
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert result.stdout == ""


@needs_data
def test_unknown_task(tiny_llm_dir):
    _one_line_error(run_cli(tiny_llm_dir, "--tasks", "arc_easy,nosuchtask", "--data-dir", DATA),
                    "unknown task 'nosuchtask'")


def test_missing_data_dir(tiny_llm_dir, tmp_path):
    env = {"PUDDING_MLX_DATA": ""}
    # no local folder: the hub; offline with nothing cached, one line naming both ways
    offline = dict(env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    _one_line_error(run_cli(tiny_llm_dir, "--tasks", "piqa", env=offline),
                    "cannot read ybisk/piqa split 'validation' from the Hugging Face hub")
    _one_line_error(run_cli(tiny_llm_dir, "--tasks", "piqa", "--data-dir", tmp_path / "nope", env=env),
                    "does not exist")
    _one_line_error(run_cli(tiny_llm_dir, "--tasks", "piqa", "--data-dir", tmp_path, env=env),
                    "missing benchmark file")


@needs_data
@pytest.mark.parametrize("args, needle", [
    (["--dense", "--omit", "1"], "contradict"),
    (["--omit", "1,x"], "--omit"),
    (["--omit", "9"], "out of range"),
    (["--tasks", " , "], "--tasks"),
])
def test_bad_flags(tiny_llm_dir, args, needle):
    if "--tasks" not in args:
        args = ["--tasks", "piqa", *args]
    _one_line_error(run_cli(tiny_llm_dir, *args, "--limit", 1, "--data-dir", DATA), needle)


@needs_data
def test_bad_model(tmp_path):
    _one_line_error(run_cli(tmp_path / "nomodel", "--tasks", "piqa", "--data-dir", DATA), "nomodel")


# -- (d) --json ------------------------------------------------------------------------------------------


def _check_tasks(payload, tasks, n):
    assert list(payload["tasks"]) == tasks
    for t in tasks:
        r = payload["tasks"][t]
        assert r["n"] == n and isinstance(r["n"], int)
        for k in ("acc", "acc_norm"):
            assert isinstance(r[k], float) and 0.0 <= r[k] <= 100.0
        assert r["metric"] in ("acc", "acc_norm")


@needs_data
def test_json_file_omit(tiny_llm_dir, tmp_path):
    out = tmp_path / "r.json"
    res = run_cli(tiny_llm_dir, "--tasks", "arc_easy,boolq", "--limit", 2, "--omit", "1,2",
                  "--json", out, "--data-dir", DATA)
    assert res.exit_code == 0, res.output
    assert "arc_easy" in res.stdout  # the table still goes to stdout
    payload = json.loads(out.read_text())
    assert payload["omitted"] == [1, 2] and payload["mode"] == "omit" and "routing" not in payload
    assert payload["limit"] == 2 and payload["n_blocks"] == 6 and payload["seconds"] >= 0
    _check_tasks(payload, ["arc_easy", "boolq"], 2)
    # the same figures as the library call
    exs = {t: load_task(t, None, DATA, limit=2) for t in ("arc_easy", "boolq")}
    ref = evaluate(load(str(tiny_llm_dir)), exs, (1, 2))
    assert {t: payload["tasks"][t] for t in exs} == ref["tasks"]


@needs_data
def test_json_stdout_dense_and_env_data(tiny_llm_dir):
    res = run_cli(tiny_llm_dir, "--tasks", "winogrande", "--limit", 2, "--dense", "--json", "-",
                  env={"PUDDING_MLX_DATA": str(DATA)})
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)  # stdout is exactly one JSON object
    assert payload["omitted"] == [] and payload["mode"] == "dense"
    _check_tasks(payload, ["winogrande"], 2)


def test_eval_reads_the_hub(tiny_llm_dir, monkeypatch, tmp_path):
    """`eval --data-dir hub` (and no --data-dir at all) reads the tasks with `datasets` and scores
    exactly what the local files give (the hub's layout: tests/fixtures/hub, a mirror of its repos)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    env = {"PUDDING_MLX_HUB_MIRROR": str(DATA.parent / "hub"), "PUDDING_MLX_DATA": ""}
    args = ("--tasks", "piqa,boolq,mmlu", "--limit", 3, "--dense", "--json", "-")
    local = run_cli(tiny_llm_dir, *args, "--data-dir", DATA, env=env)
    assert local.exit_code == 0, local.output
    for where in (("--data-dir", "hub"), ()):
        hub = run_cli(tiny_llm_dir, *args, *where, env=env)
        assert hub.exit_code == 0, hub.output
        got, want = json.loads(hub.stdout), json.loads(local.stdout)
        assert got["tasks"] == want["tasks"] and all(t["n"] == 3 for t in got["tasks"].values())


@needs_data
def test_json_routed_and_no_router(tiny_llm_dir, monkeypatch):
    import pudding_mlx.load as L

    res = run_cli(tiny_llm_dir, "--tasks", "piqa", "--limit", 2, "--json", "-", "--data-dir", DATA)
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["mode"] == "no-router" and payload["omitted"] == [] and "no router" in res.stderr

    real = L.load

    def fake_load(model, dtype=None, lazy=True, with_router=True, routed=False, healed=True, max_loss=None, lora_terms=False):
        loaded = real(model, dtype=dtype, lazy=lazy, with_router=with_router, routed=routed, healed=healed)
        loaded.manifest = Manifest(num_blocks=6, candidates=[Candidate((1, 3)), Candidate((2,)), Candidate((0, 4, 5))])
        loaded.router = FakeRouter() if with_router else None
        return loaded

    monkeypatch.setattr(L, "load", fake_load)
    res = run_cli(tiny_llm_dir, "--tasks", "piqa,arc_easy", "--limit", 3, "--json", "-", "--data-dir", DATA)
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)
    assert payload["mode"] == "routed" and "omitted" not in payload
    rt = payload["routing"]
    assert rt["candidates"] == [[1, 3], [2], [0, 4, 5]] and sum(rt["usage"]) == 6
    assert isinstance(rt["router_ms_mean"], float)
    _check_tasks(payload, ["piqa", "arc_easy"], 3)
    assert all(sum(payload["tasks"][t]["usage"]) == 3 for t in ("piqa", "arc_easy"))
    # --omit overrides the router (and the router is not loaded)
    res = run_cli(tiny_llm_dir, "--tasks", "piqa", "--limit", 1, "--omit", "5", "--json", "-", "--data-dir", DATA)
    assert json.loads(res.stdout)["omitted"] == [5]


# -- dependencies ----------------------------------------------------------------------------------------


def _subprocess(code, *args, env=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


@needs_data
def test_eval_runs_without_torch(tiny_llm_dir, tmp_path):
    code = ("import sys, json\nsys.modules['torch'] = None\nimport typer\n"
            "from pudding_mlx.app.eval_cmd import register\napp = typer.Typer()\nregister(app)\n"
            "app.command('noop')(lambda: None)\n"
            "try:\n    app(['eval'] + sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n    raise\n")
    done = _subprocess(code, tiny_llm_dir, "--tasks", "piqa", "--limit", 2, "--omit", "1",
                       "--json", tmp_path / "r.json", "--data-dir", DATA)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["piqa"]["n"] == 2


def test_requests_module_imports_neither_torch_nor_mlx():
    code = ("import sys\nsys.modules['torch'] = None\nsys.modules['mlx'] = None\n"
            "import pudding_mlx.requests as R, pudding_mlx.tasks\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'mlx', 'mlx_lm') and sys.modules[k] is not None]\n"
            "assert not bad, bad\nprint(R.metrics.__name__)\n")
    done = _subprocess(code)
    assert done.returncode == 0 and done.stdout.strip() == "metrics", done.stderr
