"""`ptune eval run=<dir>`: score a finished run on a split of its own task.

Writes eval_<split>.json and predictions/<split>.jsonl in the run directory (ptune.rundir).
Other tasks (domain transfer) are ptune.infer.transfer; several runs at once ptune.infer.ensemble.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from ptune.build import load_run, load_trained, setup_logging
from ptune.config import check
from ptune.errors import PtuneError


def evaluate_run(run: str, split: str = "dev", which: str = "adapter", batch_size: int | None = None,
                 task_overrides: dict | None = None, trust_remote_code: bool = False) -> dict:
    """Score a finished run on `split`. task_overrides ({"task.decoding": "beam", ...}) change how it
    is evaluated (decoding, how many examples), on top of the run's saved config."""
    run_dir, cfg = load_run(run, trust_remote_code)
    for key, value in (task_overrides or {}).items():
        if not key.startswith("task.") or OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise PtuneError(f"ptune eval: {key} is not a task key of this run; its task keys are: "
                             f"{', '.join('task.' + k for k in cfg.task if k != 'name')}")
        OmegaConf.update(cfg, key, value, merge=True)
    check(cfg)  # the overrides meet the same checks as train's
    setup_logging(None)
    _, method, task = load_trained(run_dir, cfg, which)
    scores, records = task.evaluate(method, split, batch_size or cfg.trainer.eval_batch_size)
    out = {"run": str(run_dir), "split": split, "adapter": which, "examples": len(records), "metrics": scores}
    if task_overrides:
        out["overrides"] = dict(task_overrides)
    run_dir.write_eval(split, out)
    run_dir.write_predictions(split, records)
    return out
