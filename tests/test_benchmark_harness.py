"""The benchmark harness on a tiny model with two engines for a few tokens: it measures, prints the
table with ratios computed from the measured figures, and writes the PNG and JSON."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_throughput_harness_end_to_end(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import throughput
    rc = throughput.main(["--model", str(tiny_models["llama"]), "--engines", "dashinfer-core,hf,no-such-engine",
                          "--num-prompts", "3", "--min-input-len", "8", "--max-input-len", "24",
                          "--output-len", "4", "--threads", "1", "--out", str(tmp_path), "--tag", "t"])
    assert rc == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "t.json").read_text())
    by_engine = {r["engine"]: r for r in results}
    ours, hf = by_engine["dashinfer-core"], by_engine["hf"]
    assert ours["error"] is None and hf["error"] is None, (ours, hf)
    assert ours["num_tokens"] == hf["num_tokens"] == 12
    assert by_engine["no-such-engine"]["error"] == "not installed"
    ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
    hf_line = next(line for line in out.splitlines() if line.startswith("hf "))
    assert f"{ratio:.2f}x" in hf_line  # the printed ratio is the one the measured figures give
    assert (tmp_path / "t.png").stat().st_size > 1000
    # Single stream (one request at a time, warmed up the same way): every prompt's tokens, a TTFT each
    rc = throughput.main(["--model", str(tiny_models["llama"]), "--engines", "dashinfer-core", "--single-stream",
                          "--num-prompts", "2", "--min-input-len", "8", "--max-input-len", "24",
                          "--output-len", "3", "--threads", "1", "--out", str(tmp_path), "--tag", "s"])
    assert rc == 0
    (single,) = json.loads((tmp_path / "s.json").read_text())
    assert single["error"] is None and single["num_tokens"] == 6 and single["ttft_p50_s"] > 0
