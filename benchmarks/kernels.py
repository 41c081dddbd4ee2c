"""Kernel micro-benchmarks: the Triton steering kernels vs their torch references, on a GPU.

    python benchmarks/kernels.py            # the full sweep: 108 sparse + 36 full-width points
    python benchmarks/kernels.py --quick    # 12 sparse + 6 full-width points
    python benchmarks/kernels.py --quick --results DIR    # write the results elsewhere

Each point is timed with `triton.testing.do_bench` (median of repeated launches). Two sweeps:

  sparse  sparse_steer: T tokens x d x SAE width x live edits per slot, all tokens steered over up to 8
          distinct slots. Memory-bound by design, so the figure of merit is achieved bandwidth:
          GB/s over the bytes the step must touch (hidden/residual read, out written, slot tables,
          the gathered enc/dec rows and activation parameters of the distinct edited features),
          and its ratio to the GPU's peak DRAM bandwidth. The width sweep shows the cost does not
          grow with the SAE width.
  full    TopK steering: the encode of a TopK SAE (k=64) for every token (full_steer.encode_triton) and the
          sparse kernel reading its activations (8 edits on it): T x d x width. The encode is a matmul, so
          TFLOP/s is reported beside GB/s, and a bf16 torch.mm of the same shape ("mm" provider).

The weights are held in --weights (bf16 by default: the serving dtype). The torch providers are the paths
torch would run: sparse_steer_distinct (one matmul over the distinct features; the per-token reference
would gather [T, 2E, d]) and encode_reference + sparse_steer_distinct.

Results: benchmarks/results/kernels-<date>-<device>.json (the device named in the file and its name)
and, when matplotlib is installed, one PNG per sweep beside it. Needs CUDA and triton; vLLM is not
needed. Without CUDA it refuses to run: there are no CPU numbers to report for GPU kernels.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch

from sae_steer.kernels.full_steer import encode_reference, encode_triton
from sae_steer.kernels.sparse_steer import sparse_steer_distinct, sparse_steer_reference, sparse_steer_triton

try:
    import triton
    import triton.testing
except ImportError:
    triton = None

RESULTS = Path(__file__).resolve().parent / "results"

# Peak DRAM bandwidth in GB/s (vendor data sheets), matched against torch.cuda.get_device_name() in
# order: the first substring that occurs wins, so the more specific names come first.
PEAK_GBPS = [
    ("H100 PCIe", 2000), ("H100 NVL", 3900), ("H100", 3350),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("GH200", 4900), ("H200", 4800), ("B200", 8000), ("H20", 4000),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
    ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600), ("A10", 600),
    ("RTX 4090", 1008), ("RTX 3090", 936), ("V100", 900), ("T4", 320),
]

SWEEPS = {
    "full": dict(T=[1, 64, 512, 4096], d=[576, 2304, 4096], width=[16384, 65536, 131072], E=[1, 8, 64]),
    "quick": dict(T=[1, 64, 512], d=[2304], width=[16384, 131072], E=[1, 64]),
}
MAX_SLOTS = 8  # distinct steering configurations in the batch
TOPK_K, FULL_E = 64, 8  # the full-width sweep: a TopK SAE with k=64, 8 edits on it

records: list[dict] = []  # every measurement, for the JSON


def peak_gbps(name: str) -> float | None:
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


# ---------------------------------------------------------------------------------------------
# inputs: a random packed dictionary (the layout of table.LayerDictionary) and a steered batch
# ---------------------------------------------------------------------------------------------

_dictionaries: dict = {}


def dictionary(width: int, d: int, weights: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(enc, dec, gate_bias, threshold, mag_scale, mag_bias) for `width` features plus the null row.
    A ReLU-style packing (threshold 0, scale 1): the kernels' cost does not depend on the architecture."""
    key = (width, d, weights)
    if key not in _dictionaries:
        _dictionaries.clear()  # one at a time: a 131k x 4096 pair is 4.3 GB
        enc = torch.randn(width + 1, d, device="cuda") / d ** 0.5
        dec = torch.nn.functional.normalize(torch.randn(width + 1, d, device="cuda"), dim=1)
        enc[width], dec[width] = 0, 0
        bias = torch.randn(width + 1, device="cuda") * 0.1
        bias[width] = 0
        ones = torch.ones(width + 1, device="cuda")
        ones[width] = 0
        _dictionaries[key] = (enc.to(weights), dec.to(weights), bias, torch.zeros(width + 1, device="cuda"), ones,
                              bias.clone())
    return _dictionaries[key]


def batch(T: int, d: int, width: int, E: int, dtype: torch.dtype, weights: torch.dtype,
          features: tuple[int, int] | None = None):
    """The positional arguments of sparse_steer: min(T, MAX_SLOTS) slots of E live edits each, every token
    steered (round-robin over the slots), no `when` gates. -> (args, number of distinct edited features)."""
    g = torch.Generator(device="cuda").manual_seed(T * 7 + E)
    S = min(T, MAX_SLOTS) + 1
    lo, hi = features or (0, width)
    edit_feature = torch.randint(lo, hi, (S, E), device="cuda", generator=g)
    edit_feature[0] = width  # slot 0: null
    gate_feature = torch.full((S, E), width, device="cuda")
    edit_mul = torch.rand(S, E, device="cuda", generator=g) - 1.0
    edit_add = torch.randn(S, E, device="cuda", generator=g)
    gate_above = torch.full((S, E), float("-inf"), device="cuda")
    vector = torch.randn(S, d, device="cuda", generator=g)
    slot_edits = torch.full((S,), E, dtype=torch.int32, device="cuda")
    slot_edits[0] = -1
    slot = torch.arange(T, device="cuda") % (S - 1) + 1
    tokens = torch.stack([slot, torch.zeros_like(slot), torch.full_like(slot, 2 ** 31 - 1)], 1).to(torch.int32)
    positions = torch.zeros(T, dtype=torch.int64, device="cuda")
    hidden = torch.randn(T, d, device="cuda", generator=g).to(dtype)
    residual = torch.randn(T, d, device="cuda", generator=g).to(dtype)
    args = (hidden, residual, positions, tokens, slot_edits, edit_feature, edit_mul, edit_add, gate_feature,
            gate_above, vector, *dictionary(width, d, weights))
    return args, int(torch.unique(edit_feature[1:]).numel())  # host sync at setup only


def sparse_bytes(T: int, d: int, E: int, n_distinct: int, elt: int, welt: int) -> int:
    S = min(T, MAX_SLOTS)
    return (3 * T * d * elt  # hidden and residual read, out written
            + 20 * T  # tokens, positions
            + S * (E * (8 + 4 + 4 + 8 + 4) + 4 * d + 4)  # the used slots' edit tables, vector rows, edit counts
            + n_distinct * (2 * welt * d + 4 * 4))  # enc and dec rows + 4 activation parameters


def timed(fn) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) in ms."""
    return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))


# ---------------------------------------------------------------------------------------------
# the sweeps
# ---------------------------------------------------------------------------------------------

def bench_sparse(T, d, width, E, provider, dtype, weights, peak):
    args, n_distinct = batch(T, d, width, E, dtype, weights)
    fn = {"triton": sparse_steer_triton, "torch": sparse_steer_distinct}[provider]
    if provider == "triton" and T * E * d <= 2 ** 24:  # a GPU-side check (the reference gathers [T, 2E, d])
        torch.testing.assert_close(fn(*args), sparse_steer_reference(*args), rtol=2 ** -6, atol=1e-2)
    ms, lo_ms, hi_ms = timed(lambda: fn(*args))
    nbytes = sparse_bytes(T, d, E, n_distinct, args[0].element_size(), args[11].element_size())
    gbps = nbytes / ms * 1e-6  # bytes / ms -> GB/s
    records.append(dict(sweep="sparse", provider=provider, T=T, d=d, width=width, E=E, ms=ms, ms_p20=lo_ms,
                        ms_p80=hi_ms, bytes=nbytes, gbps=gbps, peak_ratio=gbps / peak if peak else None))


def bench_full(T, d, width, provider, dtype, weights, peak):
    args, _ = batch(T, d, width, FULL_E, dtype, weights, features=(0, width))
    saes = torch.tensor([[0, width, TOPK_K]], dtype=torch.int32, device="cuda")
    hidden, residual, enc, params = args[0], args[1], args[11], args[13:]
    if provider == "triton":
        def fn():
            acts = encode_triton(hidden, residual, enc, *params, 0, width)
            return sparse_steer_triton(*args, (acts, saes, 0))
    elif provider == "torch":
        def fn():
            acts = encode_reference(hidden, residual, enc, *params, 0, width)
            return sparse_steer_distinct(*args, (acts, saes, 0))
    else:  # the dense encode as torch.mm in bf16: the bar the Triton encode should meet
        x, w = hidden.to(torch.bfloat16), enc[:width].to(torch.bfloat16)
        fn = lambda: x @ w.T  # noqa: E731
    ms, lo_ms, hi_ms = timed(fn)
    elt = args[0].element_size()
    nbytes = 2 * T * d * elt + width * d * enc.element_size() + T * width * 4 * 2 + T * d * elt  # x, enc, acts, out
    records.append(dict(sweep="full", provider=provider, T=T, d=d, width=width, k=TOPK_K, E=FULL_E, ms=ms,
                        ms_p20=lo_ms, ms_p80=hi_ms, bytes=nbytes, gbps=nbytes / ms * 1e-6,
                        tflops=2 * T * d * width / ms * 1e-9,  # flop / ms -> TFLOP/s
                        peak_ratio=nbytes / ms * 1e-6 / peak if peak else None))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small sweep (T 1..512, d 2304, two widths)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="hidden-state dtype")
    parser.add_argument("--weights", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="the dtype the table holds the SAE weights in (the serving dtype, or fp32)")
    parser.add_argument("--peak-gbps", type=float, help="peak DRAM bandwidth when the GPU is not in the table")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"output folder (default {RESULTS})")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU: these are GPU kernels and CPU timings would say nothing "
              "about them. Run it on a machine with CUDA (the tests run anywhere: pytest tests/kernels).",
              file=sys.stderr)
        return 2
    if triton is None:
        print("benchmarks/kernels.py needs triton (pip install triton).", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name()
    peak = opts.peak_gbps or peak_gbps(device)
    dtype, weights = getattr(torch, opts.dtype), getattr(torch, opts.weights)
    sweep = SWEEPS["quick" if opts.quick else "full"]
    print(f"{device}: peak {peak or 'unknown (pass --peak-gbps)'} GB/s, hidden {opts.dtype}")
    print(f"{'sweep':6} {'provider':8} {'T':>5} {'d':>5} {'width':>7} {'E':>3} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8}")
    points = [(bench_sparse, dict(T=T, d=d, width=w, E=E)) for d in sweep["d"] for w in sweep["width"]
              for E in sweep["E"] for T in sweep["T"]]
    points += [(bench_full, dict(T=T, d=d, width=w)) for d in sweep["d"] for w in sweep["width"] for T in sweep["T"]]
    for bench, point in points:
        for provider in ("triton", "torch") + (("mm",) if bench is bench_full else ()):
            bench(**point, provider=provider, dtype=dtype, weights=weights, peak=peak)
            r = records[-1]
            print(f"{r['sweep']:6} {provider:8} {r['T']:>5} {r['d']:>5} {r['width']:>7} {r['E']:>3} {r['ms']:>9.4f} "
                  f"{r['gbps']:>8.1f} {r.get('tflops', float('nan')):>8.2f}", flush=True)

    opts.results.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{datetime.date.today().isoformat()}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-')}"
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=device, peak_gbps=peak,
                dtype=opts.dtype, weights=opts.weights, quick=opts.quick, torch=torch.__version__,
                triton=triton.__version__, slots=MAX_SLOTS, full_sweep=dict(k=TOPK_K, E=FULL_E))
    (opts.results / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=records), indent=1))
    print(f"wrote {opts.results / stem}.json")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, also on machines without a display
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (the JSON holds every number)")
        return 0
    plot(plt, "sparse", "E", sweep["E"], "GB/s", peak, device, opts.results / f"{stem}-sparse.png")
    plot(plt, "full", None, [None], "tflops", None, device, opts.results / f"{stem}-full.png")
    print(f"wrote {opts.results / stem}-sparse.png, -full.png")
    return 0


def plot(plt, sweep: str, row_key: str | None, row_vals: list, metric: str, peak, device: str, path: Path) -> None:
    """A grid of panels (rows: row_key values, columns: d), y vs T, one line per provider and width."""
    ds = sorted({r["d"] for r in records if r["sweep"] == sweep})
    fig, axes = plt.subplots(len(row_vals), len(ds), figsize=(4.5 * len(ds), 3.5 * len(row_vals)), squeeze=False)
    y = "gbps" if metric == "GB/s" else metric
    for i, rv in enumerate(row_vals):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            rows = [r for r in records if r["sweep"] == sweep and r["d"] == d and (row_key is None or r[row_key] == rv)]
            for provider, style in (("triton", "-"), ("torch", "--"), ("mm", ":")):  # style: provider; colour: width
                for c, width in enumerate(sorted({r["width"] for r in rows})):
                    pts = sorted((r["T"], r[y]) for r in rows if r["provider"] == provider and r["width"] == width)
                    if pts:
                        ax.plot(*zip(*pts), style, color=f"C{c}", marker="o", label=f"{provider}, width {width}")
            if peak:
                ax.axhline(peak, color="grey", lw=0.8, ls=":", label="peak bandwidth")
            Ts = sorted({r["T"] for r in rows})
            ax.set(xscale="log", xticks=Ts, xticklabels=[str(t) for t in Ts], xlabel="tokens T",
                   ylabel=metric.replace("tflops", "TFLOP/s"),
                   title=f"d={d}" + (f", {rv} edits/token" if row_key else ""))
            ax.minorticks_off()
            ax.legend(fontsize=7)
    fig.suptitle(f"{sweep}_steer on {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
