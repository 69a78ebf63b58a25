"""A fast CUDA path (a compiled function, a Triton kernel) used until it first fails, then the plain one for good.

A compiler or kernel problem must not stop a training run: the plain path computes the
same thing, only slower. Out-of-memory errors are not such a problem and go to the loop's
recovery. CPU calls always take the plain path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch


class UntilItFails:
    """Calls `fast` on CUDA inputs until it raises once (warning what it was and what runs instead), else `plain`."""

    def __init__(
        self, fast: Callable[..., Any] | None, plain: Callable[..., Any], what: str, instead: str, log: logging.Logger
    ) -> None:
        self.fast, self.plain, self.what, self.instead, self.log = fast, plain, what, instead, log

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """`fast(*args, **kwargs)` while it works and the first argument is on CUDA; else `plain(...)`."""
        if self.fast is not None and args[0].is_cuda:
            try:
                return self.fast(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:
                self.log.warning("%s failed (%s: %s); using %s", self.what, type(exc).__name__, exc, self.instead)
                self.fast = None
        return self.plain(*args, **kwargs)
