"""scripts/bench.py --quick runs both tools on every method and writes its report (its speed is not tested)."""

import importlib.util
import json

from conftest import ROOT


def test_quick_bench_runs_every_method_in_both_tools(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "quick"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in report["rows"]] == list(bench.METHODS)
    for row in report["rows"]:
        for tool in ("ptune", "peft"):
            r = row[tool]
            assert "error" not in r, (row["method"], tool, r)
            assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and 0 < r["roofline"] < 1.5
            assert isinstance(r["eval"], float) and r["loss"] > 0
    by = {r["method"]: r for r in report["rows"]}
    hidden = 64  # tiny-llama
    assert by["prompt"]["ptune"]["trainable_params"] == by["prompt"]["peft"]["trainable_params"] == 20 * hidden
    assert by["fine-tune"]["ptune"]["trainable_params"] == report["floor"]["fp32"]["backbone_params"]
    md = out.with_suffix(".md").read_text()
    assert "ptune / PEFT" in md and md.count("| fp32 | ptune |") == len(bench.METHODS)
