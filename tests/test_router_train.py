"""Router data (scores per candidate set, resumable) and router training (light and full), on a tiny
random Llama with SmolLM2's real tokenizer, real benchmark rows and the real all-MiniLM-L6-v2
(CPU, float32). The trained routers are converted to MLX and checked against PyTorch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from pudding_mlx.errors import PuddingError  # noqa: E402
from pudding_mlx.train import router_data as RD  # noqa: E402
from pudding_mlx.train import router_train as RT  # noqa: E402
from pudding_mlx.train.scoring import evaluate  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.assets]
# the real files: ../shared/data/benchmarks beside the repository (or $PUDDING_MLX_DATA)
DATA = Path(os.environ.get("PUDDING_MLX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
            / "benchmarks")
TASKS = ["arc_easy", "piqa"]
SETS = [[1, 2], [3, 4], [2, 5]]
PER_TASK = 8
TEXTS = ["Which gas do plants take in to make food?",
         "How do I keep bread from going stale?",
         "what is 2 + 2"]


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def llm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def cand_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cand") / "candidates.json"
    path.write_text(json.dumps({"format": "pudding-mlx-candidates", "schema_version": 1,
                                "num_blocks": 6, "k": 2,
                                "candidates": [{"omitted": s, "task": "arc_easy"} for s in SETS]}))
    return path


def build(llm, tok, cand_file, out, **kw):
    return RD.build_router_data(llm, tok, cand_file, TASKS, out, max_per_task=PER_TASK, seed=0,
                                batch_size=16, data_dir=DATA, model_name="tiny-llama", **kw)


@pytest.fixture(scope="module")
def built(llm, tok, cand_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rdata") / "data"
    path = build(llm, tok, cand_file, out)
    return out, path


def arrays(path):
    d = RD.load_router_data(path)
    d.pop("meta")
    return d


def same_arrays(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k


# --------------------------------------------------------------------------- router data


def test_data_matches_evaluate(built, llm, tok):
    out, path = built
    assert path == out / "router_data.npz" and path.is_file()
    data = RD.load_router_data(path)
    meta = data["meta"]
    assert meta["sets"] == SETS and meta["n"] == 2 * PER_TASK
    assert meta["settings"]["model"] == "tiny-llama" and meta["settings"]["tasks"] == TASKS
    assert meta["provenance"]["candidates"]["sha256"] and meta["provenance"]["versions"]["torch"]
    n, m = len(data["id"]), len(SETS)
    assert data["y"].shape == (n, m) and data["y"].dtype == np.float32
    assert data["correct"].shape == (n, m) and data["correct"].dtype == bool
    assert data["dense"].shape == (n,) and data["n_choices"].shape == (n,)
    examples = RD.draw_examples(TASKS, "train", PER_TASK, 0, DATA)
    for t in TASKS:
        rows = np.flatnonzero(data["task"] == t)
        ex = examples[t]
        assert list(data["id"][rows]) == [e.id for e in ex]
        assert list(data["text"][rows]) == [e.router_text for e in ex]
        assert list(data["n_choices"][rows]) == [e.n_choices for e in ex]
        for col, omitted in [(None, [])] + list(enumerate(SETS)):
            ref = evaluate(llm, tok, ex, omitted, batch_size=16)
            y = data["dense"][rows] if col is None else data["y"][rows, col]
            np.testing.assert_allclose(y, ref["gold_mean_ll"], rtol=0, atol=1e-5)
            acc = data["dense_correct"][rows] if col is None else data["correct"][rows, col]
            accn = data["dense_correct_norm"][rows] if col is None else data["correct_norm"][rows, col]
            assert np.array_equal(acc, ref["correct"]) and np.array_equal(accn, ref["correct_norm"])
            ml = data["dense_mean_ll"][rows] if col is None else data["mean_ll"][rows, col]
            lp = data["dense_logprob"][rows] if col is None else data["logprob"][rows, col]
            for i, e in enumerate(ex):
                np.testing.assert_allclose(ml[i, : e.n_choices], ref["mean_ll"][i], atol=1e-5)
                np.testing.assert_allclose(lp[i, : e.n_choices], ref["logprob"][i], atol=1e-4)
                assert np.isnan(ml[i, e.n_choices:]).all()
    # the sets really change the scores
    assert np.abs(data["y"][:, 0] - data["y"][:, 1]).max() > 1e-3


def test_resume_after_deleting_a_chunk(built, llm, tok, cand_file, tmp_path, monkeypatch):
    out, path = built
    ref = arrays(path)
    copy = tmp_path / "data"
    shutil.copytree(out, copy)
    victim = copy / "chunks" / RD.chunk_name(1, "piqa", 1)
    assert victim.is_file()
    victim.unlink()
    (copy / "router_data.npz").unlink()
    calls = []
    from pudding_mlx.train import distributed

    real = distributed.evaluate_everywhere

    def counting(model, tokenizer, examples, omitted=(), **kw):
        calls.append((examples[0].task, list(omitted)))
        return real(model, tokenizer, examples, omitted, **kw)

    monkeypatch.setattr("pudding_mlx.train.distributed.evaluate_everywhere", counting)
    seen = []
    build(llm, tok, cand_file, copy, progress=lambda d, t, name: seen.append((d, t, name)))
    assert calls == [("piqa", SETS[1])]  # only the deleted chunk was scored again
    assert [s[0] for s in seen] == list(range(1, 9)) and all(s[1] == 8 for s in seen)
    same_arrays(arrays(copy), ref)


def test_resume_after_interruption(built, llm, tok, cand_file, tmp_path):
    _, path = built
    out = tmp_path / "data"

    class Stop(Exception):
        pass

    def stop_after_3(done, total, name):
        if done == 3:
            raise Stop(name)

    with pytest.raises(Stop):
        build(llm, tok, cand_file, out, progress=stop_after_3)
    assert len(list((out / "chunks").glob("*.npz"))) == 3
    assert not (out / "router_data.npz").exists()
    assert not list(out.rglob("*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["chunks"]) == 3 and manifest["settings"]["sets"] == SETS
    build(llm, tok, cand_file, out)
    same_arrays(arrays(out), arrays(path))
    # other settings in the same folder are refused
    with pytest.raises(PuddingError, match="other settings"):
        RD.build_router_data(llm, tok, cand_file, TASKS, out, max_per_task=PER_TASK, seed=1,
                             batch_size=16, data_dir=DATA, model_name="tiny-llama")


def test_bad_candidates(llm, tok, tmp_path):
    for sets, match in (([[1, 2], [2, 1]], "same set"), ([[9]], "out of range"), ([], "no candidate")):
        with pytest.raises(PuddingError, match=match):
            RD.build_router_data(llm, tok, sets, TASKS, tmp_path / "x", max_per_task=2, data_dir=DATA)


def test_split_by_question(built):
    data = RD.load_router_data(built[1])
    tr, va = RD.split_by_question(data, 0.25, seed=0)
    assert len(tr) and len(va) and sorted(np.concatenate([tr, va]).tolist()) == list(range(len(data["id"])))
    for t in TASKS:  # stratified: each task on both sides
        assert (data["task"][va] == t).sum() == 2
    tr2, va2 = RD.split_by_question(data, 0.25, seed=0)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)

    # repeated ids ("#k") and a text repeated under another id stay on one side
    synth = {"task": np.array(["hellaswag"] * 6 + ["piqa"] * 6),
             "id": np.array(["5", "5#1", "5#2", "6", "7", "8", "1", "2", "3", "4", "9", "10"]),
             "text": np.array(["a", "b", "c", "d", "e", "f", "g", "same", "same", "h", "i", "j"],
                              dtype=object)}
    for seed in range(20):
        tr, va = RD.split_by_question(synth, 0.34, seed)
        qk = lambda i: RD.question_key(synth["task"][i], synth["id"][i])  # noqa: E731
        assert not {qk(i) for i in tr} & {qk(i) for i in va}
        assert not {synth["text"][i] for i in tr} & {synth["text"][i] for i in va}
        assert len(tr) and len(va)
        assert ({0, 1, 2} <= set(tr) or {0, 1, 2} <= set(va))
        assert ({7, 8} <= set(tr) or {7, 8} <= set(va))


def test_router_metrics():
    y = np.array([[-1.0, -2.0, -3.0], [-2.0, -1.0, -1.0], [-3.0, -2.0, -1.0]])
    pred = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    r = RT.router_metrics(pred, y)
    assert r["n"] == 3 and r["agreement"] == pytest.approx(2 / 3)  # a tie counts as agreement
    assert r["regret"] == pytest.approx(1 / 3)
    assert r["mse"] == pytest.approx(np.mean((pred - y) ** 2))
    assert r["oracle_y"] == pytest.approx(-1.0) and r["chosen_y"] == pytest.approx(-4 / 3)


def test_no_mlx_import():
    code = ("import sys, pudding_mlx.train.router_data, pudding_mlx.train.router_train; "
            "assert 'mlx' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- training


def check_mlx_matches_torch(src, tmp_path, m):
    from pudding_mlx.convert.router import convert_router
    from pudding_mlx.router import load_router

    mlx_dir = convert_router(src, tmp_path / (src.name + "-mlx"), expect_outputs=m)
    router = load_router(mlx_dir, num_outputs=m)
    ref = RT.predict(src, TEXTS, device="cpu")
    got = np.array(router.scores(TEXTS))
    assert got.shape == ref.shape == (len(TEXTS), m)
    assert np.abs(got - ref).max() < 1e-4
    settings = json.loads((mlx_dir / "router.json").read_text())
    assert settings["lowercase"] is True and settings["max_length"] == 512
    return ref


def test_light_router(built, minilm_dir, tmp_path):
    events = []
    out = tmp_path / "light"
    metrics = RT.train_router(built[1], out, variant="light", encoder=minilm_dir, epochs=2,
                              batch_size=4, warmup=0, val_fraction=0.25, seed=0, device="cpu",
                              progress=events.append)
    ep = metrics["epochs"]
    assert len(ep) == 2 and ep[1]["train_mse"] < ep[0]["train_mse"]
    assert metrics["settings"]["lr"] == 1e-3 and metrics["n_val"] == 4 and metrics["n_train"] == 12
    assert metrics["best_epoch"] in (1, 2) and metrics["best_val"]["n"] == 4
    assert {"val_mse", "val_agreement", "val_regret"} <= set(ep[0])
    assert [e["event"] for e in events].count("epoch") == 2
    assert any(e["event"] == "features" for e in events)
    head = json.loads((out / "head.json").read_text())
    assert head["encoder"] == "encoder" and head["num_outputs"] == len(SETS)
    assert (out / "head.safetensors").is_file() and (out / "encoder" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".light.*"))  # no scratch folder left beside OUT (atomic.scratch_dir names them .light.<tag>-*)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (out / "head.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    info = json.loads((out / "router_train.json").read_text())
    assert info["best_epoch"] == metrics["best_epoch"] and info["sets"] == SETS
    # the saved head reproduces the best epoch's validation predictions
    data = RD.load_router_data(built[1])
    _, va = RD.split_by_question(data, 0.25, 0)
    pred = RT.predict(out, list(data["text"][va]), device="cpu")
    best = RT.router_metrics(pred, data["y"][va])
    assert best["mse"] == pytest.approx(metrics["best_val"]["mse"], rel=1e-4)
    check_mlx_matches_torch(out, tmp_path, len(SETS))
    with pytest.raises(PuddingError, match="already exists"):
        RT.train_router(built[1], out, variant="light", encoder=minilm_dir, epochs=1, device="cpu")


def test_light_router_standardized(built, minilm_dir, tmp_path):
    """Standardised targets: the saved head has the scaling folded in (outputs raw-scale y)."""
    out = tmp_path / "light-std"
    metrics = RT.train_router(built[1], out, variant="light", encoder=minilm_dir, epochs=1,
                              batch_size=8, warmup=0, val_fraction=0.25, device="cpu",
                              standardize=True)
    data = RD.load_router_data(built[1])
    _, va = RD.split_by_question(data, 0.25, 0)
    pred = RT.predict(out, list(data["text"][va]), device="cpu")
    assert RT.router_metrics(pred, data["y"][va])["mse"] == pytest.approx(metrics["best_val"]["mse"], rel=1e-4)
    assert abs(pred.mean() - data["y"].mean()) < 3.0  # raw scale, not z-scores


def test_full_router(built, minilm_dir, tmp_path):
    out = tmp_path / "full"
    metrics = RT.train_router(built[1], out, variant="full", encoder=minilm_dir, epochs=1,
                              batch_size=8, warmup=0, val_fraction=0.5, device="cpu")
    assert metrics["settings"]["lr"] == 1e-5 and len(metrics["epochs"]) == 1
    cfg = json.loads((out / "config.json").read_text())
    assert len(cfg["id2label"]) == len(SETS) and cfg["id2label"]["0"] == "omit:1,2"
    assert cfg["problem_type"] == "regression"
    assert (out / "model.safetensors").is_file() and (out / "vocab.txt").is_file()
    check_mlx_matches_torch(out, tmp_path, len(SETS))


def test_bad_variant_and_encoder(built, tmp_path):
    with pytest.raises(PuddingError, match="variant"):
        RT.train_router(built[1], tmp_path / "x", variant="huge")
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(PuddingError, match="BERT"):
        RT.train_router(built[1], tmp_path / "y", encoder=tmp_path / "enc")
