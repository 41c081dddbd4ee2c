"""What steering adds to one decoder layer of a served model on a GPU, inside a CUDA graph.

    python benchmarks/op_overhead.py [--results DIR]     (needs CUDA and triton; vLLM is not needed)

For each batch size T, three CUDA graphs of the same step are captured and replayed, as vLLM replays
its decode steps, and timed per layer (median over replays of a graph that calls the layer 20 times):

    baseline       hidden.clone()                                    (what the op costs when absent)
    idle           the steering op, graph-safe table, nobody steered (the price every request pays)
    steered        the same graph after the table was updated in place: every row steered, each with
                   its own slot (4 SAE edits on a 16k ReLU SAE, 1 edit on a 16k TopK SAE, a vector)

The table is the engine's (`SteeringTable(graph_safe=True)`, max_num_seqs=256, max_edits=64) and the
op is `torch.ops.sae_steer.steer_residual` reading the runner's positions buffer, as in vLLM.
A model layer of d=2304 (Gemma-2-2B's width) in bf16 costs tens of microseconds at these sizes:
compare with that. Results: benchmarks/results/op-overhead-<date>-<device>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from pathlib import Path
from types import SimpleNamespace

import torch

from sae_steer.registry import Registry
from sae_steer.spec import Steering
from sae_steer.tiny_model import random_sae
from sae_steer.vllm_plugin import steering_op
from sae_steer.vllm_plugin.table import SteeringTable

D, WIDTH, LAYER, ROWS, MAX_EDITS, CALLS = 2304, 16384, 6, 256, 64, 20
SIZES = [1, 8, 32, 128, 256]


def build(device) -> SteeringTable:
    saes = {"relu": random_sae(D, WIDTH, LAYER, "relu", seed=1).to(device=device),
            "topk": random_sae(D, WIDTH, LAYER, "topk", k=64, seed=2).to(device=device)}
    vectors = {"v": {LAYER: torch.randn(D, device=device)}}
    return SteeringTable(Registry(saes=saes, vectors=vectors), [LAYER], max_rows=ROWS, max_tokens=max(SIZES),
                         max_edits=MAX_EDITS, d_model=D, device=device, graph_safe=True)


def steering(row: int) -> Steering:
    edits = [{"type": "sae", "sae": "relu", "feature": (row * 7 + j) % WIDTH, "mode": "add", "strength": 1.0 + j}
             for j in range(4)]
    edits.append({"type": "sae", "sae": "topk", "feature": row % WIDTH, "mode": "clamp", "value": 2.0})
    edits.append({"type": "vector", "vector": "v", "coef": 0.5 + row / ROWS})
    return Steering.model_validate({"interventions": edits})


def time_graph(fn, T: int, device) -> float:
    """Median microseconds per layer call of fn replayed from a CUDA graph."""
    hidden = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    residual = torch.randn(T, D, device=device, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(hidden, residual)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn(hidden, residual)
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / CALLS)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/op_overhead.py needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    table = build(device)
    positions = torch.zeros(max(SIZES), dtype=torch.int64, device=device)
    steering_op.set_table(table)
    steering_op._runner = SimpleNamespace(positions=positions)

    def op(hidden, residual):
        return torch.ops.sae_steer.steer_residual(hidden, residual, LAYER)

    rows = []
    print(f"{'T':>4} {'baseline us':>12} {'idle us':>9} {'steered us':>11}")
    for T in SIZES:
        table.update([], list(range(ROWS)), [])  # nobody steered
        table.prepare_step(torch.arange(T + 1))  # one token per row: decode
        baseline = time_graph(lambda h, r: h.clone(), T, device)
        idle = time_graph(op, T, device)
        table.update([(row, steering(row), 16) for row in range(T)], [], [])
        positions[:T] = 20
        steered = time_graph(op, T, device)
        rows.append(dict(T=T, baseline_us=baseline, idle_us=idle, steered_us=steered))
        print(f"{T:>4} {baseline:>12.1f} {idle:>9.1f} {steered:>11.1f}", flush=True)
    name = torch.cuda.get_device_name()
    opts.results.mkdir(parents=True, exist_ok=True)
    path = opts.results / f"op-overhead-{datetime.date.today()}-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}.json"
    path.write_text(json.dumps(dict(device=name, d=D, width=WIDTH, max_rows=ROWS, max_edits=MAX_EDITS,
                                    torch=torch.__version__, rows=rows), indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
