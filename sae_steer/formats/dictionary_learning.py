"""saprmarks/dictionary_learning folders: `ae.pt` (a state dict) + `config.json` ({"trainer": {...}}).

`ae.pt` is a pickle-based torch file: it is read ONLY with torch.load(weights_only=True), whose
restricted unpickler builds tensors and plain containers and refuses anything else (a payload that
would run code raises, and is reported as a refused file).

Verified against saprmarks/dictionary_learning @60ec6bf: dictionary_learning/dictionary.py,
trainers/top_k.py, trainers/batch_top_k.py, trainers/matryoshka_batch_top_k.py, utils.load_dictionary
(dict_class -> class) and training.py (config.json = {"trainer": trainer.config, "buffer": ...};
with normalize_activations the biases/thresholds are scaled back before the final save, so ae.pt
works on raw activations). Per class (nn.Linear weights are [out, in]):

  AutoEncoder          encoder.weight [F,D], encoder.bias [F], decoder.weight [D,F], bias [D]
                       f = relu(encoder(x - bias)), x_hat = decoder(f) + bias
  AutoEncoderNew       encoder.weight/bias, decoder.weight [D,F], decoder.bias [D]
                       f = relu(encoder(x)) (no centring), x_hat = decoder(f)
  GatedAutoEncoder     encoder.weight [F,D] (no bias), gate_bias, mag_bias, r_mag [F], decoder.weight,
                       decoder_bias [D]; the SAELens/our gated definition with b_gate = gate_bias
  JumpReluAutoEncoder  W_enc [D,F], b_enc, W_dec [F,D], b_dec, threshold [F]; apply_b_dec_to_input
                       is False (an attribute, not saved); f = relu(pre * (pre > threshold))
  AutoEncoderTopK      encoder.*, decoder.weight, b_dec, k (buffer); encode() defaults to top-k of
                       relu(encoder(x - b_dec))
  BatchTopKSAE,        encoder.* or W_enc/b_enc, decoder.weight or W_dec, b_dec, k, threshold (a
  MatryoshkaBatchTopKSAE  scalar buffer); encode() defaults to use_threshold=True:
                       f = relu(pre) * (relu(pre) > threshold), i.e. JumpReLU with that threshold
                       for every feature (equal to sae.py's relu(pre) * (pre > t) for any t)

The layer is trainer.layer (the residual stream after that layer, as the repository's examples hook
`model.gpt_neox.layers[layer]` / `model.model.layers[layer]`); a submodule_name naming an MLP,
attention or embedding site is refused.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from sae_steer.formats._common import bad, build_sae, read_json, require_file, resolve_layer
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeFacts

WEIGHTS, CFG = "ae.pt", "config.json"
_CLASSES = ("AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
            "BatchTopKSAE", "MatryoshkaBatchTopKSAE")


def is_dictionary_learning(path: Path) -> bool:
    return path.name == WEIGHTS or (path.is_dir() and (path / WEIGHTS).is_file())


def _folder(path: Path) -> Path:
    return path.parent if path.name == WEIGHTS else path


def _state(file: Path, mmap: bool) -> dict[str, torch.Tensor]:
    require_file(file, "dictionary_learning weights")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise bad(file, "holds pickled Python objects other than tensors: refused (loaded with "
                        "torch.load(weights_only=True), which never runs them)") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError,
            KeyError) as e:
        raise bad(file, f"is not a readable torch state dict: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise bad(file, f"is not a state dict of tensors (found {keys}; a training backup holds 'ae' and "
                        f"'optimizer': use the final ae.pt)")
    return state


def _plan(folder: Path, layer: int | None) -> tuple[str, int, int | None]:
    """(dict_class, layer, k from the config) from config.json."""
    cfg_path = folder / CFG
    trainer = read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise bad(cfg_path, "has no 'trainer' object")
    cls = trainer.get("dict_class")
    if cls not in _CLASSES:
        raise bad(cfg_path, f"dict_class {cls!r} is not supported (supported: {list(_CLASSES)})")
    sub = str(trainer.get("submodule_name") or "")
    if re.search(r"mlp|attn|att_|embed", sub):
        raise bad(cfg_path, f"submodule_name {sub!r} is not the residual stream; only residual SAEs can steer")
    found = trainer.get("layer")
    return cls, resolve_layer(cfg_path, found if isinstance(found, int) else None, layer), trainer.get("k")


def _fields(state: dict[str, torch.Tensor], cls: str, k_cfg, file: Path) -> dict:
    """SparseAutoencoder fields (without the layer) from a state dict of class `cls`."""
    def get(*names):
        for n in names:
            if n in state:
                return state[n].float()
        raise bad(file, f"misses tensor {names[0]!r} of a {cls} (found {sorted(state)})")

    def T(t):  # nn.Linear [out, in] -> our [in, out]
        if t.dim() != 2:
            raise bad(file, f"expected a 2-D weight, got shape {list(t.shape)}")
        return t.T.contiguous()

    if cls == "AutoEncoder":
        return dict(W_enc=T(get("encoder.weight")), b_enc=get("encoder.bias"), W_dec=T(get("decoder.weight")),
                    b_dec=get("bias"), architecture="relu")
    if cls == "AutoEncoderNew":
        return dict(W_enc=T(get("encoder.weight")), b_enc=get("encoder.bias"), W_dec=T(get("decoder.weight")),
                    b_dec=get("decoder.bias"), architecture="relu", apply_b_dec_to_input=False)
    if cls == "GatedAutoEncoder":
        return dict(W_enc=T(get("encoder.weight")), b_enc=get("gate_bias"), b_mag=get("mag_bias"),
                    r_mag=get("r_mag"), W_dec=T(get("decoder.weight")), b_dec=get("decoder_bias"),
                    architecture="gated")
    if cls == "JumpReluAutoEncoder":
        return dict(W_enc=get("W_enc"), b_enc=get("b_enc"), W_dec=get("W_dec"), b_dec=get("b_dec"),
                    threshold=get("threshold"), architecture="jumprelu", apply_b_dec_to_input=False)
    W_enc = get("W_enc") if "W_enc" in state else T(get("encoder.weight"))
    b_enc = get("b_enc", "encoder.bias")
    W_dec = get("W_dec") if "W_dec" in state else T(get("decoder.weight"))
    common = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=get("b_dec"))
    if cls == "AutoEncoderTopK":
        k = int(state["k"]) if "k" in state else k_cfg
        return dict(common, architecture="topk", k=k)
    threshold = get("threshold")
    if threshold.numel() != 1:
        raise bad(file, f"{cls} threshold must be a scalar, got shape {list(threshold.shape)}")
    return dict(common, architecture="jumprelu", threshold=threshold.reshape(()).expand(b_enc.shape).clone())


def read_sae_facts(path: Path, layer: int | None = None) -> SaeFacts:
    folder = _folder(path)
    cls, layer, _ = _plan(folder, layer)
    try:
        state = _state(folder / WEIGHTS, mmap=True)  # maps the storages: shapes without reading the data
    except ValueError:
        state = _state(folder / WEIGHTS, mmap=False)  # files from before torch's zip format cannot be mapped
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    enc = shapes.get("W_enc") or shapes.get("encoder.weight", ())[::-1]
    if len(enc) != 2:
        raise bad(folder / WEIGHTS, f"has no 2-D encoder weight (found {sorted(shapes)})")
    arch = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated",
            "AutoEncoderTopK": "topk"}.get(cls, "jumprelu")
    return SaeFacts(d_sae=enc[1], layer=layer, architecture=arch, d_model=enc[0],
                    n_params=sum(t.numel() for t in state.values()))


def load_sae(path: Path, layer: int | None = None) -> SparseAutoencoder:
    folder = _folder(path)
    cls, layer, k_cfg = _plan(folder, layer)
    file = folder / WEIGHTS
    return build_sae(file, **_fields(_state(file, mmap=False), cls, k_cfg, file), layer=layer)
