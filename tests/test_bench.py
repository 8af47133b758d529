"""scripts/bench.py --quick runs both tools on every method and writes its report (its speed is not tested)."""

import json
import os

import pytest

from conftest import load_script


@pytest.mark.slow  # runs scripts/bench.py: ptune and PEFT + Trainer
def test_quick_bench_runs_every_method_in_both_tools(tmp_path):
    bench = load_script("bench")
    out = tmp_path / "quick"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in report["rows"]] == list(bench.METHODS)
    for row in report["rows"]:
        for tool in ("ptune", "peft"):
            r = row[tool]
            assert "error" not in r, (row["method"], tool, r)
            assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and 0 < r["roofline"] < 1.5
            assert isinstance(r["eval"], float) and r["loss"] > 0 and r["dev_loss"] > 0
    by = {r["method"]: r for r in report["rows"]}
    hidden = 64  # tiny-llama
    assert by["prompt"]["ptune"]["trainable_params"] == by["prompt"]["peft"]["trainable_params"] == 20 * hidden
    assert by["fine-tune"]["ptune"]["trainable_params"] == report["floor"]["fp32"]["backbone_params"]
    md = out.with_suffix(".md").read_text()
    assert "ptune / PEFT" in md and md.count("| fp32 | ptune |") == len(bench.METHODS)


@pytest.mark.slow  # runs scripts/bench.py
def test_quick_bench_on_a_classifier_runs_peft_sequence_classification(tmp_path):
    """minilm / SST-2's path on tiny-bert: PEFT trains BertForSequenceClassification (SEQ_CLS) around the
    same encoder, ptune its linear head; both report accuracy and a dev loss on the same examples. (PEFT 0.21's
    prefix tuning refuses BERT under transformers 5.24, "Model does not support past key values": the real bench
    reports that as the PEFT row.)"""
    bench = load_script("bench")
    out = tmp_path / "quick-sst2"
    assert bench.main(["--quick", "--config", "tiny-sst2", "--methods", "prompt,fine-tune", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    for row in report["rows"]:
        for tool in ("ptune", "peft"):
            r = row[tool]
            assert "error" not in r, (row["method"], tool, r)
            assert 0 <= r["eval"] <= 1 and r["dev_loss"] > 0
    assert "accuracy" in out.with_suffix(".md").read_text()


@pytest.mark.slow  # runs scripts/bench.py --scaling
def test_quick_scaling_writes_table_json_and_plot(tmp_path):
    """--scaling: ptune alone, prompt vs prefix against prompt length, batch and sequence length (tiny-llama)."""
    bench = load_script("bench")
    out = tmp_path / "scaling"
    assert bench.main(["--quick", "--scaling", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert {(pt["axis"], pt["method"]) for pt in report["points"]} == {
        (a, m) for a in ("p", "batch", "seq_len") for m in ("prompt", "prefix")}
    for pt in report["points"]:
        assert pt["tokens_per_s"] > 0 and pt["tokens_per_s"] * pt["step_s"] == pytest.approx(pt["batch"] * pt["seq_len"])
    by = {(pt["axis"], pt["value"], pt["method"]): pt for pt in report["points"]}
    hidden = 64  # tiny-llama: prompt tuning trains p x hidden
    assert by[("p", 4, "prompt")]["trainable_params"] == 4 * hidden
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "![scaling](scaling.png)" in out.with_suffix(".md").read_text()


@pytest.mark.slow  # server processes and a git worktree
def test_quick_serve_load_bench_measures_batching_many_adapters_and_the_model(tmp_path):
    """scripts/bench_serve_load.py --quick, the sections that need no old commit (a shallow clone has none)."""
    bench = load_script("bench_serve_load")
    out = tmp_path / "serve"
    argv = ["--quick", "--sections", "cls,adapters,model", "--adapter-counts", "2,4", "--rows", "32", "--out", str(out),
            "--old-commit", "HEAD"]
    assert bench.main(argv) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["cls"]["new"]["statuses"] == {"200": 32} and result["cls"]["old"]["statuses"] == {"200": 32}
    assert [a["adapters"] for a in result["adapters"]] == [2, 4] and result["model"]["gain"] > 0
    assert "## The model alone" in out.with_suffix(".md").read_text()


@pytest.mark.slow  # four ptune train processes
def test_quick_checkpointing_bench_compares_both_jobs(tmp_path):
    bench = load_script("bench_checkpointing")
    out = tmp_path / "ckpt"
    assert bench.main(["--quick", "--batch-size", "4", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["prompt", "prefix"]
    assert all(r["max_loss_difference"] < 1e-4 and len(r["plain"]["losses"]) == 2 for r in rows)


@pytest.mark.slow  # ptune train (twice) and ptune plan, each in its own process, one tiny-llama row (~1 min)
def test_quick_plan_bench_compares_plan_and_measured_peaks(tmp_path):
    bench = load_script("bench_plan")
    out = tmp_path / "plan"
    assert bench.main(["--quick", "--rows", "prompt b8", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert len(rows) == 1 and all(r["measured_mb"] > 0 and r["plan_mb"] > 0 for r in rows)
    assert result["fit"] and "What fits where" in out.with_suffix(".md").read_text()


# scripts/gpu_check.sh --cpu: the GPU check end to end on the CPU (~2 min); its quantize and shard sections are
# scripts/bench_big_backbones.py's, so this is that script's test too (its --quick would run the same processes again)
@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    import subprocess

    from conftest import ROOT

    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((tmp_path / "gpu-check.json").read_text())
    assert r["contract"]["passed"] and r["contract"]["device"] == "cpu"
    assert " passed" in r["contract"]["summary"] and "skipped" not in r["contract"]["summary"]  # the device test ran
    assert [(x["size"], x["method"]) for x in r["speed"]] == [(s, m) for s in ("llama-cpu-s", "llama-cpu-m")
                                                              for m in ("prompt", "prefix")]
    assert all(x["tokens_per_s"] > 0 and 0 < x["mfu_measured"] for x in r["speed"])
    prefix = {x["size"]: x["trainable_params"] for x in r["speed"] if x["method"] == "prefix"}
    assert prefix["llama-cpu-s"] < prefix["llama-cpu-m"]  # each size's model keys reach the job (a wider prefix MLP)
    assert {x["tool"] for x in r["peft"]} == {"ptune", "peft"}
    assert [q["quantize"] for q in r["quantize"]] == ["none", "int8", "nf4"] and all("losses" in q for q in r["quantize"])
    one, two, sharded = r["shard"]
    assert sharded["job"] == "2 processes, trainer.shard=fsdp" and all(x["max_rel_loss_diff_vs_1"] < 1e-4 for x in r["shard"])
    assert sharded["backbone_mb"] < two["backbone_mb"] == one["backbone_mb"]
    md = (tmp_path / "gpu-check.md").read_text()
    assert "## contract" in md and "## trainer.shard=fsdp" in md and "## model.quantize" in md


def test_big_backbones_options_reach_its_jobs(tmp_path, monkeypatch):
    """scripts/bench_big_backbones.py's flags (its jobs run for real in the GPU check's test): --model, --set and
    --steps reach every `ptune train`, --sections picks the sections, --out is where it writes."""
    big = load_script("bench_big_backbones")
    calls = []

    def job(out, keys, processes=1, cuda=False):
        calls.append(keys)
        return {"command": "", "losses": [2.0, 1.0], "eval": {"bleu": 0.5}, "backbone_mb": 1.0, "peak_memory_mb": 1.0,
                "host_peak_mb": 1.0, "s_per_step": 0.1, "job_s": 1.0}

    monkeypatch.setattr(big, "job", job)
    out = tmp_path / "big"
    assert big.main(["--sections", "quantize", "--model", "tiny-gpt2", "--set", "model.tiny.n_layer=3",
                     "--steps", "5", "--out", str(out)]) == 0
    assert len(calls) == 6 and all("model=tiny-gpt2" in k and "model.tiny.n_layer=3" in k and
                                   "trainer.max_steps=5" in k for k in calls)  # e2e and sst2, none / int8 / nf4
    result = json.loads(out.with_suffix(".json").read_text())
    assert "shard" not in result and len(result["quantize"]) == 6
    calls.clear()
    assert big.main(["--quick", "--sections", "shard", "--out", str(out)]) == 0
    assert len(calls) == 3 and all("model=tiny-llama" in k and "trainer.max_steps=2" in k for k in calls)
    assert sum("trainer.shard=fsdp" in k for k in calls) == 1


def test_gpu_check_runs_only_the_sections_asked(tmp_path, monkeypatch):
    gpu = load_script("gpu_check")
    for name in ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE"):  # what --cpu sets in this process, restored after
        monkeypatch.setenv(name, os.environ.get(name, ""))
    ran = []
    monkeypatch.setattr(gpu, "matmul_flops", lambda cuda: 1e12)
    monkeypatch.setattr(gpu, "section_shard", lambda args, cuda, tmp: ran.append("shard") or ("here", []))
    monkeypatch.setattr(gpu, "section_contract", lambda args, cuda: ran.append("contract") or {})
    assert gpu.main(["--cpu", "--sections", "shard", "--out", str(tmp_path)]) == 0
    assert ran == ["shard"] and set(json.loads((tmp_path / "gpu-check.json").read_text())) >= {"shard", "shard_where"}
    with pytest.raises(SystemExit, match="unknown section"):
        gpu.main(["--cpu", "--sections", "nothing", "--out", str(tmp_path)])
