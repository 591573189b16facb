"""Self-distillation and healing on the PyTorch side (`train.distill`, `train.heal`), on a tiny random Llama with
SmolLM2's tokenizer and real distillation prompts: the answers file resumes to what one run writes; the reply
NLL equals the full model's loss; the generation-aware search takes the lowest-loss block; an adapter leaves
the dense model untouched, lowers the loss of the set it was trained for, and round-trips through its folder.
Through the CLI (`train distill-answers`, `distill-search`, `heal`): the answers file and its resume, candidates
files the runtime reads, an adapter folder whose printed healed val NLL is below the unhealed one; and a bad
input of each command is one line, exit 2."""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers import run_cli  # noqa: E402
from pudding_mlx.atomic import write_jsonl_gz  # noqa: E402
from pudding_mlx.candidates import read_candidates  # noqa: E402
from pudding_mlx.errors import PuddingError  # noqa: E402
from pudding_mlx.train import distill as D  # noqa: E402
from pudding_mlx.train import heal as H  # noqa: E402
from pudding_mlx.train.generation import generate, prompt_ids  # noqa: E402
from pudding_mlx.train.scoring import skip_blocks  # noqa: E402

pytestmark = pytest.mark.torch
PROMPTS = Path(__file__).resolve().parents[1] / "results" / "distill" / "prompts.json"


def _model(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # transformers' init is too weak for skipping a block to matter: scale the blocks up
        for p in model.model.layers.parameters():
            if p.ndim == 2:
                p.mul_(4)
    return model


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    from transformers import AutoTokenizer

    return _model(tiny_hf_dir), AutoTokenizer.from_pretrained(tiny_hf_dir)


@pytest.fixture(scope="module")
def distilled(tiny, tmp_path_factory):
    """A prompts file of 30 code and 30 task prompts of the committed set, answered by the tiny model."""
    model, tok = tiny
    out = tmp_path_factory.mktemp("distill")
    data = json.loads(PROMPTS.read_text())
    data["prompts"] = ([p for p in data["prompts"] if p["kind"] == "code"][:30]
                       + [p for p in data["prompts"] if p["kind"] == "task"][:30])
    (out / "prompts.json").write_text(json.dumps(data))
    answers = D.answer_prompts(model, tok, out / "prompts.json", out / "answers.jsonl.gz", "tiny", max_new_tokens=12,
                               batch_size=64, log=lambda m: None)
    return out / "prompts.json", answers


def test_answers_resume_to_what_one_run_writes(tiny, distilled, tmp_path, monkeypatch):
    model, tok = tiny
    prompts, whole = distilled
    monkeypatch.setattr(D, "CHUNK", 16)
    calls = []
    real = D.generate

    def stop_after_two(*a, **k):  # the third chunk "crashes": two chunks stay on disk
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(D, "generate", stop_after_two)
    out = tmp_path / "answers.jsonl.gz"
    with pytest.raises(KeyboardInterrupt):
        D.answer_prompts(model, tok, prompts, out, "tiny", max_new_tokens=12, batch_size=64, log=lambda m: None)
    assert not out.exists() and len(list((tmp_path / "answers.jsonl.gz.parts").glob("*.jsonl.gz"))) == 2
    monkeypatch.setattr(D, "generate", real)
    D.answer_prompts(model, tok, prompts, out, "tiny", max_new_tokens=12, batch_size=64, log=lambda m: None)
    h1, r1 = D.read_answers(out)
    h0, r0 = D.read_answers(whole)
    assert r1 == r0 and h1["counts"] == h0["counts"] and not (tmp_path / "answers.jsonl.gz.parts").exists()
    assert {r["split"] for r in r0} == {"train", "val"} and all(r["split"] == D.split_of(r["id"]) for r in r0)
    with pytest.raises(PuddingError, match="other settings"):  # a resumed run must ask the same
        (tmp_path / "answers.jsonl.gz.parts").mkdir()
        (tmp_path / "answers.jsonl.gz.parts" / "settings.json").write_text(json.dumps({"n": 1}))
        D.answer_prompts(model, tok, prompts, out, "tiny", max_new_tokens=12, log=lambda m: None)


def test_examples_hold_the_replies_and_their_nll_is_the_models_loss(tiny, distilled):
    model, tok = tiny
    prompts, answers = distilled
    examples = D.build_examples(tok, prompts, answers)
    _, rows = D.read_answers(answers)
    reply = next(e for e in examples if e.kind == "code")
    row = next(r for r in rows if r["id"] == reply.id)
    assert tok.decode(reply.ids[reply.start:]).startswith(row["text"][:10])
    assert {e.kind for e in examples} == {"code", "task", "code-text"}
    scores = D.target_nll(model, tok, examples[:9], batch_size=4)
    for e, (total, n) in zip(examples[:9], scores):  # the full model's own shifted cross-entropy
        with torch.no_grad():
            logits = model(torch.tensor([e.ids])).logits[0, :-1]
        want = torch.nn.functional.cross_entropy(logits[e.start - 1:], torch.tensor(e.ids[e.start:]), reduction="sum")
        assert n == len(e.ids) - e.start and total == pytest.approx(float(want), rel=1e-4)
    other = D.target_nll(model, tok, examples[:9], [2], batch_size=4)
    assert not np.allclose(other[:, 0], scores[:, 0])  # skipping a block changes it


def test_generation_aware_search_removes_the_block_of_lowest_loss(tiny, distilled, tmp_path):
    model, tok = tiny
    prompts, answers = distilled
    val = D.build_examples(tok, prompts, answers)  # all of them: the tiny set has few val prompts
    written = D.run_distill_search(model, tok, val, [1, 2], tmp_path / "cand.json", "tiny", protected=[0, 5],
                                   per_kind=6, batch_size=8, log=lambda m: None)
    groups = D.search_examples(val, 6)
    for group in D.SEARCH_GROUPS:
        chosen = [val[i] for i in groups[group]]
        losses = {b: D.mean_nll(D.target_nll(model, tok, chosen, [b], 8)) for b in (1, 2, 3, 4)}
        first = min(losses, key=lambda b: (losses[b], b))
        chains = json.loads((tmp_path / "cand.state.json").read_text())["chains"]
        assert chains[f"{group}/response_nll"][0]["removed"] == first
    k2 = read_candidates(tmp_path / "cand-k2.json")
    assert written[2]["k"] == 2 and all(len(c["omitted"]) == 2 and not {0, 5} & set(c["omitted"]) for c in k2)


def test_an_adapter_heals_its_set_keeps_dense_and_round_trips(tiny_hf_dir, distilled, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    model = _model(tiny_hf_dir)
    prompts, answers = distilled
    examples = [e for e in D.build_examples(tok, prompts, answers) if e.kind != "code-text"][:24]
    ids = torch.tensor([examples[0].ids])
    with torch.no_grad():
        dense_before = model(ids).logits
        unhealed = D.mean_nll(D.target_nll(model, tok, examples, [2, 3]))
    pm = H.add_lora(model, rank=4, alpha=8)
    curve = H.train_adapter(pm, tok, examples, [[2, 3]], steps=12, batch_size=8, lr=3e-3, every=4, log=lambda m: None)
    base = pm.get_base_model()
    healed = D.mean_nll(D.target_nll(base, tok, examples, [2, 3]))
    assert healed < unhealed - 0.05 and len(curve) == 3
    with torch.no_grad(), pm.disable_adapter():  # the teacher, and what --dense runs: the original model
        assert torch.equal(base(ids).logits, dense_before)
    out = H.save_adapter(pm, tmp_path / "adapter", [[3, 2]], {"steps": 12})
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "heal.json"]
    assert json.loads((out / "heal.json").read_text())["sets"] == [[2, 3]]
    again = PeftModel.from_pretrained(_model(tiny_hf_dir), str(out)).eval()
    with torch.no_grad(), skip_blocks(base, [2, 3]), skip_blocks(again.get_base_model(), [2, 3]):
        assert torch.allclose(again.get_base_model()(ids, use_cache=False).logits, base(ids, use_cache=False).logits,
                              atol=1e-5)
    table = H.nll_table(pm, tok, examples, [[2, 3]], ["default"])
    assert table["omit-2-3"]["default"] == pytest.approx(healed, rel=1e-5)
    assert table["omit-2-3"]["unhealed"] == pytest.approx(unhealed, rel=1e-5)


def test_a_batch_cut_into_micro_batches_has_the_whole_batchs_loss_and_gradients(tiny_hf_dir, distilled):
    """Long code examples train in micro-batches of at most max_targets target tokens: the gradients add up to the
    whole batch's (float32, to rounding), and so do the CE and KL it reports."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    prompts, answers = distilled
    batch = D.build_examples(tok, prompts, answers)[:8]  # replies and code texts: CE and KL both
    assert {e.kind for e in batch} >= {"code", "code-text"}
    parts = H.micro_batches(batch, 24)
    assert len(parts) > 2 and [e for p in parts for e in p] == batch
    assert all(sum(len(e.ids) - e.start for e in p) <= 24 or len(p) == 1 for p in parts)
    torch.manual_seed(0)
    pm = H.add_lora(_model(tiny_hf_dir), rank=4, alpha=8)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A's gradient zero: give it weights
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    params = {k: v for k, v in pm.named_parameters() if v.requires_grad}

    def grads(max_targets):
        for v in params.values():
            v.grad = None
        losses = H.backward(pm, tok, batch, [2, 3], kl_weight=0.5, max_targets=max_targets)
        return losses, {k: v.grad.clone() for k, v in params.items() if v.grad is not None}

    (ce, kl, bad), whole = grads(1 << 20)
    (ce_cut, kl_cut, bad_cut), cut = grads(24)
    assert bad == bad_cut == []
    assert ce > 0 and kl > 0 and (ce_cut, kl_cut) == pytest.approx((ce, kl), rel=1e-5)
    skipped = {k for k in params if re.search(r"layers\.[23]\.", k)}  # the set's own blocks never run
    assert set(whole) == set(cut) == set(params) - skipped and all(v.abs().max() > 0 for v in whole.values())
    for k in whole:
        assert torch.allclose(cut[k], whole[k], rtol=1e-4, atol=1e-7), k


def test_a_step_that_is_not_finite_is_skipped_and_named(tiny_hf_dir, distilled):
    """One example whose logits are NaN (the embedding of a token only it holds poisoned) must not spoil the
    adapter: its step is skipped, named in the curve with the model whose logits were not finite, and the others
    train."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    prompts, answers = distilled
    examples = [e for e in D.build_examples(tok, prompts, answers) if e.kind == "code"][:8]
    pad = D._pad_id(tok)  # padding runs through every row's attention: poison a token only examples[0] holds
    poison = next(t for t in examples[0].ids if t != pad and not any(t in e.ids for e in examples[1:]))
    model = _model(tiny_hf_dir)
    with torch.no_grad():  # untied first: a tied output row would make every position's logits NaN
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.get_input_embeddings().weight[poison] = float("nan")
    torch.manual_seed(0)
    pm = H.add_lora(model, rank=4, alpha=8)
    # batch 4, two passes over the 8: two steps hold the poisoned example, two do not
    curve = H.train_adapter(pm, tok, examples, [[2, 3]], steps=4, batch_size=4, lr=3e-3, every=1, log=lambda m: None)
    skipped = [x for c in curve for x in c.get("skipped", [])]
    assert len(skipped) == 2 and all(c.get("ce") is not None for c in curve if not c.get("skipped"))
    assert any(examples[0].id in b["examples"] and not b["teacher_finite"] and not b["student_finite"]
               for x in skipped for b in x["bad"])
    assert all(torch.isfinite(p).all() for p in pm.parameters() if p.requires_grad)
    assert any(p.abs().max() > 0 for n, p in pm.named_parameters() if "lora_B" in n)  # the clean steps trained


# -- the CLI: `pudding-mlx train distill-answers | distill-search | heal` ----------------------------------------
# The work runs in this process (CliRunner: no second start of torch); a bad input in a fresh one, as a user
# meets it (one line, exit 2).


def _cli(*args):
    from typer.testing import CliRunner

    from pudding_mlx.app.cli import app

    done = CliRunner().invoke(app, ["train", *map(str, args), "--device", "cpu"])
    assert done.exit_code == 0, (done.output, done.exception)
    return " ".join(done.output.split())


def _one_line_error(done, *words):
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(w in " ".join(done.stderr.split()) for w in words), done.stderr


@pytest.fixture(scope="module")
def cli_inputs(tiny_hf_dir, tmp_path_factory):
    """The scaled tiny model as a folder, a prompts file of 3 val and 6 train prompts of each kind (short ones of
    the committed set: the vocabulary-wide KL of a step costs by the target), and its answers written by
    `train distill-answers`."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("heal-cli")
    model_dir = out / "tiny-scaled"
    _model(tiny_hf_dir).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_hf_dir).save_pretrained(model_dir)
    data = json.loads(PROMPTS.read_text())
    short = [p for p in data["prompts"] if len(p["text"]) < 300 and len(p.get("code") or "") < 300]
    data["prompts"] = [p for kind in ("code", "task") for split, n in (("val", 3), ("train", 6))
                       for p in [p for p in short if p["kind"] == kind and D.split_of(p["id"]) == split][:n]]
    (out / "prompts.json").write_text(json.dumps(data))
    answers = out / "answers.jsonl.gz"
    log = _cli("distill-answers", model_dir, "--prompts", out / "prompts.json", "--out", answers,
               "--max-new-tokens", 12, "--batch-size", 32)
    return model_dir, out / "prompts.json", answers, log


def test_cli_distill_answers_writes_the_replies_and_resumes(cli_inputs, tmp_path):
    model_dir, prompts, answers, log = cli_inputs
    header, rows = D.read_answers(answers)
    assert [r["id"] for r in rows] == [p["id"] for p in json.loads(prompts.read_text())["prompts"]]
    assert header["n"] == 18 and header["max_new_tokens"] == 12 and header["model"] == model_dir.name
    assert header["counts"] == {"train": 12, "val": 6} and all(r["split"] == D.split_of(r["id"]) for r in rows)
    assert all(0 < r["tokens"] <= 12 for r in rows) and "18 replies (12 train, 6 val" in log
    # an interrupted run's chunk on disk is taken as it is, not generated again
    again = tmp_path / "again.jsonl.gz"
    parts = tmp_path / "again.jsonl.gz.parts"
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({k: header[k] for k in ("prompts_sha256", "n", "max_new_tokens",
                                                                            "chunk", "model")}))
    marked = [dict(r, text="from the part on disk") if i == 0 else r for i, r in enumerate(rows)]
    write_jsonl_gz(parts / "0000.jsonl.gz", marked)
    _cli("distill-answers", model_dir, "--prompts", prompts, "--out", again, "--max-new-tokens", 12)
    assert D.read_answers(again) == (header, marked) and not parts.exists()
    # an answers file that exists is not overwritten without --force: one line, before the model loads
    _one_line_error(run_cli("train", "distill-answers", model_dir, "--prompts", prompts, "--out", again),
                    "already exists", "--force")


def test_cli_distill_search_writes_candidates_the_runtime_reads(cli_inputs, tmp_path):
    model_dir, prompts, answers, _ = cli_inputs
    out = tmp_path / "cand-distill.json"
    log = _cli("distill-search", model_dir, "--answers", answers, "--prompts", prompts, "--out", out, "--k", "1,2",
               "--per-kind", 2, "--protect", "0,last", "--batch-size", 8)
    for k in (1, 2):
        cands = read_candidates(tmp_path / f"cand-distill-k{k}.json", n_blocks=6)
        assert cands and all(len(c["omitted"]) == k and not {0, 5} & set(c["omitted"]) for c in cands)
        assert f"k = {k}: {len(cands)} sets" in log
    data = json.loads((tmp_path / "cand-distill-k2.json").read_text())
    assert data["calibration"]["split"] == "val" and len(data["calibration"]["ids"]["all"]) == 4
    assert all(D.split_of(i) == "val" for i in data["calibration"]["ids"]["all"])
    state = json.loads((tmp_path / "cand-distill.state.json").read_text())
    assert sorted(state["chains"]) == ["all/response_nll", "code/response_nll", "task/response_nll"]
    # answers that are not an answers file: one line, before the model loads
    _one_line_error(run_cli("train", "distill-search", model_dir, "--answers", prompts, "--prompts", prompts,
                            "--out", tmp_path / "other.json"), "not a gzip JSONL answers file")


def test_cli_heal_writes_an_adapter_that_lowers_the_sets_val_nll(cli_inputs, tmp_path):
    model_dir, prompts, answers, _ = cli_inputs
    out = tmp_path / "adapter"
    log = _cli("heal", model_dir, "--answers", answers, "--prompts", prompts, "--sets", "2,3", "--out", out,
               "--steps", 4, "--batch", 4, "--lr", 5e-3, "--rank", 4)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "heal.json"]
    info = json.loads((out / "heal.json").read_text())
    assert info["sets"] == [[2, 3]] and info["steps"] == 4 and info["rank"] == 4 and info["data"]["n"] == 18
    assert info["layers"] == [2, 3, 4, 5]  # --lora-from auto: none before the set (what a hidden-state router reads)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert {int(re.search(r"layers\.(\d+)\.", k)[1]) for k in f.keys()} == {2, 3, 4, 5}
    row = info["val_nll"]["table"]["omit-2-3"]
    assert row["default"] < row["unhealed"] - 0.05 and info["val_nll"]["examples"] == 6
    printed = re.search(r"omit-2-3: unhealed ([\d.]+) -> healed ([\d.]+)", log)
    assert printed and float(printed[1]) == pytest.approx(row["unhealed"], abs=1e-4)
    assert float(printed[2]) == pytest.approx(row["default"], abs=1e-4)
    # more data: a second answers file, each with its prompts; the adapter's heal.json keeps both headers
    first_log, both = log, tmp_path / "adapter-both"
    log = _cli("heal", model_dir, "--answers", answers, "--prompts", prompts, "--answers", answers, "--prompts",
               prompts, "--sets", "2,3", "--out", both, "--steps", 2, "--batch", 4, "--rank", 4)
    info = json.loads((both / "heal.json").read_text())
    assert [d["n"] for d in info["data"]] == [18, 18] and info["val_nll"]["examples"] == 12
    one, two = (re.search(r"1 sets, (\d+) train examples, (\d+) val replies", x) for x in (first_log, log))
    assert int(two[1]) == 2 * int(one[1]) > 0 and int(two[2]) == 2 * int(one[2]) == 12  # both files' examples
    _one_line_error(run_cli("train", "heal", model_dir, "--answers", answers, "--answers", answers, "--prompts",
                            prompts, "--sets", "2,3", "--out", tmp_path / "x"), "2 --answers and 1 --prompts")
    # an adapter folder that exists is not replaced without --force: one line, before the model loads
    _one_line_error(run_cli("train", "heal", model_dir, "--answers", answers, "--prompts", prompts, "--sets", "2,3",
                            "--out", out), "already exists", "--force")


def test_cli_heal_on_two_processes_trains_the_adapter_one_process_trains(cli_inputs, tmp_path):
    """`torchrun --nproc-per-node 2 ... train heal` (two gloo processes on the CPU here, as torchrun starts them):
    each rank takes its share of every step's batch (5 examples: 3 and 2) and the summed gradients make one
    process's update. Two sets, drawn per step: the adapter of a block a step skips gets no gradient on either rank,
    and must get none after the sum either (a zero would still move it through AdamW's moments)."""
    from safetensors.numpy import load_file

    from helpers import CLI
    from test_search_e2e import free_port

    model_dir, prompts, answers, _ = cli_inputs
    args = ["train", "heal", model_dir, "--answers", answers, "--prompts", prompts, "--sets", "2,3;3,4", "--steps", 4,
            "--batch", 5, "--lr", 5e-3, "--rank", 4, "--device", "cpu"]
    _cli(*args[1:-2], "--out", tmp_path / "one")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([*CLI, *map(str, args), "--out", str(tmp_path / "two")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}: {out[-2000:]} {err[-2000:]}"
    said = [" ".join((out + err).split()) for out, err in outs]
    assert "2 processes" in said[0] and "adapter ->" in said[0] and "adapter ->" not in said[1]  # rank 0 speaks
    one, two = (json.loads((tmp_path / d / "heal.json").read_text()) for d in ("one", "two"))
    assert one["processes"] == 1 and two["processes"] == 2
    for a, b in zip(one["curve"], two["curve"]):
        assert a["ce"] == pytest.approx(b["ce"], abs=1e-4) and a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    for name, row in one["val_nll"]["table"].items():
        for key, v in row.items():
            assert two["val_nll"]["table"][name][key] == pytest.approx(v, abs=1e-5), (name, key)
    wa, wb = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("one", "two"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.abs(wa[k] - wb[k]).max() < 1e-5, k
        if "lora_B" in k:  # B starts at zero: block 3, skipped by both sets, never trains; 2 and 4 do (both drawn)
            block = int(re.search(r"layers\.(\d+)\.", k)[1])
            assert (np.abs(wb[k]).max() > 0) == (block != 3), k


def test_answer_shards_write_what_one_run_writes(tiny, distilled, tmp_path, monkeypatch):
    """Two processes sharing a GPU split the chunks (i % n); the one that finds every chunk writes the file."""
    model, tok = tiny
    prompts, whole = distilled
    monkeypatch.setattr(D, "CHUNK", 16)
    out = tmp_path / "answers.jsonl.gz"
    kw = dict(max_new_tokens=12, batch_size=64, log=lambda m: None)
    assert D.answer_prompts(model, tok, prompts, out, "tiny", shard=(1, 2), **kw) is None and not out.exists()
    assert sorted(p.name for p in (tmp_path / "answers.jsonl.gz.parts").glob("*.jsonl.gz")) == ["0001.jsonl.gz",
                                                                                               "0003.jsonl.gz"]
    assert D.answer_prompts(model, tok, prompts, out, "tiny", shard=(0, 2), **kw) == out
    assert D.read_answers(out)[1] == D.read_answers(whole)[1]
    with pytest.raises(PuddingError, match="shard 2/2"):
        D.answer_prompts(model, tok, prompts, tmp_path / "x.jsonl.gz", "tiny", shard=(2, 2), **kw)


def test_nll_matrix_is_each_sets_nll_per_example(tiny, distilled):
    model, tok = tiny
    prompts, answers = distilled
    examples = [e for e in D.build_examples(tok, prompts, answers) if e.kind != "code-text"][:12]
    m = D.nll_matrix(model, tok, examples, [(), (2,), (1, 4)])
    assert m.shape == (12, 3, 2)
    np.testing.assert_allclose(m[:, 1], D.target_nll(model, tok, examples, (2,)), rtol=1e-6)
    assert (m[:, :, 1] == m[:, :1, 1]).all()  # the same targets under every set
    assert D.mean_nll(m[:, 0]) < D.mean_nll(m[:, 2])  # the dense model's own greedy replies: likeliest dense


def test_agreement_is_where_the_skipping_models_greedy_decoding_leaves_the_reply(tiny, distilled):
    """`target_nll(agreement=True)`'s columns against a brute-force pass per example: the targets that are the
    model's argmax, the first that is not; and under a skipped block, greedy decoding of the prompt reproduces the
    reply exactly up to that token and departs from it there."""
    model, tok = tiny
    prompts, answers = distilled
    examples = [e for e in D.build_examples(tok, prompts, answers) if e.kind != "code-text"][:12]
    texts = {p["id"]: p["text"] for p in D.read_prompts(prompts)["prompts"]}
    assert all(prompt_ids(tok, texts[e.id], max_tokens=1 << 30) == e.ids[:e.start] for e in examples)
    dense = D.target_nll(model, tok, examples, (), batch_size=5, agreement=True)
    assert (dense[:, 3] == dense[:, 1]).all() and (dense[:, 2] == dense[:, 1]).all()  # its own greedy replies
    skipped = D.target_nll(model, tok, examples, (1,), batch_size=5, agreement=True)
    np.testing.assert_allclose(skipped[:, :2], D.target_nll(model, tok, examples, (1,), batch_size=5), rtol=1e-6)
    assert (skipped[:, 3] < skipped[:, 1]).any()  # skipping a block of this model changes some greedy replies
    sliced = D.target_nll(model, tok, examples, (1,), batch_size=5, rows_at_once=7, agreement=True)
    np.testing.assert_allclose(sliced, skipped, rtol=1e-5)  # the float32 slices of a long batch join up
    for e, (_, n, hits, first) in zip(examples, skipped):
        with torch.no_grad(), skip_blocks(model, (1,)):
            top = model(torch.tensor([e.ids]), use_cache=False).logits[0, e.start - 1:-1].argmax(-1)
        same = (top == torch.tensor(e.ids[e.start:])).numpy()
        assert hits == same.sum() and first == (n if same.all() else np.argmin(same))
        if first < n:  # greedy decoding with the KV cache: the reply up to `first`, then another token
            out = generate(model, tok, [texts[e.id]], (1,), max_new_tokens=int(first) + 1)[0]["token_ids"]
            assert out[:int(first)] == e.ids[e.start:e.start + int(first)] and out[int(first)] != e.ids[e.start + int(first)]
    m = D.nll_matrix(model, tok, examples, [(), (1,)], agreement=True)
    assert m.shape == (12, 2, 4) and np.allclose(m[:, 1], skipped)
