"""sae-steer's HTTP extension: a `vllm.endpoint_plugins` entry point for vLLM's OpenAI server.

Routes (all under /v1, so vLLM's `--api-key` guards them when set):

    POST   /v1/completions, /v1/chat/completions   vLLM's own, plus `steering`, `telemetry`, `compare`
    GET    /v1/steering/saes                        registered SAEs
    GET    /v1/steering/saes/{name}/features/{i}    decoder norm, logit-lens top tokens, label
    GET    /v1/steering/vectors                     registered and built vectors
    POST   /v1/steering/vectors                     build a CAA vector from contrast pairs (admin key)
    DELETE /v1/steering/vectors/{name}              drop a built vector (admin key)

The completion routes replace vLLM's (endpoint plugins may override a path); they validate the
steering against the served model up front (400 naming the field, OpenAI's error shape) and then
hand the request to vLLM's own serving handlers.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import random
import stat
import threading
import uuid
from dataclasses import replace
from http import HTTPStatus
from pathlib import Path

import torch
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from sae_steer.features import LogitLens, load_labels
from sae_steer.server.protocol import SteeredChatCompletionRequest, SteeredCompletionRequest, reserved_xarg
from sae_steer.spec import SteeringError, check_capture_layers, parse_steering, parse_telemetry
from sae_steer.vllm_plugin import facts, observers

logger = logging.getLogger("vllm.sae_steer")
router = APIRouter()
ADMIN_KEY_ENV = "SAE_STEER_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "SAE_STEER_ADMIN_KEY_FILE"
VECTOR_DIR_ENV = "SAE_STEER_VECTOR_DIR"
MAX_PAIRS = 1024  # a CAA build runs 2 * pairs engine requests
MAX_TEXT_CHARS = 8192  # per contrast text (and at most the model's context in tokens)
CAPTURE_CONCURRENCY = 16  # engine requests in flight for CAA builds, all builds together


def error(message: str, param: str | None = None, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
            404: "NotFoundError", 409: "ConflictError"}.get(status.value, status.phrase)
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status.value}},
                        status_code=status.value)


class SteeringState:
    """What the routes need, built once per API server."""

    def __init__(self, engine_client, args):
        self.engine_client = engine_client
        self.facts = facts.current()
        if self.facts is None:
            raise RuntimeError("sae-steer's HTTP endpoints are enabled but the engine has no sae_steer settings: "
                               "pass --additional-config '{\"sae_steer\": {...}}' (or use `sae-steer serve`)")
        self.settings = facts.current_settings()
        self.model_path = Path(args.model)
        self.tokenizer_path = getattr(args, "tokenizer", None) or args.model
        self.admin_key = admin_key(args)
        # Telemetry and capture pass through this directory: refuse to start if it is not private.
        self.runtime_dir = observers.check_runtime_dir()
        self.max_model_len = int(getattr(getattr(engine_client, "model_config", None), "max_model_len", 0) or 0)
        self.capture_slots = asyncio.Semaphore(CAPTURE_CONCURRENCY)
        self._load_lock = threading.Lock()  # the logit lens and tokenizer load once, in a worker thread
        # Vectors built over HTTP are written here; with `roots` set, it must lie under one of them.
        self.vector_dir = self.settings.check_path(os.environ.get(VECTOR_DIR_ENV) or "steering-vectors",
                                                   "vector dir (--steering-vector-dir)")
        self.built: dict[str, dict[int, torch.Tensor]] = {}  # vectors built over HTTP: name -> layer -> v
        self._lens, self._tokenizer = None, None
        self.labels = {name: load_labels(path, self.facts.saes[name].d_sae) for name, path in self.settings.labels.items()}
        for path in sorted(self.vector_dir.glob("*.safetensors")) if self.vector_dir.is_dir() else ():
            self._adopt(path)

    def _adopt(self, path: Path) -> None:
        from sae_steer.formats import load_vector
        layers = load_vector(path)
        if layers and set(layers) <= self.facts.steerable_layers and path.stem not in self.facts.vectors \
                and all(v.shape[0] == self.facts.d_model for v in layers.values()):
            self.built[path.stem] = layers

    # ---- steering with built vectors: expanded to inline vectors, so workers need no new files ----

    def check_steering(self, raw) -> dict:
        """Validate against the served model and the built vectors (so errors name the user's own
        fields), then rewrite each built vector as inline vectors, one per layer."""
        built = {name: frozenset(layers) for name, layers in self.built.items()}
        steering = parse_steering(raw, replace(self.facts, vectors={**self.facts.vectors, **built}))
        out = steering.model_dump(mode="json", exclude_none=True)
        interventions = []
        for iv, dumped in zip(steering.interventions, out["interventions"]):
            if getattr(iv, "vector", None) in self.built:
                layers = self.built[iv.vector]
                interventions += [{"type": "vector", "layer": L, "values": layers[L].tolist(), "coef": iv.coef}
                                  for L in sorted(layers) if iv.layer in (None, L)]
            else:
                interventions.append(dumped)
        return {**out, "interventions": interventions}

    # ---- model pieces for the logit lens, loaded on first use in this process ----

    # Blocking (disk, CPU): call them through asyncio.to_thread from the routes, never on the event loop.

    def tokenizer(self):
        with self._load_lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
            return self._tokenizer

    def logit_lens(self) -> LogitLens:
        """The served model's final norm and unembedding, read from its safetensors on first use."""
        with self._load_lock:
            return self._load_logit_lens()

    def _load_logit_lens(self) -> LogitLens:
        if self._lens is None:
            from safetensors import safe_open
            from sae_steer.formats import load_sae
            config = json.loads((self.model_path / "config.json").read_text())
            found = {}
            for file in sorted(self.model_path.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    for key in set(f.keys()) & {"model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"}:
                        found[key] = f.get_tensor(key).float()
            unembed = found.get("lm_head.weight", found.get("model.embed_tokens.weight"))
            if unembed is None or "model.norm.weight" not in found:
                raise RuntimeError(f"cannot find the final norm / unembedding in {self.model_path}")
            norm = found["model.norm.weight"]
            if config.get("model_type", "").startswith("gemma"):
                norm = 1.0 + norm  # Gemma's RMSNorm scales by (1 + w)
            saes = {name: load_sae(path, self.settings.layer_of.get(name))
                    for name, path in self.settings.saes.items()}
            self._lens = LogitLens(saes, norm, float(config.get("rms_norm_eps", 1e-6)), unembed)
        return self._lens


def state(request: Request) -> SteeringState:
    return request.app.state.sae_steer


def admin_key(args=None) -> str | None:
    """The admin key: from the file named by SAE_STEER_ADMIN_KEY_FILE (`--steering-admin-key-file`),
    else SAE_STEER_ADMIN_KEY (`--steering-admin-key` sets it). Surrounding whitespace is dropped."""
    path = os.environ.get(ADMIN_KEY_FILE_ENV)
    if path:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            key = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise RuntimeError(f"cannot read the steering admin key file {path!r} ({ADMIN_KEY_FILE_ENV}): {e}") from None
        if not key:
            raise RuntimeError(f"the steering admin key file {path!r} ({ADMIN_KEY_FILE_ENV}) is empty")
        if mode & 0o077:
            logger.warning("sae-steer: the admin key file %s has mode %04o: other users can read it (chmod 600)",
                           path, mode)
        return key
    key = getattr(args, "steering_admin_key", None) or os.environ.get(ADMIN_KEY_ENV)
    return key.strip() if key and key.strip() else None


def require_admin(request: Request, authorization: str | None = Header(default=None),
                  x_steering_admin_key: str | None = Header(default=None)) -> None:
    """Mutating routes need the admin key (Authorization: Bearer KEY or X-Steering-Admin-Key: KEY)."""
    key = state(request).admin_key
    given = x_steering_admin_key or (authorization[7:] if authorization and authorization.startswith("Bearer ")
                                     else None)
    if not key:
        raise _HTTPError(error("steering admin routes are disabled: start the server with "
                               f"--steering-admin-key-file, {ADMIN_KEY_FILE_ENV} or {ADMIN_KEY_ENV}",
                               status=HTTPStatus.FORBIDDEN))
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):  # constant time
        raise _HTTPError(error("missing or wrong steering admin key (X-Steering-Admin-Key header)",
                               status=HTTPStatus.UNAUTHORIZED))


class _HTTPError(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


# ---- completions ----

def _hoist(request) -> str:
    """DESIGN.md puts `telemetry` (and `compare`) inside the steering object; the top level works too.
    Moves them out of `steering` (the engine only sees interventions); returns the prefix of their
    field names for errors ("steering." when they came from inside)."""
    steering = request.steering
    if not isinstance(steering, dict) or not {"telemetry", "compare"} & set(steering):
        return ""
    for key in ("telemetry", "compare"):
        if key in steering and key in request.model_fields_set:
            raise SteeringError(f"steering.{key}", "given both inside `steering` and at the top level")
    if "telemetry" in steering:
        request.telemetry = steering["telemetry"]
    if "compare" in steering:
        if not isinstance(steering["compare"], bool):
            raise SteeringError("steering.compare", "must be true or false")
        request.compare = steering["compare"]
    rest = {k: v for k, v in steering.items() if k not in ("telemetry", "compare")}
    request.steering = rest if set(rest) - {"positions"} else None  # telemetry alone: an unsteered request
    return "steering."


def _check(request, st: SteeringState) -> JSONResponse | None:
    """Validate the three fields; rewrite built vectors and telemetry ids in place."""
    prefix = ""
    try:
        key = reserved_xarg(request)  # vllm_xargs go into extra_args unchecked: no steering or sae_steer_* keys
        if key is not None:
            raise SteeringError(f"vllm_xargs.{key}", "reserved for sae-steer's server (telemetry ids, CAA "
                                                     "captures); send steering as the top-level `steering` field")
        prefix = _hoist(request)
        if request.steering is not None:
            request.steering = st.check_steering(request.steering)
        if request.telemetry is not None:
            try:
                request.telemetry = parse_telemetry(request.telemetry, st.facts)
            except SteeringError as e:
                raise SteeringError(prefix + e.field, e.message) from None
            if (request.n or 1) > 1 or getattr(request, "use_beam_search", False):
                raise SteeringError(prefix + "telemetry", "telemetry needs n=1 (each choice would need its own record)")
            prompt = getattr(request, "prompt", None)
            if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
                raise SteeringError(prefix + "telemetry", "telemetry needs a single prompt per request")
            request.telemetry["id"] = uuid.uuid4().hex
        if request.compare:
            if request.steering is None:
                raise SteeringError(prefix + "compare", "compare needs interventions to compare against")
    except SteeringError as e:
        return error(str(e), e.field)
    return None


def _body(response: BaseModel, telemetry: dict | None, st: SteeringState) -> dict:
    body = response.model_dump()
    if telemetry:
        _attach_telemetry(body["choices"][0], telemetry, st)
    return body


def _respond(result, telemetry: dict | None, st: SteeringState):
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    if isinstance(result, ErrorResponse):
        return JSONResponse(content=result.model_dump(), status_code=result.error.code)
    if isinstance(result, BaseModel):
        return JSONResponse(content=_body(result, telemetry, st))
    return StreamingResponse(_stream(result, telemetry, st), media_type="text/event-stream")


async def _stream(chunks, telemetry: dict | None, st: SteeringState):
    reader = observers.TelemetryReader(telemetry["id"]) if telemetry else None
    try:
        async for chunk in chunks:
            if reader and chunk.startswith("data: {"):
                body = json.loads(chunk[6:])
                if body.get("choices"):
                    body["choices"][0]["telemetry"] = _telemetry_entries(reader, telemetry, st)
                    chunk = f"data: {json.dumps(body)}\n\n"
            yield chunk
    finally:
        if telemetry:
            observers.discard(telemetry["id"])


def _attach_telemetry(choice: dict, telemetry: dict, st: SteeringState) -> None:
    """A finished request: all its records, then its files go."""
    choice["telemetry"] = _telemetry_entries(observers.TelemetryReader(telemetry["id"]), telemetry, st)
    observers.discard(telemetry["id"])


def _telemetry_entries(reader: observers.TelemetryReader, telemetry: dict, st: SteeringState) -> list[dict]:
    """[{"token_index", "features": [{"index", "activation", "label"}]}] for the records not sent yet."""
    labels = st.labels.get(telemetry["sae"], {})
    return [{"token_index": index, "features": [
        {"index": i, "activation": a, "label": labels.get(i)}
        for i, a in zip(record["features"], record["activations"]) if a > 0]}
        for index, record in sorted(reader.new_records(), key=lambda r: r[0])]


async def _serve(request, raw_request: Request, handler_name: str, method: str):
    st = state(raw_request)
    bad = _check(request, st)
    if bad is not None:
        return bad
    handler = getattr(raw_request.app.state, handler_name)
    if handler is None:
        return error("this model does not support this API", status=HTTPStatus.NOT_FOUND)
    if not request.compare:
        return _respond(await getattr(handler, method)(request, raw_request), request.telemetry, st)
    # compare: the same request twice, one without steering, with one shared seed.
    if request.seed is None:
        request.seed = random.randrange(2**31)
    plain = request.model_copy(update={"steering": None, "compare": False, "telemetry": None,
                                       "request_id": f"{getattr(request, 'request_id', None) or uuid.uuid4().hex}-unsteered"})
    if request.stream:
        plain.stream, plain.stream_options = False, None
        unsteered_task = asyncio.ensure_future(getattr(handler, method)(plain, None))
        steered = await getattr(handler, method)(request, raw_request)
        if not isinstance(steered, BaseModel):  # a stream: the unsteered result follows it as a last chunk
            return StreamingResponse(_stream_then_unsteered(_stream(steered, request.telemetry, st), unsteered_task),
                                     media_type="text/event-stream")
        unsteered = await unsteered_task
    else:
        steered, unsteered = await asyncio.gather(getattr(handler, method)(request, raw_request),
                                                  getattr(handler, method)(plain, None))
    for result in (steered, unsteered):
        if not isinstance(result, BaseModel) or not hasattr(result, "choices"):
            return _respond(result, None, st)
    body = _body(steered, request.telemetry, st)
    body["unsteered"] = {"id": unsteered.id, "choices": unsteered.model_dump()["choices"]}
    return JSONResponse(content=body)


async def _stream_then_unsteered(chunks, unsteered_task):
    """The steered stream, then one chunk with no choices and `unsteered` (the shape of a usage chunk,
    which OpenAI clients accept), then [DONE]."""
    last = {}
    async for chunk in chunks:
        if chunk.startswith("data: [DONE]"):
            unsteered = await unsteered_task
            body = {k: last.get(k) for k in ("id", "object", "created", "model")}
            body["choices"] = []
            body["unsteered"] = ({"id": unsteered.id, "choices": unsteered.model_dump()["choices"]}
                                 if hasattr(unsteered, "choices") else {"error": unsteered.model_dump()})
            yield f"data: {json.dumps(body)}\n\n"
        elif chunk.startswith("data: {"):
            last = json.loads(chunk[6:])
        yield chunk


@router.post("/v1/completions", responses={400: {"description": "bad request, e.g. invalid steering"}})
async def create_completion(request: SteeredCompletionRequest, raw_request: Request):
    return await _serve(request, raw_request, "openai_serving_completion", "create_completion")


@router.post("/v1/chat/completions", responses={400: {"description": "bad request, e.g. invalid steering"}})
async def create_chat_completion(request: SteeredChatCompletionRequest, raw_request: Request):
    return await _serve(request, raw_request, "openai_serving_chat", "create_chat_completion")


# ---- SAEs ----

@router.get("/v1/steering/saes")
async def list_saes(raw_request: Request):
    st = state(raw_request)
    return {"object": "list", "data": [
        {"name": n, "layer": f.layer, "d_sae": f.d_sae, "architecture": f.architecture, "d_model": f.d_model}
        for n, f in sorted(st.facts.saes.items())]}


@router.get("/v1/steering/saes/{name}/features/{index}")
async def describe_feature(name: str, index: int, raw_request: Request, top_k: int = 10):
    st = state(raw_request)
    if name not in st.facts.saes:
        return error(f"unknown SAE {name!r}; registered: {sorted(st.facts.saes)}", "name", HTTPStatus.NOT_FOUND)
    if not 0 <= index < st.facts.saes[name].d_sae:
        return error(f"feature {index} is out of range (d_sae={st.facts.saes[name].d_sae})", "index",
                     HTTPStatus.NOT_FOUND)
    if not 1 <= top_k <= 100:
        return error("top_k must be in 1..100", "top_k")

    def describe() -> dict:  # loads the lens and tokenizer on first use: in a worker thread
        lens = st.logit_lens()
        lens_tokens = lens.top_tokens(name, index, top_k)
        tok = st.tokenizer()

        def tokens(pairs):
            return [{"token_id": t, "token": tok.decode([t]), "logit": v} for t, v in pairs]

        return {"sae": name, "index": index, "layer": st.facts.saes[name].layer,
                "decoder_norm": float(lens.saes[name].W_dec[index].float().norm()),
                "top_tokens": tokens(lens_tokens["top"]), "bottom_tokens": tokens(lens_tokens["bottom"]),
                "label": st.labels.get(name, {}).get(index)}

    return await asyncio.to_thread(describe)


# ---- vectors ----

@router.get("/v1/steering/vectors")
async def list_vectors(raw_request: Request):
    st = state(raw_request)
    data = [{"name": n, "layers": sorted(L), "source": "config"} for n, L in sorted(st.facts.vectors.items())]
    data += [{"name": n, "layers": sorted(v), "source": "built", "path": str(st.vector_dir / f"{n}.safetensors")}
             for n, v in sorted(st.built.items())]
    return {"object": "list", "data": data}


class ContrastPair(BaseModel):
    positive: str = Field(min_length=1, max_length=MAX_TEXT_CHARS,
                          description="text showing the behaviour (ends at the answer token)")
    negative: str = Field(min_length=1, max_length=MAX_TEXT_CHARS,
                          description="the same with the opposite behaviour")


class BuildVectorRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    pairs: list[ContrastPair] = Field(min_length=1, max_length=MAX_PAIRS)
    layers: list[int] = Field(min_length=1)
    overwrite: bool = False


@router.post("/v1/steering/vectors", dependencies=[Depends(require_admin)], status_code=201)
async def build_vector(body: BuildVectorRequest, raw_request: Request):
    """CAA (Panickssery et al. 2024): v_L = mean over pairs of x_L(positive) - x_L(negative), where x_L is
    the residual stream after layer L at the last token of each text (the answer token)."""
    st = state(raw_request)
    try:
        layers = check_capture_layers(body.layers, st.facts)
    except SteeringError as e:
        return error(str(e), e.field)
    if body.name in st.facts.vectors or body.name in st.facts.saes:
        return error(f"{body.name!r} is registered in the server's config; pick another name", "name",
                     HTTPStatus.CONFLICT)
    if body.name in st.built and not body.overwrite:
        return error(f"vector {body.name!r} exists; pass overwrite=true to replace it", "name", HTTPStatus.CONFLICT)
    texts = [t for p in body.pairs for t in (p.positive, p.negative)]
    tok = await asyncio.to_thread(st.tokenizer)
    token_ids = await asyncio.to_thread(lambda: [tok(t, add_special_tokens=True)["input_ids"] for t in texts])
    for i, ids in enumerate(token_ids):
        if st.max_model_len and len(ids) >= st.max_model_len:
            field = f"pairs[{i // 2}].{('positive', 'negative')[i % 2]}"
            return error(f"{field}: {len(ids)} tokens; the served model's context is {st.max_model_len}", field)
    logger.info("sae-steer: building vector %r from %d pairs at layers %s", body.name, len(body.pairs), layers)
    done = 0

    def read(cid: str) -> dict[int, torch.Tensor | None]:
        try:
            return {L: observers.read_capture(cid, L) for L in layers}
        finally:
            observers.discard(cid)

    async def capture(ids: list[int]) -> dict[int, torch.Tensor]:
        nonlocal done
        from vllm import SamplingParams
        cid = uuid.uuid4().hex
        params = SamplingParams(max_tokens=1, temperature=0.0,
                                extra_args={observers.CAPTURE_KEY: {"id": cid, "layers": layers}})
        async with st.capture_slots:  # at most CAPTURE_CONCURRENCY engine requests, all builds together
            try:
                async for _ in st.engine_client.generate({"prompt_token_ids": ids}, params,
                                                         f"sae-steer-capture-{cid}"):
                    pass
            finally:
                got = await asyncio.to_thread(read, cid)
        done += 1
        if done % max(1, len(texts) // 10) == 0 or done == len(texts):
            logger.info("sae-steer: vector %r: %d/%d texts", body.name, done, len(texts))
        missing = [L for L, x in got.items() if x is None]
        if missing:
            raise RuntimeError(f"no activation captured at layers {missing}")
        return got

    try:
        acts = await asyncio.gather(*(capture(ids) for ids in token_ids))
    except RuntimeError as e:  # the workers' captures never arrived (another host? see the README)
        logger.error("sae-steer: vector %r not built: %s", body.name, e)
        return error(f"cannot build the vector: {e}; the engine's workers must share this server's host and "
                     "runtime directory", status=HTTPStatus.SERVICE_UNAVAILABLE)
    vector = {L: torch.stack([acts[2 * i][L] - acts[2 * i + 1][L] for i in range(len(body.pairs))]).mean(0)
              for L in layers}
    from sae_steer.formats import save_vector
    path = await asyncio.to_thread(save_vector, vector, st.vector_dir / f"{body.name}.safetensors",
                                   metadata={"built_from_pairs": str(len(body.pairs)),
                                             "method": "caa-mean-difference"})
    st.built[body.name] = vector
    logger.info("sae-steer: vector %r saved to %s", body.name, path)
    return {"name": body.name, "layers": layers, "pairs": len(body.pairs), "path": str(path),
            "norms": {str(L): float(v.norm()) for L, v in vector.items()}}


@router.delete("/v1/steering/vectors/{name}", dependencies=[Depends(require_admin)])
async def delete_vector(name: str, raw_request: Request):
    st = state(raw_request)
    if name in st.facts.vectors:
        return error(f"vector {name!r} comes from the server's config and cannot be deleted over HTTP", "name",
                     HTTPStatus.CONFLICT)
    if name not in st.built:
        return error(f"no built vector {name!r}", "name", HTTPStatus.NOT_FOUND)
    del st.built[name]
    (st.vector_dir / f"{name}.safetensors").unlink(missing_ok=True)
    return {"name": name, "deleted": True}


class SteeringEndpoints:
    """The `vllm.endpoint_plugins` entry point (loaded when VLLM_PLUGINS names `sae_steer`)."""
    name = "sae_steer"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)

        @app.exception_handler(_HTTPError)
        async def _(request: Request, exc: _HTTPError):
            return exc.response

    async def init_state(self, engine_client, state, args) -> None:
        state.sae_steer = SteeringState(engine_client, args)
        logger.info("sae-steer: HTTP endpoints ready (steering field, /v1/steering/*); admin routes %s; "
                    "runtime directory %s", "enabled" if state.sae_steer.admin_key else
                    "disabled (no --steering-admin-key-file)", state.sae_steer.runtime_dir)
