"""Defects a new user hit (issue 12, items 5, 6, 8, 9): each promised one line and exit 2, or a
rebuilt cache, or a normal folder mode; each test fails without its fix."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import helpers

from pudding_mlx.bundle import Candidate, Manifest, write_manifest
from pudding_mlx.errors import PuddingError
from pudding_mlx.omission import parse_omit

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks")


def run_cli(*args):
    return helpers.run_cli(*args, env={"HF_HUB_OFFLINE": "1"}, timeout=300)


assert_one_line = helpers.assert_one_line


@pytest.fixture
def bundle(tiny_llm_dir, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_llm_dir, out)
    write_manifest(out, Manifest(num_blocks=6, candidates=[Candidate((1, 3)), Candidate((2, 5))]))
    return out


# -- item 5: one line, exit 2 --------------------------------------------------------------------


def test_empty_prompt_without_template(tiny_llm_dir):
    done = run_cli("generate", tiny_llm_dir, "-p", "", "--ignore-chat-template", "--dense")
    assert_one_line(done, "the prompt is empty")


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_truncated_weights(bundle, command):
    weights = bundle / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # as `truncate -s` leaves an interrupted copy
    args = {"generate": ["generate", bundle, "-p", "hi", "--dense"],
            "chat": ["chat", bundle, "--dense"],
            "eval": ["eval", bundle, "--tasks", "piqa", "--limit", "1", "--dense", "--data-dir", DATA]}[command]
    assert_one_line(run_cli(*args), "model.safetensors", "truncated")


# -- item 6: --omit "" and --omit 3,,5 are errors, not dense -------------------------------------


@pytest.mark.parametrize("text", ["", "3,,5", "3,", ",", " "])
def test_parse_omit_refuses_empty_items(text):
    with pytest.raises(PuddingError, match="empty block index"):
        parse_omit(text)


def test_parse_omit_reads_indices():
    assert parse_omit("3, 5,9") == [3, 5, 9]


@pytest.mark.parametrize("text", ["", "1,,3"])
def test_omit_empty_on_the_cli(tiny_llm_dir, text):
    done = run_cli("generate", tiny_llm_dir, "-p", "hi", "--omit", text, "--json")
    assert_one_line(done, "--omit", "empty block index")
    assert done.stdout == ""


# -- item 8: info checks num_blocks like generate; scores is null unless routed ------------------


@pytest.mark.parametrize("command", ["info", "generate"])
def test_num_blocks_mismatch_blames_num_blocks(bundle, command):
    data = json.loads((bundle / "pudding.json").read_text())
    data["num_blocks"] = 5  # the LLM has 6; candidate [2, 5] is out of range for 5 blocks
    (bundle / "pudding.json").write_text(json.dumps(data))
    args = ["info", bundle, "--json"] if command == "info" else ["generate", bundle, "-p", "hi", "--dense"]
    done = run_cli(*args)
    assert_one_line(done, "'num_blocks' is 5 but the LLM has 6")
    assert "candidates[" not in done.stderr


@pytest.mark.parametrize("flag", [["--dense"], ["--omit", "1,2"]])
def test_scores_null_unless_routed(tiny_llm_dir, flag):
    done = run_cli("generate", tiny_llm_dir, "-p", "hi", "-m", "2", "--json", *flag)
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["scores"] is None and payload["candidate"] is None and payload["router_ms"] is None


# -- item 9: published folders have the usual modes, not mkdtemp's 0700 --------------------------


def _usual_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def test_built_bundle_has_usual_permissions(tiny_llm_dir, tmp_path):
    from pudding_mlx.convert.bundle import build_bundle

    out = build_bundle(tiny_llm_dir, tmp_path / "b", [[1, 3]])
    assert stat.S_IMODE(out.stat().st_mode) == _usual_dir_mode()
    assert stat.S_IMODE((out / "pudding.json").stat().st_mode) == _usual_dir_mode() & 0o666


# -- item 5: a damaged cached default bundle is rebuilt ------------------------------------------


def test_default_bundle_with_damaged_weights_is_rebuilt(tiny_default_build):
    from pudding_mlx.convert import default_bundle as db

    data, calls = tiny_default_build
    path = db.ensure_default_bundle(data_dir=data)
    assert len(calls) == 1 and stat.S_IMODE(path.stat().st_mode) == _usual_dir_mode()
    weights = path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    assert not db.is_complete(path, data)
    assert db.ensure_default_bundle(data_dir=data) == path and len(calls) == 2
    assert db.is_complete(path, data)


# -- one hub resolution: HF_HUB_OFFLINE read as huggingface_hub reads it --------------------------


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("YES", True), ("on", True),
                                            ("0", False), ("", False), ("false", False)])
def test_hf_hub_offline_values(monkeypatch, value, offline):
    from huggingface_hub import constants

    from pudding_mlx import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.offline() is offline
    assert constants._is_true(value) is offline  # the same reading as the hub library's own


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_offline_hub_id_is_one_line_for_load_and_convert(tmp_path, monkeypatch, command):
    """load.py took only "1" as offline and convert/llm.py also "true"/"yes"/"on": now both the same."""
    from pudding_mlx.convert.llm import convert_llm
    from pudding_mlx.load import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "true")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(PuddingError, match="HF_HUB_OFFLINE"):
        if command == "generate":
            resolve("nobody-here/no-such-model")
        else:
            convert_llm("nobody-here/no-such-model", tmp_path / "out")


# -- item 6: the over-long prompt's refusal is our one line, no transformers warning before it ----


@pytest.mark.parametrize("template", [True, False])
def test_too_long_prompt_is_only_our_line(tiny_llm_dir, tmp_path, template):
    model = tmp_path / "model"
    shutil.copytree(tiny_llm_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["model_max_length"] = 256  # as `convert llm` writes it: the model's context
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    done = run_cli("generate", model, "-p", "word " * 400, *([] if template else ["--ignore-chat-template"]))
    assert_one_line(done, "context is 256")


def test_too_long_conversation_in_chat_is_only_our_line(tiny_llm_dir, tmp_path):
    """The chat session renders the whole conversation: the same warning must not precede its refusal
    (in a fresh process, where transformers' logging is as a user's)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llm_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["model_max_length"] = 256
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    code = ("import sys\nfrom pudding_mlx.chat import ChatSession\nfrom pudding_mlx.errors import PuddingError\n"
            "from pudding_mlx.load import load\nsession = ChatSession.from_loaded(load(sys.argv[1]))\n"
            "try:\n    session.reply('word ' * 400, max_tokens=2)\nexcept PuddingError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "context is 256" in done.stdout, done.stderr
    assert "Token indices sequence length" not in done.stderr, done.stderr


# -- the one folder publisher: atomic.install_dir ------------------------------------------------


def test_install_dir_force_keep_and_refuse(tmp_path):
    from pudding_mlx.atomic import install_dir

    def folder(name, text):
        path = tmp_path / name
        path.mkdir()
        (path / "f").write_text(text)
        return path

    out = tmp_path / "out"
    install_dir(folder("a", "a"), out)
    assert (out / "f").read_text() == "a"
    with pytest.raises(PuddingError, match="already exists"):
        install_dir(folder("b", "b"), out)
    assert (out / "f").read_text() == "a" and (tmp_path / "b").is_dir()
    install_dir(tmp_path / "b", out, force=True, keep=lambda p: (p / "f").read_text() == "a")
    assert (out / "f").read_text() == "a" and (tmp_path / "b").is_dir()  # kept: already what we built
    install_dir(tmp_path / "b", out, force=True, keep=lambda p: False)
    assert (out / "f").read_text() == "b" and not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing set aside is left


def test_running_out_of_device_memory_is_one_line_not_a_traceback(monkeypatch, capsys):
    """MLX raises RuntimeError when the device runs out of memory (seen on CUDA: eval on a GPU another process
    filled): one line naming the cause and what to lower, exit 1; any other RuntimeError is still a bug and
    keeps its traceback."""
    from pudding_mlx.app import cli

    def oom():
        raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")

    monkeypatch.setattr(cli, "app", oom)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory" in err and "--batch-size" in err

    def bug():
        raise RuntimeError("shapes (3,4) and (5,6) cannot be broadcast")

    monkeypatch.setattr(cli, "app", bug)
    with pytest.raises(RuntimeError, match="broadcast"):
        cli.main()
