"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (a `sparsity.safetensors` beside them is
feature-density statistics for training and is not read).

Verified against jbloomAus/SAELens @91ca16c (v6.x): sae_lens/saes/{standard,jumprelu,topk,gated}_sae.py
(encode/decode per architecture), sae_lens/saes/sae.py (`process_sae_in`: normalise, then subtract
b_dec when apply_b_dec_to_input; `fold_activation_norm_scaling_factor`), and
sae_lens/loading/pretrained_sae_loaders.py (`handle_pre_6_0_config` for older configs: top-level
`hook_name`/`hook_point`, `activation_fn_str`, `activation_fn_kwargs.k`, boolean
`normalize_activations`; `read_sae_components_from_disk` for the `scaling_factor` tensor).

Weights are stored as SAELens stores them: W_enc [d_in, d_sae], W_dec [d_sae, d_in] (our orientation),
b_enc/b_dec, `threshold` (jumprelu), `b_gate`/`b_mag`/`r_mag` (gated, no b_enc).

Folded into the weights at load (exact, so the engine needs no extra step):
  expected_average_only_in  x is multiplied by a constant s before encoding and the output divided
                            by it: W_enc *= s, W_dec /= s, b_dec /= s (SAELens does the same fold).
                            s comes from cfg `norm_scaling_factor` or the folder's
                            `activation_scaler.json` ({"scaling_factor": s}); a folder without
                            either is refused, since its output units would be wrong.
  rescale_acts_by_decoder_norm (topk)  pre-activations times |W_dec[i]|, activations divided by it
                            before decoding: b_enc, W_enc columns *= |W_dec[i]|, W_dec rows /= it.
  scaling_factor tensor     (older SAELens, finetuning_scaling_factor) f is multiplied by it before
                            decoding: W_dec rows *= scaling_factor. All ones: ignored.
Kept at run time: constant_norm_rescale (a per-token scale, SparseAutoencoder.normalize_activations).
Refused: layer_norm normalisation, transcoders, hook_z / per-head SAEs, non-residual hooks.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sae_steer.formats._common import (bad, build_sae, facts, layer_of_hook, read_json, resolve_layer,
                                       safetensors_shapes, safetensors_tensors)
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeFacts

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
_ARCHITECTURES = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "gated": "gated"}


def is_saelens(path: Path) -> bool:
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def _plan(path: Path, layer: int | None) -> dict:
    """Everything the config decides, checked before any weight is read."""
    cfg_path = path / CFG
    cfg = read_json(cfg_path)
    meta = cfg.get("metadata") or {}
    if "hook_name_out" in cfg or "hook_name_out" in meta:
        raise bad(cfg_path, "is a transcoder (it reads one site and writes another); only SAEs can steer")
    if cfg.get("hook_head_index", meta.get("hook_head_index")) is not None or \
            cfg.get("reshape_activations", "none") != "none":
        raise bad(cfg_path, "is a per-head / hook_z SAE; only residual-stream SAEs can steer")
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if hook is None:
        raise bad(cfg_path, "names no hook (metadata.hook_name or hook_name)")

    arch = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch == "standard" and activation == "topk":  # pre-6.0 configs spelled TopK this way
        arch = "topk"
    if arch not in _ARCHITECTURES:
        raise bad(cfg_path, f"architecture {arch!r} is not supported (supported: {sorted(_ARCHITECTURES)}; "
                            f"SAELens saves batchtopk SAEs for inference as jumprelu)")
    if arch == "standard" and activation != "relu":
        raise bad(cfg_path, f"activation {activation!r} is not supported for standard SAEs (only relu)")
    k = cfg.get("k", kwargs.get("k")) if arch == "topk" else None
    if arch == "topk" and (not isinstance(k, (int, float)) or int(k) != k):
        raise bad(cfg_path, f"topk SAE needs an integer k (cfg k or activation_fn_kwargs.k), got {k!r}")

    norm = cfg.get("normalize_activations", "none")
    norm = {None: "none", False: "none", True: "expected_average_only_in"}.get(norm, norm)
    scale = None
    if norm == "expected_average_only_in":
        scale = cfg.get("norm_scaling_factor")
        if scale is None and (path / SCALER).is_file():
            scale = read_json(path / SCALER).get("scaling_factor")
        if not isinstance(scale, (int, float)) or not scale > 0:
            raise bad(cfg_path, "uses normalize_activations=expected_average_only_in but gives no scaling factor: "
                                f"add \"norm_scaling_factor\": s to cfg.json (SAELens lists it in pretrained_saes.yaml) "
                                f"or put {SCALER} beside it")
        norm = "none"
    elif norm not in ("none", "constant_norm_rescale"):
        raise bad(cfg_path, f"normalize_activations={norm!r} is not supported "
                            f"(supported: none, expected_average_only_in, constant_norm_rescale)")
    return dict(architecture=_ARCHITECTURES[arch], k=None if k is None else int(k),
                layer=resolve_layer(path, layer_of_hook(hook, cfg_path), layer),
                apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), normalize=norm, scale=scale,
                rescale_by_decoder_norm=arch == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False)),
                finetuning_scaling=bool(cfg.get("finetuning_scaling_factor", False)))


def read_sae_facts(path: Path, layer: int | None = None) -> SaeFacts:
    plan = _plan(path, layer)
    shapes, _ = safetensors_shapes(path / WEIGHTS)
    return facts(shapes, path / WEIGHTS, layer=plan["layer"], architecture=plan["architecture"],
                 normalize=plan["normalize"])


def load_sae(path: Path, layer: int | None = None) -> SparseAutoencoder:
    plan = _plan(path, layer)
    weights = path / WEIGHTS
    t = safetensors_tensors(weights)
    arch = plan["architecture"]
    needed = {"relu": ["W_enc", "b_enc"], "topk": ["W_enc", "b_enc"], "jumprelu": ["W_enc", "b_enc"],
              "gated": ["W_enc", "b_gate", "b_mag", "r_mag"]}[arch] + ["W_dec", "b_dec"]
    if arch == "jumprelu" and "threshold" not in t:
        if "log_threshold" not in t:  # training checkpoints keep the log
            raise bad(weights, "jumprelu SAE has neither 'threshold' nor 'log_threshold'")
        t["threshold"] = t.pop("log_threshold").exp()
    missing = [n for n in needed if n not in t]
    if missing:
        raise bad(weights, f"misses tensor(s) {missing} of a SAELens {arch} SAE (found {sorted(t)})")
    W_enc, b_enc, W_dec, b_dec = t["W_enc"], t["b_gate" if arch == "gated" else "b_enc"], t["W_dec"], t["b_dec"]
    if W_dec.dim() != 2 or W_enc.dim() != 2:
        raise bad(weights, f"W_enc {list(W_enc.shape)} / W_dec {list(W_dec.shape)} must be 2-D")

    if plan["rescale_by_decoder_norm"]:
        norms = W_dec.norm(dim=1)  # [d_sae], of the stored decoder: fold before anything rescales W_dec
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if "scaling_factor" in t:
        s = t["scaling_factor"]
        if not torch.allclose(s, torch.ones_like(s)):
            if not plan["finetuning_scaling"]:
                raise bad(weights, "has a scaling_factor tensor but cfg finetuning_scaling_factor is false "
                                   "(SAELens refuses this file too)")
            if s.shape != W_dec.shape[:1]:
                raise bad(weights, f"scaling_factor has shape {list(s.shape)}, expected [{W_dec.shape[0]}]")
            W_dec = W_dec * s[:, None]
    if plan["scale"] is not None:
        s = float(plan["scale"])
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s

    return build_sae(weights, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, layer=plan["layer"],
                     architecture=arch, k=plan["k"], threshold=t.get("threshold"), b_mag=t.get("b_mag"),
                     r_mag=t.get("r_mag"), apply_b_dec_to_input=plan["apply_b_dec_to_input"],
                     normalize_activations=plan["normalize"])
