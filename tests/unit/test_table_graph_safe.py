"""SteeringTable(graph_safe=True) on CPU: what a captured CUDA graph needs, checked without a GPU.

torch.compile(fullgraph=True) raises on any graph break (a host read, a data-dependent shape), and a
graph compiled once must keep giving the right answer while update() / prepare_step() rewrite the
table in place: a branch on table contents would show up as a recompilation (a guard on Python state)
or as a wrong result (a constant frozen into the graph). The expected values are written out here,
token by token, from DESIGN.md's math; nothing of the table's or the kernels' math is imported.
"""
from __future__ import annotations

import random

import torch
from torch._dynamo.testing import CompileCounter

from sae_steer.spec import SaeIntervention, Steering
from sae_steer.vllm_plugin.table import SteeringTable
from tests.unit.test_table import D, LAYERS, MAX_TOKENS, ROWS, next_batch, random_chunks, registry

ATOL, RTOL = 1e-4, 1e-4  # fp32 against float64, different summation orders


def sae_features(sae, x: torch.Tensor) -> torch.Tensor:
    """DESIGN.md: f = act(W_enc^T (x - b_dec) + b_enc), x [d] float64 -> f [d_sae]."""
    W_enc, b_dec = sae.W_enc.double(), sae.b_dec.double()
    pre = (x - b_dec) @ W_enc + sae.b_enc.double()
    if sae.architecture == "relu":
        return pre.clamp(min=0)
    if sae.architecture == "jumprelu":
        return pre.clamp(min=0) * (pre > sae.threshold.double())
    if sae.architecture == "gated":  # b_enc is the gate's bias; the magnitude path rescales W_enc
        mag = (x - b_dec) @ (W_enc * sae.r_mag.double().exp()) + sae.b_mag.double()
        return (pre > 0) * mag.clamp(min=0)
    keep = pre.topk(sae.k).indices  # topk: the k largest pre-activations, ReLU'd
    return torch.zeros_like(pre).index_copy(0, keep, pre[keep].clamp(min=0))


def steered_token(x: torch.Tensor, position: int, prompt_len: int, steering: Steering | None, layer: int, reg):
    """x [d] (the residual stream) -> the steered residual stream of this one token, in float64."""
    if steering is None:
        return x
    if (steering.positions == "prompt" and position >= prompt_len) or \
            (steering.positions == "generated" and position < prompt_len):
        return x
    out = x.clone()
    for iv in steering.interventions:
        if isinstance(iv, SaeIntervention):
            sae = reg.saes[iv.sae]
            if sae.layer != layer:
                continue
            f = sae_features(sae, x)
            if iv.when is not None and not f[iv.when.feature] > iv.when.above:
                continue
            old = f[iv.feature]
            new = {"add": lambda: old + iv.strength, "clamp": lambda: torch.tensor(iv.value, dtype=x.dtype),
                   "ablate": lambda: torch.zeros((), dtype=x.dtype),
                   "scale": lambda: old * (iv.factor if iv.factor is not None else iv.strength)}[iv.mode]()
            out += (new - old) * sae.W_dec[iv.feature].double()  # the SAE's error term is kept
        elif iv.values is not None:
            if iv.layer == layer:
                out += iv.coef * torch.tensor(iv.values, dtype=x.dtype)
        elif (iv.layer is None or iv.layer == layer) and layer in reg.vectors[iv.vector]:
            out += iv.coef * reg.vectors[iv.vector][layer].double()
    return out


def test_compiled_graph_safe_path_follows_in_place_table_updates():
    rng, reg = random.Random(3), registry()
    table = SteeringTable(reg, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=8, d_model=D,
                          device=torch.device("cpu"), graph_safe=True)
    counter = CompileCounter()
    steer = torch.compile(table.steer, backend=counter, fullgraph=True, dynamic=False)
    rows: list = [None] * ROWS
    T = MAX_TOKENS  # the captured batch size: every step is padded to it
    steered_rows = 0
    for step in range(13):
        if step == 0:  # traced while nothing is steered: a graph that froze "nothing to do" fails later
            rows[:2] = [(None, 5), (None, 3)]
            table.update([(0, None, 5), (1, None, 3)], [], [])
            n_live = 2
            assert not any(table.layer_live)
        else:
            added, removed, moved, n_live = next_batch(rng, rows)
            table.update(added, removed, moved)
        qsl, positions = random_chunks(rng, n_live)
        n = int(qsl[-1])
        positions = torch.cat([positions, torch.full((T - n,), 7)])  # padding: stale positions, no row
        table.prepare_step(qsl)
        hidden, residual = torch.randn(T, D), torch.randn(T, D)
        for layer in LAYERS:
            out = steer(layer, hidden, residual, positions)
            row_of = torch.repeat_interleave(torch.arange(n_live), qsl.diff())
            want = torch.stack([steered_token((hidden[t] + residual[t]).double(), int(positions[t]), rows[row_of[t]][1],
                                              rows[row_of[t]][0], layer, reg) - residual[t].double()
                                for t in range(n)] + [hidden[t].double() for t in range(n, T)])
            torch.testing.assert_close(out.double(), want, atol=ATOL, rtol=RTOL)
            assert torch.equal(out[n:], hidden[n:]), "padding tokens are never steered"
            steered_rows += int((out[:n] != hidden[:n]).any())
    # one graph per layer, traced once: nothing the updates change was read as a Python value
    assert counter.frame_count == len(LAYERS)
    assert steered_rows >= 10, "the history should steer most steps"
