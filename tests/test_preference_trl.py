"""ORPO, SimPO and KTO losses equal TRL's on the same model, adapter weights and batch.

TRL computes its loss through its own code path: its collator builds the padded batch
from the same token ids, and its trainer's loss function runs its own forward. Our side
runs the real loop's pieces: packed padding-free micro-batch, the objective's layout
(one prompt per pair), chunked log-probabilities.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from backpropagate.config import TrainConfig
from backpropagate.data import DataConfig, prepare
from backpropagate.examples import example_path
from backpropagate.train.torch.attention import packed_attention
from backpropagate.train.torch.loading import load_for_training
from backpropagate.train.torch.loop import forward_hidden, policy_of
from backpropagate.train.torch.losses import normalised_loss, step_totals
from backpropagate.train.torch.objectives import objective_for
from backpropagate.train.torch.preference import kto_labels, kto_weights, pairs_of, split_prompt

LORA = dict(
    lora_r=8,
    lora_alpha=16.0,
    lora_dropout=0.0,
    target_modules="all-linear",
    device="cpu",
    mode="lora",
    precision="fp32",
)


def our_model(model_dir, config: TrainConfig, seed: int = 1):
    """The real loading path, with a random (non-zero) adapter so the adapter matters."""
    torch.manual_seed(0)
    tm = load_for_training(model_dir, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tm.model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return tm


def copy_adapter(source, target) -> None:
    theirs = dict(target.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, p in source.named_parameters():
            if "lora_" in name:
                theirs[name].copy_(p)
                copied += 1
    assert copied > 0


def peft_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def trl_args(cls, tmp_path, **extra):
    return cls(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        remove_unused_columns=False,
        **extra,
    )


def our_loss(tm, config, dataset, batch):
    objective = objective_for(config, dataset, policy_of(tm))
    device_batch = objective.device_batch(batch, tm.device)
    with torch.no_grad(), packed_attention(tm.model):
        hidden = forward_hidden(tm, device_batch)
        terms = objective.loss_sum(hidden, tm.lm_head, device_batch)
        return float(normalised_loss(terms, step_totals(objective, [batch])))


def micro_batch(dataset, rows):
    return dataset.batch_of(np.concatenate([dataset.row_samples(r) for r in rows]))


def pair_features(dataset, batch):
    """TRL's tokenized pair rows, built from our samples (prompt = tokens before the first answer token)."""
    chosen, rejected = pairs_of(batch, dataset)
    features = []
    for c, r in zip(chosen, rejected, strict=True):
        row = {}
        for side, s in (("chosen", c), ("rejected", r)):
            index = int(batch.sample_index[s])
            lo, hi = dataset.sample_offsets[index], dataset.sample_offsets[index + 1]
            ids, labels = dataset.input_ids[lo:hi].tolist(), dataset.labels[lo:hi].tolist()
            first = next(i for i, t in enumerate(labels) if t != -100)
            row.update(
                {
                    f"{side}_input_ids": ids,
                    f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": labels,
                    "prompt_input_ids": ids[:first],
                    "prompt_attention_mask": [1] * first,
                }
            )
        features.append(row)
    return features


def preference_rows():
    import json

    return [json.loads(line) for line in example_path("preference").read_text().splitlines()]


@pytest.fixture(scope="module")
def pairs(tiny_qwen2):
    return prepare(example_path("preference"), tiny_qwen2, DataConfig(max_seq_length=256, cache=False))


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_orpo_loss_equals_trl_orpo_trainer(tiny_qwen2, pairs, tmp_path, shared_prompt):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    config = TrainConfig(method="orpo", orpo_beta=0.25, orpo_prompt_loss=True, shared_prompt=shared_prompt, **LORA)
    tm = our_model(tiny_qwen2, config)
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    trainer = ORPOTrainer(
        model=base_model(tiny_qwen2),
        args=trl_args(ORPOConfig, tmp_path, beta=0.25, max_length=512),
        train_dataset=Dataset.from_list(preference_rows()),
        processing_class=tok,
        peft_config=peft_config(),
    )
    copy_adapter(tm.model, trainer.model)
    batch = micro_batch(pairs, [0, 1])
    theirs_batch = trainer.data_collator(pair_features(pairs, batch))
    with torch.no_grad():
        theirs, metrics = trainer.get_batch_loss_metrics(trainer.model, theirs_batch)
    ours = our_loss(tm, config, pairs, batch)
    assert ours == pytest.approx(float(theirs), rel=1e-4, abs=1e-5)
    # Answers-only NLL (the default) changes the NLL term alone; the odds-ratio term stays TRL's.
    answers_only = TrainConfig(method="orpo", orpo_beta=0.25, **LORA)
    chosen_only = pairs.batch_of(batch.sample_index[pairs_of(batch, pairs)[0]])
    nll_answers = our_loss(tm, TrainConfig(**LORA), pairs, chosen_only)
    expected = nll_answers + float(theirs) - metrics["nll_loss"]
    assert our_loss(tm, answers_only, pairs, batch) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_simpo_loss_equals_trl_cpo_trainer_simpo(tiny_qwen2, pairs, tmp_path, alpha):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    config = TrainConfig(method="simpo", simpo_beta=2.0, simpo_gamma=0.7, simpo_alpha=alpha, **LORA)
    tm = our_model(tiny_qwen2, config)
    trainer = CPOTrainer(
        model=base_model(tiny_qwen2),
        args=trl_args(
            CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=alpha, beta=2.0, simpo_gamma=0.7, max_length=512
        ),
        train_dataset=Dataset.from_list(preference_rows()),
        processing_class=AutoTokenizer.from_pretrained(tiny_qwen2),
        peft_config=peft_config(),
    )
    copy_adapter(tm.model, trainer.model)
    batch = micro_batch(pairs, [0, 2])
    with torch.no_grad():
        theirs, _ = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(pair_features(pairs, batch)))
    assert our_loss(tm, config, pairs, batch) == pytest.approx(float(theirs), rel=1e-4, abs=1e-5)


def kto_features(batch, labels):
    parts = split_prompt(batch)
    return [
        {
            "prompt_ids": prompt.tolist(),
            "completion_ids": answer.tolist(),
            # TRL's mismatched pairs: prompt i with the completion of row i - 1.
            "KL_completion_ids": parts[i - 1][1].tolist(),
            "label": bool(labels[i]),
        }
        for i, (prompt, answer, _) in enumerate(parts)
    ]


@pytest.mark.parametrize(
    ("data", "seed", "kl_positive"), [("kto", 2, True), ("kto", 1, False), ("preference", 2, None)]
)
def test_kto_loss_equals_trl_kto_trainer(tiny_llama, tmp_path, data, seed, kl_positive):
    import json

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    dataset = prepare(example_path(data), tiny_llama, DataConfig(max_seq_length=256, cache=False))
    labels = kto_labels(dataset)
    weights = kto_weights(labels, None, None)
    config = TrainConfig(method="kto", kto_beta=0.5, **LORA)
    tm = our_model(tiny_llama, config, seed)
    batch = micro_batch(dataset, [0])
    rows = [json.loads(line) for line in example_path("kto").read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(
            model=base_model(tiny_llama),
            args=trl_args(
                KTOConfig,
                tmp_path,
                beta=0.5,
                desirable_weight=weights[0],
                undesirable_weight=weights[1],
                per_device_train_batch_size=4,
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(tiny_llama),
            peft_config=peft_config(),
        )
    copy_adapter(tm.model, trainer.model)
    theirs_batch = trainer.data_collator(kto_features(batch, labels[batch.sample_index]))
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, theirs_batch)
    ours = our_loss(tm, config, dataset, batch)
    assert ours == pytest.approx(float(theirs), rel=1e-4, abs=1e-6)
    # The KL reference point is live in one case and clamped at 0 in the other.
    if kl_positive is not None:
        assert (trainer._metrics["train"]["kl"][-1] > 0) == kl_positive
