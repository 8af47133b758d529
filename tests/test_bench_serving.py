"""scripts/bench_serving.py --quick serves 8 adapters mixed and switched in both tools and writes
its report; what it checks (mixed == single, ptune == PEFT) is asserted, its speed is not."""

import json

from conftest import load_script


def test_quick_serving_bench_runs_and_reports(tmp_path, data_dir):
    bench = load_script("bench_serving")
    out = tmp_path / "serving"
    # prompt only (the method whose mixed batches pad; prefix runs the same harness): ~half a minute
    assert bench.main(["--quick", "--methods", "prompt", "--sorted-window", "2", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in report["rows"]] == ["prompt"]
    for row in report["rows"]:
        assert "error" not in row, row.get("error")
        for tool in ("ptune", "peft"):
            assert row[tool]["max_diff_mixed_vs_single"] < bench.TOLERANCE
            assert row[tool]["single"]["rows_per_s"] > 0 and row[tool]["mixed"]["rows_per_s"] > 0
            assert row[tool]["peak_rss_mb"] > 0
        assert row["max_diff_ptune_vs_peft"] < bench.TOLERANCE
        # 32 rows in batches of 4: ptune mixes each batch in one forward, PEFT splits it by adapter
        assert row["ptune"]["mixed"]["forwards_per_pass"] == 8
        assert row["peft"]["mixed"]["forwards_per_pass"] > 8
        assert set(row["ratios"]) >= {"ptune mixed / ptune single", "ptune mixed / PEFT switch"}
    md = out.with_suffix(".md").read_text()
    assert "| prompt | ptune | 8 mixed |" in md and "| prompt | PEFT | 8, switching |" in md
    assert report["machine"]["cpus"] > 0 and len(report["load_before"]) == 3
    # positions per pass: each forward's rows x its widest row (own prompt + own tokens, ptune.mixed's
    # layout), fewer in mixed forwards than the earlier layout's rows x (longest prompt + longest row)
    prompt = report["rows"][0]
    spec = {**report["config"], "method": "prompt"}
    assert spec["layout"] == "row"
    ids, adapters = bench.requests(bench.load_backbone(spec["model"]).tokenizer, spec)
    plan = bench.plans(ids, adapters, spec)
    assert prompt["ptune"]["mixed"]["positions_per_pass"] == bench.positions(plan["mixed"], ids, adapters, spec) == \
        sum(len(f) * max(spec["lengths"][adapters[i]] + len(ids[i]) for i in f) for f in plan["mixed"])
    assert prompt["ptune"]["mixed"]["positions_per_pass"] < bench.positions(plan["mixed"], ids, adapters,
                                                                            {**spec, "layout": "block"})
    single = prompt["ptune"]["single"]["positions_per_pass"]
    assert single == bench.positions(plan["single"], ids, adapters, {**spec, "layout": "block"})  # one prompt: same
    assert bench.main(["--render", str(out.with_suffix(".json"))]) == 0  # recounts, keeps the measured figures
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["ratios"] == prompt["ratios"]
