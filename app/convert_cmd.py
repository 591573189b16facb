"""`pudding-mlx convert ...`: LLM, router and bundle to MLX (to be filled in)."""

import typer

convert_app = typer.Typer(help="Convert models to what the MLX runtime loads: an LLM (Hugging Face "
                          "folder, GGUF file, hub id), a trained router, and a bundle of both.",
                          no_args_is_help=True)
