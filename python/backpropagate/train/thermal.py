"""GPU temperature guard: pause while the card is too hot, give up if it stays hot.

Consumer cards in small cases throttle and, in the worst case, shut the machine down
mid-run. Between optimizer steps the guard reads the temperature (NVML); above
`max_temp` it waits until the card has cooled to `resume_temp`, and raises
RUNTIME_GPU_TEMPERATURE_CRITICAL if that takes longer than `max_pause_s` (the last
checkpoint stays valid, so `--resume` continues after the machine is fixed).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from backpropagate.errors import RunFailedError
from backpropagate.log import get_logger

log = get_logger("thermal")

TemperatureReader = Callable[[], float | None]


def nvml_reader(device_index: int) -> TemperatureReader | None:
    """A reader of one GPU's core temperature through NVML, or None where NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
    except Exception:  # not installed, no driver, no such device: no guard
        return None

    def read() -> float | None:
        try:
            return float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        except Exception:
            return None

    return read


class TemperatureGuard:
    """Blocks between steps while the GPU is too hot.

    Args:
        read: Returns the temperature in degrees C (None when unknown).
        max_temp: Pause above this.
        resume_temp: Resume at or below this.
        max_pause_s: Longest pause before giving up.
        poll_s: Seconds between readings while paused.
        sleep: Waits a number of seconds (injected in tests).
        clock: Monotonic seconds (injected in tests).
    """

    def __init__(
        self,
        read: TemperatureReader,
        max_temp: float,
        resume_temp: float,
        max_pause_s: float,
        poll_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read = read
        self.max_temp = max_temp
        self.resume_temp = resume_temp
        self.max_pause_s = max_pause_s
        self.poll_s = poll_s
        self.sleep = sleep
        self.clock = clock
        self.paused_s = 0.0

    def wait_until_cool(self) -> float:
        """Returns at once when cool enough; otherwise waits, and returns the seconds paused."""
        temp = self.read()
        if temp is None or temp <= self.max_temp:
            return 0.0
        log.warning(
            "GPU at %.0f C (limit %.0f C): pausing until it cools to %.0f C", temp, self.max_temp, self.resume_temp
        )
        start = self.clock()
        while temp is None or temp > self.resume_temp:
            waited = self.clock() - start
            if waited >= self.max_pause_s:
                raise RunFailedError(
                    "RUNTIME_GPU_TEMPERATURE_CRITICAL",
                    f"GPU still at {temp} C after pausing {waited:.0f} s (max_gpu_pause={self.max_pause_s:.0f} s, "
                    f"max_gpu_temp={self.max_temp:.0f} C)",
                )
            self.sleep(min(self.poll_s, self.max_pause_s - waited))
            temp = self.read()
        paused = self.clock() - start
        self.paused_s += paused
        log.info("GPU cooled to %.0f C after %.0f s; resuming", temp, paused)
        return paused
