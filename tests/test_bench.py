"""`pudding-mlx bench` end to end on a small random shape: the JSON the issue specifies, ideal =
L / (L - k), the static set spread over the middle, the lazy-loading memory ratio equal to
(kept + rest) / all, lossless cells, the plot; and one-line errors. Timings are not asserted
(speed targets are checked by running the benchmark, not by tests)."""

import json
import os
import subprocess

import pytest

from helpers import CLI, run_cli
from pudding_mlx.bench import spread
from pudding_mlx.shapes import SHAPES




def test_bench_json_memory_lossless_and_plot(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    done = run_cli("bench", "--shape", "small", "--k", "3", "--runs", "2", "--cells", "16+1,16+6",
                   "--lossless", "--draft-tokens", "2", "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    n = SHAPES["small"]["num_hidden_layers"]
    assert result["backend"] == "cpu" and result["shape"] == "small" and result["k"] == 3
    assert result["static"] == spread(n, 3) and 0 not in result["static"] and n - 1 not in result["static"]
    assert result["routed"] == result["static"]  # a shape has no router of its own: one set for both
    prefill, gen = result["rows"]
    assert (prefill["phase"], prefill["prompt_tokens"], prefill["gen_tokens"]) == ("prefill", 16, 1)
    assert (gen["phase"], gen["gen_tokens"]) == ("generate", 6)
    for row in result["rows"]:
        for key in ("dense_s", "routed_s", "router_s", "static_s", "mlx_lm_s", "speedup", "ideal"):
            assert isinstance(row[key], float) and row[key] >= 0, key
        assert row["ideal"] == pytest.approx(n / (n - 3))
        # every ratio is per round (paired), reported as median [min, max] with a bootstrap interval
        t = row["times"]
        assert all(len(v) == 2 for v in t.values())
        per_round = [d / (r + q) for d, r, q in zip(t["dense"], t["routed"], t["router"])]
        assert row["speedup"] == pytest.approx(sorted(per_round)[0] / 2 + sorted(per_round)[1] / 2)
        for name in ("speedup", "speedup_static", "routed_over_static", "dense_over_mlx_lm"):
            s = row[f"{name}_spread"]
            assert s["min"] <= s["ci95"][0] <= s["median"] == row[name] <= s["ci95"][1] <= s["max"]
    assert "lossless_s" not in prefill  # one generated token: nothing to draft
    assert gen["draft_tokens"] == 2 and 0 <= gen["lossless_accepted"] <= 1 and gen["lossless_s"] > 0
    memory = result["memory"]  # lazy loading: the omitted blocks' weights are never read
    assert memory["materialised_ratio"] == pytest.approx(memory["expected_ratio"], abs=1e-3)
    assert memory["expected_ratio"] < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lossless: the routed set drafts 2 tokens" in done.stdout
    assert gen["speedup_lossless_spread"]["median"] == gen["speedup_lossless"]
    assert result["failed"] == {} and result["summary"] == [
        "2 round(s): too few for intervals (at least 5); no speedup is claimed"]


@pytest.mark.parametrize("args, message", [
    ((), "give either MODEL or --shape"),
    (("--shape", "small", "--cells", "16-1"), "--cells '16-1'"),
    (("--shape", "small", "--json", "/nonexistent-folder/b.json"), "the folder /nonexistent-folder does not exist"),
    (("--shape", "small", "--plot", "/nonexistent-folder/b.png"), "the folder /nonexistent-folder does not exist"),
    (("--shape", "small", "--json", "."), "is a folder"),
    (("--shape", "small", "--plot", "b.png"), "--plot needs matplotlib"),
    (("--shape", "small", "--router-kind", "linear"), "--router-kind 'linear': choose one of bert, hidden"),
    (("--shape", "small", "--router-kind", "hidden", "--router", "r"), "--router-kind hidden is for --shape"),
])
def test_bench_bad_input_is_one_line(args, message, tmp_path):
    """Outputs are checked before any work: one line, exit 2, nothing timed."""
    (tmp_path / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")  # not installed
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"} if "matplotlib" in message else {}
    done = run_cli("bench", *args, env=env)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1  # no "prefill ..." progress: nothing ran


def _cli(monkeypatch, *args):
    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app

    return CliRunner().invoke(app, ["bench", *map(str, args)])


def test_a_failed_part_keeps_the_rest(tmp_path, monkeypatch):
    """The memory probe fails (as it did on the GPU): the timings are still written, the failure is
    marked in the JSON and on stderr, and the exit status is 1."""
    from pudding_mlx import bench as B
    from pudding_mlx.errors import PuddingError

    def broken_probe(model_dir, omitted):
        raise PuddingError("memory probe failed: RuntimeError: out of memory")

    monkeypatch.setattr(B, "memory_probe", broken_probe)
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    done = _cli(monkeypatch, "--shape", "small", "--k", "3", "--runs", "1", "--cells", "8+1,8+2",
                "--json", out, "--plot", png)
    assert done.exit_code == 1, done.output
    result = json.loads(out.read_text())
    assert [(r["prompt_tokens"], r["gen_tokens"]) for r in result["rows"]] == [(8, 1), (8, 2)]
    assert all(r["dense_s"] > 0 for r in result["rows"])
    assert result["memory"] == {"error": "memory probe failed: RuntimeError: out of memory"}
    assert result["failed"] == {"memory": "memory probe failed: RuntimeError: out of memory"}
    assert png.read_bytes()[:4] == b"\x89PNG" and "failed: memory" in done.stderr


def test_a_failed_cell_keeps_the_others(monkeypatch):
    from pudding_mlx import bench as B

    real = B.time_cell

    def cell(runners, router, n_prompt, n_gen, *rest):
        if n_gen == 2:
            raise RuntimeError("[METAL] out of memory\nmore detail")
        return real(runners, router, n_prompt, n_gen, *rest)

    monkeypatch.setattr(B, "time_cell", cell)
    result = B.measure(shape="small", k=3, cells="8+1,8+2,8+3", runs=1, memory=False, progress=lambda line: None)
    assert [("error" in r) for r in result["rows"]] == [False, True, False]
    assert result["failed"] == {"8+2": "RuntimeError: [METAL] out of memory"}


def test_sigterm_keeps_the_measured_cells(tmp_path):
    """Killed by SIGTERM (as `timeout` did on the lent GPU, losing a whole bundle bench): the cells
    measured so far are written to --json, the stop is marked, and the exit status is 143."""
    import signal
    import time

    out = tmp_path / "b.json"
    proc = subprocess.Popen([*CLI, "bench", "--shape", "small", "--k", "3", "--runs", "1",
                             "--cells", "8+1," + ",".join(["64+64"] * 50), "--no-memory", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # the first cell's progress line: it has been measured
    while first and not first.startswith("prefill 8+1"):  # (a note on the router may come first)
        first = proc.stderr.readline()
    assert first.startswith("prefill 8+1: speedup"), first
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    result = json.loads(out.read_text())
    assert [(r["prompt_tokens"], r["gen_tokens"]) for r in result["rows"]][:1] == [(8, 1)]
    assert len(result["rows"]) < 51 and result["rows"][0]["dense_s"] > 0
    assert result["failed"] == {"interrupted": "stopped by SIGTERM (a time limit?); the cells above were measured"}
    assert "Traceback" not in err


class CountingRouter:
    def __init__(self):
        self.calls = 0

    def best(self, text):
        self.calls += 1
        return 0, [1.0], 0.1


def test_router_warmed_up_interleaved_and_recorded(monkeypatch, tmp_path):
    """The router is called once before timing (its first call compiles), then once per round, in
    the rotation with the other runners; the default bundle's router, when timed, is named in the
    JSON (it was written as null)."""
    from pudding_mlx import assets, bench as B
    from pudding_mlx import router as R

    (tmp_path / "default-bundle" / "router").mkdir(parents=True)
    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path)
    router = CountingRouter()
    monkeypatch.setattr(R, "load_router", lambda path, **kw: router)
    order = []
    real_request, real_router = B.time_request, B.time_router
    monkeypatch.setattr(B, "time_request", lambda m, p, n, mk: order.append(("model", len(p))) or real_request(m, p, n, mk))
    monkeypatch.setattr(B, "time_router", lambda r, t, n: order.append(("router", n)) or real_router(r, t, n))
    result = B.measure(shape="small", k=3, cells="8+1", runs=5, memory=False, progress=lambda line: None)
    assert result["router"] == str(tmp_path / "default-bundle" / "router")
    assert router.calls == 1 + 5
    warm, timed = order[:5], order[5:]
    assert warm == [("model", 8)] * 4 + [("router", 8)]  # warm-up on the first 16 prompt tokens (8 here)
    rounds = [timed[i * 5:(i + 1) * 5] for i in range(5)]
    assert [r.index(("router", 8)) for r in rounds] == [4, 3, 2, 1, 0]  # rotated: drift hits all alike
    assert len(result["rows"][0]["times"]["router"]) == 5


def test_hidden_router_is_timed_inside_the_routed_request(monkeypatch):
    """With a hidden-state router the routed request is the free routed prefill (routing inside it):
    speedup = dense / routed, the head's own time is reported apart and not added again; the routed
    request runs the routed prefill once per round after one warm-up, and (every candidate being the
    static set) ends up running the same blocks as static."""
    from pudding_mlx import bench as B
    from pudding_mlx import hidden_router as H

    chosen, speculated = [], []
    real_prefill = H.routed_prefill

    def prefill(model, router, prompt, sets, speculate=None):
        out = real_prefill(model, router, prompt, sets, speculate=speculate)
        chosen.append(out[3])
        speculated.append(speculate)
        return out

    monkeypatch.setattr(H, "routed_prefill", prefill)
    result = B.measure(shape="small", k=3, cells="8+1,8+3", runs=3, memory=False, progress=lambda line: None,
                       router_kind="hidden", speculate=True)
    assert result["speculate"] is True and set(speculated) == {True}
    n = SHAPES["small"]["num_hidden_layers"]
    static = spread(n, 3)
    assert result["router_kind"] == "hidden" and result["router"].startswith("hidden (random head after block")
    assert len(chosen) == 2 * (1 + 3) and set(chosen) == {tuple(static)}
    for row in result["rows"]:
        t = row["times"]
        assert row["router_inline"] is True and all(x > 0 for x in t["router"])
        assert row["routed_sets"] == [[static, 3]]  # the timed requests' choices, warm-up excluded
        per_round = sorted(d / r for d, r in zip(t["dense"], t["routed"]))
        assert row["speedup"] == pytest.approx(per_round[1])  # the median of 3: no router added
        assert row["router_over_dense_prefill_spread"]["median"] < 1


def test_hidden_miss_router_never_picks_its_fallback(monkeypatch):
    """--router-kind hidden-miss: the routed prefill's guess (the fallback set) is another set of k
    blocks, and the router picks the static set every time, so every guess misses."""
    from pudding_mlx import bench as B
    from pudding_mlx import hidden_router as H

    seen = []
    real_prefill = H.routed_prefill

    def prefill(model, router, prompt, sets, speculate=None):
        out = real_prefill(model, router, prompt, sets, speculate=speculate)
        seen.append((tuple(sets[router.fallback]), out[3]))
        return out

    monkeypatch.setattr(H, "routed_prefill", prefill)
    result = B.measure(shape="small", k=3, cells="8+1", runs=2, memory=False, progress=lambda line: None,
                       router_kind="hidden-miss")
    static = tuple(spread(SHAPES["small"]["num_hidden_layers"], 3))
    assert "never picked" in result["router"] and result["rows"][0]["routed_sets"] == [[list(static), 2]]
    assert len(seen) == 3 and all(chosen == static and len(guess) == 3 and guess != static for guess, chosen in seen)


def test_summary_claims_only_what_the_interval_supports():
    from pudding_mlx.bench import interval, summary

    s = interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["min"], s["median"], s["max"]) == (1.0, 3.0, 5.0) and 1.0 <= s["ci95"][0] <= 3.0 <= s["ci95"][1] <= 5.0

    def row(speedup, static, same):
        r = {"prompt_tokens": 128, "gen_tokens": 1, "ideal": 1.28}
        for name, values in (("speedup", speedup), ("speedup_static", static), ("routed_over_static", same)):
            r[f"{name}_spread"] = interval(values)
            r[name] = r[f"{name}_spread"]["median"]
        return r

    result = {"runs": 6, "static": [1, 2], "routed": [1, 2],
              "rows": [row([1.20, 1.21, 1.19, 1.22, 1.20, 1.21], [1.28, 1.25, 1.31, 1.27, 1.29, 1.30],
                           [0.92, 1.08, 1.0, 0.95, 1.05, 1.01])]}
    line, = summary(result)
    assert "routed (router counted) 1.205" in line and ": above dense" in line
    assert "no difference from the ideal 1.280 shown" in line
    assert "routed/static (the same set)" in line and "no difference from 1 shown" in line
    result["rows"] = [row([0.97, 0.98, 0.99, 1.02, 1.01, 1.0], [1.1] * 6, [1.0] * 6)]
    assert "no difference from dense shown" in summary(result)[0] and "below the ideal" in summary(result)[0]
    assert "too few" in summary(dict(result, runs=4))[0]
