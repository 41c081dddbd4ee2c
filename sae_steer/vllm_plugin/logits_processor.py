"""SteeringLogitsProcessor: the per-request steering channel of vLLM's V1 batched logits processors.

- `validate_params` (front end, at admission): parses `SamplingParams.extra_args["steering"]`
  against the served model; a ValueError fails that request only (HTTP 400 online).
- `__init__` (worker): loads the registry and allocates the SteeringTable that the in-model op reads.
- `update_state` (worker, before each forward): maps persistent-batch rows to steering slots.
- `apply`: adds the logit biases of requests with `logit` interventions (logit_bias.py) and returns
  at once when the batch has none, so unsteered rows are never touched. An engine with registered
  SAEs may receive such requests, so its processor is not argmax-invariant (vLLM skips argmax-invariant
  processors for greedy requests); without SAEs it is, and `apply` is never needed for greedy rows.

vLLM loads every `vllm.logits_processors` entry point into every engine, and Model Runner V2
refuses classes that do not subclass its own LogitsProcessor. So that merely having sae-steer
installed never breaks a V2 engine, the class also implements the V2 interface: inert without
sae_steer settings, and a loud refusal at startup with them (the per-request channel here is V1's).
"""
from __future__ import annotations

import logging

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

try:  # Model Runner V2's interface (vLLM >= 0.32)
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor
except ImportError:  # pragma: no cover - older vLLM: V1 only
    V2LogitsProcessor = object

from sae_steer.registry import Registry
from sae_steer.spec import LogitIntervention, SteeringError, parse_capture, parse_steering, parse_telemetry
from sae_steer.vllm_plugin import adapters, engine_options, facts, frontend, observers, slot_stats, steering_op, wiring
from sae_steer.vllm_plugin.logit_bias import LogitBias, head_of_vllm
from sae_steer.vllm_plugin.table import SteeringTable

logger = logging.getLogger("vllm.sae_steer")


def _split(steering):
    """-> (the residual-stream part for the SteeringTable or None, the logit part as a LogitBias key or None)."""
    if steering is None:
        return None, None
    logit = [iv for iv in steering.interventions if isinstance(iv, LogitIntervention)]
    if not logit:
        return steering, None
    residual = [iv for iv in steering.interventions if not isinstance(iv, LogitIntervention)]
    key = tuple((iv.sae, iv.feature, iv.strength) for iv in logit)
    return (steering.model_copy(update={"interventions": residual}) if residual else None), key


def _observe_arg(params) -> dict | None:
    """Telemetry / capture requests, set by sae-steer's HTTP server (see observers.py); validated at
    admission by `validate_params` (parse_telemetry / parse_capture), so the worker reads them as is."""
    extra = (params.extra_args or {}) if params is not None else {}
    observe = {name: extra[key] for name, key in (("telemetry", observers.TELEMETRY_KEY),
                                                  ("capture", observers.CAPTURE_KEY)) if extra.get(key) is not None}
    return observe or None


class SteeringLogitsProcessor(LogitsProcessor, V2LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Every value the plugin reads from `extra_args` is checked here, at admission, so a malformed
        request fails alone (VLLMValidationError naming the field) and never reaches the worker's op."""
        extra = sampling_params.extra_args if sampling_params is not None else None
        if not extra:
            return
        try:
            if not isinstance(extra, dict):
                raise SteeringError("extra_args", f"must be a dict, got {type(extra).__name__}")
            # None is absent (as in frontend.steering_arg and the worker's _observe_arg)
            ours = sorted(k for k, v in extra.items() if v is not None and (k == "steering" or (
                isinstance(k, str) and k.startswith("sae_steer_"))))
            if not ours:
                return
            unknown = [k for k in ours if k not in ("steering", observers.TELEMETRY_KEY, observers.CAPTURE_KEY)]
            if unknown:
                raise SteeringError(unknown[0], "unknown key: the `sae_steer_` prefix of extra_args is reserved for "
                                                f"{observers.TELEMETRY_KEY!r} and {observers.CAPTURE_KEY!r}")
            model_facts = facts.current()
            if model_facts is None:
                raise SteeringError(ours[0], "this engine does not serve steering: start it with "
                                             "additional_config={'sae_steer': {...}} and the sae_steer plugin enabled")
            if "steering" in ours:  # parsed once in this process: frontend.py sends what this returns
                frontend.admit(extra["steering"], parse_steering(extra["steering"], model_facts))
            if observers.TELEMETRY_KEY in ours:
                parse_telemetry(extra[observers.TELEMETRY_KEY], model_facts, observers.TELEMETRY_KEY, internal=True)
            if observers.CAPTURE_KEY in ours:
                parse_capture(extra[observers.CAPTURE_KEY], model_facts, observers.CAPTURE_KEY)
            observed = [k for k in ours if k != "steering"]
            if observed and facts.current_observe_refusal() is not None:
                raise SteeringError(observed[0], facts.current_observe_refusal())
            if observed:
                try:  # the worker writes there: refuse here rather than in the model's forward pass
                    observers.check_runtime_dir()
                except observers.RuntimeDirError as e:
                    raise SteeringError(observed[0], str(e)) from None
        except SteeringError as e:  # -> HTTP 400 with OpenAI's `param` set to the field
            from vllm.exceptions import VLLMValidationError
            raise VLLMValidationError(str(e), parameter=e.field) from None

    def __init__(self, vllm_config, device_or_req_states, is_pin_memory: bool | None = None):
        # V1 calls (vllm_config, device, is_pin_memory); V2 calls (vllm_config, req_states).
        self.facts = facts.facts_for(vllm_config)
        self.table = None
        self.logit = None  # LogitBias, when this engine serves logit interventions
        if is_pin_memory is None:
            if self.facts is not None:
                raise RuntimeError("sae-steer steers through vLLM's V1 model runner, but this engine runs Model "
                                   "Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1?): unset VLLM_USE_V2_MODEL_RUNNER, or "
                                   "remove the sae_steer settings to serve without steering")
            return
        device = device_or_req_states
        steering_op.set_table(None)  # never steer with a table left by an earlier engine in this process
        steering_op.on_model_loaded = None
        steering_op._runner = None  # nor keep an earlier engine's runner (and its model) alive
        if self.facts is None:
            return
        # Only engines that ask for steering wire the op into the worker (see vllm_plugin/__init__.py).
        wiring.install("the worker hooks", steering_op.install_worker_hooks)
        wiring.require_complete()
        settings = facts.settings_of(vllm_config)
        registry = Registry.load(settings, device)
        compilation = vllm_config.compilation_config
        # Every token count a forward may see: scheduled steps, and the padded sizes of captured graphs.
        max_tokens = max(vllm_config.scheduler_config.max_num_batched_tokens,
                         compilation.max_cudagraph_capture_size or 0)
        self.table = SteeringTable(registry, sorted(self.facts.steerable_layers),
                                   max_rows=vllm_config.scheduler_config.max_num_seqs, max_tokens=max_tokens,
                                   max_edits=self.facts.max_interventions, d_model=self.facts.d_model, device=device,
                                   graph_safe=engine_options.full_graphs(compilation),
                                   weight_dtype=settings.packed_weight_dtype(torch.device(device).type == "cuda",
                                                                             vllm_config.model_config.dtype))
        steering_op.set_table(self.table)
        if registry.saes and self.facts.logit_refusal is None:
            self.registry = registry
            self.family = adapters.family_of(vllm_config.model_config.architectures)
            self.vocab = vllm_config.model_config.get_vocab_size()
            self.logit = LogitBias(vllm_config.scheduler_config.max_num_seqs, self.vocab, device)
            self._head = None  # the model's unembedding and final norm: read right after the model is loaded,
            steering_op.on_model_loaded = self._read_head  # so an unreadable head refuses the engine at startup
        elif registry.saes:
            logger.warning("sae-steer: this engine refuses logit interventions: %s", self.facts.logit_refusal)
        logger.info("sae-steer: steering %d SAE(s), %d vector(s) at layers %s, %.1f MB held on %s (V1 model runner, "
                    "cudagraph mode %s%s)", len(registry.saes), len(registry.vectors),
                    sorted(self.facts.steerable_layers), self.table.nbytes / 2**20, device,
                    compilation.cudagraph_mode.name if compilation.cudagraph_mode is not None else "NONE",
                    ", graph-safe table" if self.table.graph_safe else "")

    def is_argmax_invariant(self) -> bool:
        return self.logit is None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if self.table is None or batch_update is None:
            return
        added, logit_added = [], []
        for row, params, prompt_ids, _output_ids in batch_update.added:
            residual, logit_key = _split(self._parse(params))
            added.append((row, residual, len(prompt_ids or ()), _observe_arg(params)))
            logit_added.append((row, logit_key))
        moved = [(a, b, d == MoveDirectionality.SWAP) for a, b, d in batch_update.moved]
        self.table.update(added, list(batch_update.removed), moved)
        if self.logit is not None:
            self.logit.update(logit_added, list(batch_update.removed), moved, self._logit_bias)
        slot_stats.publish(self.table, self.logit)  # for the API server's /metrics

    def _parse(self, params):
        steering = frontend.steering_arg(params)
        if steering is None:
            return None
        # Checked at admission against the same settings; parsed (once) here because only plain data
        # (Steering.wire()) crosses the process boundary.
        return parse_steering(steering, self.facts)

    def _read_head(self, model: torch.nn.Module) -> None:
        self._head = head_of_vllm(model, self.family, self.vocab)

    def _logit_bias(self, key) -> torch.Tensor:
        """The bias row of a logit steering key ((sae, feature, strength), ...): computed once per distinct key."""
        directions = torch.stack([self.registry.saes[sae].W_dec[feature] for sae, feature, _ in key])
        return self._head.bias(directions, [strength for _, _, strength in key])

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        return logits if self.logit is None else self.logit.apply(logits)

    # ---- Model Runner V2 (only ever inert: see the module docstring) ----

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False
