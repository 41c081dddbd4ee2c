"""The runtime directory of telemetry and captures: created privately, and a directory that another
user prepared (wrong mode, a symlink, another owner) is refused and never written through."""
from __future__ import annotations

import os
import stat
import tempfile

import pytest
import torch

from sae_steer.vllm_plugin import observers

ID = "feedbeef" * 4


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """<tmp> for tempfile.gettempdir(), so the default `<tmp>/sae-steer-<uid>` lies in the test's folder."""
    monkeypatch.delenv(observers.RUNTIME_DIR_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def default_dir(root):
    return root / f"sae-steer-{os.geteuid()}"


def write_everything():
    """What the worker does for a request with telemetry and capture (must never raise)."""
    observers.record_telemetry(ID, [3], [[1, 2]], [[0.5, 0.25]], first=True)
    observers.record_capture(ID, 2, torch.ones(4))


def test_telemetry_of_a_discarded_request_is_not_recreated(tmp_root):
    """The API discards a request's telemetry when its client goes away; the worker's later steps (first=False)
    must not bring the file back (the soak found such files piling up)."""
    path = observers.check_runtime_dir()
    observers.record_telemetry(ID, [3], [[1]], [[0.5]], first=True)
    observers.record_telemetry(ID, [4], [[1]], [[0.5]], first=False)
    assert [r["position"] for _, r in observers.TelemetryReader(ID).new_records()] == [3, 4]
    observers.discard(ID)
    observers.record_telemetry(ID, [5], [[1]], [[0.5]], first=False)
    assert not list(path.iterdir())


def test_fresh_directory_is_private_and_round_trips(tmp_root):
    path = observers.check_runtime_dir()
    assert path == default_dir(tmp_root)
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    write_everything()
    assert stat.S_IMODE(os.stat(path / f"{ID}.telemetry.jsonl").st_mode) == 0o600
    assert observers.TelemetryReader(ID).new_records() == [(0, {"position": 3, "features": [1, 2],
                                                                "activations": [0.5, 0.25]})]
    torch.testing.assert_close(observers.read_capture(ID, 2), torch.ones(4))
    observers.discard(ID)
    assert os.listdir(path) == []


def hostile(kind, root, target):
    path = default_dir(root)
    if kind == "world-writable":
        path.mkdir()
        path.chmod(0o777)
    elif kind == "group-readable":
        path.mkdir(mode=0o750)
        path.chmod(0o750)
    elif kind == "symlink":  # to a private directory of ours, so only the link itself is wrong
        target.mkdir(mode=0o700)
        path.symlink_to(target)
    elif kind == "file":
        path.write_text("")
    elif kind == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to chown")
        path.mkdir(mode=0o700)
        os.chown(path, 65534, 65534)
    return path


@pytest.mark.parametrize("kind", ["world-writable", "group-readable", "symlink", "file", "other-owner"])
def test_a_prepared_directory_is_refused_and_never_written(tmp_root, kind):
    target = tmp_root / "elsewhere"
    path = hostile(kind, tmp_root, target)
    before = sorted(os.listdir(path)) if path.is_dir() else None
    with pytest.raises(observers.RuntimeDirError) as e:
        observers.check_runtime_dir()
    assert str(path) in str(e.value) and observers.RUNTIME_DIR_ENV in str(e.value)
    write_everything()  # the worker logs and skips: it never raises inside the model's forward
    if path.is_dir():
        assert sorted(os.listdir(path)) == before, "nothing written into the prepared directory"
    if target.exists():
        assert os.listdir(target) == [], "nothing written through the symlink"
    with pytest.raises(observers.RuntimeDirError):
        observers.TelemetryReader(ID).new_records()


def test_operator_directory_is_checked_too(tmp_path, monkeypatch):
    target = tmp_path / "real"
    target.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(target)
    monkeypatch.setenv(observers.RUNTIME_DIR_ENV, str(tmp_path / "link"))
    with pytest.raises(observers.RuntimeDirError, match="symlink"):
        observers.check_runtime_dir()
    monkeypatch.setenv(observers.RUNTIME_DIR_ENV, str(tmp_path / "new" / "run"))
    assert observers.check_runtime_dir() == tmp_path / "new" / "run"
    assert stat.S_IMODE(os.stat(tmp_path / "new" / "run").st_mode) == 0o700


def test_files_are_never_opened_through_a_planted_symlink(tmp_root):
    path = observers.check_runtime_dir()
    victim = tmp_root / "victim.txt"
    victim.write_text("precious\n")
    (path / f"{ID}.telemetry.jsonl").symlink_to(victim)
    (path / f"{ID}.L2.safetensors").symlink_to(victim)
    write_everything()
    assert victim.read_text() == "precious\n"
    assert not (path / f"{ID}.L2.safetensors").is_symlink(), "the capture replaced the link, not its target"
    (path / f"{ID}.L1.safetensors").symlink_to(victim)
    with pytest.raises(OSError):
        observers.read_capture(ID, 1)  # a symlink where a capture should be is not read either


def test_sae_steer_serve_uses_a_fresh_private_directory(tmp_root, monkeypatch):
    """`sae-steer serve` avoids the guessable default: even with it prepared by someone else, the server
    gets a fresh mkdtemp directory, passed to its engine processes through the environment."""
    from sae_steer.cli import private_runtime_dir
    target = tmp_root / "elsewhere"
    hostile("symlink", tmp_root, target)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_root))
    path = private_runtime_dir()
    assert os.environ[observers.RUNTIME_DIR_ENV] == path and path != str(default_dir(tmp_root))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700 and not os.path.islink(path)
    write_everything()
    assert sorted(os.listdir(path)) == [f"{ID}.L2.safetensors", f"{ID}.telemetry.jsonl"]
    assert os.listdir(target) == []
