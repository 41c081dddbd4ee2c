"""A `sae-steer serve` process of its own for the HTTP fuzzing (built vectors and odd requests stay out of
tests/server's server), on 127.0.0.1 with the tiny model and the shared artifacts."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from tests.server.conftest import Server, serve_args


@pytest.fixture(scope="session")
def fuzz_server(request, tmp_path_factory):
    if os.environ.get("SAE_STEER_FUZZ_URL"):  # development: a server already started with serve_args()
        yield SimpleNamespace(url=os.environ["SAE_STEER_FUZZ_URL"].rstrip("/"))
        return
    artifacts = request.getfixturevalue("artifacts")
    tmp = tmp_path_factory.mktemp("fuzz-server")
    srv = Server(serve_args(artifacts, tmp / "vectors"), tmp / "server.log")
    yield srv
    srv.stop()
