"""bench/gpu_check.py --tiny: the GPU check's code path end to end on CPU, as CI runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # under a minute on a quiet CPU; several minutes on a loaded one
def test_gpu_check_tiny_prints_the_full_table_with_finite_numbers(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--peak-tflops", "0.1", "--json", str(out)],
        capture_output=True, text=True, timeout=1200, env=env, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    sections = [r["section"] for r in rows]
    assert sorted(set(sections), key=sections.index) == ["train", "ddp", "score", "serve", "paper", "auroc"]

    by = {s: [r for r in rows if r["section"] == s] for s in set(sections)}
    assert [r["unit"] for r in by["train"]] == ["s/kimg", "img/s", "count"]
    assert "21.6-24.2 s/kimg" in by["train"][0]["note"] and "bfloat16" in by["train"][0]["setting"]
    assert by["train"][2]["value"] == 0  # no loss was NaN or inf
    assert by["ddp"][0]["value"] is None and by["ddp"][0]["note"].startswith("skipped")
    assert [r["unit"] for r in by["score"]] == ["img/s", "GFLOP", "fraction"]
    assert len(by["serve"]) == 4 and {r["setting"].split(", ", 1)[1] for r in by["serve"]} == {
        "batch 1, mean", "batch 1, multimodal", "batch 16, mean", "batch 16, multimodal"}
    assert len(by["auroc"]) == 1
    # the paper-size serving section at its --tiny size: fp32 and bf16 at batch 1 and 4, then memory
    assert [r["setting"] for r in by["paper"]] == [
        "32 px, batch 1, fp32", "32 px, batch 4, fp32", "32 px, batch 1, bf16", "32 px, batch 4, bf16",
        "32 px peak GPU memory"]
    assert "bf16 blocks [8, 16, 32]" in by["paper"][2]["note"] and by["paper"][4]["value"] is None
    for r in rows:
        if r["section"] not in ("ddp", "auroc") and r["unit"] != "GiB":
            assert r["value"] is not None and math.isfinite(r["value"]) and r["value"] >= 0, r
            if r["unit"] != "count":
                assert r["value"] > 0, r

    # the printed table: marker, header, one line per row
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("GPU_CHECK_TABLE"))
    table = [line for line in lines[start + 1:] if line.startswith("|")]
    assert table[0] == "| check | setting | figure | unit | note |" and len(table) == 2 + len(rows)
    assert all(line.count("|") >= 6 for line in table)
