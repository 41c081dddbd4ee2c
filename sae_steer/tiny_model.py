"""A tiny random Llama + byte-level BPE tokenizer, built locally in seconds (no model hub here).

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


def build_tiny_llama(path: str | Path, *, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                     intermediate: int = 256, vocab: int = 512, std: float = 0.2, seed: int = 0) -> Path:
    """Write a Hugging Face Llama folder (config, safetensors weights, tokenizer) to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if (path / "config.json").exists():
        return path
    print(f"[tiny-model] building a {layers}-layer d={hidden} Llama in {path}", file=sys.stderr, flush=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                         rms_norm_eps=1e-5, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * std)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    # eos never sampled on purpose: outputs keep their requested length, which tests compare.
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return path


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
