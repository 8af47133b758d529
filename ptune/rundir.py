"""The run directory: the one object that knows every path of a run, and the one atomic writer.

    outputs/YYYY-MM-DD/HH-MM-SS/          RunDir(path)
        config.yaml                       .config        the fully resolved config
        metrics.jsonl                     .metrics       MetricsLog: one JSON object per logged step / evaluation
        summary.json                      .summary
        train.log                         .log
        adapter/, adapter_best/           .adapter(which)
        checkpoints/step-N/               .checkpoints   (ptune.train.checkpoint writes them)
        predictions/<name>[-step<N>].jsonl .predictions(name, step)
        eval_<name>.json                  .eval_result(name)

Both wings use it: training claims the directory and writes every file; inference reads the config
and the adapters and writes only evaluation results (eval_*.json, predictions/). Everything is
written through `write_atomic` (temporary name in the same folder, fsync, rename), so a crash
leaves the old file or the new one, never half of one.

`outputs/YYYY-MM-DD/HH-MM-SS` is claimed with an atomic mkdir; if another job took that second,
`HH-MM-SS-1`, `-2`, ... follow. So two jobs started in the same second, the N jobs of a multirun,
and processes of different launches never share a directory. Under `accelerate launch` only rank 0
creates the directory and the trainer broadcasts its path.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ptune.errors import PtuneError

ADAPTERS = ("adapter", "adapter_best")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` in one step: a hidden temporary file beside it, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: the old file stays, no temporary one is left
        tmp.unlink(missing_ok=True)
        raise


def write_json(obj, path: Path) -> None:
    """Atomic JSON write (indented, one trailing newline)."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class RunDir:
    """The paths of one run directory and the writes into it (module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        """A run directory has its config.yaml (written before the first step; checkpoints come later)."""
        return self.config.is_file()

    # -- paths ---------------------------------------------------------------------------------
    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    summary = property(lambda self: self.path / "summary.json")
    log = property(lambda self: self.path / "train.log")
    checkpoints = property(lambda self: self.path / "checkpoints")

    def adapter(self, which: str = "adapter") -> Path:
        if which not in ADAPTERS:
            raise PtuneError(f"adapter={which!r}: choose adapter (final) or adapter_best")
        return self.path / which

    def predictions(self, name: str, step: int | None = None) -> Path:
        return self.path / "predictions" / (f"{name}.jsonl" if step is None else f"{name}-step{step}.jsonl")

    def eval_result(self, name: str) -> Path:
        return self.path / f"eval_{name}.json"

    # -- writes --------------------------------------------------------------------------------
    def write_config(self, yaml_text: str) -> None:
        write_atomic(self.config, yaml_text)

    def write_summary(self, summary: dict) -> None:
        write_json(summary, self.summary)

    def write_eval(self, name: str, result: dict) -> Path:
        write_json(result, self.eval_result(name))
        return self.eval_result(name)

    def write_predictions(self, name: str, records: list[dict], step: int | None = None) -> None:
        """predictions/<name>.jsonl (the latest) and, during training, predictions/<name>-step<N>.jsonl."""
        self.predictions(name).parent.mkdir(exist_ok=True)
        text = jsonl(records)
        for path in [self.predictions(name)] + ([self.predictions(name, step)] if step is not None else []):
            write_atomic(path, text)

    def metrics_log(self) -> MetricsLog:
        return MetricsLog(self.metrics)


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
    return RunDir(path).exists()


def enclosing_run(path: str | Path) -> Path | None:
    """The run directory `path` is inside of (or is), if any: a folder with config.yaml and what
    training leaves beside it (metrics.jsonl, adapter/ or checkpoints/). Commands that only read a
    run never write there (predict, export), and no run is claimed inside another."""
    here = Path(path).expanduser().absolute()
    for folder in (here, *here.parents):
        if (folder / "config.yaml").is_file() and any((folder / n).exists() for n in
                                                      ("metrics.jsonl", "adapter", "checkpoints")):
            return folder
    return None


def refuse_inside_run(path: str | Path, what: str) -> None:
    """One PtuneError line when `path` lies inside a run directory (enclosing_run)."""
    run = enclosing_run(path)
    if run is not None:
        raise PtuneError(f"{what}={path} is inside the run directory {run}, and ptune never writes into a run "
                         f"it did not make for this command; choose a path outside it")


def free_path(path: Path) -> Path:
    """`path`, or path with -1, -2, ... before its suffix when a file of that name exists: a default
    output never overwrites an earlier one."""
    path = Path(path)
    stem, suffix = (path.name[:-len(".predictions.jsonl")], ".predictions.jsonl") \
        if path.name.endswith(".predictions.jsonl") else (path.stem, path.suffix)
    k = 0
    while path.exists():
        k += 1
        path = path.with_name(f"{stem}-{k}{suffix}")
    return path


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
        write_atomic(self.path, "".join(line + "\n" for line in keep))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
