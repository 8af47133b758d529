"""`ptune report <sweep dir>`: a sweep's table and plots, written into the sweep directory.

A sweep (`ptune train -m ...`) leaves summary.csv (one row per job: its overrides, run dir and
status, rewritten after every job by ptune.train.sweep.write_sweep_summary) and one run directory per
job (config.yaml, summary.json, metrics.jsonl). This module reads them and writes:

- `report.md`: which override keys vary, one row per job (the varying values, the task's
  `metric_for_best` at the end and at its best evaluation, train tokens/s, peak memory, trainable
  parameters, steps, wall time; a failed job is a row with its error), and the plots below;
- `report_<metric>.png`, `report_tokens_per_s.png`, `report_peak_memory_mb.png`: each against the
  swept numeric key (x), one line per value of the other varying keys (e.g. one per method). The
  metric plot draws the final evaluation (solid) and the best evaluation during training
  (hollow markers) and stars the best job. The x axis is logarithmic when the values span two
  decades or more. Without a numeric varying key the x axis is the varying values as categories.

summary.md gets a link to report.md. Plots use matplotlib's object API (`Figure`, Agg canvas),
so nothing depends on a display or on pyplot's global state.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ptune.errors import PtuneError
from ptune.rundir import write_atomic

PLOTS = ("metric", "train_tokens_per_s", "peak_memory_mb")
# Keys that only re-draw the same experiment (data split, initialisation, order): jobs that differ
# in nothing else are one setting, reported as mean and standard deviation over them.
SEED_KEYS = ("task.few_shot_seed", "trainer.seed", "task.subsample_seed", "model.init_seed")


@dataclass
class Job:
    """One job of a sweep: its overrides as {key: value string}, and what its run left."""

    index: int
    overrides: dict[str, str]
    run_dir: Path | None
    error: str | None = None
    summary: dict = field(default_factory=dict)


def load_sweep(sweep_dir: str | Path) -> list[Job]:
    """The jobs listed in a sweep's summary.csv, with each finished job's summary.json.

    A job whose run directory or summary.json is missing gets an error saying so (it is shown
    as a failed row). PtuneError when `sweep_dir` holds no summary.csv."""
    sweep_dir = Path(sweep_dir)
    table = sweep_dir / "summary.csv"
    if not table.is_file():
        what = "does not exist" if not sweep_dir.exists() else "holds no summary.csv"
        raise PtuneError(f"{sweep_dir} {what}; pass the directory printed by `ptune train -m` (sweep: N jobs in ...)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "overrides" not in rows[0]:
        raise PtuneError(f"{table} lists no jobs; the sweep has not finished its first job")
    jobs = []
    for row in rows:
        overrides = dict(o.partition("=")[::2] for o in row["overrides"].split())
        run_dir = _job_dir(sweep_dir, row.get("run_dir", ""))
        status = row.get("status", "ok")
        job = Job(int(row["job"]), overrides, run_dir,
                  error=status.removeprefix("failed: ") if status != "ok" else None)
        if job.error is None:
            summary = run_dir / "summary.json" if run_dir else None
            if summary is None or not summary.is_file():
                job.error = f"no summary.json in {run_dir or 'its run directory'}"
            else:
                try:
                    job.summary = json.loads(summary.read_text())
                except json.JSONDecodeError as e:
                    job.error = f"{summary} is not valid JSON ({e.msg})"
        jobs.append(job)
    return jobs


def _job_dir(sweep_dir: Path, recorded: str) -> Path | None:
    """A job's run directory: inside the sweep dir by its name (the sweep may have been moved or
    run from another directory), else the path as recorded."""
    if not recorded:
        return None
    inside = sweep_dir / Path(recorded).name
    return inside if inside.is_dir() else Path(recorded)


def varying_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in the order the overrides were given."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    return [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]


def _number(value: str | None) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def seed_keys(jobs: list[Job]) -> list[str]:
    """The varying keys that are seeds (SEED_KEYS): the report aggregates over them."""
    return [k for k in varying_keys(jobs) if k in SEED_KEYS]


def choose_axes(jobs: list[Job]) -> tuple[str | None, list[str]]:
    """(x key, the other varying keys), seeds left out (aggregated over). x is the first varying key
    whose every value is a number (e.g. method.num_virtual_tokens); without one, the first varying
    key (as categories); None when nothing else varies."""
    keys = [k for k in varying_keys(jobs) if k not in SEED_KEYS]
    numeric = [k for k in keys if all(_number(j.overrides.get(k)) is not None for j in jobs)]
    x = numeric[0] if numeric else (keys[0] if keys else None)
    return x, [k for k in keys if k != x]


def metric_name(jobs: list[Job]) -> str | None:
    return next((j.summary.get("metric_for_best") for j in jobs if j.summary.get("metric_for_best")), None)


def job_values(job: Job, metric: str | None) -> dict:
    """What the table and plots show for one job (None where the job has no value)."""
    s = job.summary
    final = (s.get("eval") or {}).get(metric) if metric else None
    best = s.get("best") or {}
    best_value = (best.get("metrics") or {}).get(metric) if metric else None
    test = ((s.get("test") or {}).get("metrics") or {}).get(metric) if metric else None
    return {"metric": final if isinstance(final, (int, float)) else None,
            "test": test if isinstance(test, (int, float)) else None,
            "best": best_value if isinstance(best_value, (int, float)) else None, "best_step": best.get("step"),
            "train_tokens_per_s": s.get("train_tokens_per_s"), "peak_memory_mb": s.get("peak_memory_mb"),
            "trainable_params": s.get("trainable_params"), "steps": s.get("steps"), "wall_time_s": s.get("wall_time_s")}


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(jobs: list[Job], keys: list[str], metric: str | None, sweep_dir: Path) -> list[str]:
    """Markdown lines: one row per job; a failed job shows its error in the status column."""
    m = metric or "metric"
    tested = any(job_values(j, metric)["test"] is not None for j in jobs)
    head = ["job", *keys, f"{m} (final)", f"{m} (best @ step)", *([f"test {m}"] if tested else []), "train tokens/s", "peak MB", "trainable",
            "steps", "wall s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in jobs:
        v = job_values(j, metric)
        best = f"{_fmt(v['best'])} @ {v['best_step']}" if v["best"] is not None else "–"
        link = f"[{j.run_dir.name}]({_relative(j.run_dir, sweep_dir)})" if j.run_dir else str(j.index)
        status = "ok" if j.error is None else "failed: " + j.error.replace("|", "\\|")
        cells = [link, *[j.overrides.get(k, "") for k in keys], _fmt(v["metric"]), best,
                 *([_fmt(v["test"])] if tested else []),
                 _fmt(v["train_tokens_per_s"], 0), _fmt(v["peak_memory_mb"], 0), _fmt(v["trainable_params"]),
                 _fmt(v["steps"]), _fmt(v["wall_time_s"], 1), status]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclass
class Setting:
    """The jobs of one setting (same values of every non-seed key), aggregated over their seeds."""

    overrides: dict[str, str]  # the non-seed varying keys
    jobs: list[Job]

    def stat(self, key: str, metric: str | None) -> tuple[float, float, int] | None:
        """(mean, standard deviation, n) of job_values()[key] over the finished jobs, None if none has it.
        The deviation is the population one (numpy.std, ddof=0), as LM-BFF's reported numbers."""
        values = [v for j in self.jobs if j.error is None and (v := job_values(j, metric)[key]) is not None]
        if not values:
            return None
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), len(values)


def settings(jobs: list[Job]) -> list[Setting]:
    """Jobs grouped by their non-seed varying keys, in first-seen order."""
    keys = [k for k in varying_keys(jobs) if k not in SEED_KEYS]
    out: dict[tuple, Setting] = {}
    for j in jobs:
        values = tuple(j.overrides.get(k, "") for k in keys)
        out.setdefault(values, Setting(dict(zip(keys, values)), [])).jobs.append(j)
    return list(out.values())


def _pm(stat, digits: int = 4) -> str:
    return "–" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def seed_table(jobs: list[Job], metric: str | None) -> list[str]:
    """Markdown lines: one row per setting, mean ± std over its seeds (test where scored, dev final)."""
    m = metric or "metric"
    groups = settings(jobs)
    keys = list(groups[0].overrides) if groups else []
    tested = any(g.stat("test", metric) for g in groups)
    head = [*keys, "seeds (finished / jobs)", *([f"test {m}"] if tested else []), f"dev {m} (final)", f"dev {m} (best)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        done = sum(1 for j in g.jobs if j.error is None)
        cells = [*g.overrides.values(), f"{done} / {len(g.jobs)}", *([_pm(g.stat("test", metric))] if tested else []),
                 _pm(g.stat("metric", metric)), _pm(g.stat("best", metric))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_seeds(jobs: list[Job], x: str | None, groups: list[str], metric: str | None, path: Path) -> bool:
    """The metric (test where scored, else dev final) against x, mean with ±std error bars over the
    seeds, one line per value of the other keys; False when no job has the value."""
    from matplotlib.figure import Figure

    key = "test" if any(job_values(j, metric)["test"] is not None for j in jobs) else "metric"
    done = [j for j in jobs if j.error is None]
    numeric = x is not None and all(_number(j.overrides.get(x)) is not None for j in done)
    categories = list(dict.fromkeys(j.overrides.get(x, "") for j in done)) if x else []
    lines: dict[str, list[tuple[float, tuple]]] = {}
    for g in settings(jobs):
        stat = g.stat(key, metric)
        if stat is None:
            continue
        label = ", ".join(f"{k}={g.overrides.get(k, '')}" for k in groups) or "all settings"
        xv = 0 if x is None else _number(g.overrides[x]) if numeric else categories.index(g.overrides.get(x, ""))
        lines.setdefault(label, []).append((xv, stat))
    if not lines:
        return False
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot()
    xs_all = []
    for label, points in lines.items():
        points.sort(key=lambda p: p[0])
        xs = [p[0] for p in points]
        xs_all += xs
        ax.errorbar(xs, [p[1][0] for p in points], yerr=[p[1][1] for p in points], marker="o", capsize=4, label=label)
    if numeric and log_scale(xs_all):
        ax.set_xscale("log")
    if numeric:
        ticks = sorted(set(xs_all))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    elif x is not None:
        ax.set_xticks(range(len(categories)), categories)
    seeds = ", ".join(seed_keys(jobs))
    ax.set_xlabel(x or "")
    ax.set_ylabel(f"{metric} ({'test' if key == 'test' else 'dev, final'}), mean ± std over {seeds}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def series(jobs: list[Job], x: str | None, groups: list[str], metric: str | None) -> dict[str, list[tuple]]:
    """Per line label ("method=prompt", ...): [(x value, job values)] of the finished jobs, sorted by x.
    x is a number for a numeric key, else the value's position among the categories."""
    done = [j for j in jobs if j.error is None]
    categories = list(dict.fromkeys(j.overrides.get(x, "") for j in done)) if x else []
    numeric = x is not None and all(_number(j.overrides.get(x)) is not None for j in done)
    out: dict[str, list[tuple]] = {}
    for j in done:
        label = ", ".join(f"{k}={j.overrides.get(k, '')}" for k in groups) or "all jobs"
        if x is None:
            xv = j.index
        else:
            xv = _number(j.overrides[x]) if numeric else categories.index(j.overrides.get(x, ""))
        out.setdefault(label, []).append((xv, job_values(j, metric)))
    for points in out.values():
        points.sort(key=lambda p: p[0])
    return out


def log_scale(values: list[float]) -> bool:
    """Log x axis when the (positive) values span two decades or more."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


def plot(jobs: list[Job], x: str | None, groups: list[str], metric: str | None, which: str, path: Path) -> bool:
    """Draw one plot (`which` in PLOTS) to path; False (nothing written) when no job has the value."""
    from matplotlib.figure import Figure

    lines = series(jobs, x, groups, metric)
    key = "metric" if which == "metric" else which
    if not any(p[1][key] is not None for pts in lines.values() for p in pts):
        return False
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.add_subplot()
    xs_all = []
    best = None  # (value, x) of the best final metric over all jobs
    for label, points in lines.items():
        pts = [(xv, v) for xv, v in points if v[key] is not None]
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1][key] for p in pts]
        xs_all += xs
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        if which == "metric":
            bx = [xv for xv, v in pts if v["best"] is not None]
            by = [v["best"] for _, v in pts if v["best"] is not None]
            first = label == next(iter(lines))
            ax.plot(bx, by, linestyle="none", marker="o", markersize=10, markerfacecolor="none",
                    color=line.get_color(), label="best eval during training" if first else "_nolegend_")
            for xv, y in zip(xs, ys):
                if best is None or y > best[0]:
                    best = (y, xv)
    if best is not None:
        ax.plot([best[1]], [best[0]], linestyle="none", marker="*", markersize=16, color="gold",
                markeredgecolor="black", label=f"best final {metric} {best[0]:.4f}")
    numeric = x is not None and all(_number(j.overrides.get(x)) is not None for j in jobs if j.error is None)
    if numeric and log_scale(xs_all):
        ax.set_xscale("log")
    if numeric:  # ticks at the swept values themselves
        ticks = sorted(set(xs_all))
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    if x is not None and not numeric:
        categories = list(dict.fromkeys(j.overrides.get(x, "") for j in jobs if j.error is None))
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(x or "job")
    ylabel = {"metric": f"{metric} (dev, final)", "train_tokens_per_s": "train tokens/s (non-padding)",
              "peak_memory_mb": "peak memory of the job (MB)"}[which]
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_report(sweep_dir: str | Path) -> tuple[Path, str | None]:
    """Write report.md (+ PNGs) into the sweep dir and link it from summary.md.

    Returns (report.md, why the plots are missing or None). A failure to plot (matplotlib
    missing or failing) leaves the table and says why in the report; bad input is a PtuneError."""
    sweep_dir = Path(sweep_dir)
    jobs = load_sweep(sweep_dir)
    finished = [j for j in jobs if j.error is None]
    if not finished:
        raise PtuneError(f"{sweep_dir}: none of its {len(jobs)} job(s) finished (see summary.md); nothing to report")
    x, groups = choose_axes(jobs)
    metric = metric_name(finished)
    s0 = finished[0].summary
    out = [f"# Sweep report: {sweep_dir.name}", "",
           f"`{command(jobs, sweep_dir)}`", "",
           f"{len(jobs)} job(s), {len(jobs) - len(finished)} failed; {s0.get('model')} / {s0.get('task')}, "
           f"{s0.get('device')}, {s0.get('precision')}, torch {s0.get('torch')}; varying: "
           f"{', '.join(k for k in (x, *groups, *seed_keys(jobs)) if k) or 'nothing'}.",
           f"x axis: `{x or 'job'}`; one line per {', '.join(f'`{g}`' for g in groups) or 'sweep'}. "
           f"Metric: {metric or '–'} on the task's dev split ({_eval_size(finished)}).", ""]
    seeds = seed_keys(jobs)
    if seeds:
        out += [f"Over {', '.join(f'`{k}`' for k in seeds)}: mean ± standard deviation (population, ddof=0, as "
                f"LM-BFF) of the finished jobs of each setting.", ""]
        out += seed_table(jobs, metric)
        out += ["", "Every job:", ""]
    out += table(jobs, [k for k in (x, *groups, *seeds) if k], metric, sweep_dir)
    if len(finished) > 1:
        out += ["", "Each job's *peak MB* is its own (ptune.train.loop.reset_peak_memory at its start: peak RSS on CPU, "
                "counted from the memory its process held then, max allocated on GPU). Runs made before 2026-11-30's "
                "fix report the sweep's high-water mark instead. Tokens/s are wall-clock rates: other load on the "
                "machine, parallel jobs of the same sweep included (hydra/launcher=joblib), lowers them."]
    why = None
    try:
        images = []
        for which in PLOTS:
            name = f"report_{metric if which == 'metric' else which}.png"
            draw = plot_seeds if which == "metric" and seeds else None
            if (draw(jobs, x, groups, metric, sweep_dir / name) if draw else
                    plot(jobs, x, groups, metric, which, sweep_dir / name)):
                images.append(name)
    except Exception as e:  # a plot is a convenience: the table stands without it
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
        images = []
    out.append("")
    out += [f"![{name[len('report_'):-4]}]({name})" for name in images]
    if why:
        out.append(f"Plots not drawn: {why}.")
    report = sweep_dir / "report.md"
    write_atomic(report, "\n".join(out) + "\n")
    _link_from_summary(sweep_dir)
    return report, why


def command(jobs: list[Job], sweep_dir: Path | None = None) -> str:
    """The sweep's command line: as it was typed (command.txt, written when the sweep starts), else
    rebuilt from the jobs, each key with its values in job order (a basic sweep's grid)."""
    typed = Path(sweep_dir) / "command.txt" if sweep_dir is not None else None
    if typed is not None and typed.is_file():
        return typed.read_text().strip()
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    parts = []
    for k in keys:
        values = list(dict.fromkeys(j.overrides[k] for j in jobs if k in j.overrides))
        parts.append(f"{k}={','.join(values)}")
    return "ptune train -m " + " ".join(parts)


def _eval_size(jobs: list[Job]) -> str:
    """How many examples the evaluation had, from the first job's config (max_eval_samples)."""
    cfg = jobs[0].run_dir / "config.yaml" if jobs[0].run_dir else None
    if cfg is None or not cfg.is_file():
        return "size unknown"

    n = ((yaml.safe_load(cfg.read_text()) or {}).get("task") or {}).get("max_eval_samples")
    return "all examples" if n is None else f"a deterministic subset of {n} examples, task.max_eval_samples={n}"


def _link_from_summary(sweep_dir: Path) -> None:
    summary = sweep_dir / "summary.md"
    link = "Report (table and plots): [report.md](report.md)"
    text = summary.read_text() if summary.is_file() else None
    if text is not None and link not in text:
        write_atomic(summary, f"{text}\n{link}\n")
