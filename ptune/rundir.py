"""Run directories, metrics.jsonl, summary.json and sweep summaries.

`outputs/YYYY-MM-DD/HH-MM-SS` is claimed with an atomic mkdir; if another job took that second,
`HH-MM-SS-1`, `-2`, ... follow. So two jobs started in the same second, the N jobs of a multirun,
and processes of different launches never share a directory. Under `accelerate launch` only rank 0
creates the directory and the trainer broadcasts its path.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

from ptune.checkpoint import write_json
from ptune.errors import PtuneError


def claim(parent: Path, name: str) -> Path:
    """Create parent/name (or name-1, name-2, ...) atomically and return it.

    An output folder that cannot be created or written (permissions, a file in the way, a
    read-only or full disk) is one PtuneError line; nothing existing is touched."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for k in range(10_000):
            path = parent / (name if k == 0 else f"{name}-{k}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise PtuneError(f"cannot create a run directory under {parent} ({e.strerror or e}); set output_dir= "
                         f"to a folder you can write") from None
    raise PtuneError(f"could not create a run directory under {parent}: 10,000 names taken; set output_dir=")


def new_run_dir(root: str | Path = "outputs") -> Path:
    """outputs/YYYY-MM-DD/HH-MM-SS[-k]."""
    now = time.localtime()
    return claim(Path(root) / time.strftime("%Y-%m-%d", now), time.strftime("%H-%M-%S", now))


def is_run_dir(path: Path) -> bool:
    """A run directory has its config.yaml (written before the first step; checkpoints come later)."""
    return (Path(path) / "config.yaml").is_file()


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per logged step or evaluation."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: a resumed run rewrites them exactly as an unbroken run would."""
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict) -> None:
    write_json(summary, Path(run_dir) / "summary.json")


def _flatten_eval(summary: dict) -> dict:
    out = {}
    for k, v in (summary.get("eval") or {}).items():
        if isinstance(v, (int, float)):
            out[f"eval.{k}"] = v
    return out


def write_sweep_summary(sweep_dir: Path, jobs: list[dict]) -> None:
    """summary.csv and summary.md: one row per job, its overrides and final metrics.

    jobs: [{"job": i, "overrides": [...], "run_dir": str, "summary": dict | None, "error": str | None}]
    """
    rows = []
    for job in jobs:
        s = job.get("summary") or {}
        row = {"job": job["job"], "overrides": " ".join(job["overrides"]), "run_dir": job["run_dir"],
               "status": "ok" if job.get("error") is None else f"failed: {job['error']}"}
        for key in ("steps", "trainable_params", "final_train_loss", "train_tokens_per_s", "wall_time_s"):
            row[key] = s.get(key, "")
        row.update(_flatten_eval(s))
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    (sweep_dir / "summary.md").write_text(f"# Sweep {sweep_dir}\n\n" + "\n".join(lines) + "\n")
