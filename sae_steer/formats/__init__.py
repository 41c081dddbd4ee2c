"""File formats -> SparseAutoencoder / steering vectors. One module per format, one entry point each.

SAEs (`load_sae` / `read_sae_facts`, format detected from the path):
    native               *.safetensors with sae_steer metadata, or a folder holding sae.safetensors
    saelens              folder with cfg.json + sae_weights.safetensors
    sparsify             folder with cfg.json + sae.safetensors (a hookpoint folder, e.g. layers.6)
    gemmascope           params.npz, or a folder holding it
    dictionary_learning  folder with ae.pt + config.json (or the ae.pt itself)
Vectors (`load_vector` / `read_vector_layers`): *.gguf (llama.cpp / repeng control vectors),
*.npy, anything else our safetensors vector format.

`layer` is the settings' explicit layer: required where a file does not say it (a renamed sparsify
folder, a Gemma Scope file outside its layer_L folder, a single .npy vector), checked against the
file where it does. The read_* functions stay cheap (headers, configs, memory maps) so the API
process can validate requests without loading weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sae_steer.formats import controlvector, dictionary_learning, gemmascope, native, npy, saelens, sparsify
from sae_steer.formats._common import bad
from sae_steer.formats.native import save_sae, save_vector
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeFacts

__all__ = ["load_sae", "load_vector", "read_sae_facts", "read_vector_layers", "save_sae", "save_vector",
           "sae_format"]


def _is_native(file: Path) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get("sae_steer.format") == "sae"
    except Exception:  # unreadable: let the loader that claims the path report it
        return False


def sae_format(path: str | Path) -> tuple[object, Path]:
    """(format module, the path it takes) for an SAE file or folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix == ".npz":
            return gemmascope, path
        if dictionary_learning.is_dictionary_learning(path):
            return dictionary_learning, path.parent
        if path.suffix == ".safetensors" and not _is_native(path) and \
                (saelens.is_saelens(path.parent) or sparsify.is_sparsify(path.parent)):
            return sae_format(path.parent)
        return native, path
    if (path / "sae.safetensors").is_file() and _is_native(path / "sae.safetensors"):
        return native, path
    for module, claims in ((saelens, saelens.is_saelens), (sparsify, sparsify.is_sparsify),
                           (gemmascope, gemmascope.is_gemmascope),
                           (dictionary_learning, dictionary_learning.is_dictionary_learning)):
        if claims(path):
            return module, path
    raise bad(path, "is not an SAE folder this server reads: expected sae.safetensors (sae-steer), cfg.json + "
                    "sae_weights.safetensors (SAELens), cfg.json + sae.safetensors (sparsify), params.npz "
                    "(Gemma Scope) or ae.pt + config.json (dictionary_learning)")


def read_sae_facts(path: str | Path, layer: int | None = None) -> SaeFacts:
    module, where = sae_format(path)
    return module.read_sae_facts(where, layer)


def load_sae(path: str | Path, layer: int | None = None) -> SparseAutoencoder:
    module, where = sae_format(path)
    return module.load_sae(where, layer)


def _vector_format(path: Path, layer: int | None):
    if path.suffix == ".gguf":
        module = controlvector
    elif path.suffix == ".npy":
        return npy, (path, layer)
    else:
        module = native
    if layer is not None:
        raise bad(path, "has its own layers; a 'layer' setting applies only to a single [d_model] .npy vector")
    return module, (path,)


def read_vector_layers(path: str | Path, layer: int | None = None) -> dict[int, int]:
    """{layer: length} of a vector file, cheaply."""
    module, args = _vector_format(Path(path), layer)
    return module.read_vector_layers(*args)


def load_vector(path: str | Path, layer: int | None = None) -> dict[int, torch.Tensor]:
    """{layer: float32 vector [d_model]}; the vector applies at each of its layers."""
    path = Path(path)
    module, args = _vector_format(path, layer)
    vectors = module.load_vector(*args)
    for L, v in vectors.items():
        if not torch.isfinite(v).all():
            raise bad(path, f"the vector at layer {L} holds NaN or inf values")
    return vectors
