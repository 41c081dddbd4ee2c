"""Hardening of the HTTP extension (issue 12): reserved vllm_xargs keys, the runtime directory, the
admin key from a file, and a feature route / CAA builder that neither stall nor flood the server."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import requests

from sae_steer.vllm_plugin import slot_stats
from tests.server.conftest import Server, serve_args

pytestmark = [pytest.mark.engine, pytest.mark.multiprocess]
CHAT = [{"role": "user", "content": "Tell me about the license."}]
ROUTES = (("/v1/completions", {"prompt": "hello"}), ("/v1/chat/completions", {"messages": CHAT}))


@pytest.mark.parametrize("key", ["sae_steer_capture", "sae_steer_telemetry", "sae_steer_anything", "steering"])
def test_reserved_vllm_xargs_are_a_400_naming_the_field(server, key):
    """`vllm_xargs: {"sae_steer_capture": "x"}` was an HTTP 500 (it reached the plugin's internal key)."""
    for path, base in ROUTES:
        for value in ("x", 1, ["2"]):
            r = requests.post(server.url + path, timeout=60, json={
                "model": "tiny", "max_tokens": 2, **base, "vllm_xargs": {"other": 1, key: value}})
            assert r.status_code == 400, (path, key, r.text)
            assert r.json()["error"]["param"] == f"vllm_xargs.{key}", (path, r.text)
        ok = requests.post(server.url + path, timeout=60, json={
            "model": "tiny", "max_tokens": 2, **base, "vllm_xargs": {"other": 1}})
        assert ok.status_code == 200, ok.text  # an ordinary vllm_xargs key still works


def test_a_client_cannot_choose_the_telemetry_id(server):
    for path, base in ROUTES:
        r = requests.post(server.url + path, timeout=60, json={
            "model": "tiny", "max_tokens": 2, **base, "telemetry": {"sae": "relu-l1", "id": "0" * 32}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "telemetry.id", r.text
    assert '" 500' not in server.log.read_text()


def test_the_admin_key_on_the_command_line_warns(server):
    assert "`ps` shows it" in server.log.read_text()


def test_serve_help_documents_the_key_sources():
    out = subprocess.run([sys.executable, "-m", "sae_steer.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for text in ("--steering-admin-key-file", "SAE_STEER_ADMIN_KEY", "`ps` shows it", "SAE_STEER_RUNTIME_DIR"):
        assert text in out.stdout, text


# ---- a server of its own: key file, a prepared default runtime directory, a big SAE, a fresh logit lens ----

KEY = "key-from-a-file-0123456789"
BIG = "big-l2"


@pytest.fixture(scope="module")
def hardened(artifacts, tmp_path_factory):
    from sae_steer.formats import save_sae
    from sae_steer.tiny_model import random_sae
    tmp = tmp_path_factory.mktemp("hardened")
    big = save_sae(random_sae(128, 131072, 2, "relu", seed=11), tmp / "saes" / BIG)  # 128 MB: a load that shows
    key_file = tmp / "admin.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    attacker = tmp / "attacker"
    attacker.mkdir(mode=0o700)
    default = tmp / f"sae-steer-{os.geteuid()}"
    default.symlink_to(attacker)  # prepared by someone else: the guessable default path
    args = [a for a in serve_args(artifacts, tmp / "vectors")]
    i = args.index("--steering-admin-key")
    args[i:i + 2] = ["--steering-admin-key-file", str(key_file), "--sae", f"{BIG}={big}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_STEER_")}
    srv = Server(args, tmp / "server.log", env={**env, "TMPDIR": str(tmp)})
    srv.tmp, srv.attacker, srv.default = tmp, attacker, default
    yield srv
    srv.stop()


def test_first_feature_load_does_not_stall_other_requests(hardened):
    """The logit lens (unembedding + every SAE) loads on the first feature request; meanwhile a cheap
    request (GET /v1/models) must still be answered promptly."""
    latencies, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            t = time.perf_counter()
            assert requests.get(hardened.url + "/v1/models", timeout=120).status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.005)

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    idle = max(latencies)
    t = time.perf_counter()
    r = requests.get(hardened.url + f"/v1/steering/saes/{BIG}/features/3?top_k=5", timeout=300)
    load = time.perf_counter() - t
    n_idle = len(latencies)
    time.sleep(0.2)
    stop.set()
    poller.join()
    during = latencies[n_idle - 1:]
    stall = max(during)
    print(f"\nfirst feature request {load:.3f} s; GET /v1/models while it ran: max {stall:.3f} s over "
          f"{len(during)} requests (idle max {idle:.3f} s)")
    (hardened.tmp.parent / "stall.json").write_text(json.dumps({"load_s": load, "stall_s": stall, "idle_s": idle}))
    assert r.status_code == 200, r.text
    assert load > 0.1, f"the first load took {load:.3f} s: too quick to show a stall"
    assert stall < 0.35 * load, f"GET /v1/models waited {stall:.3f} s while the feature route loaded ({load:.3f} s)"


def test_the_prepared_default_runtime_directory_is_avoided(hardened):
    """`sae-steer serve` runs telemetry through a fresh private directory, never the prepared default."""
    r = requests.post(hardened.url + "/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": "The licensee shall", "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
        "telemetry": {"sae": "jump-l2", "top_k": 3}})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["telemetry"]) == 4
    build = requests.post(hardened.url + "/v1/steering/vectors", headers={"X-Steering-Admin-Key": KEY}, timeout=120,
                          json={"name": "v", "pairs": [{"positive": "yes it is", "negative": "no it is not"}],
                                "layers": [2]})
    assert build.status_code == 201, build.text
    assert os.listdir(hardened.attacker) == [], "nothing went through the symlink"
    assert os.path.islink(hardened.default)
    line = next(x for x in hardened.log.read_text().splitlines() if "runtime directory" in x)
    run_dir = line.rsplit("runtime directory ", 1)[1].strip()
    assert run_dir != str(hardened.default) and run_dir.startswith(str(hardened.tmp)), line
    st = os.lstat(run_dir)
    left = [n for n in os.listdir(run_dir) if not n.startswith(slot_stats.PREFIX)]  # the engine's slot counts stay
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and left == []


def test_the_admin_key_comes_from_its_file(hardened):
    url = hardened.url + "/v1/steering/vectors/nothing-here"
    assert requests.delete(url, timeout=30).status_code == 401
    assert requests.delete(url, timeout=30, headers={"X-Steering-Admin-Key": KEY[:-1]}).status_code == 401
    assert requests.delete(url, timeout=30, headers={"X-Steering-Admin-Key": KEY + "x"}).status_code == 401
    assert requests.delete(url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert requests.delete(url, timeout=30, headers={"X-Steering-Admin-Key": KEY}).status_code == 404
    assert KEY not in hardened.log.read_text()
    assert "`ps` shows it" not in hardened.log.read_text()


def test_caa_building_is_bounded(hardened):
    headers = {"X-Steering-Admin-Key": KEY}

    def build(pairs):
        return requests.post(hardened.url + "/v1/steering/vectors", headers=headers, timeout=300,
                             json={"name": "bounded", "pairs": pairs, "layers": [2]})

    long_words = " ".join(["license"] * 700)  # < 8192 characters, > 512 tokens (the server's context)
    cases = [([{"positive": "a", "negative": "b"}] * 1025, "pairs"),
             ([{"positive": "a", "negative": "x" * 8193}], "negative"),
             ([{"positive": "a", "negative": "b"}, {"positive": long_words, "negative": "b"}], "pairs[1].positive")]
    for pairs, field in cases:
        r = build(pairs)
        assert r.status_code == 400, r.text[:500]
        assert field in r.json()["error"]["param"], r.text[:500]
    # Many pairs at once: accepted, served through at most 16 engine requests at a time, and correct.
    pairs = [{"positive": f"The licensee shall keep copy {i}", "negative": f"The licensee shall not keep copy {i}"}
             for i in range(64)]
    r = build(pairs)
    assert r.status_code == 201, r.text
    assert requests.get(hardened.url + "/v1/models", timeout=30).status_code == 200
    log = hardened.log.read_text()
    assert '" 500' not in log and "Traceback" not in log, log[-3000:]


def test_plain_vllm_refuses_a_prepared_runtime_directory(artifacts, tmp_path):
    """Without `sae-steer serve` the default `<tmp>/sae-steer-<uid>` is used, after checking it: a
    world-writable one that another user made first stops the server at startup, loudly."""
    default = tmp_path / f"sae-steer-{os.geteuid()}"
    default.mkdir()
    default.chmod(0o777)
    settings = {"saes": {n: str(p) for n, p in artifacts.saes.items()}, "layers": [2]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_STEER_")}
    env.update(TMPDIR=str(tmp_path), VLLM_PLUGINS="sae_steer")
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(artifacts.model),
            "--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "4",
            "--additional-config", json.dumps({"sae_steer": settings})]
    with pytest.raises(RuntimeError) as e:
        Server(argv, tmp_path / "server.log", env=env)
    assert "mode 0777" in str(e.value) and str(default) in str(e.value), str(e.value)[-2000:]
    assert os.listdir(default) == []
