"""`ptune <command> [key=value ...]`: train (single run or -m sweep), eval, predict, export.

Configs are composed with Hydra's compose API and its override grammar (`group=option`,
`a.b=value`, `-m a.b=1,2,3`), but the run loop is ours rather than `@hydra.main`: that is how
errors stay one line, run directories stay unique per job (see ptune.rundir), and a sweep writes
its summary.csv/summary.md after every job. docs/design.md says more.
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import traceback
from pathlib import Path

from ptune.errors import PtuneError

# conf/ sits at the repository root (editable install); a wheel carries it as ptune/conf.
_ROOT_CONF = Path(__file__).resolve().parent.parent / "conf"
CONF_DIR = _ROOT_CONF if (_ROOT_CONF / "train.yaml").exists() else Path(__file__).resolve().parent / "conf"
GROUPS = ("method", "model", "task", "trainer")

USAGE = """usage: ptune <command> [key=value ...]

commands:
  train     train a method: ptune train [-m] [method=prefix] [model=...] [task=...] [trainer.max_steps=...]
            resume a run:   ptune train resume=outputs/YYYY-MM-DD/HH-MM-SS
  eval      evaluate a finished run: ptune eval run=<run dir> [split=dev|test] [adapter=adapter|adapter_best]
            [task.decoding=beam task.num_beams=5 task.max_eval_samples=null ...]  (how to evaluate)
            another task (domain transfer): ptune eval run=<run dir> task=<task> [task.<key>=...]
            [label_map=<trained>:<new>,...|<file.json|yaml>]
            a prompt ensemble (runs of one task, one batched pass): ptune eval run=<dir1>,<dir2>,...
            ensemble=vote|mean [split=dev] [out=<file.json>]
  predict   predict for a file: ptune predict run=<run dir> input=<file.jsonl|csv> [output=<file.jsonl>]
            several runs on one backbone, rows naming their "adapter": run=sst2:<dir>,e2e:<dir>
  serve     answer JSON over HTTP with one or several runs: ptune serve run=<dir>[,<dir>...] [host=127.0.0.1]
            [port=8000] [max_batch=64] [max_input_chars=4000] [batch_size=16]  (POST /predict, GET /adapters)
  export    write a run's adapter in PEFT's format (peft.PeftModel.from_pretrained loads it):
            ptune export run=<run dir> out=<new dir> [format=peft] [adapter=adapter|adapter_best]
  report    a sweep's table and plots (report.md + PNGs in the sweep dir): ptune report <sweep dir>

`ptune train --help` lists the config groups, their options and keys.
Errors are one line; set PTUNE_TRACEBACK=1 to see the traceback."""


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _defaults() -> dict[str, str]:
    from omegaconf import OmegaConf

    out = {}
    for entry in OmegaConf.load(CONF_DIR / "train.yaml").defaults:
        if not isinstance(entry, str):
            out.update({str(k): str(v) for k, v in entry.items()})
    return out


def train_help(overrides: list[str]) -> str:
    chosen = _defaults()
    for o in overrides:
        key, _, value = o.partition("=")
        if key in GROUPS and value in options(key):
            chosen[key] = value
    lines = ["usage: ptune train [-m] [group=option ...] [key=value ...]", "", "groups (current choice in [ ]):"]
    for g in GROUPS:
        lines.append(f"  {g:8s} " + " ".join(f"[{o}]" if o == chosen[g] else o for o in options(g)))
    lines += ["", "keys of the current choices (group.key: default  # meaning):"]
    for g in GROUPS:
        for raw in (CONF_DIR / g / f"{chosen[g]}.yaml").read_text().splitlines():
            if raw and not raw.startswith(("#", " ")) and ":" in raw:
                lines.append(f"  {g}.{raw}")
    lines += ["  output_dir: outputs", "  resume: null              # a run directory to continue", "",
              "sweep: ptune train -m method.num_virtual_tokens=1,5,10  (one run per value, summary in the sweep dir)"]
    return "\n".join(lines)


def _check_groups(overrides: list[str]) -> None:
    for o in overrides:
        key, eq, value = o.lstrip("+~").partition("=")
        if key in GROUPS and eq:
            for v in value.split(","):
                if v not in options(key):
                    raise PtuneError(f"unknown {key} {v!r}; choose one of: {', '.join(options(key))}")


def compose(overrides: list[str]):
    """The composed config for one job. Raises PtuneError with one line on any problem."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _check_groups(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=overrides)
    except Exception as e:  # Hydra's messages are several lines; keep the one that names the problem
        raise PtuneError(_hydra_message(e, overrides)) from None


def _hydra_message(e: Exception, overrides: list[str]) -> str:
    text = f"{e} {e.__cause__ or ''}"
    if "Ambiguous value" in text or "Sweep parameters" in text:
        return "a comma-separated value is a sweep: add -m (ptune train -m ...), or quote it / use [a,b] for a list"
    if "not in struct" in text or "Could not override" in text or "Could not append" in text:
        key = next((o.partition("=")[0] for o in overrides if f"'{o.partition('=')[0]}'" in text), None)
        return f"unknown key {key!r}; `ptune train --help` lists the keys of each group" if key else text.splitlines()[0]
    if "parse" in text.lower() or "mismatched input" in text or "no viable" in text:
        return f"cannot parse overrides {' '.join(overrides)!r}: write them as key=value"
    return text.strip().splitlines()[0]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Cartesian product of the sweep overrides (`a=1,2 b=x,y` -> 4 jobs), in Hydra's grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

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


def _resume_config(run: str, overrides: list[str]):
    """The run's saved config; trainer/output overrides win, model/method/task must not change."""
    import yaml
    from omegaconf import OmegaConf

    from ptune.train import load_run

    run_dir, cfg = load_run(run)
    for o in overrides:
        key, _, value = o.partition("=")
        if key in GROUPS and key != "trainer":
            if value != cfg[key].name:
                raise PtuneError(f"resume: {key}={value} differs from the run's {key} {cfg[key].name!r}; "
                                 f"a resumed run keeps its {key} (start a new run instead)")
            continue
        if key.split(".")[0] in ("model", "method", "task"):
            old = OmegaConf.select(cfg, key, default="<missing>")
            if str(old) != value:
                raise PtuneError(f"resume: {key}={value} differs from the run's {key}={old}; a resumed run keeps "
                                 f"its model, method and task (start a new run instead)")
            continue
        if OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise PtuneError(f"unknown key {key!r}; `ptune train --help` lists the keys of each group")
        OmegaConf.update(cfg, key, yaml.safe_load(value) if value else None, merge=True)
    return run_dir, cfg


def _headline(result: dict) -> str:
    """Run directory and headline metric; empty on processes other than rank 0 (no summary)."""
    if result.get("summary") is None:
        return ""
    s = result["summary"]
    key = s.get("metric_for_best")
    value = (s.get("eval") or {}).get(key)
    shown = f"{value:.4f}" if isinstance(value, float) else value
    return f"run: {result['run_dir']}\n{s.get('task')} dev {key}: {shown}  (final train loss {s.get('final_train_loss')})"


def _print(text: str) -> None:
    if text:
        print(text)


def cmd_train(argv: list[str]) -> int:
    from ptune import rundir
    from ptune.train import train

    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    bad = [a for a in overrides if a.startswith("-") or "=" not in a]
    if bad:
        raise PtuneError(f"unexpected argument {bad[0]!r}; arguments are key=value overrides (see ptune train --help)")
    resume = next((o.partition("=")[2] for o in overrides if o.startswith("resume=")), None)
    if resume:
        if multirun:
            raise PtuneError("resume= and -m cannot be combined; resume one run directory at a time")
        run_dir, cfg = _resume_config(resume, [o for o in overrides if not o.startswith("resume=")])
        _print(_headline(train(cfg, run_dir=run_dir, resume=True)))
        return 0
    if not multirun:
        _print(_headline(train(compose(overrides))))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PtuneError("-m sweeps run one process; launch each job separately under accelerate launch")
    jobs = expand_sweep(overrides)
    configs = [compose(job) for job in jobs]  # every job's config is checked before the first runs
    sweep_dir = rundir.new_run_dir(configs[0].output_dir)
    print(f"sweep: {len(jobs)} jobs in {sweep_dir}")
    records, failed = [], 0
    for i, (job, cfg) in enumerate(zip(jobs, configs)):
        record = {"job": i, "overrides": job, "run_dir": "", "summary": None, "error": None}
        try:
            result = train(cfg, run_dir=rundir.claim(sweep_dir, str(i)))
            record.update(run_dir=result["run_dir"], summary=result["summary"])
            print(_headline(result))
        except PtuneError as e:
            failed += 1
            record["error"] = str(e)
            print(f"error: job {i} ({' '.join(job)}): {e}", file=sys.stderr)
        records.append(record)
        rundir.write_sweep_summary(sweep_dir, records)
    print(f"sweep summary: {sweep_dir / 'summary.md'}")
    _sweep_report(sweep_dir)
    return 1 if failed else 0


def _sweep_report(sweep_dir) -> None:
    """report.md + plots at the end of a sweep; a report that cannot be made costs one line, not the sweep."""
    from ptune.report import write_report

    try:
        report, why = write_report(sweep_dir)
    except Exception as e:  # noqa: BLE001 -- the jobs are done and summarised; the report is extra
        print(f"sweep report not written: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return
    print(f"sweep report: {report}" + (f" (plots not drawn: {why})" if why else ""))


def _kv(argv: list[str], allowed: dict[str, str | None], command: str) -> dict:
    out = dict(allowed)
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in allowed:
            raise PtuneError(f"ptune {command}: unexpected argument {a!r}; expected {' '.join(k + '=...' for k in allowed)}")
        out[key] = value
    return out


def cmd_eval(argv: list[str]) -> int:
    import yaml

    from ptune.train import evaluate_run

    if any(x.startswith("ensemble=") for x in argv):  # several runs of one task together (ptune/ensemble.py)
        return _ensemble(argv)
    a = _kv([a for a in argv if not a.startswith("task.")],
            {"run": None, "split": "dev", "adapter": "adapter", "batch_size": None, "task": None, "label_map": None},
            "eval")
    if not a["run"]:
        raise PtuneError("ptune eval needs run=<run dir>")
    if a["adapter"] not in ("adapter", "adapter_best"):
        raise PtuneError(f"adapter={a['adapter']!r}: choose adapter (final) or adapter_best")
    if a["task"] or a["label_map"]:  # domain transfer: the run's adapter on another task (ptune/transfer.py)
        out = _transfer(a, [x for x in argv if x.startswith("task.")])
    else:
        # task.<key>=<value> (e.g. task.decoding=beam task.max_eval_samples=null) changes how the run is evaluated
        task_kv = {k: yaml.safe_load(v) for k, _, v in (x.partition("=") for x in argv if x.startswith("task."))}
        out = evaluate_run(a["run"], a["split"], a["adapter"], int(a["batch_size"]) if a["batch_size"] else None,
                           task_kv)
    print(f"{out['split']}: {out['examples']} examples")
    for k, v in out["metrics"].items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def _ensemble(argv: list[str]) -> int:
    """`ptune eval run=<dir1>,<dir2>,... ensemble=vote|mean`: the members and their ensemble in one batched pass."""
    from ptune.ensemble import evaluate_ensemble, table

    a = _kv(argv, {"run": None, "ensemble": None, "split": "dev", "adapter": "adapter", "batch_size": None,
                   "out": None}, "eval")
    runs = [r.strip() for r in (a["run"] or "").split(",") if r.strip()]
    if len(runs) < 2:
        raise PtuneError("ensemble= needs at least two runs: ptune eval run=<dir1>,<dir2>[,...] ensemble=vote|mean")
    if a["adapter"] not in ("adapter", "adapter_best"):
        raise PtuneError(f"adapter={a['adapter']!r}: choose adapter (final) or adapter_best")
    out = evaluate_ensemble(runs, a["ensemble"], a["split"], a["adapter"],
                            int(a["batch_size"]) if a["batch_size"] else None, a["out"])
    print(table(out))
    print(f"written: {out['path']}")
    return 0


def _transfer(a: dict, task_args: list[str]) -> dict:
    """`ptune eval run=... task=<other> [task.<key>=...] [label_map=...]`: the task group composed
    fresh from conf/task/<other>.yaml with the task.* overrides (Hydra's grammar)."""
    from ptune.transfer import evaluate_transfer

    if not a["task"]:
        raise PtuneError("label_map= maps the run's labels onto another task's: add task=<task> (ptune eval run=... "
                         "task=custom task.eval_file=... label_map=...)")
    task_cfg = compose([f"task={a['task']}", *task_args]).task
    head_given = any(x.startswith("task.head=") for x in task_args)
    out = evaluate_transfer(a["run"], task_cfg, a["label_map"], a["split"], a["adapter"],
                            int(a["batch_size"]) if a["batch_size"] else None, head_given)
    print(f"{out['trained_task']} -> {out['task']} (label map {out['label_map']})")
    return out


def cmd_report(argv: list[str]) -> int:
    from ptune.report import write_report

    paths = [a.partition("=")[2] if a.startswith("dir=") else a for a in argv]
    if len(paths) != 1 or not paths[0] or ("=" in argv[0] and not argv[0].startswith("dir=")):
        raise PtuneError("ptune report needs one sweep directory: ptune report <sweep dir> (or dir=<sweep dir>)")
    report, why = write_report(paths[0])
    print(f"report: {report}" + (f" (plots not drawn: {why})" if why else ""))
    return 0


def cmd_predict(argv: list[str]) -> int:
    from ptune.multi import predict_file

    a = _kv(argv, {"run": None, "input": None, "output": None, "batch_size": None}, "predict")
    if not a["run"] or not a["input"]:
        raise PtuneError("ptune predict needs run=<run dir> and input=<file.jsonl|csv>")
    out = predict_file(a["run"], a["input"], a["output"], int(a["batch_size"]) if a["batch_size"] else None)
    print(f"predictions: {out}")
    return 0


def cmd_serve(argv: list[str]) -> int:
    from ptune.serve import DEFAULTS, serve

    a = _kv(argv, {"run": None, **{k: str(v) for k, v in DEFAULTS.items()}}, "serve")
    if not a["run"]:
        raise PtuneError("ptune serve needs run=<run dir>[,<run dir>...] (or name:<dir>,...)")
    numbers = {}
    for key, low, high in (("port", 0, 65535), ("max_batch", 1, None), ("max_input_chars", 1, None),
                           ("batch_size", 1, None)):
        value = int(a[key]) if a[key].isdigit() else -1
        if value < low or (high is not None and value > high):
            raise PtuneError(f"{key}={a[key]!r} is invalid: must be a whole number from {low}"
                             f"{f' to {high}' if high else ' up'}")
        numbers[key] = value
    return serve(a["run"], a["host"], **numbers)


def cmd_export(argv: list[str]) -> int:
    from ptune.export import export_run

    a = _kv(argv, {"run": None, "format": "peft", "out": None, "adapter": "adapter"}, "export")
    if not a["run"] or not a["out"]:
        raise PtuneError("ptune export needs run=<run dir> and out=<new directory>")
    if a["adapter"] not in ("adapter", "adapter_best"):
        raise PtuneError(f"adapter={a['adapter']!r}: choose adapter (final) or adapter_best")
    print(f"exported: {export_run(a['run'], a['format'], a['out'], a['adapter'])}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export, "report": cmd_report}

COMMANDS["serve"] = cmd_serve


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)} (ptune --help)", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(train_help(rest) if command == "train" else USAGE)
        return 0
    try:
        return COMMANDS[command](rest)
    except PtuneError as e:
        if os.environ.get("PTUNE_TRACEBACK"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk, not the code: one line too (checkpoint writes say more, see checkpoint.py)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        if os.environ.get("PTUNE_TRACEBACK"):
            traceback.print_exc()
        print(f"error: {e.strerror} while writing {e.filename or 'a file'}; free space or set output_dir= to a "
              f"writable disk, then continue a started run with ptune train resume=<run dir>", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
