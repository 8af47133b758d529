"""Training checkpoints: atomic, pickle-free saving of the state a resumed run needs.

Everything is safetensors or JSON. A checkpoint is written into a hidden temporary folder, every
file fsync'ed, a manifest of SHA-256 checksums written last, then the folder renamed into place:
a crash leaves either the whole checkpoint or none. On resume the newest checkpoint whose manifest
verifies is used; a damaged one is reported and skipped.

    checkpoints/step-N/
        trainable.safetensors   every tensor the optimizer updates (incl. reparameterization MLPs)
        optimizer.safetensors   per-parameter optimizer state, keyed "<param name>.<state key>"
        rng.safetensors         torch CPU (and CUDA) generator states
        state.json              step, data position, best eval, optimizer hyper-parameters
        manifest.json           sha256 of each file above
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ptune.errors import PtuneError
from ptune.rundir import write_json

log = logging.getLogger(__name__)

_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


# -- optimizer state ---------------------------------------------------------------------------
def optimizer_to_flat(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """(tensors, json): optimizer state keyed by parameter name instead of pickled dicts."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{names[idx]}.{key}"] = value
            else:
                scalars[f"{names[idx]}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars, "names": names}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    names = meta["names"]
    state: dict[int, dict] = {}
    for idx, name in enumerate(names):
        entry = {k[len(name) + 1:]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        entry.update({k[len(name) + 1:]: v for k, v in meta["scalars"].items() if k.rsplit(".", 1)[0] == name})
        if entry:
            state[idx] = entry
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- training checkpoints ----------------------------------------------------------------------
def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors])


def save_checkpoint(root: Path, step: int, trainable: dict, optimizer_tensors: dict, rng: dict, state: dict,
                    keep_last: int = 2) -> Path:
    """Write checkpoints/step-<step> atomically and keep only the newest `keep_last`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # left by a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}-"))
    try:
        save_file(_contiguous(trainable), tmp / "trainable.safetensors")
        save_file(_contiguous(optimizer_tensors), tmp / "optimizer.safetensors")
        save_file(_contiguous(rng), tmp / "rng.safetensors")
        write_json(state, tmp / "state.json")
        for name in _FILES:
            _fsync(tmp / name)
        write_json({name: _sha256(tmp / name) for name in _FILES}, tmp / "manifest.json")
    except (OSError, SafetensorError) as e:  # disk full, quota, I/O error: the older checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(root)
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise PtuneError(f"could not write checkpoint step-{step} in {root} ({why}); the previous "
                         f"checkpoint {previous[-1].name if previous else '(none)'} is intact. Free space, then "
                         f"continue with: ptune train resume={root.parent}") from None
    if final.exists():  # the same step saved again (e.g. end of a resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders start with a dot)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def verify(path: Path) -> str | None:
    """None if the checkpoint's files match its manifest and parse, else what is wrong.

    The checksums catch truncation and flipped bits; parsing the safetensors headers and the JSON
    catches a file replaced together with its checksum (e.g. a pickle dropped in by hand), which
    the loaders would otherwise meet mid-resume. Other files in the folder are never read.
    """
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.exists():
        return "no manifest.json"
    try:
        sums = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest.json is not valid JSON"
    if not isinstance(sums, dict):
        return "manifest.json is not a table of checksums"
    for name in _FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
        if _sha256(path / name) != sums.get(name):
            return f"{name} does not match its checksum"
    for name in _FILES:
        try:
            if name.endswith(".safetensors"):
                with safe_open(path / name, framework="pt"):
                    pass
            elif not isinstance(json.loads((path / name).read_text()), dict):
                return f"{name} is not a JSON object"
        except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            return f"{name} does not parse ({type(e).__name__})"
    return None


def finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def latest_usable(root: Path) -> Path | None:
    """The newest checkpoint a resume can continue from: it verifies, and its trained tensors and
    optimizer state are all finite (what the advice after a NaN names)."""
    for path in reversed(list_checkpoints(root)):
        if verify(path) is None:
            saved = load_checkpoint(path)
            if finite(saved["trainable"]) and finite(saved["optimizer"]):
                return path
    return None


def latest_good(root: Path) -> Path | None:
    """The newest checkpoint that verifies; each damaged one is logged (one line) and skipped."""
    for path in reversed(list_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is damaged (%s); skipped, trying the previous one", path, problem)
    return None


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    return {
        "trainable": load_file(path / "trainable.safetensors"),
        "optimizer": load_file(path / "optimizer.safetensors"),
        "rng": load_file(path / "rng.safetensors"),
        "state": json.loads((path / "state.json").read_text()),
    }
