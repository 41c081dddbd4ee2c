"""The vector store: CAA vectors built over HTTP and their calibrations, in one directory that every replica
of the server (several API servers behind a router) may share.

Layout (the directory is --steering-vector-dir):

    <name>.safetensors                   the vector (sae_steer.formats), its sha256 in its own metadata
    <name>.safetensors.calibration.json  its calibration, if any (sae_steer.calibration)

A vector file is its own manifest: it is written to a hidden temporary file in the same directory, flushed
to disk, then moved to its name in one step (os.replace; os.link without overwrite, which fails if the name
exists), so a reader finds the old file, the new one or none, never half of one, and one step commits it.
The checksum (`sae_steer.sha256`: sha256 over each layer's name and float32 bytes) catches a file that was
copied in half or damaged; a file without one (written by an earlier version, or by hand) is adopted when it
loads (a truncated safetensors file does not). Deleting a vector removes its file, then its calibration.

Each API process keeps the vectors it serves in memory and rescans the directory every few seconds
(`follow`): it adopts new and changed files, drops deleted ones and re-reads changed calibrations. Files
it cannot serve (bad checksum, unreadable, layers not steerable here) are logged once and never adopted.
The maps are changed on the event loop only (the reading runs in a worker thread), so a request's check
sees one consistent set.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sae_steer.calibration import calibration_path, load_calibration

logger = logging.getLogger("vllm.sae_steer")
SUFFIX = ".safetensors"
CHECKSUM_KEY = "sae_steer.sha256"
Signature = tuple[int, int, int] | None  # a file's (inode, size, mtime_ns); None: no file


def checksum(layers: dict[int, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for L in sorted(layers):
        h.update(f"layer.{int(L)}\n".encode())
        h.update(layers[L].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _signature(path: Path) -> Signature:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Unreadable(Exception):
    """A stored file that cannot be served (the message says why)."""


class Changed(Exception):
    """The file changed while it was read: read it again at the next scan."""


def read_vector(path: Path) -> dict[int, torch.Tensor]:
    """The layers of a stored vector file, its checksum verified when it has one."""
    from safetensors import safe_open
    from sae_steer.formats import load_vector
    before = _signature(path)
    try:
        layers = load_vector(path)
        with safe_open(str(path), "pt") as f:
            stored = (f.metadata() or {}).get(CHECKSUM_KEY)
    except Exception as e:  # whatever a damaged file raises, it is reported, never served
        if _signature(path) != before:
            raise Changed from None
        raise Unreadable(str(e)) from None
    if _signature(path) != before:
        raise Changed
    if stored is not None and stored != checksum(layers):
        raise Unreadable(f"its checksum does not match its contents ({CHECKSUM_KEY} {stored[:12]}..., "
                         f"contents {checksum(layers)[:12]}...): damaged or written in part")
    return layers


@dataclass
class Scan:
    """What a scan found: the store's vectors and calibrations, the signatures they were read at (or refused
    at), and the count of this process's own writes when it began."""
    vectors: dict[str, dict[int, torch.Tensor]]
    calibrations: dict[str, dict]
    seen: dict[str, tuple[Signature, Signature]]
    writes: int


class VectorStore:
    """One API process's view of the store: what it serves (`vectors`, `calibrations`) and how it writes."""

    def __init__(self, directory: Path, unservable: Callable[[str, dict[int, torch.Tensor]], str | None]):
        self.directory = directory
        self.unservable = unservable  # why this server cannot serve a vector (None: it can)
        self.vectors: dict[str, dict[int, torch.Tensor]] = {}  # name -> layer -> v
        self.calibrations: dict[str, dict] = {}  # name -> its calibration (calibration.py), where it has one
        self._seen: dict[str, tuple[Signature, Signature]] = {}  # name -> (vector, calibration) signatures
        self._writes = 0  # builds and deletions here: a scan that began before one is stale
        self._task: asyncio.Task | None = None

    def path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def exists(self, name: str) -> bool:
        """In memory or on disk (built on another replica, not yet scanned here)."""
        return name in self.vectors or _signature(self.path(name)) is not None

    # ---- reading: scan (a worker thread), apply (the event loop) ----

    def scan(self) -> Scan:
        """Read what changed since the last scan (blocking: call it off the event loop)."""
        writes, seen_before = self._writes, dict(self._seen)
        vectors, calibrations = dict(self.vectors), dict(self.calibrations)
        found = Scan({}, {}, {}, writes)

        def keep(name: str, seen: tuple[Signature, Signature]) -> None:  # what was adopted (or refused) before
            found.seen[name] = seen
            if name in vectors:
                found.vectors[name] = vectors[name]
                if name in calibrations:
                    found.calibrations[name] = calibrations[name]

        try:
            with os.scandir(self.directory) as listing:
                entries = [e for e in listing if e.name.endswith(SUFFIX) and not e.name.startswith(".")]
        except FileNotFoundError:
            entries = []  # nothing built yet
        for entry in entries:
            name, path = entry.name[:-len(SUFFIX)], Path(entry.path)
            seen = (_signature(path), _signature(calibration_path(path, "vector")))
            before = seen_before.get(name, (None, None))
            if seen[0] is None:
                continue  # deleted since the listing
            if seen == before:
                keep(name, seen)
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    raise Unreadable("not a regular file (the store holds the files it wrote, never links)")
                layers = vectors[name] if seen[0] == before[0] and name in vectors else read_vector(path)
                why = self.unservable(name, layers)
                if why:
                    raise Unreadable(why)
            except Changed:  # replaced while it was read: serve what was served, read the new file next time
                keep(name, before)
                continue
            except Unreadable as e:
                logger.warning("sae-steer: vector store: %s not served: %s", path, e)
                found.seen[name] = seen
                continue
            found.seen[name], found.vectors[name] = seen, layers
            if seen[1] is not None:
                try:
                    found.calibrations[name] = load_calibration(path, "vector")
                except ValueError as e:  # the vector is served; "auto" on it is refused as without one
                    logger.warning("sae-steer: vector store: calibration of %r not used: %s", name, e)
        return found

    def apply(self, found: Scan) -> None:
        """Make the scan's findings what this process serves, unless it wrote since the scan began."""
        if found.writes != self._writes:
            return  # the next scan sees this process's own build or deletion
        for name in self.vectors.keys() - found.vectors.keys():
            logger.info("sae-steer: vector store: %r is gone from %s; no longer served", name, self.directory)
        for name, layers in found.vectors.items():
            if self.vectors.get(name) is not layers:
                logger.info("sae-steer: vector store: serving %r (layers %s) from %s", name, sorted(layers),
                            self.directory)
        for mine, theirs in ((self.vectors, found.vectors), (self.calibrations, found.calibrations)):
            for name in mine.keys() - theirs.keys():
                del mine[name]
            mine.update(theirs)
        self._seen = found.seen

    def follow(self, interval: float) -> None:
        """Rescan every `interval` seconds in the background (0: never; the startup scan only)."""
        if interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._follow(interval))

    async def _follow(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.apply(await asyncio.to_thread(self.scan))
            except Exception as e:  # e.g. a network share that is away: keep serving what was read, try again
                logger.warning("sae-steer: vector store: cannot scan %s: %r", self.directory, e)

    # ---- writing (this process's builds and deletions) ----

    async def put(self, name: str, layers: dict[int, torch.Tensor], metadata: dict[str, str], *,
                  overwrite: bool) -> Path:
        """Write the vector and serve it. Without `overwrite`, FileExistsError if the name exists in the store
        (whichever replica wrote it: decided by the filesystem); with it, the last writer wins and the
        calibration of the vector it replaced is removed (it was measured on that vector)."""
        path = self.path(name)
        seen = await asyncio.to_thread(self._write, path, layers, metadata, overwrite)
        self._writes += 1
        self.vectors[name] = layers
        self.calibrations.pop(name, None)
        self._seen[name] = (seen, None)
        return path

    def _write(self, path: Path, layers, metadata: dict[str, str], overwrite: bool) -> Signature:
        from sae_steer.formats import save_vector
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")  # hidden: never listed as a vector
        try:
            save_vector(layers, tmp, metadata={**metadata, CHECKSUM_KEY: checksum(layers)})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
                calibration_path(path, "vector").unlink(missing_ok=True)
            else:
                os.link(tmp, path)  # atomic: fails if the name exists
            _fsync_dir(path.parent)
            return _signature(path)
        finally:
            tmp.unlink(missing_ok=True)

    async def remove(self, name: str) -> bool:
        """Delete the vector (its file, then its calibration); False if the store holds none of that name."""
        existed = await asyncio.to_thread(self._delete, self.path(name))
        self._writes += 1
        existed = self.vectors.pop(name, None) is not None or existed
        self.calibrations.pop(name, None)
        self._seen.pop(name, None)
        return existed

    @staticmethod
    def _delete(path: Path) -> bool:
        try:
            path.unlink()
            existed = True
        except FileNotFoundError:
            existed = False
        calibration_path(path, "vector").unlink(missing_ok=True)
        if existed:
            _fsync_dir(path.parent)
        return existed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
