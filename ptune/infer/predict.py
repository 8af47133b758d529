"""`ptune predict run=<spec> input=<file>`: one JSON line per input row, its fields and `prediction`.

One run whose rows name no adapter is answered by that run's task alone (`predict_run`); several
runs, or rows that name their adapter, go through a Pool of adapters on one backbone
(ptune.infer.pool). Either way the output goes where `output_path` says: never into a run
directory (predict only reads runs), by default beside the input without overwriting anything.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ptune import rundir
from ptune.build import load_run, load_trained, setup_logging
from ptune.errors import PtuneError
from ptune.infer.pool import ADAPTER_FIELD, Pool, parse_runs
from ptune.rundir import jsonl, write_atomic


def predict_file(spec: str, input_path: str, output: str | None = None, batch_size: int | None = None,
                 which: str = "adapter", trust_remote_code: bool = False) -> Path:
    """`ptune predict run=<spec> input=<file>`: one JSON line per input row, its fields and
    `prediction`, in order. One run whose rows name no adapter is answered by that run's task alone;
    otherwise rows go through a Pool. The output (`output_path`) is never inside a run directory."""
    runs = parse_runs(spec)
    rows = read_rows(Path(input_path))
    out = output_path(input_path, output)
    if len(runs) == 1 and ":" not in spec and not any(ADAPTER_FIELD in r for r in rows):
        return predict_run(next(iter(runs.values())), rows, out, batch_size, which, trust_remote_code)
    pool = Pool.load(runs, which, trust_remote_code)
    first = next(iter(runs.values()))
    preds = pool.predict(rows, batch_size or load_run(first, trust_remote_code)[1].trainer.eval_batch_size)
    _write(out, rows, preds)
    return out


def output_path(input_path: str, output: str | None) -> Path:
    """Where predictions go: `output` as given (not inside a run directory, not the input itself), or
    by default `<input stem>.predictions.jsonl` beside the input, with -1, -2, ... when that file
    exists, so two runs of predict never overwrite each other."""
    source = Path(input_path)
    if output:
        out = Path(output)
        rundir.refuse_inside_run(out, "output")
        if out.exists() and out.resolve() == source.resolve():
            raise PtuneError(f"output={output} is the input file; choose another output=")
        return out
    out = rundir.free_path(source.with_name(f"{source.stem}.predictions.jsonl"))
    rundir.refuse_inside_run(out, "the default output")
    return out


def predict_run(run: str, rows: list[dict], out: Path, batch_size: int | None = None, which: str = "adapter",
                trust_remote_code: bool = False) -> Path:
    """One run's predictions for `rows`, written to `out`."""
    run_dir, cfg = load_run(run, trust_remote_code)
    setup_logging(None)
    _, method, task = load_trained(run_dir, cfg, which)
    preds = task.predict(method, rows, batch_size or cfg.trainer.eval_batch_size)
    _write(out, rows, preds)
    return out


def read_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl, .json, .csv or .tsv file as dicts."""
    if not path.is_file():
        raise PtuneError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(path.read_text())
        elif suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise PtuneError(f"input file {path}: unknown format {suffix!r}; use .jsonl, .json, .csv or .tsv")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtuneError(f"input file {path} is not valid {suffix[1:]}: {e}") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise PtuneError(f"input file {path} holds no rows of named fields")
    return rows


def _write(out: Path, rows: list[dict], preds: list) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, jsonl([{**row, "prediction": p} for row, p in zip(rows, preds)]))
