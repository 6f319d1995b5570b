"""The Ollama emulator speaks what the official clients expect; its faults and accounting hold."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.support.polling import wait_until

from .emulator_process import EmulatorProcess
from .ollama_emulator import BUSY_MESSAGE, EmulatorState, OllamaEmulator

pytestmark = pytest.mark.integration

PROMPT = "hello world from the hermes tests"
ECHO = "Echo: hello world from the"  # "Echo:" + 4 prompt words = 5 tokens
USER: Any = [{"role": "user", "content": PROMPT}]  # Any: the openai stubs want TypedDicts


@pytest.fixture(scope="module")
def server() -> Iterator[OllamaEmulator]:
    with OllamaEmulator() as emu:
        yield emu


@pytest.fixture
def emu(server: OllamaEmulator) -> OllamaEmulator:
    server.set_residency(max_loaded_models=0, load_delay_ms=0, keep_alive_s=300)
    server.reset(weights=True)
    return server


@pytest.fixture
def client(emu: OllamaEmulator) -> ollama.Client:
    return ollama.Client(host=emu.url)


def settle(emu: OllamaEmulator) -> dict[str, Any]:
    """Stats once nothing is in flight: the server may notice a disconnect a moment later."""

    def idle() -> dict[str, Any] | None:
        stats = emu.stats()
        return None if any(stats["in_flight"].values()) else stats

    return wait_until(idle, 10, "nothing in flight at the emulator")


def test_generate_stream_and_not(client: ollama.Client, emu: OllamaEmulator) -> None:
    whole = client.generate(model="gemma3:1b", prompt=PROMPT)
    assert (whole.response, whole.done, whole.done_reason) == (ECHO, True, "stop")
    assert whole.eval_count == 5 and whole.prompt_eval_count == 6 and whole.total_duration

    parts = list(client.generate(model="gemma3:1b", prompt=PROMPT, stream=True))
    assert [p.response for p in parts[:-1]] == ["Echo:", " hello", " world", " from", " the"]
    assert not any(p.done for p in parts[:-1])
    final = parts[-1]
    assert (final.done, final.done_reason, final.response, final.context) == (True, "stop", "", [])
    assert final.eval_count == 5 and final.eval_duration and final.load_duration is not None
    assert emu.stats()["requests"]["gemma3:1b"] == 2

    limited = client.generate(model="gemma3:1b", prompt=PROMPT, options={"num_predict": 2})
    assert (limited.response, limited.done_reason) == ("Echo: hello", "length")
    assert EmulatorState(["llama3"]).resolve("llama3:latest") == "llama3"


def test_chat(client: ollama.Client) -> None:
    reply = client.chat(model="llama3:8b", messages=[{"role": "system", "content": "x"}, *USER])
    assert (reply.message.role, reply.message.content) == ("assistant", ECHO)
    parts = list(client.chat(model="llama3:8b", messages=USER, stream=True))
    assert "".join(p.message.content or "" for p in parts) == ECHO
    assert parts[-1].done and parts[-1].done_reason == "stop" and len(parts) == 6


def test_list_ps_show_version(client: ollama.Client, emu: OllamaEmulator) -> None:
    assert [m.model for m in client.list().models] == ["gemma3:1b", "llama3:8b", "mistral:7b"]
    assert client.ps().models == []  # ps lists the resident models; reset unloads them
    client.generate(model="mistral:7b", prompt="hi")
    (loaded,) = client.ps().models
    assert loaded.model == "mistral:7b" and loaded.expires_at and loaded.size_vram
    shown = client.show("mistral:7b")
    assert shown.details and shown.details.family == "mistral" and shown.modelinfo
    assert httpx.get(f"{emu.url}/api/version").json() == {"version": "0.12.0"}
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404


def test_unknown_model_and_bad_body(client: ollama.Client, emu: OllamaEmulator) -> None:
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as err:
            list(client.generate(model="nope:1b", prompt="hi", stream=stream))
        assert err.value.status_code == 404
        assert err.value.error == 'model "nope:1b" not found, try pulling it first'
    bad = httpx.post(f"{emu.url}/api/chat", content=b"{not json")
    assert bad.status_code == 400 and "error" in bad.json()
    assert sum(emu.stats()["requests"].values()) == 0  # rejected before reaching a model


def test_error_busy_not_found(client: ollama.Client, emu: OllamaEmulator) -> None:
    control = httpx.post(
        f"{emu.url}/_emulator/behaviour", json={"model": "gemma3:1b", "mode": "busy"}
    )
    control.raise_for_status()
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="gemma3:1b", prompt="hi")
    assert (err.value.status_code, err.value.error) == (503, BUSY_MESSAGE)
    assert client.generate(model="llama3:8b", prompt="hi").done  # other models unaffected

    emu.set_behaviour("*", "error", status=502)
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llama3:8b", messages=USER)
    assert (err.value.status_code, err.value.error) == (502, "emulated failure")

    emu.set_behaviour("mistral:7b", "not_found")
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="mistral:7b", prompt="hi")
    assert err.value.status_code == 404
    assert settle(emu)["requests"] == {"gemma3:1b": 1, "llama3:8b": 2, "mistral:7b": 1}


def test_hang_until_client_gives_up(emu: OllamaEmulator) -> None:
    emu.set_behaviour("gemma3:1b", "hang")
    impatient = ollama.Client(host=emu.url, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        impatient.generate(model="gemma3:1b", prompt="hi")
    stats = settle(emu)
    observed = time.monotonic() - started  # the request's whole life, and more
    assert stats["in_flight"]["gemma3:1b"] == 0 and stats["peak_in_flight"]["gemma3:1b"] == 1
    # Busy while the client waited (its 0.3 s), and no longer than the test saw it live.
    assert 0.25 < stats["busy_time_s"]["gemma3:1b"] <= observed, (stats, observed)


def test_hold_until_released(emu: OllamaEmulator) -> None:
    emu.set_behaviour("gemma3:1b", "hold")
    client = ollama.Client(host=emu.url, timeout=10)
    with ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(client.generate, model="gemma3:1b", prompt="hi") for _ in range(3)]
        wait_until(lambda: emu.stats()["in_flight"]["gemma3:1b"] == 3, 10, "3 requests held")
        time.sleep(0.1)  # a chance for a held request to answer (none may)
        assert not any(r.done() for r in replies)
        released = httpx.post(f"{emu.url}/_emulator/release", timeout=5).json()
        assert released == {"released": 3}
        assert all(r.result().done for r in replies)
    assert settle(emu)["in_flight"]["gemma3:1b"] == 0


def test_peak_in_flight_weight_and_busy_time(emu: OllamaEmulator) -> None:
    emu.set_behaviour("*", delay_ms=300)
    emu.set_weights({"gemma3:1b": 2, "llama3:8b": 4})
    client = ollama.Client(host=emu.url)
    models = ["gemma3:1b"] * 3 + ["llama3:8b"]

    def timed(model: str) -> tuple[Any, float]:
        sent = time.monotonic()
        return client.generate(model=model, prompt="hi"), sent

    with ThreadPoolExecutor(len(models)) as pool:
        replies = list(pool.map(timed, models))
    assert all(r.done for r, _ in replies)
    stats = settle(emu)
    settled = time.monotonic()  # no busy time accrues after this
    assert stats["peak_in_flight"] == {"gemma3:1b": 3, "llama3:8b": 1, "mistral:7b": 0}
    assert (stats["weight_in_use"], stats["peak_weight"]) == (0, 10)  # 3 x 2 + 1 x 4
    # 3 requests x 0.3 s at least, and at most the time each could have been in flight: from
    # before it was sent until nothing was (measured here, so as slow as the machine is)
    gemma_live = sum(
        settled - sent
        for (_, sent), model in zip(replies, models, strict=True)
        if model == "gemma3:1b"
    )
    assert 0.85 < stats["busy_time_s"]["gemma3:1b"] <= gemma_live, (stats, gemma_live)
    assert stats["elapsed_s"] > 0.3  # busy_time_s / elapsed_s: average in flight

    emu.reset()
    assert emu.stats()["weights"] == {"gemma3:1b": 2, "llama3:8b": 4}  # kept unless asked
    assert emu.stats()["peak_weight"] == 0 and emu.stats()["requests"]["gemma3:1b"] == 0


def test_cut_stream(client: ollama.Client, emu: OllamaEmulator) -> None:
    emu.set_behaviour("gemma3:1b", "cut_stream")
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        for part in client.generate(model="gemma3:1b", prompt=PROMPT, stream=True):
            received.append(part.response)
    assert received == ["Echo:", " hello"]
    with pytest.raises(httpx.RemoteProtocolError):
        client.generate(model="gemma3:1b", prompt=PROMPT)
    assert settle(emu)["in_flight"]["gemma3:1b"] == 0


def test_openai_routes(emu: OllamaEmulator) -> None:
    oai = openai.OpenAI(base_url=emu.url + "/v1", api_key="x", max_retries=0)
    done = oai.chat.completions.create(model="gemma3:1b", messages=USER)
    assert done.choices[0].message.content == ECHO and done.choices[0].finish_reason == "stop"
    assert done.usage and done.usage.completion_tokens == 5
    chunks = list(
        oai.chat.completions.create(
            model="gemma3:1b",
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ECHO
    assert chunks[-1].usage and chunks[-1].usage.total_tokens == 11
    assert oai.completions.create(model="llama3:8b", prompt=PROMPT).choices[0].text == ECHO
    assert [m.id for m in oai.models.list()] == ["gemma3:1b", "llama3:8b", "mistral:7b"]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=USER)
    emu.set_behaviour("gemma3:1b", "busy")
    with pytest.raises(openai.APIStatusError) as err:
        oai.completions.create(model="gemma3:1b", prompt="hi")
    assert err.value.status_code == 503
    assert settle(emu)["requests"] == {"gemma3:1b": 3, "llama3:8b": 1, "mistral:7b": 0}


def test_tcp_nodelay_on_accepted_sockets(emu: OllamaEmulator) -> None:
    with httpx.Client(base_url=emu.url) as http:
        http.get("/api/tags")
        assert emu._server is not None
        sockets = [
            c.transport.get_extra_info("socket") for c in emu._server.server_state.connections
        ]
        assert sockets
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)


def test_stop_releases_hanging_requests() -> None:
    emu = OllamaEmulator(["m:1b"]).start()
    emu.set_behaviour("*", "hang")
    result: list[Any] = []

    def call() -> None:
        result.append(httpx.post(f"{emu.url}/api/generate", json={"model": "m:1b", "prompt": "x"}))

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: emu.stats()["in_flight"]["m:1b"], 10, "the request hangs")
    # A long grace for this server, so that waiting it out cannot pass for a prompt stop.
    assert emu._server is not None
    grace_s = emu._server.config.timeout_graceful_shutdown = 20
    started = time.monotonic()
    emu.stop()
    caller.join(grace_s)
    assert time.monotonic() - started < grace_s  # the hanging request did not hold stop up
    assert result and result[0].status_code == 503  # woken and answered, not cut at the end


def test_cli() -> None:
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "tests.support.ollama_emulator", "--port", "0"]
    command += ["--models", "a:1b,b", "--tokens", "3"]
    with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("ollama-emulator listening on http://127.0.0.1:")
            client = ollama.Client(host=line.rsplit(" ", 1)[1])
            assert [m.model for m in client.list().models] == ["a:1b", "b"]
            assert client.generate(model="b:latest", prompt="x y z").response == "Echo: x y"
        finally:
            process.terminate()
    assert process.returncode is not None


# Residency: one emulator is one Ollama host.

MS = 1_000_000  # ns


def test_lru_eviction_at_max_loaded_models(client: ollama.Client, emu: OllamaEmulator) -> None:
    emu.set_residency(max_loaded_models=2)
    for model in ("gemma3:1b", "llama3:8b", "gemma3:1b"):  # gemma used last: llama is the LRU
        client.generate(model=model, prompt="hi")
    oai = openai.OpenAI(base_url=emu.url + "/v1", api_key="x", max_retries=0)
    oai.chat.completions.create(model="mistral:7b", messages=USER)  # OpenAI routes load too
    stats = emu.stats()
    assert stats["loads"] == {"gemma3:1b": 1, "llama3:8b": 1, "mistral:7b": 1}
    assert stats["evictions"] == {"gemma3:1b": 0, "llama3:8b": 1, "mistral:7b": 0}
    assert stats["resident"] == ["mistral:7b", "gemma3:1b"]  # most recently used first
    assert [m.model for m in client.ps().models] == ["mistral:7b", "gemma3:1b"]
    emu.reset()
    stats = emu.stats()
    assert stats["resident"] == [] and set(stats["loads"].values()) == {0}
    assert set(stats["evictions"].values()) == {0} and client.ps().models == []


def test_busy_model_is_not_evicted(emu: OllamaEmulator) -> None:
    emu.set_residency(max_loaded_models=2, load_delay_ms=20)
    emu.set_behaviour("gemma3:1b", "hold")
    client = ollama.Client(host=emu.url, timeout=10)
    with ThreadPoolExecutor(3) as pool:
        gemma = pool.submit(client.generate, model="gemma3:1b", prompt="hi")
        wait_until(lambda: emu.stats()["resident"] == ["gemma3:1b"], 5, "gemma resident")
        client.generate(model="llama3:8b", prompt="hi")
        # gemma is the least recently used but busy (held): the idle llama goes.
        client.generate(model="mistral:7b", prompt="hi")
        assert emu.stats()["resident"] == ["mistral:7b", "gemma3:1b"] and not gemma.done()

        emu.set_behaviour("mistral:7b", "hold")
        mistral = pool.submit(client.generate, model="mistral:7b", prompt="hi")
        wait_until(lambda: emu.stats()["in_flight"]["mistral:7b"] == 1, 5, "mistral in flight")
        llama = pool.submit(client.generate, model="llama3:8b", prompt="hi")
        wait_until(lambda: emu.stats()["in_flight"]["llama3:8b"] == 1, 5, "llama3 in flight")
        time.sleep(0.1)  # both slots busy: llama waits, as Ollama queues it
        stats = emu.stats()
        assert not llama.done() and stats["loading"] == []
        assert stats["loads"]["llama3:8b"] == 1 and stats["resident"] == ["mistral:7b", "gemma3:1b"]

        assert httpx.post(f"{emu.url}/_emulator/release").json() == {"released": 2}
        reply = llama.result(5)
        assert gemma.result(5).done and mistral.result(5).done
    assert reply.load_duration and reply.load_duration >= 20 * MS
    stats = settle(emu)
    assert stats["loads"]["llama3:8b"] == 2 and sum(stats["evictions"].values()) == 2
    assert stats["resident"][0] == "llama3:8b" and len(stats["resident"]) == 2


def test_load_duration_cold_and_warm(client: ollama.Client, emu: OllamaEmulator) -> None:
    # A load takes load_ms; a warm request loads nothing, so it reports well under one load.
    load_ms = 200
    emu.set_residency(load_delay_ms=load_ms)
    cold = client.generate(model="gemma3:1b", prompt=PROMPT)
    warm = client.generate(model="gemma3:1b", prompt=PROMPT)
    assert cold.load_duration and cold.load_duration >= load_ms * MS
    assert cold.total_duration and cold.prompt_eval_duration and cold.eval_duration
    parts = cold.load_duration + cold.prompt_eval_duration + cold.eval_duration
    assert cold.total_duration >= parts
    assert warm.load_duration and warm.load_duration < load_ms * MS / 2
    *_, chat = client.chat(model="llama3:8b", messages=USER, stream=True)
    assert chat.done and chat.load_duration and chat.load_duration >= load_ms * MS
    assert chat.total_duration and chat.total_duration >= chat.load_duration
    *_, again = client.chat(model="llama3:8b", messages=USER, stream=True)
    assert again.load_duration and again.load_duration < load_ms * MS / 2


def test_concurrent_cold_requests_share_one_load(emu: OllamaEmulator) -> None:
    emu.set_residency(load_delay_ms=50)
    client = ollama.Client(host=emu.url, timeout=10)
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(lambda _: client.generate(model="gemma3:1b", prompt="hi"), range(4))
        )
    assert all(r.done and r.load_duration and r.load_duration > 1 * MS for r in replies)
    assert emu.stats()["loads"]["gemma3:1b"] == 1


def test_ps_lists_resident_models_only(client: ollama.Client, emu: OllamaEmulator) -> None:
    emu.set_residency(max_loaded_models=1, keep_alive_s=60)
    client.generate(model="gemma3:1b", prompt="hi")
    before = datetime.now(UTC)
    client.generate(model="llama3:8b", prompt="hi")
    (loaded,) = client.ps().models
    after = datetime.now(UTC)
    assert loaded.model == loaded.name == "llama3:8b" and loaded.size_vram and loaded.digest
    assert loaded.details and loaded.details.family == "llama3"
    assert loaded.expires_at is not None
    # Expires keep_alive (60 s) after its last use, which was during that request (the
    # emulator's mapping of its monotonic clock to wall time can only move it later, within ps)
    used = loaded.expires_at - timedelta(seconds=60)
    slack = timedelta(milliseconds=1)  # rounding
    assert before - slack <= used <= after + slack, (before, loaded.expires_at, after)
    emu.set_residency(keep_alive_s=0.05)  # applies to models loaded with the default
    time.sleep(0.1)
    assert client.ps().models == [] and emu.stats()["resident"] == []  # expired


def test_keep_alive(client: ollama.Client, emu: OllamaEmulator) -> None:
    client.generate(model="gemma3:1b", prompt="hi")
    client.generate(model="gemma3:1b", prompt="hi", keep_alive=0)
    assert emu.stats()["resident"] == [] and client.ps().models == []
    for zero in ("0", "0s"):
        client.chat(model="llama3:8b", messages=USER, keep_alive=zero)
        assert emu.stats()["resident"] == []
    assert emu.stats()["loads"] == {"gemma3:1b": 1, "llama3:8b": 2, "mistral:7b": 0}

    emu.set_residency(keep_alive_s=0.05)
    client.generate(model="gemma3:1b", prompt="hi", keep_alive=-1)  # forever
    client.generate(model="llama3:8b", prompt="hi", keep_alive="1m30s")
    client.generate(model="mistral:7b", prompt="hi")
    time.sleep(0.1)
    models = client.ps().models
    assert [m.model for m in models] == ["llama3:8b", "gemma3:1b"]
    assert models[1].expires_at and models[1].expires_at.year > datetime.now(UTC).year + 100
    bad = httpx.post(
        f"{emu.url}/api/generate", json={"model": "gemma3:1b", "prompt": "x", "keep_alive": "5x"}
    )
    assert bad.status_code == 400 and "invalid duration" in bad.json()["error"]


def test_residency_control_route(emu: OllamaEmulator) -> None:
    url = f"{emu.url}/_emulator/residency"
    answer = httpx.post(url, json={"max_loaded_models": 3}).json()
    assert answer == {
        "residency": {"max_loaded_models": 3, "load_delay_ms": 0.0, "keep_alive_s": 300.0}
    }
    assert httpx.post(url, json={"load_delay_ms": 5}).json()["residency"]["max_loaded_models"] == 3
    for bad in (
        {"max_loaded_models": -1},
        {"max_loaded_models": 1.5},
        {"load_delay_ms": -1},
        {"keep_alive_s": "5m"},
        {"keep_alive_s": True},
        {"max_models": 1},
    ):
        response = httpx.post(url, json=bad)
        assert response.status_code == 400 and "error" in response.json(), bad
    assert emu.stats()["residency"] == {
        "max_loaded_models": 3,
        "load_delay_ms": 5.0,
        "keep_alive_s": 300.0,
    }


def test_emulator_process_kill_and_restart() -> None:
    with EmulatorProcess(max_loaded_models=1, load_delay_ms=20, keep_alive_s=60) as host:
        assert host.stats()["residency"] == {
            "max_loaded_models": 1,
            "load_delay_ms": 20.0,
            "keep_alive_s": 60.0,
        }
        host.set_behaviour("gemma3:1b", "hold")
        client = ollama.Client(host=host.url, timeout=10)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(client.generate, model="gemma3:1b", prompt="hi")
            wait_until(lambda: host.stats()["in_flight"]["gemma3:1b"] == 1, 5, "gemma in flight")
            host.kill()  # the host dies mid-answer
            with pytest.raises(httpx.TransportError):
                answer.result(5)
        port = host.port
        host.restart()
        assert host.port == port and host.url.endswith(f":{port}")
        stats = host.stats()
        assert stats["resident"] == [] and stats["requests"]["gemma3:1b"] == 0
        assert stats["residency"]["max_loaded_models"] == 1  # same flags
        assert host.set_residency(max_loaded_models=2)["max_loaded_models"] == 2
        reply = client.generate(model="gemma3:1b", prompt="hi")
        assert reply.load_duration and reply.load_duration >= 20 * MS
