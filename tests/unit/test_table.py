"""The batched SteeringTable (the engine's hot path) == the per-request reference, over random batch
histories with additions, removals, swaps and moves, like vLLM's persistent batch produces."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from sae_steer.edits import steer_residual
from sae_steer.registry import Registry, Settings
from sae_steer.spec import Steering
from sae_steer.tiny_model import random_sae
from sae_steer.vllm_plugin.table import SteeringTable

D, F, ROWS, LAYERS = 32, 48, 8, [0, 1, 2]
MAX_TOKENS = 64  # 8 rows x up to 7 tokens + up to 3 padding tokens
ATOL = 1e-4  # float32, different summation order than the reference


def registry() -> Registry:
    saes = {"relu": random_sae(D, F, 1, "relu", seed=1), "gated": random_sae(D, F, 1, "gated", seed=2),
            "jump": random_sae(D, F, 2, "jumprelu", seed=3), "topk": random_sae(D, F, 2, "topk", k=6, seed=4),
            "topk2": random_sae(D, F // 2, 2, "topk", k=3, seed=6)}  # two TopK SAEs share layer 2's segment
    g = torch.Generator().manual_seed(5)
    vectors = {"v": {0: torch.randn(D, generator=g), 2: torch.randn(D, generator=g)}}
    return Registry(saes=saes, vectors=vectors)


def random_steering(rng: random.Random) -> Steering | None:
    if rng.random() < 0.25:
        return None
    ivs = []
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["relu", "gated", "jump", "topk", "topk2", "v", "inline"])
        if kind == "v":
            ivs.append({"type": "vector", "vector": "v", "coef": rng.uniform(-3, 3)})
        elif kind == "inline":
            ivs.append({"type": "vector", "layer": rng.choice(LAYERS), "values": [rng.gauss(0, 1) for _ in range(D)],
                        "coef": 1.0})
        else:
            mode = rng.choice(["add", "clamp", "ablate", "scale"])
            param = {"add": {"strength": rng.uniform(-5, 5)}, "clamp": {"value": rng.uniform(0, 5)}, "ablate": {},
                     "scale": {"factor": rng.uniform(0, 3)}}[mode]
            width = F // 2 if kind == "topk2" else F
            iv = {"type": "sae", "sae": kind, "feature": rng.randrange(width), "mode": mode, **param}
            if rng.random() < 0.3:
                iv["when"] = {"feature": rng.randrange(width), "above": rng.uniform(0, 0.5)}
            ivs.append(iv)
    return Steering.model_validate({"interventions": ivs,
                                    "positions": rng.choice(["all", "prompt", "generated"])})


def next_batch(rng: random.Random, rows: list) -> tuple[list, list, list, int]:
    """One step of vLLM's persistent batch, applied to the test's own model `rows` (row -> (steering,
    prompt_len) or None) -> (added, removed, moved, n_live) for SteeringTable.update."""
    removed = [r for r in range(len(rows)) if rows[r] is not None and rng.random() < 0.2]
    for r in removed:
        rows[r] = None
    # vLLM's order: removed rows leave holes, new requests fill the lowest free rows, then the batch
    # is condensed (the last rows move into the holes) and rows may be swapped (reordering).
    added = []
    for r in range(len(rows)):
        if rows[r] is None and rng.random() < 0.5:
            rows[r] = (random_steering(rng), rng.randint(1, 20))
            added.append((r, *rows[r]))
    moved = []
    while None in rows and any(rows[rows.index(None):]):
        hole = rows.index(None)
        last = max(r for r in range(len(rows)) if rows[r] is not None)
        rows[hole], rows[last] = rows[last], None
        moved.append((last, hole, False))
    n_live = len(rows) - rows.count(None)
    if n_live >= 2 and rng.random() < 0.5:
        a, b = rng.sample(range(n_live), 2)
        rows[a], rows[b] = rows[b], rows[a]
        moved.append((a, b, True))
    assert all(rows[r] is not None for r in range(n_live))
    return added, removed, moved, n_live


def random_chunks(rng: random.Random, n_live: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's schedule: each live row a chunk (a prefill chunk or one decode token) at some position.
    -> (query_start_loc [n_live + 1], positions [T])."""
    lens = [rng.choice([1, 1, 3, 7]) for _ in range(n_live)]
    starts = [rng.randint(0, 25) for _ in range(n_live)]
    qsl = torch.tensor([0] + torch.tensor(lens, dtype=torch.long).cumsum(0).tolist())
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lens)] + [torch.zeros(0, dtype=torch.long)])
    return qsl, positions


@pytest.mark.parametrize("graph_safe,full_stream,weights", [(False, False, torch.float32), (True, False, torch.float32),
                                                            (False, True, torch.float32), (True, True, torch.float32),
                                                            (True, False, torch.float16)])
def test_table_matches_reference_over_a_random_batch_history(graph_safe, full_stream, weights):
    """full_stream: blocks that return the whole stream (GPT-2, GPT-NeoX) pass residual None. weights: the
    packed SAE weights' dtype (a GPU's serving dtype); the reference then reads the same rounded weights (x
    is not rounded on this path: the CPU matmul upcasts the weights)."""
    rng, reg = random.Random(0), registry()
    table = SteeringTable(reg, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=8, d_model=D,
                          device=torch.device("cpu"), graph_safe=graph_safe, weight_dtype=weights)
    saes = {n: replace(s, W_enc=s.W_enc.to(weights).float(), W_dec=s.W_dec.to(weights).float())
            for n, s in reg.saes.items()}
    rows: list[tuple[Steering | None, int] | None] = [None] * ROWS  # the test's own model of the batch
    for step in range(40):
        added, removed, moved, n_live = next_batch(rng, rows)
        table.update(added, removed, moved)
        qsl, positions = random_chunks(rng, n_live)
        T = int(qsl[-1])
        pad = rng.randint(0, 3)  # padded tokens past the last row (as with CUDA-graph padding)
        positions = torch.cat([positions, torch.zeros(pad, dtype=torch.long)])
        hidden = torch.randn(T + pad, D)
        residual = torch.zeros(T + pad, D) if full_stream else torch.randn(T + pad, D)
        table.prepare_step(qsl)
        for layer in LAYERS:
            out = table.apply(layer, hidden, None if full_stream else residual, positions)
            for i in range(n_live):
                steering, prompt_len = rows[i]
                seg = slice(int(qsl[i]), int(qsl[i + 1]))
                x = hidden[seg] + residual[seg]
                if steering is None:
                    assert torch.equal(out[seg], hidden[seg])
                    continue
                ref = steer_residual(x, positions[seg], prompt_len, layer, steering, saes, reg.vectors) - residual[seg]
                torch.testing.assert_close(out[seg], ref, atol=ATOL, rtol=1e-4)
            assert torch.equal(out[T:], hidden[T:]), "padding tokens are never steered"
    assert step == 39


def test_slots_are_shared_by_fingerprint_and_released():
    reg = registry()
    table = SteeringTable(reg, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=8, d_model=D,
                          device=torch.device("cpu"))
    s = Steering.model_validate({"interventions": [{"type": "vector", "vector": "v", "coef": 1.0}]})
    t = Steering.model_validate({"interventions": [{"type": "vector", "vector": "v", "coef": 2.0}]})
    table.update([(0, s, 3), (1, s, 4), (2, t, 5), (3, None, 2)], [], [])
    row_slot = table.rows.row_slot
    assert row_slot[0] == row_slot[1] != row_slot[2] and row_slot[3] == 0
    assert len(table.rows.live) == 2
    table.update([], [0, 2], [(1, 0, False)])
    assert row_slot[0] != 0 and row_slot[1] == 0 and len(table.rows.live) == 1
    table.update([], [0], [])
    assert not table.rows.live and not any(table.layer_live)


def test_the_table_holds_each_sae_once():
    """The registry's SAE weights become views of the table's packed dictionaries: one copy in memory."""
    reg = registry()
    table = SteeringTable(reg, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=4, d_model=D,
                          device=torch.device("cpu"))
    fresh = registry()
    for name, sae in reg.saes.items():
        dictionary = table.dictionaries[table.layer_index[sae.layer]]
        for weight, packed in ((sae.W_enc, dictionary.enc), (sae.W_dec, dictionary.dec)):
            assert weight.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr(), name
        assert torch.equal(sae.W_enc, fresh.saes[name].W_enc) and torch.equal(sae.W_dec, fresh.saes[name].W_dec)
        x = torch.randn(5, D)
        assert torch.allclose(sae.encode(x), fresh.saes[name].encode(x), atol=1e-6), name


def test_packed_weights_in_the_serving_dtype_beside_the_fp32_registry():
    """sae_weight_dtype "serving" on a GPU: the packed copy in the model's half dtype, the registry's fp32
    weights untouched beside it (telemetry encodes with them) and counted in nbytes; the steering itself is
    checked against the reference in test_table_matches_reference_over_a_random_batch_history (float16)."""
    serving, fp32_only = Settings(), Settings(sae_weight_dtype="float32")
    assert serving.packed_weight_dtype(True, torch.bfloat16) == torch.bfloat16
    assert serving.packed_weight_dtype(True, torch.float16) == torch.float16
    assert fp32_only.packed_weight_dtype(True, torch.bfloat16) == torch.float32
    assert serving.packed_weight_dtype(True, torch.float32) == torch.float32
    assert serving.packed_weight_dtype(False, torch.bfloat16) == torch.float32, "CPUs keep fp32"
    reg, fp32 = registry(), registry()
    table = SteeringTable(reg, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=8, d_model=D,
                          device=torch.device("cpu"), graph_safe=True, weight_dtype=torch.float16)
    assert all(d.enc.dtype == d.dec.dtype == torch.float16 for d in table.dictionaries)
    for name, sae in reg.saes.items():
        assert sae.W_enc.dtype == torch.float32 and torch.equal(sae.W_enc, fp32.saes[name].W_enc), name
    packed_bytes = sum(d.enc.nbytes + d.dec.nbytes for d in table.dictionaries)
    registry_bytes = sum(s.W_enc.nbytes + s.W_dec.nbytes for s in reg.saes.values())
    assert table.nbytes >= packed_bytes + registry_bytes, "nbytes counts the fp32 copy beside the packed one"


def test_the_profiling_run_takes_the_widest_path(monkeypatch):
    """With no request in the batch, the worst-case flag still allocates every TopK SAE's activations for every
    token (what vLLM's memory profiling must see), and steers nothing."""
    import sae_steer.vllm_plugin.table as table_module
    encoded = []
    real = table_module.ops.encode_rows
    monkeypatch.setattr(table_module.ops, "encode_rows", lambda *a: encoded.append(real(*a).shape) or real(*a))
    table = SteeringTable(registry(), LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=4, d_model=D,
                          device=torch.device("cpu"))
    hidden, residual, positions = torch.randn(MAX_TOKENS, D), torch.randn(MAX_TOKENS, D), torch.arange(MAX_TOKENS)
    assert torch.equal(table.apply(2, hidden, residual, positions), hidden) and not encoded  # nothing live: skipped
    table.worst_case = True
    assert torch.equal(table.apply(2, hidden, residual, positions), hidden)
    width = sum(sae.d_sae for sae in table.registry.saes.values() if sae.layer == 2 and sae.architecture == "topk")
    assert encoded == [(MAX_TOKENS, width)], "the TopK SAEs of layer 2 got activations for every token"


def test_steps_that_steer_nothing_leave_the_token_map_and_the_next_steered_step_is_exact():
    """Eager, a step with no live steering does not write the token map; the first steered step after
    such steps (other rows, other chunk sizes) writes it again before it is read."""
    reg = registry()
    table = SteeringTable(reg, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=8, d_model=D,
                          device=torch.device("cpu"))
    steering = Steering.model_validate({"interventions": [{"type": "vector", "vector": "v", "coef": 2.0}]})
    table.update([(0, steering, 3), (1, None, 5)], [], [])
    table.prepare_step(torch.tensor([0, 3, 8]))
    written = table.step.clone()
    table.update([], [0], [(1, 0, False)])  # the steered request leaves; the other moves to row 0
    table.prepare_step(torch.tensor([0, 1]))
    assert not any(table.layer_live) and torch.equal(table.step, written), "nothing steered: map not written"
    hidden = torch.randn(1, D)
    assert torch.equal(table.apply(0, hidden, torch.zeros(1, D), torch.tensor([5])), hidden)
    table.update([(1, steering, 2)], [], [])  # row 0 unsteered (1 decode token), row 1 steered (prefill of 2)
    table.prepare_step(torch.tensor([0, 1, 3]))
    hidden, residual = torch.randn(3, D), torch.randn(3, D)
    out = table.apply(0, hidden, residual, torch.tensor([6, 0, 1]))
    assert torch.equal(out[0], hidden[0])
    torch.testing.assert_close(out[1:], hidden[1:] + 2.0 * reg.vectors["v"][0], atol=ATOL, rtol=1e-5)
