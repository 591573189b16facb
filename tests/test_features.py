"""The hidden-state router's inputs (train.features): block outputs read with hooks on a truncated
forward equal the full model's hidden states; batching and padding change nothing; the PCA file
round-trips."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pudding_mlx.train.features import hidden_features, project_features, prompt_ids  # noqa: E402

TEXTS = ["Why is the sky blue?", "A man is sitting on a roof. He",
         "Which of these is a mammal: a shark, a dolphin, a trout?",
         "The trophy doesn't fit into the brown suitcase because the _ is too large."]


def _model(tiny_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    return lm, tok


def test_block_outputs_equal_the_full_forwards_hidden_states(tiny_hf_dir):
    lm, tok = _model(tiny_hf_dir)
    feats = hidden_features(lm, tok, TEXTS, after=[1, 3], batch_size=3)
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([prompt_ids(tok, text)])
        with torch.no_grad():
            hs = lm(ids, output_hidden_states=True).hidden_states  # [embeddings, block 0, block 1, ...]
        for r in (1, 3):
            h = hs[r + 1][0].float().numpy()
            np.testing.assert_allclose(feats[f"mean_{r}"][i], h.mean(0), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(feats[f"last_{r}"][i], h[-1], atol=1e-4, rtol=1e-4)


def test_batching_and_padding_change_nothing(tiny_hf_dir):
    lm, tok = _model(tiny_hf_dir)
    one = hidden_features(lm, tok, TEXTS, after=[2], batch_size=1)
    four = hidden_features(lm, tok, TEXTS, after=[2], batch_size=4)
    for k in one:
        np.testing.assert_allclose(one[k], four[k], atol=1e-4, rtol=1e-4)


def test_prompt_is_the_chat_message_and_keeps_the_last_tokens(tiny_hf_dir):
    lm, tok = _model(tiny_hf_dir)
    full = prompt_ids(tok, TEXTS[2])
    rendered = tok.apply_chat_template([{"role": "user", "content": TEXTS[2]}],
                                       add_generation_prompt=True, tokenize=False)
    assert full == tok.encode(rendered, add_special_tokens=False)
    assert prompt_ids(tok, TEXTS[2], max_tokens=5) == full[-5:]


def test_out_of_range_block_is_one_line(tiny_hf_dir):
    from pudding_mlx.errors import PuddingError

    lm, tok = _model(tiny_hf_dir)
    with pytest.raises(PuddingError, match="0..4"):
        hidden_features(lm, tok, TEXTS, after=[5])


def test_pca_projection_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    dirs = [tmp_path / "train", tmp_path / "test"]
    raw = {}
    for d, n in zip(dirs, (50, 20)):
        d.mkdir()
        x = rng.normal(size=(n, 16)) @ rng.normal(size=(16, 16))
        raw[d] = x
        np.savez(d / "features.npz", id=np.array([str(i) for i in range(n)]), task=np.array(["t"] * n),
                 after=np.array([3]), max_tokens=np.int64(64), mean_3=x.astype(np.float16),
                 last_3=x.astype(np.float16))
    project_features(dirs[0], [dirs[1]], dim=4)
    fit = np.load(dirs[0] / "features_pca.npz")
    other = np.load(dirs[1] / "features_pca.npz")
    assert "basis_mean_3" in fit.files and "basis_mean_3" not in other.files
    center, basis = fit["center_mean_3"], fit["basis_mean_3"]
    assert basis.shape == (4, 16)
    np.testing.assert_allclose(basis @ basis.T, np.eye(4), atol=1e-5)  # orthonormal components
    x = raw[dirs[1]].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(other["mean_3"].astype(np.float32), (x - center) @ basis.T, rtol=2e-2, atol=2e-2)
    assert 0 < float(fit["explained_mean_3"]) <= 1
