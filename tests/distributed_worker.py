"""One rank of a data-parallel test run: `python distributed_worker.py JOB SPEC_JSON RESULT_JSON`.

The test starts one of these per rank with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT); each trains tiny-llama through the real `Trainer` and writes
what the test compares (losses, a digest of its trained weights, or its coded error).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from backpropagate import Trainer
from backpropagate.errors import BackpropagateError
from train_helpers import rule_dataset


def weights_digest(trainer: Trainer) -> str:
    """A digest of the trained weights, in name order (a sharded tensor gathered whole: every rank must call it)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(trainer._trained.trainable_state().items()):
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    spec = json.loads(sys.argv[1])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    data = spec["data"] if rank in spec.get("data_ranks", []) else rule_dataset(**spec["dataset"])
    trainer = Trainer(spec.get("model", "tiny-llama"), **spec["options"])
    try:
        result = trainer.train(data, steps=spec["steps"])
        out = {"losses": result.losses, "eval_losses": result.eval_losses, "digest": weights_digest(trainer)}
    except BackpropagateError as err:
        out = {"code": err.code, "message": err.message}
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
