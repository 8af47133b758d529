"""`ptune train -m ...` (and `ptune train` with `hydra.*` overrides or Hydra's flags) as a Hydra
application: Hydra's own launchers (basic, joblib, submitit_local, submitit_slurm, ...), sweepers
(basic, optuna), `hydra.run.dir` / `hydra.sweep.dir`, `--cfg job|all`, `--info`, shell completion.

What ptune adds around Hydra, in the main process, before any job starts (`run`):
- every job of a basic sweep is composed and value-checked (a bad value in job 2 never lets job 1
  train); for other sweepers the fixed overrides are, and each trial is checked in its own job;
- the run or sweep directory is claimed uniquely (`outputs/<date>/<time>[-k]`, as ptune.rundir does)
  and handed to Hydra as hydra.run.dir / hydra.sweep.dir; one the user gives that already holds a
  run or a sweep is refused, never written into;
- an Optuna sweep's direction comes from the task's metric (maximize accuracy, BLEU, ...) unless
  hydra.sweeper.direction is given.
In each job (`task`, which a launcher may run in another process or on another machine): the
training boundary (ptune.train.job.train) into the job's directory (a job whose directory already
holds its own run, because a cluster requeued it, resumes that run from its last checkpoint), its
row appended to the
sweep's summary (summary.csv / summary.md, under a file lock: jobs of several processes lose no
row), its metric returned (an Optuna trial's objective; NaN for a failed job, which Optuna records
as a failed trial and a basic sweep as a failed row). A job that a signal stops on SLURM
(submitit_slurm: a preemption or time-limit signal, USR1/USR2, or SIGTERM) saves a checkpoint at
its step boundary and is requeued through submitit, with no row until it ends; its row then carries
its SLURM job id and how many times it was requeued, once. At the end of a sweep (`SweepEnd`, a
Hydra callback in the main process): best.json and a "best job" line in summary.md, and the report.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import torch
from hydra import main as hydra_main
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ptune import rundir, tasks
from ptune.config import CONF_DIR, check, compose, task_kwargs
from ptune.errors import PtuneError, Stopped
from ptune.train.job import headline, train
from ptune.train.sweep import expand_sweep, sweep_report, write_sweep_summary

HYDRA_FLAGS = ("--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--hydra-help", "--package", "-p",
               "--resolve", "--config-name", "-cn", "--config-dir", "-cd")
JOBS = "jobs.jsonl"  # one record per finished job, appended under the lock; summary.csv/md are made from it


def uses_hydra(argv: list[str]) -> bool:
    """Whether `ptune train <argv>` goes through Hydra's application (else ptune's direct path)."""
    return any(a in ("-m", "--multirun") or a.split("=")[0] in HYDRA_FLAGS or a.startswith(("hydra.", "hydra/",
               "hparams_search=")) for a in argv)


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides)."""
    flags, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("-m", "--multirun"):
            pass
        elif a.split("=")[0] in HYDRA_FLAGS:
            flags.append(a)
            if a in ("--cfg", "-c", "--shell-completion", "-sc", "--package", "-p") and i + 1 < len(argv) \
                    and not argv[i + 1].startswith("-"):
                flags.append(argv[i + 1])  # --cfg job, -sc install=bash, -p trainer
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags, overrides


def _given(overrides: list[str], key: str) -> str | None:
    return next((o.partition("=")[2] for o in overrides if o.lstrip("+~").partition("=")[0] == key), None)


def _sweeps(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(sweep overrides a=1,2 / choice() / interval() ..., the fixed ones), by Hydra's parser."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:  # noqa: BLE001 -- Hydra's grammar errors have several types
        raise PtuneError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None
    sweep = [o.input_line for o in parsed if o.is_sweep_override()]
    return sweep, [o.input_line for o in parsed if not o.is_sweep_override()]


def _refuse_taken(path: str, what: str) -> None:
    p = Path(path)
    if p.exists() and (rundir.is_run_dir(p) or (p / "summary.csv").exists() or (p / JOBS).exists()):
        raise PtuneError(f"{what}={path} already holds a {'run' if rundir.is_run_dir(p) else 'sweep'}; ptune never "
                         f"writes into one: choose a new directory (or resume a run with ptune train resume=<dir>)")


def prepare(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """Check everything a job could fail on before Hydra starts any, and claim the directory:
    (flags, overrides to hand to Hydra, multirun)."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    flags, overrides = _split(argv)
    if any(f.split("=")[0] in ("--config-name", "-cn", "--config-dir", "-cd") for f in flags):
        raise PtuneError("--config-name / --config-dir choose another config tree; ptune trains from its own conf/: "
                         "use groups and overrides instead")
    bad = [a for a in overrides if a.startswith("-") or "=" not in a]
    if bad:
        raise PtuneError(f"unexpected argument {bad[0]!r}; arguments are key=value overrides (see ptune train --help)")
    if any(o.startswith("resume=") for o in overrides):
        raise PtuneError("resume= continues one run directory: ptune train resume=<dir> [trainer.* overrides], "
                         "without -m or hydra.* overrides")
    sweep, fixed = _sweeps(overrides)
    if flags:  # --cfg, --info, shell completion: Hydra prints, nothing runs or is written
        if multirun:
            raise PtuneError(f"{flags[0]} prints one job's config and runs nothing: drop -m and the swept values "
                             f"(Hydra takes one of -m, --cfg, --info, --shell-completion)")
        compose([o for o in fixed if not o.startswith(("hydra.", "hydra/"))])
        return flags, overrides, multirun
    if sweep and not multirun:
        raise PtuneError("a comma-separated value is a sweep: add -m (ptune train -m ...), or quote it / use [a,b] "
                         "for a list")
    hydra_cfg = compose(fixed, hydra=True).hydra  # also checks hydra/launcher=..., hydra/sweeper=... exist
    basic = hydra_cfg.sweeper._target_.endswith("BasicSweeper")
    ours = [o for o in overrides if not o.startswith(("hydra.", "hydra/"))]
    jobs = expand_sweep(ours) if multirun and basic else [[o for o in ours if o not in sweep]]
    configs = [compose(job) for job in jobs]
    for cfg in configs:  # every job of a basic sweep; the fixed part of a search
        check(cfg)
        rundir.refuse_inside_run(cfg.output_dir, "output_dir")
    extra = []
    if multirun:
        given = _given(overrides, "hydra.sweep.dir")
        if given:
            _refuse_taken(given, "hydra.sweep.dir")
            where = given
        else:
            where = rundir.new_run_dir(configs[0].output_dir)
            extra.append(f"hydra.sweep.dir={where}")
        what = f"{len(jobs)} jobs" if basic else f"a {hydra_cfg.sweeper._target_.rsplit('.', 1)[-1]} search"
        print(f"sweep: {what} in {where} (launcher {hydra_cfg.launcher._target_.rsplit('.', 1)[-1]})", flush=True)
        if not basic and "direction" in hydra_cfg.sweeper and _given(overrides, "hydra.sweeper.direction") is None:
            task = tasks.build(configs[0].task.name, **task_kwargs(configs[0]))
            extra.append(f"hydra.sweeper.direction={'maximize' if task.greater_is_better else 'minimize'}")
    else:
        given = _given(overrides, "hydra.run.dir")
        if given:
            _refuse_taken(given, "hydra.run.dir")
        else:
            extra.append(f"hydra.run.dir={rundir.new_run_dir(configs[0].output_dir)}")
    return flags, overrides + extra, multirun


def run(argv: list[str]) -> int:
    """`ptune train` through Hydra: 0 when every job finished, 1 when a sweep's job failed, 2 for a
    single run that failed (its one line is printed by the job)."""
    flags, overrides, multirun = prepare(argv)
    if multirun and not flags:  # the sweep as typed, for its report (a search's trials are not a grid)

        where = Path(_given(overrides, "hydra.sweep.dir"))
        where.mkdir(parents=True, exist_ok=True)
        rundir.write_atomic(where / "command.txt", "ptune train " + " ".join(shlex.quote(a) for a in argv) + "\n")
    app = hydra_main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(task)
    saved = sys.argv
    sys.argv = ["ptune train", *(["-m"] if multirun else []), *flags, *overrides]
    STATE.clear()
    try:
        app()
    finally:
        sys.argv = saved
    if flags:
        return 0
    if multirun:
        records = read_jobs(Path(_given(overrides, "hydra.sweep.dir")))
        return 1 if not records or any(r.get("error") for r in records) else 0
    return 2 if STATE.get("error") else 0


STATE: dict = {}  # the outcome of a single run, in this process (Hydra's run mode calls `task` here)


def task(cfg: DictConfig) -> float:
    """Hydra's task function: one training job in the directory Hydra made for it. Returns the
    task's metric at the end (an Optuna objective), NaN when the job failed."""

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    record = {"job": hc.job.num if multirun else 0, "overrides": list(hc.overrides.task), "run_dir": "",
              "summary": None, "error": None, "pid": os.getpid(), **_slurm_job()}
    _per_job_resources(hc)
    if "slurm_job_id" in record:
        record["torch_threads"] = torch.get_num_threads()  # what cpus_per_task gave the job
    _distributed_from_slurm()
    value = math.nan
    try:
        if multirun and cfg.trainer.get("log_with") and not cfg.trainer.get("tracker_dir"):
            cfg.trainer.tracker_dir = str(Path(hc.sweep.dir).absolute())  # the sweep is the experiment
        result = train(cfg, run_dir=out, resume=_own_run(out, cfg))
        record.update(run_dir=result["run_dir"], summary=result["summary"])
        text = headline(result)
        if text:
            print(text, flush=True)
        summary = result["summary"] or {}
        metric = (summary.get("eval") or {}).get(summary.get("metric_for_best"))
        value = float(metric) if isinstance(metric, (int, float)) else math.nan
    except PtuneError as e:
        if isinstance(e, Stopped):
            try:
                _requeue(e)  # on SLURM under submitit: does not return (the job is requeued, this process exits)
            except PtuneError as not_requeued:
                e = not_requeued
        _failed(record, e, out, multirun)
    if multirun and int(os.environ.get("RANK", 0)) == 0:  # a job of several processes is one row
        record_job(Path(hc.sweep.dir), record)
    return value


def _failed(record: dict, e: PtuneError, out: Path, multirun: bool) -> None:
    record["error"] = str(e)
    label = f"job {record['job']} ({' '.join(record['overrides'])}): " if multirun else ""
    print(f"error: {label}{e}", file=sys.stderr, flush=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # nothing was written: no empty directory is left behind
    STATE["error"] = str(e)


def _distributed_from_slurm() -> None:
    """A SLURM job of several tasks (hydra.launcher.tasks_per_node=N, nodes=M) is one training job of
    N*M processes: each task gets torch.distributed's env:// variables (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK) from SLURM's, as `accelerate launch` or torchrun would set
    them, and Accelerate joins them (gloo on CPU, NCCL on GPUs). Variables already set are kept."""
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "RANK" in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().activated():
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _own_run(out: Path, cfg: DictConfig) -> bool:
    """Whether the job's directory already holds this job's run: a cluster requeued the job (ptune
    claimed the sweep directory new, so nothing else writes there), and training resumes it from
    its last checkpoint. A run of another config there is refused, never overwritten."""
    if not rundir.is_run_dir(out):
        return False
    saved = rundir.RunDir(out).config.read_text()
    if saved != OmegaConf.to_yaml(cfg, resolve=True):
        raise PtuneError(f"{out} already holds a run of another config; a requeued job resumes only its own run")
    return True


def _slurm_state(job_id: str) -> str:
    """SLURM's state of a job (squeue: RUNNING, COMPLETING, ...); '' when squeue cannot say."""
    try:
        done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip().split("\n")[0] if done.returncode == 0 else ""


def _slurm_job() -> dict:
    """A SLURM job's id (array jobs: <array id>_<task>) and how many times SLURM requeued it."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    return {"slurm_job_id": job_id, "requeued": int(os.environ.get("SLURM_RESTART_COUNT", 0))}


def _requeue(stopped: Stopped) -> None:
    """Hand a stopped job to submitit's own preemption handler (the one it installed for its signal,
    USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise): it pickles the job again (the launcher's
    `checkpoint`), runs `scontrol requeue` (a time-limit stop counts against max_num_timeout) and
    exits. Returns only where there is nothing to requeue: no submitit job on SLURM, or a stop by
    Ctrl-C or another process's signal. SIGTERM is also what `scancel <job>` sends: a job that SLURM
    no longer calls RUNNING (COMPLETING: cancelled or at its time limit) is not requeued but ends as
    a failed row (PtuneError), its checkpoint saved for `ptune train resume=`."""
    if stopped.signum is None or stopped.signum == signal.SIGINT or "SLURM_JOB_ID" not in os.environ:
        return
    from submitit import JobEnvironment  # the job's own launcher (a dependency); imported only inside a SLURM job

    env = JobEnvironment()
    if not env.activated() or env.cluster != "slurm":
        return
    handler = signal.getsignal(env._usr_sig())  # restored by the loop when it stopped
    if not callable(handler) or getattr(handler, "__name__", "") != "checkpoint_and_try_requeue":
        return
    if stopped.signum == signal.SIGTERM:
        state = _slurm_state(env.job_id)
        if state != "RUNNING":
            raise PtuneError(f"{stopped}; not requeued: SLURM job {env.job_id} is {state or 'gone'} (cancelled, or past "
                             f"its time limit), not preempted")
    print(f"{stopped}; requeueing SLURM job {env.job_id}", file=sys.stderr, flush=True)
    try:
        handler(stopped.signum, None)
    except Exception as e:  # noqa: BLE001 -- scontrol refused (a cancelled job) or submitit gave up (timeouts)
        raise PtuneError(f"{stopped}; not requeued: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _per_job_resources(hc) -> None:
    """Parallel jobs on one machine share it: under the joblib launcher each job takes
    cores / n_jobs torch threads, and, with several GPUs, GPU (job number mod GPUs); a SLURM job
    takes the cores it was given (SLURM_CPUS_PER_TASK, hydra.launcher.cpus_per_task), so jobs
    sharing a node do not oversubscribe it."""
    launcher = str(hc.launcher.get("_target_", ""))
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
    if "Joblib" not in launcher:
        return

    n_jobs = hc.launcher.get("n_jobs") or 1
    n_jobs = os.cpu_count() if n_jobs < 0 else n_jobs
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, n_jobs)))
    if torch.cuda.device_count() > 1:
        torch.cuda.set_device(hc.job.num % torch.cuda.device_count())


# -- the sweep's summary, from several processes ---------------------------------------------------
def record_job(sweep_dir: Path, record: dict) -> None:
    """Append one job's record and rewrite summary.csv / summary.md, under an exclusive lock on the
    sweep's lock file: jobs finishing at once in several processes lose no row."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / ".summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(sweep_dir / JOBS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        write_sweep_summary(sweep_dir, read_jobs(sweep_dir))


def read_jobs(sweep_dir: Path) -> list[dict]:
    """One record per job, the last it appended: a job that a cluster ran again (requeued after a
    failure row, say) counts once, with its final outcome."""
    path = Path(sweep_dir) / JOBS
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[r["job"]] = r
    return sorted(records.values(), key=lambda r: r["job"])


def best_job(records: list[dict]) -> dict | None:
    """The finished job with the best final metric, by the task's direction."""
    scored = []
    for r in records:
        s = r.get("summary") or {}
        value = (s.get("eval") or {}).get(s.get("metric_for_best"))
        if isinstance(value, (int, float)) and not math.isnan(value):
            scored.append((value, r, s))
    if not scored:
        return None
    greater = _greater_is_better(scored[0][2])
    value, r, s = (max if greater else min)(scored, key=lambda x: x[0])
    return {"job": r["job"], "run_dir": r["run_dir"], "overrides": r["overrides"], "metric": s.get("metric_for_best"),
            "value": value, "direction": "maximize" if greater else "minimize"}


def _greater_is_better(summary: dict) -> bool:
    task = tasks.TASKS.get(summary.get("task"))
    return bool(getattr(task, "greater_is_better", True))


class SweepEnd(Callback):
    """At the end of a sweep, in the main process: best.json, the best job in summary.md, the report."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = read_jobs(sweep_dir)
        best = best_job(records)
        if best is not None:
            rundir.write_json(best, sweep_dir / "best.json")
            line = (f"Best job: {best['job']} ({' '.join(best['overrides'])}), {best['metric']} {best['value']:.4f} "
                    f"({best['direction']}), run directory {best['run_dir']}")
            summary = sweep_dir / "summary.md"
            if summary.is_file():
                rundir.write_atomic(summary, summary.read_text() + f"\n{line}\n")
            print(line)
        print(f"sweep summary: {sweep_dir / 'summary.md'}")
        if records:
            sweep_report(sweep_dir)
