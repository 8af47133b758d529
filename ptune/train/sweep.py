"""What a sweep (`ptune train -m ...`, run by Hydra's launchers and sweepers: hydra_app.py) writes
besides its jobs' run directories, and the expansion its checks read:

- `expand_sweep`: the Cartesian product of a basic sweep's overrides in Hydra's grammar, so that
  hydra_app composes and checks every job's config before the first job starts;
- `write_sweep_summary`: summary.csv / summary.md, one row per job (a failed job is a row),
  rewritten as each job ends;
- `sweep_report`: report.md with its plots at the end of a sweep (ptune/train/report.py).
"""

from __future__ import annotations

import csv
import io
import itertools
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser

from ptune.errors import PtuneError
from ptune.rundir import write_atomic
from ptune.train.report import write_report


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of the sweep overrides (`a=1,2 b=x,y` -> 4 jobs), in Hydra's grammar."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise PtuneError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None
    axes = []
    for o in parsed:
        if o.is_sweep_override():
            axes.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def sweep_report(sweep_dir) -> None:
    """report.md + plots at the end of a sweep; a report that cannot be made costs one line, not the sweep."""
    try:
        report, why = write_report(sweep_dir)
    except Exception as e:  # noqa: BLE001 -- the jobs are done and summarised; the report is extra
        print(f"sweep report not written: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return
    print(f"sweep report: {report}" + (f" (plots not drawn: {why})" if why else ""))


def _flatten_eval(summary: dict) -> dict:
    out = {}
    for k, v in (summary.get("eval") or {}).items():
        if isinstance(v, (int, float)):
            out[f"eval.{k}"] = v
    return out


def write_sweep_summary(sweep_dir: Path, jobs: list[dict]) -> None:
    """summary.csv and summary.md: one row per job, its overrides and final metrics.

    jobs: [{"job": i, "overrides": [...], "run_dir": str, "summary": dict | None, "error": str | None,
            "slurm_job_id": str, "requeued": int (a SLURM job's)}]
    """
    rows = []
    for job in jobs:
        s = job.get("summary") or {}
        row = {"job": job["job"], "overrides": " ".join(job["overrides"]), "run_dir": job["run_dir"],
               "status": "ok" if job.get("error") is None else f"failed: {job['error']}"}
        if job.get("slurm_job_id"):
            row.update(slurm_job_id=job["slurm_job_id"], requeued=job.get("requeued", 0))
        for key in ("steps", "trainable_params", "final_train_loss", "train_tokens_per_s", "wall_time_s"):
            row[key] = s.get(key, "")
        row.update(_flatten_eval(s))
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    write_atomic(Path(sweep_dir) / "summary.csv", table.getvalue())

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    write_atomic(Path(sweep_dir) / "summary.md", f"# Sweep {sweep_dir}\n\n" + "\n".join(lines) + "\n")
