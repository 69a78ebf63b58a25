"""The profile summary sorts a trace's kernels by kind and finds the operators that launched copies."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benches"))

import gpu_profile  # noqa: E402


def test_summary_counts_kinds_and_names_the_operators_behind_copies(tmp_path):
    def kernel(ts, dur, name, ext=None):
        return {"ph": "X", "cat": "kernel", "ts": ts, "dur": dur, "name": name, "args": {"External id": ext}}

    events = [
        {
            "ph": "X",
            "cat": "cpu_op",
            "ts": 0,
            "dur": 5,
            "name": "aten::copy_",
            "args": {"External id": 7, "Input Dims": [[8, 4], [8, 4]]},
        },
        kernel(0, 30, "nvjet_sm90_tst_256x128_64x4_1x2_h_badd_coopA_NNT"),
        kernel(30, 10, "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>", ext=7),
        kernel(40, 10, "void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>"),  # a graph's replay
        kernel(50, 50, "triton_poi_fused_mul_silu_0"),
    ]
    trace = tmp_path / "trace.json.gz"
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = gpu_profile.summarize(trace)
    assert summary["kernels"] == 4 and summary["device_ms"] == 0.1
    assert summary["share_by_kind"] == {"triton": 0.5, "matmul": 0.3, "copy": 0.2}
    assert summary["copy_and_elementwise_sites"] == [
        {"ms": 0.01, "calls": 1, "kind": "copy", "op": "aten::copy_ [[8, 4], [8, 4]]"}
    ]
