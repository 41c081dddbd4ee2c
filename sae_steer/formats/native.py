"""sae-steer's own safetensors formats (no pickle anywhere).

SAE: one file (or a directory holding `sae.safetensors`) with tensors
    W_enc [d_model, d_sae], b_enc [d_sae], W_dec [d_sae, d_model], b_dec [d_model],
    threshold [d_sae] (jumprelu), b_mag / r_mag [d_sae] (gated; b_enc is then b_gate),
    W_lookup [vocab, d_model] (tokenized SAEs)
and string metadata: sae_steer.format=sae, architecture, layer, k (topk), apply_b_dec_to_input,
normalize_activations (only when not "none"). Orientation and units as in sae.py.

Vector: one file with a tensor `layer.<L>` [d_model] per layer it applies at,
metadata sae_steer.format=vector.

The read_* functions look at the header only, so the API process can validate requests
without loading weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sae_steer.formats._common import (build_sae, facts, open_safetensors, require_file, resolve_layer,
                                       safetensors_tensors)
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeFacts

_SAE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "b_mag", "r_mag", "W_lookup")


def _sae_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "sae.safetensors" if path.is_dir() else path


def _open(path: Path, kind: str):
    return open_safetensors(require_file(path, f"{kind} file"))


def _metadata(f, path: Path, kind: str) -> dict:
    meta = f.metadata() or {}
    if meta.get("sae_steer.format") != kind:
        raise ValueError(f"{str(path)!r} is not a sae-steer {kind} file (metadata sae_steer.format="
                         f"{meta.get('sae_steer.format')!r})")
    return meta


def save_sae(sae: SparseAutoencoder, path: str | Path) -> Path:
    path = _sae_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: getattr(sae, n).contiguous() for n in _SAE_TENSORS if getattr(sae, n) is not None}
    meta = {"sae_steer.format": "sae", "architecture": sae.architecture, "layer": str(sae.layer),
            "apply_b_dec_to_input": str(sae.apply_b_dec_to_input).lower()}
    if sae.k is not None:
        meta["k"] = str(sae.k)
    if sae.normalize_activations != "none":
        meta["normalize_activations"] = sae.normalize_activations
    save_file(tensors, str(path), metadata=meta)
    return path


def _layer(meta: dict, path: Path, layer: int | None) -> int:
    try:
        return resolve_layer(path, int(meta["layer"]), layer)
    except (KeyError, ValueError) as e:
        raise ValueError(f"SAE file {str(path)!r}: bad or missing 'layer' metadata ({e})") from None


def read_sae_facts(path: str | Path, layer: int | None = None) -> SaeFacts:
    path = _sae_file(path)
    with _open(path, "sae") as f:
        meta = _metadata(f, path, "sae")
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return facts(shapes, path, layer=_layer(meta, path, layer), architecture=meta.get("architecture", "?"),
                 normalize=meta.get("normalize_activations", "none"))


def load_sae(path: str | Path, layer: int | None = None) -> SparseAutoencoder:
    path = _sae_file(path)
    with _open(path, "sae") as f:
        meta = _metadata(f, path, "sae")
    tensors = safetensors_tensors(path, _SAE_TENSORS)
    try:
        k = int(meta["k"]) if "k" in meta else None
    except ValueError:
        raise ValueError(f"SAE file {str(path)!r}: bad 'k' metadata {meta['k']!r}") from None
    return build_sae(path, **tensors, layer=_layer(meta, path, layer), architecture=meta.get("architecture", "?"),
                     k=k, apply_b_dec_to_input=meta.get("apply_b_dec_to_input", "true") == "true",
                     normalize_activations=meta.get("normalize_activations", "none"))


def save_vector(layers: dict[int, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{int(L)}": v.detach().float().contiguous() for L, v in layers.items()}
    save_file(tensors, str(path), metadata={**(metadata or {}), "sae_steer.format": "vector"})
    return path


def _layer_of(key: str, path: Path) -> int:
    if not (key.startswith("layer.") and key[6:].isdigit()):
        raise ValueError(f"vector file {str(path)!r}: tensor {key!r} is not named layer.<L>")
    return int(key[6:])


def read_vector_layers(path: str | Path) -> dict[int, int]:
    """{layer: length} from the header."""
    path = Path(path)
    with _open(path, "vector") as f:
        _metadata(f, path, "vector")
        shapes = {_layer_of(k, path): f.get_slice(k).get_shape() for k in f.keys()}
    for layer, shape in shapes.items():
        if len(shape) != 1:
            raise ValueError(f"vector file {str(path)!r}: layer.{layer} has shape {list(shape)}, expected [d_model]")
    return {layer: shape[0] for layer, shape in shapes.items()}


def load_vector(path: str | Path) -> dict[int, torch.Tensor]:
    path = Path(path)
    read_vector_layers(path)  # names and shapes checked before any data is read
    return {_layer_of(k, path): v for k, v in safetensors_tensors(path).items()}
