"""backpropagate: fine-tune a language model on your own data with one GPU, run it locally.

from backpropagate import Trainer
trainer = Trainer("tiny-llama")
trainer.train("data.jsonl", steps=100)
trainer.export("gguf", quantization="q4_k_m")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from backpropagate.errors import BackpropagateError

try:
    __version__ = version("backpropagate")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = ["BackpropagateError", "TrainConfig", "TrainResult", "Trainer", "__version__", "estimate_memory"]

# Heavy modules (torch, transformers) load only when the training API is first touched.
_LAZY = {
    "Trainer": "backpropagate.trainer",
    "TrainResult": "backpropagate.trainer",
    "TrainConfig": "backpropagate.config",
    "estimate_memory": "backpropagate.memory_estimate",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'backpropagate' has no attribute {name!r}")
