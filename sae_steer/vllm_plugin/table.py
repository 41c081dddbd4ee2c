"""SteeringTable: every request's steering in preallocated tensors, applied to a whole batch at once.

Layout (the style of vLLM's builtin logits processors: fixed tensors, updated from BatchUpdate):

    token_row       [max_tokens]    this step's token -> persistent-batch row (prepare_step); padding -> pad row
    row_slot        [max_rows + 1]  persistent-batch row -> steering slot (0 = no steering; the pad row's is 0)
    row_prompt_len  [max_rows + 1]  for positions = prompt | generated
    slot_positions  [n_slots]       0 all, 1 prompt, 2 generated
    per steerable layer (index li), per slot s, up to E edits e:
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
full encode (sae_steer.kernels.full_steer.topk_segment).

`apply` has no Python loop over requests or tokens: the token -> row map is written by
`prepare_step` from the step's query_start_loc (the plugin's own copy of what vLLM hands every
attention backend, so no backend's metadata is read). The math is the kernels' (sparse_steer):
the Triton kernel on CUDA, torch elsewhere. Two ways to run it:

    graph_safe=False  eager: layers no live slot touches are skipped, the edit tables are cut to the
                      widest live slot (edits_in_use), TopK SAEs are encoded only when a live slot
                      edits them, and the CPU path multiplies by the batch's distinct features only.
    graph_safe=True   capturable in a full CUDA graph: every per-step input is a fixed-address buffer
                      updated in place by update() / prepare_step() on the host before the forward,
                      and apply() decides nothing from them: always the full table width, every TopK
                      SAE of the layer encoded, no host reads. A branch frozen at capture time, when
                      nothing was steered, would otherwise drop later steering silently.

Telemetry and capture (observers.py) read results on the host: they run only where apply()'s Python
body runs (eager, or the op as a graph split point), never inside a graph being captured.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from sae_steer.kernels.full_steer import topk_segment
from sae_steer.kernels.sparse_steer import HAS_TRITON, sparse_steer, sparse_steer_triton
from sae_steer.registry import Registry
from sae_steer.sae import SparseAutoencoder
from sae_steer.spec import SaeIntervention, Steering
from sae_steer.vllm_plugin import observers
from sae_steer.vllm_plugin.row_slots import RowSlots

POSITION_MODES = {"all": 0, "prompt": 1, "generated": 2}


class LayerDictionary:
    """Every SAE registered at one layer, packed as one feature space plus a null feature (index `null`,
    zero rows and parameters, so f = 0: the padding of edit tables). TopK SAEs come last, side by side
    in [topk_lo, null), so a single TopK segment of the sparse kernel covers all of them."""

    def __init__(self, saes: dict[str, SparseAutoencoder], d_model: int, device: torch.device):
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
        self.enc = torch.cat(enc + [zero_row]).contiguous()  # [F+1, d]
        self.dec = torch.cat(dec + [zero_row]).contiguous()  # [F+1, d]
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


class SteeringTable:
    def __init__(self, registry: Registry, steerable_layers: list[int], max_rows: int, max_tokens: int,
                 max_edits: int, d_model: int, device: torch.device, graph_safe: bool = False):
        self.registry = registry
        self.layers = sorted(steerable_layers)
        self.layer_index = {L: i for i, L in enumerate(self.layers)}
        self.dictionaries = [LayerDictionary({n: s for n, s in registry.saes.items() if s.layer == L}, d_model, device)
                             for L in self.layers]
        for dictionary in self.dictionaries:  # hold every SAE's weights once: the registry's become views
            registry.saes.update(dictionary.share_weights(registry.saes))
        n_layers, n_slots, self.max_edits = len(self.layers), max_rows + 1, max_edits
        i64 = dict(dtype=torch.int64, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        # Row max_rows is the pad row: the tokens a captured batch size adds past the step's real ones map
        # to it, and its slot stays 0 (no steering) because no request is ever added there.
        self.pad_row = max_rows
        self.token_row = torch.full((max_tokens,), self.pad_row, **i64)
        self.row_slot = torch.zeros(max_rows + 1, **i64)
        self.row_prompt_len = torch.zeros(max_rows + 1, **i64)
        self.slot_positions = torch.zeros(n_slots, **i64)
        self.edit_feature = torch.zeros(n_layers, n_slots, max_edits, **i64)
        self.edit_mul = torch.zeros(n_layers, n_slots, max_edits, **f32)
        self.edit_add = torch.zeros(n_layers, n_slots, max_edits, **f32)
        self.gate_feature = torch.zeros(n_layers, n_slots, max_edits, **i64)
        self.gate_above = torch.full((n_layers, n_slots, max_edits), float("-inf"), **f32)
        self.vector = torch.zeros(n_layers, n_slots, d_model, **f32)
        # The residual of blocks that return the whole stream (residual None): a zero row, broadcast, so no
        # [T, d] zeros are allocated per call.
        self.zero_residual = torch.zeros(1, d_model, **f32)
        for li, dictionary in enumerate(self.dictionaries):
            self.edit_feature[li].fill_(dictionary.null)
            self.gate_feature[li].fill_(dictionary.null)
        # Host-side bookkeeping (Python, once per batch change; the hot path is not): row -> slot (0: none),
        # each row's data (prompt_len, telemetry / capture request: observers.py), and each live slot's
        # _SlotInfo (rows.live).
        self.rows = RowSlots(max_rows + 1, range(1, n_slots), none=0, key=Steering.fingerprint)
        self._bounds: list[int] = [0]  # this step's query_start_loc, for telemetry / capture
        self.observed_layers: set[int] = set()
        self.edits_in_use = [0] * n_layers  # per layer: the widest slot's edit count (E of this step)
        self.layer_live = [False] * n_layers  # per layer: does any live slot touch it
        self.topk_live: list[set[str]] = [set() for _ in self.layers]
        # (lo, hi, k) of the TopK SAEs a step encodes, per layer: all of them, or those a live slot edits
        self._topk_all = [[(lo, hi, k) for _, lo, hi, k in d.topk] for d in self.dictionaries]
        self._topk_edited = [[] for _ in self.layers]
        # The same on the device, per layer: the graph-safe path's TopK encode skips its work when 0 (a
        # replayed graph cannot branch on the host's sets, but the kernel can read this).
        self.topk_live_flag = torch.zeros(n_layers, dtype=torch.int32, device=device)
        self.graph_safe = graph_safe
        # Set by the plugin during vLLM's memory-profiling run, which has no requests: the step then takes
        # the widest path (full table width, every TopK SAE encoded full-width), so the KV cache that vLLM
        # sizes from that run leaves room for what steering allocates inside the forward.
        self.worst_case = False
        # The Triton kernel: on CUDA; tests also turn it on under TRITON_INTERPRET to check the wiring.
        self.fused = HAS_TRITON and torch.device(device).type == "cuda"

    @property
    def nbytes(self) -> int:
        """Device memory held: the packed SAEs (the registry's weights are views of them), the slot tables
        and the registered vectors."""
        tensors = [t for d in self.dictionaries for t in (d.enc, d.dec, *d.params)]
        tensors += [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        tensors += [v for per_layer in self.registry.vectors.values() for v in per_layer.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # ---- bookkeeping: called from the logits processor's update_state, before the forward ----

    def update(self, added: list[tuple], removed: list[int], moved: list[tuple[int, int, bool]]) -> None:
        """added: (row, steering, prompt_len[, observe]); moved: (a, b, swap).
        vLLM's order: removed, added, moved."""
        added = [(row, steering, (prompt_len, observe[0] if observe else None))
                 for row, steering, prompt_len, *observe in added]
        self.rows.update(added, removed, moved, self._write_slot)
        self.row_slot.copy_(torch.tensor(self.rows.row_slot), non_blocking=True)
        self.row_prompt_len.copy_(torch.tensor([data[0] if data else 0 for data in self.rows.row_data]),
                                  non_blocking=True)
        self._refresh_layer_flags()

    def _write_slot(self, slot: int, steering: Steering) -> _SlotInfo:
        self.slot_positions[slot] = POSITION_MODES[steering.positions]
        self.vector[:, slot].zero_()
        self.gate_above[:, slot].fill_(float("-inf"))
        for li, dictionary in enumerate(self.dictionaries):
            self.edit_feature[li, slot].fill_(dictionary.null)
            self.gate_feature[li, slot].fill_(dictionary.null)
        self.edit_mul[:, slot].zero_()
        self.edit_add[:, slot].zero_()
        info = _SlotInfo({}, set(), set())
        for iv in steering.interventions:
            if isinstance(iv, SaeIntervention):
                li = self.layer_index[self.registry.saes[iv.sae].layer]
                dictionary, e = self.dictionaries[li], info.edits.get(li, 0)
                a, b = iv.edit_coefficients()
                self.edit_feature[li, slot, e] = dictionary.offset[iv.sae] + iv.feature
                self.edit_mul[li, slot, e] = a - 1.0
                self.edit_add[li, slot, e] = b
                if iv.when is not None:
                    self.gate_feature[li, slot, e] = dictionary.offset[iv.sae] + iv.when.feature
                    self.gate_above[li, slot, e] = iv.when.above
                info.edits[li] = e + 1
                info.touched.add(li)
                info.saes.add(iv.sae)
            elif iv.values is not None:
                li = self.layer_index[iv.layer]
                self.vector[li, slot] += iv.coef * torch.tensor(iv.values, device=self.vector.device)
                info.touched.add(li)
            else:
                for layer, v in self.registry.vectors[iv.vector].items():
                    if iv.layer is None or iv.layer == layer:
                        li = self.layer_index[layer]
                        self.vector[li, slot] += iv.coef * v
                        info.touched.add(li)
        return info

    def _refresh_layer_flags(self) -> None:
        infos = list(self.rows.live.values())
        for li, dictionary in enumerate(self.dictionaries):
            live = [s for s in infos if li in s.touched]
            self.layer_live[li] = bool(live)
            self.edits_in_use[li] = max((s.edits.get(li, 0) for s in live), default=0)
            self.topk_live[li] = {name for name, *_ in dictionary.topk if any(name in s.saes for s in live)}
            self._topk_edited[li] = [(lo, hi, k) for name, lo, hi, k in dictionary.topk if name in self.topk_live[li]]
        self.topk_live_flag.copy_(torch.tensor([int(bool(names)) for names in self.topk_live], dtype=torch.int32),
                                  non_blocking=True)
        self.observed_layers = set()
        for observe in filter(None, (data[1] for data in self.rows.row_data if data)):
            if "telemetry" in observe:
                self.observed_layers.add(self.registry.saes[observe["telemetry"]["sae"]].layer)
            self.observed_layers.update(observe.get("capture", {}).get("layers", ()))

    def prepare_step(self, query_start_loc: torch.Tensor) -> None:
        """query_start_loc: CPU ints [n_rows + 1], row i's tokens are [qsl[i], qsl[i+1]). Called on the host
        before every forward, outside any captured graph: rewrites token_row in place (same address), so
        a replayed graph reads this step's map. Tokens past qsl[-1] (padding) map to the pad row.
        Eager, a step that steers nothing never reads the map: it is not written then (update() runs
        before this, so a request added in this step is already live)."""
        bounds = query_start_loc.tolist()
        if bounds[-1] > self.token_row.shape[0]:
            raise ValueError(f"{bounds[-1]} tokens in a step, but the table was sized for "
                             f"max_tokens={self.token_row.shape[0]}")
        self._bounds = bounds
        if not (self.graph_safe or any(self.layer_live)):
            return
        counts = torch.tensor(bounds).diff()
        token_row = torch.full((self.token_row.shape[0],), self.pad_row, dtype=torch.int64)
        token_row[:bounds[-1]] = torch.repeat_interleave(torch.arange(len(counts)), counts)
        self.token_row.copy_(token_row, non_blocking=True)  # from pageable memory: reusable on return

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
        dic = self.dictionaries[li]
        if self.graph_safe or self.worst_case:
            E, topk = self.max_edits, self._topk_all[li]
        elif not self.layer_live[li]:
            return hidden.clone()
        else:
            E, topk = self.edits_in_use[li], self._topk_edited[li]
        segment = None
        if topk:  # TopK membership needs every pre-activation of those SAEs
            segment = topk_segment(hidden, residual, dic.enc, *dic.params, topk, dic.topk_lo, dic.null,
                                   live=self.topk_live_flag[li] if self.graph_safe else None)
        args = (hidden, residual, self._token_slot(hidden.shape[0], positions),
                self.edit_feature[li, :, :E], self.edit_mul[li, :, :E], self.edit_add[li, :, :E],
                self.gate_feature[li, :, :E], self.gate_above[li, :, :E], self.vector[li], dic.enc, dic.dec, *dic.params)
        if self.fused:
            return sparse_steer_triton(*args, topk_segment=segment)
        return sparse_steer(*args, topk_segment=segment, fixed_shapes=self.graph_safe)

    def _token_slot(self, T: int, positions: torch.Tensor) -> torch.Tensor:
        """[T]: each token's steering slot, 0 where its row has none, its positions mode excludes it, or it is
        padding (the pad row's slot is 0)."""
        if T > self.token_row.shape[0]:  # a shape, not a value: fine in a captured graph
            raise ValueError(f"{T} tokens in a step, but the table was sized for max_tokens={self.token_row.shape[0]}")
        rows = self.token_row[:T]
        slot = self.row_slot[rows]
        mode, plen = self.slot_positions[slot], self.row_prompt_len[rows]
        edited = (mode == 0) | ((mode == 1) & (positions < plen)) | ((mode == 2) & (positions >= plen))
        return torch.where(edited, slot, 0)

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
