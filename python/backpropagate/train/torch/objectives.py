"""Which objective a run optimises: next-token cross-entropy for SFT, a preference loss otherwise.

It sits above `losses` (the shared log-probability pieces and the SFT objective) and
`preference` (the pair and KTO objectives built from those pieces), so neither of the two
needs to import the other's caller.
"""

from __future__ import annotations

from backpropagate.config import TrainConfig
from backpropagate.data.dataset import PreparedDataset
from backpropagate.train.torch.losses import Objective, SftObjective
from backpropagate.train.torch.preference import Policy, preference_objective


def objective_for(config: TrainConfig, dataset: PreparedDataset, policy: Policy | None = None) -> Objective:
    """The objective of `config.method` on `dataset` (KTO also needs the `policy` to run its reference passes)."""
    if config.method == "sft":
        return SftObjective()
    objective: Objective = preference_objective(config, dataset, policy)
    return objective
