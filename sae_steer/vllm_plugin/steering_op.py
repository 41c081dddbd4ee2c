"""The in-model steering op `torch.ops.sae_steer.steer_residual`, its wiring into vLLM's worker, and the
startup check that proves it runs.

Why an opaque custom op and not a forward hook: vLLM compiles the model with torch.compile, and
PyTorch forward hooks never fire in the compiled graph (steering would silently vanish). Each
steerable block instance gets a forward that calls the op (`adapters.attach`) after the model is
loaded and before it is compiled, so the compiler traces the call into the graph; being opaque,
the op's body runs at every step, eager, compiled, or as a piecewise-CUDA-graph split point. In a
full CUDA graph the body's tensor work is captured once and replayed: the table then runs its
graph-safe path (fixed-address buffers updated in place, no host reads, no Python branch on
per-step data).

The body reads only state the plugin keeps itself, never the attention backend's metadata
(FlashInfer's has no `query_start_loc`):
- the SteeringTable (filled by the logits processor's `update_state` before each forward), whose
  token -> row map `prepare_step` writes from the runner's `query_start_loc` after vLLM's
  `_prepare_inputs`;
- the runner's `positions` buffer (a fixed-address tensor: vLLM's model input).

Worker-side wiring is installed only by an engine that has sae_steer settings (from the logits
processor's __init__), and is inert for runners of engines that have none.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging

import torch

from sae_steer.vllm_plugin import adapters

logger = logging.getLogger("vllm.sae_steer")

# The worker's table and model runner (one steering engine per worker process at a time).
_table = None
_runner = None
# Calls of the op's body per layer between the model's load and the startup check, which reads them
# (counted only then: the check is their only reader).
calls: collections.Counter = collections.Counter()
_counting = False
# Run with the loaded model (before warm-up): the logits processor reads the unembedding for logit steering.
on_model_loaded = None


def set_table(table) -> None:
    global _table
    _table = table


def steer_residual(hidden: torch.Tensor, residual: torch.Tensor | None, layer: int) -> torch.Tensor:
    """hidden [T, d] -> hidden + this step's steering delta for every token (a new tensor, never an alias).

    The residual stream is hidden + residual (blocks that defer the residual add), or hidden alone
    (residual None: blocks that return the whole stream). residual is read only."""
    if _counting:
        calls[layer] += 1
    if _table is None or _runner is None:
        return hidden.clone()
    return _table.apply(layer, hidden, residual, _runner.positions[: hidden.shape[0]])


# Defined with torch.library.Library rather than the @custom_op decorator: the decorator's Python wrapper costs
# ~7 us of host time per call on top of the body, the plain definition ~1.5 us, and an op that runs eagerly (no
# CUDA graphs, or as a piecewise split point) pays it at every steerable layer of every step. The same
# functional schema, one implementation for every device, and a shape-only version for tracing.
_LIB = torch.library.Library("sae_steer", "DEF")
_LIB.define("steer_residual(Tensor hidden, Tensor? residual, int layer) -> Tensor")
_LIB.impl("steer_residual", steer_residual, "CompositeExplicitAutograd")
torch.library.register_fake("sae_steer::steer_residual", lib=_LIB)(lambda hidden, residual, layer: torch.empty_like(hidden))


# ---- wiring into the worker (V1 model runner), installed by steering engines only ----

def _steering_facts(vllm_config):
    from sae_steer.vllm_plugin.facts import facts_for
    return facts_for(vllm_config)


def attach_to_model(runner) -> None:
    """After load: attach the op to every steerable block of the runner's model."""
    global _runner, _counting
    facts = _steering_facts(runner.vllm_config)
    if facts is None:
        return
    config = runner.vllm_config.model_config
    family = adapters.family_of(config.architectures)
    blocks = adapters.blocks_of(runner.get_model(), family, config.get_total_num_hidden_layers())
    for layer in sorted(facts.steerable_layers):
        adapters.attach(blocks[layer], layer, family)
    _runner = runner
    runner.sae_steer_steerable = sorted(facts.steerable_layers)
    if on_model_loaded is not None:
        on_model_loaded(runner.get_model())
    calls.clear()
    _counting = True
    logger.info("sae-steer: %s family, steering op attached after decoder blocks %s (%s)", family.name,
                runner.sae_steer_steerable, type(blocks[0]).__name__)


def verify(runner) -> None:
    """After vLLM's warm-up (profiling, compilation, CUDA-graph capture): prove that the op ran at every
    steerable layer, in this engine's compile and graph mode, or refuse to start.

    Catches a block class whose forward does not reach the op, a model that does not call its blocks
    as the family table says, a vLLM refactor, and a compile or graph mode that drops the op."""
    global _counting
    layers = getattr(runner, "sae_steer_steerable", None)
    if layers is None:
        return
    if any(calls[L] == 0 for L in layers):
        # Eager engines run no forward at startup: run a canary step (no requests, so no steering).
        runner._dummy_run(min(8, runner.scheduler_config.max_num_batched_tokens))
    missing = [L for L in layers if calls[L] == 0]
    _counting = False
    # The per-request channel: the batch's logits processors must include the one that fills this table
    # (update_state before every forward), or requests would reach the op without their steering.
    channel = [p for p in runner.input_batch.logitsprocs.all if getattr(p, "table", None) is _table]
    if _table is None or not channel:
        raise RuntimeError("sae-steer: this engine's batch has no sae-steer logits processor feeding the steering "
                           "table (vLLM built the logits processors without it), so steered requests would be "
                           "served unsteered: this engine refuses to start")
    if missing:
        blocks = adapters.blocks_of(runner.get_model(), adapters.family_of(runner.vllm_config.model_config.architectures),
                                    runner.vllm_config.model_config.get_total_num_hidden_layers())
        names = ", ".join(f"layer {L} ({type(blocks[L]).__module__}.{type(blocks[L]).__name__})" for L in missing)
        raise RuntimeError(f"sae-steer: the steering op never ran at {names} during the startup check "
                           f"(compilation mode {runner.vllm_config.compilation_config.mode}, cudagraph mode "
                           f"{runner.vllm_config.compilation_config.cudagraph_mode}): steered requests would be "
                           f"served unsteered, so this engine refuses to start")
    logger.info("sae-steer: startup check passed: the steering op ran at layers %s", layers)


def _wrap(cls, name: str, *, after=None, around=None) -> None:
    """Wrap cls.<name>: after(self) runs after it, or it runs inside the context around(self) (once per class)."""
    original = cls.__dict__.get(name)
    if original is None:
        raise LookupError(f"{cls.__module__}.{cls.__qualname__}.{name}")
    if getattr(original, "_sae_steer_wrapped", False):
        return

    @functools.wraps(original)
    def wrapped(self, *args, **kwargs):
        with around(self) if around else contextlib.nullcontext():
            result = original(self, *args, **kwargs)
        if after:
            after(self)
        return result

    wrapped._sae_steer_wrapped = True
    setattr(cls, name, wrapped)


def _prepare_step(runner) -> None:
    if _table is not None and runner is _runner:
        _table.prepare_step(runner.query_start_loc.cpu[: runner.input_batch.num_reqs + 1])


@contextlib.contextmanager
def _worst_case(runner):
    """vLLM's profiling run: the table takes its widest path (see SteeringTable.worst_case)."""
    table = _table if runner is _runner else None
    if table is not None:
        table.worst_case = True
    try:
        yield
    finally:
        if table is not None:
            table.worst_case = False


def _verify_worker(worker) -> None:
    verify(worker.model_runner)


def install_worker_hooks() -> None:
    """Wrap the V1 runner's load / input preparation / memory profiling and the worker's warm-up. Raises ImportError or
    LookupError naming the missing piece when vLLM has moved one (the caller refuses to steer)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker
    runners, workers = [GPUModelRunner], [Worker]
    try:  # the CPU build overrides load_model and compile_or_warm_up_model
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        from vllm.v1.worker.cpu_worker import CPUWorker
        runners.append(CPUModelRunner)
        workers.append(CPUWorker)
    except ImportError:
        pass
    for cls in runners:
        if "load_model" in cls.__dict__:
            _wrap(cls, "load_model", after=attach_to_model)
    _wrap(GPUModelRunner, "_prepare_inputs", after=_prepare_step)
    _wrap(GPUModelRunner, "profile_run", around=_worst_case)
    for cls in workers:
        if "compile_or_warm_up_model" in cls.__dict__:
            _wrap(cls, "compile_or_warm_up_model", after=_verify_worker)
