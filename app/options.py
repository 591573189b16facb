"""Options that several commands share, so that each reads and means the same everywhere."""

import typer

from pudding_mlx import DRAFT_TOKENS

LOSSLESS = typer.Option(
    False, "--lossless", help="The routed (pruned) model only drafts tokens and the dense model verifies "
    "them: the output is the dense model's (greedy: identical to --dense in float32; in bf16/fp16 the "
    "multi-token verification can round near-tied tokens differently from one-token decoding), faster "
    "when drafts are accepted.")
DRAFT = typer.Option(DRAFT_TOKENS, "--draft-tokens", min=1, help="Tokens drafted per dense verification "
                     "(--lossless).")
ROUTED = typer.Option(False, "--routed", help="Route with the bundle's router even where the bundle runs dense "
                      "by default (the qwen2.5-coder-1.5b preset: routing at k = 3 costs most of its HumanEval "
                      "pass@1; see results/qwen2.5-coder-1.5b/generation.md).")
MODEL_OR_PRESET = typer.Argument(None, help="A pudding-mlx bundle, an mlx-lm model directory, or a hub id. Default: "
                                "the --preset bundle, built once into the cache.")
UNHEALED = typer.Option(False, "--unhealed", help="Leave the bundle's healing adapters off: a skipped set runs "
                        "as the original weights give it (for comparisons; dense never uses an adapter).")
LORA_TERMS = typer.Option(False, "--lora-terms", help="Run the bundle's healing adapters as LoRA terms beside "
                          "each weight instead of merged copies of the adapted layers (the default): no extra memory "
                          "and exact to the adapter, but slower (on a GPU much slower). See docs/bundle.md.")
MAX_LOSS = typer.Option(None, "--max-loss", metavar="FLOAT", help="Adaptive depth: the bundle's loss predictor "
                        "picks, per prompt, the set with the most blocks skipped whose predicted loss against dense "
                        "is at most FLOAT (dense when none fits; inf: the most blocks always). Default: off (the "
                        "bundle's router or default runs). Needs a bundle with a predictor (`convert bundle "
                        "--predictor`); the unit is the predictor's (`info`; docs/adaptive.md).")
