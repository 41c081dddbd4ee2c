"""What steering adds to one decoder layer of a served model: on a GPU inside CUDA graphs, on CPU in device ops.

    python benchmarks/op_overhead.py [--results DIR]          GPU (CUDA + triton; vLLM not needed)
    python benchmarks/op_overhead.py --cpu [--results DIR]    CPU: device ops per op call and host time

The table is the engine's (`SteeringTable(graph_safe=True)` on the GPU, as full CUDA graphs replay it;
max_num_seqs=256, max_edits=64) and the op is `torch.ops.sae_steer.steer_residual` reading the runner's
positions buffer, as in vLLM. Two steerable layers: layer A has no SAE (a vector is registered there),
layer B a 16k ReLU, a 16k JumpReLU and a 16k TopK (k=64) SAE at d=2304 (Gemma-2-2B's width), weights in
bf16 (the serving dtype). The cases (column "case"):

    idle        layer A, nobody steered                         (the price every request pays)
    idle_topk   layer B, nobody steered (a TopK SAE registered)
    relu        layer B, each steered row its own slot: 4 ReLU edits
    jumprelu    the same with 4 JumpReLU edits
    topk        the same with 1 TopK edit (the SAE encoded for those tokens)
    vector      layer A, a vector only

at T tokens (decode: T rows of one token; prefill: 8 rows of T/8 tokens) with rows_steered = 1 or every
row (up to 256). GPU: each point is a CUDA graph of 20 op calls, replayed 50 times, median per call ("us"),
beside a graph of 20 clones ("clone_us": what the op replaces) and a roofline floor ("floor_us": bytes the
case must move at peak bandwidth, or for topk max(W_enc bytes / bandwidth, FLOP at peak bf16 tensor-core
rate)), and for topk a bf16 torch.mm of the same encode ("mm_us"). Results:
benchmarks/results/op-overhead-<date>-<device>.json.

CPU (--cpu): per case, the device ops of one op call (torch.profiler: operator calls at the top of the call
that run work; views excluded; the kernels are one registered op each) and its host microseconds, eager
(what the CPU engine runs) and graph-safe; plus prepare_step's host time at 256 rows. Smaller shapes
(d=576, 4k-wide SAEs): counts do not depend on them. Results: benchmarks/results/op-counts-<date>-<cpu>.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sae_steer.registry import Registry
from sae_steer.spec import Steering
from sae_steer.tiny_model import random_sae
from sae_steer.vllm_plugin import steering_op
from sae_steer.vllm_plugin.table import SteeringTable

LAYER_A, LAYER_B, ROWS, MAX_EDITS, CALLS, K = 5, 6, 256, 64, 20, 64
SIZES = [(1, "decode"), (32, "decode"), (256, "decode"), (512, "prefill"), (2048, "prefill")]
CASES = ("idle", "idle_topk", "relu", "jumprelu", "topk", "vector")
# Peak DRAM GB/s and dense bf16 TFLOP/s (data sheets), matched by substring of the device name, first wins
PEAKS = [("H100 PCIe", 2000, 756), ("H100", 3350, 989), ("GH200", 4900, 989), ("H200", 4800, 989),
         ("B200", 8000, 2250), ("A100", 2039, 312), ("L40S", 864, 362), ("L4", 300, 121)]
VIEWS = {"aten::slice", "aten::select", "aten::expand", "aten::as_strided", "aten::view", "aten::alias",
         "aten::t", "aten::transpose", "aten::unsqueeze", "aten::squeeze", "aten::_reshape_alias", "aten::detach",
         "aten::reshape", "aten::lift_fresh", "aten::expand_as"}


def build(device, d: int, width: int, graph_safe: bool, weight_dtype) -> SteeringTable:
    saes = {"relu": random_sae(d, width, LAYER_B, "relu", seed=1).to(device=device),
            "jumprelu": random_sae(d, width, LAYER_B, "jumprelu", seed=2).to(device=device),
            "topk": random_sae(d, width, LAYER_B, "topk", k=K, seed=3).to(device=device)}
    vectors = {"v": {LAYER_A: torch.randn(d, device=device), LAYER_B: torch.randn(d, device=device)}}
    return SteeringTable(Registry(saes=saes, vectors=vectors), [LAYER_A, LAYER_B], max_rows=ROWS,
                         max_tokens=max(T for T, _ in SIZES), max_edits=MAX_EDITS, d_model=d, device=device,
                         graph_safe=graph_safe, weight_dtype=weight_dtype)


def steering(case: str, row: int, width: int) -> Steering | None:
    """Row `row`'s steering: its own features, so every row is its own slot."""
    if case.startswith("idle"):
        return None
    if case == "vector":
        edits = [{"type": "vector", "vector": "v", "layer": LAYER_A, "coef": 0.5 + row / ROWS}]
    elif case == "topk":
        edits = [{"type": "sae", "sae": "topk", "feature": (row * 13) % width, "mode": "clamp", "value": 2.0}]
    else:
        edits = [{"type": "sae", "sae": case, "feature": (row * 7 + j) % width, "mode": "add", "strength": 1.0 + j}
                 for j in range(4)]
    return Steering.model_validate({"interventions": edits})


def layer_of(case: str) -> int:
    return LAYER_A if case in ("idle", "vector") else LAYER_B


def set_batch(table: SteeringTable, positions: torch.Tensor, case: str, T: int, kind: str, steered: int,
              width: int) -> None:
    """The persistent batch for the point: n rows (decode: T of one token; prefill: 8), `steered` of them
    steered, the rest not; then the step's map."""
    n = T if kind == "decode" else 8
    table.update([], list(range(ROWS)), [])
    table.update([(r, steering(case, r, width) if r < steered else None, 16) for r in range(n)], [], [])
    table.prepare_step(torch.arange(0, T + 1, T // n))
    positions[:T] = 20


def steered_rows(case: str, T: int, kind: str) -> list[int]:
    n = T if kind == "decode" else 8
    return [0] if case.startswith("idle") else sorted({1, min(n, ROWS)})


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

def time_graph(fn, hidden, residual) -> float:
    """Median microseconds per call of fn replayed from a CUDA graph of CALLS calls."""
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


def floor_us(case: str, T: int, steered_tokens: int, d: int, width: int, gbps: float, tflops: float) -> float:
    """Roofline: the bytes the case must move (bf16 stream in/out, the edited weight rows) at peak bandwidth;
    topk: max(its bytes, its FLOP at peak)."""
    stream = 3 * T * d * 2  # hidden + residual read, out written
    if case.startswith("idle"):
        nbytes = 2 * T * d * 2  # the copy the op returns
    elif case == "vector":
        nbytes = stream + steered_tokens * d * 4
    elif case == "topk":
        nbytes = stream + width * d * 2 + steered_tokens * (width * 4 + 2 * d * 2)
        return max(nbytes / gbps * 1e-3, 2 * steered_tokens * d * width / tflops * 1e-6)
    else:
        nbytes = stream + steered_tokens * 4 * 2 * d * 2  # 4 edits: an encoder and a decoder row each
    return nbytes / gbps * 1e-3


def run_gpu(opts) -> int:
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    gbps, tflops = next(((g, f) for key, g, f in PEAKS if key in name), (None, None))
    d, width = 2304, 16384
    table = build(device, d, width, graph_safe=True, weight_dtype=torch.bfloat16)
    positions = torch.zeros(table.tokens.shape[0], dtype=torch.int64, device=device)
    steering_op.set_table(table)
    steering_op._runner = SimpleNamespace(positions=positions)
    rows = []
    print(f"{name}: peak {gbps} GB/s, {tflops} TFLOP/s bf16")
    print(f"{'case':>10} {'T':>5} {'rows':>5} {'us':>9} {'clone':>7} {'floor':>7} {'mm':>7}")
    for T, kind in SIZES:
        hidden = torch.randn(T, d, device=device, dtype=torch.bfloat16)
        residual = torch.randn(T, d, device=device, dtype=torch.bfloat16)
        clone = time_graph(lambda h, r: h.clone(), hidden, residual)
        enc = table.dictionaries[1].enc[table.dictionaries[1].topk_lo:table.dictionaries[1].null]
        for case in CASES:
            layer = layer_of(case)
            for steered in steered_rows(case, T, kind):
                set_batch(table, positions, case, T, kind, steered, width)
                us = time_graph(lambda h, r: torch.ops.sae_steer.steer_residual(h, r, layer), hidden, residual)
                tokens = steered * (1 if kind == "decode" else T // 8)
                row = dict(case=case, T=T, kind=kind, rows_steered=steered, steered_tokens=tokens, us=us,
                           clone_us=clone)
                if gbps:
                    row["floor_us"] = floor_us(case, T, tokens, d, width, gbps, tflops)
                if case == "topk":
                    x = torch.randn(tokens, d, device=device, dtype=torch.bfloat16)
                    row["mm_us"] = time_graph(lambda h, r: x @ enc.T, hidden, residual)
                rows.append(row)
                print(f"{case:>10} {T:>5} {steered:>5} {us:>9.1f} {clone:>7.1f} {row.get('floor_us', 0):>7.1f} "
                      f"{row.get('mm_us', 0):>7.1f}", flush=True)
    steering_op.set_table(None)
    steering_op._runner = None
    meta = dict(device=name, date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit(), d=d,
                width=width, k=K, weight_dtype="bfloat16", max_rows=ROWS, max_edits=MAX_EDITS,
                peak_gbps=gbps, peak_tflops=tflops, torch=torch.__version__)
    write(opts.results, f"op-overhead-{datetime.date.today()}-{slug(name)}.json", dict(**meta, rows=rows))
    return 0


# ---------------------------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------------------------

def count_ops(fn) -> tuple[int, int]:
    """(device ops at the top of one call of fn, every operator call under it)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.events() if e.name not in VIEWS]
    return sum(e.cpu_parent is None for e in events), len(events)


def host_us(fn, repeat: int = 200) -> float:
    """Median wall microseconds of one call (on CPU the op's work is host work: this is all of it)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def run_cpu(opts) -> int:
    torch.set_num_threads(1)  # a shared machine: one thread, comparable between runs
    d, width = 576, 4096
    device = torch.device("cpu")
    rows = []
    print(f"{'case':>10} {'path':>10} {'T':>4} {'rows':>5} {'ops':>4} {'aten':>5} {'host us':>9}")
    for graph_safe in (False, True):
        table = build(device, d, width, graph_safe=graph_safe, weight_dtype=torch.float32)
        positions = torch.zeros(table.tokens.shape[0], dtype=torch.int64)
        steering_op.set_table(table)
        steering_op._runner = SimpleNamespace(positions=positions)
        for T, kind in SIZES[:3]:
            hidden, residual = torch.randn(T, d), torch.randn(T, d)
            for case in CASES:
                layer = layer_of(case)
                for steered in steered_rows(case, T, kind):
                    set_batch(table, positions, case, T, kind, steered, width)
                    call = lambda: torch.ops.sae_steer.steer_residual(hidden, residual, layer)  # noqa: E731
                    table_call = lambda: table.apply(layer, hidden, residual, positions[:T])  # noqa: E731
                    ops, aten = count_ops(table_call)
                    row = dict(case=case, path="graph_safe" if graph_safe else "eager", T=T, rows_steered=steered,
                               device_ops=ops, aten_ops=aten, host_us=host_us(call),
                               table_host_us=host_us(table_call))
                    rows.append(row)
                    print(f"{case:>10} {row['path']:>10} {T:>4} {steered:>5} {ops:>4} {aten:>5} "
                          f"{row['host_us']:>9.1f}", flush=True)
        if graph_safe:  # prepare_step at 256 decode rows, each its own slot (graph-safe: it always writes)
            table.update([], list(range(ROWS)), [])
            table.update([(r, steering("relu", r, width), 16) for r in range(ROWS)], [], [])
            qsl = torch.arange(ROWS + 1, dtype=torch.int32)
            prepare = host_us(lambda: table.prepare_step(qsl), repeat=2000)
            print(f"prepare_step at {ROWS} rows: {prepare:.1f} us")
    steering_op.set_table(None)
    steering_op._runner = None
    cpu = cpu_name()
    meta = dict(device=cpu, date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit(), d=d,
                width=width, k=K, max_rows=ROWS, max_edits=MAX_EDITS, threads=1, torch=torch.__version__,
                prepare_step_us_256_rows=prepare,
                note="device_ops: operator calls at the top of one op call (views excluded; each kernel is one "
                     "registered op); aten_ops: every operator call under it; host_us: the op through "
                     "torch.ops.sae_steer.steer_residual, table_host_us: SteeringTable.apply alone")
    write(opts.results, f"op-counts-{datetime.date.today()}-{slug(cpu)}.json", dict(**meta, rows=rows))
    return 0


# ---------------------------------------------------------------------------------------------

def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data, indent=1))
    print(f"wrote {folder / name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--cpu", action="store_true", help="device ops and host time per op call, on CPU")
    opts = parser.parse_args()
    if opts.cpu:
        return run_cpu(opts)
    if not torch.cuda.is_available():
        print("benchmarks/op_overhead.py needs a CUDA GPU (or --cpu for the CPU op counts)")
        return 2
    return run_gpu(opts)


if __name__ == "__main__":
    raise SystemExit(main())
