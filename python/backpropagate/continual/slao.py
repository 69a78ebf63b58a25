"""SLAO: one LoRA adapter for a sequence of runs, by orthogonal initialisation and continual merging.

"Merge before Forget: A Single LoRA Continual Learning via Continual Merging" (Qiao &
Mahdavi, arXiv 2512.23017, ICLR 2026), in the paper's notation, with LoRA's update
`B @ A` (A: [r, in], B: [out, r]), `A_ft,i` / `B_ft,i` run i's fine-tuned factors and
`A_merge,i` / `B_merge,i` the single adapter after run i:

1. Initialisation of run i > 1 (orthogonal basis extraction):
   `B_ft,i^(0) = B_ft,i-1` (the previous run's fine-tuned B, not the merged one), and
   `Q_i R_i = QR(A_ft,i-1^T)`, `A_ft,i^(0) = Q_i^T`, so `A_ft,i^(0) A_ft,i^(0)^T = I_r`.
   Run 1 starts from the usual LoRA initialisation. R's diagonal is made positive (the
   unique QR), so each row of `Q_i^T` leans towards the row of `A_ft,i-1` it comes from.
2. Merge after run i (asymmetric, time-aware):
   `A_merge,i = A_ft,i` (A is replaced: its rows are an input basis that varies little
   across tasks) and `B_merge,i = B_merge,i-1 + lambda(i) (B_ft,i - B_merge,i-1)`, with
   `lambda(i) = 1/sqrt(i)` (i 1-based, so `B_merge,1 = B_ft,1` and run 2 enters with
   1/sqrt(2) ~ 0.707). The factors are merged, never the product `B A`; the task vector
   is taken against the merged B, not against a fixed base.
3. Learning rate: none of the sources below describes a per-run decay, so every run
   trains at the same rate by default (`lr_decay` = 1; other values are our option).

Sources: the paper's abstract, a summary that quotes its initialisation (QR of
`A_ft,i-1^T`, `A^(0) = Q^T`, `B^(0) = B_ft,i-1`), and its ICLR reviews, which quote the
merge (`A_merge^i = A_ft,i`, "time-aware weighted average" of B with `lambda(i) = 1/sqrt(i)`,
the task vector taken against the merged weights). The full text, and so its equation
numbers, could not be read here; the rules above are those the three sources agree on.

Tensors other than A and B (DoRA's magnitude vector) are carried like B: copied at
initialisation and merged with the same weight, since they too scale the output.

`mode="simple"` is the baseline: run i starts from run i-1's adapter as it is, and the
merged adapter is simply the newest run's (plain sequential training of one adapter).
"""

from __future__ import annotations

import math

import torch

MERGE_MODES = ("slao", "simple")

State = dict[str, torch.Tensor]


def is_lora_a(name: str) -> bool:
    """Whether a PEFT adapter tensor name is a LoRA A (down-projection) matrix."""
    return ".lora_A." in name


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """`Q^T` from `Q, R = qr(a^T)`: rows that are orthonormal and span the row space of `a` ([r, in])."""
    rank, width = a.shape
    if width < rank:
        raise ValueError(f"LoRA A of shape {tuple(a.shape)} has more rows than columns; no orthonormal rows exist")
    q, r = torch.linalg.qr(a.detach().to(torch.float64).T, mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.to(a.dtype).contiguous()


def time_scale(run: int) -> float:
    """lambda(i) = 1/sqrt(i): the weight of run `run` (1-based) in the merged B."""
    return 1.0 / math.sqrt(run)


def init_state(previous: State, mode: str) -> State:
    """The adapter weights run i starts from, given run i-1's fine-tuned adapter."""
    if mode == "simple":
        return {k: v.clone() for k, v in previous.items()}
    return {k: orthonormal_rows(v) if is_lora_a(k) else v.clone() for k, v in previous.items()}


def merge_state(merged: State | None, new: State, run: int, mode: str) -> State:
    """The merged adapter after run `run` (1-based) from the merged one before it and the run's own."""
    if merged is None or mode == "simple":
        return {k: v.clone() for k, v in new.items()}
    if merged.keys() != new.keys():
        raise ValueError("the run's adapter and the merged adapter hold different tensors")
    scale = time_scale(run)
    return {
        k: v.clone() if is_lora_a(k) else merged[k] + scale * (v.to(merged[k].dtype) - merged[k])
        for k, v in new.items()
    }
