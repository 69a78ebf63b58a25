"""Safetensors -> GGUF: backpropagate's Rust writer against llama.cpp's own converter.

Builds a random-weight bf16 model in Qwen2.5-1.5B's shape (about 3.1 GB, sharded like the
real one) with the real Qwen2.5 tokenizer, then converts it to bf16 and f16 GGUF with both
tools in the same run, each in its own process: wall time (including the fsync that makes
the file durable: ours does it, llama.cpp's converter is given one after it exits) and peak
resident memory. Both outputs are then checked to hold identical tensor data.

    python benches/convert_vs_llamacpp.py --work /tmp/bp-bench

llama.cpp's converter comes from the llama-cpp-python sdist on PyPI (downloaded with pip
into the work folder, not part of this repository); it needs `sentencepiece` and `gguf`.

Quantized types (`--outtypes q4_k_m ...`) compare our one-step export with llama.cpp's
two-step route: its converter to bf16, then its `llama-quantize` tool (`llama_model_quantize`),
both on `--threads` threads (default: every core); the quantize step is also reported alone.
`llama-quantize` is built from the same sdist's sources into the work folder (CMake from PyPI
when none is installed, `-DGGML_NATIVE=OFF`, only that target: about 30 minutes on 2 loaded
cores, once). `--record` appends the quantized rows, the machine and its load average to
benches/results/convert_quant.jsonl. `--merged` adds a rank-16 LoRA adapter on every linear layer and compares
`backprop export --format merged` with PEFT's `merge_and_unload` + `save_pretrained`.

    python benches/convert_vs_llamacpp.py --work /tmp/bp-bench --outtypes q4_k_m --merged
    nice python benches/convert_vs_llamacpp.py --work /tmp/bp-bench --outtypes q4_k_m q8_0 --threads 2 --record
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from train_cpu import cpu_name

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BACKPROPAGATE_SHARED", REPO.parent / "shared"))
RESULTS = REPO / "benches" / "results" / "convert_quant.jsonl"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# Qwen2.5-1.5B
SHAPE = dict(hidden=1536, inter=8960, layers=28, heads=12, kv=2, vocab=151936)

MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
if rc == 0 and sys.argv[1] != "-":
    fd = __import__("os").open(sys.argv[1], __import__("os").O_RDONLY)
    __import__("os").fsync(fd)
dt = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "seconds": dt, "cpu_seconds": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024}))
"""


def build_model(out: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config

    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    s = SHAPE
    Qwen2Config(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        torch_dtype="bfloat16",
    ).save_pretrained(out)
    tok = SHARED / "tokenizers" / "qwen2.5-0.5b-instruct"
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        shutil.copy(tok / f, out / f)
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    h, kvd = s["hidden"], s["hidden"] // s["heads"] * s["kv"]
    groups: list[dict[str, torch.Tensor]] = [
        {"model.embed_tokens.weight": rnd(s["vocab"], h), "model.norm.weight": rnd(h)}
    ]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        groups.append(
            {
                p + "input_layernorm.weight": rnd(h),
                p + "post_attention_layernorm.weight": rnd(h),
                p + "self_attn.q_proj.weight": rnd(h, h),
                p + "self_attn.q_proj.bias": rnd(h),
                p + "self_attn.k_proj.weight": rnd(kvd, h),
                p + "self_attn.k_proj.bias": rnd(kvd),
                p + "self_attn.v_proj.weight": rnd(kvd, h),
                p + "self_attn.v_proj.bias": rnd(kvd),
                p + "self_attn.o_proj.weight": rnd(h, h),
                p + "mlp.gate_proj.weight": rnd(s["inter"], h),
                p + "mlp.up_proj.weight": rnd(s["inter"], h),
                p + "mlp.down_proj.weight": rnd(h, s["inter"]),
            }
        )
    shards, current, size = [], {}, 0
    for g in groups:
        current.update(g)
        size += sum(t.numel() * 2 for t in g.values())
        if size > 1 << 30:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * 2 for sh in shards for t in sh.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return out


def extract_llama_cpp(work: Path, root: Path, wanted: tuple[str, ...]) -> None:
    """Extracts the `wanted` paths of llama.cpp's sources vendored in the llama-cpp-python
    sdist (downloaded into `work` once) into `root`."""
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"), None)
    if sdist is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python"]
        subprocess.check_call([*cmd, LLAMA_CPP_PYTHON, "-d", str(work)])
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(tuple(prefix + w for w in wanted))]
        for m in members:
            m.name = m.name[len(prefix) :]
        tar.extractall(root, members=members, filter="data")


def llama_cpp_converter(work: Path) -> Path:
    root = work / "llama.cpp"
    if not (root / "convert_hf_to_gguf.py").exists():
        extract_llama_cpp(work, root, ("convert_hf_to_gguf.py", "conversion/", "gguf-py/"))
    return root


def llama_quantize_tool(work: Path) -> Path:
    """llama.cpp's `llama-quantize`, built once from the sdist's sources into `work/tools`."""
    root = work / "tools" / "llama.cpp"
    binary = root / "build" / "bin" / "llama-quantize"
    if binary.exists():
        return binary
    extract_llama_cpp(work, root, ("",))
    env = dict(os.environ)
    cmake = shutil.which("cmake")
    if cmake is None:
        target = work / "tools" / "cmake"
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "cmake"])
        cmake, env["PYTHONPATH"] = str(target / "bin" / "cmake"), str(target)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    flags += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    print(f"building llama-quantize in {root} (once; long on few cores)")
    subprocess.check_call(["nice", cmake, "-S", str(root), "-B", str(root / "build"), *flags], env=env)
    jobs = str(os.cpu_count() or 1)
    build = ["nice", cmake, "--build", str(root / "build"), "--target", "llama-quantize", "-j", jobs]
    subprocess.check_call(build, env=env)
    return binary


def measure(output: Path, argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(output), *argv], capture_output=True, text=True, env=env, check=False
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{argv[:3]} failed:\n{out.stderr[-3000:]}")
    return result


def disk_floor(folder: Path, nbytes: int, direct: bool) -> float:
    """Seconds to write and fsync `nbytes` in `folder`, through the page cache or with O_DIRECT."""
    import mmap
    import time

    block = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
    path = folder / "disk-floor.bin"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    t = time.perf_counter()
    fd = os.open(path, flags)
    try:
        for _ in range(nbytes // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t
    path.unlink()
    return dt


# output types that llama.cpp reaches with `llama-quantize` (named as it names them)
QUANTIZED = ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0", "q3_k_m", "q2_k", "iq4_nl", "iq4_xs")

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])
"""


def build_adapter(model: Path, out: Path, rank: int = 16) -> Path:
    """A PEFT LoRA adapter (random factors) on every linear layer of the bench model."""
    import torch
    from safetensors.torch import save_file

    if (out / "adapter_model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    s, gen = SHAPE, torch.Generator().manual_seed(1)
    h, kvd = s["hidden"], s["hidden"] // s["heads"] * s["kv"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kvd, h), "self_attn.v_proj": (kvd, h)}
    shapes |= {"self_attn.o_proj": (h, h), "mlp.gate_proj": (s["inter"], h), "mlp.up_proj": (s["inter"], h)}
    shapes |= {"mlp.down_proj": (h, s["inter"])}
    factors = {}
    for i in range(s["layers"]):
        for module, (rows, cols) in shapes.items():
            name = f"base_model.model.model.layers.{i}.{module}"
            factors[f"{name}.lora_A.weight"] = torch.randn(rank, cols, generator=gen) * 0.02
            factors[f"{name}.lora_B.weight"] = torch.randn(rows, rank, generator=gen) * 0.02
    save_file(factors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": str(model)}
    config |= {"target_modules": sorted({m.split(".")[-1] for m in shapes}), "task_type": "CAUSAL_LM"}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def same_safetensors(a: Path, b: Path) -> bool:
    """Both folders hold the same tensor names with identical bytes (compared one at a time)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                out.update(dict.fromkeys(st.keys(), f))
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for name in ia:
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            if not fa.get_tensor(name).equal(fb.get_tensor(name)):
                return False
    return True


def quantized_rows(
    model: Path,
    out_dir: Path,
    converter: Path,
    quantize: Path,
    env: dict[str, str],
    outtype: str,
    threads: int,
    verify: bool,
):
    """Ours in one step; llama.cpp's converter to bf16, then `llama-quantize`."""
    import xllamacpp

    ours_out, bf16_out, ref_out = (out_dir / f"{n}-{outtype}.gguf" for n in ("ours", "llamacpp-bf16", "llamacpp"))
    for p in (ours_out, bf16_out, ref_out):
        p.unlink(missing_ok=True)
    lib = xllamacpp.xllamacpp.__file__
    code = (
        f"from backpropagate import _core; "
        f"_core.convert_to_gguf({str(model)!r}, {str(ours_out)!r}, {outtype!r}, llama_cpp_lib={lib!r})"
    )
    ours = measure(ours_out, [sys.executable, "-c", code], env={**os.environ, "RAYON_NUM_THREADS": str(threads)})
    script = str(converter / "convert_hf_to_gguf.py")
    convert = measure(
        bf16_out, [sys.executable, script, str(model), "--outtype", "bf16", "--outfile", str(bf16_out)], env=env
    )
    quant = measure(ref_out, [str(quantize), str(bf16_out), str(ref_out), outtype.upper(), str(threads)])
    identical = same_tensors(ours_out, ref_out) if verify else None
    for p in (ours_out, bf16_out, ref_out):
        p.unlink(missing_ok=True)
    return ours, convert, quant, identical


def merged_rows(model: Path, work: Path, out_dir: Path, verify: bool):
    adapter = build_adapter(model, work / "lora-r16")
    ours_out, ref_out = out_dir / "ours-merged", out_dir / "peft-merged"
    for p in (ours_out, ref_out):
        shutil.rmtree(p, ignore_errors=True)
    code = f"from backpropagate.export import export; export({str(adapter)!r}, 'merged', output={str(ours_out)!r})"
    ours = measure(Path("-"), [sys.executable, "-c", code])
    ref = measure(Path("-"), [sys.executable, "-c", PEFT_MERGE, str(model), str(adapter), str(ref_out)])
    identical = same_safetensors(ours_out, ref_out) if verify else None
    for p in (ours_out, ref_out):
        shutil.rmtree(p, ignore_errors=True)
    return ours, ref, identical


def same_tensors(a: Path, b: Path) -> bool:
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    return ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))
        for n in ta
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bp-convert-bench"))
    ap.add_argument("--outtypes", nargs="+", default=["bf16", "f16"])
    ap.add_argument("--no-verify", action="store_true", help="skip the tensor-by-tensor comparison")
    ap.add_argument("--out-dir", type=Path, help="where the GGUF files go (default: the work folder)")
    ap.add_argument("--merged", action="store_true", help="also compare merged exports with PEFT's merge")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both quantizers")
    ap.add_argument("--record", action="store_true", help=f"append the quantized rows to {RESULTS.name}")
    args = ap.parse_args()
    load_before = os.getloadavg()
    work = args.work.resolve()
    model = build_model(work / "qwen2.5-1.5b-shape")
    src_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    converter = llama_cpp_converter(work)
    env = {**os.environ, "PYTHONPATH": str(converter / "gguf-py"), "NO_LOCAL_GGUF": ""}
    out_dir = (args.out_dir or work).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    buffered, direct = disk_floor(out_dir, src_bytes, False), disk_floor(out_dir, src_bytes, True)
    rows, qrows = [], []
    quantize = llama_quantize_tool(work) if any(t in QUANTIZED for t in args.outtypes) else None
    for outtype in [t for t in args.outtypes if t in QUANTIZED]:
        assert quantize is not None
        rows_of = quantized_rows(model, out_dir, converter, quantize, env, outtype, args.threads, not args.no_verify)
        qrows.append((outtype, *rows_of))
    mrow = merged_rows(model, work, out_dir, not args.no_verify) if args.merged else None
    for outtype in [t for t in args.outtypes if t not in QUANTIZED]:
        ours_out, ref_out = out_dir / f"ours-{outtype}.gguf", out_dir / f"llamacpp-{outtype}.gguf"
        for p in (ours_out, ref_out):
            p.unlink(missing_ok=True)
        code = f"from backpropagate import _core; _core.convert_to_gguf({str(model)!r}, {str(ours_out)!r}, {outtype!r})"
        ours = measure(ours_out, [sys.executable, "-c", code])
        script = str(converter / "convert_hf_to_gguf.py")
        argv = [sys.executable, script, str(model), "--outtype", outtype, "--outfile", str(ref_out)]
        ref = measure(ref_out, argv, env=env)
        identical = None if args.no_verify else same_tensors(ours_out, ref_out)
        rows.append((outtype, ours, ref, identical))
        for p in (ours_out, ref_out):
            p.unlink()
    print(f"\nsource: {src_bytes / 1e9:.2f} GB bf16 safetensors (Qwen2.5-1.5B shape), {os.cpu_count()} CPU cores")
    print(
        f"output folder: {out_dir}; writing and fsyncing as many bytes there takes {buffered:.1f} s "
        f"through the page cache, {direct:.1f} s with O_DIRECT\n"
    )
    if rows:
        print("| type | tool | time (s) | CPU (s) | MB/s | peak RSS (MB) | speed-up | memory ratio | same tensors |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for outtype, ours, ref, identical in rows:
        for name, r in (("backpropagate", ours), ("llama.cpp convert_hf_to_gguf.py", ref)):
            mbps = src_bytes / 1e6 / r["seconds"]
            speed = f"{ref['seconds'] / ours['seconds']:.1f}x" if r is ours else ""
            mem = f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}" if r is ours else ""
            same = {True: "yes", False: "NO", None: "not checked"}[identical] if r is ours else ""
            print(
                f"| {outtype} | {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {mbps:.0f} | "
                f"{r['peak_rss_mb']:.0f} | {speed} | {mem} | {same} |"
            )
    same_word = {True: "yes", False: "NO", None: "not checked"}
    if qrows:
        print(
            "\n| type | route | time (s) | CPU (s) | peak RSS (MB) | ours faster by | our memory / theirs | same tensors |"
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    records = []
    for outtype, ours, convert, quant, identical in qrows:
        two_step = {
            "seconds": convert["seconds"] + quant["seconds"],
            "cpu_seconds": convert["cpu_seconds"] + quant["cpu_seconds"],
            "peak_rss_mb": max(convert["peak_rss_mb"], quant["peak_rss_mb"]),
        }
        named = [(f"backpropagate (one step, {args.threads} threads)", ours), ("llama.cpp convert to bf16", convert)]
        named += [(f"llama-quantize ({args.threads} threads)", quant), ("llama.cpp convert + quantize", two_step)]
        for name, r in named:
            ratio = "" if r is ours or r is convert else f"{r['seconds'] / ours['seconds']:.2f}x"
            mem = "" if r is ours or r is convert else f"{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}"
            same = same_word[identical] if r is ours else ""
            print(
                f"| {outtype} | {name} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                f"{ratio} | {mem} | {same} |"
            )
        records.append(
            {
                "outtype": outtype,
                "ours": ours,
                "llama_convert_bf16": convert,
                "llama_quantize": quant,
                "llama_two_step": two_step,
                "speedup_vs_two_step": round(two_step["seconds"] / ours["seconds"], 2),
                "speedup_vs_quantize": round(quant["seconds"] / ours["seconds"], 2),
                "memory_vs_two_step": round(ours["peak_rss_mb"] / two_step["peak_rss_mb"], 3),
                "memory_vs_quantize": round(ours["peak_rss_mb"] / quant["peak_rss_mb"], 3),
                "same_tensors": identical,
            }
        )
    if args.record and records:
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv),
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()],
            "source_gb": round(src_bytes / 1e9, 2),
            "rows": records,
        }
        with RESULTS.open("a") as f:
            f.write(json.dumps(record) + "\n")
    if mrow is not None:
        ours, ref, identical = mrow
        print(
            "\n| merged (rank-16 LoRA, all linear layers) | time (s) | CPU (s) | peak RSS (MB) | speed-up | memory ratio | same tensors |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        print(
            f"| backpropagate (streamed) | {ours['seconds']:.1f} | {ours['cpu_seconds']:.1f} | {ours['peak_rss_mb']:.0f} | "
            f"{ref['seconds'] / ours['seconds']:.2f}x | {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | {same_word[identical]} |"
        )
        print(
            f"| PEFT merge_and_unload + save_pretrained | {ref['seconds']:.1f} | {ref['cpu_seconds']:.1f} | {ref['peak_rss_mb']:.0f} |  |  |  |"
        )


if __name__ == "__main__":
    main()
