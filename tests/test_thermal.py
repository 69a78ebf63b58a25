import pytest

from backpropagate.errors import RunFailedError
from backpropagate.train.thermal import TemperatureGuard


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds

    def __call__(self):
        return self.now


def _guard(readings, clock, max_pause=60.0):
    values = iter(readings)
    return TemperatureGuard(lambda: next(values), 85, 75, max_pause, poll_s=5, sleep=clock.sleep, clock=clock)


def test_cool_gpu_never_waits():
    clock = FakeClock()
    guard = _guard([60, 85, None], clock)
    assert [guard.wait_until_cool() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert clock.sleeps == []


def test_hot_gpu_pauses_until_it_reaches_the_resume_temperature():
    clock = FakeClock()
    guard = _guard([90, 88, 80, 76, 75], clock)
    assert guard.wait_until_cool() == 20.0
    assert clock.sleeps == [5, 5, 5, 5]
    assert guard.paused_s == 20.0


def test_gpu_that_stays_hot_fails_after_the_maximum_pause():
    clock = FakeClock()
    guard = _guard([95] * 100, clock, max_pause=12.0)
    with pytest.raises(RunFailedError) as err:
        guard.wait_until_cool()
    assert err.value.code == "RUNTIME_GPU_TEMPERATURE_CRITICAL"
    assert clock.now == 12.0 and "12 s" in err.value.message
