"""Read-only observers of the residual stream, for the HTTP extension: telemetry and capture.

They run in the worker (inside the steering op) and hand their results to the API process through
files in a private runtime directory on the same host, named by a server-made id; a request never
names a path. Both cost a host sync, so they run only for rows that asked for them.

    telemetry  {"id", "sae", "top_k"}: at the SAE's layer, for every position that produces a
               generated token (the last prompt position and each generated token's own position),
               the top-k features of the (steered) residual stream -> <id>.telemetry.jsonl
    capture    {"id", "layers"}: the residual stream at the last prompt position, at each layer
               (for building CAA vectors on the served model) -> <id>.L<layer>.safetensors
               {"id", "layers", "positions": "all"}: at every prompt position (sae_steer.capture,
               activations at scale), one file per prefill chunk, in the stream's own dtype, with
               the positions it holds -> <id>.L<layer>.p<first position>.safetensors

The runtime directory is `$SAE_STEER_RUNTIME_DIR` (`sae-steer serve` sets it to a fresh
`tempfile.mkdtemp` directory that its engine processes inherit) or else `<tmp>/sae-steer-<euid>`.
It is created atomically with mode 0700 (os.mkdir, no exist_ok), and whoever made it, it is used
only if it is a real directory (not a symlink), owned by this user, with no group/other access:
otherwise RuntimeDirError, checked at startup by the HTTP server and at admission offline. Every
file is opened relative to the directory's descriptor with O_NOFOLLOW (and O_EXCL when created
whole), so a path swapped after the check or a planted symlink is never followed.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from sae_steer.spec import OBSERVER_ID

logger = logging.getLogger("vllm.sae_steer")
TELEMETRY_KEY = "sae_steer_telemetry"
CAPTURE_KEY = "sae_steer_capture"
RUNTIME_DIR_ENV = "SAE_STEER_RUNTIME_DIR"
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class RuntimeDirError(RuntimeError):
    """The runtime directory is not private to this user: refuse to use it."""


def runtime_dir() -> Path:
    """The runtime directory's path (not created or checked: see check_runtime_dir)."""
    return Path(os.environ.get(RUNTIME_DIR_ENV) or Path(tempfile.gettempdir()) / f"sae-steer-{os.geteuid()}")


_lock = threading.Lock()
_opened: tuple[str, int, int] | None = None  # (path, fd, pid) of the checked directory


def runtime_dir_fd() -> int:
    """A descriptor of the checked runtime directory (created privately when missing), per process."""
    global _opened
    path = str(runtime_dir())
    with _lock:
        if _opened is not None and _opened[0] == path and _opened[2] == os.getpid():
            return _opened[1]
        if os.environ.get(RUNTIME_DIR_ENV):  # the operator's path: its parents are theirs to make
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        try:
            os.mkdir(path, 0o700)  # atomic; when it succeeds the directory is ours and private
        except FileExistsError:
            pass  # made earlier (by us, or by someone else: checked below)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
        except OSError as e:
            what = "a symlink" if os.path.islink(path) else \
                "not a directory" if e.errno in (errno.ENOTDIR, errno.ELOOP) else e.strerror
            raise RuntimeDirError(_refusal(path, what)) from None
        st = os.fstat(fd)
        problem = None
        if st.st_uid != os.geteuid():
            problem = f"owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
        elif stat.S_IMODE(st.st_mode) & 0o077:
            problem = f"mode {stat.S_IMODE(st.st_mode):04o}: other users can read or write it (0700 expected)"
        if problem:
            os.close(fd)
            raise RuntimeDirError(_refusal(path, problem))
        if _opened is not None and _opened[2] == os.getpid():
            os.close(_opened[1])
        _opened = (path, fd, os.getpid())
        return fd


def _refusal(path: str, problem: str) -> str:
    return (f"sae-steer's runtime directory {path} is {problem}; telemetry and CAA capture refuse to use it "
            f"(another local user could read or forge what passes through it). Remove it, or set "
            f"{RUNTIME_DIR_ENV} to a private directory (`sae-steer serve` makes a fresh one by itself)")


def check_runtime_dir() -> Path:
    """Create (privately) and check the runtime directory; RuntimeDirError when it is unsafe."""
    runtime_dir_fd()
    return runtime_dir()


def _name(observer_id: str, suffix: str) -> str:
    if not isinstance(observer_id, str) or not OBSERVER_ID.fullmatch(observer_id):
        raise ValueError(f"bad observer id {observer_id!r}")
    return f"{observer_id}{suffix}"


def list_runtime_dir() -> list[str]:
    """The runtime directory's names, through a descriptor of this call's own: os.listdir on the shared one
    would share its read position with every thread listing at the same time (CPython dups the descriptor,
    and dups share the offset), so concurrent readers got partial lists: captures read as incomplete, files
    left behind by discard."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=runtime_dir_fd())
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def open_in_runtime_dir(name: str, flags: int, mode: int = 0o600) -> int:
    """Open a file in the runtime directory, never through a symlink; only our own regular files."""
    fd = os.open(name, flags | _NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=runtime_dir_fd())  # O_NONBLOCK: a FIFO never blocks
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        raise RuntimeDirError(f"{runtime_dir() / name} is not a regular file of this user")
    return fd


# ---- worker side (inside the model's forward: never raise, the engine must keep serving) ----

def record_telemetry(observer_id: str, positions: list[int], indices: list[list[int]], values: list[list[float]],
                     first: bool) -> None:
    """first: these records start the request's telemetry (they hold its last prompt position). Only then is
    the file created: a later step finds it or, when the API has already discarded it (the client went
    away), writes nothing, so no file outlives its request."""
    data = "".join(json.dumps({"position": p, "features": i, "activations": v}) + "\n"
                   for p, i, v in zip(positions, indices, values)).encode()
    try:
        fd = open_in_runtime_dir(_name(observer_id, ".telemetry.jsonl"), os.O_WRONLY | os.O_APPEND | (os.O_CREAT if first else 0))
    except FileNotFoundError:
        return  # discarded by the API: the request is gone
    except (OSError, ValueError, RuntimeDirError) as e:
        logger.error("sae-steer: telemetry %r not recorded: %s", observer_id, e)
        return
    try:
        os.write(fd, data)  # one write per step: readers see whole lines or none
    except OSError as e:
        logger.error("sae-steer: telemetry %r not recorded: %s", observer_id, e)
    finally:
        os.close(fd)


def record_capture(observer_id: str, layer: int, x: torch.Tensor) -> None:
    _write_capture(observer_id, layer, f".L{layer}", {"x": x.detach().float().cpu().contiguous()})


def record_capture_positions(observer_id: str, layer: int, positions: torch.Tensor, x: torch.Tensor) -> None:
    """x [n, d] at prompt positions [n] (ascending) of one prefill chunk; a chunk recomputed after
    preemption rewrites the same positions with the same values."""
    _write_capture(observer_id, layer, f".L{layer}.p{int(positions[0])}",
                   {"x": x.detach().cpu().contiguous(), "positions": positions.detach().cpu().to(torch.int64)})


def _write_capture(observer_id: str, layer: int, stem: str, tensors: dict[str, torch.Tensor]) -> None:
    try:
        data = save_safetensors(tensors)
        final, tmp = _name(observer_id, f"{stem}.safetensors"), _name(observer_id, f"{stem}.{os.getpid()}.tmp")
        dfd = runtime_dir_fd()
        try:
            os.unlink(tmp, dir_fd=dfd)  # a leftover of an earlier attempt of this process
        except FileNotFoundError:
            pass
        fd = open_in_runtime_dir(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, final, src_dir_fd=dfd, dst_dir_fd=dfd)  # atomic: readers never see half a file
    except (OSError, ValueError, RuntimeDirError) as e:
        logger.error("sae-steer: capture %r at layer %d not recorded: %s", observer_id, layer, e)


# ---- API side ----

class TelemetryReader:
    """Reads one request's telemetry file incrementally, so a stream reads each record once.

    `new_records()` returns (token_index, record) for positions not returned before; token_index 0
    is the first position recorded, the last prompt position, which produces generated token 0.
    A position recomputed after preemption is recorded again with the same values and skipped.
    """

    def __init__(self, observer_id: str):
        self.name = _name(observer_id, ".telemetry.jsonl")
        self.offset, self.first, self.seen = 0, None, set()

    def new_records(self) -> list[tuple[int, dict]]:
        try:
            fd = open_in_runtime_dir(self.name, os.O_RDONLY)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        out = []
        for line in complete.decode().splitlines():
            record = json.loads(line)
            if self.first is None:
                self.first = record["position"]
            index = record["position"] - self.first
            if index not in self.seen:
                self.seen.add(index)
                out.append((index, record))
        return out


def read_capture(observer_id: str, layer: int) -> torch.Tensor | None:
    try:
        fd = open_in_runtime_dir(_name(observer_id, f".L{layer}.safetensors"), os.O_RDONLY)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        return load_safetensors(f.read())["x"]


def read_capture_positions(observer_id: str, layer: int, n_positions: int) -> torch.Tensor | None:
    """The stream at prompt positions 0..n_positions-1, [n_positions, d], assembled from the chunk files of
    a `positions: "all"` capture; None until every position has arrived."""
    prefix = _name(observer_id, f".L{layer}.p")
    names = [n for n in list_runtime_dir() if n.startswith(prefix) and n.endswith(".safetensors")]
    out, seen = None, torch.zeros(n_positions, dtype=torch.bool)
    for name in names:
        with os.fdopen(open_in_runtime_dir(name, os.O_RDONLY), "rb") as f:
            chunk = load_safetensors(f.read())
        keep = chunk["positions"] < n_positions
        if out is None:
            out = torch.empty(n_positions, chunk["x"].shape[-1], dtype=chunk["x"].dtype)
        out[chunk["positions"][keep]] = chunk["x"][keep]
        seen[chunk["positions"][keep]] = True
    return out if out is not None and bool(seen.all()) else None


def discard(observer_id: str) -> None:
    prefix = _name(observer_id, ".")
    dfd = runtime_dir_fd()
    for name in list_runtime_dir():
        if name.startswith(prefix):
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
