"""Dataset preparation: backpropagate's data engine vs TRL's SFTTrainer, same data, same run.

TRL's side is what `SFTTrainer(...)` does before training (the logic of
shared/bench/trl_prep_baseline.py): `datasets` map with the chat template and the
tokenizer, then TRL's best-fit-decreasing packing. Ours is `backpropagate.data.prepare`
(read, detect, template, tokenize, assistant mask, pack) with the cache off. Each side runs
in its own process, so peak RSS is its own; both get the same number of cores. Packing is
also timed alone on the same token lengths: our `pack_bfd` against TRL's `pack_dataset`.

Usage:
    python benches/prep_vs_trl.py [--rows 20000] [--max-len 2048] [--cores 2]
        [--tokenizer ../shared/tokenizers/llama-3.2-3b-instruct] [--corpus FILE] [--out result.json]

The corpus comes from shared/bench/make_corpus.py (seed 0) unless --corpus is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BACKPROPAGATE_SHARED", REPO.parent / "shared"))


def peak_rss_gb() -> float:
    """Peak RSS of this process and its finished children (TRL's map workers), in GB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 2**20, 2)


def side_ours(args: argparse.Namespace) -> dict:
    from backpropagate.data import DataConfig, prepare

    config = DataConfig(max_seq_length=args.max_len, cache=False)
    start = time.perf_counter()
    ds = prepare(args.corpus, args.tokenizer, config)
    seconds = time.perf_counter() - start
    return {
        "tool": "backpropagate",
        "prep_s": seconds,
        "rows": ds.stats["rows_read"],
        "tokens": ds.num_tokens,
        "packed_rows": ds.num_rows,
        "label_tokens": ds.stats["label_tokens"],
        "max_rss_gb": peak_rss_gb(),
    }


def side_trl(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Preprocessing cost does not depend on the model; a tiny one with the right vocabulary will do.
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=len(tok),
        )
    )
    ds = datasets.load_dataset("json", data_files=str(args.corpus), split="train")
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        cfg = SFTConfig(
            output_dir=out,
            packing=True,
            packing_strategy="bfd",
            max_length=args.max_len,
            dataset_num_proc=args.cores if args.cores > 1 else None,
            assistant_only_loss=False,
            report_to=[],
            use_cpu=True,
            bf16=False,
        )
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
        seconds = time.perf_counter() - start
    packed = trainer.train_dataset
    return {
        "tool": "trl.SFTTrainer",
        "prep_s": seconds,
        "rows": len(ds),
        "tokens": sum(len(x) for x in packed["input_ids"]),
        "packed_rows": len(packed),
        "max_rss_gb": peak_rss_gb(),
    }


def side_pack(args: argparse.Namespace) -> dict:
    """Packing alone, on the token lengths of the prepared corpus."""
    import datasets
    import numpy as np
    from trl.data_utils import pack_dataset

    from backpropagate import _core
    from backpropagate.data import DataConfig, prepare

    datasets.disable_progress_bars()
    ds = prepare(args.corpus, args.tokenizer, DataConfig(max_seq_length=args.max_len, cache=False, pack=False))
    lengths = np.diff(ds.sample_offsets).tolist()
    samples = [ds.input_ids[a:b].tolist() for a, b in zip(ds.sample_offsets[:-1], ds.sample_offsets[1:], strict=True)]
    table = datasets.Dataset.from_dict({"input_ids": samples})

    start = time.perf_counter()
    offsets, _ = _core.pack_bfd(lengths, args.max_len)
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    packed = pack_dataset(table, args.max_len, strategy="bfd")
    trl_s = time.perf_counter() - start
    return {
        "samples": len(lengths),
        "ours_s": ours_s,
        "ours_rows": len(offsets) - 1,
        "trl_s": trl_s,
        "trl_rows": len(packed),
    }


def run_side(side: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.cores), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    # Limit both sides to the same cores.
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[: args.cores])
    cmd = ["taskset", "-c", cpus, sys.executable, __file__, "--side", side]
    cmd += ["--corpus", str(args.corpus), "--tokenizer", str(args.tokenizer)]
    cmd += ["--max-len", str(args.max_len), "--cores", str(args.cores)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} side failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_corpus(rows: int, folder: Path) -> Path:
    script = SHARED / "bench" / "make_corpus.py"
    if not script.exists():
        raise SystemExit(f"{script} not found: pass --corpus or set BACKPROPAGATE_SHARED")
    path = folder / f"corpus-{rows}.jsonl"
    subprocess.run([sys.executable, str(script), str(path), str(rows), "0"], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "llama-3.2-3b-instruct")
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--side", choices=["ours", "trl", "pack"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = {"ours": side_ours, "trl": side_trl, "pack": side_pack}[args.side](args)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.corpus is None:
            args.corpus = make_corpus(args.rows, Path(tmp))
        ours = run_side("ours", args)
        trl = run_side("trl", args)
        pack = run_side("pack", args)

    rows = [ours, trl]
    print(
        f"corpus: {ours['rows']} conversations, tokenizer {args.tokenizer.name}, max_len {args.max_len}, {args.cores} cores"
    )
    print(f"{'tool':<16}{'prep s':>9}{'rows/s':>10}{'tokens/s':>12}{'packed rows':>13}{'peak RSS GB':>13}")
    for r in rows:
        print(
            f"{r['tool']:<16}{r['prep_s']:>9.2f}{r['rows'] / r['prep_s']:>10.0f}{r['tokens'] / r['prep_s']:>12.0f}"
            f"{r['packed_rows']:>13}{r['max_rss_gb']:>13.2f}"
        )
    speedup = trl["prep_s"] / ours["prep_s"]
    pack_speedup = pack["trl_s"] / pack["ours_s"]
    print(f"end to end: ours {speedup:.1f}x faster, {trl['max_rss_gb'] / ours['max_rss_gb']:.1f}x less peak memory")
    print(
        f"packing alone ({pack['samples']} samples): ours {pack['samples'] / pack['ours_s']:.0f} samples/s "
        f"({pack['ours_rows']} rows), TRL {pack['samples'] / pack['trl_s']:.0f} samples/s ({pack['trl_rows']} rows): "
        f"{pack_speedup:.0f}x"
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {"ours": ours, "trl": trl, "pack": pack, "speedup": speedup, "pack_speedup": pack_speedup}, indent=2
            )
        )


if __name__ == "__main__":
    main()
