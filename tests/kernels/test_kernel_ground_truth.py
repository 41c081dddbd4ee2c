"""The kernels' torch references == the per-request ground truth `sae_steer.edits.steer_residual`.

A batch of requests (every edit mode, `when` gates, registered and inline vectors, the three position
modes, an unsteered request) is written into slot tables as SteeringTable writes them, with each token's
positions window as the table's per-step map writes it (the position rule written out here). TopK
membership comes from a full encode of the TopK SAE (its k-th value per token). The kernels are tested against
these references in test_sparse_steer.py / test_full_steer.py; this closes the chain to the ground truth.
"""
from __future__ import annotations

import torch

from kernel_cases import TOPK_K, dictionary
from sae_steer.edits import position_mask, steer_residual
from sae_steer.kernels.full_steer import encode_reference
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
    """Slot s + 1 holds steerings[s]; slot 0 stays empty (the layout of SteeringTable._write_slot).
    -> (slot_edits, edit_feature, edit_mul, edit_add, gate_feature, gate_above, vector)."""
    S = len(steerings) + 1
    slot_edits = torch.full((S,), -1, dtype=torch.int32)
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
                slot_edits[s] = e
            elif iv.values is not None:
                vector[s] += iv.coef * torch.tensor(iv.values)
            else:
                vector[s] += iv.coef * vectors[iv.vector][LAYER]
        slot_edits[s] = max(int(slot_edits[s]), 0)  # every request here touches the layer
    return slot_edits, ef, em, ea, gf, ga, vector


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
    # the table's per-step map: each token's slot and the window of positions its request steers
    slot = torch.zeros_like(request)
    start, end = torch.zeros_like(request), torch.full_like(request, 2 ** 31 - 1)
    for r, steering in enumerate(steerings):
        rows = request == r
        slot[rows] = r + 1
        if steering.positions == "prompt":
            end[rows] = prompt_len
        elif steering.positions == "generated":
            start[rows] = prompt_len
    tokens = torch.stack([slot, start, end], 1).to(torch.int32)
    for r, steering in enumerate(steerings):  # the window is the position rule, written out independently
        rows = request == r
        inside = (positions[rows] >= start[rows]) & (positions[rows] < end[rows])
        assert torch.equal(inside, position_mask(positions[rows], prompt_len, steering.positions))
    slot_edits, *tables = slot_tables(dic, steerings, vectors)
    args = (hidden, residual, positions, tokens, slot_edits, *tables, dic.enc, dic.dec, dic.gate_bias,
            dic.threshold, dic.mag_scale, dic.mag_bias)
    lo, hi = dic.offset["topk"], dic.offset["topk"] + saes["topk"].d_sae
    sparse = sparse_steer_reference(*args)
    acts = encode_reference(hidden, residual, dic.enc, dic.gate_bias, dic.threshold, dic.mag_scale, dic.mag_bias,
                            dic.topk_lo, dic.null)
    full = sparse_steer_reference(*args, (acts, torch.tensor([[lo, hi, TOPK_K]]), dic.topk_lo))

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
