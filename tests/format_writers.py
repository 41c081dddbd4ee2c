"""Write one SparseAutoencoder / vector the way each upstream project writes its files.

Key names, shapes and config fields follow the sources read for sae_steer/formats (commits named
in each loader's docstring):
  SAELens    sae_lens/saes/sae.py `save_model` (cfg.json = cfg.to_dict(), metadata.hook_name;
             sae_weights.safetensors = the state dict: W_enc [d_in, d_sae], W_dec [d_sae, d_in], ...)
  Gemma Scope  params.npz with W_enc, W_dec, b_enc, b_dec, threshold (SAELens gemma_2 loader)
  sparsify   sparsify/sparse_coder.py `save_to_disk` (save_model of the module: encoder.weight [M, D],
             encoder.bias, W_dec [M, D], b_dec; cfg.json = SparseCoderConfig + d_in)
  dictionary_learning  dictionary.py / trainers state dicts, torch.save(state_dict, "ae.pt"),
             config.json = {"trainer": trainer.config, "buffer": {...}}
  repeng     repeng/extract.py `export_gguf` (GGUFWriter(path, "controlvector"), model_hint,
             layer_count, direction.<layer> tensors)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from sae_steer.sae import SparseAutoencoder


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def write_saelens(sae: SparseAutoencoder, folder: Path, *, hook: str | None = None, extra_cfg: dict | None = None,
                  old_style: bool = False) -> Path:
    """A SAELens v6 folder (old_style: a pre-6.0 config with top-level hook_name and activation_fn_kwargs)."""
    folder.mkdir(parents=True, exist_ok=True)
    arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "gated": "gated"}[sae.architecture]
    hook = hook or f"blocks.{sae.layer}.hook_resid_post"
    tensors = {"W_enc": sae.W_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if arch == "gated":
        tensors.update(b_gate=sae.b_enc, b_mag=sae.b_mag, r_mag=sae.r_mag)
    else:
        tensors["b_enc"] = sae.b_enc
    if arch == "jumprelu":
        tensors["threshold"] = sae.threshold
    cfg = {"d_in": sae.d_model, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": sae.normalize_activations,
           "reshape_activations": "none", "architecture": arch}
    if old_style:
        cfg.update(hook_name=hook, hook_layer=sae.layer, hook_head_index=None, sae_lens_training_version="3.0.0",
                   activation_fn_str="topk" if arch == "topk" else "relu",
                   activation_fn_kwargs={"k": sae.k} if arch == "topk" else {})
        if arch == "topk":
            cfg["architecture"] = "standard"  # pre-6.0 TopK SAEs were "standard" with a topk activation
    else:
        cfg["metadata"] = {"hook_name": hook, "sae_lens_version": "6.12.1", "model_name": "tiny-llama"}
        if arch == "topk":
            cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    cfg.update(extra_cfg or {})
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_gemmascope(sae: SparseAutoencoder, root: Path) -> Path:
    """<root>/layer_L/width_x/average_l0_y/params.npz (the SAE must be jumprelu without b_dec centring)."""
    assert sae.architecture == "jumprelu" and not sae.apply_b_dec_to_input
    folder = root / f"layer_{sae.layer}" / f"width_{sae.d_sae}" / "average_l0_10"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", W_enc=_np(sae.W_enc), W_dec=_np(sae.W_dec), b_enc=_np(sae.b_enc),
             b_dec=_np(sae.b_dec), threshold=_np(sae.threshold))
    return folder / "params.npz"


def write_sparsify(sae: SparseAutoencoder, run: Path) -> Path:
    """<run>/layers.L/{cfg.json, sae.safetensors} (the SAE must be topk with b_dec centring)."""
    assert sae.architecture == "topk" and sae.apply_b_dec_to_input
    folder = run / f"layers.{sae.layer}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc.contiguous(),
               "W_dec": sae.W_dec.contiguous(), "b_dec": sae.b_dec.contiguous()}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": sae.d_sae,
        "k": sae.k, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": sae.d_model}))
    return folder


def write_dictionary_learning(sae: SparseAutoencoder, folder: Path, dict_class: str | None = None) -> Path:
    """ae.pt + config.json for the dictionary_learning class matching the SAE."""
    folder.mkdir(parents=True, exist_ok=True)
    dict_class = dict_class or {"relu": "AutoEncoder", "gated": "GatedAutoEncoder", "jumprelu": "JumpReluAutoEncoder",
                                "topk": "AutoEncoderTopK"}[sae.architecture]
    c = lambda t: t.detach().clone().contiguous()  # noqa: E731
    if dict_class == "AutoEncoder":
        assert sae.apply_b_dec_to_input
        state = {"bias": c(sae.b_dec), "encoder.weight": c(sae.W_enc.T), "encoder.bias": c(sae.b_enc),
                 "decoder.weight": c(sae.W_dec.T)}
    elif dict_class == "GatedAutoEncoder":
        state = {"decoder_bias": c(sae.b_dec), "encoder.weight": c(sae.W_enc.T), "r_mag": c(sae.r_mag),
                 "gate_bias": c(sae.b_enc), "mag_bias": c(sae.b_mag), "decoder.weight": c(sae.W_dec.T)}
    elif dict_class == "JumpReluAutoEncoder":
        assert not sae.apply_b_dec_to_input
        state = {"W_enc": c(sae.W_enc), "b_enc": c(sae.b_enc), "W_dec": c(sae.W_dec), "b_dec": c(sae.b_dec),
                 "threshold": c(sae.threshold)}
    elif dict_class == "AutoEncoderTopK":
        state = {"k": torch.tensor(sae.k, dtype=torch.int), "threshold": torch.tensor(-1.0),
                 "decoder.weight": c(sae.W_dec.T), "encoder.weight": c(sae.W_enc.T), "encoder.bias": c(sae.b_enc),
                 "b_dec": c(sae.b_dec)}
    elif dict_class == "BatchTopKSAE":  # a jumprelu SAE with one threshold for every feature
        assert sae.architecture == "jumprelu" and bool((sae.threshold == sae.threshold[0]).all())
        state = {"k": torch.tensor(8, dtype=torch.int), "threshold": c(sae.threshold[0]),
                 "decoder.weight": c(sae.W_dec.T), "encoder.weight": c(sae.W_enc.T), "encoder.bias": c(sae.b_enc),
                 "b_dec": c(sae.b_dec)}
    else:
        raise ValueError(dict_class)
    torch.save(state, folder / "ae.pt")
    trainer = {"dict_class": dict_class, "trainer_class": "Trainer", "activation_dim": sae.d_model,
               "dict_size": sae.d_sae, "layer": sae.layer, "lm_name": "tiny-llama",
               "submodule_name": f"resid_post_layer_{sae.layer}", "lr": 1e-3, "steps": 100}
    if sae.k is not None:
        trainer["k"] = sae.k
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
    return folder


def write_repeng_gguf(layers: dict[int, torch.Tensor], path: Path, model_type: str = "llama") -> Path:
    """Exactly repeng's ControlVector.export_gguf."""
    import gguf
    arch = "controlvector"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(layers))
    for layer, v in layers.items():
        writer.add_tensor(f"direction.{layer}", _np(v))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_npy_rows(layers: dict[int, torch.Tensor], path: Path, n_layers: int) -> Path:
    """[n_layers, d_model] with zero rows at layers the vector does not steer."""
    d = next(iter(layers.values())).shape[0]
    rows = np.zeros((n_layers, d), dtype=np.float32)
    for layer, v in layers.items():
        rows[layer] = _np(v)
    np.save(path, rows)
    return path
