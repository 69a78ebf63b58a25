"""Preference objectives: ORPO and SimPO (reference-free, on pairs) and KTO (on labelled rows).

All three start from per-sequence log-probabilities of the answer tokens, gathered from
the final hidden states without materialising logits (`losses.target_logprobs`):

* ORPO: NLL of the chosen answers + beta * -log sigmoid(log odds(chosen) - log odds(rejected)),
  odds from the mean per-token log-probability (Hong et al. 2024; TRL's ORPOTrainer).
* SimPO: -log sigmoid(beta * (mean logp(chosen) - mean logp(rejected)) - gamma)
  (Meng et al. 2024; TRL's CPOTrainer with loss_type="simpo", cpo_alpha=0).
* KTO: each row's reward is its log-ratio to the reference model, which is the base model
  with the adapter switched off (no second model in memory). The reference point is the
  batch's KL estimate from mismatched pairs (prompt i with the answer of row i - 1, as TRL
  builds them), detached and clamped at 0; desirable rows pay 1 - sigmoid(beta * (r - kl)),
  undesirable ones 1 - sigmoid(beta * (kl - r)), each with its class weight.

A pair's chosen and rejected answers share their prompt token for token, so the pair is
stored as prompt + chosen answer + rejected answer and the prompt runs through the model
once (`pair_layout`); attention gathers the prompt's keys for each answer, so the result
is exactly that of two separate sequences.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backpropagate.config import TrainConfig, check_data_kind
from backpropagate.data.dataset import IGNORE_INDEX, Batch, PreparedDataset
from backpropagate.log import get_logger
from backpropagate.train.torch.losses import DeviceBatch, LMHead, sequence_logprobs, target_logprobs, to_device

log = get_logger("preference")


@dataclass
class Policy:
    """How an objective runs the model itself (KTO's reference and KL passes).

    Attributes:
        forward: Final hidden states [1, T, H] of a device batch.
        reference: A context manager factory under which the model is the reference (adapter off).
    """

    forward: Callable[[DeviceBatch], torch.Tensor]
    reference: Callable[[], AbstractContextManager[Any]] | None


# ---- host-side layouts ------------------------------------------------------------------


def sample_slices(batch: Batch) -> list[slice]:
    """Token range of each sample of a batch."""
    cu = batch.cu_seqlens
    return [slice(int(cu[i]), int(cu[i + 1])) for i in range(len(cu) - 1)]


def pairs_of(batch: Batch, dataset: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected): the batch-local sample index of each pair's two answers, in pair order."""
    pair = np.asarray(dataset.pair_id)[batch.sample_index]
    chosen = np.asarray(dataset.chosen)[batch.sample_index]
    c = np.flatnonzero(chosen)
    r = np.flatnonzero(~chosen)
    c = c[np.argsort(pair[c], kind="stable")]
    r = r[np.argsort(pair[r], kind="stable")]
    if len(c) != len(r) or not np.array_equal(pair[c], pair[r]) or (pair < 0).any():
        raise ValueError("a micro-batch of preference samples must hold whole pairs")
    return c, r


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class PairLayout:
    """A micro-batch of pairs with each pair's common prefix stored once (host arrays).

    Queries run in stored order: per pair, the chosen sample whole, then the rejected
    sample's tail. Keys are gathered by `kv_index`: the chosen sample, then the shared
    prefix followed by the rejected tail, so each answer attends its own copy of the prompt.

    Attributes:
        input_ids: [T] stored tokens.
        position_ids: [T] each token's position in its own sample.
        stored: [T0] stored position of every token of the original batch.
        kv_index: [T'] stored position of each key (every sample whole, chosen then rejected).
        cu_q: [n + 1] query segment boundaries in stored order (chosen, rejected tail, per pair).
        cu_k: [n + 1] key segment boundaries in `kv_index` order (chosen, rejected whole).
        max_q: Longest query segment.
        max_k: Longest sample.
        shared: Tokens stored once instead of twice.
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    stored: np.ndarray
    kv_index: np.ndarray
    cu_q: np.ndarray
    cu_k: np.ndarray
    max_q: int
    max_k: int
    shared: int


def pair_layout(batch: Batch, chosen: np.ndarray, rejected: np.ndarray, share: bool = True) -> PairLayout:
    """Stores each pair as chosen + the rejected sample's tail after their common prefix.

    The prefix is capped one token short of the shorter sample, so each sample keeps a
    token of its own. With `share=False` nothing is shared (the layout of two sequences).
    """
    ids = batch.input_ids[0]
    spans = sample_slices(batch)
    parts_ids: list[np.ndarray] = []
    parts_pos: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    stored = np.empty(len(ids), dtype=np.int64)
    len_q: list[int] = []
    len_k: list[int] = []
    base = shared = 0
    for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True):
        sc, sr = spans[c], spans[r]
        nc, nr = sc.stop - sc.start, sr.stop - sr.start
        p = min(common_prefix(ids[sc], ids[sr]), nc - 1, nr - 1) if share else 0
        tail = nr - p
        parts_ids += [ids[sc], ids[sr.start + p : sr.stop]]
        parts_pos += [np.arange(nc), np.arange(p, nr)]
        stored[sc] = base + np.arange(nc)
        stored[sr] = np.concatenate([base + np.arange(p), base + nc + np.arange(tail)])
        keys += [base + np.arange(nc), base + np.arange(p), base + nc + np.arange(tail)]
        len_q += [nc, tail]
        len_k += [nc, nr]
        base += nc + tail
        shared += p
    cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (len_q, len_k))
    return PairLayout(
        input_ids=np.concatenate(parts_ids),
        position_ids=np.concatenate(parts_pos),
        stored=stored,
        kv_index=np.concatenate(keys),
        cu_q=cu_q,
        cu_k=cu_k,
        max_q=max(len_q),
        max_k=max(len_k),
        shared=shared,
    )


def pair_device_batch(
    batch: Batch, chosen: np.ndarray, rejected: np.ndarray, device: torch.device, share: bool, prompt_targets: bool
) -> DeviceBatch:
    """A batch of pairs on `device` in `pair_layout`, its targets mapped to stored positions.

    Samples are numbered as in `batch`. With `prompt_targets`, every other token of each
    chosen sample (the prompt) is a target too, counted under sample index n + its own.
    """
    layout = pair_layout(batch, chosen, rejected, share)
    labels = batch.labels[0]
    n = len(batch.cu_seqlens) - 1
    positions = np.flatnonzero(labels[1:] != IGNORE_INDEX)
    targets = labels[1:][positions]
    sample = np.searchsorted(batch.cu_seqlens[1:], positions + 1, side="right")
    if prompt_targets:
        ids = batch.input_ids[0]
        spans = sample_slices(batch)
        extra = np.concatenate([np.arange(spans[c].start, spans[c].stop - 1) for c in chosen.tolist()])
        extra = extra[labels[extra + 1] == IGNORE_INDEX]
        positions = np.concatenate([positions, extra])
        targets = np.concatenate([targets, ids[extra + 1]])
        sample = np.concatenate([sample, n + np.searchsorted(batch.cu_seqlens[1:], extra + 1, side="right")])
    gathered = layout.shared > 0
    return DeviceBatch(
        batch=batch,
        input_ids=to_device(layout.input_ids[None, :], torch.long, device),
        position_ids=to_device(layout.position_ids[None, :], torch.long, device),
        cu_seqlens=to_device(layout.cu_q, torch.int32, device),
        max_seqlen=layout.max_q,
        target_positions=to_device(layout.stored[positions], torch.long, device),
        targets=to_device(targets, torch.long, device),
        target_sample=to_device(sample, torch.long, device),
        cu_seqlens_k=to_device(layout.cu_k, torch.int32, device) if gathered else None,
        max_seqlen_k=layout.max_k,
        kv_index=to_device(layout.kv_index, torch.long, device) if gathered else None,
        extra={"chosen": to_device(chosen, torch.long, device), "rejected": to_device(rejected, torch.long, device)},
    )


def batch_of_samples(ids: list[np.ndarray], labels: list[np.ndarray]) -> Batch:
    """A padding-free batch of the given samples (the form `PreparedDataset.batch_of` makes)."""
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    cu = np.zeros(len(ids) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    all_labels = np.concatenate(labels).astype(np.int64)
    all_labels[cu[:-1]] = IGNORE_INDEX
    return Batch(
        input_ids=np.concatenate(ids).astype(np.int64)[None, :],
        labels=all_labels[None, :],
        position_ids=(np.arange(int(cu[-1])) - np.repeat(cu[:-1].astype(np.int64), lengths))[None, :],
        cu_seqlens=cu,
        max_seqlen=int(lengths.max()),
        sample_index=np.arange(len(ids), dtype=np.int64),
        num_loss_tokens=int((all_labels != IGNORE_INDEX).sum()),
    )


def split_prompt(batch: Batch) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(prompt ids, answer ids, answer labels) of each sample: the answer starts at its first target."""
    ids, labels = batch.input_ids[0], batch.labels[0]
    out = []
    for span in sample_slices(batch):
        targets = np.flatnonzero(labels[span] != IGNORE_INDEX)
        start = span.start + (int(targets[0]) if len(targets) else span.stop - span.start)
        out.append((ids[span.start : start], ids[start : span.stop], labels[start : span.stop]))
    return out


def mismatched_batch(batch: Batch) -> Batch:
    """KTO's KL samples: the prompt of sample i with the answer of sample i - 1 (cyclically)."""
    parts = split_prompt(batch)
    ids, labels = [], []
    for i, (prompt, _, _) in enumerate(parts):
        _, answer, answer_labels = parts[i - 1]
        ids.append(np.concatenate([prompt, answer]))
        labels.append(np.concatenate([np.full(len(prompt), IGNORE_INDEX), answer_labels]))
    return batch_of_samples(ids, labels)


def concat_batches(first: Batch, second: Batch) -> Batch:
    """Both batches' samples in one padding-free batch (first's samples, then second's)."""
    spans = [(first, s) for s in sample_slices(first)] + [(second, s) for s in sample_slices(second)]
    return batch_of_samples([b.input_ids[0][s] for b, s in spans], [b.labels[0][s] for b, s in spans])


# ---- objectives -------------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class PairObjective:
    """Shared by ORPO and SimPO: pairs laid out with one prompt, mean per-token answer log-probabilities."""

    name = "pairs"

    def __init__(self, dataset: PreparedDataset, share: bool, prompt_targets: bool = False) -> None:
        self.dataset = dataset
        self.share = share
        self.prompt_targets = prompt_targets

    def pairs(self, batch: Batch) -> int:
        """Pairs in the batch."""
        return int(np.asarray(self.dataset.chosen)[batch.sample_index].sum())

    def chosen_tokens(self, batch: Batch) -> int:
        """Tokens of the chosen samples' NLL term (their answers; with `prompt_targets`, every token but the first)."""
        chosen = np.asarray(self.dataset.chosen)[batch.sample_index]
        labels = batch.labels[0]
        tokens = 0
        for i, span in enumerate(sample_slices(batch)):
            if chosen[i]:
                n = span.stop - span.start - 1
                tokens += n if self.prompt_targets else int((labels[span.start + 1 : span.stop] != IGNORE_INDEX).sum())
        return tokens

    def device_batch(self, batch: Batch, device: torch.device) -> DeviceBatch:
        """The pairs of `batch`, each prompt stored once."""
        chosen, rejected = pairs_of(batch, self.dataset)
        return pair_device_batch(batch, chosen, rejected, device, self.share, self.prompt_targets)

    def pair_logps(self, hidden: torch.Tensor, lm_head: LMHead, batch: DeviceBatch) -> tuple[torch.Tensor, ...]:
        """(mean logp chosen [P], mean logp rejected [P], summed logp per bin [n or 2n])."""
        logp = target_logprobs(hidden, lm_head, batch)
        sums, counts = batch.per_sample(logp, batch.num_samples * (2 if self.prompt_targets else 1))
        chosen, rejected = batch.extra["chosen"], batch.extra["rejected"]
        mean_c = sums[chosen] / counts[chosen].clamp(min=1)
        mean_r = sums[rejected] / counts[rejected].clamp(min=1)
        return mean_c, mean_r, sums


class OrpoObjective(PairObjective):
    """ORPO: chosen answers' NLL (per token over the step) + beta x odds-ratio loss (per pair over the step)."""

    name = "orpo"

    def __init__(self, dataset: PreparedDataset, beta: float, share: bool, prompt_loss: bool) -> None:
        super().__init__(dataset, share, prompt_targets=prompt_loss)
        self.beta = beta

    def normaliser(self, batch: Batch) -> tuple[int, int]:
        """(NLL tokens of the chosen samples, pairs)."""
        return self.chosen_tokens(batch), self.pairs(batch)

    def loss_sum(self, hidden: torch.Tensor, lm_head: LMHead, batch: DeviceBatch) -> torch.Tensor:
        """[summed chosen NLL, summed beta x -log sigmoid(log odds ratio)]."""
        mean_c, mean_r, sums = self.pair_logps(hidden, lm_head, batch)
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
        chosen = batch.extra["chosen"]
        nll = -sums[chosen].sum()
        if self.prompt_targets:
            nll = nll - sums[chosen + batch.num_samples].sum()
        return torch.stack([nll, -self.beta * F.logsigmoid(log_odds).sum()])


class SimpoObjective(PairObjective):
    """SimPO: -log sigmoid(beta x (mean logp chosen - mean logp rejected) - gamma), averaged over the step's pairs.

    With `alpha` > 0, alpha x the chosen answers' NLL (per token over the step) is added, as
    TRL's CPOTrainer does with `cpo_alpha`.
    """

    name = "simpo"

    def __init__(self, dataset: PreparedDataset, beta: float, gamma: float, share: bool, alpha: float = 0.0) -> None:
        super().__init__(dataset, share)
        self.beta = beta
        self.gamma = gamma
        self.alpha = alpha

    def normaliser(self, batch: Batch) -> int | tuple[int, int]:
        """Pairs; (NLL tokens of the chosen samples, pairs) with an NLL term."""
        return (self.chosen_tokens(batch), self.pairs(batch)) if self.alpha else self.pairs(batch)

    def loss_sum(self, hidden: torch.Tensor, lm_head: LMHead, batch: DeviceBatch) -> torch.Tensor:
        """Summed SimPO loss of the pairs ([alpha x summed chosen NLL, that] with an NLL term)."""
        mean_c, mean_r, sums = self.pair_logps(hidden, lm_head, batch)
        simpo = -F.logsigmoid(self.beta * (mean_c - mean_r) - self.gamma).sum()
        if not self.alpha:
            return simpo
        return torch.stack([-self.alpha * sums[batch.extra["chosen"]].sum(), simpo])


def kto_labels(dataset: PreparedDataset) -> np.ndarray:
    """1 desirable / 0 undesirable per sample (pairs count as a desirable and an undesirable row)."""
    if dataset.kind == "preference":
        return np.asarray(dataset.chosen).astype(np.int8)
    return np.asarray(dataset.kto_label)


def kto_weights(labels: np.ndarray, desirable: float | None, undesirable: float | None) -> tuple[float, float]:
    """Class weights with desirable_weight x n_desirable = undesirable_weight x n_undesirable.

    The KTO paper asks for that product ratio to lie in [1, 4/3]; unset weights are chosen
    at ratio 1 and, when both are unset, with a mean weight of 1 per row (the loss keeps its scale).
    """
    n_d = int((labels == 1).sum())
    n_u = int((labels == 0).sum())
    if n_d == 0 or n_u == 0:
        return desirable or 1.0, undesirable or 1.0
    if desirable is None and undesirable is None:
        return (n_d + n_u) / (2 * n_d), (n_d + n_u) / (2 * n_u)
    if desirable is None:
        assert undesirable is not None
        return undesirable * n_u / n_d, undesirable
    if undesirable is None:
        return desirable, desirable * n_d / n_u
    ratio = desirable * n_d / (undesirable * n_u)
    if not 1.0 <= ratio <= 4 / 3:
        log.warning(
            "kto weights give desirable_weight x %d / (undesirable_weight x %d) = %.2f; the KTO paper recommends "
            "[1, 1.33]",
            n_d,
            n_u,
            ratio,
        )
    return desirable, undesirable


class KtoObjective:
    """KTO against the base model (adapter off); the reference point is the batch's mismatched-pair KL."""

    name = "kto"

    def __init__(self, dataset: PreparedDataset, beta: float, weights: tuple[float, float], policy: Policy) -> None:
        self.labels = kto_labels(dataset)
        self.beta = beta
        self.desirable_weight, self.undesirable_weight = weights
        self.policy = policy
        self._warned_single = False

    def device_batch(self, batch: Batch, device: torch.device) -> DeviceBatch:
        """The batch as it is, with each sample's label."""
        device_batch = DeviceBatch.from_batch(batch, device)
        device_batch.extra["desirable"] = to_device(self.labels[batch.sample_index] == 1, torch.bool, device)
        return device_batch

    def normaliser(self, batch: Batch) -> int:
        """Rows."""
        return len(batch.cu_seqlens) - 1

    @torch.no_grad()
    def reference_logps(self, lm_head: LMHead, batch: DeviceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference logp of each row [n], KL estimate): one reference pass over rows and KL rows, one policy pass."""
        if batch.num_samples == 1 and not self._warned_single:
            log.warning("a KTO micro-batch holds a single row: its KL estimate is that row's own reward")
            self._warned_single = True
        device = batch.input_ids.device
        kl_host = mismatched_batch(batch.batch)
        both = DeviceBatch.from_batch(concat_batches(batch.batch, kl_host), device)
        assert self.policy.reference is not None
        with self.policy.reference():
            ref = sequence_logprobs(self.policy.forward(both), lm_head, both)[0]
        kl_batch = DeviceBatch.from_batch(kl_host, device)
        kl_policy = sequence_logprobs(self.policy.forward(kl_batch), lm_head, kl_batch)[0]
        n = batch.num_samples
        return ref[:n], (kl_policy - ref[n:]).mean().clamp(min=0)

    def loss_sum(self, hidden: torch.Tensor, lm_head: LMHead, batch: DeviceBatch) -> torch.Tensor:
        """Summed weighted KTO loss of the rows."""
        logps = sequence_logprobs(hidden, lm_head, batch)[0]
        ref, kl = self.reference_logps(lm_head, batch)
        ratio = logps - ref
        desirable = batch.extra["desirable"]
        losses = torch.where(
            desirable,
            self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - kl))),
            self.undesirable_weight * (1 - torch.sigmoid(self.beta * (kl - ratio))),
        )
        return losses.sum()


def preference_objective(config: TrainConfig, dataset: PreparedDataset, policy: Policy | None) -> Any:
    """The ORPO / SimPO / KTO objective of `config` on `dataset`."""
    method = config.method
    check_data_kind(dataset.kind, method)
    if method == "orpo":
        return OrpoObjective(dataset, config.orpo_beta, config.shared_prompt, config.orpo_prompt_loss)
    if method == "simpo":
        return SimpoObjective(dataset, config.simpo_beta, config.simpo_gamma, config.shared_prompt, config.simpo_alpha)
    if policy is None or policy.reference is None:
        raise ValueError("KTO needs the policy model with an adapter to switch off")
    labels = kto_labels(dataset)
    weights = kto_weights(labels, config.kto_desirable_weight, config.kto_undesirable_weight)
    log.info(
        "kto: %d desirable, %d undesirable rows; weights %.3f / %.3f",
        int((labels == 1).sum()),
        int((labels == 0).sum()),
        *weights,
    )
    return KtoObjective(dataset, config.kto_beta, weights, policy)
