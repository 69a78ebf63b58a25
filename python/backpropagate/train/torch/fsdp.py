"""FSDP2 (`fully_shard`) for a data-parallel run whose model does not fit one device (`fsdp=True`).

Each decoder layer is one FSDP unit, and the decoder stack (embeddings, final norm) the
root: every rank keeps 1/N of their weights, gradients and optimizer state, gathers a
layer's weights for its forward and backward, and reduce-scatters its gradients in the
backward of a step's last micro-batch. The LM head weight stays whole on every rank
(ignored by FSDP; a tied embedding with it): the loss reads it outside any module forward
(`token_logprobs(hidden, lm_head.weight)`), where a sharded weight would be a DTensor
shard. Its gradient, like every unsharded trainable tensor's, is summed by
`World.reduce_gradients` with the loss. Checkpoints and final weights are gathered whole on
rank 0, so they keep the one format a run of any world size (with or without FSDP) resumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from backpropagate.train.distributed import World
from backpropagate.train.torch.loading import TrainingModel
from backpropagate.train.torch.recompute import RecomputePlan


def shard(tm: TrainingModel) -> None:
    """Applies `fully_shard` to each decoder layer, then to the decoder (bf16 weights, fp32 reductions on CUDA)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if tm.device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    decoder = tm.decoder
    head = tm.base.get_output_embeddings().weight
    units = [*decoder.layers, decoder]
    for layer in decoder.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(decoder, mp_policy=policy, ignored_params={p for p in decoder.parameters() if p is head})
    for unit in units:
        # A plain sum (gloo has no pre-scaled one), not FSDP's mean: every rank's loss is already
        # divided by the step's global count.
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


def is_sharded(tm: TrainingModel) -> bool:
    """Whether `shard` was applied to `tm`."""
    return any(isinstance(p, DTensor) for p in tm.model.parameters())


def sync_gradients(tm: TrainingModel, on: bool) -> None:
    """Whether the next backward reduce-scatters the gradients (only a step's last micro-batch does)."""
    tm.decoder.set_requires_gradient_sync(on)


def agree_recompute(plan: RecomputePlan, world: World) -> bool:
    """Every rank keeps the fewest layers any rank's memory allows: one plan, so the ranks' gathers pair up.

    Returns:
        Whether this rank's layers changed.
    """
    kept = min(world.gather(plan.kept))
    if kept == plan.kept:
        return False
    plan.set_kept(kept)
    return True


def unsharded(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters FSDP leaves whole (their gradients are summed by `World.reduce_gradients`)."""
    return [p for p in params if not isinstance(p, DTensor)]


def clip_gradients(params: Sequence[torch.Tensor], max_norm: float, world: World) -> torch.Tensor:
    """`clip_grad_norm_` over sharded and whole gradients together; returns the total norm.

    The shards' squares are summed over the ranks, the whole gradients' (the same on every
    rank) counted once.
    """
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device
    squares = torch.zeros((), device=device)
    for g in grads:
        if isinstance(g, DTensor):
            squares += g.to_local().float().pow(2).sum()
    squares = world.sum(squares)
    for g in grads:
        if not isinstance(g, DTensor):
            squares += g.float().pow(2).sum()
    norm = squares.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale.to(g.dtype))
    return norm


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def full_weights(tm: TrainingModel) -> dict[str, torch.Tensor]:
    """The whole trainable weights, on the CPU of rank 0 (empty on the others); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    weights: Any = get_model_state_dict(tm.model, options=_options())  # tensors by name
    return dict(weights)


def full_state(tm: TrainingModel, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole trainable weights and optimizer state on rank 0 (empty on the others); every rank must call it.

    The optimizer state comes keyed as `optimizer.state_dict()` keys it (trainable parameters
    in order), the format of every checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    index = {name: i for i, name in enumerate(tm.trainable_state())}
    weights = {name: tensor for name, tensor in full_weights(tm).items() if name in index}  # a tied weight once
    by_name: Any = get_optimizer_state_dict(tm.model, optimizer, options=_options())
    if not weights:
        return {}, {}
    return weights, {
        "state": {index[name]: value for name, value in by_name["state"].items()},
        "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in by_name["param_groups"]],
    }


def load_full_state(
    tm: TrainingModel, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Shards whole trainable weights and an optimizer state (as `full_state` returns them) into `tm` and `optimizer`."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(tm.model, dict[str, Any](weights), options=options)
    names = list(tm.trainable_state())
    by_name: Any = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]],
    }
    set_optimizer_state_dict(tm.model, optimizer, by_name, options=options)
