"""Shared test artifacts: a tiny random Llama built on the spot, SAEs of all four architectures
at several layers, and steering vectors. Nothing is downloaded."""
from __future__ import annotations

import os

# In-process engines start in seconds; a multiprocess test opts back in explicitly.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sae_steer.formats import save_sae, save_vector
from sae_steer.tiny_model import build_tiny_llama, random_sae

D_MODEL, N_LAYERS = 128, 4


@dataclass
class Artifacts:
    model: Path
    saes: dict[str, Path]
    vectors: dict[str, Path]

    @property
    def settings(self) -> dict:
        return {"saes": {n: str(p) for n, p in self.saes.items()},
                "vectors": {n: str(p) for n, p in self.vectors.items()}, "layers": [2]}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    root = tmp_path_factory.mktemp("artifacts")
    model = build_tiny_llama(root / "tiny-llama", hidden=D_MODEL, layers=N_LAYERS)
    specs = {"relu-l1": ("relu", 1, None), "gated-l1": ("gated", 1, None), "jump-l2": ("jumprelu", 2, None),
             "topk-l3": ("topk", 3, 16)}
    saes = {}
    for i, (name, (arch, layer, k)) in enumerate(specs.items()):
        saes[name] = save_sae(random_sae(D_MODEL, 256, layer, arch, k=k, seed=i), root / "saes" / name)
    g = torch.Generator().manual_seed(7)
    vectors = {
        "calm": save_vector({1: torch.randn(D_MODEL, generator=g), 2: torch.randn(D_MODEL, generator=g)},
                            root / "vectors" / "calm.safetensors"),
        "early": save_vector({0: torch.randn(D_MODEL, generator=g)}, root / "vectors" / "early.safetensors"),
    }
    return Artifacts(model=model, saes=saes, vectors=vectors)
