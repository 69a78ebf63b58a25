"""Which decoder layers recompute their activations in backward (activation checkpointing).

Recomputing every layer keeps only one hidden state per layer alive and costs about a
third more compute; on a card with memory to spare that third is wasted. `auto` mode
measures the first step with every layer recomputed, estimates what keeping one layer's
activations costs for the largest micro-batch, and keeps as many layers as fit in 90% of
the card. On the CPU the same estimate is held against half of the RAM the system reports
available after that first step (the rest is left to the page cache and to other
programs). If a later step still runs out of memory, half of the kept layers go back to
recomputing before the loop resorts to halving the micro-batch.

A recomputation only has to restore what backward saved, and stops once it has. In the
decoder layers of `LAST_PROJECTION_UNUSED` the MLP's down-projection is the last op that
saves anything, and its output only feeds the residual sum that the recomputation never
reaches: that projection skips its matmul while recomputing (`recomputing()`), about a
quarter of a recomputed layer's matmul work.

When even the recomputed layers' inputs do not fit, they wait in host memory between
forward and backward (`offload.py`): `offload_activations=on` always (every recomputed
layer's but the last one's), `auto` when the estimate of a fully recomputed step
(`memory_estimate.py`) exceeds the card before the first step, or when a step runs out of
memory with no layer left to recompute. In `auto` the card still keeps the inputs of as
many of the last recomputed layers as its spare memory holds, so only the rest takes host
memory and transfers; a step that runs out of memory sends half of those to the host too.
Where the RAM available cannot hold the offloaded inputs (`HOST_TARGET` of it), it takes
as many as it holds and backward replays the others (`offload.py`), in the shortest segments
that let the host hold each segment's first input; a segment's inputs wait on the card in
backward only after the card's own have gone (`memory_estimate.place_inputs`).
Only then is the micro-batch halved. Each recomputed layer's gated MLP runs in slices of tokens
at long lengths (`chunked_mlp.py`), so its recomputation never holds its whole intermediate; a
kept layer's runs whole, its intermediates planned for (and the larger backward they need).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from backpropagate.errors import InputError
from backpropagate.log import get_logger
from backpropagate.train.torch import chunked_mlp
from backpropagate.train.torch.offload import ActivationOffload, offloaded

log = get_logger("recompute")

# Share of the card's memory that planning may fill (the rest absorbs fragmentation and spikes).
MEMORY_TARGET = 0.9
# Share of the RAM available after the first step that kept CPU activations may fill.
RAM_TARGET = 0.5
# Share of the RAM available before the first step that offloaded inputs may fill.
HOST_TARGET = 0.8
# Decoder layers computing `h = x + attn(norm(x)); out = h + mlp(norm(h))`, mlp ending in `down_proj`.
LAST_PROJECTION_UNUSED = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer")

_recomputing = False


def recomputing() -> bool:
    """Whether a checkpointed layer is being recomputed in backward right now."""
    return _recomputing


class _Rerun:
    """A checkpointed layer's forward; every call after the first is a recomputation."""

    def __init__(self, forward: Any) -> None:
        self.forward = forward
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        global _recomputing
        self.calls += 1
        if self.calls == 1:
            return self.forward(*args)
        previous, _recomputing = _recomputing, True
        try:
            return self.forward(*args)
        finally:
            _recomputing = previous


def draws_random_numbers(model: torch.nn.Module) -> bool:
    """Whether a forward of `model` in training mode draws from the RNG (an active dropout)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def checkpointed(forward: Any, *args: Any, preserve_rng_state: bool) -> Any:
    """`forward(*args)` with its activations recomputed in backward (non-reentrant checkpoint)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(_Rerun(forward), *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)


def activation_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """What one decoder layer keeps per token for backward when it is not recomputed.

    Layer input, both norm outputs, the residual, q and the attention output, k and v (at
    their own width: grouped-query attention does not repeat them), and the MLP's gate, up
    and product; plus 10% for what the estimate leaves out.
    """
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = getattr(config, "intermediate_size", 4 * hidden)
    elements = 4 * hidden + 2 * (heads + kv_heads) * head_dim + 3 * inter
    return int(elements * torch.finfo(dtype).bits // 8 * 1.1)


def available_ram(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of RAM the system can hand out without swapping (`MemAvailable`), or None where unknown.

    Where /proc/meminfo is missing, free pages (page cache not counted) stand in for it.
    """
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def memory_budget(device: torch.device) -> float | None:
    """Bytes that kept activations may take on `device` on top of what the first step used; None where unknown."""
    if device.type == "cuda":
        # torch.cuda's memory queries want an index; "cuda" alone means the current device.
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        free, total = torch.cuda.mem_get_info(device)
        usable: float = free + torch.cuda.memory_reserved(device)
        # A cap set with `torch.cuda.set_per_process_memory_fraction` bounds what the allocator hands out.
        usable = min(usable, torch.cuda.get_per_process_memory_fraction(device) * total)
        return MEMORY_TARGET * usable - torch.cuda.max_memory_allocated(device)
    available = available_ram()
    return None if available is None else RAM_TARGET * available


class RecomputePlan:
    """Switches recomputation on or off per decoder layer.

    Args:
        model: The (peft-wrapped) transformers model.
        mode: "on" (every layer), "off" (none) or "auto" (planned after the first step).
        offload: Recomputed layers' inputs in host memory: "on", "off" or "auto" (when short of memory).
    """

    def __init__(self, model: torch.nn.Module, mode: str, offload: str = "off") -> None:
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        # Layers whose gated MLP runs in token slices when recomputed (chunked_mlp).
        self.sliceable: list[Any] = []
        for layer in self.layers:
            mlp = getattr(layer, "mlp", None)
            if mlp is None or not chunked_mlp.is_gated_mlp(mlp):
                continue
            chunked_mlp.install(mlp)
            self.sliceable.append(layer)
            if type(layer).__name__ in LAST_PROJECTION_UNUSED:
                mlp.down_proj.__dict__["bp_output_unused_in_recompute"] = True
                mlp.__dict__["bp_output_unused_in_recompute"] = True
        self.device = next(model.parameters()).device
        self.offload_mode = offload
        self.offload: ActivationOffload | None = None
        # The RNG state is stashed for the recomputation only where a dropout draws from it: stashing
        # costs a device query per layer and cannot be captured in a CUDA graph.
        self.preserve_rng = draws_random_numbers(model)
        self.mode = mode
        self.kept = 0
        # While offloading: the last recomputed layers whose inputs stay on the card (backward needs them first),
        # the longest segment of replayed inputs (its first input goes to the host), and how many
        # inputs the host has room for (None: all).
        self.on_card = 1
        self.every = 1
        self.room: int | None = None
        # One layer's input at the first step's micro-batch (bytes; None: unknown), for offload decisions.
        self.input_size: int | None = None
        self.planned = False
        self.set_kept(len(self.layers) if mode == "off" else 0)
        if offload == "on":
            self.start_offload()

    def set_kept(self, kept: int) -> None:
        """Recompute all layers but the last `kept` (their activations stay in memory)."""
        self.kept = max(0, min(kept, len(self.layers)))
        recomputed = len(self.layers) - self.kept
        recompute: Any = functools.partial(checkpointed, preserve_rng_state=self.preserve_rng)
        moved = last = recompute
        if self.offload is not None:
            moved = offloaded(recompute, self.offload)
            last = offloaded(recompute, self.offload, keep=True)
        for i, layer in enumerate(self.layers):
            layer.gradient_checkpointing = i < recomputed
            setattr(layer, "_gradient_checkpointing_func", moved if i < recomputed - self.on_card else last)  # noqa: B010
            for module in layer.modules():  # the fused LoRA op keeps dequantized weights only where recomputed
                if hasattr(module, "lora_A"):
                    module.__dict__["bp_recomputed"] = i < recomputed
            if layer in self.sliceable:  # a kept layer's MLP runs whole
                layer.mlp.__dict__["bp_sliced"] = i < recomputed
        if self.offload is not None:
            self.offload.every, self.offload.replays = self.every, self.replayed

    @property
    def recomputed(self) -> int:
        """Layers that recompute their activations."""
        return len(self.layers) - self.kept

    @property
    def offloaded(self) -> int:
        """Layers whose inputs wait in host memory between forward and backward."""
        from backpropagate.memory_estimate import stored_layers

        return stored_layers(self.recomputed - self.on_card, self.every, self.room) if self.offload is not None else 0

    @property
    def replayed(self) -> int:
        """Layers whose inputs backward replays from an offloaded one below them."""
        return max(0, self.recomputed - self.on_card) - self.offloaded if self.offload is not None else 0

    def describe(self) -> str:
        """e.g. `recompute[20/28]`, or `recompute[28/28]+offload[20/28]` when 20 layers' inputs wait on the host.

        `+replay[r/n]` follows when backward replays r layers' inputs.
        """
        n = len(self.layers)
        offload = f"+offload[{self.offloaded}/{n}]" if self.offload is not None else ""
        replay = f"+replay[{self.replayed}/{n}]" if self.replayed else ""
        return f"recompute[{self.recomputed}/{n}]{offload}{replay}"

    def start_offload(self, on_card: int = 1, every: int = 1, room: int | None = None) -> None:
        """Keeps the inputs of the recomputed layers but the last `on_card` in host memory between forward and backward.

        With `every` > 1 the host stores one input per segment of `every`, or as many as it has
        `room` for; backward replays the others.
        """
        if self.offload is None:
            self.offload = ActivationOffload(self.device)
        self.on_card = max(1, on_card)
        self.every = max(1, every)
        self.room = room
        self.set_kept(self.kept)

    def prepare(self, config: Any, dtype: torch.dtype, tokens: int) -> None:
        """In offload auto mode on CUDA, offloads from the start when a fully recomputed step would not fit.

        Notes a layer input's size too, for an offload that an out-of-memory error starts later.
        """
        from backpropagate.memory_estimate import input_bytes

        try:
            self.input_size = input_bytes(config, tokens, dtype)
        except InputError:
            self.input_size = None
        if self.offload_mode != "auto" or self.offload is not None or self.device.type != "cuda":
            return
        self.offload_if_short(memory_budget(self.device), config, dtype, tokens, available_ram())

    def offload_if_short(
        self, budget: float | None, config: Any, dtype: torch.dtype, tokens: int, ram: float | None = None
    ) -> None:
        """Offloads when a fully recomputed step of `tokens` needs more than `budget` bytes.

        The card keeps the inputs of as many of the last layers as the budget holds beyond the
        step with the fewest inputs on it. Where `ram` (bytes available; None: unknown) cannot
        hold the rest, backward replays what it cannot (`placement`).
        """
        from backpropagate.memory_estimate import host_shortfall, input_bytes, recomputed_step_bytes

        try:
            needed = recomputed_step_bytes(config, tokens, dtype, offload=False)
        except InputError as exc:  # a config without the usual sizes: out-of-memory recovery still offloads
            log.info("activation memory not estimated before the first step (%s)", exc)
            return
        if budget is not None and needed > budget:
            # What the fewest inputs on the card leave free holds the inputs of that many more layers.
            spare = budget - recomputed_step_bytes(config, tokens, dtype, offload=True)
            self.input_size = input_bytes(config, tokens, dtype)
            self.offload_within_host(int(spare // self.input_size) if spare > 0 else 0, ram)
            log.info(
                "activation memory: %.1f GiB needed at %d tokens, %.1f GiB free: %s",
                needed / 2**30,
                tokens,
                budget / 2**30,
                self.describe(),
            )
            shortfall = host_shortfall(config, tokens, dtype, ram, self.on_card, self.every, self.room)
            if shortfall:
                log.warning(shortfall)

    def placement(self, more: int, one: int, ram: float | None) -> tuple[int, int, int | None]:
        """(inputs kept on the card, segment length, host room in inputs) when offloading inputs of `one` bytes.

        `more`: inputs the card has room for beyond the fewest (`memory_estimate.place_inputs`);
        the host stores all it has room for, so only the rest is replayed.
        """
        from backpropagate.memory_estimate import host_room, place_inputs

        # Under FSDP a layer's weights are whole only inside its own forward and backward: no replay.
        sharded = any(type(p).__name__ == "DTensor" for layer in self.layers for p in layer.parameters())
        room = host_room(one, None if ram is None else HOST_TARGET * ram)
        return (*place_inputs(self.recomputed, room, more, 1 if sharded else None), room)

    def offload_within_host(self, more: int, ram: float | None) -> None:
        """Offloads with room for `more` inputs on the card beyond the fewest, replaying what `ram` bytes cannot hold."""
        if self.input_size is None:
            self.start_offload(1 + more, self.every, self.room)
        else:
            self.start_offload(*self.placement(more, self.input_size, ram))

    def graph_obstacle(self, tokens: int) -> str | None:
        """Why a step of `tokens` tokens cannot run as a CUDA graph under this plan, or None."""
        if self.offload_mode == "on" or self.offload is not None:
            return "activation offload"
        # Only recomputed layers slice their MLP.
        chunk = min(
            (layer.mlp.bp_chunk_tokens for layer in self.sliceable if layer.gradient_checkpointing), default=tokens
        )
        return f"MLP in slices at {tokens} tokens" if tokens > chunk else None

    def plan(self, device: torch.device, config: Any, dtype: torch.dtype, tokens: int) -> bool:
        """In auto mode, keeps as many layers as the memory left after a fully recomputed step allows.

        Returns:
            Whether the layers changed.
        """
        if self.mode != "auto" or self.planned:
            return False
        self.planned = True
        budget = memory_budget(device)
        if budget is None:
            log.info("activation memory: %s (available RAM unknown)", self.describe())
            return False
        per_layer = activation_bytes_per_token(config, dtype) * tokens
        if self.sliceable:  # a kept layer's MLP runs whole (chunked_mlp)
            from backpropagate.memory_estimate import whole_mlp_backward_excess

            budget -= whole_mlp_backward_excess(config, tokens, dtype)
        self.set_kept(int(budget // per_layer) if budget > 0 else 0)
        log.info(
            "activation memory on %s: %s (%.2f GiB per kept layer at %d tokens, %.1f GiB free for them)",
            device.type,
            self.describe(),
            per_layer / 2**30,
            tokens,
            max(budget, 0) / 2**30,
        )
        return self.kept > 0

    def back_off(self) -> bool:
        """After an out-of-memory error: the next lever that frees memory without halving the micro-batch.

        Recompute half of the kept layers again; else (offload auto) offload every recomputed
        layer's input but the last one's, or half of those the card still held (replaying
        what the RAM cannot hold, `placement`).

        Returns:
            False when no lever is left (the loop halves the micro-batch).
        """
        if self.kept > 0:
            self.set_kept(self.kept // 2)
        elif self.offload_mode == "auto" and self.offload is None:
            self.offload_within_host(0, available_ram())
        elif self.offload is not None and self.on_card > 1:
            held = max(self.on_card, self.every)  # inputs on the card at once in backward, less the prefetched one
            self.offload_within_host((self.on_card - 1) // 2, available_ram())
            if max(self.on_card, self.every) >= held:  # the host allows no fewer
                return self._no_lever_left()
        else:
            return self._no_lever_left()
        log.warning("out of memory: %s", self.describe())
        return True

    def _no_lever_left(self) -> bool:
        """False, for the loop to halve the micro-batch, whose inputs take host buffers of other sizes."""
        if self.offload is not None:
            self.offload.pool.clear()
        return False
