"""Router parity, MLX vs PyTorch, on real weights (all-MiniLM-L6-v2 + a seeded random 10-output head).

    python benchmarks/router_parity.py [--encoder DIR] [--outputs 10] [--seed 0]

Builds the three PyTorch source layouts (a BertForSequenceClassification folder saved with
save_pretrained, the same with a torch.save'd pytorch_model.bin, and a light router: frozen encoder
+ head.safetensors), converts each with pudding_mlx.convert.router (float32) and compares the MLX
scores with PyTorch's (transformers BertModel pooler_output @ head.T + bias) on two batches:

    TEXTS  one word, a paragraph, a prompt over 512 tokens (truncated), unicode and accents: mixed
           lengths in one batch, so padding is exercised; padded to 512 tokens
    SHORT  the short ones of TEXTS plus an empty prompt and code with a question

Prints the max abs diff and the argmax agreement per layout and batch. tests/test_router.py
imports this file (same texts, same head, same reference).

The MLX CPU wheel for Linux multiplies matrices with a reference BLAS, so the 4 x 512-token batch
takes tens of seconds there; on Apple silicon it is instant.

Needs torch (the train/dev extra). The encoder defaults to the MiniLM folder from pudding_mlx.assets.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

LONG = " ".join(
    f"Sentence {i}: the router reads the prompt and scores every candidate set of omitted blocks."
    for i in range(60)
)  # about 1,000 tokens, well past the 512-token limit

TEXTS = [
    "Hello",
    "Depth pruning removes whole transformer blocks. A small router reads the prompt and picks, "
    "for each prompt, which set of blocks to skip, so that easy questions run a shallower model "
    "while hard ones keep their depth. The candidates are chosen offline on a few tasks.",
    LONG,
    "Café naïve façade — 東京 😀",
]

SHORT = [t for t in TEXTS if t is not LONG] + [
    "",
    "Question: which is heavier, a kilogram of feathers or one of steel?\n\tdef f(x): return x ** 2  # ÀÉÎ ß ﬁ",
]


class Reference:
    """The PyTorch side: a BertForSequenceClassification whose classifier is a seeded random head."""

    def __init__(self, encoder_dir: Path, num_outputs: int = 10, seed: int = 0):
        import torch
        from transformers import AutoTokenizer, BertForSequenceClassification
        from transformers.utils import logging

        self.encoder_dir = Path(encoder_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
        level = logging.get_verbosity()
        logging.set_verbosity_error()  # the "classifier newly initialized" report is expected
        try:
            self.model = BertForSequenceClassification.from_pretrained(str(encoder_dir), num_labels=num_outputs).eval()
        finally:
            logging.set_verbosity(level)
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(self.model.config.hidden_size, num_outputs).eval()
        with torch.no_grad():
            self.model.classifier.weight.copy_(self.head.weight)
            self.model.classifier.bias.copy_(self.head.bias)

    def scores(self, texts, max_length: int = 512) -> np.ndarray:
        """BertModel pooler_output @ head, float32, with the router's tokenizer settings."""
        import torch

        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            return self.head(self.model.bert(**enc).pooler_output).numpy()

    def save_sequence_classification(self, out: Path, bin_file: bool = False) -> Path:
        """save_pretrained (model.safetensors), or config + torch.save(state_dict) as pytorch_model.bin."""
        import torch

        if bin_file:
            out.mkdir(parents=True)
            self.model.config.save_pretrained(str(out))
            torch.save(self.model.state_dict(), out / "pytorch_model.bin")
        else:
            self.model.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        return out

    def save_light(self, out: Path) -> Path:
        """head.json + head.safetensors, pointing (by a relative path) at the untouched encoder folder."""
        from safetensors.numpy import save_file

        out.mkdir(parents=True)
        save_file({"weight": self.head.weight.detach().numpy().copy(), "bias": self.head.bias.detach().numpy().copy()},
                  str(out / "head.safetensors"))
        rel = os.path.relpath(self.encoder_dir.resolve(), out.resolve())
        (out / "head.json").write_text(json.dumps({"encoder": rel, "num_outputs": self.head.out_features}))
        return out


def compare(mlx_scores: np.ndarray, ref: np.ndarray) -> dict:
    return {
        "max_abs_diff": float(np.abs(mlx_scores - ref).max()),
        "argmax_agree": int((mlx_scores.argmax(-1) == ref.argmax(-1)).sum()),
        "n": len(ref),
    }


def run(encoder_dir: Path, num_outputs: int = 10, seed: int = 0) -> dict:
    from pudding_mlx.convert.router import convert_router
    from pudding_mlx.router import load_router

    ref = Reference(encoder_dir, num_outputs, seed)
    expected = {"TEXTS": ref.scores(TEXTS), "SHORT": ref.scores(SHORT)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {
            "seqcls": ref.save_sequence_classification(tmp / "seqcls"),
            "bin": ref.save_sequence_classification(tmp / "bin", bin_file=True),
            "light": ref.save_light(tmp / "light"),
        }
        for name, src in sources.items():
            router = load_router(convert_router(src, tmp / f"mlx-{name}", expect_outputs=num_outputs))
            for batch, texts in (("TEXTS", TEXTS), ("SHORT", SHORT)):
                results[(name, batch)] = compare(np.array(router.scores(texts)), expected[batch])
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", type=Path, default=None, help="HF BERT folder (default: all-MiniLM-L6-v2 from the asset cache)")
    ap.add_argument("--outputs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    encoder = args.encoder
    if encoder is None:
        from pudding_mlx import assets

        encoder = assets.minilm_dir()
    results = run(encoder, args.outputs, args.seed)
    print(f"encoder: {encoder}")
    print(f"head: {args.outputs} outputs, seed {args.seed}; float32; "
          f"TEXTS {len(TEXTS)} prompts padded to 512 tokens, SHORT {len(SHORT)} prompts")
    for (name, batch), r in results.items():
        print(f"{name:7s} {batch:6s} max abs diff {r['max_abs_diff']:.3e}   argmax agreement {r['argmax_agree']}/{r['n']}")
    worst = max(r["max_abs_diff"] for r in results.values())
    agree = all(r["argmax_agree"] == r["n"] for r in results.values())
    print(f"overall: max abs diff {worst:.3e}, argmax {'identical' if agree else 'DIFFERS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
