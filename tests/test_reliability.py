"""Crashes and untrusted files lose nothing: a damaged newest checkpoint is skipped for the previous
good one, a NaN loss or a full disk stops the run with the last good checkpoint intact, and in each
case the resumed run ends bit-identical to an uninterrupted one. Pickles are never loaded, remote
code never runs, and with HF_HUB_OFFLINE=1 no socket connects.
"""

import errno
import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, Marker, assert_same_run, crash_after_checkpoint
from ptune import heads
from ptune.train import checkpoint
from ptune.cli import main

# save every 2 steps, keep 2: a run stopped after step 4 holds step-2 and step-4
JOB = ["train", "model=tiny-gpt2", *TINY, "trainer.save_every=2"]


def runs(root):
    return sorted(p for p in (root / "outputs").glob("*/*") if (p / "config.yaml").exists())


def tree(directory):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, data_dir):
    """An uninterrupted 6-step run, and a run stopped right after its step-4 checkpoint."""
    root = tmp_path_factory.mktemp("reliability")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    assert main(JOB) == 0
    [ref] = runs(root)
    restore = crash_after_checkpoint(mp, 4)  # as if killed right after the write
    assert main(JOB) == 130
    restore()
    [stopped] = [r for r in runs(root) if r != ref]
    assert [p.name for p in checkpoint.list_checkpoints(stopped / "checkpoints")] == ["step-2", "step-4"]
    yield root, ref, stopped
    mp.undo()


def last_error(capsys):
    """The one `error:` line a failed command printed (stderr also holds the progress bar and logs)."""
    err = capsys.readouterr().err
    assert err.count("error: ") == 1, err
    return err[err.index("error: "):].strip()


def _copy(stopped, name):
    dest = stopped.parent / f"{stopped.name}-{name}"
    shutil.copytree(stopped, dest)
    return dest


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data, not the header
    path.write_bytes(bytes(data))


def _pickle_with_forged_manifest(path):
    """Replace the optimizer state by a pickle and update the manifest to match it."""
    path.write_bytes(pickle.dumps({"state": Marker(path.parent.parent.parent / "UNPICKLED")}))
    manifest = path.parent / "manifest.json"
    sums = json.loads(manifest.read_text())
    sums[path.name] = checkpoint._sha256(path)
    manifest.write_text(json.dumps(sums))


DAMAGE = {
    "truncated-tensor-file": (lambda ck: _truncate(ck / "trainable.safetensors"), "trainable.safetensors does not match"),
    "flipped-byte": (lambda ck: _flip_byte(ck / "optimizer.safetensors"), "optimizer.safetensors does not match"),
    "deleted-manifest": (lambda ck: (ck / "manifest.json").unlink(), "no manifest.json"),
    "pickle-with-forged-manifest": (_pickle_with_forged_manifest, "optimizer.safetensors does not parse"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_identical(ws, damage, monkeypatch):
    root, ref, stopped = ws
    run = _copy(stopped, damage)
    spoil, why = DAMAGE[damage]
    target = run / "checkpoints" / "step-4"
    spoil(target if damage != "pickle-with-forged-manifest" else target / "optimizer.safetensors")
    assert checkpoint.verify(target) is not None
    loaded, real_load = [], checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda path: loaded.append(path) or real_load(path))
    assert main(["train", f"resume={run}"]) == 0
    assert loaded == [run / "checkpoints" / "step-2"]  # the previous good one
    log = (run / "train.log").read_text()  # the one line that names the damaged checkpoint (a warning)
    [line] = [x for x in log.splitlines() if "is damaged" in x]
    assert f"checkpoint {target} is damaged ({why}" in line
    assert_same_run(ref, run)
    assert not (root / "UNPICKLED").exists()


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(ws, monkeypatch, capsys):
    root, ref, stopped = ws
    real_loss, calls, saved = heads.loss, {"n": 0}, {}
    before = set(runs(root))

    def loss_nan_at_step_5(method, batch):
        calls["n"] += 1
        loss_sum, n = real_loss(method, batch)
        if calls["n"] == 5:  # one micro-batch per step
            [run] = set(runs(root)) - before
            saved["run"], saved["tree"] = run, tree(run / "checkpoints")
            return loss_sum * float("nan"), n
        return loss_sum, n

    monkeypatch.setattr(heads, "loss", loss_nan_at_step_5)
    capsys.readouterr()
    assert main(JOB) == 2
    monkeypatch.setattr(heads, "loss", real_loss)
    [run] = set(runs(root)) - before
    assert run == saved["run"]
    line = last_error(capsys)
    rel = run.relative_to(root)  # as the user wrote output_dir
    assert line == (f"error: training loss became nan at step 5; stopped. The last good checkpoint is "
                    f"{rel / 'checkpoints' / 'step-4'}; lower trainer.lr (or use trainer.precision=fp32) and "
                    f"continue with: ptune train resume={rel} trainer.lr=<lower>")
    assert tree(run / "checkpoints") == saved["tree"] and not (run / "summary.json").exists()
    assert checkpoint.verify(run / "checkpoints" / "step-4") is None
    assert main(["train", f"resume={run}"]) == 0  # nothing was lost: it ends as the unbroken run
    assert_same_run(ref, run)


def test_a_non_finite_tensor_is_never_checkpointed(ws, monkeypatch, capsys):
    """A finite loss but an update that leaves an inf tensor: the step-4 checkpoint is refused,
    step-2 stays the last one."""
    root, ref, stopped = ws
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step_then_overflow(self, *a, **kw):
        out = real_step(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    before = set(runs(root))
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_overflow)
    capsys.readouterr()
    assert main(JOB) == 2
    [run] = set(runs(root)) - before
    line = last_error(capsys)
    assert line.startswith("error: a trainable tensor became NaN/inf at step 4; stopped. The last good checkpoint is "
                           f"{run.relative_to(root) / 'checkpoints' / 'step-2'};"), line
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == ["step-2"]


def test_a_huge_learning_rate_stops_before_a_non_finite_checkpoint(ws, capsys):
    root, ref, stopped = ws
    before = set(runs(root))
    capsys.readouterr()
    assert main([*JOB, "trainer.lr=1e30", "trainer.max_steps=20", "trainer.save_every=1", "trainer.eval_every=100"]) == 2
    line = last_error(capsys)
    assert "; stopped. The last good checkpoint is" in line, line
    [run] = set(runs(root)) - before
    for ck in checkpoint.list_checkpoints(run / "checkpoints"):
        assert checkpoint.verify(ck) is None
        assert all(torch.isfinite(t).all() for t in load_file(ck / "trainable.safetensors").values())


def test_a_full_disk_at_checkpoint_time_keeps_the_previous_checkpoint(ws, monkeypatch, capsys):
    root, ref, stopped = ws
    real_save_file, saved = checkpoint.save_file, {}

    def save_file(tensors, path, *a, **kw):
        if ".step-4-" in str(path):  # the step-4 checkpoint's temporary folder
            ckpts = path.parent.parent
            saved["run"], saved["tree"] = ckpts.parent, tree(ckpts)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    capsys.readouterr()
    assert main(JOB) == 2
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    run = saved["run"]
    line = last_error(capsys)
    assert line == (f"error: could not write checkpoint step-4 in {run / 'checkpoints'} (No space left on device); "
                    f"the previous checkpoint step-2 is intact. Free space, then continue with: "
                    f"ptune train resume={run}")
    assert tree(run / "checkpoints") == saved["tree"]  # step-2 as it was, no half-written folder left
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-2"]
    assert main(["train", f"resume={run}"]) == 0
    assert_same_run(ref, run)


def test_the_malicious_pickle_used_here_does_run_when_unpickled(tmp_path):
    """So that the tests which find no marker file could fail."""
    pickle.loads(pickle.dumps(Marker(tmp_path / "raw")))
    torch.save({"x": Marker(tmp_path / "torch")}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "raw").exists() and (tmp_path / "torch").exists()


def test_pickles_anywhere_in_a_run_are_never_loaded(ws, capsys):
    """Every .pt/.bin/.pth name a loader might look for, in the checkpoints, adapters and run root."""
    root, ref, stopped = ws
    run = _copy(stopped, "pickles")
    marker = root / "PICKLE_LOADED"
    evil = pickle.dumps(Marker(marker))
    places = [run / "checkpoints" / ck / name for ck in ("step-2", "step-4")
              for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_state.bin", "pytorch_model.bin",
                           "trainable.bin")]
    places += [run / d / name for d in ("adapter_best", ".") for name in ("adapter_model.bin", "pytorch_model.bin")]
    for i, path in enumerate(places):
        if i % 2:
            path.write_bytes(evil)
        else:
            torch.save({"state": Marker(marker)}, path)
    assert main(["train", f"resume={run}"]) == 0
    assert not marker.exists()
    for name in ("adapter", "adapter_best"):
        for bad in ("adapter_model.bin", "pytorch_model.bin"):
            torch.save({"state": Marker(marker)}, run / name / bad)
    assert main(["eval", f"run={run}", "adapter=adapter_best"]) == 0
    assert not marker.exists()
    assert_same_run(ref, run)


def test_an_adapter_file_that_is_a_pickle_is_refused(ws, capsys):
    root, ref, stopped = ws
    run = _copy(ref, "pickled-adapter")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(pickle.dumps(Marker(root / "ADAPTER_UNPICKLED")))
    capsys.readouterr()
    assert main(["eval", f"run={run}"]) == 2
    line = last_error(capsys)
    assert line.startswith(f"error: adapter {run / 'adapter'} is damaged or not ptune's") and "retrain" in line
    assert not (root / "ADAPTER_UNPICKLED").exists()


def test_trust_remote_code_is_off_unless_set(monkeypatch):
    import transformers

    from ptune import models
    from ptune.cli import compose

    seen = []

    def from_pretrained(path, **kw):
        seen.append(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    for overrides, expected in (([], False), (["model.trust_remote_code=true"], True)):
        cfg = compose(["model=gpt2", *overrides])
        with pytest.raises(RuntimeError, match="stop here"):
            models.load(cfg.model.name, cfg.model.kind, cfg.model.source, "some/hub-id",
                        trust_remote_code=cfg.model.trust_remote_code)
        assert seen[-1]["trust_remote_code"] is expected and seen[-1]["use_safetensors"] is True


NO_NETWORK = r"""
import json, socket, sys
attempts = []
def refuse(*a, **k):
    attempts.append(repr(a[1:] if a and isinstance(a[0], socket.socket) else a)[:200])
    raise OSError("network is off in this test")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
from ptune.cli import main
codes = [main(["train", "model=tiny-gpt2", *sys.argv[1:], "trainer.max_steps=2"])]
import pathlib
[run] = [p for p in pathlib.Path("outputs").glob("*/*") if (p / "summary.json").exists()]
codes.append(main(["eval", f"run={run}"]))
print(json.dumps({"codes": codes, "attempts": attempts}))
"""


@pytest.mark.slow  # a ptune process with the network cut
def test_nothing_reaches_the_network_when_offline(in_tmp, data_dir):
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK, *TINY], cwd=in_tmp, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [0, 0], "attempts": []}
