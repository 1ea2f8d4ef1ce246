"""`benchmarks/gpu_check.py --dry-run`: the device check's harness, run on CPU at tiny sizes.

Proves what a CPU can: every section runs and reports, greedy parity vs transformers holds
in float32 for each family it builds, and the throughput/roofline records are complete. The
whole dry run takes ~30 CPU seconds (most of it importing and building transformers models),
so it is `slow`; the fast test runs the kernels and roofline sections only. The real run
(CUDA, bf16, Llama-3-8B shapes) needs a device; see docs/gpu.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def dry_run(out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(out), "--dry-run", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stderr[-3000:]
    written = json.loads(out.read_text())
    assert json.loads(proc.stdout) == written  # NOTE: the JSON is printed as well
    return {"rc": proc.returncode, "stderr": proc.stderr, **written}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    return dry_run(tmp_path_factory.mktemp("gpu_check") / "gpu_check.json")


def test_dry_run_kernels_and_roofline(tmp_path) -> None:
    rep = dry_run(tmp_path / "out" / "gpu_check.json", "--only", "kernels,roofline")
    assert rep["rc"] == 0 and list(rep["sections"]) == ["kernels", "roofline"], rep["stderr"]
    assert rep["sections"]["kernels"]["passed"] == 1
    assert rep["sections"]["roofline"]["decode_b1"]["fraction_of_roofline"] > 0


@pytest.mark.slow
def test_every_section_ran_and_passed(report) -> None:
    sections = report["sections"]
    assert list(sections) == ["kernels", "parity", "throughput", "roofline"]
    bad = {k: v.get("error") for k, v in sections.items() if not v["ok"]}
    assert not bad and report["rc"] == 0, (bad, report["stderr"][-2000:])
    assert sections["kernels"]["passed"] >= 1 and sections["kernels"]["failures"] == 0


@pytest.mark.slow
def test_parity_runs_every_family_exactly(report) -> None:
    runs = report["sections"]["parity"]["runs"]
    assert set(runs) == {"llama-float32", "gemma3-float32", "qwen3-float32"}
    for run in runs.values():
        assert run["exact"] == run["prompts"] > 0, run


@pytest.mark.slow
def test_throughput_and_roofline_records(report) -> None:
    tp = report["sections"]["throughput"]
    prefix = tp["prefix_heavy"]
    assert prefix["ours"]["cached_tokens"] > 0  # NOTE: the groups share prefixes
    hf = prefix["transformers"]
    assert hf["prompts_per_s_by_batch_size"][str(hf["best_batch_size"])] == hf["prompts_per_s"]
    for key, ratio in (("prefix_heavy", "speedup_prompts_per_s"),
                       ("decode_heavy", "speedup_output_tokens_per_s")):
        assert tp[key][ratio] > 0
    roof = report["sections"]["roofline"]
    assert roof["decode_b1"]["fraction_of_roofline"] > 0
    assert roof["prefill"]["tflop_s"] >= 0 and roof["copy_bandwidth_gb_s"] > 0


def test_bad_section_name_is_a_clear_error(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(tmp_path / "x.json"),
                           "--only", "kernels,nope"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "unknown sections ['nope']" in proc.stderr
