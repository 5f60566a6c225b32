"""serve.py: the OpenAI-compatible server, through the official openai client and raw HTTP against a real uvicorn
server on a free port: the same samples as sample.py, streaming, n, stop, logprobs, concurrency, disconnects, 100 bad
requests, the API key, the command line."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, default_sigint, randomize, tiny_config

pytest.importorskip("fastapi", reason="serve.py needs the serve extra: uv sync --extra serve")
openai = pytest.importorskip("openai", reason="the tests drive serve.py with the official openai client")
httpx = pytest.importorskip("httpx")
import uvicorn  # noqa: E402

import sample  # noqa: E402
import serve  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from inference import Settings, StreamDecoder, encode_prompt, load_model  # noqa: E402
from model import GPT  # noqa: E402
from tokenizer import CharTokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
PROMPT = "ROMEO:\nWhat"
CAP = 100_000  # the test server's --max_tokens_cap: long enough that a generation nobody stops outlasts any test


# ----------------------------------------------------------------------------------------------------------------
# Helpers (tests/test_playground.py uses them too)


def make_models(folder: Path, text: str) -> list[Path]:
    """Two run folders, "alpha" and "beta": tiny random char models (2 blocks, 32 dim, context 32) of the text."""
    tokenizer = CharTokenizer.from_text(text)
    runs = []
    for name, seed in (("alpha", 1), ("beta", 2)):
        model = randomize(GPT(tiny_config(context_len=32), tokenizer.vocab_size), seed=seed)
        save_checkpoint(folder / name, 5, model, tokenizer.to_dict())
        runs.append(folder / name)
    return runs


def served(runs: list[Path]) -> list[serve.Served]:
    return serve.load_models([str(run) for run in runs], "cpu", None)


@contextlib.contextmanager
def running(app):
    """The app on a real uvicorn server in a thread, on a free port of 127.0.0.1; yields its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def reference(model: GPT, tokenizer, prompt: str, **settings) -> str:
    """What sample.py streams for these settings: Settings.sample (model.generate, the KV cache) through StreamDecoder."""
    stream = StreamDecoder(tokenizer)
    pieces = [
        stream.feed(token_id) for token_id in Settings(**settings).sample(model, encode_prompt(tokenizer, prompt))
    ]
    return "".join(pieces) + stream.flush()


def wait_until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ----------------------------------------------------------------------------------------------------------------
# One server for the module


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare_path) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("models"), shakespeare_path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def server(runs):
    """(base URL, app) of a server for both models: 4 workers, a queue of 64, one torch thread each."""
    app = serve.create_app(served(runs), serve.Limits(max_tokens_cap=CAP, workers=4, queue=64))
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def alpha(runs):
    """The model and tokenizer of "alpha", loaded as sample.py loads them."""
    model, tokenizer, _ = load_model(str(runs[0]), "cpu")
    return model, tokenizer


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=30)


def post(url: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}/v1/completions", content=content, headers=headers, timeout=kwargs.pop("timeout", 30))


# ----------------------------------------------------------------------------------------------------------------
# The API, through the openai client


def test_models_lists_each_checkpoint(client):
    assert [m.id for m in client.models.list()] == ["alpha", "beta"]
    card = client.models.retrieve("beta")
    assert card.id == "beta" and card.owned_by == "pair-transformer"
    assert card.model_extra["context_len"] == 32 and card.model_extra["tokenizer"] == "char"


def test_a_completion_is_what_sample_py_generates(client, alpha):
    settings = dict(max_new_tokens=40, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    result = client.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=40, temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 20}
    )
    assert result.object == "text_completion" and result.model == "alpha"
    assert result.choices[0].text == reference(*alpha, PROMPT, **settings)
    assert result.choices[0].finish_reason == "length" and result.choices[0].logprobs is None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(PROMPT), 40)


def test_the_cli_samples_the_same_text(client, runs, capsys):
    code = sample.main(
        [
            *("--checkpoint", str(runs[0]), "--prompt", PROMPT, "--max_new_tokens", "30", "--seed", "11"),
            *("--temperature", "1.0", "--top_k", "None", "--device", "cpu", "--copy_check_chars", "0"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")[0]
    result = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=30, seed=11)  # OpenAI's defaults
    assert printed == PROMPT + result.choices[0].text


def test_streaming_gives_the_same_text_in_openai_chunks(client, alpha):
    chunks = list(
        client.completions.create(
            model="alpha", prompt=PROMPT, max_tokens=25, seed=3, stream=True, stream_options={"include_usage": True}
        )
    )
    *pieces, last = chunks
    assert all(c.object == "text_completion" and len(c.choices) == 1 for c in pieces)
    assert len(pieces) >= 25  # (a token per chunk, then the finishing chunk)
    assert "".join(c.choices[0].text for c in pieces) == reference(
        *alpha, PROMPT, max_new_tokens=25, seed=3, top_k=None, temperature=1.0
    )
    assert [c.choices[0].finish_reason for c in pieces][-2:] == [None, "length"]
    assert last.choices == [] and last.usage.completion_tokens == 25


def test_n_completions_use_consecutive_seeds(client, alpha):
    result = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=20, n=3, seed=40, temperature=1.2)
    texts = [c.text for c in sorted(result.choices, key=lambda c: c.index)]
    expected = [
        reference(*alpha, PROMPT, max_new_tokens=20, seed=40 + i, temperature=1.2, top_k=None) for i in range(3)
    ]
    assert texts == expected and len(set(texts)) == 3
    assert result.usage.completion_tokens == 60
    streamed = {i: "" for i in range(3)}
    for chunk in client.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=20, n=3, seed=40, temperature=1.2, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert list(streamed.values()) == expected


def test_the_same_seed_repeats_and_no_seed_varies(client):
    def text(**kwargs) -> str:
        return client.completions.create(model="beta", prompt="", max_tokens=30, **kwargs).choices[0].text

    assert text(seed=5) == text(seed=5)
    assert len({text() for _ in range(3)}) == 3  # a random seed each (30 characters of a 65-letter random model)


def test_stop_sequences_cut_the_text_before_them(client, alpha):
    full = reference(*alpha, PROMPT, max_new_tokens=60, seed=9, temperature=1.0, top_k=None)
    stop = full[20:23]  # three characters the model does generate
    cut = full.index(stop)
    for stream in (False, True):
        response = client.completions.create(
            model="alpha", prompt=PROMPT, max_tokens=60, seed=9, stop=[stop, "never-seen"], stream=stream, logprobs=1
        )
        choices = [c for chunk in response for c in chunk.choices] if stream else response.choices
        assert "".join(c.text for c in choices) == full[:cut]
        assert choices[-1].finish_reason == "stop"
        tokens = [t for c in choices for t in c.logprobs.tokens]
        assert "".join(tokens) == full[:cut]  # char tokens: one per character, none past the stop


def test_logprobs_are_the_models_own_distribution(client, alpha):
    model, tokenizer = alpha
    result = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, seed=1, logprobs=3, temperature=0.7)
    choice = result.choices[0]
    lp = choice.logprobs
    ids = tokenizer.encode(PROMPT + choice.text)
    with torch.no_grad():  # the full forward, no cache: the distribution each generated token came from
        expected = model(torch.tensor([ids[:-1]]))[0, len(PROMPT) - 1 :].log_softmax(-1)
    assert lp.tokens == list(choice.text)
    assert lp.text_offset == list(range(len(PROMPT), len(PROMPT) + 12))
    for i, token_id in enumerate(ids[len(PROMPT) :]):
        assert lp.token_logprobs[i] == pytest.approx(expected[i, token_id].item(), abs=1e-4)
        top = sorted(lp.top_logprobs[i].items(), key=lambda kv: -kv[1])
        best = expected[i].topk(3)
        assert [tokenizer.decode([t]) for t in best.indices.tolist()] == [k for k, _ in top[:3]]
        assert lp.tokens[i] in lp.top_logprobs[i] and len(lp.top_logprobs[i]) in (3, 4)  # + the sampled one


def test_greedy_picks_the_likeliest_token(client):
    lp = (
        client.completions.create(model="beta", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=1)
        .choices[0]
        .logprobs
    )
    for token, alternatives in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert list(alternatives) == [token]


# ----------------------------------------------------------------------------------------------------------------
# Concurrency, disconnects, a full queue


def test_16_concurrent_streams_each_match_their_seed(server, alpha):
    url, app = server
    prompts = ["", "ROMEO:", PROMPT, "First Citizen:\nBefore we proceed"]

    def stream(i: int) -> str:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        chunks = client.completions.create(
            model="alpha", prompt=prompts[i % 4], max_tokens=48, seed=1000 + i, temperature=1.1, top_p=0.9, stream=True
        )
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(stream, range(16)))
    for i, text in enumerate(texts):
        assert text == reference(
            *alpha, prompts[i % 4], max_new_tokens=48, seed=1000 + i, temperature=1.1, top_p=0.9, top_k=None
        ), i
    assert wait_until(lambda: app.state.pool.admitted == 0)


@pytest.fixture
def counted(monkeypatch) -> dict:
    """Pieces generated per completion, by the request's first prompt character (a tag)."""
    counts: dict[str, int] = {}
    real = serve.completion

    def counting(plan, index):
        for piece in real(plan, index):
            counts[plan.prompt[0]] = counts.get(plan.prompt[0], 0) + 1
            yield piece

    monkeypatch.setattr(serve, "completion", counting)
    return counts


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server, alpha, counted):
    url, app = server
    results = {}

    def complete(tag: str) -> None:  # two clients that stay
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        chunks = client.completions.create(model="alpha", prompt=tag + "hat", max_tokens=200, seed=2, stream=True)
        results[tag] = "".join(c.choices[0].text for c in chunks)

    stayers = [threading.Thread(target=complete, args=(tag,)) for tag in "AB"]
    for thread in stayers:
        thread.start()
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={"model": "alpha", "prompt": "Leaving", "max_tokens": CAP, "stream": True}
    ) as response:
        lines = itertools.islice(response.iter_lines(), 10)
        assert sum(line.startswith("data: ") for line in lines) >= 5  # mid-stream
    for thread in stayers:
        thread.join(60)
    assert wait_until(lambda: app.state.pool.admitted == 0)  # its slot is free again
    assert counted["L"] < 5000  # stopped within moments, not after CAP tokens
    for tag in "AB":
        assert results[tag] == reference(*alpha, tag + "hat", max_new_tokens=200, seed=2, temperature=1.0, top_k=None)


def test_a_client_that_gives_up_on_a_plain_request_stops_it_too(server, counted):
    url, app = server
    with pytest.raises(httpx.ReadTimeout):
        post(url, {"model": "beta", "prompt": "Quit", "max_tokens": CAP}, timeout=0.5)
    assert wait_until(lambda: app.state.pool.admitted == 0)
    assert counted["Q"] < CAP


def test_a_full_server_answers_503_and_recovers(server):
    url, app = server
    pool = app.state.pool
    assert pool.admit(pool.capacity)  # every slot taken
    try:
        response = post(url, {"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "server_busy"
    finally:
        for _ in range(pool.capacity):
            pool.release()
    assert post(url, {"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Bad requests: 100 of them, each a 4xx in OpenAI's error shape, and the server goes on


def bad_requests() -> list[tuple[object, int, str | None]]:
    """(body, status, param): a raw string is sent as it is, anything else as JSON."""
    good = {"model": "alpha", "prompt": "ROMEO:", "max_tokens": 4}
    cases: list[tuple[object, int, str | None]] = []
    for raw in ["{", "not json", "", "[1, 2", '{"model": "alpha",}', "{'model': 'alpha'}", '{"model": "alpha" "x": 1}']:
        cases.append((raw, 400, None))
    for body in [[], 3, "a string", None, [good]]:
        cases.append((json.dumps(body), 400, None))
    for name in ["gamma", "ALPHA", "alpha ", "", "alpha/step_000005", "gpt-3.5-turbo-instruct"]:
        cases.append(({**good, "model": name}, 404, "model"))
    wrong = {
        "model": [5, None, True, ["alpha"], {"id": "alpha"}],
        "prompt": [5, None, True, [1, 2], ["a", "b"], [], {"text": "x"}, "x" * 20_001, "h\u00e9llo", "\u65e5", "tab\t"],
        "max_tokens": [0, -1, CAP + 1, 1.5, "10", True, [4]],
        "temperature": [-0.1, -1, "hot", [], 1e31, float("nan"), True, {"t": 1}],
        "top_p": [0, -0.5, 1.01, 2, "1", False],
        "top_k": [0, -3, 2.5, "5", True],
        "n": [0, 17, -1, "2", 1.0, True],
        "seed": [-1, 2**64, "1", 1.5],
        "logprobs": [-1, 21, "5", 2.0, True],
        "stop": [["a", "b", "c", "d", "e"], "", [""], 5, [1], ["a", 5], {"s": 1}],
        "user": [5],
        "stream": ["yes", 1],
        "stream_options": [{"foo": 1}, {"include_usage": "y"}, "usage"],
        "echo": [True],
        "best_of": [3],
        "presence_penalty": [0.5],
        "frequency_penalty": [1],
        "logit_bias": [{"1": 2}],
        "suffix": ["end"],
        "max_token": [4],
        "temprature": [1.0],
        "foo": ["bar"],
    }
    for param, values in wrong.items():
        for value in values:
            cases.append(({**good, param: value}, 400, param))
    for body in [{"prompt": "x"}, {"model": "alpha"}]:
        missing = "prompt" if "model" in body else "model"
        cases.append((body, 400, missing))
    cases.append(({**good, "seed": 2**64 - 2, "n": 3}, 400, "seed"))
    return cases


def test_100_bad_requests_each_get_an_openai_error_and_the_server_goes_on(server):
    url, app = server
    cases = bad_requests()
    assert len(cases) == 100
    for body, status, param in cases:
        response = post(url, body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param, (body, error)
    assert app.state.pool.admitted == 0  # nothing was admitted
    ok = post(url, {"model": "alpha", "prompt": "ROMEO:", "max_tokens": 4})
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 4


def test_other_bad_http_gets_openai_errors_too(server, client):
    url, _ = server
    big = post(url, {"model": "alpha", "prompt": "x" * 400_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "too_large"
    missing = httpx.get(f"{url}/v1/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{url}/v1/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="temperature must be zero"):
        client.completions.create(model="alpha", prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


# ----------------------------------------------------------------------------------------------------------------
# The API key, the page, the command line


def test_an_api_key_is_required_when_set(runs):
    app = serve.create_app(served(runs[:1]), serve.Limits(workers=1, queue=1, api_key="s3cret"))
    with running(app) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert post(url, {"model": "alpha", "prompt": "x"}).status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model="alpha", prompt="x", max_tokens=3).choices[0].text
        assert httpx.get(f"{url}/").status_code == 200  # the page itself is public; it asks for the key
        too_many = client.completions.create  # n above --workers + --queue could never be admitted: 400, not 503
        with pytest.raises(openai.BadRequestError, match="n must be at most 2"):
            too_many(model="alpha", prompt="x", max_tokens=3, n=3)


def test_the_playground_is_served_and_needs_no_network(server):
    url, _ = server
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "playground.js" in page.text
    for name in ("playground.js", "playground.css"):
        assert httpx.get(f"{url}/web/{name}").status_code == 200
    for path in (REPO / "web").iterdir():  # no CDN: nothing is fetched from elsewhere
        assert not re.search(r"(src|href)=\"https?:|url\(https?:|import .* from \"https?:", path.read_text()), path


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "serve.py"), *argv], capture_output=True, text=True, timeout=120, cwd=REPO, env=env
    )


def test_bad_flags_are_one_error_line(runs, capsys):
    checkpoint = str(runs[0])
    for argv, fragment in [
        ([], "--checkpoint"),
        (["--checkpoint", checkpoint, "--workers", "0"], "--workers must be"),
        (["--checkpoint", checkpoint, "--port", "70000"], "--port must be"),
        (["--checkpoint", checkpoint, "--max_tokens_cap", "x"], "expected an integer"),
        (["--checkpoint", checkpoint, "--api_key", " "], "--api_key must not be empty"),
        (["--checkpoint", str(runs[0].parent / "missing"), "--port", "0"], "does not exist"),
        (["--checkpoint", checkpoint, "--checkpoint", checkpoint + "/", "--port", "0"], "both be served as 'alpha'"),
    ]:
        assert serve.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, (argv, err)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert serve.main(["--checkpoint", checkpoint, "--port", str(taken.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_without_fastapi_it_says_what_to_install(tmp_path):
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['fastapi'] = None  # as if the serve extra were not installed\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = run_cli("--checkpoint", "x", env=env)
    assert result.returncode == 2
    assert result.stderr == "error: serve.py needs fastapi and uvicorn: uv sync --extra serve\n"


def test_the_command_line_serves_until_interrupted(runs):
    process = subprocess.Popen(
        [sys.executable, str(REPO / "serve.py"), "--checkpoint", str(runs[1]), "--port", "0", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        preexec_fn=default_sigint,
    )
    try:
        lines = [process.stdout.readline(), process.stdout.readline()]
        assert "serving" in lines[0] and "'beta'" in lines[0], lines
        url = re.search(r"playground: (http://127\.0\.0\.1:\d+)/", lines[1]).group(1)
        assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["beta"]
        process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful shutdown, then exit status 130 as sample.py
        assert process.wait(30) == 130
        assert process.stderr.read() == ""
    finally:
        process.kill()
        process.communicate()
