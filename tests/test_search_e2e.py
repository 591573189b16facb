"""`pudding-mlx train search` end to end on a tiny Hugging Face model and real task data: a search
killed with SIGKILL mid-way resumes and writes the same candidates; scoring spread over two
torch.distributed processes equals one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
ARGS = ["--tasks", "arc_easy,piqa", "--losses", "likelihood,likelihood_diff", "--k", "1,3",
        "--n-calib", "4", "--batch-size", "8", "--device", "cpu"]


def search(model_dir, out, env=None):
    cmd = [sys.executable, "-m", "pudding_mlx.app.cli", "train", "search", str(model_dir), *ARGS, "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PUDDING_MLX_DATA=str(DATA), **(env or {})))


def test_search_resumes_after_sigkill(tiny_hf_dir, tmp_path):
    ref = search(tiny_hf_dir, tmp_path / "ref" / "c.json")
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    assert "arc_easy/likelihood phase 1" in err

    out = tmp_path / "run" / "c.json"
    proc = search(tiny_hf_dir, out)
    state = out.with_name("c.state.json")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a few finished phases, then kill -9 mid-search
        if state.exists() and sum(len(v) for v in json.loads(state.read_text())["chains"].values()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done_at_kill = sum(len(v) for v in json.loads(state.read_text())["chains"].values())
    assert 3 <= done_at_kill < 12, "the kill should land mid-search"
    resumed = search(tiny_hf_dir, out)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"resuming from {state}" in err.replace("\n", "")
    for k in (1, 3):
        a = json.loads((tmp_path / "ref" / f"c-k{k}.json").read_text())
        b = json.loads(out.with_name(f"c-k{k}.json").read_text())
        assert a["candidates"] == b["candidates"] and a["calibration"] == b["calibration"]
        assert all(len(c["omitted"]) == k and 0 not in c["omitted"] and 5 not in c["omitted"]
                   for c in a["candidates"])


WORKER = """
import json, os, sys
import torch.distributed as dist
from pudding_mlx.train.distributed import evaluate_everywhere, finish, init_from_env
from pudding_mlx.train.hf import load_hf
from pudding_mlx.tasks import load_task
init_from_env()
model, tok, _ = load_hf(sys.argv[1], device="cpu")
ex = load_task("arc_easy", "validation", sys.argv[2], limit=6) + load_task("piqa", "validation", sys.argv[2], limit=5)
m = evaluate_everywhere(model, tok, ex, omitted=(2, 3), batch_size=4)
if dist.get_rank() == 0 if dist.is_initialized() else True:
    print(json.dumps({"mean_ll": [list(x) for x in m["mean_ll"]], "acc": m["acc"]}))
finish()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_scoring_equals_one(tiny_hf_dir):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONFAULTHANDLER="1")
    single = subprocess.run([sys.executable, "-c", WORKER, str(tiny_hf_dir), str(DATA)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert single.returncode == 0, single.stderr
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tiny_hf_dir), str(DATA)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env, WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        tail = "\n".join(line for line in err.splitlines() if "Loading weights" not in line)[-3000:]
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{tail}"
    one = json.loads(single.stdout.strip().splitlines()[-1])
    two = json.loads(outs[0][0].strip().splitlines()[-1])
    # every example (6 + 5) and every choice of each: zip alone would stop at the shorter
    assert len(one["mean_ll"]) == len(two["mean_ll"]) == 11
    assert [len(a) for a in one["mean_ll"]] == [len(b) for b in two["mean_ll"]]
    assert two["acc"] == one["acc"]
    for a, b in zip(one["mean_ll"], two["mean_ll"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_search_protect_first(tiny_hf_dir, tmp_path):
    """`train search --protect-first P`: no candidate omits blocks 0..P-1 (what a hidden-state
    router reads after), the candidates file lists them as protected with the last block, and a k
    that the blocks left cannot hold is refused with a message that says so."""
    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app
    from pudding_mlx.errors import PuddingError

    def run(k, out):
        return CliRunner().invoke(app, ["train", "search", str(tiny_hf_dir), "--tasks", "arc_easy", "--losses",
                                        "likelihood", "--k", k, "--n-calib", "4", "--batch-size", "8", "--device",
                                        "cpu", "--protect-first", "2", "--out", str(out)],
                                  env={"PUDDING_MLX_DATA": str(DATA)})

    done = run("1,3", tmp_path / "c.json")
    assert done.exit_code == 0, done.output
    for k in (1, 3):  # 6 blocks: 0, 1 (--protect-first 2) and 5 (last) stay; 2, 3, 4 may go
        c = json.loads((tmp_path / f"c-k{k}.json").read_text())
        assert c["protected"] == [0, 1, 5] and c["num_blocks"] == 6
        assert c["candidates"] and all(len(x["omitted"]) == k and set(x["omitted"]) <= {2, 3, 4}
                                       for x in c["candidates"]), c["candidates"]
    refused = run("4", tmp_path / "d.json")
    assert isinstance(refused.exception, PuddingError), refused.output
    assert "k=4 but only 3 blocks may be removed" in str(refused.exception)
