"""The adapter: what a finished run hands to inference, and how it is written and read.

    adapter/ (or adapter_best/)
        adapter_model.safetensors   the method's adapter tensors (e.g. the collapsed prefix, not its MLP)
                                    and the head's: head.weight (n_classes, hidden), head.bias with a
                                    linear or soft-verbalizer head, head.proj.weight, head.prototypes with ProtoVerb
        adapter_config.json         the method's description, base model, task, and the head's

The task head is saved beside the method's tensors, as `head.*`, and split off again on load:
methods stay unaware of heads, and a head works the same under every method. Training writes
adapters (ptune.train), inference reads them (ptune.infer); both go through this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from ptune.errors import PtuneError
from ptune.rundir import write_atomic, write_json

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def save_adapter(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """adapter_model.safetensors + adapter_config.json, each replaced atomically.

    Files, not the folder, are swapped: a directory cannot be renamed over a non-empty one in one
    step, and a kill between two renames would leave no adapter at all.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / WEIGHTS, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    write_json(config, directory / CONFIG)


def load_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors); nothing else in the folder is read."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG).read_text())
        return config, load_file(directory / WEIGHTS)
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtuneError(f"adapter {directory} is damaged or not ptune's ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); retrain or resume the run") from None


def adapter_tensors(method) -> dict[str, torch.Tensor]:
    """What the adapter holds: the method's adapter tensors and, with a linear head, head.weight
    (n_classes, hidden) and head.bias (n_classes,)."""
    tensors = method.adapter_tensors()
    head = getattr(method, "head", None)
    if head is None:
        return tensors
    # A method's own `head.*` tensors can only be this submodule's (fine-tune lists them itself).
    return {**tensors, **{f"head.{k}": v.detach().float() for k, v in head.state_dict().items()}}


def load_adapter_tensors(method, tensors: dict[str, torch.Tensor]) -> None:
    """Load an adapter written by `adapter_tensors` into a method built from the same config."""
    head = getattr(method, "head", None)
    if head is None:
        method.load_adapter_tensors(tensors)
        return
    saved = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    expected = head.state_dict()
    if set(saved) != set(expected):
        if not hasattr(head, "config"):  # the linear head
            raise PtuneError("the adapter holds no linear head (head.weight, head.bias) but task.head=linear needs one; "
                             "evaluate it with the task.head it was trained with")
        names = lambda keys: ", ".join(f"head.{k}" for k in sorted(keys)) or "none"  # noqa: E731
        raise PtuneError(f"the adapter holds head tensors {names(saved)} and task.head={head.config()['kind']} needs "
                         f"{names(expected)}; evaluate it with the task.head it was trained with")
    for k, v in saved.items():
        if v.shape != expected[k].shape:
            raise PtuneError(f"adapter tensor head.{k} has shape {tuple(v.shape)}, this task and model need "
                             f"{tuple(expected[k].shape)}; use the task and model the run was trained with")
    method.load_adapter_tensors({k: v for k, v in tensors.items() if not k.startswith("head.")})
    head.load_state_dict(saved)
    head.requires_grad_(False)  # loaded for inference, like a loaded prompt or prefix


def head_config(method, labels) -> dict:
    """adapter_config.json's description of the task head (nothing for generation tasks).
    labels: the task's label words (linear heads record them)."""
    head = getattr(method, "head", None)
    if head is None:
        return {}
    if hasattr(head, "config"):  # verbalizer-type and vocabulary heads: their words (and tensors)
        calibration = getattr(head, "calibration", None)  # task.calibrate (ptune/heads/calibration.py)
        return {"head": {**head.config(), **({"calibration": calibration} if calibration else {})}}
    n_classes, hidden = head.weight.shape
    return {"head": {"kind": "linear", "labels": labels, "hidden": hidden, "n_classes": n_classes,
                     "dropout": head.dropout, "tensors": "head.weight (n_classes, hidden), head.bias (n_classes,)"}}
