"""`pudding-mlx bench` end to end on a small random shape: the JSON the issue specifies, ideal =
L / (L - k), the static set spread over the middle, the lazy-loading memory ratio equal to
(kept + rest) / all, lossless cells, the plot; and one-line errors. Timings are not asserted
(speed targets are checked by running the benchmark, not by tests)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from pudding_mlx.bench import spread
from pudding_mlx.shapes import SHAPES


def run_cli(*args, env=None):
    code = "import sys\nfrom pudding_mlx.app.cli import main\nsys.argv = ['pudding-mlx'] + sys.argv[1:]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, **(env or {})))


def test_bench_json_memory_lossless_and_plot(tmp_path, tiny_llm_dir):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    # the memory probe of a random shape borrows the default bundle's tokenizer files (mlx-lm's loader
    # wants some): a cache that holds only those, so the test does not depend on the user's cache
    borrowed = tmp_path / "cache" / "default-bundle"
    borrowed.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llm_dir / name).is_file():
            shutil.copyfile(tiny_llm_dir / name, borrowed / name)
    done = run_cli("bench", "--shape", "small", "--k", "3", "--runs", "1", "--cells", "16+1,16+6",
                   "--lossless", "--draft-tokens", "2", "--json", str(out), "--plot", str(png),
                   env={"PUDDING_MLX_CACHE": str(tmp_path / "cache")})
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
        assert row["speedup"] == pytest.approx(row["dense_s"] / (row["routed_s"] + row["router_s"]))
    assert "lossless_s" not in prefill  # one generated token: nothing to draft
    assert gen["draft_tokens"] == 2 and 0 <= gen["lossless_accepted"] <= 1 and gen["lossless_s"] > 0
    memory = result["memory"]  # lazy loading: the omitted blocks' weights are never read
    assert memory["materialised_ratio"] == pytest.approx(memory["expected_ratio"], abs=1e-3)
    assert memory["expected_ratio"] < 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "lossless: the routed set drafts 2 tokens" in done.stdout


@pytest.mark.parametrize("args, message", [
    ((), "give either MODEL or --shape"),
    (("--shape", "small", "--cells", "16-1"), "--cells '16-1'"),
])
def test_bench_bad_input_is_one_line(args, message):
    done = run_cli("bench", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
