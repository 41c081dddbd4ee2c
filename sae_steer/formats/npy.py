"""Steering vectors as numpy `.npy` arrays (read with allow_pickle=False, memory-mapped).

  [d_model]             one vector: its layer must be given in the settings,
                        {"path": "calm.npy", "layer": 6}
  [n_layers, d_model]   row L applies at layer L; all-zero rows are skipped, so layers the
                        array does not steer cost nothing (and are not made steerable)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sae_steer.formats._common import bad, require_file


def _rows(path: Path, layer: int | None) -> dict[int, np.ndarray]:
    require_file(path, "vector file")
    try:
        a = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise bad(path, f"is not a readable .npy array (object arrays are refused): {e}") from None
    if not np.issubdtype(a.dtype, np.floating):
        raise bad(path, f"has dtype {a.dtype}, expected a float array")
    if a.ndim == 1:
        if layer is None:
            raise bad(path, 'holds one vector [d_model] and no layer: give it in the settings, '
                            '{"path": ..., "layer": L}')
        return {layer: a}
    if a.ndim != 2:
        raise bad(path, f"has shape {list(a.shape)}, expected [d_model] or [n_layers, d_model]")
    if layer is not None:
        raise bad(path, f"holds one row per layer ({list(a.shape)}); a 'layer' setting applies only to a single "
                        f"[d_model] vector")
    rows = {L: a[L] for L in range(a.shape[0]) if np.any(a[L])}
    if not rows:
        raise bad(path, "every row is zero: it steers nothing")
    return rows


def read_vector_layers(path: Path, layer: int | None = None) -> dict[int, int]:
    return {L: int(v.shape[0]) for L, v in _rows(path, layer).items()}


def load_vector(path: Path, layer: int | None = None) -> dict[int, torch.Tensor]:
    return {L: torch.tensor(np.asarray(v, dtype=np.float32)) for L, v in _rows(path, layer).items()}
