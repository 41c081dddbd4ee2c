"""A real `sae-steer serve` process on 127.0.0.1 (engine core and worker in their own processes)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ADMIN_KEY = "test-admin-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, argv: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        base = os.environ if env is None else env  # env: the whole environment, when given
        env = {**base, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(self.port)], env=env,
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


LABELS = {"3": "the third feature", "7": "feature seven"}  # Neuronpedia-style export, object form


def feature_record(i: int) -> dict:
    """A feature record as `sae-steer fit-sae` writes it (sae_steer.feature_records); feature 5 fires on
    "winter", feature 9 writes it (logit lens), the others mention neither."""
    at_word = {5: " winter"}.get(i, " river")
    return {"index": i, "label": f"label {i}", "frequency": i / 1000, "max_activation": float(i),
            "contexts": [{"tokens": ["The", " cold", at_word, " came"], "at": 2, "activation": float(i)}],
            "logit_lens": {"top": [[" winter" if i == 9 else " stone", 1.0]], "bottom": [[" sun", -1.0]]}}


def write_feature_records(sae_file: Path, d_sae: int = 256) -> None:
    """Beside a one-file SAE: <name>.features.jsonl."""
    sae_file.with_name(f"{sae_file.stem}.features.jsonl").write_text(
        "".join(json.dumps(feature_record(i)) + "\n" for i in range(d_sae)))


def serve_args(artifacts, vector_dir: Path) -> list[str]:
    args = [sys.executable, "-m", "sae_steer.cli", "serve", str(artifacts.model), "--dtype", "float32",
            "--max-model-len", "512", "--block-size", "32", "--max-num-seqs", "32", "--seed", "0",
            "--enforce-eager", "--served-model-name", "tiny", "--steering-admin-key", ADMIN_KEY, "--steering-vector-dir", str(vector_dir),
            "--steering-layers", "2", "--steering-weight-dtype", "float32"]  # the flag reaches the settings parser
    labels = vector_dir.parent / "relu-l1-labels.json"
    labels.write_text(json.dumps(LABELS))
    args += ["--additional-config", json.dumps({"sae_steer": {"labels": {"relu-l1": str(labels)}}})]
    write_feature_records(Path(artifacts.saes["gated-l1"]))
    for name, path in artifacts.saes.items():
        args += ["--sae", f"{name}={path}"]
    for name, path in artifacts.vectors.items():
        args += ["--vector", f"{name}={path}"]
    return args


@pytest.fixture(scope="session")
def server(artifacts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    srv = Server(serve_args(artifacts, tmp / "vectors"), tmp / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
