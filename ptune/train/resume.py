"""The resume policy: what `ptune train resume=<run dir> [key=value ...]` may change.

A resumed run continues the saved config (config.yaml) from its last good checkpoint
(ptune.train.checkpoint.latest_good). Which keys win:
- `trainer.*` and `output_dir` overrides win over the saved values: they say how to continue
  (more steps, a lower learning rate after a NaN, another eval cadence);
- `model`, `method` and `task` keys must equal the saved ones: the checkpoint's tensors belong to
  them, so a different value is refused (start a new run instead), an equal one is accepted;
  `model.trust_remote_code=true` is the exception that is needed, not merely accepted: a run
  directory cannot grant it (ptune.build.load_run), so a run that loads a model's own code resumes
  only when the command line says so again;
- a key the saved config does not have is refused like an unknown key of `ptune train`.
Values are read with the same grammar as `ptune train`'s overrides (ptune.config.override_value).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ptune.build import load_run
from ptune.config import GROUPS, override_value
from ptune.errors import PtuneError
from ptune.rundir import RunDir

FIXED = ("model", "method", "task")  # what the checkpoint's tensors belong to


def resume_config(run: str, overrides: list[str]) -> tuple[RunDir, DictConfig]:
    """The run's saved config with the overrides applied as the policy above says."""
    trust = any(o.partition("=")[0] == "model.trust_remote_code" and override_value(o) is True for o in overrides)
    run_dir, cfg = load_run(run, trust_remote_code=trust)  # only the command line grants it (build.load_run)
    for o in overrides:
        key, _, value = o.partition("=")
        if key in GROUPS and key != "trainer":
            if value != cfg[key].name:
                raise PtuneError(f"resume: {key}={value} differs from the run's {key} {cfg[key].name!r}; "
                                 f"a resumed run keeps its {key} (start a new run instead)")
            continue
        if key.split(".")[0] in FIXED:
            old = OmegaConf.select(cfg, key, default="<missing>")
            if old != (override_value(o) if value else None) and str(old) != value:
                raise PtuneError(f"resume: {key}={value} differs from the run's {key}={old}; a resumed run keeps "
                                 f"its model, method and task (start a new run instead)")
            continue
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise PtuneError(f"unknown key {key!r}; `ptune train --help` lists the keys of each group")
        OmegaConf.update(cfg, key, override_value(o) if value else None, merge=True)
    return run_dir, cfg
