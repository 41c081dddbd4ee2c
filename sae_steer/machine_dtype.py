"""The dtype a model computes in on this machine, when the command line does not say (`--dtype`).

bfloat16 only where it is computed natively: on a GPU, or on a CPU whose /proc/cpuinfo flags include
`avx512_bf16` (AVX-512 BF16) or `amx_bf16` (AMX). Elsewhere float32: without those instructions vLLM's CPU
build logs "Failed to create oneDNN linear, fallback to torch linear" and a bf16 matmul runs many times
slower than a float32 one (issue 17: 1.3 against 79 GFLOP/s per core on an AVX2-only EPYC; the same engine
3.3x faster in float32).

    default_dtype(cpu_flags=None, cuda=None) -> (dtype, reason)   the rule, pure (tests pass the flags)
    pick_dtype(override=None) -> dtype                              what the commands use; says once why
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"

_said: set[str] = set()


def read_cpu_flags(path: str = CPUINFO) -> set[str] | None:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo); None where there is no such file."""
    try:
        with open(path, encoding="ascii", errors="ignore") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return set(value.split())
    except OSError:
        return None
    return set()


def default_dtype(cpu_flags: Iterable[str] | None = None, cuda: bool | None = None) -> tuple[str, str]:
    """-> ("bfloat16" | "float32", the reason in words). cpu_flags and cuda default to this machine's."""
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    if cuda:
        return "bfloat16", "a GPU computes bfloat16 natively"
    flags = read_cpu_flags() if cpu_flags is None else set(cpu_flags)
    if flags is None:
        return "float32", f"no {CPUINFO} to read the CPU's bfloat16 support from"
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return "bfloat16", f"the CPU computes bfloat16 natively ({', '.join(native)})"
    return "float32", f"the CPU has no native bfloat16 (neither {' nor '.join(BF16_CPU_FLAGS)} in its flags)"


def pick_dtype(override: str | None = None) -> str:
    """The dtype to serve/run in: `override` (a --dtype given by the user) when set, else default_dtype().
    The choice and its reason go to stderr once per process."""
    dtype, reason = (override, "--dtype") if override else default_dtype()
    line = f"[sae-steer] dtype {dtype}: {reason}"
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)
    return dtype
