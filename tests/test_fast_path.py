"""`UntilItFails`: the compiled kernels' and the FP8 transpose's fallback, the same policy for both."""

import pytest
import torch

from backpropagate.log import get_logger
from backpropagate.train.torch.fast_path import UntilItFails


class OnCuda:
    """What the policy reads of a CUDA tensor (no GPU here): only `is_cuda`."""

    is_cuda = True


def test_a_fast_path_that_fails_once_is_left_for_good_with_a_warning(caplog):
    calls = []

    def fast(x):
        calls.append(x)
        raise RuntimeError("no kernel")

    path = UntilItFails(fast, lambda x: "plain", "the kernel", "the copy", get_logger("test"))
    with caplog.at_level("WARNING", logger="backpropagate"):
        assert [path(OnCuda()), path(OnCuda())] == ["plain", "plain"]
    assert len(calls) == 1 and path.fast is None
    assert "the kernel failed (RuntimeError: no kernel); using the copy" in caplog.text


def test_out_of_memory_goes_to_the_loop_and_cpu_inputs_take_the_plain_path():
    def fast(x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    path = UntilItFails(fast, lambda x: "plain", "the kernel", "the copy", get_logger("test"))
    with pytest.raises(torch.OutOfMemoryError):
        path(OnCuda())
    assert path.fast is fast
    assert path(torch.zeros(2)) == "plain"
