"""The two kernels as registered torch ops, `sae_steer_kernels::steer` and `sae_steer_kernels::encode_rows`:
Triton on CUDA, the torch paths on CPU, a shape-only (fake) version for tracing.

Why ops: the table's graph-safe path must stay one opaque call per kernel under torch.compile
(tests/unit/test_table_graph_safe.py compiles it with fullgraph=True on CPU), and the CPU paths read
values (the live edit count, the token list's length) that a trace may not see. As ops they are, on every
device, what they are on CUDA: one call per kernel, which the profiler counts as one op
(tests/unit/test_op_counts.py, benchmarks/op_overhead.py --cpu).
"""
from __future__ import annotations

import torch

from .full_steer import HAS_TRITON, encode_rows_torch
from .sparse_steer import sparse_steer_distinct

_LIB = torch.library.Library("sae_steer_kernels", "DEF")
_LIB.define("steer(Tensor hidden, Tensor residual, Tensor positions, Tensor tokens, Tensor slot_edits, "
            "Tensor edit_feature, Tensor edit_mul, Tensor edit_add, Tensor gate_feature, Tensor gate_above, "
            "Tensor vector, Tensor enc, Tensor dec, Tensor gate_bias, Tensor threshold, Tensor mag_scale, "
            "Tensor mag_bias, Tensor? topk_acts, Tensor? topk_saes, int topk_lo) -> Tensor")
_LIB.define("encode_rows(Tensor hidden, Tensor residual, Tensor rows, Tensor count, Tensor enc, Tensor gate_bias, "
            "Tensor threshold, Tensor mag_scale, Tensor mag_bias, int lo, int hi) -> Tensor")


def _steer_cpu(hidden, residual, positions, tokens, slot_edits, *tables_and_dictionary):
    *rest, topk_acts, topk_saes, topk_lo = tables_and_dictionary
    topk = None if topk_acts is None else (topk_acts, topk_saes, topk_lo)
    return sparse_steer_distinct(hidden, residual, positions, tokens, slot_edits, *rest, topk)


def _encode_rows_cpu(hidden, residual, rows, count, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi):
    return encode_rows_torch(hidden, residual, rows, count, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi)


def _steer_shape(hidden, *_):
    return torch.empty_like(hidden)


def _encode_rows_shape(hidden, residual, rows, count, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi):
    return hidden.new_empty(hidden.shape[0], hi - lo, dtype=torch.float32)


_LIB.impl("steer", _steer_cpu, "CPU")
_LIB.impl("encode_rows", _encode_rows_cpu, "CPU")
torch.library.register_fake("sae_steer_kernels::steer", lib=_LIB)(_steer_shape)
torch.library.register_fake("sae_steer_kernels::encode_rows", lib=_LIB)(_encode_rows_shape)

if HAS_TRITON:
    from .full_steer import encode_triton
    from .sparse_steer import sparse_steer_triton

    def _steer_cuda(hidden, residual, positions, tokens, slot_edits, *tables_and_dictionary):
        *rest, topk_acts, topk_saes, topk_lo = tables_and_dictionary
        topk = None if topk_acts is None else (topk_acts, topk_saes, topk_lo)
        return sparse_steer_triton(hidden, residual, positions, tokens, slot_edits, *rest, topk)

    def _encode_rows_cuda(hidden, residual, rows, count, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi):
        return encode_triton(hidden, residual, enc, gate_bias, threshold, mag_scale, mag_bias, lo, hi, rows, count)

    _LIB.impl("steer", _steer_cuda, "CUDA")
    _LIB.impl("encode_rows", _encode_rows_cuda, "CUDA")

steer = torch.ops.sae_steer_kernels.steer
encode_rows = torch.ops.sae_steer_kernels.encode_rows
