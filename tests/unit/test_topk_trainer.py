"""The TopK SAE trainer (sae_steer.fit_sae) on synthetic data with a known sparse structure, and its
SAELens output read back by sae_steer.formats.load_sae."""
from __future__ import annotations

import json

import torch

from sae_steer.corpus import chunks as split_chunks
from sae_steer.fit_sae import FitConfig, TopKSAE, reconstruction_mse, to_sparse_autoencoder, train_sae, \
    write_saelens
from sae_steer.formats import load_sae

D, TRUE_FEATURES, ACTIVE = 64, 128, 4


def sparse_data(n: int, seed: int = 0) -> torch.Tensor:
    """x = offset + sum of ACTIVE random unit directions (of TRUE_FEATURES) with positive weights, times 20."""
    dirs = torch.randn(TRUE_FEATURES, D, generator=torch.Generator().manual_seed(1234))  # one dictionary
    dirs /= dirs.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)  # the samples
    idx = torch.rand(n, TRUE_FEATURES, generator=g).argsort(dim=1)[:, :ACTIVE]
    w = torch.rand(n, ACTIVE, generator=g) + 0.5
    x = torch.zeros(n, D)
    for j in range(ACTIVE):
        x += w[:, j:j + 1] * dirs[idx[:, j]]
    return 20 * x + 5.0


def test_training_reduces_reconstruction_error_and_keeps_features_alive():
    acts = sparse_data(16384)
    cfg = FitConfig(features=256, k=8, epochs=6, batch=256, lr=2e-3, aux_k=32, dead_after=4096)
    sae, scale, stats = train_sae(acts, cfg, progress=False)
    init = TopKSAE(D, 256, 8, acts.mean(0) * scale, cfg.seed)
    held = sparse_data(2048, seed=1)
    mse_init, mse = reconstruction_mse(init, scale, held), reconstruction_mse(sae, scale, held)
    variance = float((held - held.mean(0)).pow(2).sum(-1).mean())
    assert mse < 0.5 * mse_init, (mse, mse_init)
    assert 1 - mse / variance > 0.8, 1 - mse / variance  # 4 true features per point, k = 8
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)  # decoder-norm constraint
    assert stats["dead_last_epoch"] < 0.5 * 256, stats["dead_last_epoch"]


def test_saelens_output_loads_back_with_the_same_math(tmp_path):
    acts = sparse_data(4096)
    sae, scale, _ = train_sae(acts, FitConfig(features=128, k=6, epochs=1, batch=256), progress=False)
    folder = write_saelens(to_sparse_autoencoder(sae, scale, layer=3), tmp_path / "sae", "tiny")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    loaded = load_sae(folder)
    assert (loaded.architecture, loaded.k, loaded.layer, loaded.d_sae) == ("topk", 6, 3, 128)
    x = sparse_data(64, seed=2)
    # reference, written out: the trainer saw s*x and its output is divided by s
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (scale * x - b_dec) @ W_enc + b_enc
    top = pre.topk(6, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    x_hat = (f @ W_dec + b_dec) / scale
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), f, rtol=1e-4, atol=1e-4)
        assert torch.allclose(loaded.decode(loaded.encode(x)), x_hat, rtol=1e-4, atol=1e-3)


def test_chunks_are_bounded_and_keep_the_text():
    text = "\n\n".join(f"paragraph {i} " + "word " * (i * 40) for i in range(1, 12))
    chunks = split_chunks(text, 500)
    assert all(40 < len(c) <= 500 for c in chunks)
    squeeze = lambda s: s.replace("\n\n", "").replace(" ", "")  # noqa: E731
    joined = squeeze("".join(chunks))
    assert squeeze(text).startswith(joined[:2000]) and len(joined) > 0.98 * len(squeeze(text))
