"""Gemma Scope `params.npz` (google/gemma-scope-*-res: <release>/layer_L/width_W/average_l0_N/params.npz).

Arrays W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc [d_sae], b_dec [d_model],
threshold [d_sae]: a JumpReLU SAE whose encoder does NOT subtract b_dec
(f = JumpReLU(x @ W_enc + b_enc), x_hat = f @ W_dec + b_dec; the Gemma Scope tutorial, and
SAELens `get_gemma_2_config_from_hf`: apply_b_dec_to_input False, hook blocks.L.hook_resid_post).
Older copies spell the weights w_enc/w_dec (SAELens maps "w_" -> "W_"); both are accepted.

The layer comes from the `layer_L` path component or from the settings. Embedding SAEs and the
MLP/attention releases (`-mlp`, `-att` in the release folder name) read other sites: refused.
Read with numpy's allow_pickle=False, so an object array is refused, never unpickled.
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from sae_steer.formats._common import bad, build_sae, facts, require_file, resolve_layer
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeFacts

PARAMS = "params.npz"
_NAMES = {"w_enc": "W_enc", "w_dec": "W_dec"}
_NEEDED = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def is_gemmascope(path: Path) -> bool:
    return path.suffix == ".npz" or (path.is_dir() and (path / PARAMS).is_file())


def _file(path: Path) -> Path:
    return require_file(path / PARAMS if path.is_dir() else path, "Gemma Scope file")


def _layer(file: Path, layer: int | None) -> int:
    parts = file.resolve().parts[:-1]
    for part in parts:
        if part == "embedding" or re.search(r"-(att|mlp)(-canonical)?$", part):
            raise bad(file, f"path component {part!r} marks an embedding / attention / MLP SAE; "
                            f"only residual-stream (-res) SAEs can steer")
    found = [int(m.group(1)) for part in parts if (m := re.fullmatch(r"layer_(\d+)", part))]
    return resolve_layer(file, found[-1] if found else None, layer)


def _headers(file: Path) -> dict[str, tuple[int, ...]]:
    """{array name: shape} from each member's .npy header; object dtypes refused before any data is read."""
    headers = {}
    try:
        with zipfile.ZipFile(file) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                headers[_NAMES.get(info.filename[:-4], info.filename[:-4])] = (shape, dtype)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise bad(file, f"is not a readable .npz archive: {e}") from None
    pickled = [name for name, (_, dtype) in headers.items() if dtype.hasobject]
    if pickled:
        raise bad(file, f"array(s) {pickled} have an object dtype (pickled Python objects): refused")
    shapes = {name: shape for name, (shape, _) in headers.items()}
    missing = [n for n in _NEEDED if n not in shapes]
    if missing:
        raise bad(file, f"misses array(s) {missing} of a Gemma Scope JumpReLU SAE (found {sorted(shapes)})")
    return shapes


def read_sae_facts(path: Path, layer: int | None = None) -> SaeFacts:
    file = _file(path)
    return facts(_headers(file), file, layer=_layer(file, layer), architecture="jumprelu")


def load_sae(path: Path, layer: int | None = None) -> SparseAutoencoder:
    file = _file(path)
    layer = _layer(file, layer)
    _headers(file)
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = {_NAMES.get(k, k): torch.from_numpy(np.asarray(data[k], dtype=np.float32)) for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise bad(file, f"could not read its arrays: {e}") from None
    return build_sae(file, **{n: arrays[n] for n in _NEEDED}, layer=layer, architecture="jumprelu",
                     apply_b_dec_to_input=False)
