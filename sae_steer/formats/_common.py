"""What every SAE/vector format shares: safe readers, layer resolution, error wrapping.

Every error a file can cause (truncated, wrong shapes, a pickle payload, non-finite weights)
becomes a ValueError that names the file, so a bad file fails startup with a message
instead of a traceback from deep inside a parser.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeFacts


def bad(path: Path, message: str) -> ValueError:
    return ValueError(f"{str(path)!r}: {message}")


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    return path


def read_json(path: Path) -> dict:
    require_file(path, "config file")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(path, f"is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad(path, f"must hold a JSON object, got {type(data).__name__}")
    return data


def open_safetensors(path: Path):
    require_file(path, "weights file")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise bad(path, f"is not a readable safetensors file: {e}") from None


def safetensors_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({tensor name: shape}, string metadata) from the header alone."""
    with open_safetensors(path) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, (f.metadata() or {})


def safetensors_tensors(path: Path, names=None) -> dict[str, torch.Tensor]:
    """The named tensors (all by default) as float32."""
    with open_safetensors(path) as f:
        try:
            return {k: f.get_tensor(k).float() for k in (f.keys() if names is None else names) if k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise bad(path, f"could not read its tensors: {e}") from None


_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def layer_of_hook(hook_name, path: Path) -> int:
    """TransformerLens hook -> our layer: resid_post of block L is layer L, resid_pre of L is L-1."""
    m = _HOOK.match(str(hook_name))
    if m is None:
        raise bad(path, f"the SAE reads hook {hook_name!r}; only the residual stream (blocks.L.hook_resid_post / "
                        f"blocks.L.hook_resid_pre) can be steered, not attention/MLP outputs or other sites")
    block = int(m.group(1))
    if m.group(2) == "post":
        return block
    if block == 0:
        raise bad(path, "the SAE reads blocks.0.hook_resid_pre, the embeddings: they are not steerable "
                        "(the first steerable point is the output of layer 0, blocks.0.hook_resid_post)")
    return block - 1


def resolve_layer(path: Path, found: int | None, given: int | None) -> int:
    """The file's layer and the one configured beside it must agree; one of them must exist."""
    if given is not None and found is not None and given != found:
        raise bad(path, f"the file says layer {found}, the settings say layer {given}")
    layer = found if found is not None else given
    if layer is None:
        raise bad(path, 'the file does not say which layer it reads; give it in the settings: '
                        '{"path": ..., "layer": L} (L = 0-based decoder layer whose output it reads)')
    return layer


def build_sae(path: Path, **fields) -> SparseAutoencoder:
    """SparseAutoencoder(**fields) with shape errors and non-finite weights reported against the file."""
    for name, t in fields.items():
        if isinstance(t, torch.Tensor) and not torch.isfinite(t).all():
            raise bad(path, f"tensor {name!r} holds NaN or inf values")
    try:
        return SparseAutoencoder(**fields)
    except (TypeError, ValueError) as e:
        raise bad(path, str(e)) from None


def facts(sae_shapes: dict[str, tuple[int, ...]], path: Path, *, layer: int, architecture: str,
          enc: str = "W_enc", enc_transposed: bool = False, normalize: str = "none") -> SaeFacts:
    """SaeFacts from header shapes: d_model/d_sae from the encoder, n_params from every tensor."""
    if enc not in sae_shapes or len(sae_shapes[enc]) != 2:
        raise bad(path, f"has no 2-D encoder tensor {enc!r} (found {sorted(sae_shapes)})")
    d_model, d_sae = sae_shapes[enc][::-1] if enc_transposed else sae_shapes[enc]
    n_params = sum(int(torch.Size(s).numel()) for s in sae_shapes.values())
    return SaeFacts(d_sae=d_sae, layer=layer, architecture=architecture, d_model=d_model,
                    normalize_activations=normalize, n_params=n_params)
