"""Bundle manifests: a valid bundle loads (with and without a router); every malformed one fails
with one line naming the file and the field, a non-zero exit, and no traceback."""

import json
import shutil
import sys

import pytest

from pudding_mlx.app.cli import main
from pudding_mlx.bundle import Candidate, Manifest, read_manifest, write_manifest
from pudding_mlx.errors import PuddingError
from pudding_mlx.load import load


@pytest.fixture
def bundle(tiny_llm_dir, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_llm_dir, out)
    write_manifest(out, Manifest(num_blocks=6, candidates=[Candidate((1, 3)), Candidate((2, 4), "piqa", "likelihood", [4, 2])],
                                 provenance={"source_model": "tiny", "k": 2}))
    return out


def cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["pudding-mlx", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def test_valid_bundle_without_router(bundle):
    loaded = load(str(bundle))
    assert loaded.manifest.candidates[1].omitted == (2, 4) and loaded.router is None
    assert read_manifest(bundle).to_json() == json.loads((bundle / "pudding.json").read_text())


def test_bundle_is_a_stock_mlx_lm_directory(bundle):
    from mlx_lm import load as mlx_lm_load

    model, _ = mlx_lm_load(str(bundle))
    assert len(model.layers) == 6


def edit(bundle, **changes):
    data = json.loads((bundle / "pudding.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    (bundle / "pudding.json").write_text(json.dumps(data))


BAD = [
    (dict(schema_version=7), "schema_version"),
    (dict(format="something"), "'format'"),
    (dict(candidates=[[1, 99]]), "candidates[0].omitted"),
    (dict(candidates=[[1, 2], [3, 3]]), "candidates[1].omitted"),
    (dict(candidates=[[0, 1, 2, 3, 4, 5]]), "omits all 6 blocks"),
    (dict(candidates=[[1, -2]]), "out of range"),
    (dict(candidates=[["1"]]), "integers only"),
    (dict(num_blocks=7), "'num_blocks' is 7 but the LLM has 6"),
    (dict(num_blocks=...), "num_blocks"),
    (dict(router={"path": "router"}), "router.path"),
    (dict(router={"path": "router", "kind": "gpt"}), "router.kind"),
    (dict(router={"path": "router", "kind": "hidden"}), "needs schema version 2"),  # a v1 manifest
]


@pytest.mark.parametrize("changes, message", BAD)
def test_bad_manifest_one_line(bundle, monkeypatch, capsys, changes, message):
    edit(bundle, **changes)
    code, err = cli(monkeypatch, capsys, "generate", bundle, "-p", "hi", "--dense", "-m", "2")
    assert code == 2
    assert message in err and "pudding.json" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_malformed_json(bundle, monkeypatch, capsys):
    (bundle / "pudding.json").write_text('{"format": "pudding-mlx-bundle", ')
    code, err = cli(monkeypatch, capsys, "generate", bundle, "-p", "hi")
    assert code == 2 and "not valid JSON" in err and "pudding.json" in err


@pytest.mark.parametrize("missing, message", [("config.json", "config.json"), ("model.safetensors", "safetensors")])
def test_missing_file(bundle, monkeypatch, capsys, missing, message):
    (bundle / missing).unlink()
    code, err = cli(monkeypatch, capsys, "generate", bundle, "-p", "hi")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_write_manifest_is_atomic(bundle):
    write_manifest(bundle, Manifest(num_blocks=6))
    assert not list(bundle.glob("*.tmp")) and read_manifest(bundle).candidates == []


def test_router_needs_candidates(bundle):
    (bundle / "router").mkdir()
    edit(bundle, router={"path": "router"}, candidates=[])
    with pytest.raises(PuddingError, match="'candidates' is empty"):
        read_manifest(bundle)
