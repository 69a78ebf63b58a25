"""`evaluate`: did a run make the model better? Held-out loss, perplexity and scored sample answers.

    report = evaluate("a1b2c3", data="heldout.jsonl", prompts="prompts.jsonl")

The target is a recorded run (id or unique prefix), an adapter folder, a full model folder
or a base model (the natural point of comparison). Held-out data goes through the same data
engine as training (template, masking) and the same loss code as the training loop's own
evaluation. Each evaluation is recorded in the run history as an `eval` run whose parent is
the evaluated run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backpropagate.data import DataConfig
from backpropagate.errors import ConfigError
from backpropagate.evaluate.generations import Sample, generate_samples, mean_scores, read_prompts
from backpropagate.evaluate.target import EvalTarget, resolve_target
from backpropagate.settings import at_least, check_value

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class EvalReport:
    """What one evaluation measured.

    Attributes:
        target: What was evaluated, as named.
        eval_run_id: Id of this evaluation's record in the run history.
        evaluated_run_id: The training run behind the target, when known.
        loss: Mean next-token loss on the held-out target tokens (None without data).
        perplexity: exp(loss).
        tokens: Held-out target tokens the loss averages over.
        scores: Mean exact_match / contains / token_f1 over prompts with a reference.
        samples: Each prompt's answer, reference and scores.
    """

    target: str
    eval_run_id: str
    evaluated_run_id: str | None
    loss: float | None = None
    perplexity: float | None = None
    tokens: int | None = None
    scores: dict[str, float] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """The numbers of the report (what the history stores and tables show)."""
        values = {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, **self.scores}
        return {k: v for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        """The report as `--json` prints it."""
        return {**asdict(self), "metrics": self.metrics()}


def data_config_for(target: EvalTarget) -> DataConfig:
    """The data settings the target's run trained with (template and masking as in training), else the defaults."""
    known = {f for f in DataConfig.__dataclass_fields__ if f != "cache"}
    return DataConfig(**{k: v for k, v in target.data_config.items() if k in known})


def evaluate(
    target: str | Path,
    data: str | Path | None = None,
    prompts: str | Path | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str = "auto",
    data_config: DataConfig | None = None,
) -> EvalReport:
    """Evaluates `target` on held-out `data` (loss, perplexity) and/or `prompts` (scored answers).

    Args:
        target: Run id (or unique prefix), adapter folder, full model folder, or base model name.
        data: Held-out JSONL / JSON / Parquet file of SFT rows.
        prompts: JSONL of {"prompt"} or {"messages"} rows, with optional "reference".
        max_new_tokens: Longest generated answer.
        device: auto, cpu, cuda or cuda:N.
        data_config: Data settings for `data` (default: those the target's run trained with);
            pass the same one to compare several targets on exactly the same tokens.
    """
    from backpropagate.evaluate.loss import held_out_loss
    from backpropagate.evaluate.model import load_for_eval
    from backpropagate.log import new_run_id
    from backpropagate.runs.record import RunRecording

    if data is None and prompts is None:
        raise ConfigError("CONFIG_INVALID_SETTING", "evaluate needs held-out data (--data) or prompts (--prompts)")
    check_value("max_new_tokens", max_new_tokens, at_least(1))
    resolved = resolve_target(target)
    cases = read_prompts(Path(prompts)) if prompts is not None else []
    config = data_config or data_config_for(resolved)
    settings = {"target": str(target), "prompts": str(prompts) if prompts else None, "max_new_tokens": max_new_tokens}
    with RunRecording("eval", parent_run_id=resolved.run_id) as recording:
        report = EvalReport(str(target), new_run_id(), resolved.run_id)
        recording.start(
            report.eval_run_id,
            model=resolved.base_model,
            config={**settings, "data_config": asdict(config)},
            data=str(data) if data is not None else None,
        )
        tm = load_for_eval(resolved, device)
        if data is not None:
            held_out = held_out_loss(tm, Path(data), resolved.tokenizer_dir, config)
            report.loss, report.perplexity, report.tokens = held_out.loss, held_out.perplexity, held_out.tokens
        if cases:
            report.samples = generate_samples(tm, resolved.tokenizer_dir, cases, max_new_tokens)
            report.scores = mean_scores(report.samples)
        recording.complete(report.metrics(), {})
    return report


__all__ = ["EvalReport", "evaluate"]
