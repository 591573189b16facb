__version__ = "0.1.0"

# Tokens the pruned view drafts per dense verification in --lossless mode (generate, chat, bench);
# README "Lossless mode" gives the measurement behind it. Here so that the CLI reads it without
# importing mlx.
DRAFT_TOKENS = 3
