"""The GGUF conversion (sae_steer.models.convert_gguf) on a tiny llama written to GGUF by this test, and the
table of known models.

The GGUF is written the way llama.cpp's convert_hf_to_gguf.py writes a llama: its tensor names, its
q/k row permutation (rotary halves interleaved), float32 tensors, and a byte-level BPE vocabulary with
merges. The conversion must give back the source weights (in float32, exactly) and a model that computes
the same logits as the source model.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from sae_steer.models import KNOWN, MARKER, convert_gguf, known, model_name  # noqa: E402
from sae_steer.tiny_model import build_tiny_llama  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 128, 2, 4, 2, 256

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rows of each head reordered (halves interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def write_tiny_gguf(model_dir, path, add_bos: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    weights = load_file(str(model_dir / "model.safetensors"))
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTERMEDIATE)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if add_bos:
        w.add_add_bos_token(True)
    for name, t in weights.items():
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, HEADS)
        elif name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, KV_HEADS)
        w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    model_dir = build_tiny_llama(root / "tiny", hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                                 intermediate=INTERMEDIATE)
    weights = write_tiny_gguf(model_dir, root / "tiny.gguf")
    out = convert_gguf(root / "tiny.gguf", root / "cache" / "models" / "tiny")
    return model_dir, weights, out


def test_converted_weights_equal_the_source_in_float32(converted):
    from safetensors.torch import load_file
    _, source, out = converted
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert set(got) == set(source), sorted(set(got) ^ set(source))
    for name, t in source.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], t.float()), name
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_key_value_heads"]) == (LAYERS, HIDDEN, KV_HEADS)


def test_converted_model_loads_and_computes_the_source_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, _, out = converted
    text = "Permission is hereby granted, free of charge, to any person"
    ids_src = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    ids_out = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids_out == ids_src
    src = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dst = AutoModelForCausalLM.from_pretrained(out)
    assert dst.dtype == torch.float32
    x = torch.tensor([ids_src])
    with torch.no_grad():
        assert torch.equal(dst(x).logits, src(x).logits)


def test_conversion_is_idempotent(converted):
    model_dir, _, out = converted
    marker = out / MARKER
    before = marker.stat().st_mtime_ns
    assert convert_gguf(model_dir / "does-not-exist.gguf", out) == out  # marker present: nothing read
    assert marker.stat().st_mtime_ns == before
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.skipif(not os.environ.get("SAE_STEER_REAL_SMOLLM2"), reason="set SAE_STEER_REAL_SMOLLM2=1 (~1 min)")
def test_real_smollm2_converts(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from sae_steer import models
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    out = models.model_path("smollm2")
    assert out == tmp_path / "sae-steer" / "models" / "SmolLM2-135M-Instruct" and (out / MARKER).is_file()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode(nxt).strip() == "Paris"


def test_known_models_are_named_by_name_or_folder():
    assert known("smollm2") is KNOWN["smollm2"] and known("SmolLM2-135M-Instruct") is KNOWN["smollm2"]
    assert known("GEMMA3-270M") is KNOWN["gemma3-270m"] and known("gemma-3-270m") is KNOWN["gemma3-270m"]
    assert known("/models/some-llama") is None
    assert (model_name("gemma-3-270m"), model_name("/models/some-llama/")) == ("gemma3-270m", "some-llama")


def test_a_base_model_gets_its_bos_and_the_plain_chat_frame(tmp_path):
    """Where the GGUF asks for <bos> (Gemma does) the tokenizer adds it, and a model without a chat template gets
    the plain frame that sae-steer eval uses for such models, so the chat route serves it with the same tokens."""
    from transformers import AutoTokenizer

    from sae_steer.models import PLAIN_CHAT_TEMPLATE
    model_dir = build_tiny_llama(tmp_path / "tiny", hidden=HIDDEN, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS,
                                 intermediate=INTERMEDIATE)
    write_tiny_gguf(model_dir, tmp_path / "tiny.gguf", add_bos=True)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", chat_template=PLAIN_CHAT_TEMPLATE)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Snow falls")["input_ids"][0] == tok.bos_token_id == 0
    chat = tok.apply_chat_template([{"role": "user", "content": "Describe winter."}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok(chat, add_special_tokens=False)["input_ids"] == \
        tok("Instruction: Describe winter.\nAnswer:", add_special_tokens=True)["input_ids"]
