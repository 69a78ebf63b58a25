"""SLAO: one LoRA adapter for a sequence of runs, by orthogonal initialisation and continual merging.

"Merge before Forget: A Single LoRA Continual Learning via Continual Merging" (Qiao &
Mahdavi, arXiv 2512.23017, ICLR 2026). With LoRA's update `B @ A` (A: [r, in], B: [out, r]):

* Initialisation of run i > 1: B starts from run i-1's fine-tuned B, and A from an
  orthonormal basis of run i-1's fine-tuned A: `Q, R = qr(A_{i-1}^T)`, `A_0 = Q^T`, so the
  rows of `A_0` are orthonormal (`A_0 A_0^T = I_r`) and span the row space of `A_{i-1}`.
  The signs of Q's columns are fixed by making R's diagonal positive, which makes the
  basis unique and keeps each row on the side of the row of `A_{i-1}` it comes from.
* Merge after run i: the paper treats the two factors asymmetrically. A varies little
  across tasks (its rows are an input basis), so the merged A is the new run's fine-tuned A;
  B carries the task-specific output and is merged with a time-aware weight:
  `B_merged_i = B_merged_{i-1} + lambda(i) * (B_i - B_merged_{i-1})`, with
  `lambda(i) = 1 / sqrt(i)` (the paper's choice: task vectors of different tasks are near
  orthogonal, so a 1/sqrt(i) step keeps the norm of the accumulated update from shrinking
  like the plain running mean's 1/i would). Run 1's merge is its own adapter (lambda(1) = 1).
  Sources: the paper's method as its summaries state it (QR initialisation, A from the
  new run, B merged with a time-aware weight) and its equations as public
  reimplementations quote them (the update above, lambda(i) = 1/sqrt(i)); its full text
  could not be checked here. A plain running mean of the B's (lambda(i) = 1/i) would
  protect early runs more and learn late ones less.

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
