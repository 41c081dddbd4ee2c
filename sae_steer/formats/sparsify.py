"""EleutherAI sparsify hookpoint folders: <run>/<hookpoint>/{cfg.json, sae.safetensors}.

Verified against EleutherAI/sparsify @9d3b136: sparsify/sparse_coder.py (`save_to_disk` writes the
module's state dict: encoder.weight [M, D], encoder.bias [M], W_dec [M, D], b_dec [D]; `encode`
subtracts b_dec unless `transcode`, then fused_encoder: relu(x @ encoder.weight.T + bias) and the
top-k of those; `decode` sums W_dec rows, + b_dec), sparsify/config.py (cfg keys d_in, k,
num_latents / expansion_factor, activation, transcode, skip_connection) and sparsify/trainer.py
(hookpoints are module names of model.base_model; by default `<layer list>.<i>`, e.g. `layers.6`
or GPT-2's `h.6`, whose forward output is the residual stream after that layer: our layer i).

TopK over relu(pre) (sparsify) equals relu over the top-k of pre (sae.py): both keep the k largest
pre-activations and zero the negative ones. Refused: transcoders, skip connections, the groupmax
activation, embed_tokens and sub-module hookpoints (attention, MLP).
"""
from __future__ import annotations

import re
from pathlib import Path

from sae_steer.formats._common import (bad, build_sae, facts, read_json, resolve_layer, safetensors_shapes,
                                       safetensors_tensors)
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeFacts

CFG, WEIGHTS = "cfg.json", "sae.safetensors"
_NEEDED = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def is_sparsify(path: Path) -> bool:
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def _plan(path: Path, layer: int | None) -> tuple[int, int]:
    """(layer, k) from the folder name and cfg.json."""
    cfg_path = path / CFG
    cfg = read_json(cfg_path)
    if cfg.get("transcode"):
        raise bad(cfg_path, "is a transcoder (transcode: true); only SAEs can steer")
    if cfg.get("skip_connection"):
        raise bad(cfg_path, "has a skip connection (W_skip); not supported")
    if cfg.get("activation", "topk") != "topk":
        raise bad(cfg_path, f"activation {cfg.get('activation')!r} is not supported (only topk)")
    k = cfg.get("k")
    if not isinstance(k, int) or k <= 0:
        raise bad(cfg_path, f"needs a positive integer k, got {k!r}")
    m = re.fullmatch(r"(?:.*\.)?(?:layers|h)\.(\d+)", path.resolve().name)
    if m is None and layer is None:
        raise bad(path, f"hookpoint folder {path.resolve().name!r} is not a layer output (`layers.N`); "
                        f"embed_tokens and attention/MLP hookpoints cannot steer (give a layer in the settings "
                        f"only if the folder was renamed)")
    return resolve_layer(path, None if m is None else int(m.group(1)), layer), k


def read_sae_facts(path: Path, layer: int | None = None) -> SaeFacts:
    layer, _ = _plan(path, layer)
    shapes, _ = safetensors_shapes(path / WEIGHTS)
    return facts(shapes, path / WEIGHTS, layer=layer, architecture="topk", enc="encoder.weight",
                 enc_transposed=True)


def load_sae(path: Path, layer: int | None = None) -> SparseAutoencoder:
    layer, k = _plan(path, layer)
    weights = path / WEIGHTS
    t = safetensors_tensors(weights)
    missing = [n for n in _NEEDED if n not in t]
    if missing:
        raise bad(weights, f"misses tensor(s) {missing} of a sparsify SAE (found {sorted(t)})")
    if "W_skip" in t:
        raise bad(weights, "has a skip connection (W_skip); not supported")
    if t["encoder.weight"].dim() != 2:
        raise bad(weights, f"encoder.weight has shape {list(t['encoder.weight'].shape)}, expected [M, D]")
    return build_sae(weights, W_enc=t["encoder.weight"].T.contiguous(), b_enc=t["encoder.bias"], W_dec=t["W_dec"],
                     b_dec=t["b_dec"], layer=layer, architecture="topk", k=k, apply_b_dec_to_input=True)
