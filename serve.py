"""Serve trained models: `uv run serve.py --checkpoint models/<run> [--checkpoint models/<other>] --port 8000`.

An OpenAI-compatible HTTP server (FastAPI on uvicorn) and the playground page at http://127.0.0.1:8000/.

- `GET /v1/models` lists the loaded checkpoints; `POST /v1/completions` takes OpenAI's completion fields (prompt,
  max_tokens, temperature, top_p, n, seed, stop, logprobs, stream) plus top_k, and streams server-sent events in
  OpenAI's `text_completion` chunk shape when `stream` is true. The official `openai` client works unchanged.
- Sampling is sample.py's: inference.Settings' rules and model.generate with its KV cache, one torch.Generator per
  completion. The n completions of a request are n independent streams seeded seed, seed + 1, ... (no seed: a
  random one), so one completion of a request with seed s is exactly `sample.py --seed s`'s first sample.
- logprobs are the model's own distribution (the softmax of its logits at temperature 1, before temperature,
  top-k and top-p), taken from the very logits each token was drawn from, as OpenAI and vLLM report them.
- Generation runs off the event loop in --workers threads (default 1), each stepping its completions one token each
  in turn, so all streams move at once; at most --workers + --queue completions are admitted, and past that a
  request gets 503 (Retry-After: 1). A client that disconnects stops its completions before their next token.
- Every error is JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status for bad
  input; fields the API does not know are refused (a typo such as "max_token" would otherwise pass unnoticed).

The details, and what each check refuses: docs/serve.md. Bad flags: one `error:` line, exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import secrets
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import uvicorn
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from pydantic import BaseModel, ConfigDict, ValidationError
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException
except ImportError:  # the server's packages are an optional extra
    if __name__ == "__main__":
        print("error: serve.py needs fastapi and uvicorn: uv sync --extra serve", file=sys.stderr)
        sys.exit(2)
    raise

import torch

from config import OneLineParser, UserError, flag_type
from inference import MAX_SEED, Settings, StreamDecoder, encode_prompt, load_model
from model import GPT
from tokenizer import Tokenizer

WEB = Path(__file__).resolve().parent / "web"
MAX_N = 16  # completions per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's completions allow 5, its chat API 20)
MAX_STOPS = 4  # stop sequences per request, as OpenAI
LOWEST_LOGPROB = -9999.0  # what a logprob of -inf is reported as (JSON has no infinity), as vLLM does


@dataclass
class Served:
    """A loaded checkpoint: what /v1/models lists and what its completions sample from."""

    id: str
    model: GPT
    tokenizer: Tokenizer
    checkpoint: str
    weights: str  # "ema" or "raw"
    created: int  # the checkpoint's time, as OpenAI's models have one


@dataclass
class Limits:
    """What the server admits: its command-line flags, and the pool's size."""

    max_tokens_cap: int = 1024
    max_prompt_chars: int = 20_000
    workers: int = 1
    queue: int = 64
    threads: int = 1
    api_key: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Requests and errors


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # padding against network side channels: accepted, unused


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's fields, with top_k added (as vLLM does). Types are strict ("0.5" is not 0.5,
    true is not 1); null means the default. OpenAI's fields this server does not implement are accepted only at the
    value that changes nothing; any other field is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str]
    max_tokens: int | None = None  # OpenAI's default: 16
    temperature: float | None = None  # 1
    top_p: float | None = None  # 1
    top_k: int | None = None  # all ids
    n: int | None = None  # 1
    seed: int | None = None  # a random one
    stop: str | list[str] | None = None
    logprobs: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    echo: bool | None = None
    best_of: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None  # an end-user id: accepted, unused


@dataclass
class ApiError(Exception):
    """An error the client gets as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    kind: str = "invalid_request_error"  # OpenAI's "type"
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


async def read_request(request: Request, limit: int) -> CompletionRequest:
    """The body, read up to `limit` bytes (413 past it, with or without a Content-Length), parsed and validated:
    a 400 naming the field for anything else."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(
                413, f"the request body is over {limit} bytes, more than this server reads", code="too_large"
            )
    try:
        values = json.loads(data)
    except (ValueError, RecursionError) as error:  # (bytes that are not UTF-8 are a ValueError too)
        raise ApiError(400, f"the request body is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ApiError(400, "the request body must be a JSON object of the completion's fields")
    try:
        return CompletionRequest.model_validate(values)
    except ValidationError as error:  # the first complaint, naming its field
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        param = str(first["loc"][0])
        if first["type"] == "extra_forbidden":
            raise ApiError(
                400, f"unknown field {where!r}: this server refuses fields it does not know", param
            ) from None
        raise ApiError(400, f"{where}: {first['msg']}", param) from None


# ----------------------------------------------------------------------------------------------------------------
# The app


def create_app(models: list[Served], limits: Limits) -> FastAPI:
    """The server for these models: the playground, /v1/models and /v1/completions, with its own generation pool."""
    by_id = {served.id: served for served in models}
    pool = Pool(limits.workers, limits.queue, limits.threads)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.stop()  # running completions end at their next token; queued ones never start

    app = FastAPI(title="Pair Transformer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool, app.state.limits = pool, limits  # for tests and the benchmark

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:  # unknown paths, wrong methods
        code = "not_found" if error.status_code == 404 else None
        return ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}", code=code).response()

    async def authorized(request: Request) -> None:
        """With an API key set, every /v1 call needs `Authorization: Bearer <key>`."""
        if limits.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), limits.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer <key>", code="invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(WEB / "index.html")

    app.mount("/web", StaticFiles(directory=WEB), name="web")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(served) for served in models]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def get_model(model_id: str) -> dict[str, Any]:
        return model_card(find_model(by_id, model_id))

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request) -> Any:
        body = await read_request(request, max_body_bytes(limits))
        plan = plan_completion(body, find_model(by_id, body.model), limits)
        if len(plan.settings) > pool.capacity:  # (it would never be admitted)
            raise ApiError(400, f"n must be at most {pool.capacity} here (--workers + --queue), got {body.n}", "n")
        run = Run(len(plan.settings))
        if not pool.admit(len(plan.settings)):
            raise ApiError(
                503,
                f"the server is busy ({pool.capacity} completions running or queued); try again shortly",
                code="server_busy",
                kind="server_error",
                headers={"Retry-After": "1"},
            )
        for index in range(len(plan.settings)):
            pool.submit(plan, index, run)
        if plan.stream:  # the background task runs however the response ended: done, or the client gone
            return StreamingResponse(
                stream_events(plan, run), media_type="text/event-stream", background=BackgroundTask(run.cancel)
            )
        watcher = asyncio.create_task(cancel_on_disconnect(request, run))
        try:
            return await collect(plan, run)
        finally:
            watcher.cancel()
            run.cancel()  # (nothing left to stop unless this request itself was cancelled)

    return app


def max_body_bytes(limits: Limits) -> int:
    return 12 * limits.max_prompt_chars + 65536  # a character may take 12 bytes of JSON (an escaped surrogate pair)


def find_model(by_id: dict[str, Served], model_id: str) -> Served:
    if model_id not in by_id:
        known = ", ".join(repr(name) for name in by_id)
        raise ApiError(404, f"no model {model_id!r} here; loaded: {known}", "model", "model_not_found")
    return by_id[model_id]


def model_card(served: Served) -> dict[str, Any]:
    """OpenAI's model object, plus what the playground shows about it."""
    cfg = served.model.cfg
    return {
        "id": served.id,
        "object": "model",
        "created": served.created,
        "owned_by": "pair-transformer",
        "checkpoint": served.checkpoint,
        "weights": served.weights,
        "tokenizer": served.tokenizer.name,
        "vocab_size": served.model.vocab_size,
        "context_len": cfg.context_len,
        "parameters": served.model.num_params()["total"],
        "shape": f"{cfg.num_blocks} blocks x {cfg.num_heads} heads x {cfg.embedding_dim} dim",
    }


# ----------------------------------------------------------------------------------------------------------------
# Checking a request: everything is refused before any generation starts


@dataclass
class Plan:
    """A checked request: the prompt's ids and one Settings per completion (seeds seed, seed + 1, ...)."""

    id: str
    served: Served
    prompt: str
    prompt_ids: list[int]
    settings: list[Settings]
    stops: list[str]
    top: int | None  # alternatives per token (logprobs), or None: no logprobs
    stream: bool
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))


def plan_completion(body: CompletionRequest, served: Served, limits: Limits) -> Plan:
    """The request's values, each checked: Settings' rules for sampling (as sample.py's flags), the server's
    limits for the rest. Raises ApiError(400) naming the first bad field."""
    unsupported = {
        "echo": body.echo in (None, False),
        "best_of": body.best_of in (None, 1, body.n),
        "frequency_penalty": body.frequency_penalty in (None, 0),
        "presence_penalty": body.presence_penalty in (None, 0),
        "logit_bias": not body.logit_bias,
        "suffix": not body.suffix,
    }
    for name, neutral in unsupported.items():
        if not neutral:
            raise ApiError(400, f"{name} is not supported by this server (leave it out)", name, "unsupported")
    prompt = body.prompt
    if isinstance(prompt, list):  # OpenAI takes a batch of prompts; one per request here
        if len(prompt) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(
            400,
            f"prompt: {len(prompt)} characters, more than this server's limit of {limits.max_prompt_chars} "
            "(--max_prompt_chars)",
            "prompt",
            "prompt_too_long",
        )
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens > limits.max_tokens_cap:
        raise ApiError(
            400,
            f"max_tokens must be at most {limits.max_tokens_cap} (--max_tokens_cap), got {max_tokens}",
            "max_tokens",
        )
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be from 1 to {MAX_N}, got {n}", "n")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be from 0 to {MAX_LOGPROBS}, got {body.logprobs}", "logprobs")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or not all(stops):
        raise ApiError(400, f"stop: at most {MAX_STOPS} sequences, none of them empty", "stop")
    seed = secrets.randbelow(2**63) if body.seed is None else body.seed
    if seed <= MAX_SEED < seed + n - 1:
        raise ApiError(
            400, "seed + n - 1 must be at most 2**64 - 1 (the n completions use seed, seed + 1, ...)", "seed"
        )
    try:
        settings = [
            Settings(
                max_new_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k,
                top_p=body.top_p,
                seed=seed + i,
            )
            for i in range(n)
        ]
        prompt_ids = encode_prompt(served.tokenizer, prompt)
    except UserError as error:  # Settings names sample.py's flags: --max_new_tokens is max_tokens here
        message = str(error).replace("--max_new_tokens", "--max_tokens").replace(" or None", " or null")
        param = message.split()[0].removeprefix("--") if message.startswith("--") else "prompt"
        raise ApiError(400, message.removeprefix("--"), param) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    rid = f"cmpl-{secrets.token_hex(12)}"
    return Plan(rid, served, prompt, prompt_ids, settings, stops, body.logprobs, bool(body.stream), include_usage)


# ----------------------------------------------------------------------------------------------------------------
# Answering: server-sent events as the tokens come, or one JSON object at the end


async def stream_events(plan: Plan, run: Run) -> AsyncIterator[str]:
    """`data: <chunk>` events in OpenAI's text_completion shape, then `data: [DONE]`. When the client goes away,
    Starlette cancels the response: this finally clause (or the response's background task, had this generator not
    started yet) stops the completions."""
    generated = 0
    try:
        async for piece in run.pieces():
            if piece.error is not None:
                yield event(ApiError(500, piece.error, kind="server_error").body())
                return
            generated += piece.generated
            choice = {
                "text": piece.text,
                "index": piece.index,
                "logprobs": logprobs_json(piece.tokens, len(plan.prompt)) if plan.top is not None else None,
                "finish_reason": piece.finish_reason,
            }
            chunk = envelope(plan, [choice])
            if plan.include_usage:
                chunk["usage"] = None  # OpenAI's chunks say null until the last one
            yield event(chunk)
        if plan.include_usage:  # OpenAI's last chunk: no choices, the usage
            yield event(envelope(plan, [], usage(plan, generated)))
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()


async def collect(plan: Plan, run: Run) -> JSONResponse:
    """Every completion whole, as one text_completion object."""
    choices = [
        {
            "text": "",
            "index": i,
            "logprobs": logprobs_json([], 0) if plan.top is not None else None,
            "finish_reason": None,
        }
        for i in range(len(plan.settings))
    ]
    generated = 0
    async for piece in run.pieces():
        if piece.error is not None:
            raise ApiError(500, piece.error, kind="server_error")
        choice = choices[piece.index]
        choice["text"] += piece.text
        choice["finish_reason"] = piece.finish_reason
        generated += piece.generated
        if plan.top is not None:
            for key, values in logprobs_json(piece.tokens, len(plan.prompt)).items():
                choice["logprobs"][key] += values
    return JSONResponse(envelope(plan, choices, usage(plan, generated)))


def event(value: Any) -> str:
    """One server-sent event carrying a JSON value."""
    return f"data: {json.dumps(value, separators=(',', ':'))}\n\n"


def envelope(plan: Plan, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
    """OpenAI's text_completion object around some choices, with the usage when given."""
    body = {"id": plan.id, "object": "text_completion", "created": plan.created, "model": plan.served.id}
    body["choices"] = choices
    if usage is not None:
        body["usage"] = usage
    return body


def usage(plan: Plan, generated: int) -> dict[str, int]:
    prompt_tokens = len(plan.prompt_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def logprobs_json(tokens: list[Token], prompt_chars: int) -> dict[str, list[Any]]:
    """OpenAI's completion logprobs; text_offset counts characters (code points) from the prompt's start."""
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [t.top for t in tokens],
        "text_offset": [prompt_chars + t.start for t in tokens],
    }


async def cancel_on_disconnect(request: Request, run: Run) -> None:
    """For a non-streaming request: the body is read, so the next ASGI message is the client going away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    run.cancel()


# ----------------------------------------------------------------------------------------------------------------
# The generation worker


class Pool:
    """`workers` generation threads and the admission bound: at most workers + queue completions at once. Each
    thread steps its completions one token each in turn, so every admitted stream moves and none waits for another
    to end. One thread is the default: a token of a small model is mostly Python, and threads contend for the GIL
    (measured, 8 streaming clients on 2 cores: 1 thread 485 tokens/s, 2 threads 315)."""

    def __init__(self, workers: int, extra: int, threads: int):
        self.workers = [Worker(self, threads) for _ in range(workers)]
        self.capacity = workers + extra
        self.admitted = 0
        self.lock = threading.Lock()  # admit runs on the event loop, release in the workers
        self.stopping = threading.Event()
        for worker in self.workers:
            worker.start()

    def admit(self, n: int) -> bool:
        with self.lock:
            if self.admitted + n > self.capacity:
                return False
            self.admitted += n
            return True

    def submit(self, plan: Plan, index: int, run: Run) -> None:
        """An admitted completion goes to the thread with the fewest."""
        with self.lock:
            worker = min(self.workers, key=lambda w: w.load)
            worker.load += 1
        worker.inbox.put((plan, index, run))

    def release(self, worker: Worker | None = None) -> None:
        """A completion is done: its slot is free (and its worker has one fewer)."""
        with self.lock:
            self.admitted -= 1
            if worker is not None:
                worker.load -= 1

    def stop(self) -> None:
        self.stopping.set()
        for worker in self.workers:
            worker.inbox.put(None)  # wake an idle one


class Worker(threading.Thread):
    """One generation thread: round robin over its completions, a token each, between tokens new ones join."""

    def __init__(self, pool: Pool, threads: int):
        super().__init__(name="generate", daemon=True)
        self.pool, self.threads, self.load = pool, threads, 0
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        torch.set_num_threads(self.threads)  # (per thread: this one's matrix products)
        jobs: list[tuple[Run, int, Iterator[Piece]]] = []
        while True:
            with contextlib.suppress(queue.Empty):
                while (job := self.inbox.get(block=not jobs)) is not None:  # wait only with nothing to do
                    plan, index, run = job
                    jobs.append((run, index, completion(plan, index)))
            for job in list(jobs):
                if not step(*job, self.pool):
                    jobs.remove(job)
                    self.pool.release(self)
            if self.pool.stopping.is_set() and not jobs:
                return


def step(run: Run, index: int, pieces: Iterator[Piece], pool: Pool) -> bool:
    """Completion `index` of a request one token further; False once it is done (finished, failed or cancelled)."""
    if run.cancelled.is_set():  # the client is gone
        return False
    if pool.stopping.is_set():
        run.emit(Piece(index, error="the server is shutting down"))
        return False
    try:
        piece = next(pieces, None)
    except UserError as error:  # generate's NaN logits: a diverged checkpoint
        run.emit(Piece(index, error=str(error)))
        return False
    except Exception as error:  # a bug: the request fails, the server goes on
        traceback.print_exc()
        run.emit(Piece(index, error=f"generation failed: {type(error).__name__}: {error}"))
        return False
    if piece is None:
        return False
    run.emit(piece)
    return True


@dataclass
class Token:
    """A generated token: its text, where that text starts and ends in the completion, and its logprobs."""

    text: str
    start: int
    end: int
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class Piece:
    """What a worker hands the event loop: new text of completion `index` with the tokens it came from, the last
    one with its finish_reason ("length" or "stop") and how many tokens were generated, or an error."""

    index: int
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    generated: int = 0
    error: str | None = None


class Run:
    """One request's completions in flight: the workers put Pieces into one asyncio queue (thread-safely), and one
    flag stops them all."""

    def __init__(self, n: int):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Piece | None] = asyncio.Queue()  # None: cancelled, stop waiting
        self.cancelled = threading.Event()
        self.open = n  # completions not finished yet

    def emit(self, piece: Piece) -> None:
        """From a worker thread: hand a piece to the event loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)

    async def pieces(self) -> AsyncIterator[Piece]:
        while self.open:
            piece = await self.queue.get()
            if piece is None:
                return
            if piece.finish_reason is not None or piece.error is not None:
                self.open -= 1
            yield piece

    def cancel(self) -> None:
        """On the event loop: stop the workers before their next token, and whoever waits for their pieces."""
        self.cancelled.set()
        self.queue.put_nowait(None)


class LogitsTap(torch.nn.Module):
    """The model as generate() sees it, keeping the last position's logits of each call: the ones it samples from."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model, self.cfg, self.last = model, model.cfg, None

    def forward(self, idx: torch.Tensor, cache: Any = None) -> torch.Tensor:
        logits = self.model(idx, cache=cache)
        self.last = logits[0, -1]
        return logits


class StopText:
    """The completion's text, cut before the first stop sequence; `safe` is how much of it no stop sequence can
    still start in (the rest may be a stop sequence's beginning, so it is held back)."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.stopped = stops, "", False
        self.longest = max((len(s) for s in stops), default=0)

    def add(self, piece: str) -> int:
        """Append a piece of text; returns how many characters are safe to hand out."""
        start = max(0, len(self.text) - self.longest + 1)  # a stop sequence not found before cannot start earlier
        self.text += piece
        found = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True
            return len(self.text)
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return len(self.text) - held


def completion(plan: Plan, index: int) -> Iterator[Piece]:
    """Completion `index` as Pieces: its Settings sampled through model.generate (the KV cache, sample.py's code),
    the text decoded as sample.py streams it, tokens held back while their text may begin a stop sequence."""
    served, settings = plan.served, plan.settings[index]
    tap = LogitsTap(served.model)
    decoder, text = StreamDecoder(served.tokenizer), StopText(plan.stops)
    pending: list[Token] = []  # generated, not handed out yet
    sent, generated = 0, 0  # characters handed out, tokens generated since the last piece
    for token_id in settings.sample(tap, plan.prompt_ids):
        generated += 1
        start = len(text.text)
        safe = text.add(decoder.feed(token_id))
        pending.append(token_record(served, tap.last, token_id, start, len(text.text), plan.top))
        if text.stopped:
            break
        ready = [t for t in pending if t.end <= safe]
        if ready:
            pending = pending[len(ready) :]
            yield Piece(index, text.text[sent : ready[-1].end], ready, generated=generated)
            sent, generated = ready[-1].end, 0
    if not text.stopped:
        text.add(decoder.flush())  # a character the model never completed (the length limit cut it)
    kept = [t for t in pending if t.start < len(text.text) or not text.stopped]  # none past a stop sequence
    reason = "stop" if text.stopped else "length"
    yield Piece(index, text.text[sent:], kept, reason, generated=generated)


def token_record(served: Served, logits: torch.Tensor, token_id: int, start: int, end: int, top: int | None) -> Token:
    """A generated token; with top (logprobs) not None, its logprob and the top alternatives' under the model's own
    distribution (temperature 1, no top-k/top-p). Alternatives that decode to the same text (a BPE token's partial
    UTF-8 bytes all read U+FFFD) appear once, with the likeliest's logprob."""
    text = served.tokenizer.decode([token_id])
    if top is None:
        return Token(text, start, end)
    logprobs = logits.float().log_softmax(dim=-1)[: served.model.vocab_size]
    values, ids = logprobs.topk(min(top, served.model.vocab_size))
    alternatives: dict[str, float] = {}
    for alternative, value in zip(ids.tolist(), values.tolist(), strict=True):
        alternatives.setdefault(served.tokenizer.decode([alternative]), finite(value))
    chosen = finite(logprobs[token_id].item())
    alternatives.setdefault(text, chosen)  # the sampled token is always listed (OpenAI: up to logprobs + 1)
    return Token(text, start, end, chosen, alternatives)


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOWEST_LOGPROB


# ----------------------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="serve.py",
        description="Serve checkpoints over an OpenAI-compatible API, with a playground page at /. "
        "Flags take --flag value or --flag=value.",
        allow_abbrev=False,
    )
    integer = flag_type(int)
    default = Limits()
    add = parser.add_argument
    add(
        "--checkpoint",
        action="append",
        required=True,
        help="a step_* folder or a run folder (its latest); repeat it to serve several (the playground shows two "
        "side by side)",
    )
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    add("--port", type=integer, default=8000, help="port to listen on; 0 = any free port (default: %(default)s)")
    add("--api_key", help="require `Authorization: Bearer <key>` on /v1 (default: $PAIR_API_KEY, else none)")
    add(
        "--max_tokens_cap",
        type=integer,
        default=default.max_tokens_cap,
        help="largest max_tokens (default: %(default)s)",
    )
    add(
        "--max_prompt_chars",
        type=integer,
        default=default.max_prompt_chars,
        help="in characters (default: %(default)s)",
    )
    add(
        "--workers",
        type=integer,
        default=default.workers,
        help="generation threads, each stepping its completions a token each in turn (default: %(default)s)",
    )
    add(
        "--queue",
        type=integer,
        default=default.queue,
        help="more completions admitted; then 503 (default: %(default)s)",
    )
    add(
        "--threads",
        type=integer,
        default=default.threads,
        help="torch threads per generation thread (default: %(default)s)",
    )
    add("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: cuda, then mps, then cpu")
    add("--weights", choices=("ema", "raw"), help="the weight average (ema) or the raw weights (default: ema if saved)")
    return parser


def check_flags(args: argparse.Namespace) -> Limits:
    for name, low in (("max_tokens_cap", 1), ("max_prompt_chars", 1), ("workers", 1), ("queue", 0), ("threads", 1)):
        if getattr(args, name) < low:
            raise UserError(f"--{name} must be an integer of at least {low}, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("PAIR_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise UserError("--api_key must not be empty")
    return Limits(args.max_tokens_cap, args.max_prompt_chars, args.workers, args.queue, args.threads, api_key)


def model_id(checkpoint: str) -> str:
    """A checkpoint's name in the API: its run folder's name, with the step for a step_* folder (run/step_000300)."""
    path = Path(checkpoint).resolve()
    return f"{path.parent.name}/{path.name}" if path.name.startswith("step_") else path.name


def load_models(checkpoints: list[str], device: str, weights: str | None) -> list[Served]:
    models: list[Served] = []
    for checkpoint in checkpoints:
        name = model_id(checkpoint)
        if any(served.id == name for served in models):
            raise UserError(f"two --checkpoint flags would both be served as {name!r}; serve each model once")
        model, tokenizer, which = load_model(checkpoint, device, weights)
        # one token now: the first forward pass imports torch's lazy parts (seconds on a CPU), not in a request
        list(Settings(max_new_tokens=1, temperature=0.0).sample(model, [tokenizer.start_id]))
        models.append(Served(name, model, tokenizer, checkpoint, which, int(Path(checkpoint).stat().st_mtime)))
    return models


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port or a bad host is one error line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        limits = check_flags(args)
        sock = listen(args.host, args.port)  # first: a taken port is refused before the models load
        with contextlib.ExitStack() as on_error:
            on_error.callback(sock.close)
            models = load_models(args.checkpoint, args.device, args.weights)
            on_error.pop_all()
    except UserError as error:
        print(f"error: {str(error).removeprefix('argument ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the models load
        return 130
    host, port = sock.getsockname()[:2]
    for served in models:
        cfg = served.model.cfg
        print(
            f"serving {served.checkpoint} as {served.id!r}: {served.model.num_params()['total'] / 1e6:.2f}M "
            f"parameters, context {cfg.context_len}, {served.tokenizer.name} tokens, {served.weights} weights",
            flush=True,
        )
    where = f"[{host}]" if ":" in host else host
    print(f"playground: http://{where}:{port}/   API: http://{where}:{port}/v1", flush=True)
    if limits.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"note: listening on {host} with no API key: anyone who reaches this port can use it", flush=True)
    app = create_app(models, limits)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again: stop quietly, as sample.py does
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
