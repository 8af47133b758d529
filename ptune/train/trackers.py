"""Experiment trackers beside metrics.jsonl: `trainer.log_with=tensorboard|mlflow|trackio|wandb` (a list
allowed), through Accelerate's tracker classes.

metrics.jsonl stays the source of truth; each tracker gets the same records (their numeric fields,
at the record's step) and the resolved config as hyperparameters (flattened to `group.key`).
Files stay local by default, so it works offline: under `trainer.tracker_dir`, or the run directory
when that is null (a sweep's jobs get their sweep's directory, ptune.train.hydra_app, so they land
as separate runs of one experiment):

    tensorboard   <dir>/tensorboard/<run name>/events.out.tfevents.*
    mlflow        <dir>/mlruns (a file store), experiment <dir's name>, one run per job
    wandb         offline unless WANDB_MODE says otherwise, files under <dir>/wandb
    trackio       trackio's own local store, project <dir's name>
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ptune.config import trackers_of
from ptune.errors import PtuneError

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}


def flat(config: dict, prefix: str = "") -> dict:
    """{"trainer.lr": 0.001, ...}: scalars as they are, lists and None as text (what trackers take)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


class Trackers:
    """The run's trackers; `log(record)` forwards one metrics.jsonl record, `finish()` closes them."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k != "step"}
        for t in self.trackers:
            t.log(values, step=record.get("step"))

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()


def require(cfg: DictConfig) -> None:
    """One PtuneError line when a named tracker's package is missing (before a run directory is claimed)."""
    for name in trackers_of(cfg):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise PtuneError(f"trainer.log_with={name} needs the {PACKAGES[name]} package: pip install "
                             f"{'mlflow-skinny' if name == 'mlflow' else PACKAGES[name]}")


def start(cfg: DictConfig, run_dir: Path, main: bool) -> Trackers:
    """The trackers trainer.log_with names, started, the config stored; none off the main process."""
    names = trackers_of(cfg)
    if not names or not main:
        return Trackers([])
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    root = Path(cfg.trainer.get("tracker_dir") or run_dir).absolute()
    run_dir = Path(run_dir).absolute()
    run_name = str(run_dir.relative_to(root)) if run_dir != root and root in run_dir.parents else run_dir.name
    experiment = root.name
    started = []
    for name in names:
        try:
            if name == "tensorboard":
                t = TensorBoardTracker(run_name, logging_dir=root / "tensorboard")
            elif name == "mlflow":
                import mlflow

                # a file store (MLflow 3 keeps it in maintenance mode and asks for this opt-in): plain files, offline
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((root / "mlruns").as_uri())
                t = MLflowTracker(experiment_name=experiment, logging_dir=str(root / "mlruns"), run_name=run_name)
            elif name == "wandb":
                os.environ.setdefault("WANDB_MODE", "offline")
                t = WandBTracker(experiment, name=run_name, dir=str(root))
            else:
                t = TrackioTracker(experiment, name=run_name)
            t.start()
            t.store_init_configuration(flat(OmegaConf.to_container(cfg, resolve=True)))
        except Exception as e:  # noqa: BLE001 -- a tracker's own failure, said in one line
            Trackers(started).finish()
            raise PtuneError(f"trainer.log_with={name} could not start ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); drop it or fix its setup") from None
        started.append(t)
    return Trackers(started)
