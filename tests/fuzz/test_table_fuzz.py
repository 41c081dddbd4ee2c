"""Property-based fuzzing of the SteeringTable's bookkeeping (sae_steer/vllm_plugin/table.py): random
sequences of vLLM BatchUpdates (removals, additions, also over occupied rows, unidirectional moves, swaps),
checked after every step against a plain Python model of rows -> (steering, prompt_len, observe):
  - the row arrays that prepare_step repeats per token (slot, positions window) agree with the model;
  - rows with the same steering share one slot, different steerings never do, refcounts count rows;
  - used and free slots partition 1..max_rows with no duplicates;
  - every used slot's contents equal a freshly written slot of its steering (no stale edits on reuse);
  - the per-layer flags (layer_live, topk_live, observed_layers) and each slot's live edit counts follow the
    live slots;
and after every row is removed, nothing leaks (all slots free, every row unsteered)."""
from __future__ import annotations

import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_steer.vllm_plugin.table import POSITION_MODES, SteeringTable
from sae_steer.spec import SaeIntervention, Steering
from tests.unit.test_table import D, LAYERS, MAX_TOKENS, random_steering, registry

ROWS = 6
REG = registry()


def _pool() -> list[Steering]:
    """Distinct steerings (by fingerprint), from the unit test's generator, plus near-duplicates that differ
    only in positions (same edits, other slot)."""
    rng, out, seen = random.Random(1), [], set()
    while len(out) < 7:
        s = random_steering(rng)
        if s is not None and s.fingerprint() not in seen:
            seen.add(s.fingerprint())
            out.append(s)
    twin = Steering.model_validate({**out[0].model_dump(exclude_none=True),
                                    "positions": "prompt" if out[0].positions != "prompt" else "all"})
    return out + [twin]


POOL = _pool()
OBSERVE = [None, {"telemetry": {"sae": "relu", "top_k": 3, "id": "t1"}},
           {"capture": {"id": "c1", "layers": [2], "positions": "last"}}]
SLOT_TENSORS = ("slot_edits", "edit_feature", "edit_mul", "edit_add", "gate_feature", "gate_above", "vector")
WINDOW_END = 2 ** 31 - 1


def new_table() -> SteeringTable:
    return SteeringTable(REG, LAYERS, max_rows=ROWS, max_tokens=MAX_TOKENS, max_edits=8, d_model=D,
                         device=torch.device("cpu"))


def _fresh_slots() -> dict[str, tuple]:
    """fingerprint -> (the slot's tensors as a freshly written table holds them, _SlotInfo)."""
    out = {}
    for s in POOL:
        t = new_table()
        t.update([(0, s, 1)], [], [])
        slot = t.rows.row_slot[0]
        out[s.fingerprint()] = (t.slot_positions[slot].clone(),
                                *(getattr(t, name)[:, slot].clone() for name in SLOT_TENSORS)), t.rows.live[slot]
    return out


FRESH = _fresh_slots()

# ---- one BatchUpdate, as vLLM's persistent batch produces them (and a little more) ----

entry = st.tuples(st.sampled_from([None, *range(len(POOL))]), st.integers(1, 40), st.sampled_from(range(len(OBSERVE))))


@st.composite
def batch_update(draw, live: list[int]):
    removed = draw(st.lists(st.sampled_from(live), unique=True)) if live else []
    added_rows = draw(st.lists(st.integers(0, ROWS - 1), unique=True, max_size=ROWS))
    added = [(r, *draw(entry)) for r in added_rows]  # also over rows still occupied: the table replaces them
    pair = st.tuples(st.integers(0, ROWS - 1), st.integers(0, ROWS - 1)).filter(lambda p: p[0] != p[1])
    moved = [(a, b, draw(st.booleans())) for a, b in draw(st.lists(pair, max_size=4))]
    return removed, added, moved


def apply_to_model(model: list, removed, added, moved) -> None:
    """The reference semantics of SteeringTable.update: removed, then added, then moved, in order."""
    for r in removed:
        model[r] = None
    for r, *value in added:
        model[r] = tuple(value)
    for a, b, swap in moved:
        if swap:
            model[a], model[b] = model[b], model[a]
        else:
            model[b], model[a] = model[a], None


def to_update(removed, added, moved):
    """-> SteeringTable.update's arguments (added, removed, moved)."""
    return [(r, None if s is None else POOL[s], plen, OBSERVE[o]) for r, s, plen, o in added], removed, moved


def check(table: SteeringTable, model: list) -> None:
    # the row arrays == the bookkeeping; each row's positions window follows its steering's mode
    rows = table.rows
    assert table._row_window[:, 0].tolist() == rows.row_slot
    assert rows.row_slot[table.pad_row] == 0, "the pad row is never steered"
    for row, value in enumerate(model):
        if value is not None and value[0] is not None:
            plen = value[1]
            want = {"all": (0, WINDOW_END), "prompt": (0, plen), "generated": (plen, WINDOW_END)}[POOL[value[0]].positions]
            assert tuple(table._row_window[row, 1:]) == want, f"row {row}: window"
    # host mirrors == the model
    by_fp: dict[str, set[int]] = {}
    for row, value in enumerate(model):
        steering_idx = None if value is None else value[0]
        slot = rows.row_slot[row]
        if steering_idx is None:
            assert slot == 0, f"row {row} has no steering but slot {slot}"
        else:
            assert slot != 0, f"row {row} is steered but has no slot"
            by_fp.setdefault(POOL[steering_idx].fingerprint(), set()).add(row)
        assert rows.row_data[row] == (None if value is None else (value[1], OBSERVE[value[2]]))
    # slots: one per distinct fingerprint, refcount = rows, contents = a fresh write
    assert set(rows._slot_of) == set(by_fp)
    for fp, steered in by_fp.items():
        slot = rows._slot_of[fp]
        assert {rows.row_slot[r] for r in steered} == {slot}
        info = rows.live[slot]
        assert rows._key_of[slot] == fp and rows._refs[slot] == len(steered)
        fresh, fresh_info = FRESH[fp]
        assert int(table.slot_positions[slot]) == int(fresh[0])
        for name, want in zip(SLOT_TENSORS, fresh[1:]):
            assert torch.equal(getattr(table, name)[:, slot], want), f"slot {slot}: stale {name}"
        assert (info.edits, info.touched, info.saes) == (fresh_info.edits, fresh_info.touched, fresh_info.saes)
    used = sorted(rows._slot_of.values())
    assert sorted(rows.live) == used and len(set(used)) == len(used)
    assert len(rows._free) == len(set(rows._free)), "a slot is free twice"
    assert sorted(used + rows._free) == list(range(1, ROWS + 1)), "slots leaked or invented"
    # per-layer flags follow the live steerings
    live = [POOL[v[0]] for v in model if v is not None and v[0] is not None]
    for li, layer in enumerate(LAYERS):
        infos = [FRESH[s.fingerprint()][1] for s in live]
        assert table.layer_live[li] == any(li in i.touched for i in infos)
        for s in live:  # live edits per slot: -1 where the slot touches nothing at the layer
            info = FRESH[s.fingerprint()][1]
            want = info.edits.get(li, 0) if li in info.touched else -1
            assert int(table.slot_edits[li, rows._slot_of[s.fingerprint()]]) == want
        topk = {name for name, *_ in table.dictionaries[li].topk}
        assert table.topk_live[li] == {iv.sae for s in live for iv in s.interventions
                                       if isinstance(iv, SaeIntervention) and iv.sae in topk}
    observed = set()
    for v in model:
        if v is not None and OBSERVE[v[2]]:
            o = OBSERVE[v[2]]
            observed |= {REG.saes[o["telemetry"]["sae"]].layer} if "telemetry" in o else set(o["capture"]["layers"])
    assert table.observed_layers == observed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), steps=st.integers(1, 12))
def test_table_bookkeeping_follows_a_model_of_the_batch(data, steps):
    table, model = new_table(), [None] * ROWS
    for _ in range(steps):
        live = [r for r in range(ROWS) if model[r] is not None]
        removed, added, moved = data.draw(batch_update(live))
        table.update(*to_update(removed, added, moved))
        apply_to_model(model, removed, added, moved)
        check(table, model)
    # every request finishes: nothing leaks
    table.update([], [r for r in range(ROWS) if model[r] is not None], [])
    model = [None] * ROWS
    check(table, model)
    assert not table.rows.live and not table.rows._slot_of and len(table.rows._free) == ROWS
    assert not any(table.layer_live) and not table.observed_layers
    assert not table._row_window[:, 0].any()


def test_slot_reuse_overwrites_every_field():
    """The sharpest case of the property above: a slot freed by a wide steering, reused by a narrow one."""
    wide = max(POOL, key=lambda s: len(s.interventions))
    narrow = min(POOL, key=lambda s: len(s.interventions))
    table, model = new_table(), [None] * ROWS
    for step in ([], [(0, POOL.index(wide), 5, 0)], []), ([0], [], []), ([], [(0, POOL.index(narrow), 3, 0)], []):
        removed, added, moved = step
        table.update(*to_update(removed, added, moved))
        apply_to_model(model, removed, added, moved)
        check(table, model)
    assert table.rows.row_slot[0] == table.rows._slot_of[narrow.fingerprint()]
    assert POSITION_MODES[narrow.positions] == int(table.slot_positions[table.rows.row_slot[0]])
