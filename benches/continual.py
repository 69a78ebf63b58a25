"""Does SLAO forget less than plain sequential training? Two clearly different tasks in a row.

The two tasks are the two kinds of question of the example chat data
(`python/backpropagate/examples/chat.jsonl`), each with its own answer format:

* task 1, arithmetic: "What is 4 times 3?" (system: "You are a careful calculator.")
  answered by a sentence, as the example data does: "4 times 3 is 12.";
* task 2, capitals: "What is the capital of Peru?" answered by a JSON object:
  `{"country": "Peru", "capital": "Lima"}`.

Other questions, other answers and another format: training task 2 alone pulls the
model's answers towards JSON, which costs task 1, unless the method protects it. Every
question occurs once, so a task's held-out rows (the multi-run's own `holdout` share) are
never among its training rows; the bench checks this. For each method the held-out loss
on each task is measured after the last run:

* slao: `Trainer.multi_run(..., merge_mode="slao")` (the default),
* simple: the same runs with `merge_mode="simple"` (plain sequential training of one adapter),
* joint: one run on both tasks' training rows together, as many steps as both runs (the
  usual upper bound; it needs every task's data at once).

slao and simple share every setting (rank, steps per run, learning rate, no learning-rate
decay, replay). Forgetting = task 1's held-out loss after the last run minus after run 1
(run 1 is the same for both). Goal: slao's forgetting at most half of simple's, with its
task-2 loss within 5% of simple's. `--replay 0.2` repeats slao and simple with that share of
task-1 rows replayed in run 2. Appends one line to benches/results/continual.jsonl.

    OMP_NUM_THREADS=1 python benches/continual.py --steps 12 --rows 60 --replay 0.2   # smollm2-135m on the CPU
    python benches/continual.py --model tiny-llama --steps 40 --rows 60 --learning-rate 2e-3 --replay 0.2

On a CPU shared with other jobs, set OMP_NUM_THREADS=1: torch's threads spin against the
other processes' and a step took 10x longer here without it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "continual.jsonl"
CAPITALS = {
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Austria": "Vienna", "Belgium": "Brussels",
    "Bolivia": "Sucre", "Brazil": "Brasilia", "Bulgaria": "Sofia", "Canada": "Ottawa", "Chile": "Santiago",
    "China": "Beijing", "Colombia": "Bogota", "Croatia": "Zagreb", "Cuba": "Havana", "Cyprus": "Nicosia",
    "Czechia": "Prague", "Denmark": "Copenhagen", "Ecuador": "Quito", "Egypt": "Cairo", "Estonia": "Tallinn",
    "Ethiopia": "Addis Ababa", "Finland": "Helsinki", "France": "Paris", "Germany": "Berlin", "Ghana": "Accra",
    "Greece": "Athens", "Hungary": "Budapest", "Iceland": "Reykjavik", "India": "New Delhi",
    "Indonesia": "Jakarta", "Iran": "Tehran", "Iraq": "Baghdad", "Ireland": "Dublin", "Israel": "Jerusalem",
    "Italy": "Rome", "Jamaica": "Kingston", "Japan": "Tokyo", "Jordan": "Amman", "Kenya": "Nairobi",
    "Latvia": "Riga", "Lebanon": "Beirut", "Lithuania": "Vilnius", "Malaysia": "Kuala Lumpur",
    "Mexico": "Mexico City", "Mongolia": "Ulaanbaatar", "Morocco": "Rabat", "Nepal": "Kathmandu",
    "Netherlands": "Amsterdam", "New Zealand": "Wellington", "Nigeria": "Abuja", "Norway": "Oslo",
    "Pakistan": "Islamabad", "Peru": "Lima", "Philippines": "Manila", "Poland": "Warsaw",
    "Portugal": "Lisbon", "Qatar": "Doha", "Romania": "Bucharest", "Russia": "Moscow", "Senegal": "Dakar",
    "Serbia": "Belgrade", "Singapore": "Singapore", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "South Korea": "Seoul", "Spain": "Madrid", "Sweden": "Stockholm", "Switzerland": "Bern",
    "Syria": "Damascus", "Thailand": "Bangkok", "Tunisia": "Tunis", "Turkey": "Ankara", "Uganda": "Kampala",
    "Ukraine": "Kyiv", "United Kingdom": "London", "Uruguay": "Montevideo", "Venezuela": "Caracas",
    "Vietnam": "Hanoi", "Zambia": "Lusaka", "Zimbabwe": "Harare",
}  # fmt: skip


def chat(user: str, answer: str, system: str | None = None) -> dict[str, Any]:
    """One chat row in the example data's `messages` layout."""
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def arithmetic_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Task 1: distinct arithmetic questions answered by a sentence, as in the example data."""
    rng = random.Random(seed)
    questions: dict[tuple[int, str, int], int] = {}
    while len(questions) < count:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        op, value = rng.choice([("plus", a + b), ("times", a * b), ("minus", a - b)])
        questions.setdefault((a, op, b), value)
    system = "You are a careful calculator."
    return [chat(f"What is {a} {op} {b}?", f"{a} {op} {b} is {v}.", system) for (a, op, b), v in questions.items()]


def capital_rows(count: int, seed: int) -> list[dict[str, Any]]:
    """Task 2: distinct capital questions answered by a JSON object."""
    if count > len(CAPITALS):
        raise SystemExit(f"--rows {count}: the capitals task has {len(CAPITALS)} distinct questions")
    countries = random.Random(seed).sample(sorted(CAPITALS), count)
    return [chat(f"What is the capital of {c}?", json.dumps({"country": c, "capital": CAPITALS[c]})) for c in countries]


def check_disjoint(out: Path, plan: dict[str, Any]) -> None:
    """Stops if a task's held-out question is also among the training rows of any run."""
    trained = {
        json.dumps(json.loads(line)["messages"][:-1])
        for run in plan["runs"]
        for line in (out / run["train_data"]).read_text().splitlines()
    }
    for run in plan["runs"]:
        held = [
            json.dumps(json.loads(line)["messages"][:-1])
            for line in (out / run["heldout_data"]).read_text().splitlines()
        ]
        if trained.intersection(held):
            raise SystemExit(f"{run['heldout_data']}: held-out questions also occur in the training rows")


def sequence(
    model: str, options: dict[str, Any], files: list[str | Path], out: Path, steps: int, **multi: Any
) -> dict[str, float]:
    """Task 1's held-out loss after run 1 and after the last run, and task 2's after the last run."""
    from backpropagate.trainer import Trainer

    result = Trainer(model, **options, output_dir=str(out)).multi_run(files, steps=steps, **multi)
    check_disjoint(out, json.loads((out / "multi_run.json").read_text()))
    first, last = result.runs[0]["heldout_losses"], result.runs[-1]["heldout_losses"]
    return {"task1_after_run1": first["run-01"], "task1_final": last["run-01"], "task2_final": last["run-02"]}


def joint(model: str, options: dict[str, Any], work: Path, reference: Path, steps: int) -> dict[str, float]:
    """Held-out losses of one run on both tasks' training rows (the multi-run `reference`'s rows and held-out sets)."""
    from backpropagate.config import resolve_settings
    from backpropagate.continual.runner import heldout_losses
    from backpropagate.model_source import resolve_model
    from backpropagate.trainer import Trainer

    plan = json.loads((reference / "multi_run.json").read_text())
    data = work / "joint.train.jsonl"
    data.write_text("".join((reference / r["train_data"]).read_text() for r in plan["runs"]))
    trained = Trainer(model, **options, output_dir=str(work / "joint")).train(data, steps=steps * len(plan["runs"]))
    settings = resolve_settings(model, options)
    losses = heldout_losses(
        resolve_model(settings.preset.model_id if settings.preset else model),
        settings.train,
        settings.data,
        trained.adapter_dir / "adapter_model.safetensors",
        [reference / r["heldout_data"] for r in plan["runs"]],
    )
    return {"task1_final": losses[0], "task2_final": losses[1]}


def verdict(slao: dict[str, float], simple: dict[str, float]) -> dict[str, Any]:
    """Forgetting of both methods and whether slao meets the goal against simple."""
    forget = {m: r["task1_final"] - r["task1_after_run1"] for m, r in (("slao", slao), ("simple", simple))}
    return {
        "forgetting_task1": forget,
        "forgetting_ratio": forget["slao"] / forget["simple"] if forget["simple"] > 0 else None,
        "task2_ratio": slao["task2_final"] / simple["task2_final"],
        "goal": {
            "forgetting_at_most_half": forget["slao"] <= 0.5 * forget["simple"],
            "task2_within_5pct": slao["task2_final"] <= 1.05 * simple["task2_final"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=60, help="rows per task (a share --holdout of them held out)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per task")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument(
        "--seed", type=int, default=42, help="training seed (LoRA init, row order); the tasks stay fixed"
    )
    parser.add_argument("--replay", type=float, default=0.0, help="also run slao and simple with this replay share")
    parser.add_argument("--max-seq-length", type=int, default=128, help="packed row length; 2 rows per step")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-continual"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSONL file the result line is appended to")
    args = parser.parse_args()

    options = {
        "lora_r": args.lora_r,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "max_seq_length": args.max_seq_length,
        "micro_batch": 2,
        "grad_accumulation": 1,
        "schedule": "constant",
        "warmup_steps": 0,
        "progress": False,
        "overwrite": True,
    }
    args.work.mkdir(parents=True, exist_ok=True)
    files: list[str | Path] = []
    for name, rows in (("arithmetic", arithmetic_rows(args.rows, 0)), ("capitals", capital_rows(args.rows, 1))):
        path = args.work / f"task-{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files.append(path)

    started = time.perf_counter()
    multi = {"holdout": args.holdout}
    results: dict[str, Any] = {
        m: sequence(args.model, options, files, args.work / m, args.steps, merge_mode=m, **multi)
        for m in ("slao", "simple")
    }
    results["joint"] = joint(args.model, options, args.work, args.work / "slao", args.steps)
    line: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": "cpu",
        "model": args.model,
        "tasks": ["arithmetic (sentence answers)", "capitals (JSON answers)"],
        "rows_per_task": args.rows,
        "holdout": args.holdout,
        "steps_per_task": args.steps,
        "options": options,
        "heldout_loss": results,
        **verdict(results["slao"], results["simple"]),
    }
    if args.replay:
        replayed = {
            m: sequence(
                args.model,
                options,
                files,
                args.work / f"{m}-replay",
                args.steps,
                merge_mode=m,
                replay=args.replay,
                **multi,
            )
            for m in ("slao", "simple")
        }
        line["replay"] = {
            "share": args.replay,
            "heldout_loss": replayed,
            **verdict(replayed["slao"], replayed["simple"]),
        }
    line["wall_s"] = round(time.perf_counter() - started, 1)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(json.dumps(line, indent=2))


if __name__ == "__main__":
    main()
