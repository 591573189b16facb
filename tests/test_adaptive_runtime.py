"""Adaptive depth at runtime (issue #23): `--max-loss` on a bundle with a loss predictor.

The fixture's predictor has zero weights and a bias that sets each set's predicted loss (values exact in
float32), so every decision is known in advance:

    set      []     [2, 3]   [3, 4]   [2, 4, 5]   [3, 4, 5]
    k        0      2        2        3           3
    loss     (0)    0.125    0.0625   0.5         0.25

Budget 0.25: k = 3, [3, 4, 5] (its loss equals the budget: allowed); 0.2: k = 2, [3, 4] (the lower of
the two k = 2 losses); 0.0625: still [3, 4] (equal); 0.06: dense (nothing fits); inf: [3, 4, 5] (the
largest k, then the lower loss); -inf: dense.
"""

import asyncio
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

import helpers
from pudding_mlx.adaptive import LossPredictor, write_predictor
from pudding_mlx.app.cli import app

SETS = [[], [2, 3], [3, 4], [2, 4, 5], [3, 4, 5]]
LOSSES = [0.0, 0.125, 0.0625, 0.5, 0.25]
CANDIDATES = [[2, 3], [3, 4], [2, 4, 5], [3, 4, 5]]
HIDDEN = 64  # conftest.TINY_LLAMA
DECISIONS = [(0.25, [3, 4, 5]), (0.2, [3, 4]), (0.0625, [3, 4]), (0.06, []), (math.inf, [3, 4, 5]),
             (-math.inf, []), (0.0, [])]
PROMPT = "What is the capital of France?"


def _predictor(folder, sets=SETS, hidden=HIDDEN, after=1, losses=LOSSES):
    return write_predictor(folder, LossPredictor(
        [list(s) for s in sets], after, "mean+last", 64, np.zeros((len(sets), 2 * hidden), np.float32),
        np.array(losses, np.float32), -0.05, {"loss": "test: nats per token"}))


@pytest.fixture(scope="module")
def bundle(tiny_llm_dir, tmp_path_factory):
    """The tiny SmolLM2-tokenizer llama (6 blocks) with candidates of k = 2 and 3 and the predictor."""
    from pudding_mlx.convert.bundle import build_bundle

    root = tmp_path_factory.mktemp("adaptive")
    (root / "cand.json").write_text(json.dumps(CANDIDATES))
    _predictor(root / "pred")
    return build_bundle(tiny_llm_dir, root / "bundle", candidates=root / "cand.json", predictor=root / "pred")


def invoke(*args):
    done = CliRunner().invoke(app, [str(a) for a in args])
    assert done.exit_code == 0, (done.output, done.exception)
    return done


def run_cli(*args):
    return helpers.run_cli(*args, env={"HF_HUB_OFFLINE": "1"}, timeout=300)


assert_one_line = helpers.assert_one_line


# -- the bundle ------------------------------------------------------------------------------------


def test_the_manifest_names_the_predictor(bundle):
    from pudding_mlx.bundle import read_manifest

    data = json.loads((bundle / "pudding.json").read_text())
    assert data["schema_version"] == 4 and data["adaptive"] == {"path": "predictor"}
    assert (bundle / "predictor" / "predictor.json").is_file()
    assert read_manifest(bundle).adaptive == {"path": "predictor"}


def test_without_max_loss_nothing_is_adaptive(bundle):
    from pudding_mlx.load import load
    from pudding_mlx.routing import choose

    loaded = load(str(bundle))
    assert loaded.router is None and choose(loaded, PROMPT).how == "no-router"


# -- the decision ------------------------------------------------------------------------------------


def test_decisions_at_the_budget_edges(bundle):
    from pudding_mlx.load import load
    from pudding_mlx.routing import choose, choose_and_prefill

    loaded = load(str(bundle), max_loss=0.25)
    router = loaded.router
    assert router.kind == "adaptive" and router.after == 1 and router.sets == [tuple(s) for s in SETS]
    ids = router.prompt_ids(PROMPT)
    for budget, want in DECISIONS:
        with router.budget(budget):
            separate = choose(loaded, PROMPT)  # a pass of its own (route, chat's later turns, eval)
            inline, feed, cache = choose_and_prefill(loaded, PROMPT, ids)  # inside the prefill
        for choice in (separate, inline):
            assert choice.how == "adaptive" and list(choice.omitted) == want, (budget, choice)
            assert choice.k == len(want) and choice.max_loss == budget and choice.scores == LOSSES
            assert choice.candidate == SETS.index(want)
        assert cache is not None and feed == ids[-1:]
    with router.budget(0.25):
        assert choose(loaded, PROMPT).reason == "k = 3, predicted loss 0.25 <= budget 0.25 (the largest k)"
    with router.budget(0.2):
        assert choose(loaded, PROMPT).reason == "k = 2, predicted loss 0.0625 <= budget 0.2; k = 3 predicted 0.25 > 0.2"
    with router.budget(0.06):
        assert choose(loaded, PROMPT).reason == "dense; k = 2 predicted 0.0625 > 0.06"
    assert router.max_loss == 0.25  # the budget context restores it


# -- the surfaces ------------------------------------------------------------------------------------


def _generate_json(bundle, *flags):
    out = invoke("generate", bundle, "-p", PROMPT, "-m", "8", "--json", *flags)
    return json.loads(out.stdout)


def test_generate_runs_the_chosen_set_token_for_token(bundle):
    """generate --max-loss runs what --omit of the chosen set runs (the routed prefill's cache
    included), and its --json says the depth, the budget and why."""
    for budget, want in ((0.25, [3, 4, 5]), (0.2, [3, 4]), (0.06, [])):
        got = _generate_json(bundle, "--max-loss", budget)
        fixed = _generate_json(bundle, *(["--omit", ",".join(map(str, want))] if want else ["--dense"]))
        assert got["routing"] == "adaptive" and got["omitted"] == want and got["k"] == len(want)
        assert got["max_loss"] == budget and got["predicted_losses"] == LOSSES and got["sets"] == SETS
        assert got["reason"].startswith("dense" if not want else f"k = {len(want)}, predicted loss")
        assert got["routed_prefill"] is True
        assert got["token_ids"] == fixed["token_ids"] and got["text"] == fixed["text"]
    inf = _generate_json(bundle, "--max-loss", "inf")
    assert inf["omitted"] == [3, 4, 5] and inf["max_loss"] == "inf"


def test_generate_footer_shows_the_depth(bundle):
    done = invoke("generate", bundle, "-p", PROMPT, "-m", "2", "--max-loss", "0.2")
    footer = " ".join(done.output.split())
    assert ("Route: adaptive depth: k = 2, omitted [3, 4] (4/6 blocks) under --max-loss 0.2: k = 2, predicted loss "
            "0.0625 <= budget 0.2; k = 3 predicted 0.25 > 0.2, chosen inside the prefill") in footer
    assert "the loss predictor read their output in" in footer


def test_chat_status_line_shows_the_depth(bundle):
    """Two turns from a pipe: the first routes inside its prefill, the second with a pass of its own;
    each status line says the depth chosen and why; /route shows every predicted loss."""
    done = subprocess.run([*helpers.CLI, "chat", str(bundle), "--max-tokens", "4", "--max-loss", "0.25"],
                          input=f"{PROMPT}\nAnd of Spain?\n/route\n/stats\n/quit\n", capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, COLUMNS="400", HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr
    out = " ".join(done.stdout.split())
    assert "adaptive depth under --max-loss 0.25: loss predictor over 5 sets" in out
    line = ("adaptive depth: k = 3, omitted [3, 4, 5] (3/6 blocks) under --max-loss 0.25: k = 3, predicted loss "
            "0.25 <= budget 0.25 (the largest k)")
    assert out.count(line) == 2, out
    assert f"{line} · inside the prefill (blocks 0-1," in out and f"{line} · predictor " in out
    assert "predicted losses for 'And of Spain?'" in out and "◀ chosen" in out and "over the budget" in out
    assert "k=3: 2" in out


def test_route_shows_every_predicted_loss(bundle):
    done = invoke("route", bundle, "-p", PROMPT, "--max-loss", "0.2", "--json")
    got = json.loads(done.stdout)
    assert got["routing"] == "adaptive" and got["omitted"] == [3, 4] and got["k"] == 2 and got["max_loss"] == 0.2
    assert got["predicted_losses"] == LOSSES and got["sets"] == SETS and got["num_blocks"] == 6
    text = " ".join(invoke("route", bundle, "-p", PROMPT, "--max-loss", "0.2").output.split())
    assert "unit: test: nats per token" in text and "0.2500" in text and "over the budget" in text
    assert "adaptive depth: k = 2, omitted [3, 4] (4/6 blocks) under --max-loss 0.2" in text


def test_info_shows_the_predictor(bundle):
    got = json.loads(invoke("info", bundle, "--json").stdout)["predictor"]
    assert got["sets"] == SETS and got["ks"] == [0, 2, 3] and got["after"] == 1 and got["pooling"] == "mean+last"
    assert got["loss"] == "test: nats per token" and got["default_max_loss"] == -0.05 and got["runtime_default"] is None
    text = " ".join(invoke("info", bundle).output.split())
    assert "loss predictor 5 sets (k = 0, 2, 3): dense; 2,3; 3,4; 2,4,5; 3,4,5" in text
    assert "runtime default: off (adaptive only with --max-loss)" in text


def test_eval_json_shows_the_depth(bundle, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps({"task": "custom", "split": "test", "id": str(i), "query": q, "choices": ["Paris", "Rome"], "label": 0})
                              for i, q in enumerate(["Capital of France?", "Capital of Italy?"])))
    out = invoke("eval", bundle, "--tasks", f"{data},fidelity", "--limit", "2", "-m", "3", "--max-loss", "0.2",
                 "--json", "-")
    got = json.loads(out.stdout)
    assert got["mode"] == "adaptive" and got["max_loss"] == 0.2 and got["mean_k"] == 2
    assert got["routing"]["candidates"] == SETS and got["routing"]["usage"] == [0, 0, 2, 0, 0]
    assert all(r["omitted"] == [3, 4] for r in got["tasks"]["fidelity"]["records"])


def test_bench_shows_the_depth(bundle, tmp_path):
    out = tmp_path / "bench.json"
    done = invoke("bench", bundle, "--max-loss", "0.25", "--cells", "8+2", "--runs", "1", "--no-memory",
                  "--json", out)
    got = json.loads(out.read_text())
    assert got["max_loss"] == 0.25 and got["routed_k"] == 3 and got["router_kind"] == "adaptive"
    assert got["rows"][0]["routed_sets"] == [[[3, 4, 5], 1]]
    assert "[3, 4, 5] (k = 3) x1" in " ".join(done.output.split())


def test_a_serve_request_shows_the_depth_and_may_set_its_budget(bundle):
    from pudding_mlx.server import Engine, Job, parse_request

    engine = Engine(bundle, "tiny", max_loss=0.25, max_tokens=3, log=lambda line: None)
    engine.start()

    async def ask(body):
        job = Job(parse_request(json.dumps(body).encode(), 3, 0.0, 1.0), asyncio.get_running_loop())
        engine.submit(job)
        while True:
            kind, value = await job.events.get()
            if kind in ("done", "error"):
                return kind, value

    try:
        messages = [{"role": "user", "content": PROMPT}]
        kind, record = asyncio.run(ask({"messages": messages}))
        extra = record["pudding"]
        assert kind == "done" and extra["routing"] == "adaptive" and extra["omitted"] == [3, 4, 5] and extra["k"] == 3
        assert extra["max_loss"] == 0.25 and extra["reason"].endswith("(the largest k)")
        kind, record = asyncio.run(ask({"messages": messages, "max_loss": 0.06}))  # this request's own budget
        assert record["pudding"]["omitted"] == [] and record["pudding"]["max_loss"] == 0.06
        kind, record = asyncio.run(ask({"messages": messages}))  # the server's budget again
        assert record["pudding"]["k"] == 3
    finally:
        engine.close()
        engine.join(30)
    with pytest.raises(Exception, match="'max_loss' must be a number"):
        parse_request(json.dumps({"messages": messages, "max_loss": "lots"}).encode(), 3, 0.0, 1.0)


# -- errors: one line, exit 2 ------------------------------------------------------------------------


def test_a_budget_without_a_predictor(tiny_llm_dir):
    assert_one_line(run_cli("generate", tiny_llm_dir, "-p", "hi", "--max-loss", "0.1"),
                    "--max-loss needs a bundle with a loss predictor")


def test_a_budget_with_dense_or_nan(bundle):
    assert_one_line(run_cli("generate", bundle, "-p", "hi", "--max-loss", "0.1", "--dense"),
                    "--max-loss and --dense contradict each other")
    assert_one_line(run_cli("generate", bundle, "-p", "hi", "--max-loss", "nan"), "--max-loss nan: give a number")


@pytest.mark.parametrize("fault,needle", [
    ("missing", "no such folder"),
    ("sets", "set 1 [1, 5] is not one of the bundle's candidate sets"),
    ("hidden", "the predictor was written for another model or other sets"),
    ("after", "field 'after' is 5; the routed prefill stops at a block in 0..4"),
    ("weights", "predictor.safetensors: not a readable safetensors file"),
])
def test_a_bad_predictor_is_refused(tiny_llm_dir, tmp_path, fault, needle):
    (tmp_path / "cand.json").write_text(json.dumps(CANDIDATES))
    pred = tmp_path / "pred"
    if fault == "sets":
        _predictor(pred, sets=[[], [1, 5]], losses=[0.0, 0.1], after=0)
    elif fault == "hidden":
        _predictor(pred, hidden=32)
    elif fault == "after":
        _predictor(pred, sets=[[]], losses=[0.0], after=5)
    elif fault == "weights":
        _predictor(pred)
        (pred / "predictor.safetensors").write_bytes(b"not safetensors")
    done = run_cli("convert", "bundle", "--llm", tiny_llm_dir, "--candidates", tmp_path / "cand.json",
                   "--predictor", pred, tmp_path / "out")
    assert_one_line(done, needle)
    assert not (tmp_path / "out").exists()


def test_an_old_bundle_still_loads_and_a_v3_manifest_cannot_name_a_predictor(bundle, tmp_path):
    from pudding_mlx.bundle import read_manifest
    from pudding_mlx.errors import PuddingError

    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    data = json.loads((old / "pudding.json").read_text())
    data["schema_version"] = 3
    (old / "pudding.json").write_text(json.dumps(data))
    with pytest.raises(PuddingError, match="'adaptive' needs schema version 4"):
        read_manifest(old)
    del data["adaptive"]
    data["schema_version"] = 1
    (old / "pudding.json").write_text(json.dumps(data))
    assert read_manifest(old).adaptive is None
