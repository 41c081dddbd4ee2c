"""Decode throughput with and without steering: a gpt-fast-style loop of a Llama-3.1-8B-shaped model, on a GPU.

    python benchmarks/gpu_decode.py [--results DIR]     (CUDA + triton; no vLLM, no pydantic)
    python benchmarks/gpu_decode.py --smoke             (tiny shapes, eager, any device: checks the loop runs)

vLLM does not fit the lent GPU machine, so this measures what the plugin adds to a decode step in the
setting that matters: the whole step (32 decoder layers, static KV cache, greedy next token) captured in
one CUDA graph and replayed, with random bf16 weights made on the device. The steering op is the
plugin's kernels, called as `SteeringTable.steer` calls them in a graph-safe table (the per-step token map,
the slot tables and the packed dictionary laid out as the table lays them out, SAE weights in bf16),
after the decoder layers where it is attached; the loop without it is the baseline of the same run.

Workloads (tokens/s and the ratio to the baseline at the same batch):

    baseline   no op
    idle       the op at one layer holding a 16k ReLU and a 16k TopK SAE (k=64); nobody steered
    relu       the same layer; every row its own config (4 ReLU edits on its own features + a vector)
    topk       the same layer; every row a TopK edit on its own feature (the SAE encoded for every row)
    every      the op at all 32 layers, every row its own vector at each

at batch 1, 32 and 128, with 256 distinct configurations written in the table (a batch of B rows uses B of
them). Results: benchmarks/results/gpu-decode-<date>-<device>.json ("workloads": name, batch, tok_s, ratio).
Runs in about two minutes on an H100/H200 (most of it capturing graphs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sae_steer.kernels import ops
from sae_steer.kernels.sparse_steer import HAS_TRITON, WINDOW_END

SLOTS, MAX_EDITS, K = 256, 64, 64


@dataclass
class Shape:
    d: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    ffn: int = 14336
    vocab: int = 128256
    width: int = 16384  # SAE features
    context: int = 512  # static KV cache length; decoding starts at position start
    start: int = 256
    steps: int = 64


SMOKE = Shape(d=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256, width=96, context=32, start=8, steps=4)


class Model:
    """Llama blocks (RMSNorm, GQA attention with RoPE over a static cache, SwiGLU), random bf16 weights."""

    def __init__(self, s: Shape, batch: int, device):
        self.s, self.batch = s, batch
        g = torch.Generator(device=device).manual_seed(0)
        w = lambda *shape: (torch.randn(*shape, generator=g, device=device) * shape[-1] ** -0.5).to(torch.bfloat16)  # noqa: E731
        hd = s.d // s.heads
        self.embed = w(s.vocab, s.d)
        self.lm_head = w(s.vocab, s.d)
        self.blocks = [dict(qkv=w((s.heads + 2 * s.kv_heads) * hd, s.d), o=w(s.d, s.d), up=w(2 * s.ffn, s.d),
                            down=w(s.d, s.ffn)) for _ in range(s.layers)]
        self.cache = torch.zeros(s.layers, 2, batch, s.kv_heads, s.context, hd, dtype=torch.bfloat16, device=device)
        freqs = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=device).float() / hd))
        angles = torch.outer(torch.arange(s.context, device=device).float(), freqs)
        self.cos, self.sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=device)  # fixed-address step inputs
        self.pos = torch.full((1,), s.start, dtype=torch.int64, device=device)

    def rope(self, x):
        cos, sin = self.cos[self.pos][:, None, :], self.sin[self.pos][:, None, :]  # [1, 1, hd/2]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    def step(self, steer) -> None:
        """One decode step for the whole batch: next tokens written back into self.tokens, position + 1.
        steer(layer, hidden, residual) -> hidden' runs after the layers it is attached to (None: none)."""
        s, B = self.s, self.batch
        hd = s.d // s.heads
        residual = self.embed[self.tokens]  # [B, d]
        hidden = torch.zeros_like(residual)
        mask = (torch.arange(s.context, device=residual.device) <= self.pos)[None, None, None, :]
        for li, blk in enumerate(self.blocks):
            residual = residual + hidden  # vLLM's deferred residual add
            h = F.rms_norm(residual, (s.d,))
            q, k, v = (h @ blk["qkv"].T).split([s.heads * hd, s.kv_heads * hd, s.kv_heads * hd], -1)
            q = self.rope(q.view(B, s.heads, hd))
            k = self.rope(k.view(B, s.kv_heads, hd))
            self.cache[li, 0].index_copy_(2, self.pos, k[:, :, None])
            self.cache[li, 1].index_copy_(2, self.pos, v.view(B, s.kv_heads, hd)[:, :, None])
            a = F.scaled_dot_product_attention(q[:, :, None], self.cache[li, 0], self.cache[li, 1], attn_mask=mask,
                                               enable_gqa=True)
            h = a.reshape(B, s.d) @ blk["o"].T
            residual = residual + h
            gate, up = (F.rms_norm(residual, (s.d,)) @ blk["up"].T).chunk(2, -1)
            hidden = (F.silu(gate) * up) @ blk["down"].T
            if steer is not None:
                hidden = steer(li, hidden, residual)
        logits = F.rms_norm(residual + hidden, (s.d,)) @ self.lm_head.T
        self.tokens.copy_(logits.argmax(-1))
        self.pos.add_(1)


class SteeringLayers:
    """The graph-safe table's device state for some layers (one packed dictionary each), in its layout:
    the step map (slot, window, TopK token list), slot_edits and edit tables [S, E], vectors [S, d]."""

    def __init__(self, s: Shape, layers: list[int], batch: int, workload: str, device):
        g = torch.Generator(device=device).manual_seed(1)
        d, W = s.d, s.width
        self.layers, self.workload = layers, workload
        has_saes = workload in ("idle", "relu", "topk")
        n = 2 * W if has_saes else 0  # [ReLU | TopK] packed, then the null feature
        self.null = n
        enc = torch.randn(n + 1, d, generator=g, device=device) * d ** -0.5
        dec = F.normalize(torch.randn(n + 1, d, generator=g, device=device), dim=1)
        enc[n], dec[n] = 0, 0
        self.enc, self.dec = enc.to(torch.bfloat16), dec.to(torch.bfloat16)
        bias = torch.randn(n + 1, device=device) * 0.1
        bias[n] = 0
        ones = torch.ones(n + 1, device=device)
        ones[n] = 0
        self.params = (bias, torch.zeros(n + 1, device=device), ones, bias.clone())
        self.topk_lo = W
        self.topk_saes = torch.tensor([[W, 2 * W, K]], dtype=torch.int32, device=device) if has_saes else None
        S = SLOTS + 1
        self.slot_edits = torch.full((S,), -1, dtype=torch.int32, device=device)
        self.edit_feature = torch.full((S, MAX_EDITS), n, dtype=torch.int64, device=device)
        self.gate_feature = torch.full((S, MAX_EDITS), n, dtype=torch.int64, device=device)
        self.edit_mul = torch.zeros(S, MAX_EDITS, device=device)
        self.edit_add = torch.zeros(S, MAX_EDITS, device=device)
        self.gate_above = torch.full((S, MAX_EDITS), float("-inf"), device=device)
        self.vector = torch.zeros(S, d, device=device)
        slots = torch.arange(1, S, device=device)
        if workload == "relu":  # 4 edits on the row's own ReLU features, and a vector
            self.slot_edits[1:] = 4
            self.edit_feature[1:, :4] = (slots[:, None] * 4 + torch.arange(4, device=device)) % W
            self.edit_add[1:, :4] = 1.5
            self.vector[1:] = torch.randn(SLOTS, d, generator=g, device=device) * 0.1
        elif workload == "topk":  # clamp the row's own TopK feature
            self.slot_edits[1:] = 1
            self.edit_feature[1:, 0] = W + slots % W
            self.edit_mul[1:, 0], self.edit_add[1:, 0] = -1.0, 2.0
        elif workload == "every":
            self.slot_edits[1:] = 0
            self.vector[1:] = torch.randn(SLOTS, d, generator=g, device=device) * 0.1
        # the step map: decode, row r (one token) -> slot r + 1, or slot 0 when nobody is steered
        self.step = torch.zeros(1 + batch, 4, dtype=torch.int32, device=device)
        if workload != "idle":
            self.step[1:, 0] = torch.arange(1, batch + 1, dtype=torch.int32)
            self.step[1:, 2] = WINDOW_END
        if workload == "topk":
            self.step[0, 3] = batch
            self.step[1:, 3] = torch.arange(batch, dtype=torch.int32)
        self.positions = torch.full((batch,), s.start, dtype=torch.int64, device=device)

    def __call__(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if layer not in self.layers:
            return hidden
        tokens, tables = self.step[1:], (self.slot_edits, self.edit_feature, self.edit_mul, self.edit_add,
                                         self.gate_feature, self.gate_above, self.vector)
        fused = HAS_TRITON and hidden.is_cuda
        acts = None
        if self.topk_saes is not None:  # a TopK SAE at the layer: the encode runs (and exits when nobody needs it)
            rows, count = self.step[1:, 3], self.step[0, 3]
            if fused:
                from sae_steer.kernels.full_steer import encode_triton
                acts = encode_triton(hidden, residual, self.enc, *self.params, self.topk_lo, self.null, rows, count)
            else:
                acts = ops.encode_rows(hidden, residual, rows, count, self.enc, *self.params, self.topk_lo, self.null)
        if fused:
            from sae_steer.kernels.sparse_steer import sparse_steer_triton
            return sparse_steer_triton(hidden, residual, self.positions, tokens, *tables, self.enc, self.dec,
                                       *self.params, None if acts is None else (acts, self.topk_saes, self.topk_lo))
        return ops.steer(hidden, residual, self.positions, tokens, *tables, self.enc, self.dec, *self.params, acts,
                         self.topk_saes if acts is not None else None, self.topk_lo)


def tokens_per_second(model: Model, steer, s: Shape, graph: bool) -> float:
    """Decode s.steps steps (replays of one captured step on a GPU) from position s.start."""
    model.pos.fill_(s.start)
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture (Triton compiles, cuBLAS picks)
                model.step(steer)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model.step(steer)
        run = g.replay
    else:
        run = lambda: model.step(steer)  # noqa: E731
    rates = []
    for _ in range(3):  # median of 3 timed runs of s.steps steps
        model.pos.fill_(s.start)
        if graph:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(s.steps):
            run()
        if graph:
            torch.cuda.synchronize()
        rates.append(model.batch * s.steps / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no CUDA graph: checks the loop runs")
    parser.add_argument("--batches", default="1,32,128")
    opts = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not (cuda or opts.smoke):
        print("benchmarks/gpu_decode.py needs a CUDA GPU (or --smoke)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    s = SMOKE if opts.smoke else Shape()
    graph = cuda and not opts.smoke
    batches = [2] if opts.smoke else [int(b) for b in opts.batches.split(",")]
    one = [s.layers // 2]
    plans = [("baseline", None), ("idle", one), ("relu", one), ("topk", one), ("every", list(range(s.layers)))]
    name = torch.cuda.get_device_name() if cuda else "cpu"
    results = []
    started = time.perf_counter()
    for batch in batches:
        model = Model(s, batch, device)
        base = None
        for workload, layers in plans:
            steer = None if layers is None else SteeringLayers(s, layers, batch, workload, device)
            if opts.smoke and steer is not None:  # the layout is the table's: steering changes exactly the steered
                h = torch.randn(batch, s.d, device=device, dtype=torch.bfloat16)
                assert torch.equal(steer(layers[0], h, torch.randn_like(h)), h) == (workload == "idle"), workload
            tok_s = tokens_per_second(model, steer, s, graph)
            base = tok_s if workload == "baseline" else base
            results.append(dict(name=workload, batch=batch, layers=len(layers or []), tok_s=tok_s,
                                ratio=tok_s / base))
            print(f"batch {batch:>4} {workload:>9}: {tok_s:>10.1f} tok/s  ratio {tok_s / base:.3f}", flush=True)
            del steer
        del model
        if cuda:
            torch.cuda.empty_cache()
    if opts.smoke:
        assert all(r["tok_s"] > 0 for r in results)
        print(f"smoke run passed in {time.perf_counter() - started:.1f} s (nothing written)")
        return 0
    meta = dict(device=name, date=datetime.datetime.now().isoformat(timespec="seconds"), commit=commit(),
                shape=vars(s), slots=SLOTS, max_edits=MAX_EDITS, k=K, weights="bfloat16",
                seconds=time.perf_counter() - started, torch=torch.__version__)
    opts.results.mkdir(parents=True, exist_ok=True)
    path = opts.results / f"gpu-decode-{datetime.date.today()}-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}.json"
    path.write_text(json.dumps(dict(**meta, workloads=results), indent=1))
    print(f"wrote {path}")
    return 0


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
