"""Replicas: two real `sae-steer serve` processes on 127.0.0.1 sharing one vector directory. A vector built
on one is served by the other within a few seconds (the same greedy tokens), a name taken on one is taken
on both, and a deletion on one is refused on the other like any unknown vector."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.server.conftest import ADMIN_KEY, Server, serve_args

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]
ADMIN = {"X-Steering-Admin-Key": ADMIN_KEY}
PAIRS = [{"positive": "The licensee shall keep", "negative": "The licensee shall not keep"},
         {"positive": "Permission is granted", "negative": "Permission is denied"}]
STEERING = {"interventions": [{"type": "vector", "vector": "shared", "coef": 6.0}]}
WAIT_S = 30  # bound on every wait for the other replica's rescan (default: every 2 s)


@pytest.fixture(scope="module")
def replicas(artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    shared = tmp / "vectors"
    with ThreadPoolExecutor(2) as pool:  # both start at once
        starting = [pool.submit(Server, serve_args(artifacts, shared), tmp / f"{name}.log") for name in "ab"]
        servers = []
        try:
            for s in starting:
                servers.append(s.result())
        except Exception:
            for s in starting:
                if s.exception() is None:
                    s.result().stop()
            raise
    yield (*servers, shared)
    for s in servers:
        s.stop()


def complete(server, steering, prompt="You may not copy"):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}
    if steering is not None:
        body["steering"] = steering
    return requests.post(server.url + "/v1/completions", json=body, timeout=120)


def tokens(server, steering):
    r = complete(server, steering)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def listed(server) -> set[str]:
    r = requests.get(server.url + "/v1/steering/vectors", timeout=30)
    assert r.status_code == 200, r.text
    return {v["name"] for v in r.json()["data"] if v["source"] == "built"}


def wait_until(check, what: str):
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT_S} s: {what}"
        time.sleep(0.25)


def test_a_vector_built_on_one_replica_is_served_by_the_other_until_deleted_there(replicas):
    a, b, shared = replicas
    assert "shared" not in listed(b)
    r = complete(b, STEERING)
    assert r.status_code == 400 and r.json()["error"]["param"] == "steering.interventions[0].vector", r.text
    built = requests.post(a.url + "/v1/steering/vectors", headers=ADMIN, timeout=300,
                          json={"name": "shared", "pairs": PAIRS, "layers": [1, 2]})
    assert built.status_code == 201, built.text
    wait_until(lambda: "shared" in listed(b), "replica b lists the vector built on a")
    on_a, on_b = tokens(a, STEERING), tokens(b, STEERING)
    assert on_b == on_a, "the same vector, the same greedy tokens"
    assert on_b != tokens(b, None), "and it steers"
    # The name is taken in the store, whichever replica asks.
    again = requests.post(b.url + "/v1/steering/vectors", headers=ADMIN, timeout=300,
                          json={"name": "shared", "pairs": PAIRS[:1], "layers": [2]})
    assert again.status_code == 409 and again.json()["error"]["param"] == "name", again.text

    assert requests.delete(a.url + "/v1/steering/vectors/shared", headers=ADMIN, timeout=30).status_code == 200
    assert complete(a, STEERING).status_code == 400, "gone at once where it was deleted"
    wait_until(lambda: complete(b, STEERING).status_code == 400, "replica b refuses the deleted vector")
    r = complete(b, STEERING)
    assert r.json()["error"]["param"] == "steering.interventions[0].vector", r.text
    assert "shared" not in listed(b)
    assert requests.delete(b.url + "/v1/steering/vectors/shared", headers=ADMIN, timeout=30).status_code == 404
    assert sorted(p.name for p in shared.iterdir()) == [], "no file or temporary file left"
    log_b = b.log.read_text()
    assert "serving 'shared'" in log_b and "'shared' is gone" in log_b
    assert "Traceback" not in log_b and "Traceback" not in a.log.read_text()
