"""vLLM engine options a steering engine serves, and those it refuses at startup, by name.

Every option that changes how the forward pass, the batch or the logits processors run is listed
here, so that a steered request is steered exactly or the engine refuses to start: never served
unsteered. Options not named here leave the forward pass, the batch rows and our per-request channel
as they are (chunked prefill, prefix caching with the steering's cache salt, preemption, tensor
parallelism, structured outputs, LoRA adapters: each has a test that compares the
steered tokens with the reference).

Speculative decoding is served: the target model's forward carries the edit at every position it
verifies (draft tokens are positions of the same rows, in the same token -> row map), so the accepted
tokens are those of the steered model. vLLM builds no entry-point logits processor under it, so the
worker adds ours itself (channel.install_channel). What it cannot do there is refused per request:
`logit` interventions (the rejection sampler applies no logits processor to draft positions) and
telemetry / capture (they would record rejected draft tokens).
"""
from __future__ import annotations

import logging

logger = logging.getLogger("vllm.sae_steer")

# The speculative methods with a test that steered tokens equal the reference (tests/engine/test_engine_options.py).
SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle")


def refuse_unsupported(config) -> None:
    """Raise RuntimeError naming the option when this steering engine's config has one it cannot steer under."""
    model, parallel, cache = config.model_config, config.parallel_config, config.cache_config
    refusals = []
    if model.runner_type == "pooling":
        refusals.append(("runner=pooling", "a pooling (embedding, reward, classification) runner builds no logits "
                         "processors, the per-request steering channel, and returns no completion to steer"))
    if getattr(model, "enable_prompt_embeds", False):
        refusals.append(("enable_prompt_embeds", "prompts given as embeddings carry no token ids, so `positions` "
                         "(prompt / generated) cannot be told apart"))
    if parallel.pipeline_parallel_size > 1:
        refusals.append((f"pipeline_parallel_size={parallel.pipeline_parallel_size}", "each stage holds only some "
                         "decoder layers, and the steering op and its startup check are written for one stage"))
    if parallel.data_parallel_size > 1:
        refusals.append((f"data_parallel_size={parallel.data_parallel_size}", "data-parallel engine cores have not "
                         "been tested with steering; run one sae-steer server per replica instead"))
    for name in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(parallel, name, 1) > 1:
            refusals.append((f"{name}={getattr(parallel, name)}", "context parallelism shards a request's tokens "
                             "over ranks, and the token -> row map assumes each rank sees every token"))
    if getattr(cache, "kv_offloading_size", None) is not None or config.kv_transfer_config is not None:
        refusals.append(("kv_transfer_config / kv_offloading_size", "KV blocks stored or computed outside this "
                         "engine have not been tested with steering's cache salt"))
    spec = config.speculative_config
    if spec is not None and spec.method not in SPECULATIVE_METHODS:
        refusals.append((f"speculative_config.method={spec.method}", "sae-steer steers speculative decoding with "
                         f"the methods it has tested ({', '.join(SPECULATIVE_METHODS)})"))
    if refusals:
        raise RuntimeError("sae-steer refuses to start this steering engine (steered requests could be served "
                           "unsteered): " + "; ".join(f"{option}: {why}" for option, why in refusals))


def speculative(config) -> bool:
    return config.speculative_config is not None


def logit_refusal(config) -> str | None:
    """Why this engine cannot serve `logit` interventions, or None."""
    parallel = config.parallel_config
    if parallel.tensor_parallel_size > 1:
        # Logit steering reads the whole unembedding in the worker; a sharded LM head needs collectives.
        return (f"logit interventions need tensor parallel size 1 (this engine runs {parallel.tensor_parallel_size}); "
                f"steer the residual stream with a `sae` intervention instead")
    if speculative(config):
        return ("logit interventions cannot run with speculative decoding (vLLM's rejection sampler applies no "
                "logits processor to draft tokens); steer the residual stream with a `sae` intervention instead")
    return None


def full_graphs(compilation_config) -> bool:
    """Does this engine replay the op from full CUDA graphs (so its host-side work cannot run)? One answer for
    the two choices that must agree: the table runs graph-safe (logits processor) exactly when the op is no
    piecewise split point (engine_config.choose_graph_settings)."""
    mode = compilation_config.cudagraph_mode
    return mode is not None and mode.has_full_cudagraphs()


def observe_refusal(config) -> str | None:
    """Why this engine cannot serve telemetry and capture requests, or None."""
    if full_graphs(config.compilation_config):
        return ("this engine replays steering from full CUDA graphs, where telemetry and capture cannot run: serve "
                "them with cudagraph_mode PIECEWISE (-cc.cudagraph_mode=PIECEWISE) or NONE")
    if speculative(config):
        return ("this engine runs speculative decoding, where telemetry and capture would record draft tokens that "
                "are then rejected: serve them from an engine without speculative_config")
    return None


def choose_scheduling(scheduler_config, cuda: bool) -> None:
    """Before vLLM resolves the config: no async scheduling for a steering engine on a GPU.

    Async scheduling prepares step N+1 on the host while step N still runs on the device; the steering
    table's host-to-device updates are written for steps that run in order, so a steering engine runs
    without it: left unset, it is off (logged); asked for, refused. (The CPU platform turns it off itself.)"""
    if not cuda:
        return
    if scheduler_config.async_scheduling:
        raise RuntimeError("sae-steer refuses to start this steering engine: async_scheduling=True (the steering "
                           "table's per-step updates are not double-buffered against a step still running on the "
                           "device); leave async scheduling unset, and sae-steer turns it off")
    if scheduler_config.async_scheduling is None:
        logger.info("sae-steer: async scheduling off for this steering engine (the steering table's per-step "
                    "updates run in step order)")
    scheduler_config.async_scheduling = False
