"""`ptune <command> [key=value ...]`: train (single run or -m sweep), eval, predict, serve, export, report.

This module only reads the command line and calls the wings: `train` goes to ptune.train (the
boundary, the resume policy, sweeps), the others to ptune.infer, through one parser for the keys
the run-loading commands share (ptune.config.command_args). Configs are composed with Hydra's
compose API and its override grammar (ptune.config.compose); docs/design.md says why the run loop
is ours rather than `@hydra.main`.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

from omegaconf import OmegaConf

from ptune import search
from ptune.config import COMMON, CONF_DIR, GROUPS, LOADING, command_args, compose, options, override_value
from ptune.errors import PtuneError
from ptune.infer.ensemble import evaluate_ensemble, table
from ptune.infer.evaluate import evaluate_run
from ptune.infer.export import export_run
from ptune.infer.predict import predict_file
from ptune.infer.serve import DEFAULTS, serve
from ptune.infer.transfer import evaluate_transfer
from ptune.train import hydra_app, memory_plan
from ptune.train.job import headline, train
from ptune.train.report import write_report
from ptune.train.resume import resume_config

USAGE = """usage: ptune <command> [key=value ...]

commands:
  train     train a method: ptune train [-m] [method=prefix] [model=...] [task=...] [trainer.max_steps=...]
            resume a run:   ptune train resume=outputs/YYYY-MM-DD/HH-MM-SS
  plan      peak memory per process and time per step of a train job, before it runs (no weights read):
            ptune plan [the same overrides as ptune train] [device_memory=80GiB] [processes=1] [device=cpu|cuda]
            [seq_len=max|data|<tokens>] [tflops=<sustained TFLOPS>] [format=text|json]
  eval      evaluate a finished run: ptune eval run=<run dir> [split=dev|test] [adapter=adapter|adapter_best]
            [task.decoding=beam task.num_beams=5 task.max_eval_samples=null ...]  (how to evaluate)
            another task (domain transfer): ptune eval run=<run dir> task=<task> [task.<key>=...]
            [label_map=<trained>:<new>,...|<file.json|yaml>]
            a prompt ensemble (runs of one task, one batched pass): ptune eval run=<dir1>,<dir2>,...
            ensemble=vote|mean [split=dev] [out=<file.json>]
  predict   predict for a file: ptune predict run=<run dir> input=<file.jsonl|csv> [output=<file.jsonl>]
            several runs on one backbone, rows naming their "adapter": run=sst2:<dir>,e2e:<dir>
  serve     answer JSON over HTTP with one or several runs: ptune serve run=<dir>[,<dir>...] [host=127.0.0.1]
            [port=8000] [max_batch=64] [max_input_chars=4000] [max_batch_rows=32] [max_wait_ms=5]
            [max_connections=256] [timeout=10] [max_tokens=256] [workers=1]  (POST /predict, GET /adapters, GET /metrics,
            OpenAI-compatible GET /v1/models and POST /v1/completions; rows of all clients batched together)
  export    write a run's adapter in PEFT's format (peft.PeftModel.from_pretrained loads it):
            ptune export run=<run dir> out=<new dir> [format=peft] [adapter=adapter|adapter_best]
  report    a sweep's table and plots (report.md + PNGs in the sweep dir): ptune report <sweep dir>
            (mean +- std over task.few_shot_seed / trainer.seed when a sweep varies them)
  search    find a prompt with nothing trained (docs/few-shot.md), written as ptune train overrides:
            ptune search label-words|template|autoprompt task=sst2 task.few_shot=16 [search.<key>=...]
            resume one: ptune search resume=<search dir>

`ptune train --help` lists the config groups, their options and keys.
Errors are one line; set PTUNE_TRACEBACK=1 to see the traceback."""


def _defaults() -> dict[str, str]:
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


def _print(text: str) -> None:
    if text:
        print(text)


def cmd_train(argv: list[str]) -> int:
    multirun = any(a in ("-m", "--multirun") for a in argv)
    resume = next((a.partition("=")[2] for a in argv if a.startswith("resume=")), None)
    if resume and multirun:
        raise PtuneError("resume= and -m cannot be combined; resume one run directory at a time")
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1  # else one job of several processes (rank 0 claims)
    if hydra_app.uses_hydra(argv) and single:  # -m, hydra.* overrides, --cfg/--info/-sc: Hydra's application
        return hydra_app.run(argv)
    if multirun:
        raise PtuneError("-m sweeps launch their own jobs; run each job under accelerate launch separately, or use "
                         "a launcher whose jobs are several processes (docs/sweeps.md)")
    bad = [a for a in argv if a.startswith("-") or "=" not in a]
    if bad:
        raise PtuneError(f"unexpected argument {bad[0]!r}; arguments are key=value overrides (see ptune train --help)")
    if resume:
        run_dir, cfg = resume_config(resume, [a for a in argv if not a.startswith("resume=")])
        _print(headline(train(cfg, run_dir=run_dir, resume=True)))
        return 0
    _print(headline(train(compose(argv))))
    return 0


def cmd_plan(argv: list[str]) -> int:
    print(memory_plan.run(argv))
    return 0


def cmd_eval(argv: list[str]) -> int:
    if any(x.startswith("ensemble=") for x in argv):  # several runs of one task together (ptune/infer/ensemble.py)
        return _ensemble(argv)
    task_args = [x for x in argv if x.startswith("task.")]
    a = command_args("eval", [x for x in argv if not x.startswith("task.")],
                     {**COMMON, "task": None, "label_map": None}, usage="ptune eval needs run=<run dir>")
    if a["task"] or a["label_map"]:  # domain transfer: the run's adapter on another task (ptune/infer/transfer.py)
        out = _transfer(a, task_args)
    else:
        # task.<key>=<value> (e.g. task.decoding=beam task.max_eval_samples=null) changes how the run is evaluated
        task_kv = {x.partition("=")[0]: override_value(x) for x in task_args}
        out = evaluate_run(a["run"], a["split"], a["adapter"], a["batch_size"], task_kv, a["trust_remote_code"])
    print(f"{out['split']}: {out['examples']} examples")
    for k, v in out["metrics"].items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def _ensemble(argv: list[str]) -> int:
    """`ptune eval run=<dir1>,<dir2>,... ensemble=vote|mean`: the members and their ensemble in one batched pass."""
    a = command_args("eval", argv, {**COMMON, "ensemble": None, "out": None}, required=())
    runs = [r.strip() for r in (a["run"] or "").split(",") if r.strip()]
    if len(runs) < 2:
        raise PtuneError("ensemble= needs at least two runs: ptune eval run=<dir1>,<dir2>[,...] ensemble=vote|mean")
    out = evaluate_ensemble(runs, a["ensemble"], a["split"], a["adapter"], a["batch_size"], a["out"],
                            a["trust_remote_code"])
    print(table(out))
    print(f"written: {out['path']}")
    return 0


def _transfer(a: dict, task_args: list[str]) -> dict:
    """`ptune eval run=... task=<other> [task.<key>=...] [label_map=...]`: the task group composed
    fresh from conf/task/<other>.yaml with the task.* overrides (Hydra's grammar)."""
    if not a["task"]:
        raise PtuneError("label_map= maps the run's labels onto another task's: add task=<task> (ptune eval run=... "
                         "task=custom task.eval_file=... label_map=...)")
    task_cfg = compose([f"task={a['task']}", *task_args]).task
    head_given = any(x.startswith("task.head=") for x in task_args)
    out = evaluate_transfer(a["run"], task_cfg, a["label_map"], a["split"], a["adapter"], a["batch_size"], head_given,
                            a["trust_remote_code"])
    print(f"{out['trained_task']} -> {out['task']} (label map {out['label_map']})")
    return out


def cmd_report(argv: list[str]) -> int:
    paths = [a.partition("=")[2] if a.startswith("dir=") else a for a in argv]
    if len(paths) != 1 or not paths[0] or ("=" in argv[0] and not argv[0].startswith("dir=")):
        raise PtuneError("ptune report needs one sweep directory: ptune report <sweep dir> (or dir=<sweep dir>)")
    report, why = write_report(paths[0])
    print(f"report: {report}" + (f" (plots not drawn: {why})" if why else ""))
    return 0


def cmd_predict(argv: list[str]) -> int:
    a = command_args("predict", argv, {**LOADING, "input": None, "output": None},
                     required=("run", "input"), usage="ptune predict needs run=<run dir> and input=<file.jsonl|csv>")
    print(f"predictions: {predict_file(a['run'], a['input'], a['output'], a['batch_size'], a['adapter'], a['trust_remote_code'])}")
    return 0


def cmd_serve(argv: list[str]) -> int:
    loading = {k: v for k, v in LOADING.items() if k != "batch_size"}  # rows per forward: max_batch_rows
    a = command_args("serve", argv, {**loading, **{k: str(v) for k, v in DEFAULTS.items()}},
                     usage="ptune serve needs run=<run dir>[,<run dir>...] (or name:<dir>,...)")
    return serve(a["run"], a["host"], **{k: a[k] for k in DEFAULTS if k != "host"}, which=a["adapter"],
                 trust_remote_code=a["trust_remote_code"])


def cmd_export(argv: list[str]) -> int:
    a = command_args("export", argv, {**LOADING, "format": "peft", "out": None},
                     required=("run", "out"), usage="ptune export needs run=<run dir> and out=<new directory>")
    if a["batch_size"] is not None:
        raise PtuneError("ptune export: batch_size= has no meaning here (export runs no model); drop it")
    print(f"exported: {export_run(a['run'], a['format'], a['out'], a['adapter'], a['trust_remote_code'])}")
    return 0


def cmd_search(argv: list[str]) -> int:
    summary = search.run(argv)
    best = summary["best"]
    print(f"search: {summary['dir']}\nfound ({best.get('split')} accuracy {best.get('accuracy', float('nan')):.4f}, "
          f"{summary['candidates_scored']} candidates, {summary['wall_time_s']:.1f} s): {summary['overrides']}")
    return 0


COMMANDS = {"train": cmd_train, "plan": cmd_plan, "search": cmd_search, "eval": cmd_eval, "predict": cmd_predict, "serve": cmd_serve, "export": cmd_export,
            "report": cmd_report}


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
        print(train_help(rest) if command == "train" else search.help_text(rest) if command == "search" else USAGE)
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
