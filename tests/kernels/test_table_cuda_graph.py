"""On a GPU: the whole steering path of the served model (the op `torch.ops.sae_steer.steer_residual` as the
model calls it, reading the runner's positions buffer and a SteeringTable with graph_safe=True: token -> row ->
slot map, TopK encodes, the fused kernel) captured in CUDA graphs, as vLLM captures its decode steps at a few batch sizes,
then replayed across a batch history: requests added, removed, moved and swapped through update(), new
prepare_step bounds and padding tokens. Every replay must equal an eager run of the same table on the
same inputs, bit for bit, and the per-request reference `sae_steer.edits.steer_residual`. Both kinds of
block: those that pass (hidden, residual), and those that return the whole stream (residual None); SAE
weights in fp32 and in the serving dtype (bf16: replay == eager, the reference is checked in fp32 only).
The graphs are captured while nothing is steered: idle layers are one copying launch and an encode that
exits, and the replays must still steer everything later steps ask for."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from kernel_cases import DEVICE
from sae_steer.edits import steer_residual
from sae_steer.registry import Registry
from sae_steer.vllm_plugin import steering_op
from sae_steer.vllm_plugin.table import SteeringTable
from tests.unit.test_table import D, LAYERS, MAX_TOKENS, ROWS, next_batch, random_chunks, registry

pytestmark = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (TRITON_INTERPRET runs on CPU)")

CAPTURED_SIZES = (16, MAX_TOKENS)  # a step of n tokens replays the smallest size >= n, padded
ATOL, RTOL = 1e-4, 1e-4  # fp32 on the GPU against the fp32 CPU reference, different summation orders


@pytest.mark.parametrize("full_stream,weights", [(False, torch.float32), (True, torch.float32),
                                                  (False, torch.bfloat16)])
def test_captured_steering_follows_table_updates(full_stream, weights):
    cpu = registry()  # relu + gated at layer 1, jumprelu + two TopK SAEs at layer 2, vectors at 0 and 2
    reg = Registry(saes={n: s.to(device=DEVICE) for n, s in cpu.saes.items()},
                   vectors={n: {L: v.to(DEVICE) for L, v in per.items()} for n, per in cpu.vectors.items()})
    table = SteeringTable(reg, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=8, d_model=D,
                          device=DEVICE, graph_safe=True, weight_dtype=weights)
    assert table.fused
    # fixed-address inputs per captured size, as vLLM keeps them, and the runner's positions buffer (the op
    # reads its first T entries); captured while nothing is steered
    inputs = {T: (torch.zeros(T, D, device=DEVICE), torch.zeros(T, D, device=DEVICE)) for T in CAPTURED_SIZES}
    runner_positions = torch.zeros(MAX_TOKENS, dtype=torch.int64, device=DEVICE)
    table.prepare_step(torch.tensor([0]))
    steering_op.set_table(table)
    steering_op._runner = SimpleNamespace(positions=runner_positions)

    def run(T):
        hidden, residual = inputs[T]
        return [torch.ops.sae_steer.steer_residual(hidden, None if full_stream else residual, layer) for layer in LAYERS]

    stream = torch.cuda.Stream()  # warm up (Triton compiles) outside the capture, as torch.cuda.graphs asks
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for T in CAPTURED_SIZES:
            run(T)
    torch.cuda.current_stream().wait_stream(stream)
    graphs, outputs = {}, {}
    for T in CAPTURED_SIZES:
        graphs[T] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[T]):
            outputs[T] = run(T)

    rng, rows, steered = random.Random(5), [None] * ROWS, 0
    for step in range(30):
        added, removed, moved, n_live = next_batch(rng, rows)
        table.update(added, removed, moved)
        qsl, positions = random_chunks(rng, n_live)
        n = int(qsl[-1])
        T = min(size for size in CAPTURED_SIZES if size >= n)
        hidden, residual = torch.randn(T, D), torch.zeros(T, D) if full_stream else torch.randn(T, D)
        positions = torch.cat([positions, torch.full((T - n,), 3)])  # padding: stale positions, no row
        for buf, new in zip(inputs[T], (hidden, residual)):
            buf.copy_(new)
        runner_positions[:T].copy_(positions)
        table.prepare_step(qsl)
        graphs[T].replay()
        eager = run(T)
        for li, layer in enumerate(LAYERS):
            got = outputs[T][li].cpu()
            assert torch.equal(got, eager[li].cpu()), f"step {step}, layer {layer}: replay != eager"
            assert torch.equal(got[n:], hidden[n:]), "padding tokens are never steered"
            for i in range(n_live):
                steering, prompt_len = rows[i]
                seg = slice(int(qsl[i]), int(qsl[i + 1]))
                if steering is None:
                    assert torch.equal(got[seg], hidden[seg])
                    continue
                steered += int(not torch.equal(got[seg], hidden[seg]))
                if weights != torch.float32:
                    continue
                x = hidden[seg] + residual[seg]
                want = steer_residual(x, positions[seg], prompt_len, layer, steering, cpu.saes, cpu.vectors)
                torch.testing.assert_close(got[seg], want - residual[seg], atol=ATOL, rtol=RTOL)
    assert steered >= 20, "the history should steer many rows"
    steering_op.set_table(None)
    steering_op._runner = None
