"""Every SAE/vector format loads to the same math, and every bad file is refused with its name.

Files are written with the upstream projects' own key names, shapes and config fields
(tests/format_writers.py says which source each follows); the loaders' docstrings name the
upstream commits they were checked against.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_steer import formats
from sae_steer.edits import feature_edit_delta
from sae_steer.registry import Settings
from sae_steer.spec import SaeIntervention
from sae_steer.tiny_model import random_sae
from tests.format_writers import (write_dictionary_learning, write_gemmascope, write_npy_rows, write_repeng_gguf,
                                  write_saelens, write_sparsify)

D, F = 16, 48
X = torch.randn(7, D, generator=torch.Generator().manual_seed(0)) * 2


def sae_of(arch: str, layer: int = 2, apply_b_dec: bool = True, seed: int = 1):
    return replace(random_sae(D, F, layer, arch, k=6 if arch == "topk" else None, seed=seed),
                   apply_b_dec_to_input=apply_b_dec)


def edits():
    return [SaeIntervention(type="sae", sae="s", feature=f, mode=m, **kw) for f, m, kw in
            [(3, "add", {"strength": 5.0}), (7, "clamp", {"value": 2.0}), (11, "ablate", {}),
             (20, "scale", {"factor": 3.0})]]


def assert_same_math(a, b):
    """Same encode/encode_features/decode and the same steering deltas (feature edits keep the error term)."""
    assert (a.layer, a.architecture, a.k, a.apply_b_dec_to_input) == (b.layer, b.architecture, b.k,
                                                                      b.apply_b_dec_to_input)
    fa, fb = a.encode(X), b.encode(X)
    torch.testing.assert_close(fa, fb, rtol=1e-6, atol=1e-6)
    feats = torch.tensor([0, 5, 9, 30])
    torch.testing.assert_close(a.encode_features(X, feats), b.encode_features(X, feats), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.decode(fa, X), b.decode(fa, X), rtol=1e-6, atol=1e-6)
    for e in edits():
        torch.testing.assert_close(feature_edit_delta(a, X, e), feature_edit_delta(b, X, e), rtol=1e-6, atol=1e-6)


def copies(sae, tmp: Path) -> dict[str, Path]:
    """The SAE saved in every format that can express it exactly."""
    out = {"native": formats.save_sae(sae, tmp / "native")}
    if sae.normalize_activations == "none":
        out["saelens"] = write_saelens(sae, tmp / "saelens")
        out["saelens-pre6"] = write_saelens(sae, tmp / "saelens-pre6", old_style=True)
    if sae.architecture == "jumprelu" and not sae.apply_b_dec_to_input:
        out["gemmascope"] = write_gemmascope(sae, tmp / "gemma-scope-2b-pt-res")
    if sae.architecture == "topk":
        out["sparsify"] = write_sparsify(sae, tmp / "sparsify-run")
    if (sae.architecture, sae.apply_b_dec_to_input) in (("relu", True), ("gated", True), ("jumprelu", False),
                                                         ("topk", True)):
        out["dictionary_learning"] = write_dictionary_learning(sae, tmp / "dl")
    return out


@pytest.mark.parametrize("arch,apply_b_dec", [("relu", True), ("gated", True), ("jumprelu", True),
                                              ("jumprelu", False), ("topk", True)])
def test_every_format_gives_the_same_sae(tmp_path, arch, apply_b_dec):
    sae = sae_of(arch, apply_b_dec=apply_b_dec)
    paths = copies(sae, tmp_path)
    assert len(paths) >= 3
    for name, path in paths.items():
        facts = formats.read_sae_facts(path)
        assert (facts.d_model, facts.d_sae, facts.layer, facts.architecture) == (D, F, 2, arch), name
        assert facts.n_params >= sae.n_params() - F, name  # a format may store a scalar where we hold [d_sae]
        assert_same_math(sae, formats.load_sae(path))


def test_batch_topk_dictionary_is_jumprelu_with_one_threshold(tmp_path):
    sae = sae_of("jumprelu")
    sae = replace(sae, threshold=torch.full((F,), 0.05))
    loaded = formats.load_sae(write_dictionary_learning(sae, tmp_path / "bt", "BatchTopKSAE"))
    assert_same_math(sae, loaded)
    # the dictionary_learning definition: f = relu(pre) * (relu(pre) > threshold)
    pre = (X - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(loaded.encode(X), torch.relu(pre) * (torch.relu(pre) > 0.05))


def test_detection_accepts_the_file_inside_a_folder(tmp_path):
    sae = sae_of("topk")
    assert formats.sae_format(write_sparsify(sae, tmp_path / "run") / "sae.safetensors")[0] is formats.sparsify
    assert formats.sae_format(write_saelens(sae, tmp_path / "sl") / "sae_weights.safetensors")[0] is formats.saelens
    assert formats.sae_format(write_dictionary_learning(sae, tmp_path / "dl") / "ae.pt")[0] is \
        formats.dictionary_learning
    assert formats.sae_format(formats.save_sae(sae, tmp_path / "n.safetensors"))[0] is formats.native


# ---- SAELens specifics: hooks, normalisation folds ----

@pytest.mark.parametrize("hook,layer", [("blocks.3.hook_resid_post", 3), ("blocks.3.hook_resid_pre", 2)])
def test_saelens_hook_names_map_to_layers(tmp_path, hook, layer):
    sae = sae_of("relu", layer=0)
    for old in (False, True):
        folder = write_saelens(sae, tmp_path / f"{hook}-{old}", hook=hook, old_style=old)
        assert formats.read_sae_facts(folder).layer == layer
        assert formats.load_sae(folder).layer == layer


@pytest.mark.parametrize("hook,message", [("blocks.0.hook_resid_pre", "embeddings"),
                                          ("blocks.3.hook_mlp_out", "residual stream"),
                                          ("blocks.3.attn.hook_z", "residual stream"),
                                          ("blocks.3.hook_resid_mid", "residual stream")])
def test_saelens_refuses_other_hook_sites(tmp_path, hook, message):
    folder = write_saelens(sae_of("relu"), tmp_path / "s", hook=hook)
    with pytest.raises(ValueError, match=message):
        formats.read_sae_facts(folder)


def test_saelens_expected_average_only_in_is_folded(tmp_path):
    sae, s = sae_of("jumprelu"), 0.37  # weights trained on s * x
    folder = write_saelens(sae, tmp_path / "s", extra_cfg={"normalize_activations": "expected_average_only_in"})
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        formats.load_sae(folder)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    loaded = formats.load_sae(folder)
    f = sae.encode(s * X)  # SAELens: encode scaled input, unscale the output
    torch.testing.assert_close(loaded.encode(X), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(f), sae.decode(f) / s, rtol=1e-5, atol=1e-5)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "norm_scaling_factor": s}))
    (folder / "activation_scaler.json").unlink()
    torch.testing.assert_close(formats.load_sae(folder).encode(X), f, rtol=1e-5, atol=1e-5)


def test_saelens_topk_decoder_norm_rescale_is_folded(tmp_path):
    sae = sae_of("topk")
    sae = replace(sae, W_dec=sae.W_dec * torch.linspace(0.5, 2.0, F)[:, None])  # non-unit decoder rows
    folder = write_saelens(sae, tmp_path / "s", extra_cfg={"rescale_acts_by_decoder_norm": True})
    loaded = formats.load_sae(folder)
    norms = sae.W_dec.norm(dim=1)
    pre = ((X - sae.b_dec) @ sae.W_enc + sae.b_enc) * norms  # SAELens TopKSAE.encode
    top = pre.topk(sae.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(loaded.encode(X), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(f), (f / norms) @ sae.W_dec + sae.b_dec, rtol=1e-5, atol=1e-5)


def test_saelens_finetuning_scaling_factor_is_folded(tmp_path):
    sae = sae_of("relu")
    scale = torch.linspace(0.5, 1.5, F)
    folder = write_saelens(sae, tmp_path / "s")
    save_file({"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
               "scaling_factor": scale}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="finetuning_scaling_factor"):
        formats.load_sae(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "finetuning_scaling_factor": True}))
    f = sae.encode(X)
    torch.testing.assert_close(formats.load_sae(folder).decode(f), (f * scale) @ sae.W_dec + sae.b_dec)


def test_constant_norm_rescale_matches_saelens_and_its_delta_is_exact(tmp_path):
    sae = replace(sae_of("relu"), normalize_activations="constant_norm_rescale")
    folder = write_saelens(sae, tmp_path / "s")
    loaded = formats.load_sae(folder)
    assert formats.read_sae_facts(folder).normalize_activations == "constant_norm_rescale"
    c = D ** 0.5 / X.norm(dim=-1, keepdim=True)  # SAELens run_time_activation_norm_fn_in / _out
    f = torch.relu((X * c - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(loaded.encode(X), f)
    torch.testing.assert_close(loaded.decode(f, X), (f @ sae.W_dec + sae.b_dec) / c)
    edited = f.clone()
    edited[:, 3] += 5.0
    torch.testing.assert_close(feature_edit_delta(loaded, X, edits()[0]),
                               loaded.decode(edited, X) - loaded.decode(f, X), rtol=1e-5, atol=1e-5)
    assert_same_math(sae, formats.load_sae(formats.save_sae(sae, tmp_path / "n.safetensors")))


def test_saelens_refuses_unsupported_configs(tmp_path):
    base = write_saelens(sae_of("relu"), tmp_path / "s")
    cfg = json.loads((base / "cfg.json").read_text())
    for extra, message in [({"normalize_activations": "layer_norm"}, "layer_norm"),
                           ({"architecture": "batchtopk"}, "batchtopk"),
                           ({"hook_name_out": "blocks.2.hook_mlp_out"}, "transcoder"),
                           ({"hook_head_index": 3}, "per-head")]:
        (base / "cfg.json").write_text(json.dumps({**cfg, **extra}))
        with pytest.raises(ValueError, match=message):
            formats.load_sae(base)


# ---- layers from paths and settings ----

def test_gemmascope_layer_from_path_or_settings(tmp_path):
    sae = sae_of("jumprelu", layer=5, apply_b_dec=False)
    npz = write_gemmascope(sae, tmp_path / "gemma-scope-2b-pt-res")
    assert formats.read_sae_facts(npz.parent).layer == 5
    with pytest.raises(ValueError, match="says layer 5, the settings say layer 4"):
        formats.load_sae(npz, layer=4)
    moved = tmp_path / "elsewhere.npz"
    moved.write_bytes(npz.read_bytes())
    with pytest.raises(ValueError, match="does not say which layer"):
        formats.read_sae_facts(moved)
    assert formats.load_sae(moved, layer=5).layer == 5
    mlp = write_gemmascope(sae, tmp_path / "gemma-scope-2b-pt-mlp")
    with pytest.raises(ValueError, match="only residual-stream"):
        formats.read_sae_facts(mlp)


def test_sparsify_refuses_non_layer_hookpoints(tmp_path):
    folder = write_sparsify(sae_of("topk"), tmp_path / "run")
    renamed = folder.rename(folder.parent / "layers.2.mlp")
    with pytest.raises(ValueError, match="not a layer output"):
        formats.read_sae_facts(renamed)
    assert formats.load_sae(renamed, layer=2).layer == 2  # the operator vouches for the layer
    cfg = json.loads((renamed / "cfg.json").read_text())
    (renamed / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(ValueError, match="transcoder"):
        formats.load_sae(renamed, layer=2)


# ---- tokenized SAEs ----

def test_tokenized_sae_lookup_round_trips_and_leaves_deltas_alone(tmp_path):
    sae = sae_of("relu")
    lookup = torch.randn(50, D, generator=torch.Generator().manual_seed(3))
    tok = replace(sae, W_lookup=lookup)
    loaded = formats.load_sae(formats.save_sae(tok, tmp_path / "tok.safetensors"))
    assert torch.equal(loaded.W_lookup, lookup)
    tokens = torch.arange(7) * 3
    f = loaded.encode(X)
    torch.testing.assert_close(f, sae.encode(X))  # the encoder never sees the token
    torch.testing.assert_close(loaded.decode(f, token_ids=tokens), sae.decode(f) + lookup[tokens])
    with pytest.raises(ValueError, match="token_ids"):
        loaded.decode(f)
    for e in edits():
        torch.testing.assert_close(feature_edit_delta(loaded, X, e), feature_edit_delta(sae, X, e))


# ---- vectors ----

def vector_layers():
    g = torch.Generator().manual_seed(5)
    return {1: torch.randn(D, generator=g), 3: torch.randn(D, generator=g)}


def test_vector_formats_give_the_same_layers(tmp_path):
    layers = vector_layers()
    paths = [formats.save_vector(layers, tmp_path / "v.safetensors"),
             write_repeng_gguf(layers, tmp_path / "v.gguf"),
             write_npy_rows(layers, tmp_path / "v.npy", n_layers=4)]
    for path in paths:
        assert formats.read_vector_layers(path) == {1: D, 3: D}, path
        loaded = formats.load_vector(path)
        assert loaded.keys() == layers.keys()
        for L in layers:
            assert torch.equal(loaded[L], layers[L]), (path, L)


def test_single_npy_vector_needs_its_layer(tmp_path):
    v = vector_layers()[1]
    path = tmp_path / "one.npy"
    np.save(path, v.numpy())
    with pytest.raises(ValueError, match="no layer"):
        formats.read_vector_layers(path)
    assert torch.equal(formats.load_vector(path, layer=2)[2], v)
    with pytest.raises(ValueError, match="applies only"):
        formats.load_vector(write_repeng_gguf(vector_layers(), tmp_path / "v.gguf"), layer=2)


# ---- bad files: a clear ValueError naming the file, never a crash or code execution ----

class Payload:
    """Unpickling this would create a marker file: weights_only loading must never get there."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_bad_files_are_refused_with_their_name(tmp_path):
    sae = sae_of("relu")
    cases = {}

    native = formats.save_sae(sae, tmp_path / "trunc-native.safetensors")
    _truncate(native)
    cases["truncated native"] = (lambda: formats.load_sae(native), native)

    sl = write_saelens(sae, tmp_path / "trunc-saelens")
    _truncate(sl / "sae_weights.safetensors")
    cases["truncated saelens"] = (lambda: formats.load_sae(sl), sl / "sae_weights.safetensors")

    wrong = write_saelens(sae, tmp_path / "wrong-shape")
    save_file({"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec.T.contiguous(), "b_dec": sae.b_dec},
              str(wrong / "sae_weights.safetensors"))
    cases["transposed W_dec"] = (lambda: formats.load_sae(wrong), wrong / "sae_weights.safetensors")

    marker = tmp_path / "pwned"
    evil = write_dictionary_learning(sae, tmp_path / "evil")
    torch.save({"encoder.weight": Payload(marker)}, evil / "ae.pt")
    cases["pickle payload in ae.pt"] = (lambda: formats.load_sae(evil), evil / "ae.pt")
    cases["pickle payload in ae.pt (facts)"] = (lambda: formats.read_sae_facts(evil), evil / "ae.pt")

    backup = write_dictionary_learning(sae, tmp_path / "backup")
    torch.save({"step": torch.tensor(3), "ae": {"bias": sae.b_dec}}, backup / "ae.pt")
    cases["training backup"] = (lambda: formats.load_sae(backup), backup / "ae.pt")

    obj = tmp_path / "layer_2" / "obj.npz"
    obj.parent.mkdir()
    np.savez(obj, W_enc=np.array([{"a": 1}], dtype=object), W_dec=np.zeros((F, D)), b_enc=np.zeros(F),
             b_dec=np.zeros(D), threshold=np.zeros(F))
    cases["npz object array"] = (lambda: formats.load_sae(obj), obj)

    npz_trunc = write_gemmascope(sae_of("jumprelu", apply_b_dec=False), tmp_path / "gs")
    _truncate(npz_trunc)
    cases["truncated npz"] = (lambda: formats.load_sae(npz_trunc), npz_trunc)

    obj_vec = tmp_path / "obj.npy"
    np.save(obj_vec, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases["npy object array"] = (lambda: formats.load_vector(obj_vec, layer=1), obj_vec)

    gguf_trunc = write_repeng_gguf(vector_layers(), tmp_path / "trunc.gguf")
    _truncate(gguf_trunc, 0.6)
    cases["truncated gguf"] = (lambda: formats.load_vector(gguf_trunc), gguf_trunc)

    nan = formats.save_sae(replace(sae, b_enc=torch.full((F,), float("nan"))), tmp_path / "nan.safetensors")
    cases["NaN weights"] = (lambda: formats.load_sae(nan), nan)

    for what, (load, path) in cases.items():
        with pytest.raises(ValueError) as e:
            load()
        assert str(path) in str(e.value), (what, str(e.value))
    assert not marker.exists()
    torch.load(evil / "ae.pt", weights_only=False)  # what a plain torch.load would have done
    assert marker.exists()


def test_unknown_folder_lists_the_formats(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="SAELens"):
        formats.load_sae(tmp_path / "empty")


# ---- settings: roots, symlinks, budget, explicit layers, engine limits ----

def settings(**raw):
    return Settings.from_additional_config({"sae_steer": raw})


def test_roots_refuse_paths_and_symlinks_outside(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    inside = formats.save_sae(sae_of("relu"), root / "a.safetensors")
    secret = formats.save_sae(sae_of("relu"), outside / "b.safetensors")
    assert settings(roots=[str(root)], saes={"a": str(inside)}).saes["a"] == inside.resolve()
    cases = {"dotdot": str(root / ".." / "outside" / "b.safetensors")}
    (root / "link.safetensors").symlink_to(secret)
    cases["symlink"] = str(root / "link.safetensors")
    sl = write_saelens(sae_of("relu"), root / "sl")
    (sl / "sae_weights.safetensors").unlink()
    (sl / "sae_weights.safetensors").symlink_to(secret)
    cases["symlink inside a folder"] = str(sl)
    for what, path in cases.items():
        with pytest.raises(ValueError, match=r"saes\.x.*outside the allowed roots"):
            settings(roots=[str(root)], saes={"x": path})
    with pytest.raises(ValueError, match=r"vectors\.v.*outside"):
        settings(roots=[str(root)], vectors={"v": str(outside / "v.npy")})
    s = settings(roots=[str(root)])
    assert s.check_path(root / "built" / "new.safetensors") == (root / "built" / "new.safetensors").resolve()
    with pytest.raises(ValueError, match="outside"):
        s.check_path(tmp_path / "new.safetensors", "build")


def test_memory_budget_is_checked_from_headers(tmp_path):
    path = formats.save_sae(sae_of("relu"), tmp_path / "a.safetensors")  # 1,600 floats: 6.4 KB in float32
    ok = settings(saes={"a": str(path)}, max_memory_mb=1)
    assert ok.model_facts(D, 4).saes["a"].n_params == sae_of("relu").n_params()
    with pytest.raises(ValueError, match=r"max_memory_mb: .*SAE 'a'.*over the budget of 0.001 MB"):
        settings(saes={"a": str(path)}, max_memory_mb=0.001).model_facts(D, 4)
    with pytest.raises(ValueError, match="max_memory_mb must be"):
        settings(max_memory_mb=-1)
    # on a GPU the steering table holds a bfloat16 copy beside the float32 one: 6 bytes a parameter, 9.6 KB
    tight = settings(saes={"a": str(path)}, max_memory_mb=0.008)  # 8.4 KB
    tight.model_facts(D, 4)
    with pytest.raises(ValueError, match=r"in float32 plus the steering table's bfloat16 copy of the SAEs.*"
                                         r"over the budget of 0.008 MB"):
        tight.model_facts(D, 4, torch.bfloat16)


def test_sae_weight_dtype_setting():
    assert settings().sae_weight_dtype == "serving"
    assert settings(sae_weight_dtype="float32").sae_weight_dtype == "float32"
    for bad in ("bfloat16", None, ["serving"]):
        with pytest.raises(ValueError, match=r"additional_config\.sae_steer\.sae_weight_dtype must be one of"):
            settings(sae_weight_dtype=bad)


def test_explicit_layers_and_model_checks(tmp_path):
    one = tmp_path / "one.npy"
    np.save(one, np.ones(D, dtype=np.float32))
    npz = write_gemmascope(sae_of("jumprelu", layer=1, apply_b_dec=False), tmp_path / "res")
    moved = tmp_path / "params.npz"
    moved.write_bytes(npz.read_bytes())
    s = settings(saes={"gs": {"path": str(moved), "layer": 1}}, vectors={"one": {"path": str(one), "layer": 3}})
    facts = s.model_facts(D, 4)
    assert facts.saes["gs"].layer == 1 and facts.vectors["one"] == {3}
    assert facts.steerable_layers == {1, 3}
    with pytest.raises(ValueError, match=r"vector 'one' .*one.npy.* is at layer 3, the served model has layers 0..2"):
        s.model_facts(D, 3)
    with pytest.raises(ValueError, match=r"SAE 'gs' .*has d_model 16, the served model has d_model 32"):
        s.model_facts(32, 4)
    with pytest.raises(ValueError, match=r"saes\.gs must be a path or"):
        settings(saes={"gs": {"path": str(moved), "layer": -1}})


def test_engine_refuses_per_token_normalisation(tmp_path):
    sae = replace(sae_of("relu"), normalize_activations="constant_norm_rescale")
    s = settings(saes={"cn": str(formats.save_sae(sae, tmp_path / "cn.safetensors"))})
    with pytest.raises(ValueError, match="constant_norm_rescale.*engine"):
        s.model_facts(D, 4)


def test_labels_setting_names_registered_saes(tmp_path):
    path = formats.save_sae(sae_of("relu"), tmp_path / "a.safetensors")
    (tmp_path / "labels.json").write_text("{}")
    assert settings(saes={"a": str(path)}, labels={"a": str(tmp_path / "labels.json")}).labels["a"].name == \
        "labels.json"
    with pytest.raises(ValueError, match=r"labels: \['b'\] are not registered"):
        settings(saes={"a": str(path)}, labels={"b": str(tmp_path / "labels.json")})


def test_existing_settings_keep_working(tmp_path):
    s = settings(saes={"a": str(formats.save_sae(sae_of("relu"), tmp_path / "a"))}, layers=[0], max_interventions=3)
    assert s.model_facts(D, 4).steerable_layers == {0, 2} and s.roots == () and s.max_memory_mb is None
