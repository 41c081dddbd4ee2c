"""SteeringTable: every request's steering in preallocated tensors, applied to a whole batch at once.

Layout (the style of vLLM's builtin logits processors: fixed tensors, updated from BatchUpdate):

    step           [1 + max_tokens, 3 + n_topk_layers] int32, this step's per-token map, written by
                   prepare_step into a pinned host buffer and copied to the device once per step:
                   row 1 + t = (slot, window start, window end, then token lists): token t's steering slot
                   (0 = none; padding past the step's tokens -> 0) and the positions where its request
                   steers (its `positions` mode folded in: [0, prompt_len), [prompt_len, 2^31 - 1) or all);
                   column 3 + j = the tokens whose slot edits a TopK SAE of the j-th layer that has any,
                   their count in row 0. The kernels read positions from the runner's own buffer.
    per steerable layer (index li), per slot s, up to E edits e (written by update(), for new slots only):
      slot_edits    [L, n_slots]    live edits of slot s at the layer; -1: the slot touches nothing there
      edit_feature  [L, n_slots, E] feature in the layer's packed dictionary (pad: the null feature)
      edit_mul      [L, n_slots, E] a - 1       with f' = a f + b, so f' - f = (a - 1) f + b
      edit_add      [L, n_slots, E] b
      gate_feature  [L, n_slots, E] `when` feature (pad: null feature, whose activation is 0)
      gate_above    [L, n_slots, E] `when` threshold (-inf when there is no `when`)
      vector        [L, n_slots, d] sum of coef * v of the slot's vectors at this layer

Requests with identical steering share a slot (refcounted by fingerprint: row_slots.RowSlots), so
256 requests with one config cost one slot. All SAEs at a layer are packed into one feature space with
b_dec folded into per-feature biases (SparseAutoencoder.packed), so one gather serves every
SAE and architecture; TopK SAEs are packed last, side by side, and their members come from a
full encode of the tokens that need it (sae_steer.kernels.full_steer).

Per layer call (`apply`) there is no Python loop over requests or tokens and nothing is computed
that depends only on the step: one kernel (`sae_steer_kernels::steer`: Triton on CUDA, torch on CPU), plus
one encode launch at a layer with TopK SAEs. A token whose slot is idle at the layer is copied; the
kernel loops over each slot's live edits only. Everything per step is in `step`, from the step's
query_start_loc (the plugin's own copy of what vLLM hands every attention backend, so no backend's
metadata is read). Two ways to run it:

    graph_safe=False  eager: layers no live slot touches are a clone (decided on the host), and TopK
                      SAEs are encoded only when a live slot edits them.
    graph_safe=True   capturable in a full CUDA graph: every per-step input is a fixed-address buffer
                      updated in place by update() / prepare_step() on the host before the forward,
                      and apply() decides nothing from them: the kernels read the live counts on the device
                      (a layer nobody steers costs one copying launch, and an encode launch that exits at
                      once where the layer has TopK SAEs). A branch frozen at capture time, when nothing was
                      steered, would otherwise drop later steering silently.

Telemetry and capture (observers.py) read results on the host: they run only where apply()'s Python
body runs (eager, or the op as a graph split point), never inside a graph being captured.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from sae_steer.kernels import ops
from sae_steer.kernels.full_steer import encode_triton
from sae_steer.kernels.sparse_steer import HAS_TRITON, WINDOW_END, sparse_steer_triton
from sae_steer.registry import Registry
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeIntervention, Steering
from sae_steer.vllm_plugin import observers
from sae_steer.vllm_plugin.row_slots import RowSlots

POSITION_MODES = {"all": 0, "prompt": 1, "generated": 2}
SLOT_TABLES = ("slot_edits", "edit_feature", "edit_mul", "edit_add", "gate_feature", "gate_above", "vector")


class LayerDictionary:
    """Every SAE registered at one layer, packed as one feature space plus a null feature (index `null`,
    zero rows and parameters, so f = 0: the padding of edit tables). TopK SAEs come last, side by side
    in [topk_lo, null), so a single TopK segment of the sparse kernel covers all of them."""

    def __init__(self, saes: dict[str, SparseAutoencoder], d_model: int, device: torch.device,
                 weight_dtype: torch.dtype = torch.float32):
        self.offset: dict[str, int] = {}
        self.topk: list[tuple[str, int, int, int]] = []  # (name, lo, hi, k) of each TopK SAE
        packed = []
        n = 0
        for name, sae in sorted(saes.items(), key=lambda item: item[1].architecture == "topk"):  # stable
            self.offset[name] = n
            if sae.architecture == "topk":
                self.topk.append((name, n, n + sae.d_sae, sae.k))
            packed.append((*sae.packed(), sae.W_dec))
            n += sae.d_sae
        self.null = n
        self.topk_lo = self.topk[0][1] if self.topk else n
        zero_row, zero = torch.zeros(1, d_model, device=device), torch.zeros(1, device=device)
        enc, gate_bias, threshold, mag_scale, mag_bias, dec = (list(part) for part in zip(*packed)) if packed \
            else ([] for _ in range(6))
        self.enc = torch.cat(enc + [zero_row]).to(weight_dtype).contiguous()  # [F+1, d]
        self.dec = torch.cat(dec + [zero_row]).to(weight_dtype).contiguous()  # [F+1, d]
        self.gate_bias = torch.cat(gate_bias + [zero])  # [F+1]
        self.threshold = torch.cat(threshold + [zero])
        self.mag_scale = torch.cat(mag_scale + [zero])
        self.mag_bias = torch.cat(mag_bias + [zero])

    def share_weights(self, saes: dict[str, SparseAutoencoder]) -> dict[str, SparseAutoencoder]:
        """The SAEs packed here, with W_enc / W_dec as views of the packed enc / dec (no second copy)."""
        return {name: replace(saes[name], W_enc=self.enc[lo:lo + saes[name].d_sae].T,
                              W_dec=self.dec[lo:lo + saes[name].d_sae]) for name, lo in self.offset.items()}

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """The activation's packed parameters, in the kernels' argument order."""
        return self.gate_bias, self.threshold, self.mag_scale, self.mag_bias


@dataclass
class _SlotInfo:
    edits: dict[int, int]  # layer index -> number of edits there
    touched: set[int]  # layer indices with any edit or vector
    saes: set[str]


@dataclass
class _LayerArgs:
    """One layer's fixed views of the table, in the kernels' argument order (built once: a layer call slices
    nothing)."""
    tables: tuple  # slot_edits, edit_feature, edit_mul, edit_add, gate_feature, gate_above, vector [li]
    topk_saes: torch.Tensor | None  # [N, 3] (lo, hi, k) of the layer's TopK SAEs; None: it has none
    rows: torch.Tensor | None  # the step's token list of the layer's TopK encode, and its count
    count: torch.Tensor | None


class SteeringTable:
    def __init__(self, registry: Registry, steerable_layers: list[int], max_rows: int, max_tokens: int,
                 max_edits: int, d_model: int, device: torch.device, graph_safe: bool = False,
                 weight_dtype: torch.dtype = torch.float32):
        """weight_dtype: the packed SAE weights (enc, dec); the serving dtype on GPU (bf16/fp16 tensor cores,
        fp32 accumulation), fp32 to keep full precision. Activation parameters and slot tables stay fp32."""
        self.registry = registry
        self.device = torch.device(device)
        self.layers = sorted(steerable_layers)
        self.layer_index = {L: i for i, L in enumerate(self.layers)}
        self.dictionaries = [LayerDictionary({n: s for n, s in registry.saes.items() if s.layer == L}, d_model, device,
                                             weight_dtype) for L in self.layers]
        # Hold every SAE's weights once: the registry's become views. In another dtype they stay the registry's
        # own (fp32: telemetry encodes with them), beside the table's packed copy.
        if weight_dtype == torch.float32:
            for dictionary in self.dictionaries:
                registry.saes.update(dictionary.share_weights(registry.saes))
        n_layers, n_slots, self.max_edits = len(self.layers), max_rows + 1, max_edits
        cuda = self.device.type == "cuda"
        # The slot tables, written on the host (per new slot, never per step) and copied to the device for the
        # slots that changed; on CPU the host tables are the device's.
        host = dict(device="cpu")
        self._host = dict(
            slot_edits=torch.full((n_layers, n_slots), -1, dtype=torch.int32, **host),
            edit_feature=torch.zeros(n_layers, n_slots, max_edits, dtype=torch.int64, **host),
            edit_mul=torch.zeros(n_layers, n_slots, max_edits, **host),
            edit_add=torch.zeros(n_layers, n_slots, max_edits, **host),
            gate_feature=torch.zeros(n_layers, n_slots, max_edits, dtype=torch.int64, **host),
            gate_above=torch.full((n_layers, n_slots, max_edits), float("-inf"), **host),
            vector=torch.zeros(n_layers, n_slots, d_model, **host))
        self._null = torch.tensor([d.null for d in self.dictionaries], dtype=torch.int64)[:, None, None]
        self._host["edit_feature"][:] = self._null
        self._host["gate_feature"][:] = self._null
        for name, t in self._host.items():
            setattr(self, name, t.to(self.device) if cuda else t)
        self.slot_positions = torch.zeros(n_slots, dtype=torch.int64)  # host: 0 all, 1 prompt, 2 generated
        self._host_vectors: dict[tuple[str, int], torch.Tensor] = {}
        # The per-step map (see the module docstring). Row max_rows is the pad row of the row arrays below:
        # no request is ever added there, so its slot stays 0.
        self.pad_row = max_rows
        self.topk_layers = [li for li, d in enumerate(self.dictionaries) if d.topk]
        self.step = torch.zeros(1 + max_tokens, 3 + len(self.topk_layers), dtype=torch.int32, device=self.device)
        self.tokens = self.step[1:]  # [max_tokens, 3 + n_topk_layers]: what the kernels read
        # Pinned host buffers, two so that a step's copy never races the host writing the next step's map.
        self._step_host = [torch.zeros(self.step.shape, dtype=torch.int32, pin_memory=True) for _ in range(2)] \
            if cuda else [self.step]
        self._step_copied: list = [None, None]
        self._step_turn = 0
        self._step_used = 0  # tokens written by the last prepare_step (the device holds 0 past them)
        # Row arrays (host, numpy), rebuilt at each batch change: each row's (slot, window start, window end),
        # and per TopK layer whether its slot edits a TopK SAE there.
        self._row_window = np.zeros((max_rows + 1, 3), dtype=np.int32)
        self._slot_topk = np.zeros((len(self.topk_layers), n_slots), dtype=bool)
        self._row_topk = np.zeros((len(self.topk_layers), max_rows + 1), dtype=bool)
        self._layer_args = []
        for li, dic in enumerate(self.dictionaries):
            tables = tuple(getattr(self, name)[li] for name in SLOT_TABLES)
            j = self.topk_layers.index(li) if dic.topk else None
            self._layer_args.append(_LayerArgs(
                tables, torch.tensor([(lo, hi, k) for _, lo, hi, k in dic.topk], dtype=torch.int32,
                                     device=self.device) if dic.topk else None,
                None if j is None else self.step[1:, 3 + j], None if j is None else self.step[0, 3 + j]))
        # The residual of blocks that return the whole stream (residual None): a zero row, broadcast, so no
        # [T, d] zeros are allocated per call.
        self.zero_residual = torch.zeros(1, d_model, device=self.device)
        # Host-side bookkeeping (Python, once per batch change; the hot path is not): row -> slot (0: none),
        # each row's data (prompt_len, telemetry / capture request: observers.py), and each live slot's
        # _SlotInfo (rows.live).
        self.rows = RowSlots(max_rows + 1, range(1, n_slots), none=0, key=Steering.fingerprint)
        self._bounds = np.zeros(1, dtype=np.int64)  # this step's query_start_loc, for telemetry / capture
        self.observed_layers: set[int] = set()
        self.layer_live = [False] * n_layers  # per layer: does any live slot touch it
        self.topk_live: list[set[str]] = [set() for _ in self.layers]
        self.graph_safe = graph_safe
        # Set by the plugin during vLLM's memory-profiling run, which has no requests: the step then takes
        # the widest path (every TopK SAE's activations allocated for every token), so the KV cache that vLLM
        # sizes from that run leaves room for what steering allocates inside the forward.
        self.worst_case = False
        # The Triton kernels: on CUDA; tests also turn it on under TRITON_INTERPRET to check the wiring.
        self.fused = HAS_TRITON and cuda

    @property
    def nbytes(self) -> int:
        """Device memory held: the packed SAEs, the registry's SAE weights (views of the packed ones in fp32,
        a copy beside them in another dtype), the slot tables, the step map and the registered vectors."""
        tensors = [t for d in self.dictionaries for t in (d.enc, d.dec, *d.params)]
        tensors += [t for sae in self.registry.saes.values() for t in (sae.W_enc, sae.W_dec)]
        tensors += [t for t in vars(self).values() if isinstance(t, torch.Tensor) and t.device == self.device]
        tensors += [v for per_layer in self.registry.vectors.values() for v in per_layer.values()]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # views count once
        return sum(storages.values())

    # ---- bookkeeping: called from the logits processor's update_state, before the forward ----

    def update(self, added: list[tuple], removed: list[int], moved: list[tuple[int, int, bool]]) -> None:
        """added: (row, steering, prompt_len[, observe]); moved: (a, b, swap).
        vLLM's order: removed, added, moved."""
        added = [(row, steering, (prompt_len, observe[0] if observe else None))
                 for row, steering, prompt_len, *observe in added]
        written: list[int] = []

        def write(slot: int, steering: Steering) -> _SlotInfo:
            written.append(slot)
            return self._write_slot(slot, steering)

        self.rows.update(added, removed, moved, write)
        if written and self.device.type != "cpu":  # one copy per table for the new slots
            slots = torch.tensor(written)
            on_device = slots.to(self.device)
            for name in SLOT_TABLES:
                getattr(self, name).index_copy_(1, on_device, self._host[name][:, slots].to(self.device))
        self._refresh_rows()
        self._refresh_layer_flags()

    def _host_vector(self, name: str, layer: int) -> torch.Tensor:
        key = (name, layer)
        if key not in self._host_vectors:
            self._host_vectors[key] = self.registry.vectors[name][layer].float().cpu()
        return self._host_vectors[key]

    def _write_slot(self, slot: int, steering: Steering) -> _SlotInfo:
        """Rewrite every layer's entries of `slot` in the host tables (one assignment per table and layer)."""
        h = self._host
        self.slot_positions[slot] = POSITION_MODES[steering.positions]
        h["slot_edits"][:, slot] = -1
        h["edit_feature"][:, slot] = self._null[:, 0]
        h["gate_feature"][:, slot] = self._null[:, 0]
        h["edit_mul"][:, slot] = 0.0
        h["edit_add"][:, slot] = 0.0
        h["gate_above"][:, slot] = float("-inf")
        h["vector"][:, slot] = 0.0
        info = _SlotInfo({}, set(), set())
        edits: dict[int, list[tuple]] = {}
        for iv in steering.interventions:
            if isinstance(iv, SaeIntervention):
                li = self.layer_index[self.registry.saes[iv.sae].layer]
                dictionary = self.dictionaries[li]
                a, b = iv.edit_coefficients()
                gate, above = (dictionary.null, float("-inf")) if iv.when is None else \
                    (dictionary.offset[iv.sae] + iv.when.feature, iv.when.above)
                edits.setdefault(li, []).append((dictionary.offset[iv.sae] + iv.feature, a - 1.0, b, gate, above))
                info.touched.add(li)
                info.saes.add(iv.sae)
            elif iv.values is not None:
                li = self.layer_index[iv.layer]
                h["vector"][li, slot] += iv.coef * torch.tensor(iv.values)
                info.touched.add(li)
            else:
                for layer in self.registry.vectors[iv.vector]:
                    if iv.layer is None or iv.layer == layer:
                        li = self.layer_index[layer]
                        h["vector"][li, slot] += iv.coef * self._host_vector(iv.vector, layer)
                        info.touched.add(li)
        for li, rows in edits.items():
            n = len(rows)
            feature, mul, add, gate, above = zip(*rows)
            h["edit_feature"][li, slot, :n] = torch.tensor(feature)
            h["edit_mul"][li, slot, :n] = torch.tensor(mul)
            h["edit_add"][li, slot, :n] = torch.tensor(add)
            h["gate_feature"][li, slot, :n] = torch.tensor(gate)
            h["gate_above"][li, slot, :n] = torch.tensor(above)
            info.edits[li] = n
        for li in info.touched:
            h["slot_edits"][li, slot] = info.edits.get(li, 0)
        topk_names = [{name for name, *_ in self.dictionaries[li].topk} for li in self.topk_layers]
        self._slot_topk[:, slot] = [bool(names & info.saes) for names in topk_names]
        return info

    def _refresh_rows(self) -> None:
        """The row arrays that prepare_step repeats per token: (slot, window) and the TopK flags."""
        slot = np.asarray(self.rows.row_slot, dtype=np.int32)
        plen = np.array([data[0] if data else 0 for data in self.rows.row_data], dtype=np.int32)
        mode = self.slot_positions.numpy()[slot]
        self._row_window[:, 0] = slot
        self._row_window[:, 1] = np.where(mode == POSITION_MODES["generated"], plen, 0)
        self._row_window[:, 2] = np.where(mode == POSITION_MODES["prompt"], plen, WINDOW_END)
        self._row_topk[:] = self._slot_topk[:, slot] & (slot != 0)

    def _refresh_layer_flags(self) -> None:
        infos = list(self.rows.live.values())
        for li, dictionary in enumerate(self.dictionaries):
            live = [s for s in infos if li in s.touched]
            self.layer_live[li] = bool(live)
            self.topk_live[li] = {name for name, *_ in dictionary.topk if any(name in s.saes for s in live)}
        self.observed_layers = set()
        for observe in filter(None, (data[1] for data in self.rows.row_data if data)):
            if "telemetry" in observe:
                self.observed_layers.add(self.registry.saes[observe["telemetry"]["sae"]].layer)
            self.observed_layers.update(observe.get("capture", {}).get("layers", ()))

    def prepare_step(self, query_start_loc: torch.Tensor) -> None:
        """query_start_loc: CPU ints [n_rows + 1], row i's tokens are [qsl[i], qsl[i+1]). Called on the host
        before every forward, outside any captured graph: writes this step's map into `step` in place (same
        address; one copy from pinned memory on CUDA), so a replayed graph reads this step's map. Tokens past
        qsl[-1] (padding) get slot 0. Eager, a step that steers nothing never reads the map: it is not
        written then (update() runs before this, so a request added in this step is already live)."""
        bounds = query_start_loc.numpy()
        n = int(bounds[-1])
        if n > self.tokens.shape[0]:
            raise ValueError(f"{n} tokens in a step, but the table was sized for max_tokens={self.tokens.shape[0]}")
        self._bounds = bounds
        if not (self.graph_safe or any(self.layer_live)):
            return
        turn = self._step_turn
        if self._step_copied[turn] is not None:  # this buffer's previous copy must have left it
            self._step_copied[turn].synchronize()
        buf = self._step_host[turn].numpy()
        counts = np.diff(bounds)
        n_rows = len(counts)
        used = max(n, self._step_used)
        buf[1:1 + n, :3] = np.repeat(self._row_window[:n_rows], counts, axis=0)
        buf[1 + n:1 + used, :3] = 0
        for j in range(len(self.topk_layers)):
            listed = np.flatnonzero(np.repeat(self._row_topk[j, :n_rows], counts))
            buf[0, 3 + j] = len(listed)
            buf[1:1 + len(listed), 3 + j] = listed
        if self.device.type != "cpu":
            self.step[:1 + used].copy_(self._step_host[turn][:1 + used], non_blocking=True)
            event = torch.cuda.Event() if self.device.type == "cuda" else None
            if event is not None:
                event.record()
            self._step_copied[turn] = event
            self._step_turn = 1 - turn
        self._step_used = n

    # ---- the hot path: one call per steerable layer per forward step ----

    def apply(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None,
              positions: torch.Tensor) -> torch.Tensor:
        """hidden, residual [T, d] (the residual stream is their sum; residual None: hidden is the whole stream)
        -> hidden with every row's steering added. T may include padding past the step's tokens (prepare_step
        maps it to no steering)."""
        if residual is None:
            if self.zero_residual.dtype != hidden.dtype:  # once, at the first (warm-up) step: a fixed address
                self.zero_residual = self.zero_residual.to(hidden.dtype)
            residual = self.zero_residual.expand_as(hidden)
        out = self.steer(layer, hidden, residual, positions)
        if layer in self.observed_layers and not (hidden.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._observe(layer, hidden, residual, out, positions)
        return out

    def steer(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """apply() without the observers. With graph_safe: fixed shapes, no host reads, no branch on table
        contents (this is what a captured graph replays)."""
        li = self.layer_index[layer]
        every_step = self.graph_safe or self.worst_case
        if not (every_step or self.layer_live[li]):
            return hidden.clone()
        if hidden.shape[0] > self.tokens.shape[0]:  # a shape, not a value: fine in a captured graph
            raise ValueError(f"{hidden.shape[0]} tokens in a step, but the table was sized for "
                             f"max_tokens={self.tokens.shape[0]}")
        dic, args = self.dictionaries[li], self._layer_args[li]
        acts = None
        if args.topk_saes is not None and (every_step or self.topk_live[li]):
            if self.fused:
                acts = encode_triton(hidden, residual, dic.enc, *dic.params, dic.topk_lo, dic.null, args.rows,
                                     args.count)
            else:
                acts = ops.encode_rows(hidden, residual, args.rows, args.count, dic.enc, *dic.params, dic.topk_lo,
                                       dic.null)
        if self.fused:
            return sparse_steer_triton(hidden, residual, positions, self.tokens, *args.tables, dic.enc, dic.dec,
                                       *dic.params, None if acts is None else (acts, args.topk_saes, dic.topk_lo))
        return ops.steer(hidden, residual, positions, self.tokens, *args.tables, dic.enc, dic.dec, *dic.params,
                         acts, args.topk_saes if acts is not None else None, dic.topk_lo)

    def _observe(self, layer: int, hidden: torch.Tensor, residual: torch.Tensor, steered: torch.Tensor,
                 positions: torch.Tensor) -> None:
        """Telemetry and capture for the rows that asked (a Python loop over those rows only)."""
        bounds = self._bounds
        for row in range(len(bounds) - 1):
            data = self.rows.row_data[row]
            if not (data and data[1]):
                continue
            (plen, observe), seg = data, slice(bounds[row], bounds[row + 1])
            pos = positions[seg]
            telemetry = observe.get("telemetry")
            if telemetry and self.registry.saes[telemetry["sae"]].layer == layer:
                produces = pos >= plen - 1  # positions whose logits pick a generated token
                if produces.any():
                    sae = self.registry.saes[telemetry["sae"]]
                    f = sae.encode((steered[seg] + residual[seg]).float()[produces])  # [n, d_sae]
                    top = f.topk(min(int(telemetry["top_k"]), sae.d_sae), dim=-1)
                    observers.record_telemetry(telemetry["id"], pos[produces].tolist(), top.indices.tolist(),
                                               top.values.tolist(), first=bool((pos == plen - 1).any()))
            capture = observe.get("capture")
            if capture and layer in capture["layers"]:
                if capture.get("positions") == "all":  # every prompt position of this chunk
                    prompt = (pos < plen).nonzero().flatten()
                    if len(prompt):
                        observers.record_capture_positions(capture["id"], layer, pos[prompt],
                                                           (hidden[seg] + residual[seg])[prompt])
                else:
                    last = (pos == plen - 1).nonzero()
                    if len(last):
                        observers.record_capture(capture["id"], layer,
                                                 (hidden[seg] + residual[seg])[int(last[0, 0])])
