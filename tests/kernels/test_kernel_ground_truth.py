"""The kernels' torch references == the per-request ground truth `sae_steer.edits.steer_residual`.

A batch of requests (every edit mode, `when` gates, registered and inline vectors, the three position
modes, an unsteered request) is written into slot tables as SteeringTable writes them, with the
caller's position rule applied by setting excluded tokens to slot 0. The kernels are tested against
these references in test_sparse_steer.py / test_full_steer.py; this closes the chain to the ground truth.
"""
from __future__ import annotations

import torch

from kernel_cases import TOPK_K, dictionary
from sae_steer.edits import position_mask, steer_residual
from sae_steer.kernels.full_steer import full_steer_reference
from sae_steer.kernels.sparse_steer import sparse_steer_reference
from sae_steer.spec import SaeIntervention, Steering

D_MODEL, LAYER, E = 24, 1, 8
ATOL = 1e-4  # float32 both sides; the references encode with the folded b_dec (x.enc + bias), a different order

REQUESTS = [
    {"interventions": [{"type": "sae", "sae": "relu", "feature": 3, "mode": "add", "strength": 4.0},
                       {"type": "sae", "sae": "gated", "feature": 5, "mode": "clamp", "value": 2.5},
                       {"type": "sae", "sae": "jumprelu", "feature": 1, "mode": "ablate"},
                       {"type": "vector", "vector": "v", "coef": 1.5}]},
    {"interventions": [{"type": "sae", "sae": "jumprelu", "feature": 7, "mode": "scale", "factor": 3.0,
                        "when": {"feature": 2, "above": 0.1}},
                       {"type": "vector", "layer": LAYER, "values": [0.1 * i for i in range(D_MODEL)]}],
     "positions": "prompt"},
    {"interventions": [{"type": "sae", "sae": "topk", "feature": 11, "mode": "add", "strength": -2.0},
                       {"type": "sae", "sae": "topk", "feature": 4, "mode": "clamp", "value": 6.0,
                        "when": {"feature": 9, "above": 0.0}},
                       {"type": "sae", "sae": "relu", "feature": 0, "mode": "scale", "factor": 0.5}],
     "positions": "generated"},
]


def slot_tables(dic, steerings, vectors):
    """Slot s + 1 holds steerings[s]; slot 0 stays empty (the layout of SteeringTable._write_slot)."""
    S = len(steerings) + 1
    ef, gf = torch.full((S, E), dic.null), torch.full((S, E), dic.null)
    em, ea, ga = torch.zeros(S, E), torch.zeros(S, E), torch.full((S, E), float("-inf"))
    vector = torch.zeros(S, D_MODEL)
    for s, steering in enumerate(steerings, 1):
        e = 0
        for iv in steering.interventions:
            if isinstance(iv, SaeIntervention):
                a, b = iv.edit_coefficients()
                ef[s, e], em[s, e], ea[s, e] = dic.offset[iv.sae] + iv.feature, a - 1.0, b
                if iv.when is not None:
                    gf[s, e], ga[s, e] = dic.offset[iv.sae] + iv.when.feature, iv.when.above
                e += 1
            elif iv.values is not None:
                vector[s] += iv.coef * torch.tensor(iv.values)
            else:
                vector[s] += iv.coef * vectors[iv.vector][LAYER]
    return ef, em, ea, gf, ga, vector


def test_references_equal_per_request_steer_residual():
    dic, saes = dictionary(D_MODEL, seed=11)
    g = torch.Generator().manual_seed(0)
    vectors = {"v": {LAYER: torch.randn(D_MODEL, generator=g)}}
    steerings = [Steering.model_validate(r) for r in REQUESTS]
    # the step's batch: each request a chunk of tokens at positions around its prompt end, then an unsteered one
    lens, prompt_len = [5, 6, 7, 4], 4
    positions = torch.cat([torch.arange(n) + 1 for n in lens])  # positions 1..n straddle prompt_len
    request = torch.cat([torch.full((n,), r) for r, n in enumerate(lens)])
    hidden, residual = torch.randn(sum(lens), D_MODEL, generator=g), torch.randn(sum(lens), D_MODEL, generator=g)
    # the caller's rule: slot 0 where the request has no steering or its positions exclude the token
    slot = torch.zeros_like(request)
    for r, steering in enumerate(steerings):
        rows = request == r
        slot[rows] = torch.where(position_mask(positions[rows], prompt_len, steering.positions), r + 1, 0)
    args = (hidden, residual, slot, *slot_tables(dic, steerings, vectors), dic.enc, dic.dec, dic.gate_bias,
            dic.threshold, dic.mag_scale, dic.mag_bias)
    lo, hi = dic.offset["topk"], dic.offset["topk"] + saes["topk"].d_sae
    sparse = sparse_steer_reference(*args)
    full, _, _ = full_steer_reference(*args, lo=lo, hi=hi, k=TOPK_K)

    for r in range(len(lens)):
        rows = request == r
        x = hidden[rows] + residual[rows]
        want = (x if r == len(steerings) else
                steer_residual(x, positions[rows], prompt_len, LAYER, steerings[r], saes, vectors))
        # the TopK request needs the full-width path; the others come out the same from both
        if r != 2:
            torch.testing.assert_close(sparse[rows] + residual[rows], want, atol=ATOL, rtol=0)
        torch.testing.assert_close(full[rows] + residual[rows], want, atol=ATOL, rtol=0)
        assert (r == len(steerings)) or not torch.equal(want, x), f"request {r} should change something"
