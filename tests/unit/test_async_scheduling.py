"""A steering engine on a GPU runs without async scheduling: unset -> off, asked for -> refused by name."""
from types import SimpleNamespace

import pytest

from sae_steer.vllm_plugin.engine_options import choose_scheduling


@pytest.mark.parametrize("asked, cuda, expected", [(None, True, False), (False, True, False), (None, False, None),
                                                   (True, False, True)])
def test_async_scheduling_is_chosen_off_for_steering_engines_on_a_gpu(asked, cuda, expected):
    scheduler = SimpleNamespace(async_scheduling=asked)
    choose_scheduling(scheduler, cuda)
    assert scheduler.async_scheduling is expected  # on the CPU, vLLM's platform turns it off itself


def test_async_scheduling_asked_for_on_a_gpu_is_refused_by_name():
    with pytest.raises(RuntimeError, match="async_scheduling=True"):
        choose_scheduling(SimpleNamespace(async_scheduling=True), cuda=True)
