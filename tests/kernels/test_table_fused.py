"""The engine's SteeringTable with its fused path on (what CUDA runs) == its torch path, through
the Triton kernel (the interpreter on CPU): the wiring, not just the kernel, TopK SAEs included."""
from __future__ import annotations

import random

import pytest
import torch

from kernel_cases import DEVICE
from sae_steer.registry import Registry
from sae_steer.vllm_plugin.table import SteeringTable
from tests.unit.test_table import D, LAYERS, MAX_TOKENS, ROWS, random_steering, registry

RTOL, ATOL = 1e-5, 1e-4  # fp32, different summation order (see kernel_cases.py)


@pytest.mark.parametrize("graph_safe", [False, True])
def test_fused_table_path_equals_the_torch_path(graph_safe):
    rng = random.Random(1)
    cpu = registry()
    on_device = Registry(saes={n: s.to(device=DEVICE) for n, s in cpu.saes.items()},
                         vectors={n: {L: v.to(DEVICE) for L, v in per.items()} for n, per in cpu.vectors.items()})
    tables = [SteeringTable(reg, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=8, d_model=D, device=device,
                            graph_safe=graph_safe) for reg, device in ((cpu, torch.device("cpu")), (on_device, DEVICE))]
    torch_path, fused = tables
    fused.fused = True  # on CUDA already; on CPU the kernel runs in Triton's interpreter
    steerings = [random_steering(rng) for _ in range(ROWS)]
    assert any(getattr(iv, "sae", "").startswith("topk") for s in steerings if s for iv in s.interventions)
    lens = [1 + (r % 3) * 4 for r in range(len(steerings))]
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    positions = torch.cat([torch.arange(3 + r, 3 + r + n) for r, n in enumerate(lens)])
    hidden, residual = torch.randn(int(qsl[-1]), D), torch.randn(int(qsl[-1]), D)
    for table in tables:
        table.update([(r, s, 6 + r) for r, s in enumerate(steerings)], [], [])
        table.prepare_step(qsl)
    checked = 0
    for layer in LAYERS:
        expected = torch_path.apply(layer, hidden, residual, positions)
        got = fused.apply(layer, hidden.to(DEVICE), residual.to(DEVICE), positions.to(DEVICE)).cpu()
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
        checked += int((expected != hidden).any())
    assert checked >= 2, "the random steerings should edit at least two layers"
