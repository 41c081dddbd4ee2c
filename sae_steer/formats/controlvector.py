"""llama.cpp / repeng control vectors: GGUF files with one F32 tensor `direction.<il>` [n_embd] per
layer and metadata general.architecture=controlvector, controlvector.model_hint,
controlvector.layer_count.

Layer mapping, checked against the sources: llama.cpp's common_control_vector_load_one
(common/common.cpp) puts direction.<il> into tensors[il] (it rejects il = 0), and every model graph
adds tensors[il] to the block output right after block il's last residual add
(`cur = build_cvec(cur, il); cb(cur, "l_out", il)`, il the 0-based block index); repeng
(vgel/repeng, extract.py / control.py) names directions by the 0-based index into
model.model.layers and adds them to that layer's output, export_gguf writing them unchanged.
So direction.<il> is our layer il (the residual stream after decoder layer il), no shift.
direction.0 (which llama.cpp refuses but repeng can write) is the output of layer 0.
Several files and duplicate names are summed by llama.cpp; here one file is one vector.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from sae_steer.formats._common import bad, require_file

_DIRECTION = re.compile(r"direction\.(\d+)")


def _directions(path: Path) -> dict[int, np.ndarray]:
    """{layer: array [n_embd]} from the file's memory map (reads the header, not the data)."""
    from gguf import GGMLQuantizationType, GGUFReader

    require_file(path, "control vector")
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, struct.error, IndexError, KeyError, OverflowError) as e:
        raise bad(path, f"is not a readable GGUF file: {e}") from None
    arch = reader.get_field("general.architecture")
    if arch is not None and arch.contents() != "controlvector":
        raise bad(path, f"is a GGUF {arch.contents()!r} file, not a control vector (general.architecture)")
    out = {}
    for t in reader.tensors:
        m = _DIRECTION.fullmatch(t.name)
        if m is None:
            raise bad(path, f"tensor {t.name!r} is not named direction.<layer>")
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            raise bad(path, f"tensor {t.name!r} has type {t.tensor_type.name}; only F32/F16 directions are supported")
        if len(t.shape) != 1:
            raise bad(path, f"tensor {t.name!r} has shape {list(t.shape)}, expected [n_embd]")
        out[int(m.group(1))] = t.data
    if not out:
        raise bad(path, "holds no direction.<layer> tensor")
    return out


def read_vector_layers(path: Path) -> dict[int, int]:
    return {layer: int(a.shape[0]) for layer, a in _directions(path).items()}


def load_vector(path: Path) -> dict[int, torch.Tensor]:
    return {layer: torch.tensor(np.asarray(a, dtype=np.float32)) for layer, a in _directions(path).items()}
