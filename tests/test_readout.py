"""A step's scalars read back late: `ready` says whether reading them would wait, without waiting."""

import pytest
import torch

from backpropagate.train.torch.readout import Readout


def test_a_cpu_readout_is_ready_at_once():
    readout = Readout(torch.tensor(2.5), torch.tensor(0.5, dtype=torch.bfloat16))
    assert readout.ready()
    assert readout.values() == [2.5, 0.5]


@pytest.mark.gpu
def test_a_cuda_readout_is_ready_only_once_its_step_s_work_is_done():
    """While the GPU is busy the loop must not block on it; once done, the values are at hand."""
    loss = torch.ones((), device="cuda")
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued ahead of the readout
    readout = Readout(loss * 3)
    assert not readout.ready()
    torch.cuda.synchronize()
    assert readout.ready()
    assert readout.values() == [3.0]
