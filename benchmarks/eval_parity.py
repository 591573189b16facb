"""Zero-shot accuracy on MLX (`pudding_mlx.evaluate`) vs the PyTorch path (`train.scoring`), same weights.

    python benchmarks/eval_parity.py [--gguf FILE] [--limit 10] [--omit 17,18,19]
        [--tasks arc_challenge,arc_easy,boolq,hellaswag,piqa,winogrande] [--data-dir DIR]
        [--md results/bench/eval_parity_cpu.md] [--json results/bench/eval_parity_cpu.json]

Both sides get the same float32 weights: the GGUF (default: the SmolLM2-135M-Instruct Q4_1 asset) is
dequantized by `convert_llm(gguf, dir, dequantize=True, dtype="float32")` for MLX and by transformers'
own GGUF loader (`train.hf.load_hf(gguf, device="cpu")`, float32) for PyTorch. Both sides use the same
templates (`pudding_mlx.tasks`), tokenization and metrics (`pudding_mlx.requests`); only the forward pass
differs. For the first --limit examples (file order) of each task's standard evaluation split, dense
and with the --omit set skipped (default: [17, 18, 19], the best static k=3 set of the SmolLM2 run),
it reports acc / acc_norm on each side, |diff|, the max per-request |Δ summed log-prob|, the number
of examples whose acc / acc_norm verdict differs, and the wall time of each side. Prints a markdown
table; --md / --json write it and the raw figures.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

SIX = "arc_challenge,arc_easy,boolq,hellaswag,piqa,winogrande"
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "benchmarks"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: the SmolLM2-135M-Instruct asset")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--tasks", default=SIX)
    ap.add_argument("--omit", default="17,18,19")
    ap.add_argument("--data-dir", type=Path, default=None, help="default: $PUDDING_MLX_DATA, else ../shared/data/benchmarks")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="the PyTorch side's device: cpu or cuda")
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import os

    import mlx.core as mx
    import numpy as np
    import torch

    from pudding_mlx import assets
    from pudding_mlx.convert.llm import convert_llm
    from pudding_mlx.evaluate import score_requests as mlx_score
    from pudding_mlx.load import backend, load
    from pudding_mlx.omission import parse_omit
    from pudding_mlx.train.hf import load_hf
    from pudding_mlx.requests import flatten, metrics
    from pudding_mlx.train.scoring import score_requests as torch_score
    from pudding_mlx.tasks import eval_metric, load_task

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    data_dir = args.data_dir or (None if os.environ.get("PUDDING_MLX_DATA") else DEFAULT_DATA)
    gguf = args.gguf or assets.smollm2_gguf()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    omit = sorted(parse_omit(args.omit))
    examples = {t: load_task(t, None, data_dir, limit=args.limit) for t in tasks}

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = convert_llm(gguf, Path(tmp) / "mlx", dequantize=True, dtype="float32")
        mlx_side = load(str(out), dtype="float32")
        tm, tok, name = load_hf(str(gguf), device=args.device, dtype="float32")
        print(f"loaded {name} on both sides in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        rows, raw, timing = [], {}, {"pytorch_s": 0.0, "mlx_s": 0.0, "requests": 0}
        overall = 0.0
        for label, omitted in (("dense", []), (f"omit {omit}", omit)):
            for task in tasks:
                exs = examples[task]
                reqs = flatten(exs)
                t0 = time.perf_counter()
                ref = torch_score(tm, tok, reqs, omitted, batch_size=args.batch_size, device=args.device)
                t1 = time.perf_counter()
                got = mlx_score(mlx_side.model, mlx_side.tokenizer, reqs, omitted, batch_size=args.batch_size)
                t2 = time.perf_counter()
                timing["pytorch_s"] += t1 - t0
                timing["mlx_s"] += t2 - t1
                timing["requests"] += len(reqs)
                lp_ref = np.array([s.logprob for s in ref])
                lp_got = np.array([s.logprob for s in got])
                dlp = float(np.max(np.abs(lp_ref - lp_got)))
                overall = max(overall, dlp)
                tok_mismatch = sum(a.n_tokens != b.n_tokens for a, b in zip(ref, got))
                m_ref, m_got = metrics(exs, ref), metrics(exs, got)
                entry = {"n": len(exs), "requests": len(reqs), "max_abs_dlogprob": dlp,
                         "token_count_mismatches": tok_mismatch,
                         "pytorch_s": round(t1 - t0, 2), "mlx_s": round(t2 - t1, 2),
                         "standard_metric": eval_metric(task)}
                for metric, flag in (("acc", "correct"), ("acc_norm", "correct_norm")):
                    flips = int(np.sum(m_ref[flag] != m_got[flag]))
                    entry[metric] = {"pytorch": m_ref[metric], "mlx": m_got[metric],
                                     "abs_diff": abs(m_ref[metric] - m_got[metric]), "flipped_examples": flips}
                    rows.append((task, label, metric, m_ref[metric], m_got[metric],
                                 abs(m_ref[metric] - m_got[metric]), len(exs), dlp, flips))
                raw.setdefault(label, {})[task] = entry
                print(f"{label:>18} {task:<14} acc {m_ref['acc']:.1f}/{m_got['acc']:.1f} "
                      f"acc_norm {m_ref['acc_norm']:.1f}/{m_got['acc_norm']:.1f} max|dlp| {dlp:.2e} "
                      f"torch {t1 - t0:.1f}s mlx {t2 - t1:.1f}s", file=sys.stderr)

    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    cmd = "python benchmarks/eval_parity.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# MLX vs PyTorch zero-shot accuracy, {name} (dequantized, float32), MLX {backend()}, PyTorch {args.device}",
        "",
        f"Command: `{cmd}`",
        "",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores{gpu}; MLX {mx.__version__} "
        f"({backend()} backend), torch {torch.__version__} ({args.device}). First {args.limit} examples (file order) of each task's "
        "standard evaluation split; same weights, templates, tokenization and metrics on both sides.",
        "",
        "| task | set | metric | PyTorch | MLX | \\|diff\\| | n | max \\|Δ logprob\\| | flipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, label, metric, a, b, d, n, dlp, flips in rows:
        lines.append(f"| {task} | {label} | {metric} | {a:.2f} | {b:.2f} | {d:.2f} | {n} | {dlp:.2e} | {flips} |")
    lines += [
        "",
        f"Max per-request |Δ summed log-prob| over all {timing['requests']} requests: **{overall:.2e}**.",
        f"Scoring wall time: PyTorch {timing['pytorch_s']:.1f} s, MLX {timing['mlx_s']:.1f} s "
        "(\"flipped\": examples whose verdict differs between the two sides).",
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    payload = {"model": name, "gguf": str(gguf), "limit": args.limit, "tasks": tasks, "omit": omit,
               "command": cmd, "max_abs_dlogprob": overall,
               "timing": {k: round(v, 2) if isinstance(v, float) else v for k, v in timing.items()},
               "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "mlx": mx.__version__,
                           "torch": torch.__version__},
               "results": raw}
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
