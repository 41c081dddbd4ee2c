"""Soak: many concurrent clients against one `sae-steer serve` on loopback for a bounded time.

    python benchmarks/soak.py --duration 600 --clients 64            # starts a tiny-model server itself
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid PID   # an already running server

Each client loops until the deadline (or until --max-requests have been sent, all clients together)
over a weighted mix of request kinds:

    plain      unsteered, /v1/completions or /v1/chat/completions, not streamed
    steered    a fresh random steering (SAE edits of every architecture, named and inline vectors,
               logit steering, `when`), greedy, not streamed
    stream     steered or not, streamed
    n2         n=2, temperature 1 with a seed (steered or not)
    telemetry  telemetry (with or without interventions), streamed or not
    compare    compare=true, streamed or not
    invalid    a body the server must refuse: 400 whose `param` names the field (401 for a wrong admin key)
    vanish     a streamed request whose client goes away after two chunks
    caa        an admin CAA build (POST /v1/steering/vectors), one steered request with it, DELETE

and checks that every valid response is complete (finish_reason "length" and max_tokens token ids on
every choice, ignore_eos), that no response is a 5xx or a stream error, and that invalid bodies get
their 400. After the load it checks, on the idle server:

    drained    vLLM's /metrics shows no request running or waiting (vanished clients were aborted)
    slots      max_num_seqs requests with distinct steerings run at once and complete (the steering
               table has one slot per row: a slot leaked by an aborted request would make one fail)
    runtime    the runtime directory holds no telemetry/capture file (none leaked by aborts)
    solo       a sample of greedy (and seeded n=2) responses, re-sent one at a time, equal what they
               were under load
    rss        VmRSS of the server's process tree (API server, engine core), sampled every few seconds

Everything goes to benchmarks/results/soak-<date>.json (--out). Loopback only: any other host is refused.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ADMIN_HEADER = "X-Steering-Admin-Key"
PROMPTS = ["The licensee shall", "Permission is hereby granted, free of charge,", "You may not copy",
           "This program is distributed", "Redistribution and use in source and binary forms",
           "THE SOFTWARE IS PROVIDED", "In no event shall the authors", "Each contributor grants you"]
CHATS = ["Tell me about the license.", "What may I do with the software?", "Who holds the copyright?",
         "Summarise the warranty."]
KINDS = {"plain": 12, "steered": 22, "stream": 16, "n2": 8, "telemetry": 8, "compare": 8, "invalid": 12,
         "vanish": 10, "caa": 2}
CAA_PAIRS = [{"positive": "The licensee shall keep", "negative": "The licensee shall not keep"},
             {"positive": "You may copy the software", "negative": "You may not copy the software"},
             {"positive": "Permission is granted", "negative": "Permission is denied"}]


# ---------------------------------------------------------------- what the server offers

@dataclass
class Offer:
    model: str
    saes: list[dict]            # [{"name", "layer", "d_sae", ...}]
    vectors: list[str]          # config vectors
    inline_layer: int
    d_model: int
    caa_layer: int


async def discover(client: httpx.AsyncClient, inline_layer: int, d_model: int) -> Offer:
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    saes = (await client.get("/v1/steering/saes")).json()["data"]
    vectors = [v["name"] for v in (await client.get("/v1/steering/vectors")).json()["data"] if v["source"] == "config"]
    return Offer(model, saes, vectors, inline_layer, d_model, inline_layer)


def random_steering(rng: random.Random, offer: Offer) -> dict:
    """A fresh steering object: 1-3 interventions of any type, so almost every request has its own slot."""
    interventions = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choices(["sae", "vector", "inline", "logit"], [6, 2, 2, 1])[0]
        if kind == "sae" or (kind == "vector" and not offer.vectors):
            sae = rng.choice(offer.saes)
            iv = {"type": "sae", "sae": sae["name"], "feature": rng.randrange(sae["d_sae"])}
            mode = rng.choice(["add", "clamp", "ablate", "scale"])
            iv["mode"] = mode
            if mode == "add":
                iv["strength"] = round(rng.uniform(-12, 12), 2)
            elif mode == "clamp":
                iv["value"] = round(rng.uniform(0, 20), 2)
            elif mode == "scale":
                iv["factor"] = round(rng.uniform(0, 6), 2)
            if rng.random() < 0.15:
                iv["when"] = {"feature": rng.randrange(sae["d_sae"]), "above": round(rng.uniform(0, 1), 2)}
        elif kind == "vector":
            iv = {"type": "vector", "vector": rng.choice(offer.vectors), "coef": round(rng.uniform(-5, 5), 2)}
        elif kind == "inline":
            iv = {"type": "vector", "layer": offer.inline_layer, "coef": round(rng.uniform(0.5, 3), 2),
                  "values": [round(rng.gauss(0, 1), 3) for _ in range(offer.d_model)]}
        else:
            sae = rng.choice(offer.saes)
            iv = {"type": "logit", "sae": sae["name"], "feature": rng.randrange(sae["d_sae"]),
                  "strength": round(rng.uniform(-6, 6), 2)}
        interventions.append(iv)
    steering = {"interventions": interventions}
    if rng.random() < 0.3 and all(iv["type"] != "logit" for iv in interventions):
        steering["positions"] = rng.choice(["all", "prompt", "generated"])
    return steering


def invalid_bodies(offer: Offer) -> list[tuple[dict, str]]:
    """(extra body, the `param` the 400 must name). The same list the HTTP tests use, plus hostile values."""
    s = offer.saes[0]

    def sae(**kw):
        return {"type": "sae", "sae": s["name"], "feature": 1, "mode": "ablate", **kw}
    return [
        ({"steering": {"interventions": [sae(feature=s["d_sae"] + 7)]}}, "steering.interventions[0].feature"),
        ({"steering": {"interventions": [sae(sae="no-such-sae")]}}, "steering.interventions[0].sae"),
        ({"steering": {"interventions": [sae(mode="boost")]}}, "steering.interventions[0].mode"),
        ({"steering": {"interventions": [sae(mode="add", strength=1e12)]}}, "steering.interventions[0].strength"),
        ({"steering": {"interventions": [{"type": "vector", "vector": "no-such-vector"}]}},
         "steering.interventions[0].vector"),
        ({"steering": {"interventions": [{"type": "vector", "layer": offer.inline_layer, "values": [0.0] * 3}]}},
         "steering.interventions[0].values"),
        ({"steering": {"interventions": [sae()] * 65}}, "steering.interventions"),
        ({"steering": {"interventions": []}}, "steering.interventions"),
        ({"steering": {"interventions": [sae()], "positions": "middle"}}, "steering.positions"),
        ({"steering": "calm"}, "steering"),
        ({"telemetry": {"sae": "no-such-sae"}}, "telemetry.sae"),
        ({"telemetry": {"sae": s["name"], "top_k": 3}, "n": 2, "temperature": 1.0}, "telemetry"),
        ({"telemetry": {"sae": s["name"], "id": "0" * 32}}, "telemetry.id"),
        ({"compare": True}, "compare"),
        ({"vllm_xargs": {"sae_steer_capture": "x"}}, "vllm_xargs.sae_steer_capture"),
        ({"vllm_xargs": {"steering": "x"}}, "vllm_xargs.steering"),
    ]


# ---------------------------------------------------------------- bookkeeping

@dataclass
class Record:
    counts: Counter = field(default_factory=Counter)              # kind -> requests sent
    ok: Counter = field(default_factory=Counter)                  # kind -> passed its checks
    errors: Counter = field(default_factory=Counter)              # class -> count
    examples: dict = field(default_factory=dict)                  # class -> first few examples
    latency: dict = field(default_factory=lambda: defaultdict(list))  # kind -> seconds
    samples: list = field(default_factory=list)                   # (path, body, tokens) for the solo check
    tokens: int = 0

    def error(self, cls: str, kind: str, detail) -> None:
        self.errors[cls] += 1
        ex = self.examples.setdefault(cls, [])
        if len(ex) < 5:
            ex.append({"kind": kind, "detail": str(detail)[:600]})


class Incomplete(Exception):
    pass


def check_choices(choices: dict[int, dict], n: int, max_tokens: int) -> None:
    """choices: index -> {"tokens": [...], "finish_reason": str|None}."""
    if sorted(choices) != list(range(n)):
        raise Incomplete(f"choices {sorted(choices)}, expected {n}")
    for i, c in choices.items():
        if c["finish_reason"] != "length" or len(c["tokens"]) != max_tokens:
            raise Incomplete(f"choice {i}: finish_reason {c['finish_reason']!r}, {len(c['tokens'])} of "
                             f"{max_tokens} tokens")


def plain_choices(body: dict) -> dict[int, dict]:
    return {c["index"]: {"tokens": c.get("token_ids") or [], "finish_reason": c.get("finish_reason")}
            for c in body["choices"]}


class StreamError(Exception):
    pass


async def read_stream(response: httpx.Response, stop_after: int | None = None):
    """Returns (choices, chunks, extra: the `unsteered` body / telemetry records / [DONE] seen)."""
    choices: dict[int, dict] = {}
    extra = {"unsteered": None, "telemetry": [], "done": False}
    chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            extra["done"] = True
            break
        body = json.loads(line[6:])
        if "error" in body:
            raise StreamError(json.dumps(body)[:600])
        chunks += 1
        if body.get("unsteered"):
            extra["unsteered"] = body["unsteered"]
        for c in body.get("choices") or []:
            slot = choices.setdefault(c["index"], {"tokens": [], "finish_reason": None})
            slot["tokens"] += c.get("token_ids") or []
            if c.get("finish_reason"):
                slot["finish_reason"] = c["finish_reason"]
            extra["telemetry"] += c.get("telemetry") or []
        if stop_after is not None and chunks >= stop_after:
            break
    return choices, chunks, extra


# ---------------------------------------------------------------- the load

class Soak:
    def __init__(self, client: httpx.AsyncClient, offer: Offer, args, rec: Record, rng_seed: int):
        self.client, self.offer, self.args, self.rec = client, offer, args, rec
        self.seed = rng_seed
        self.invalid = invalid_bodies(offer)
        self.caa_lock = asyncio.Lock()
        self.caa_n = 0
        self.sent = 0

    def base(self, rng: random.Random, chat: bool) -> tuple[str, dict]:
        body = {"model": self.offer.model, "max_tokens": self.args.max_tokens, "ignore_eos": True,
                "return_token_ids": True, "temperature": 0.0}
        if chat:
            body["messages"] = [{"role": "user", "content": rng.choice(CHATS)}]
            return "/v1/chat/completions", body
        body["prompt"] = rng.choice(PROMPTS)
        return "/v1/completions", body

    def sample(self, path: str, body: dict, choices: dict[int, dict]) -> None:
        if len(self.rec.samples) < self.args.solo_samples * 4:  # keep a pool, verify a random subset later
            self.rec.samples.append((path, body, [choices[i]["tokens"] for i in sorted(choices)]))

    async def post(self, path: str, body: dict, headers=None) -> httpx.Response:
        return await self.client.post(path, json=body, headers=headers)

    async def valid(self, kind: str, path: str, body: dict, n: int = 1, stream: bool = False,
                    want_unsteered: bool = False, want_telemetry: bool = False, sample: bool = False) -> None:
        mt = body["max_tokens"]
        if stream:
            body = {**body, "stream": True}
            async with self.client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise HttpStatus(r.status_code, r.text)
                choices, _, extra = await read_stream(r)
            if not extra["done"]:
                raise Incomplete("stream ended without [DONE]")
            unsteered, telemetry = extra["unsteered"], extra["telemetry"]
        else:
            r = await self.post(path, body)
            if r.status_code != 200:
                raise HttpStatus(r.status_code, r.text)
            data = r.json()
            choices = plain_choices(data)
            unsteered = data.get("unsteered")
            telemetry = data["choices"][0].get("telemetry") if data["choices"] else None
        check_choices(choices, n, mt)
        self.rec.tokens += sum(len(c["tokens"]) for c in choices.values())
        if want_unsteered:
            if not unsteered or "choices" not in unsteered:
                raise Incomplete(f"compare: no unsteered completion ({str(unsteered)[:200]})")
            check_choices(plain_choices(unsteered), n, mt)
        if want_telemetry:
            got = sorted(t["token_index"] for t in telemetry or [])
            if got != list(range(mt)):
                raise Incomplete(f"telemetry for token indices {got[:20]}..., expected 0..{mt - 1}")
        if sample:
            self.sample(path, {k: v for k, v in body.items() if k != "stream"}, choices)

    async def one(self, rng: random.Random, kind: str) -> None:
        chat = rng.random() < 0.35
        path, body = self.base(rng, chat)
        steer = rng.random() < 0.5
        if kind == "plain":
            await self.valid(kind, path, body, sample=rng.random() < 0.2)
        elif kind == "steered":
            body["steering"] = random_steering(rng, self.offer)
            await self.valid(kind, path, body, sample=True)
        elif kind == "stream":
            if steer:
                body["steering"] = random_steering(rng, self.offer)
            await self.valid(kind, path, body, stream=True, sample=steer)
        elif kind == "n2":
            if steer:
                body["steering"] = random_steering(rng, self.offer)
            body.update(n=2, temperature=1.0, seed=rng.randrange(2**31))
            await self.valid(kind, path, body, n=2, stream=rng.random() < 0.3, sample=True)
        elif kind == "telemetry":
            sae = rng.choice(self.offer.saes)["name"]
            body["telemetry"] = {"sae": sae, "top_k": rng.randint(1, 8)}
            if steer:
                body["steering"] = random_steering(rng, self.offer)
            await self.valid(kind, path, body, stream=rng.random() < 0.5, want_telemetry=True, sample=steer)
        elif kind == "compare":
            body["steering"] = {**random_steering(rng, self.offer), "compare": True}
            await self.valid(kind, path, body, stream=rng.random() < 0.5, want_unsteered=True)
        elif kind == "invalid":
            await self.invalid_one(rng, path, body)
        elif kind == "vanish":
            r = rng.random()
            if r < 0.5:
                body["steering"] = random_steering(rng, self.offer)
            elif r < 0.75:
                body["telemetry"] = {"sae": rng.choice(self.offer.saes)["name"], "top_k": 4}
            else:
                body["steering"] = {**random_steering(rng, self.offer), "compare": True}
            body.update(stream=True, max_tokens=self.args.vanish_max_tokens)
            async with self.client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise HttpStatus(resp.status_code, resp.text)
                await read_stream(resp, stop_after=2)
            # leaving the block unread closes the connection: the server sees the client go away
        elif kind == "caa":
            await self.caa_one(rng, path, body)

    async def invalid_one(self, rng: random.Random, path: str, body: dict) -> None:
        if rng.random() < 0.1:  # a wrong admin key
            r = await self.post("/v1/steering/vectors", {"name": "x", "pairs": CAA_PAIRS[:1], "layers": [1]},
                                headers={ADMIN_HEADER: "wrong-key"})
            if r.status_code != 401:
                raise HttpStatus(r.status_code, r.text, expected=401)
            return
        extra, param = rng.choice(self.invalid)
        r = await self.post(path, {**body, **extra})
        if r.status_code != 400:
            raise HttpStatus(r.status_code, r.text, expected=400)
        err = r.json().get("error", {})
        if err.get("param") != param or not str(err.get("message", "")).startswith(param):
            raise WrongField(f"expected param {param!r}, got {err}")

    async def caa_one(self, rng: random.Random, path: str, body: dict) -> None:
        if self.caa_lock.locked():  # one build at a time (each is 2 x pairs engine requests)
            return await self.one(rng, "steered")
        async with self.caa_lock:
            self.caa_n += 1
            name = f"soak-{os.getpid()}-{self.caa_n}"
            headers = {ADMIN_HEADER: self.args.admin_key}
            r = await self.post("/v1/steering/vectors", {"name": name, "pairs": rng.sample(CAA_PAIRS, 2),
                                                          "layers": [self.offer.caa_layer]}, headers=headers)
            if r.status_code != 201:
                raise HttpStatus(r.status_code, r.text, expected=201)
            try:
                body["steering"] = {"interventions": [{"type": "vector", "vector": name,
                                                       "coef": round(rng.uniform(1, 4), 2)}]}
                await self.valid("caa", path, body)
            finally:
                d = await self.client.delete(f"/v1/steering/vectors/{name}", headers=headers)
                if d.status_code != 200:
                    raise HttpStatus(d.status_code, d.text, expected=200)

    async def worker(self, wid: int, deadline: float) -> None:
        rng = random.Random(self.seed * 1000 + wid)
        mix = self.args.mix or KINDS
        kinds, weights = list(mix), list(mix.values())
        while time.monotonic() < deadline and self.sent < self.args.max_requests:
            kind = rng.choices(kinds, weights)[0]
            self.sent += 1
            self.rec.counts[kind] += 1
            t0 = time.monotonic()
            try:
                await self.one(rng, kind)
            except HttpStatus as e:
                cls = "5xx" if e.status >= 500 else f"unexpected_{e.status}"
                self.rec.error(cls, kind, f"{e.status} (expected {e.expected}): {e.text}")
            except WrongField as e:
                self.rec.error("400_wrong_field", kind, e)
            except Incomplete as e:
                self.rec.error("incomplete", kind, e)
            except StreamError as e:
                self.rec.error("stream_error", kind, e)
            except httpx.TimeoutException as e:
                self.rec.error("timeout", kind, repr(e))
            except httpx.HTTPError as e:
                self.rec.error("connection", kind, repr(e))
            else:
                self.rec.ok[kind] += 1
                self.rec.latency[kind].append(time.monotonic() - t0)


class HttpStatus(Exception):
    def __init__(self, status: int, text: str, expected: int = 200):
        super().__init__(f"{status}: {text[:300]}")
        self.status, self.text, self.expected = status, text[:600], expected


class WrongField(Exception):
    pass


# ---------------------------------------------------------------- the server's processes

def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/*/stat)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    out, frontier = [pid], [pid]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def rss_kb(pid: int) -> dict[int, int]:
    out = {}
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[p] = int(line.split()[1])
        except OSError:
            pass
    return out


def process_name(p: int, root: int) -> str:
    """The API server (the root), vLLM's engine core (it renames its process), or what /proc calls it."""
    if p == root:
        return "api_server"
    try:
        return Path(f"/proc/{p}/comm").read_text().strip() or str(p)
    except OSError:
        return str(p)


def runtime_dir_of(pid: int) -> Path | None:
    """SAE_STEER_RUNTIME_DIR as the server's processes see it (sae-steer serve sets it for its engine)."""
    for p in tree(pid):
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"SAE_STEER_RUNTIME_DIR="):
                return Path(kv.split(b"=", 1)[1].decode())
    return None


async def sample_rss(pid: int, t0: float, every: float, out: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        per = rss_kb(pid)
        by_name: Counter = Counter()
        for p, kb in per.items():
            by_name[process_name(p, pid)] += kb
        out.append({"t": round(time.monotonic() - t0, 1), "rss_mb": round(sum(per.values()) / 1024, 1),
                    "processes": len(per), "load1": round(os.getloadavg()[0], 2),
                    "by_process_mb": {k: round(v / 1024, 1) for k, v in sorted(by_name.items())}})
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def metric(client: httpx.AsyncClient, name: str) -> float | None:
    r = await client.get("/metrics")
    if r.status_code != 200:
        return None
    total = None
    for line in r.text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))], 3)


# ---------------------------------------------------------------- after the load

async def after_checks(soak: Soak, pid: int | None, runtime: Path | None) -> dict:
    client, args = soak.client, soak.args
    out = {}
    # drained: vanished clients' requests were aborted, nothing is left running or waiting
    t0, running, waiting = time.monotonic(), None, None
    while time.monotonic() - t0 < 60:
        running = await metric(client, "vllm:num_requests_running")
        waiting = await metric(client, "vllm:num_requests_waiting")
        if running == 0 and waiting == 0:
            break
        await asyncio.sleep(1)
    out["drained"] = {"num_requests_running": running, "num_requests_waiting": waiting,
                      "seconds_to_drain": round(time.monotonic() - t0, 1)}
    # slots: max_num_seqs distinct steerings at once
    rng = random.Random(soak.seed + 17)
    bodies = []
    for i in range(args.max_num_seqs):
        path, body = soak.base(rng, chat=False)
        body["steering"] = {"interventions": [{"type": "sae", "sae": soak.offer.saes[i % len(soak.offer.saes)]["name"],
                                               "feature": i, "mode": "add", "strength": 3.0 + i / 8}]}
        bodies.append((path, body))
    rec = Record()
    slot_check = Soak(client, soak.offer, args, rec, soak.seed)
    results = await asyncio.gather(*(slot_check.valid("slots", p, b) for p, b in bodies), return_exceptions=True)
    failures = [repr(r)[:300] for r in results if isinstance(r, Exception)]
    out["slots"] = {"requests": len(bodies), "failed": len(failures), "failures": failures[:5]}
    # runtime directory: no telemetry or capture file left behind
    if runtime is not None and runtime.is_dir():
        await asyncio.sleep(2)
        left = sorted(n for n in os.listdir(runtime) if not n.startswith("_slots."))  # each engine's slot counts
        now = time.time()
        ages = {n: round(now - (runtime / n).stat().st_mtime, 1) for n in left[:10] if (runtime / n).exists()}
        kinds = Counter(n.split(".", 1)[1] if "." in n else n for n in left)
        out["runtime_dir"] = {"path": str(runtime), "files_left": len(left), "by_suffix": dict(kinds),
                              "examples_age_s": ages}
    # solo: a sample re-sent one at a time
    pool = list(soak.rec.samples)
    random.Random(soak.seed + 5).shuffle(pool)
    checked, mismatches = 0, []
    for path, body, tokens in pool[:args.solo_samples]:
        r = await client.post(path, json=body)
        checked += 1
        if r.status_code != 200:
            mismatches.append({"path": path, "status": r.status_code, "text": r.text[:300]})
            continue
        data = r.json()
        solo = [c.get("token_ids") for c in sorted(data["choices"], key=lambda c: c["index"])]
        if solo != tokens:
            mismatches.append({"path": path, "body": {k: v for k, v in body.items() if k not in ("model",)},
                               "under_load": tokens, "solo": solo})
    out["solo"] = {"checked": checked, "mismatches": len(mismatches), "examples": mismatches[:3]}
    out["after_load_request_ok"] = not failures and checked > 0
    return out


async def run(url: str, pid: int | None, args) -> dict:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"soak: loopback only, not {host!r}")
    # keepalive_expiry below uvicorn's 5-s keep-alive timeout: a pooled connection reused just as the server
    # closes it is a client-side race (seen as httpx.ReadError twice in the first 10-minute run), not a server error
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        offer = await discover(client, args.inline_layer, args.d_model)
        runtime = runtime_dir_of(pid) if pid else None
        rec = Record()
        soak = Soak(client, offer, args, rec, args.seed)
        rss: list = []
        stop = asyncio.Event()
        t0 = time.monotonic()
        sampler = asyncio.create_task(sample_rss(pid, t0, args.rss_every, rss, stop)) if pid else None
        deadline = t0 + args.duration
        await asyncio.gather(*(soak.worker(i, deadline) for i in range(args.clients)))
        load_seconds = time.monotonic() - t0
        checks = await after_checks(soak, pid, runtime)
        if sampler:
            await asyncio.sleep(args.rss_every)
            stop.set()
            await sampler
        total = sum(rec.counts.values())
    warm = [s["rss_mb"] for s in rss if s["t"] <= args.duration * args.warmup_fraction] or [rss[0]["rss_mb"]] if rss else []
    rss_summary = None
    if rss:
        base = max(warm)
        warm_at = max((s for s in rss if s["t"] <= args.duration * args.warmup_fraction), key=lambda s: s["t"],
                      default=rss[0])
        rss_summary = {"by_process_after_warmup_mb": warm_at["by_process_mb"], "by_process_final_mb": rss[-1]["by_process_mb"],
                       "first_mb": rss[0]["rss_mb"], "after_warmup_mb": base, "max_mb": max(s["rss_mb"] for s in rss),
                       "final_mb": rss[-1]["rss_mb"],
                       "growth_after_warmup_pct": round(100 * (rss[-1]["rss_mb"] - base) / base, 2),
                       "warmup_s": round(args.duration * args.warmup_fraction, 1)}
    kinds = sorted(rec.counts)
    return {
        "date": date.today().isoformat(),
        "url": url,
        "config": {k: v for k, v in vars(args).items() if k not in ("admin_key", "admin_key_file", "out")},
        "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "load_seconds": round(load_seconds, 1),
        "requests_sent": total,
        "requests_per_second": round(total / load_seconds, 2),
        "generated_tokens": rec.tokens,
        "by_kind": {k: {"sent": rec.counts[k], "ok": rec.ok[k], "p50_s": pct(rec.latency[k], 0.5),
                        "p99_s": pct(rec.latency[k], 0.99)} for k in kinds},
        "errors": dict(rec.errors),
        "error_examples": rec.examples,
        "checks": checks,
        "rss": rss_summary,
        "rss_samples": rss,
    }


# ---------------------------------------------------------------- a server of its own (the tiny model)

def start_tiny_server(work: Path, args) -> tuple[subprocess.Popen, str, Path]:
    import torch
    from sae_steer.formats import save_sae, save_vector
    from sae_steer.tiny_model import build_tiny_llama, random_sae
    model = build_tiny_llama(work / "tiny-llama", hidden=128, layers=4)
    specs = {"relu-l1": ("relu", 1, None), "gated-l1": ("gated", 1, None), "jump-l2": ("jumprelu", 2, None),
             "topk-l3": ("topk", 3, 16)}
    g = torch.Generator().manual_seed(7)
    cmd = [sys.executable, "-m", "sae_steer.cli", "serve", str(model), "--dtype", "float32", "--max-model-len", "512",
           "--block-size", "32", "--max-num-seqs", str(args.max_num_seqs), "--seed", "0", "--served-model-name",
           "tiny", "--steering-vector-dir", str(work / "built"), "--steering-layers", "2"]
    if not args.compiled:
        cmd.append("--enforce-eager")
    for i, (name, (arch, layer, k)) in enumerate(specs.items()):
        cmd += ["--sae", f"{name}={save_sae(random_sae(128, 256, layer, arch, k=k, seed=i), work / 'saes' / name)}"]
    cmd += ["--vector", f"calm={save_vector({1: torch.randn(128, generator=g), 2: torch.randn(128, generator=g)}, work / 'calm.safetensors')}",
            "--vector", f"early={save_vector({0: torch.randn(128, generator=g)}, work / 'early.safetensors')}"]
    key = work / "admin.key"
    key.write_text(args.admin_key)
    key.chmod(0o600)
    runtime = work / "runtime"
    runtime.mkdir(mode=0o700)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd += ["--steering-admin-key-file", str(key), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "SAE_STEER_RUNTIME_DIR": str(runtime)}
    log = work / "server.log"
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("server did not come up")


def log_findings(log: Path) -> dict:
    text = log.read_text(errors="replace")
    return {"http_5xx_lines": sum(1 for line in text.splitlines() if '" 5' in line and "HTTP/1.1" in line),
            "tracebacks": text.count("Traceback"), "errors": sum(1 for line in text.splitlines() if " ERROR " in line)}


def parse_mix(text: str) -> dict[str, float]:
    mix = {k: float(w) for k, w in (item.split("=") for item in text.split(","))}
    unknown = set(mix) - set(KINDS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown kinds {sorted(unknown)}; known: {sorted(KINDS)}")
    return mix


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (loopback only); default: start a tiny-model server")
    p.add_argument("--pid", type=int, help="the running server's pid (for RSS and the runtime directory)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests in all")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--vanish-max-tokens", type=int, default=48)
    p.add_argument("--max-num-seqs", type=int, default=64, help="the server's --max-num-seqs (the slot check)")
    p.add_argument("--solo-samples", type=int, default=64)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--rss-every", type=float, default=5.0)
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="RSS growth is measured from the max of this first part")
    p.add_argument("--inline-layer", type=int, default=2, help="a steerable layer for inline vectors (and CAA builds)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--admin-key", default=os.environ.get("SAE_STEER_ADMIN_KEY", "soak-admin-key"))
    p.add_argument("--compiled", action="store_true", help="own server: torch.compile instead of --enforce-eager")
    p.add_argument("--mix", type=parse_mix, help="request kinds and weights, e.g. caa=1,plain=4 (default: "
                   + ",".join(f"{k}={w}" for k, w in KINDS.items()) + ")")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/soak-<date>.json)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    proc = work = log = None
    url, pid = args.url, args.pid
    if url is None:
        work = Path(tempfile.mkdtemp(prefix="sae-steer-soak-"))
        proc, url, log = start_tiny_server(work, args)
        pid = proc.pid
        print(f"soak: server {url} (pid {pid}), log {log}", flush=True)
    try:
        print(f"soak: {args.clients} clients for {args.duration:.0f} s", flush=True)
        result = asyncio.run(run(url, pid, args))
        if log is not None:
            result["server_log"] = log_findings(log)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            shutil.copy(log, Path(tempfile.gettempdir()) / f"soak-server-{date.today().isoformat()}.log")
            shutil.rmtree(work, ignore_errors=True)
    out = args.out or Path(__file__).parent / "results" / f"soak-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: result[k] for k in ("load_seconds", "requests_sent", "requests_per_second", "errors", "rss")}
    print(json.dumps(summary, indent=1))
    print(json.dumps(result["checks"], indent=1)[:3000])
    print(f"soak: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
