"""`ptune search <kind> [overrides]`: find what a prompt says, with nothing trained.

    label-words   LM-BFF's automatic label words (Gao et al. 2021, §5.1)       ptune/search/label_words.py
    template      LM-BFF's automatic templates (§5.2) + ptune's causal variant  ptune/search/template.py
    autoprompt    AutoPrompt's gradient-guided trigger tokens (Shin et al. 2020) ptune/search/autoprompt.py

Each name is a file conf/search/<name>.yaml (the search's own keys, `search.*`) and a module here
with `search(cfg, sdir) -> summary`. The config is train's (model, task, trainer) plus `search`; the
method is hard-prompt (the backbone is frozen; a candidate is scored zero-shot). What a search finds
is written as task keys (ptune/search/base.py): `ptune train $(cat <dir>/overrides.txt) ...`.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import time

from ptune import methods, rundir
from ptune.build import setup_logging
from ptune.config import CONF_DIR, check, compose, load_saved
from ptune.errors import PtuneError
from ptune.search.base import Scorer, SearchDir, search_dir, write_config

SEARCHES = {"label-words": "label_words", "template": "template", "autoprompt": "autoprompt"}


def module(kind: str):
    if kind not in SEARCHES:
        raise PtuneError(f"unknown search {kind!r}; choose one of: {', '.join(SEARCHES)}")
    return importlib.import_module(f"ptune.search.{SEARCHES[kind]}")


def help_text(argv: list[str]) -> str:
    """`ptune search [<kind>] --help`: each search's config file, its keys commented (conf/search/)."""
    kinds = [a for a in argv if a in SEARCHES] or list(SEARCHES)
    parts = ["usage: ptune search <kind> [model=...] [task=...] [task.<key>=...] [search.<key>=...]\n"
             "       ptune search resume=<search dir>\n"
             "What a search finds is written as ptune train overrides (<search dir>/overrides.txt).\n"]
    for kind in kinds:
        parts.append(f"== {kind} (search.<key>=... overrides conf/search/{kind}.yaml) ==\n"
                     + (CONF_DIR / "search" / f"{kind}.yaml").read_text(encoding="utf-8"))
    return "\n".join(parts)


def compose_search(kind: str, overrides: list[str]):
    """The search's config: train's groups with method=hard-prompt and task.head=verbalizer (what a
    zero-shot scorer is), plus conf/search/<kind>.yaml under `search`."""
    module(kind)
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "method" and value in methods.METHODS and methods.METHODS[value].trains:
            raise PtuneError(f"ptune search scores prompts with nothing trained (method=hard-prompt); drop method={value} "
                             f"and pass what it finds to `ptune train method={value}`")
        if key == "task.head" and value != "verbalizer":
            raise PtuneError(f"ptune search scores label words at the template's {{mask}} (task.head=verbalizer); "
                             f"drop task.head={value}")
        if key in ("search", "resume"):
            raise PtuneError(f"ptune search {kind}: {key}= cannot be given here (the search is `ptune search <kind>`, "
                             f"a resume `ptune search resume=<dir>`)")
    cfg = compose(["method=hard-prompt", "task.head=verbalizer", f"+search={kind}", *overrides])
    check(cfg)
    return cfg


def run(argv: list[str]) -> dict:
    """Start (`<kind> key=value ...`) or resume (`resume=<search dir>`) a search; returns its summary."""
    resume = next((a.partition("=")[2] for a in argv if a.startswith("resume=")), None)
    if resume is not None:
        if len(argv) != 1 or not resume:
            raise PtuneError("ptune search resume=<search dir> takes no other arguments (the search continues as "
                             "configured)")
        sdir = search_dir(resume)
        cfg = load_saved(sdir.config)
        if "search" not in cfg:
            raise PtuneError(f"{resume} is a training run, not a search; continue it with ptune train resume={resume}")
        kind = cfg.search.name
    else:
        if not argv or "=" in argv[0] or argv[0].startswith("-"):
            raise PtuneError(f"ptune search needs the kind of search first: ptune search <{'|'.join(SEARCHES)}> "
                             f"[key=value ...], or ptune search resume=<search dir>")
        kind, overrides = argv[0], argv[1:]
        bad = [a for a in overrides if a.startswith("-") or "=" not in a]
        if bad:
            raise PtuneError(f"unexpected argument {bad[0]!r}; arguments are key=value overrides")
        cfg = compose_search(kind, overrides)
        rundir.refuse_inside_run(cfg.output_dir, "output_dir")
    impl = module(kind)
    impl.check(cfg)  # the search's own keys, before anything is loaded or written
    setup_logging(None)
    started = time.perf_counter()
    scorer = Scorer(cfg)  # bad model / task / template fail here, before a directory exists
    if resume is None:
        sdir = SearchDir(rundir.new_run_dir(cfg.output_dir))
        write_config(sdir, cfg)
    handler = _log_to(sdir)
    try:
        return impl.search(cfg, scorer, sdir, started)
    except PtuneError:
        if resume is None and not sdir.state.exists():  # refused before its first save: leave no empty search

            logging.getLogger().removeHandler(handler)
            handler.close()
            shutil.rmtree(sdir.path, ignore_errors=True)
        raise


def _log_to(sdir) -> logging.Handler:
    root = logging.getLogger()
    handler = logging.FileHandler(sdir.log)
    handler._ptune = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return handler
