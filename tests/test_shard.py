"""trainer.shard=fsdp: the frozen backbone's layers split over processes (FSDP2, two gloo processes on CPU).

What must hold (ptune/train/shard.py): a sharded run computes what the unsharded run of the same process
count computes (the gathered layer is the layer, so the numbers agree exactly), hence what one process
computes within float summation order (the e2e task and tiny-llama have no dropout, so no RNG stream
differs between one and two processes); each process holds about half of the layers; the adapter is the
full tensors, written once; a sharded run resumes exactly. The fast tests check the pieces and the
one-line refusals; the slow ones launch real processes (`pytest -m slow tests/test_shard.py`).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from ptune import methods, quantize
from ptune.errors import PtuneError
from ptune.train import shard

ARGS = ["model=tiny-llama", "method=prefix", *TINY, "trainer.max_steps=6", "trainer.eval_every=6", "trainer.save_every=3"]


def _tiny(name):
    from ptune.build import build_backbone
    from ptune.config import compose

    return build_backbone(compose([f"model={name}"])).model


@pytest.mark.parametrize("name, stacks", [("tiny-llama", ["model.layers"]), ("tiny-gpt2", ["transformer.h"]),
                                          ("tiny-bert", ["bert.encoder.layer"]),
                                          ("tiny-t5", ["encoder.block", "decoder.block"]),
                                          ("tiny-bart", ["model.encoder.layers", "model.decoder.layers"])])
def test_the_layer_stacks_are_found_on_every_backbone(name, stacks):
    model = _tiny(name)
    found = quantize.layer_lists(model)
    names = {id(m): n for n, m in model.named_modules()}
    assert [names[id(s)] for s in found] == stacks
    assert all(len(s) == 2 for s in found)


def test_local_bytes_counts_what_the_process_holds():
    model = _tiny("tiny-llama")
    assert shard.local_bytes(model) == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())


@pytest.mark.parametrize("method, world, quantized, says", [
    ("prefix", 1, False, "this is one process"),
    ("fine-tune", 2, False, "method=fine-tune trains it"),
    ("prompt", 2, True, "choose one of the two"),
])
def test_what_sharding_cannot_do_is_refused_in_one_line(method, world, quantized, says):
    with pytest.raises(PtuneError, match=says) as e:
        shard.refuse(method, methods.trains_backbone(method), world, quantized)
    assert "\n" not in str(e.value)


def test_one_process_asked_to_shard_exits_2_with_one_line(tmp_path, data_dir):
    env = {**os.environ, "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ptune", "train", *ARGS, "trainer.shard=fsdp"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "trainer.shard=fsdp" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # refused before a run directory is claimed


def test_a_bad_shard_value_is_refused():
    from ptune.config import check, compose

    with pytest.raises(PtuneError, match="trainer.shard"):
        check(compose(["trainer.shard=zero3"]))


# -- real processes --------------------------------------------------------------------------------
def run(cwd: Path, processes: int, extra: list[str], resume: Path | None = None, base: list[str] = ARGS) -> Path:
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    args = [f"resume={resume}", *extra] if resume else [*base, *extra]
    proc = subprocess.run([*launcher, "-m", "ptune", "train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow  # three launches of two gloo processes
def test_sharded_equals_unsharded_and_one_process_and_resumes_exactly(tmp_path, data_dir):
    one = run(tmp_path / "one", 1, ["trainer.batch_size=4"])
    two = run(tmp_path / "two", 2, ["trainer.batch_size=2"])
    sharded = run(tmp_path / "sharded", 2, ["trainer.batch_size=2", "trainer.shard=fsdp"])
    s1, s2, s3 = (json.loads((d / "summary.json").read_text()) for d in (one, two, sharded))
    assert (s3["processes"], s3["shard"]) == (2, "fsdp") and s2["shard"] == "none"
    # the same numbers as two unsharded processes: the gathered layer is the layer
    assert losses(sharded) == losses(two)
    assert all(torch.equal(adapter(sharded)[k], adapter(two)[k]) for k in adapter(two))
    assert s3["eval"] == s2["eval"]  # evaluation in lockstep on both processes, written once
    # and one process's within float summation order
    assert all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(losses(one), losses(sharded)))
    assert all((adapter(one)[k] - adapter(sharded)[k]).abs().max() <= 1e-5 for k in adapter(one))
    # each process holds its half of the layers (tiny-llama is mostly its embedding table, which stays whole)
    model = _tiny("tiny-llama")
    layers = sum(p.numel() * 4 for s in quantize.layer_lists(model) for p in s.parameters())
    assert s3["backbone_mb"] * 2**20 == pytest.approx(s2["backbone_mb"] * 2**20 - layers / 2, abs=0.1 * 2**20)

    # resume: back to the step-3 checkpoint (as if killed after it), then carry on sharded
    final = adapter(sharded)
    for later in (sharded / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[-1]) > 3:
            shutil.rmtree(later)
    resumed = run(tmp_path / "sharded", 2, [], resume=sharded)
    assert resumed == sharded
    assert losses(resumed) == losses(two)
    assert all(torch.equal(adapter(resumed)[k], final[k]) for k in final)


@pytest.mark.slow
@pytest.mark.parametrize("model, method, task", [("tiny-bert", "p-tuning-v2", "sst2"), ("tiny-t5", "prompt", "e2e"),
                                                 ("tiny-gpt2", "p-tuning", "sst2")])
def test_other_backbones_and_methods_shard_to_the_unsharded_numbers(tmp_path, data_dir, model, method, task):
    args = [f"model={model}", f"method={method}", f"task={task}", "trainer.batch_size=2", "trainer.max_steps=3",
            "trainer.eval_every=3", "trainer.save_every=3", "task.max_train_samples=64", "task.max_eval_samples=4",
            "trainer.log_every=1", *(["task.metrics=[bleu]", "task.max_new_tokens=8"] if task == "e2e" else [])]
    two = run(tmp_path / "two", 2, [], base=args)
    sharded = run(tmp_path / "sharded", 2, ["trainer.shard=fsdp"], base=args)
    # within summation order: FSDP's backward hooks can change the order in which a tensor used by several
    # layers (T5's position bias) sums its input gradients
    assert len(losses(sharded)) == 3
    assert all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(losses(two), losses(sharded)))
    assert all((adapter(sharded)[k] - adapter(two)[k]).abs().max() <= 1e-5 for k in adapter(two))


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_processes_load_and_shard_in_turn(monkeypatch, rank):
    """trainer.shard=fsdp: process k loads (and shards) after processes 0..k-1 have sharded, before k+1..N-1
    load, so one host holds one whole model at a time; the mesh is made by all of them first."""
    from types import SimpleNamespace

    from ptune.train import job

    events = []
    monkeypatch.setattr(job.shard, "device_mesh", lambda world, device: events.append("mesh") or "mesh")
    monkeypatch.setattr(job, "_final_form", lambda cfg, b, m, frozen: events.append("final"))
    monkeypatch.setattr(job.shard, "shard_backbone", lambda model, mesh, device: events.append(f"shard {mesh}") or 5)
    monkeypatch.setattr(job, "trim_heap", lambda: None)
    monkeypatch.setattr(job, "fix_mmap_threshold", lambda: False)  # mallopt would change this test process
    acc = SimpleNamespace(num_processes=3, process_index=rank, device=torch.device("cpu"),
                          wait_for_everyone=lambda: events.append("barrier"))
    backbone = SimpleNamespace(model="model")
    monkeypatch.setattr(job, "_build", lambda cfg: events.append("build") or (backbone, "method", "task"))
    assert job._build_sharded(None, acc, None) == (backbone, "method", "task", 5)
    assert events == ["mesh", *["barrier"] * rank, "build", "final", "shard mesh", *["barrier"] * (3 - rank)]


MMAP_PROBE = """
import ctypes, sys
from ptune.train.loop import fix_mmap_threshold

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
fixed = fix_mmap_threshold() if sys.argv[1] == "fix" else False
libc.free(libc.malloc(4 << 20))  # a 4 MiB block, mmapped and freed: by default the threshold rises past it
before = libc.mallinfo2().hblkhd  # bytes in mmapped blocks now
p = libc.malloc(2 << 20)
print(fixed, libc.mallinfo2().hblkhd - before >= 2 << 20)  # is the next 2 MiB block mmapped (given back at free)?
"""


@pytest.mark.parametrize("how, env, says", [("fix", {}, "True True"), ("keep", {}, "False False"),
                                            ("fix", {"MALLOC_MMAP_THRESHOLD_": "262144"}, "False True")])
def test_a_sharded_cpu_run_fixes_glibcs_mmap_threshold_unless_the_user_chose(how, env, says):
    """What trainer.shard=fsdp on CPU sets (ptune.train.job): after a large block is freed, glibc's default
    serves the next one from the heap (kept after free); fixed, it stays mmapped; a user's own setting wins."""
    out = subprocess.run([sys.executable, "-c", MMAP_PROBE, how], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env)
    assert out.stdout.strip() == says, out.stderr[-1000:]
