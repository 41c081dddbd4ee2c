"""Tiny random models of every supported family + a byte-level BPE tokenizer, built locally in seconds (no model hub here).

Used by the tests, the demo and the benchmarks. Weights ~ N(0, std) with std large enough that
greedy decoding is decisive (not a coin toss between near-equal logits), so steered and
unsteered outputs can be compared token by token. Also builds random SAEs of every
architecture for that model.
"""
from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import torch

from sae_steer.sae import SparseAutoencoder

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _corpus() -> list[str]:
    """Any local English-ish text: the licenses Debian ships, else Python's own stdlib sources."""
    files = sorted(Path("/usr/share/common-licenses").glob("*"))
    if not files:
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    return [f.read_text(errors="ignore") for f in files if f.is_file()]


def _tiny_config(family: str, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int):
    """A transformers config of `family` at the smallest size vLLM's CPU attention runs (head_dim 32)."""
    import transformers as tf
    head_dim = hidden // heads
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, max_position_embeddings=2048, bos_token_id=0, eos_token_id=1,
                  pad_token_id=None)
    llama_like = dict(common, num_key_value_heads=kv_heads, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like, use_sliding_window=False)
    if family == "qwen3":
        return tf.Qwen3Config(**llama_like, head_dim=head_dim, use_sliding_window=False)
    if family == "phi3":
        return tf.Phi3Config(**llama_like, original_max_position_embeddings=2048)
    if family == "gemma2":  # Gemma ties its embeddings; head_dim must be set (its default is 256)
        return tf.Gemma2Config(**dict(llama_like, tie_word_embeddings=True), head_dim=head_dim,
                               query_pre_attn_scalar=head_dim, sliding_window=64,
                               final_logit_softcapping=None)  # tanh-capped tiny logits tie
    if family == "gemma3":
        return tf.Gemma3TextConfig(**dict(llama_like, tie_word_embeddings=True), head_dim=head_dim,
                                   query_pre_attn_scalar=head_dim, sliding_window=64,
                                   architectures=["Gemma3ForCausalLM"])
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
                             n_positions=2048, bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**dict(common, tie_word_embeddings=False), rotary_pct=0.25,
                                use_parallel_residual=True)
    raise ValueError(f"no tiny config for family {family!r}")


TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2", "gpt_neox")


def build_tiny_model(path: str | Path, family: str = "llama", *, hidden: int = 128, layers: int = 4, heads: int = 4,
                     kv_heads: int = 2, intermediate: int = 256, vocab: int = 512, std: float = 0.2,
                     seed: int = 0) -> Path:
    """Write a Hugging Face model folder (config, safetensors weights, tokenizer) of `family` to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "config.json").exists():
        return path
    print(f"[tiny-model] building a {layers}-layer d={hidden} {family} model in {path}", file=sys.stderr, flush=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE

    config = _tiny_config(family, tok.get_vocab_size(), hidden, layers, heads, kv_heads, intermediate)
    config.torch_dtype = "float32"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)[-2]
            if "norm" in leaf or leaf.startswith("ln"):  # norms: identity scale (Gemma's scale is 1 + w), no shift
                identity = name.endswith("weight") and not family.startswith("gemma")
                p.copy_(torch.ones_like(p) if identity else torch.zeros_like(p))
            elif family.startswith("gemma") and "embed_tokens" in name:
                # Gemma multiplies its embeddings by sqrt(hidden); unscaled, they drown every layer's
                # output and the tied unembedding just repeats the last token.
                p.copy_(torch.randn_like(p) * std / hidden ** 0.5)
            else:
                p.copy_(torch.randn_like(p) * std)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    # eos never sampled on purpose: outputs keep their requested length, which tests compare.
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return path


def build_tiny_llama(path: str | Path, **kwargs) -> Path:
    return build_tiny_model(path, "llama", **kwargs)


def random_sae(d_model: int, d_sae: int, layer: int, architecture: str = "relu", *, k: int | None = None,
               seed: int = 0, scale: float = 0.3) -> SparseAutoencoder:
    """A random SAE whose features fire on some tokens (biases near zero, thresholds small)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=scale):
        return torch.randn(*shape, generator=g) * s

    W_dec = rand(d_sae, d_model)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)  # unit decoder rows, as trained SAEs have
    extra = {}
    if architecture == "jumprelu":
        extra["threshold"] = rand(d_sae).abs() * 0.5
    if architecture == "gated":
        extra["b_mag"], extra["r_mag"] = rand(d_sae, s=0.1), rand(d_sae, s=0.1)
    return SparseAutoencoder(W_enc=rand(d_model, d_sae), b_enc=rand(d_sae, s=0.1), W_dec=W_dec,
                             b_dec=rand(d_model, s=0.1), layer=layer, architecture=architecture,
                             k=k if architecture == "topk" else None, **extra)
