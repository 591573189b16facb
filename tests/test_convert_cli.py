"""`pudding-mlx convert llm|router|bundle` end to end, through the real entry point in a subprocess.

The real SmolLM2-135M-Instruct GGUF is converted once per module; the bundle uses the shipped light router
head (pudding_mlx/data/default_router, trained for the sets in its candidates.json) on the real
all-MiniLM-L6-v2 encoder. Bad input must exit 2 with one line on stderr and leave nothing at OUT (nor any
temporary folder beside it).
"""

import json
import os
import shutil
from pathlib import Path

import pytest

import helpers

import pudding_mlx

ROUTER_DATA = Path(pudding_mlx.__file__).parent / "data" / "default_router"
CANDIDATES = ROUTER_DATA / "candidates.json"
PROMPT = "Why is the sky blue?"

pytestmark = pytest.mark.assets


def run_cli(*args):
    return helpers.run_cli(*args, env={"HF_HUB_OFFLINE": "1"}, timeout=300)


def ok(done):
    assert done.returncode == 0, done.stderr
    return done


def assert_one_line_error(done, *needles):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert done.stdout == ""
    return lines[0]


def assert_nothing_written(parent: Path, keep):
    """Only the inputs the test put there: no OUT, no half-built temporary folder."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert-cli")


@pytest.fixture(scope="module")
def smol(work, smollm2_gguf):
    """The GGUF converted by the CLI. --dtype float32: the Q4_1 tensors stay 4-bit with float32 scales and
    the norms/embeddings are float32, so stock mlx_lm.load (which keeps the stored dtype) and pudding-mlx
    (which casts floats to float32 on the CPU backend) run the very same weights."""
    done = ok(run_cli("convert", "llm", smollm2_gguf, work / "smol", "--dtype", "float32"))
    out = work / "smol"
    assert f"{out}: mlx-lm model, 30 blocks, 4-bit (group 32), dtype float32" in done.stdout
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(p.name for p in work.iterdir()) == ["smol"]  # no temporary folder left beside it
    return out


@pytest.fixture(scope="module")
def light_router(work, minilm_dir):
    """A light router source: the shipped head (10 outputs) + the real MiniLM encoder (symlinked)."""
    src = work / "light-router"
    src.mkdir()
    for name in ("head.json", "head.safetensors"):
        shutil.copyfile(ROUTER_DATA / name, src / name)
    (src / "encoder").symlink_to(minilm_dir, target_is_directory=True)
    return src


@pytest.fixture(scope="module")
def bundle(work, smol, light_router):
    out = work / "bundle"
    done = ok(run_cli("convert", "bundle", "--llm", smol, "--router", light_router, "--candidates", CANDIDATES, out))
    assert done.stdout.strip() == (f"{out}: bundle, 30 blocks, 10 candidate sets (2 mix-only left out), "
                                   "router: yes")
    return out


# --------------------------------------------------------------------------------------------- round trips


def test_convert_llm_round_trip_matches_stock_mlx_lm(smol):
    import mlx.core as mx
    from mlx_lm import generate as stock_generate
    from mlx_lm import load as stock_load
    from mlx_lm import stream_generate as stock_stream

    ours = json.loads(ok(run_cli("generate", smol, "--dense", "--json", "-p", PROMPT, "-m", "24")).stdout)
    assert ours["routing"] == "dense" and ours["omitted"] == []

    model, tokenizer = stock_load(str(smol))  # stored dtype: float32 (see the `smol` fixture)
    assert model.model.norm.weight.dtype == mx.float32
    messages = [{"role": "user", "content": PROMPT}]
    text_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode(text_prompt)
    assert ours["prompt_tokens"] == len(ids)
    stock_text = stock_generate(model, tokenizer, prompt=text_prompt, max_tokens=24)  # greedy by default
    stock_ids = [int(r.token) for r in stock_stream(model, tokenizer, mx.array(ids), max_tokens=24)]
    assert ours["text"] == stock_text
    assert ours["token_ids"] == stock_ids
    assert len(stock_ids) == 24 and len(set(stock_ids)) > 5


def test_convert_bundle_with_router_routes(bundle, light_router):
    from pudding_mlx.bundle import read_manifest

    manifest = read_manifest(bundle)
    sets = json.loads((ROUTER_DATA / "head.json").read_text())["sets"]
    assert [list(c.omitted) for c in manifest.candidates] == [sorted(s) for s in sets]
    assert manifest.router is not None and (bundle / "router" / "router.json").is_file()
    assert manifest.provenance.get("k") == 7
    assert not (bundle / "head.json").exists() and not any(p.name.startswith(".") for p in bundle.parent.iterdir())

    payload = json.loads(ok(run_cli("generate", bundle, "-p", PROMPT, "--json", "-m", "4")).stdout)
    assert payload["routing"] == "routed"
    assert len(payload["scores"]) == len(manifest.candidates) == 10
    m = payload["candidate"]
    assert m == max(range(10), key=lambda i: payload["scores"][i])
    assert payload["omitted"] == list(manifest.candidates[m].omitted)
    assert payload["generation_tokens"] == 4


def test_force_replaces_an_existing_bundle_and_a_plain_candidates_list(smol, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (tmp_path / "c.json").write_text("[[3, 9, 5], [28]]")
    assert_one_line_error(run_cli("convert", "bundle", "--llm", smol, "--candidates", tmp_path / "c.json", out),
                          str(out), "already exists", "--force")
    assert (out / "old.txt").read_text() == "old"

    done = ok(run_cli("convert", "bundle", "--llm", smol, "--candidates", tmp_path / "c.json", out, "--force"))
    assert "2 candidate sets, router: no" in done.stdout
    manifest = json.loads((out / "pudding.json").read_text())
    assert [c["omitted"] for c in manifest["candidates"]] == [[3, 5, 9], [28]] and manifest["router"] is None
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert_nothing_written(tmp_path, ["b", "c.json"])


# --------------------------------------------------------------------------------------------- bad input


def _sets(n):
    return [c["omitted"] for c in json.loads(CANDIDATES.read_text())["candidates"][:n]]


def test_router_outputs_must_match_the_candidate_sets(smol, light_router, minilm_dir, tmp_path):
    three = tmp_path / "three.json"
    three.write_text(json.dumps(_sets(3)))
    # the shipped head records the sets it was trained for: any other sets are refused by name
    done = run_cli("convert", "bundle", "--llm", smol, "--router", light_router, "--candidates", three,
                   tmp_path / "out")
    assert_one_line_error(done, "head.json", "'sets'", "differs from the candidate sets")
    # a head without that record: its size is checked, 10 outputs against 3 sets
    bare = tmp_path / "bare-router"
    bare.mkdir()
    head = json.loads((light_router / "head.json").read_text())
    del head["sets"]
    (bare / "head.json").write_text(json.dumps(head))
    shutil.copyfile(light_router / "head.safetensors", bare / "head.safetensors")
    (bare / "encoder").symlink_to(minilm_dir, target_is_directory=True)
    done = run_cli("convert", "bundle", "--llm", smol, "--router", bare, "--candidates", three, tmp_path / "out")
    assert_one_line_error(done, "head.safetensors", "10 outputs but 3 were expected")
    assert_nothing_written(tmp_path, ["three.json", "bare-router"])


@pytest.mark.parametrize("content, needles", [
    ([[4, 30]], ["[0]", "[30] out of range 0..29", "30 blocks"]),
    ([[1, 2], list(range(30))], ["[1]", "omits all 30 blocks"]),
    ([[1, 1]], ["repeated"]),
    ([[1, "x"]], ["integers"]),
    ('{"format": "pudding-mlx-candidates", "candidates": [', ["not valid JSON"]),
    ({"format": "pudding-mlx-candidates", "schema_version": 1, "num_blocks": 24, "candidates": []},
     ["'num_blocks' is 24", "30 blocks"]),
    ({"format": "something-else"}, ["'format'"]),
])
def test_bad_candidates(smol, tmp_path, content, needles):
    path = tmp_path / "cands.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    line = assert_one_line_error(run_cli("convert", "bundle", "--llm", smol, "--candidates", path,
                                         tmp_path / "out"), *needles)
    assert str(path) in line
    assert_nothing_written(tmp_path, ["cands.json"])


def test_bad_llm_dirs(smol, tmp_path):
    assert_one_line_error(run_cli("convert", "bundle", "--llm", tmp_path / "nope", tmp_path / "out"),
                          f"{tmp_path / 'nope'}: no such folder", "--llm")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    os.link(smol / "model.safetensors", no_config / "model.safetensors")
    assert_one_line_error(run_cli("convert", "bundle", "--llm", no_config, tmp_path / "out"),
                          f"{no_config / 'config.json'}: missing", "convert llm")
    assert_one_line_error(run_cli("convert", "bundle", "--llm", smol, "--router", smol, tmp_path / "out"),
                          "--router needs --candidates")
    assert_one_line_error(run_cli("convert", "bundle", "--llm", smol, smol / "inside"),
                          "must not be the --llm folder or lie inside it")
    assert not (smol / "inside").exists()
    assert_nothing_written(tmp_path, ["no-config"])


def test_existing_out_refused_without_force(smollm2_gguf, light_router, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for args in (("llm", smollm2_gguf, out), ("router", light_router, out)):
        assert_one_line_error(run_cli("convert", *args), f"{out}: already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine" and [p.name for p in out.iterdir()] == ["keep.txt"]
    assert_nothing_written(tmp_path, ["taken"])


def test_convert_llm_truncated_gguf(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        cut.write_bytes(f.read(1_000_000))
    assert_one_line_error(run_cli("convert", "llm", cut, tmp_path / "out"), str(cut), "truncated")
    assert_one_line_error(run_cli("convert", "llm", cut, tmp_path / "out", "--quantize", "7"), "--quantize 7")
    assert_nothing_written(tmp_path, ["cut.gguf"])


def test_convert_router_without_config(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    assert_one_line_error(run_cli("convert", "router", src, tmp_path / "out"), str(src), "config.json is missing")
    assert_nothing_written(tmp_path, ["empty"])


def test_help_teaches():
    done = ok(run_cli("convert", "bundle", "--help"))
    for needle in ("--llm", "--router", "--candidates", "--force", "Example"):
        assert needle in done.stdout
    done = ok(run_cli("convert", "llm", "--help"))
    for needle in ("GGUF", "--quantize", "--group-size", "--dtype", "--dequantize"):
        assert needle in done.stdout


def test_bench_on_the_routed_bundle(bundle, tmp_path):
    """`pudding-mlx bench BUNDLE`: the static set is the bundle's first candidate, the routed set is
    the router's pick, the router is timed, and --lossless adds its fields (timings not asserted)."""
    from pudding_mlx.bench import ROUTER_TEXT
    from pudding_mlx.bundle import read_manifest
    from pudding_mlx.load import load

    out = tmp_path / "bench.json"
    done = ok(run_cli("bench", bundle, "--runs", "1", "--cells", "8+1,8+3", "--no-memory", "--lossless",
                      "--json", out))
    result = json.loads(out.read_text())
    manifest = read_manifest(bundle)
    assert result["model"] == str(bundle) and result["router"] == "bundle" and result["blocks"] == 30
    assert result["static"] == list(manifest.candidates[0].omitted) and result["k"] == 7
    pick = load(str(bundle)).router.best(ROUTER_TEXT)[0]
    assert result["routed"] == list(manifest.candidates[pick].omitted)
    for row in result["rows"]:
        assert row["router_s"] > 0 and row["ideal"] == pytest.approx(30 / 23)
    prefill, generate = result["rows"]
    assert "lossless_s" not in prefill and 0 <= generate["lossless_accepted"] <= 1
    assert "lossless: the routed set drafts 1 tokens" in done.stdout
