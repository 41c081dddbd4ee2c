"""RowSlots: which slot of a preallocated table each row of vLLM's persistent batch reads.

The bookkeeping behind both per-request tables (SteeringTable: the residual stream's edits and vectors;
LogitBias: logit biases). Requests with equal keys share one slot, refcounted: a slot is written once,
when its key first appears among live rows (`write(slot, value)`, whose result `live` keeps for the slot),
and is free again when its last row leaves, so many requests with one config cost one slot. Each row also carries the caller's data (a
prompt length, an observer), which moves with its row.

`update` takes a BatchUpdate's lists in vLLM's order: removed, added, moved; an added or moved-to row
replaces whatever it held. Host-side Python, run once per batch change: the tables copy `row_slot` to
the device, the hot path never sees this.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable


class RowSlots:
    def __init__(self, n_rows: int, slots: range, none: int, key: Callable[[object], Hashable] = lambda v: v):
        """slots: the slot ids to hand out; none: the slot of a row without steering; key(value): equal
        keys share a slot."""
        self.none, self._key = none, key
        self.row_slot = [none] * n_rows
        self.row_data: list = [None] * n_rows
        self.live: dict[int, object] = {}  # live slot -> what write() returned for it
        self._slot_of: dict[Hashable, int] = {}
        self._key_of: dict[int, Hashable] = {}
        self._refs: dict[int, int] = {}
        self._free = list(reversed(slots))

    def update(self, added: list[tuple[int, object, object]], removed: list[int], moved: list[tuple[int, int, bool]],
               write: Callable[[int, object], object]) -> bool:
        """added: (row, value or None, data); moved: (a, b, swap). -> whether any row's slot changed."""
        before = list(self.row_slot)
        for row in removed:
            self._release(row)
        for row, value, data in added:
            self._release(row)
            self.row_slot[row] = self.none if value is None else self._acquire(value, write)
            self.row_data[row] = data
        for a, b, swap in moved:
            if swap:
                for values in (self.row_slot, self.row_data):
                    values[a], values[b] = values[b], values[a]
            else:
                self._release(b)
                self.row_slot[b], self.row_data[b] = self.row_slot[a], self.row_data[a]
                self.row_slot[a], self.row_data[a] = self.none, None
        return self.row_slot != before

    def _acquire(self, value, write: Callable[[int, object], object]) -> int:
        key = self._key(value)
        slot = self._slot_of.get(key)
        if slot is None:
            slot = self._free.pop()  # never empty: there are as many slots as rows that can hold one
            self.live[slot] = write(slot, value)
            self._slot_of[key], self._key_of[slot], self._refs[slot] = slot, key, 0
        self._refs[slot] += 1
        return slot

    def _release(self, row: int) -> None:
        slot = self.row_slot[row]
        self.row_slot[row], self.row_data[row] = self.none, None
        if slot == self.none:
            return
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            del self._slot_of[self._key_of.pop(slot)], self._refs[slot], self.live[slot]
            self._free.append(slot)
