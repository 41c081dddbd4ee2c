"""The math reference itself: SAE encode/decode per architecture and the edit identities."""
from __future__ import annotations

import pytest
import torch

from sae_steer.edits import feature_edit_delta, position_mask, steer_residual
from sae_steer.sae import ARCHITECTURES, SparseAutoencoder
from sae_steer.spec import Steering
from sae_steer.tiny_model import random_sae

D, F = 24, 64


def make(arch: str, seed: int = 0) -> SparseAutoencoder:
    return random_sae(D, F, 1, arch, k=8 if arch == "topk" else None, seed=seed)


def by_hand(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    """Each architecture written out independently of SparseAutoencoder._activate."""
    sae_in = x - sae.b_dec
    pre = sae_in @ sae.W_enc + sae.b_enc
    if sae.architecture == "relu":
        return pre.clamp(min=0)
    if sae.architecture == "jumprelu":
        return torch.where(pre > sae.threshold, pre, torch.zeros_like(pre)).clamp(min=0)
    if sae.architecture == "gated":
        mag = sae_in @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
        return torch.where(pre > 0, mag.clamp(min=0), torch.zeros_like(mag))
    out = torch.zeros_like(pre)
    for t in range(pre.shape[0]):
        idx = pre[t].argsort(descending=True)[: sae.k]
        out[t, idx] = pre[t, idx].clamp(min=0)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encode_matches_the_definition_and_sparse_encode_agrees(arch):
    sae, x = make(arch), torch.randn(7, D)
    f = sae.encode(x)
    torch.testing.assert_close(f, by_hand(sae, x), rtol=1e-5, atol=1e-5)
    assert (f > 0).any() and (f == 0).any(), "random SAE should be neither dead nor dense"
    idx = torch.tensor([3, 0, 63, 3])
    torch.testing.assert_close(sae.encode_features(x, idx), f[:, idx], rtol=1e-5, atol=1e-5)
    if arch == "topk":
        assert ((f > 0).sum(-1) <= sae.k).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("mode,kw", [("add", {"strength": 5.0}), ("clamp", {"value": 3.0}), ("ablate", {}),
                                     ("scale", {"factor": 2.5})])
def test_edit_keeps_the_reconstruction_error(arch, mode, kw):
    """x' - x == decode(f') - decode(f): the SAE's error term x - x_hat is untouched."""
    sae, x = make(arch, seed=1), torch.randn(5, D)
    feature = int(sae.encode(x).sum(0).argmax())  # an active feature so scale/ablate do something
    steering = Steering.model_validate({"interventions": [{"type": "sae", "sae": "s", "feature": feature,
                                                           "mode": mode, **kw}]})
    delta = feature_edit_delta(sae, x, steering.interventions[0])
    f = sae.encode(x)
    f_new = f.clone()
    f_new[:, feature] = {"add": f[:, feature] + kw.get("strength", 0), "clamp": torch.full_like(f[:, feature], 3.0),
                         "ablate": torch.zeros_like(f[:, feature]),
                         "scale": f[:, feature] * kw.get("factor", 1)}[mode]
    torch.testing.assert_close(delta, sae.decode(f_new) - sae.decode(f), rtol=1e-4, atol=1e-5)
    assert delta.abs().max() > 0


def test_when_gates_per_position():
    sae, x = make("relu", seed=2), torch.randn(32, D)
    f = sae.encode(x)
    gate_feature = int(((f > 0).float().mean(0) - 0.5).abs().argmin())  # active at some positions only
    above = 0.0
    steering = Steering.model_validate({"interventions": [{"type": "sae", "sae": "s", "feature": 1, "mode": "add",
                                                           "strength": 4.0,
                                                           "when": {"feature": gate_feature, "above": above}}]})
    delta = feature_edit_delta(sae, x, steering.interventions[0])
    active = f[:, gate_feature] > above
    assert active.any() and (~active).any()
    assert (delta[~active] == 0).all()
    torch.testing.assert_close(delta[active], 4.0 * sae.W_dec[1].expand(int(active.sum()), D))


@pytest.mark.parametrize("mode,expect", [("all", [1, 1, 1, 1]), ("prompt", [1, 1, 0, 0]), ("generated", [0, 0, 1, 1])])
def test_positions(mode, expect):
    assert position_mask(torch.arange(4), 2, mode).tolist() == [bool(e) for e in expect]


def test_interventions_at_a_layer_read_the_same_unedited_stream():
    """Deltas add up (simultaneous edits), vectors add coef * v, other layers are untouched."""
    saes = {"a": make("relu", 3), "b": make("jumprelu", 4)}
    v = torch.randn(D)
    steering = Steering.model_validate({"interventions": [
        {"type": "sae", "sae": "a", "feature": 2, "mode": "clamp", "value": 7.0},
        {"type": "sae", "sae": "b", "feature": 9, "mode": "add", "strength": 2.0},
        {"type": "vector", "vector": "v", "coef": -1.5}], "positions": "generated"})
    x, pos = torch.randn(6, D), torch.arange(6)
    out = steer_residual(x, pos, 3, 1, steering, saes, {"v": {1: v}})
    expect = x + feature_edit_delta(saes["a"], x, steering.interventions[0]) \
        + feature_edit_delta(saes["b"], x, steering.interventions[1]) - 1.5 * v
    torch.testing.assert_close(out[3:], expect[3:])
    assert torch.equal(out[:3], x[:3])
    assert torch.equal(steer_residual(x, pos, 3, 0, steering, saes, {"v": {1: v}}), x)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_form_evaluates_to_encode(arch):
    """SparseAutoencoder.packed() (b_dec folded into per-feature biases), evaluated by the kernels' activation,
    == encode: the fast paths' one formula agrees with every architecture's definition."""
    from sae_steer.kernels.sparse_steer import activation
    sae, x = make(arch, seed=3), torch.randn(9, D)
    enc, *params = sae.packed()
    f = activation(x @ enc.T, torch.arange(F), *params)
    if arch == "topk":  # the packed form is TopK's ReLU; membership is the top k of it
        top = f.topk(sae.k, dim=-1)
        f = torch.zeros_like(f).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(f, sae.encode(x), rtol=1e-5, atol=1e-5)
    assert (f > 0).any()
