"""Model families: where each family's decoder blocks are, and how the residual stream after block L is formed.

One row per family. `layer: L` always means the output of Hugging Face `layers[L]` (`h[L]` for GPT-2),
TransformerLens `blocks.L.hook_resid_post`, whatever the family. vLLM builds some families from
classes that return the stream in two parts, with the add deferred into the next block's fused
add-norm; others return the whole stream:

    pair    block(...) -> (hidden_states, residual)   stream = hidden_states + residual
            (Llama, Mistral, Qwen2/3, Gemma2/3, Phi-3: the vLLM decoder layers)
    full    block(...) -> stream                      (GPT-2's block, GPT-NeoX's Hugging Face layer,
                                                       which vLLM runs through its Transformers backend)

Pre/post-norm and parallel-residual quirks (Gemma's four norms, GPT-NeoX's parallel residual) are
inside the block, so the block's output is the stream that `transformers` defines. The embedding
output (TransformerLens `blocks.0.hook_resid_pre`) is not steerable: SAEs trained there are refused
at load (`formats/_common.py`).

How steering is attached: after vLLM has built and loaded the model (and before it is compiled),
each steerable block *instance* gets a forward that calls the block's own forward, whatever its
class (a subclass that overrides `forward` is wrapped as it is), then the opaque op
`torch.ops.sae_steer.steer_residual` on the output. The startup check (`steering_op.verify`)
then proves that the op ran at every steerable layer.

Adding a family: one `Family` row here, one case in tests/engine/test_families.py, its checkpoint names in
tests/unit/test_feature_lens.py.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Head:
    """Where a family keeps its final norm and unembedding (logit steering: vllm_plugin/logit_bias.py)."""
    final_norm: str = "model.norm"  # attribute path in vLLM's top-level model
    hf_final_norm: str = "model.norm"  # the same norm in the Hugging Face model
    norm: str = "rms"  # rms: gain w; rms1p: gain 1 + w (Gemma); layer: LayerNorm (centers; gain w)
    unembed: str = "lm_head"  # vLLM module whose `weight` is the unembedding [vocab (padded), d_model]
    hf_unembed: str = "lm_head"  # the unembedding in the Hugging Face model (and its checkpoint)
    hf_embed: str = "model.embed_tokens"  # the input embedding there: the unembedding of tied checkpoints
    eps: str = "rms_norm_eps"  # the config key of the final norm's epsilon (the logit lens of a stream)


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # Hugging Face `architectures` in config.json
    blocks: str  # attribute path from vLLM's top-level model to the ModuleList of decoder blocks
    stream: str  # "pair" or "full" (see the module docstring)
    hf_blocks: str  # the same blocks in the Hugging Face model (the layer convention's definition)
    saes: str  # public SAE releases used with this family (README)
    head: Head = Head()


FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("LlamaForCausalLM",), "model.layers", "pair", "model.layers",
           "Llama Scope (Llama-3.1-8B), Goodfire Llama-3.x SAEs, EleutherAI sparsify (Llama-3)"),
    Family("Mistral", ("MistralForCausalLM",), "model.layers", "pair", "model.layers",
           "SAELens mistral-7b-res-wg"),
    Family("Qwen2", ("Qwen2ForCausalLM",), "model.layers", "pair", "model.layers",
           "sparsify / dictionary_learning dictionaries on Qwen2.5"),
    Family("Qwen3", ("Qwen3ForCausalLM",), "model.layers", "pair", "model.layers",
           "sparsify transcoders and SAEs on Qwen3"),
    Family("Gemma2", ("Gemma2ForCausalLM",), "model.layers", "pair", "model.layers",
           "Gemma Scope (gemma-2-2b, gemma-2-9b), SAELens gemma-scope-*",
           Head(norm="rms1p", unembed="model.embed_tokens")),
    Family("Gemma3", ("Gemma3ForCausalLM",), "model.layers", "pair", "model.layers",
           "Gemma Scope 2 (Gemma 3 text models)", Head(norm="rms1p")),
    Family("Phi3", ("Phi3ForCausalLM",), "model.layers", "pair", "model.layers",
           "community SAEs on Phi-3-mini"),
    Family("GPT2", ("GPT2LMHeadModel",), "transformer.h", "full", "transformer.h",
           "SAELens gpt2-small-res-jb (resid_pre: layers 0-11 -> our -1..10), OpenAI gpt2-small SAEs, tokenized SAEs",
           Head("transformer.ln_f", "transformer.ln_f", "layer", hf_embed="transformer.wte",
                eps="layer_norm_epsilon")),
    Family("GPTNeoX", ("GPTNeoXForCausalLM",), "model.layers", "full", "gpt_neox.layers",
           "EleutherAI sparsify and dictionary_learning dictionaries on Pythia",
           Head("model.final_layer_norm", "gpt_neox.final_layer_norm", "layer", hf_unembed="embed_out",
                hf_embed="gpt_neox.embed_in", eps="layer_norm_eps")),
)

_BY_ARCHITECTURE = {a: f for f in FAMILIES for a in f.architectures}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def family_of(architectures: list[str] | None) -> Family:
    """The family of a model config's architectures, or a ValueError naming them and the supported ones."""
    for a in architectures or ():
        if a in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[a]
    raise ValueError(f"sae-steer cannot steer architecture {list(architectures or [])}: its decoder blocks and "
                     f"residual stream are not in sae-steer's family table. Supported: "
                     f"{', '.join(supported_architectures())}")


def blocks_of(model: torch.nn.Module, family: Family, num_layers: int) -> torch.nn.ModuleList:
    try:
        blocks = operator.attrgetter(family.blocks)(model)
    except AttributeError:
        raise RuntimeError(f"sae-steer: {type(model).__name__} has no `{family.blocks}`, where the {family.name} "
                           f"family keeps its decoder blocks (a vLLM change?): refusing to serve unsteered") from None
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) != num_layers:
        raise RuntimeError(f"sae-steer: `{family.blocks}` of {type(model).__name__} is not a list of {num_layers} "
                           f"decoder blocks: refusing to serve unsteered")
    return blocks


def attach(block: torch.nn.Module, layer: int, family: Family) -> None:
    """Give this block instance a forward that steers its output at `layer` (the block's own forward first)."""
    forward = block.forward  # bound: the block's class's forward, overridden or not
    block_class = type(block).__name__

    if family.stream == "pair":
        def steered_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise RuntimeError(f"sae-steer: {block_class} (layer {layer}) did not return (hidden_states, "
                                   f"residual) as {family.name} blocks do: refusing to steer it")
            hidden_states, residual = out
            return torch.ops.sae_steer.steer_residual(hidden_states, residual, layer), residual
    else:
        def steered_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            # Hugging Face blocks return the stream, or a tuple starting with it (older transformers).
            stream = out[0] if isinstance(out, tuple) else out
            # vLLM's Transformers backend runs Hugging Face blocks on [1, T, d]: steer the [T, d] view.
            flat = stream.reshape(-1, stream.shape[-1])
            steered = torch.ops.sae_steer.steer_residual(flat, None, layer).reshape(stream.shape)
            return (steered, *out[1:]) if isinstance(out, tuple) else steered

    block.forward = steered_forward
