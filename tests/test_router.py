"""Router: MLX BERT + head vs PyTorch on real weights, the converter's source layouts, bad inputs.

The real-weight parity uses all-MiniLM-L6-v2 (fixture `minilm_dir`) with a seeded random 10-output
head and the texts, head and PyTorch reference of benchmarks/router_parity.py (imported from there,
so the figures printed here with -s and the script's are the same measurement). The MLX CPU wheel
is slow on a 512-token batch, so the full batch (TEXTS) runs once, on the save_pretrained layout;
the light and pytorch_model.bin layouts are shown to give the same MLX weights and tokens, and are
checked against PyTorch on the short batch (SHORT).

Bad-input tests use a tiny random BERT written with numpy (no torch needed).
"""

import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from pudding_mlx.convert.router import convert_router
from pudding_mlx.errors import PuddingError
from pudding_mlx.router import load_router

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
M = 10


def _parity_module():
    spec = importlib.util.spec_from_file_location("router_parity", REPO / "benchmarks" / "router_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rp = _parity_module()


def same_weights(a: Path, b: Path) -> None:
    wa, wb = mx.load(str(a / "model.safetensors")), mx.load(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and mx.array_equal(wa[k], wb[k]).item(), k


def same_tokens(r1, r2, texts) -> None:
    t1, t2 = r1.tokenize(texts), r2.tokenize(texts)
    for k in ("input_ids", "attention_mask"):
        assert mx.array_equal(t1[k], t2[k]).item(), k


# --------------------------------------------------------------------------- real weights vs PyTorch


@pytest.fixture(scope="module")
def parity(minilm_dir, tmp_path_factory):
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("parity")
    ref = rp.Reference(minilm_dir, M, seed=0)
    seqcls = ref.save_sequence_classification(tmp / "seqcls")
    out = convert_router(seqcls, tmp / "mlx-seqcls", expect_outputs=M)
    return {"ref": ref, "texts": ref.scores(rp.TEXTS), "short": ref.scores(rp.SHORT), "tmp": tmp,
            "seqcls": out, "router": load_router(out, num_outputs=M)}


def _check(scores: mx.array, ref: np.ndarray, label: str) -> None:
    assert scores.shape == ref.shape and scores.dtype == mx.float32
    s = np.array(scores)
    diff = float(np.abs(s - ref).max())
    agree = int((s.argmax(-1) == ref.argmax(-1)).sum())
    print(f"\nrouter parity {label} (all-MiniLM-L6-v2 + seeded {M}-output head, float32, {len(ref)} texts): "
          f"max abs diff {diff:.3e}, argmax agreement {agree}/{len(ref)}")
    assert diff < 1e-4
    assert agree == len(ref)


@pytest.mark.torch
def test_parity_full_batch(parity):
    """One word, a paragraph, > 512 tokens, unicode: one batch, truncated and padded to 512."""
    router = parity["router"]
    batch = router.tokenize(rp.TEXTS)
    assert len(router.tokenizer(rp.LONG)["input_ids"]) > 512
    assert batch["input_ids"].shape == (len(rp.TEXTS), 512)
    assert batch["attention_mask"].sum(axis=1).min().item() < 10  # "Hello" is mostly padding
    _check(router.scores(rp.TEXTS), parity["texts"], "TEXTS, save_pretrained layout")


@pytest.mark.torch
def test_parity_short_batch(parity):
    _check(parity["router"].scores(rp.SHORT), parity["short"], "SHORT, save_pretrained layout")


@pytest.mark.torch
def test_light_router_matches(parity, minilm_dir):
    out = convert_router(parity["ref"].save_light(parity["tmp"] / "light"), parity["tmp"] / "mlx-light", expect_outputs=M)
    same_weights(out, parity["seqcls"])  # the same tensors as the save_pretrained layout...
    router = load_router(out, num_outputs=M)
    same_tokens(router, parity["router"], rp.TEXTS)  # ...and the same tokens, so the full batch agrees too
    _check(router.scores(rp.SHORT), parity["short"], "SHORT, light layout")
    info = json.loads((out / "router.json").read_text())
    assert info == {"format": "pudding-mlx-router", "schema_version": 1, "num_outputs": M, "max_length": 512,
                    "lowercase": True, "pooling": "pooler", "encoder": info["encoder"]}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["router.json", "config.json", "model.safetensors"] + [f for f in TOKENIZER_FILES if (minilm_dir / f).is_file()])


@pytest.mark.torch
def test_pytorch_model_bin(parity):
    src = parity["ref"].save_sequence_classification(parity["tmp"] / "bin", bin_file=True)
    assert (src / "pytorch_model.bin").is_file() and not (src / "model.safetensors").exists()
    out = convert_router(src, parity["tmp"] / "mlx-bin")
    same_weights(out, parity["seqcls"])
    _check(load_router(out).scores(rp.SHORT), parity["short"], "SHORT, pytorch_model.bin layout")


@pytest.mark.torch
def test_best(parity):
    router, ref = parity["router"], parity["short"]
    index, scores, ms = router.best(rp.SHORT[1])
    assert index == int(ref[1].argmax())
    assert len(scores) == M and np.abs(np.array(scores) - ref[1]).max() < 1e-4
    assert ms > 0
    assert router.num_outputs == M
    assert router.scores([]).shape == (0, M)


# --------------------------------------------------------------------------- a tiny random BERT (numpy)

TINY = dict(hidden=32, layers=2, heads=4, inter=64, outputs=3)


def tiny_config(num_labels=TINY["outputs"]) -> dict:
    return {
        "architectures": ["BertForSequenceClassification"], "model_type": "bert", "vocab_size": 30522,
        "hidden_size": TINY["hidden"], "num_hidden_layers": TINY["layers"], "num_attention_heads": TINY["heads"],
        "intermediate_size": TINY["inter"], "max_position_embeddings": 512, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(num_labels)},
    }


def tiny_encoder(prefix="bert.", seed=0) -> dict:
    rng = np.random.default_rng(seed)
    H, F = TINY["hidden"], TINY["inter"]

    def w(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    def ln(name):
        return {f"{name}.weight": (1 + w(H) * 0.5).astype(np.float32), f"{name}.bias": w(H)}

    t = {"embeddings.word_embeddings.weight": w(30522, H), "embeddings.position_embeddings.weight": w(512, H),
         "embeddings.token_type_embeddings.weight": w(2, H), **ln("embeddings.LayerNorm"),
         "pooler.dense.weight": w(H, H), "pooler.dense.bias": w(H)}
    for i in range(TINY["layers"]):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            t[f"{p}attention.self.{n}.weight"], t[f"{p}attention.self.{n}.bias"] = w(H, H), w(H)
        t[f"{p}attention.output.dense.weight"], t[f"{p}attention.output.dense.bias"] = w(H, H), w(H)
        t.update(ln(f"{p}attention.output.LayerNorm"))
        t[f"{p}intermediate.dense.weight"], t[f"{p}intermediate.dense.bias"] = w(F, H), w(F)
        t[f"{p}output.dense.weight"], t[f"{p}output.dense.bias"] = w(H, F), w(H)
        t.update(ln(f"{p}output.LayerNorm"))
    return {prefix + k: v for k, v in t.items()}


def tiny_head(seed=1, outputs=TINY["outputs"]):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((outputs, TINY["hidden"])).astype(np.float32),
            rng.standard_normal(outputs).astype(np.float32))


def copy_tokenizer(minilm_dir: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (minilm_dir / name).is_file():
            shutil.copyfile(minilm_dir / name, dst / name)


@pytest.fixture
def tiny_seqcls(minilm_dir, tmp_path):
    src = tmp_path / "tiny-seqcls"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(tiny_config()))
    weight, bias = tiny_head()
    save_file({**tiny_encoder(), "classifier.weight": weight, "classifier.bias": bias},
              str(src / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(minilm_dir, src)
    return src


@pytest.fixture
def tiny_light(minilm_dir, tmp_path):
    """A light router whose encoder folder is a BertModel checkpoint with `bert.`-prefixed names."""
    src = tmp_path / "tiny-light"
    enc = src / "encoder"
    enc.mkdir(parents=True)
    cfg = tiny_config()
    cfg["architectures"] = ["BertModel"]
    (enc / "config.json").write_text(json.dumps(cfg))
    save_file(tiny_encoder(prefix="bert."), str(enc / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(minilm_dir, enc)
    weight, bias = tiny_head()
    save_file({"weight": weight, "bias": bias}, str(src / "head.safetensors"))
    (src / "head.json").write_text(json.dumps({"encoder": "encoder", "num_outputs": TINY["outputs"]}))
    return src


@pytest.fixture
def outs(tmp_path):
    d = tmp_path / "outs"
    d.mkdir()
    return d


@pytest.mark.torch
def test_tiny_layouts_match_hf(tiny_seqcls, tiny_light, outs):
    """Both layouts (light with `bert.`-prefixed encoder names) vs HF BertForSequenceClassification."""
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(str(tiny_seqcls)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_seqcls))
    with torch.no_grad():
        ref = model(**tok(rp.TEXTS, padding="longest", truncation=True, max_length=512, return_tensors="pt")).logits.numpy()
    for src, name in ((tiny_seqcls, "a"), (tiny_light, "b")):
        s = np.array(load_router(convert_router(src, outs / name)).scores(rp.TEXTS))
        assert np.abs(s - ref).max() < 1e-4, src.name
        assert (s.argmax(-1) == ref.argmax(-1)).all()
    same_weights(outs / "a", outs / "b")


def test_converted_router_and_light_encoder_name(tiny_light, outs):
    """Issue 12, items 8 and 9: the converted folder has the usual modes, not mkdtemp's 0700; a light
    router's head.json may name its encoder (`encoder_name`, as the default bundle does for
    all-MiniLM-L6-v2, whose config names only the model it was trained from), else the config does."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    out = convert_router(tiny_light, outs / "plain")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert json.loads((out / "router.json").read_text())["encoder"] == "encoder"  # the folder: no _name_or_path
    head = json.loads((tiny_light / "head.json").read_text())
    (tiny_light / "head.json").write_text(json.dumps(dict(head, encoder_name="someone/tiny-bert")))
    out = convert_router(tiny_light, outs / "named")
    assert json.loads((out / "router.json").read_text())["encoder"] == "someone/tiny-bert"


def test_float16(tiny_seqcls, outs):
    r32 = load_router(convert_router(tiny_seqcls, outs / "f32"))
    r16 = load_router(convert_router(tiny_seqcls, outs / "f16", dtype="float16"))
    assert r16.model.head.weight.dtype == mx.float16
    s16, s32 = r16.scores(rp.SHORT), r32.scores(rp.SHORT)
    assert s16.dtype == mx.float32
    assert np.abs(np.array(s16) - np.array(s32)).max() < 5e-2
    cast = load_router(outs / "f32", dtype=mx.float16)  # load-time cast of a float32 router
    assert cast.model.head.weight.dtype == mx.float16 and cast.scores(["hi"]).dtype == mx.float32


def test_bfloat16_source_and_output(tiny_light, outs):
    """A bf16 head.safetensors (numpy cannot read it; MLX does) converts, exactly, to bf16 or f32."""
    ref = load_router(convert_router(tiny_light, outs / "ref"))
    weight, bias = tiny_head()
    wb = mx.array(weight).astype(mx.bfloat16)
    mx.save_safetensors(str(tiny_light / "head.safetensors"), {"weight": wb, "bias": mx.array(bias).astype(mx.bfloat16)})
    r32 = load_router(convert_router(tiny_light, outs / "f32"))
    assert mx.array_equal(r32.model.head.weight, wb.astype(mx.float32)).item()
    r16 = load_router(convert_router(tiny_light, outs / "bf16", dtype="bfloat16"))
    assert r16.model.head.weight.dtype == mx.bfloat16
    assert np.abs(np.array(r16.scores(["hello"])) - np.array(ref.scores(["hello"]))).max() < 0.1


def test_works_without_torch(tiny_seqcls, tiny_light, outs):
    """The safetensors paths and the runtime never import torch (run with torch made unimportable)."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` fails, find_spec says absent
        from pudding_mlx.convert.router import convert_router
        from pudding_mlx.router import load_router
        for src, out in (({str(tiny_seqcls)!r}, {str(outs / "a")!r}), ({str(tiny_light)!r}, {str(outs / "b")!r})):
            print(load_router(convert_router(src, out)).best("hello")[0])
        assert sys.modules["torch"] is None
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------- bad inputs


def _one_line(e) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def _nothing_left(outs: Path) -> None:
    assert list(outs.iterdir()) == []  # neither OUT nor a temporary folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _drop_tensor(path: Path, key: str) -> None:
    from safetensors.numpy import load_file

    t = load_file(str(path))
    del t[key]
    save_file(t, str(path), metadata={"format": "pt"})


SEQCLS_BREAKAGE = {
    "missing config": (lambda s: (s / "config.json").unlink(), "config.json"),
    "corrupt config json": (lambda s: (s / "config.json").write_text('{"hidden_size": 32,'), "not valid JSON"),
    "config not bert": (lambda s: (s / "config.json").write_text(json.dumps({**tiny_config(), "model_type": "gpt2"})), "model_type"),
    "truncated safetensors": (lambda s: _truncate(s / "model.safetensors"), "model.safetensors"),
    "no weights": (lambda s: (s / "model.safetensors").unlink(), "no model.safetensors"),
    "missing tensor": (lambda s: _drop_tensor(s / "model.safetensors", "bert.encoder.layer.1.output.dense.weight"), "layers.1.mlp.down_proj.weight"),
    "no pooler": (lambda s: _drop_tensor(s / "model.safetensors", "bert.pooler.dense.weight"), "pooler"),
    "no classifier": (lambda s: _drop_tensor(s / "model.safetensors", "classifier.weight"), "classifier.weight"),
    "num_labels mismatch": (lambda s: (s / "config.json").write_text(json.dumps(tiny_config(num_labels=4))), "id2label"),
    "no tokenizer": (lambda s: [(s / f).unlink() for f in ("tokenizer.json", "vocab.txt")], "tokenizer"),
    # Found only by loading back what was written: checks that a late failure leaves nothing.
    "corrupt tokenizer.json": (lambda s: (s / "tokenizer.json").write_text("{oops"), "tokenizer"),
}


@pytest.mark.parametrize("case", list(SEQCLS_BREAKAGE))
def test_bad_sequence_classification_source(tiny_seqcls, outs, case):
    breakage, expect = SEQCLS_BREAKAGE[case]
    breakage(tiny_seqcls)
    with pytest.raises(PuddingError) as e:
        convert_router(tiny_seqcls, outs / "router")
    assert expect in _one_line(e)
    _nothing_left(outs)


def _head_json(s: Path, **changes):
    data = json.loads((s / "head.json").read_text())
    data.update(changes)
    (s / "head.json").write_text(json.dumps(data))


LIGHT_BREAKAGE = {
    "corrupt head.json": (lambda s: (s / "head.json").write_text("nope"), "head.json"),
    "encoder folder missing": (lambda s: _head_json(s, encoder="nowhere"), "nowhere"),
    "num_outputs disagrees": (lambda s: _head_json(s, num_outputs=7), "num_outputs 7"),
    "head weights missing": (lambda s: (s / "head.safetensors").unlink(), "head.safetensors"),
    "head bias missing": (lambda s: save_file({"weight": tiny_head()[0]}, str(s / "head.safetensors")), "'bias'"),
    "head width wrong": (lambda s: save_file({"weight": np.zeros((3, 8), np.float32), "bias": np.zeros(3, np.float32)},
                                             str(s / "head.safetensors")), "head.weight"),
    "truncated encoder": (lambda s: _truncate(s / "encoder" / "model.safetensors"), "model.safetensors"),
}


@pytest.mark.parametrize("case", list(LIGHT_BREAKAGE))
def test_bad_light_source(tiny_light, outs, case):
    breakage, expect = LIGHT_BREAKAGE[case]
    breakage(tiny_light)
    with pytest.raises(PuddingError) as e:
        convert_router(tiny_light, outs / "router")
    assert expect in _one_line(e)
    _nothing_left(outs)


def test_expect_outputs_mismatch(tiny_seqcls, tiny_light, outs):
    for src in (tiny_seqcls, tiny_light):
        with pytest.raises(PuddingError) as e:
            convert_router(src, outs / "router", expect_outputs=5)
        msg = _one_line(e)
        assert "3 outputs" in msg and "5 were expected" in msg
        _nothing_left(outs)


def test_existing_out_needs_force(tiny_seqcls, outs):
    out = outs / "router"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PuddingError) as e:
        convert_router(tiny_seqcls, out)
    assert "force" in _one_line(e)
    assert sorted(p.name for p in outs.iterdir()) == ["router"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched

    convert_router(tiny_seqcls, out, force=True)
    assert sorted(p.name for p in outs.iterdir()) == ["router"]  # no leftovers
    assert not (out / "keep.txt").exists()
    assert load_router(out).num_outputs == TINY["outputs"]


@pytest.mark.parametrize("where", ["save", "load-back"])
def test_failure_while_writing_leaves_nothing(tiny_seqcls, outs, monkeypatch, where):
    import pudding_mlx.convert.router as conv

    def boom(*args, **kwargs):
        raise (OSError("No space left on device") if where == "save" else PuddingError("x: broken"))

    if where == "save":
        monkeypatch.setattr(conv.mx, "save_safetensors", boom)
        with pytest.raises(OSError):
            convert_router(tiny_seqcls, outs / "router")
    else:
        monkeypatch.setattr(conv, "load_router", boom)
        with pytest.raises(PuddingError) as e:
            convert_router(tiny_seqcls, outs / "router")
        assert "nothing was written" in _one_line(e)
    _nothing_left(outs)


def test_bad_dtype(tiny_seqcls, outs):
    with pytest.raises(PuddingError, match=r"dtype 'int8' is not supported; use one of float32"):
        convert_router(tiny_seqcls, outs / "router", dtype="int8")
    _nothing_left(outs)


@pytest.mark.torch
def test_bad_pytorch_bin(tiny_seqcls, outs):
    pytest.importorskip("torch")
    (tiny_seqcls / "model.safetensors").unlink()
    (tiny_seqcls / "pytorch_model.bin").write_bytes(b"not a torch file at all")
    with pytest.raises(PuddingError) as e:
        convert_router(tiny_seqcls, outs / "router")
    assert "pytorch_model.bin" in _one_line(e)
    _nothing_left(outs)


# --------------------------------------------------------------------------- load_router on bad folders


@pytest.fixture
def tiny_router(tiny_seqcls, tmp_path):
    return convert_router(tiny_seqcls, tmp_path / "router")


def test_load_router_num_outputs_mismatch(tiny_router):
    load_router(tiny_router, num_outputs=3)
    with pytest.raises(PuddingError) as e:
        load_router(tiny_router, num_outputs=5)
    msg = _one_line(e)
    assert "model.safetensors" in msg and "3 outputs" in msg and "5 were expected" in msg


def _router_json(r: Path, **changes):
    data = json.loads((r / "router.json").read_text())
    data.update(changes)
    (r / "router.json").write_text(json.dumps(data))


def _drop_mlx_tensor(r: Path, key: str):
    w = mx.load(str(r / "model.safetensors"))
    del w[key]
    mx.save_safetensors(str(r / "model.safetensors"), w)


ROUTER_BREAKAGE = {
    "missing router.json": (lambda r: (r / "router.json").unlink(), "router.json"),
    "corrupt router.json": (lambda r: (r / "router.json").write_text("{"), "not valid JSON"),
    "wrong format": (lambda r: _router_json(r, format="something"), "'format'"),
    "future schema": (lambda r: _router_json(r, schema_version=2), "schema_version"),
    "num_outputs disagrees": (lambda r: _router_json(r, num_outputs=4), "num_outputs"),
    "max_length too long": (lambda r: _router_json(r, max_length=4096), "max_length"),
    "missing config": (lambda r: (r / "config.json").unlink(), "config.json"),
    "missing weights": (lambda r: (r / "model.safetensors").unlink(), "model.safetensors"),
    "truncated weights": (lambda r: _truncate(r / "model.safetensors"), "truncated"),
    "missing tensor": (lambda r: _drop_mlx_tensor(r, "encoder.pooler.dense.bias"), "encoder.pooler.dense.bias"),
    "no tokenizer": (lambda r: [(r / f).unlink() for f in ("tokenizer.json", "vocab.txt")], "tokenizer"),
}


@pytest.mark.parametrize("case", list(ROUTER_BREAKAGE))
def test_load_router_bad_folder(tiny_router, case):
    breakage, expect = ROUTER_BREAKAGE[case]
    breakage(tiny_router)
    with pytest.raises(PuddingError) as e:
        load_router(tiny_router)
    assert expect in _one_line(e)


def test_load_router_missing_folder(tmp_path):
    with pytest.raises(PuddingError, match=r"nope: the router folder does not exist; convert one with"):
        load_router(tmp_path / "nope")


def test_scores_rejects_a_bare_string(tiny_router):
    with pytest.raises(PuddingError, match=r"Router.scores takes a list of prompts, got one string"):
        load_router(tiny_router).scores("hello")
