"""`estimate-memory` against the peak a real training step allocates, and what is live at that peak.

For each mode (qlora, lora), activation offload (on, off) and length, a fresh process trains
two steps of the real loop (`max_context_gpu.trial_ours`: Llama 3.1 8B's shape with random
weights, rank 32 on every linear layer, one row, every layer recomputed) and reports
`torch.cuda.max_memory_allocated` next to the estimate less its allocator margin. With
`--sites` a second child trains the same steps while recording the allocator's history
(`torch.cuda.memory._record_memory_history`), replays it to the moment of the peak, and lists
the memory live then by the source line that allocated it: the evidence for each term of the
estimate. The peak is never taken from that run: on an H100 with the device image's PyTorch,
every such run failed inside a custom autograd Function ("returned NULL without setting an
exception") during the first step, so its sites may stop short of the step's peak
(`sites_error` says so).

Each trial is appended as a JSON line to benches/results/memory_estimate_<card>.jsonl (and to $OUT/).

  PYTHONPATH=$PWD/python:/tmp/site python benches/memory_estimate_gpu.py --lengths 16384,65536 --sites
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from max_context_gpu import (  # noqa: E402
    LORA_R,
    RESULT,
    ROOT,
    card_name,
    emit,
    estimate_allocated,
    run_child,
    trial_ours,
)


def frame_site(frames: list[dict[str, Any]]) -> str:
    """The innermost frame outside PyTorch's own package, as `file.py:line function` (frames run innermost first)."""
    for frame in frames:
        name = frame.get("filename", "")
        if "/torch/" in name and "/backpropagate/" not in name:
            continue
        return f"{Path(name).name}:{frame.get('line')} {frame.get('name')}"
    return "(PyTorch internals)"


def live_at_peak(events: list[dict[str, Any]]) -> tuple[int, str, list[tuple[str, int, int]]]:
    """Replays allocator events to their peak; blocks allocated before the history started are not counted.

    Returns:
        The bytes live at the peak, the site of the allocation that reached it, and the live
        blocks then by site (bytes, count), largest first.
    """

    def replay(stop: int, with_sites: bool) -> tuple[dict[int, tuple[int, str]], int, int]:
        """The live blocks after `stop` events, and the peak and the event that reached it on the way."""
        live: dict[int, tuple[int, str]] = {}
        total = peak = peak_at = 0
        for i, event in enumerate(events[:stop]):
            action, addr, size = event["action"], event["addr"], event["size"]
            if action == "alloc":
                live[addr] = (size, frame_site(event.get("frames", [])) if with_sites else "")
                total += size
                if total > peak:
                    peak, peak_at = total, i
            elif action == "free_completed" and addr in live:
                total -= live.pop(addr)[0]
        return live, peak, peak_at

    _, peak, peak_at = replay(len(events), with_sites=False)  # sizes only: where the peak is
    at_peak, _, _ = replay(peak_at + 1, with_sites=True)  # again up to it, with each block's site
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for size, site in at_peak.values():
        sites[site][0] += size
        sites[site][1] += 1
    peak_site = at_peak[events[peak_at]["addr"]][1] if peak else ""
    return peak, peak_site, sorted(((s, b, n) for s, (b, n) in sites.items()), key=lambda x: -x[1])


def estimated(mode: str, length: int, offload: bool) -> dict[str, Any]:
    """The estimate for the trial's setting, by part in GiB, and its total less the allocator margin."""
    parts = estimate_allocated("llama8b", length, mode, offload)
    return {
        "estimate_gib": round(sum(parts.values()) / 2**30, 2),
        "estimate_parts": {part: round(size / 2**30, 3) for part, size in parts.items()},
    }


def trial_main(args: argparse.Namespace) -> int:
    """Child process: one trial, its outcome as the last stdout line."""
    import torch

    device = torch.device("cuda", 0)
    if args.sites:
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    outcome: dict[str, Any] = {"ok": True}
    try:
        outcome.update(trial_ours("llama8b", args.length, 1, device, args.mode, "on", args.offload))
    except Exception as exc:  # reported, not raised: the parent records it and goes on
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    outcome["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    if args.sites:
        events = torch.cuda.memory._snapshot()["device_traces"][0]
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, peak_site, sites = live_at_peak(events)
        outcome["replayed_peak_gib"] = round(peak / 2**30, 2)
        outcome["peak_at"] = peak_site
        outcome["sites"] = [(s, round(b / 2**30, 3), n) for s, b, n in sites[: args.sites]]
    print(RESULT + json.dumps(outcome), flush=True)
    return 0


def run_trial(args: argparse.Namespace, mode: str, offload: str, length: int) -> dict[str, Any]:
    """The peak of a plain run; with `--sites`, what a second, recorded run had live at its own peak."""
    command = [sys.executable, str(Path(__file__).resolve()), "--trial", "--mode", mode, "--offload", offload]
    command += ["--length", str(length)]
    record = {"mode": mode, "offload": offload == "on", "length": length, "lora_r": LORA_R}
    record |= run_child([*command, "--sites", "0"], args.trial_timeout_s)
    if args.sites:
        recorded = run_child([*command, "--sites", str(args.sites)], args.trial_timeout_s)
        record |= {key: recorded[key] for key in ("replayed_peak_gib", "peak_at", "sites") if key in recorded}
        if not recorded["ok"]:
            record["sites_error"] = recorded.get("error", "")
    return record | estimated(mode, length, offload == "on")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="qlora,lora")
    p.add_argument("--offloads", default="on,off")
    p.add_argument("--lengths", default="16384,65536", help="Tokens per step, comma-separated.")
    p.add_argument("--sites", type=int, default=0, help="List this many allocation sites live at the peak (0: none).")
    p.add_argument("--trial-timeout-s", type=float, default=240.0)
    p.add_argument("--results-dir", default=str(ROOT / "benches" / "results"))
    p.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="qlora", help=argparse.SUPPRESS)
    p.add_argument("--offload", default="on", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=16384, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.append(str(ROOT / "python"))
    if args.trial:
        return trial_main(args)
    card = card_name()
    print(f"{'mode':<6} {'offload':<8} {'tokens':>8} {'peak GiB':>9} {'est GiB':>8} {'err':>6}", flush=True)
    for mode in args.modes.split(","):
        for offload in args.offloads.split(","):
            for length in (int(n) for n in args.lengths.split(",")):
                record = run_trial(args, mode, offload, length)
                emit({**record, "card": card}, args, card, "memory_estimate")
                peak, est = record.get("peak_gib"), record["estimate_gib"]
                err = f"{(est - peak) / peak:+.0%}" if record["ok"] and peak else record.get("error", "")[:80]
                print(f"{mode:<6} {offload:<8} {length:>8} {peak or '-':>9} {est:>8} {err:>6}", flush=True)
                if record.get("peak_at"):
                    print(f"    peak reached at {record['peak_at']} ({record['replayed_peak_gib']} GiB replayed)")
                if record.get("sites_error"):
                    print(f"    the recorded run stopped early: {record['sites_error'][:100]}")
                for site, gib, count in record.get("sites", []):
                    print(f"    {gib:>8.3f} GiB {count:>5}x  {site}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
