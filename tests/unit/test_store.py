"""The vector store that replicas share (server/store.py): two stores over one directory stand for two API
servers; what one writes or deletes, the other's next scan serves or drops, and a damaged, half-written or
unservable file is reported in the log and never served."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from sae_steer.calibration import save_vector_calibration
from sae_steer.server.state import SteeringState
from sae_steer.server.store import VectorStore
from sae_steer.spec import ModelFacts, SteeringError

FACTS = ModelFacts(d_model=4, num_layers=3, steerable_layers=frozenset({1, 2}), vectors={"config-v": frozenset({2})})
CALM = {1: torch.tensor([1.0, -2.0, 0.5, 3.0]), 2: torch.tensor([0.25, 0.0, -1.0, 2.0])}


def unservable(name, layers):  # what SteeringState refuses, for FACTS (its own test is below)
    st = SteeringState.__new__(SteeringState)
    st.facts = FACTS
    return st._unservable(name, layers)


def replica(directory) -> VectorStore:
    store = VectorStore(directory, unservable)
    rescan(store)
    return store


def rescan(store: VectorStore) -> None:
    store.apply(store.scan())


def put(store, name, layers, overwrite=False):
    return asyncio.run(store.put(name, layers, {"method": "test"}, overwrite=overwrite))


@pytest.fixture
def log():
    """The store's log records (vLLM's logger does not propagate to pytest's handler)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.sae_steer")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield lambda level=logging.WARNING: [r.getMessage() for r in records if r.levelno >= level]
    logger.removeHandler(handler)
    logger.setLevel(old)


def assert_layers_equal(got, want):
    assert sorted(got) == sorted(want)
    for L in want:
        torch.testing.assert_close(got[L], want[L], rtol=0, atol=0)


def test_a_vector_written_by_one_replica_is_served_by_the_other_until_deleted(tmp_path, log):
    a, b = replica(tmp_path), replica(tmp_path)
    assert b.vectors == {}
    path = put(a, "calm", CALM)
    assert path == tmp_path / "calm.safetensors" and sorted(p.name for p in tmp_path.iterdir()) == ["calm.safetensors"]
    assert_layers_equal(a.vectors["calm"], CALM)
    rescan(b)
    assert_layers_equal(b.vectors["calm"], CALM)
    assert any("serving 'calm'" in m for m in log(logging.INFO))
    assert asyncio.run(a.remove("calm")) and "calm" not in a.vectors
    rescan(b)
    assert "calm" not in b.vectors and not b.exists("calm")
    assert not asyncio.run(b.remove("calm")), "nothing left to delete"
    assert log() == []


def test_a_name_in_the_store_is_refused_without_overwrite_and_the_last_writer_wins_with_it(tmp_path):
    a, b = replica(tmp_path), replica(tmp_path)
    put(a, "calm", CALM)
    assert b.exists("calm"), "on disk, before b's next scan"
    with pytest.raises(FileExistsError):
        put(b, "calm", {1: torch.ones(4)})
    save_vector_calibration(tmp_path / "calm.safetensors", layer=1, coef=3.0)
    rescan(a)
    assert a.calibrations["calm"]["coef"] == 3.0
    put(b, "calm", {2: torch.full((4,), 2.0)}, overwrite=True)
    rescan(a)
    assert_layers_equal(a.vectors["calm"], {2: torch.full((4,), 2.0)})
    assert "calm" not in a.calibrations, "the calibration of the replaced vector went with it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calm.safetensors"], "no temporary files left"


def test_a_damaged_or_half_written_file_is_never_served_and_is_reported(tmp_path, log):
    a = replica(tmp_path)
    path = put(a, "calm", CALM)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of a value: the file still loads, its checksum no longer matches
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:-5])  # a copy cut short
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"layer.1": torch.ones(4)}, str(tmp_path / "lying.safetensors"),
              metadata={"sae_steer.format": "vector", "sae_steer.sha256": "0" * 64})
    b = replica(tmp_path)
    assert set(b.vectors) == {"calm"}
    warnings = log()
    for name in ("flipped", "torn", "empty", "lying"):
        assert any(f"{name}.safetensors not served" in m for m in warnings), (name, warnings)
    assert any("checksum does not match" in m for m in warnings if "flipped" in m)
    rescan(b)
    assert log() == warnings, "an unchanged bad file is reported once"
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes())  # the copy completed
    rescan(b)
    assert_layers_equal(b.vectors["torn"], CALM)


def test_files_without_a_checksum_load_as_before_and_unservable_ones_are_reported(tmp_path, log):
    """Vectors written by earlier versions (or `sae-steer eval --vector-out` into the folder) carry no checksum."""
    from sae_steer.formats import save_vector
    save_vector(CALM, tmp_path / "older.safetensors")
    save_vector({0: torch.ones(4)}, tmp_path / "layer0.safetensors")  # layer 0 is not steerable in FACTS
    save_vector({1: torch.ones(5)}, tmp_path / "wide.safetensors")
    save_vector({1: torch.ones(4)}, tmp_path / "config-v.safetensors")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "older.safetensors")
    (tmp_path / ".calm.safetensors.0123.tmp").write_bytes(b"half")  # a writer's temporary file
    store = replica(tmp_path)
    assert set(store.vectors) == {"older"}
    assert_layers_equal(store.vectors["older"], CALM)
    warnings = "\n".join(log())
    for name, why in (("layer0", "layers [0] are not steerable"), ("wide", "d_model (4)"),
                      ("config-v", "vector of the server's config"), ("link", "not a regular file")):
        assert f"{name}.safetensors not served: " in warnings and why in warnings, (name, warnings)
    assert ".calm" not in warnings


def test_a_scan_that_began_before_this_replicas_own_write_is_not_applied(tmp_path):
    store = replica(tmp_path)
    stale = store.scan()
    put(store, "calm", CALM)
    store.apply(stale)
    assert "calm" in store.vectors, "the build is not undone by a scan that missed it"
    rescan(store)
    assert "calm" in store.vectors
    stale = store.scan()
    asyncio.run(store.remove("calm"))
    store.apply(stale)
    assert "calm" not in store.vectors, "nor the deletion"


def test_a_calibration_written_beside_a_stored_vector_makes_auto_resolve_on_the_other_replica(tmp_path, log):
    a, b = replica(tmp_path), replica(tmp_path)
    put(a, "calm", CALM)
    save_vector_calibration(tmp_path / "calm.safetensors", layer=2, coef=1.5, per_layer={1: {"coef": -0.5}})
    rescan(b)
    st = SteeringState.__new__(SteeringState)  # only what check_steering reads
    st.facts, st.built, st.built_calibrations = FACTS, b.vectors, b.calibrations
    out = st.check_steering({"interventions": [{"type": "vector", "vector": "calm", "coef": "auto"}]})
    assert out.steering.wire()["interventions"] == [
        {"type": "vector", "layer": 2, "values": CALM[2].tolist(), "coef": 1.5}]
    out = st.check_steering({"interventions": [{"type": "vector", "vector": "calm", "layer": 1, "coef": "auto"}]})
    assert out.steering.wire()["interventions"][0]["coef"] == -0.5
    # A calibration that does not parse: the vector is still served, "auto" is refused naming the field.
    (tmp_path / "calm.safetensors.calibration.json").write_text(json.dumps({"kind": "vector", "coef": "big"}))
    rescan(b)
    assert "calm" in b.vectors and "calm" not in b.calibrations
    assert any("calibration of 'calm' not used" in m for m in log())
    with pytest.raises(SteeringError) as e:
        st.check_steering({"interventions": [{"type": "vector", "vector": "calm", "coef": "auto"}]})
    assert e.value.field == "steering.interventions[0].coef"
    # Deleted on a: b refuses the name as it refuses any unknown vector.
    asyncio.run(a.remove("calm"))
    assert not (tmp_path / "calm.safetensors.calibration.json").exists()
    rescan(b)
    with pytest.raises(SteeringError) as e:
        st.check_steering({"interventions": [{"type": "vector", "vector": "calm", "coef": 1.0}]})
    assert e.value.field == "steering.interventions[0].vector"
