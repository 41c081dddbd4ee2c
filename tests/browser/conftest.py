"""The playground's browser tests: a real `sae-steer serve` of the tiny model with a tiny SAE whose labels and
feature records carry hostile strings, and one headless Chromium from the system's packages, driven through
Selenium with the system's chromedriver (never Selenium Manager, which would download a driver)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from sae_steer import calibration
from sae_steer.formats import save_sae, save_vector
from sae_steer.tiny_model import random_sae
from tests.server.conftest import ADMIN_KEY, Server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
D_MODEL, LAYER, D_SAE = 128, 1, 64
SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=1">'
HOSTILE = 6  # the feature whose label, automatic label and top context carry the payloads
API_KEY = "test-api-key"  # vLLM's --api-key: the page must be given it, as any client is
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def record(i: int) -> dict:
    """A feature record as `sae-steer fit-sae` writes it: feature 5 and the hostile one fire on " winter"."""
    at_word = " winter" if i in (5, HOSTILE) else " river"
    tokens = ["The", f" {SCRIPT}" if i == HOSTILE else " cold", at_word, IMG if i == HOSTILE else " came"]
    return {"index": i, "label": IMG if i == HOSTILE else f"label {i}", "frequency": (i + 1) / 1000,
            "max_activation": float(i + 1), "contexts": [{"tokens": tokens, "at": 2, "activation": float(i + 1)}],
            "logit_lens": {"top": [[" stone", 1.0]], "bottom": [[" sun", -1.0]]}}


@pytest.fixture(scope="session")
def playground(artifacts, tmp_path_factory):
    """The server: SAE "tiny-sae" at layer 1 (records, hostile labels, feature 5 calibrated), vector "calm" (calibrated),
    every layer steerable (the lens reads all four), vLLM's --api-key, the admin key of tests/server."""
    tmp = tmp_path_factory.mktemp("playground")
    sae_file = save_sae(random_sae(D_MODEL, D_SAE, LAYER, "relu", seed=31), tmp / "saes" / "tiny-sae")
    sae_file.with_name(f"{sae_file.stem}.features.jsonl").write_text(
        "".join(json.dumps(record(i)) + "\n" for i in range(D_SAE)))
    calibration.save_feature_calibration(sae_file, 5, "add", 30.0)
    labels = tmp / "labels.json"
    labels.write_text(json.dumps({str(HOSTILE): SCRIPT, "5": "cold weather"}))
    vector = save_vector({LAYER: 4 * torch.randn(D_MODEL, generator=torch.Generator().manual_seed(32))},
                         tmp / "vectors" / "calm.safetensors")
    calibration.save_vector_calibration(vector, LAYER, 2.0)
    args = [sys.executable, "-m", "sae_steer.cli", "serve", str(artifacts.model), "--dtype", "float32",
            "--max-model-len", "512", "--block-size", "32", "--max-num-seqs", "16", "--seed", "0",
            "--enforce-eager", "--served-model-name", "tiny", "--api-key", API_KEY, "--steering-admin-key", ADMIN_KEY,
            "--steering-vector-dir", str(tmp / "built"), "--steering-layers", "all",
            "--sae", f"tiny-sae={sae_file}", "--vector", f"calm={vector}",
            "--additional-config", json.dumps({"sae_steer": {"labels": {"tiny-sae": str(labels)}}})]
    srv = Server(args, tmp / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"the browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} missing: "
                    "apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("the browser tests need the selenium package (pip install selenium)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver or a browser
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER),
                              options=options)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Where the tests' screenshots go: a temporary folder, or the README's docs/screenshots/ when
    SAE_STEER_SCREENSHOTS=1 (so that a plain `make test` leaves the tree as it was)."""
    if os.environ.get("SAE_STEER_SCREENSHOTS") == "1":
        out = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("screenshots")
