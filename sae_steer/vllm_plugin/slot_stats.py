"""The worker's steering slots, published for the API server's /metrics (server/metrics.py).

The SteeringTable and LogitBias live in the worker, while vLLM serves /metrics from the API server
process, and vLLM carries no custom worker statistics to the front end. So after each batch change
the worker publishes its slot counts, when they changed, in a fixed-size file of the private
runtime directory (observers.py), and the API server reads every such file when it is scraped.

- Record: four int64, rewritten in place: residual-stream slots in use (SteeringTable: SAE edits
  and vectors), how many it has, logit slots in use (LogitBias), how many it has (-1, -1 in an
  engine that serves no logit interventions). Read twice until both reads agree (no torn record).
- One file per engine, `_slots.<pid>` (no server-made observer id starts with `_`, so observers'
  discard never touches it): only the worker of tensor- and pipeline-parallel rank 0 writes; the
  other ranks hold the same requests in identical tables. Data-parallel engines each write theirs.
- Liveness: the writer holds an exclusive flock on its file for its whole life (the file is locked
  before it gets its name). A file whose lock a reader can take belongs to a dead worker (an earlier
  server sharing the directory): the reader removes it and never reports it.
- Servers only: a worker publishes only when VLLM_PLUGINS names sae_steer (the HTTP endpoints are
  on), so offline engines write nothing.
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
from typing import NamedTuple

from sae_steer.vllm_plugin import observers

logger = logging.getLogger("vllm.sae_steer")
PREFIX = "_slots."
_RECORD = struct.Struct("<4q")


class SlotCounts(NamedTuple):
    residual_in_use: int
    residual_limit: int
    logit_in_use: int  # -1: this engine serves no logit interventions
    logit_limit: int


def counts(table, logit) -> SlotCounts:
    """The slots of a SteeringTable (slot 0 is "no steering", never handed out) and of a LogitBias or None."""
    return SlotCounts(len(table.rows.live), table.slot_positions.shape[0] - 1,
                      len(logit.rows.live) if logit is not None else -1,
                      logit.table.shape[0] if logit is not None else -1)


# ---- worker side (the logits processor's update_state: never raise, the engine must keep serving) ----

class _Publisher:
    def __init__(self, first: SlotCounts):
        name, tmp = f"{PREFIX}{os.getpid()}", f"{PREFIX}{os.getpid()}.tmp"
        dfd = observers.runtime_dir_fd()
        try:
            os.unlink(tmp, dir_fd=dfd)
        except FileNotFoundError:
            pass
        self.fd = observers.open_in_runtime_dir(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this process exits
        self.last = first
        os.pwrite(self.fd, _RECORD.pack(*self.last), 0)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # readers only ever see a locked file

    def write(self, now: SlotCounts) -> None:
        if now != self.last:
            os.pwrite(self.fd, _RECORD.pack(*now), 0)
            self.last = now


_publisher: _Publisher | None = None
_disabled = False


def _publishes() -> bool:
    if "sae_steer" not in [p.strip() for p in os.environ.get("VLLM_PLUGINS", "").split(",")]:
        return False
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group
        return get_tp_group().rank_in_group == 0 and get_pp_group().rank_in_group == 0
    except (ImportError, AssertionError):  # no parallel groups (not a vLLM worker): one rank
        return True


def publish(table, logit) -> None:
    """The slot counts of this worker's tables (a SteeringTable, a LogitBias or None), after a batch change."""
    global _publisher, _disabled
    if _disabled:
        return
    try:
        if _publisher is None:
            if not _publishes():
                _disabled = True
                return
            _publisher = _Publisher(counts(table, logit))
        else:
            _publisher.write(counts(table, logit))
    except (OSError, observers.RuntimeDirError, AttributeError) as e:  # AttributeError: the tables changed shape
        _disabled = True
        logger.error("sae-steer: slot counts not published for /metrics (%s); steering is unaffected", e)


# ---- API side ----

def read_published() -> list[SlotCounts]:
    """The counts of every live engine's worker; files left by dead workers are removed."""
    out = []
    for name in observers.list_runtime_dir():
        if not name.startswith(PREFIX) or name.endswith(".tmp"):
            continue
        try:
            fd = observers.open_in_runtime_dir(name, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # its worker holds the lock: alive
                out.append(_read(fd))
                continue
            try:
                os.unlink(name, dir_fd=observers.runtime_dir_fd())  # nobody holds it: its worker is gone
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)
    return out


def _read(fd: int) -> SlotCounts:
    data = os.pread(fd, _RECORD.size, 0)
    for _ in range(3):
        again = os.pread(fd, _RECORD.size, 0)
        if again == data:
            break
        data = again
    return SlotCounts(*_RECORD.unpack(data))
