__version__ = "0.1.0"

# Tokens the pruned view drafts per dense verification in --lossless mode (generate, chat, bench).
# 1 was the fastest of 1-4 in `benchmarks/lossless.py` (results/lossless/lossless_smollm2_cpu.md);
# see README "Lossless mode". Here so that the CLI reads it without importing mlx.
DRAFT_TOKENS = 1
