"""The house (docs/design.md): the rooms of the package and what may cross between them.

- No module outside ptune/methods/ branches on a method's name, none outside ptune/tasks/ on a
  task's name, none outside the heads' own files on a head's name (task.head): components declare
  what they are (Method.acts_on, .p, .peft_type; Task.head, .input_fields, .prediction_inputs;
  ptune.head_kinds.HeadKind) and callers read that.
- The training wing (ptune/train/) imports nothing from the inference wing (ptune/infer/); the
  inference wing imports nothing from the training wing; no module imports another's private name.
- Defaults live in conf/: a method's or task's constructor restates none of its YAML keys, and the
  loop's TrainArgs take every field from the trainer key of the same name.
- Files in a run directory are written through ptune.rundir's one atomic writer.
"""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from ptune import head_kinds, methods, tasks
from ptune.config import CONF_DIR, compose
from ptune.train.job import train_args
from ptune.train.loop import TrainArgs

PKG = ROOT / "ptune"
SOURCES = sorted(p for p in PKG.rglob("*.py") if "metrics/modules" not in p.as_posix())


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _trees():
    return [(path, ast.parse(path.read_text())) for path in SOURCES]


def _names_compared(tree: ast.AST, registry: set[str], attr_owners: tuple[str, ...]):
    """Comparisons against a registry key (x == "prefix", x in ("e2e", "xsum")) and comparisons of
    `<...method...>.name` / `<...task...>.name`, with their line numbers."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op in operands:
            consts = [op] if isinstance(op, ast.Constant) else list(op.elts) if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else []
            if any(isinstance(c, ast.Constant) and c.value in registry for c in consts):
                yield node.lineno, ast.unparse(node)
            if isinstance(op, ast.Attribute) and op.attr == "name" and any(o in ast.unparse(op.value) for o in attr_owners):
                yield node.lineno, ast.unparse(node)


@pytest.mark.parametrize("room, registry, owners", [
    ("ptune/methods/", set(methods.METHODS), ("method",)),
    ("ptune/tasks/", set(tasks.TASKS), ("task",)),
])
def test_no_module_outside_its_room_asks_a_components_name(room, registry, owners):
    found = [f"{_rel(path)}:{line}: {text}" for path, tree in _trees() if not _rel(path).startswith(room)
             for line, text in _names_compared(tree, registry, owners)]
    assert not found, "branches on a name; let the component declare it instead:\n" + "\n".join(found)


# the heads' own files: the registry and each head's module (ptune/head_kinds.py names them)
HEAD_ROOM = {"ptune/head_kinds.py", "ptune/heads.py", "ptune/verbalizer.py", "ptune/mask_heads.py",
             "ptune/soft_verbalizer.py", "ptune/proto_verbalizer.py", "ptune/knowledgeable.py", "ptune/rules.py",
             "ptune/calibration.py"}


def _head_names_compared(tree: ast.AST):
    """Comparisons of something named like a head (task.head, cfg.task.get("head"), trained_head,
    self._head(e)) with a task.head value."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        consts = [c.value for op in operands for c in ([op] if isinstance(op, ast.Constant) else
                  op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else []) if isinstance(c, ast.Constant)]
        if any(v in head_kinds.HEADS for v in consts) and any("head" in ast.unparse(op) for op in operands
                                                              if not isinstance(op, ast.Constant)):
            yield node.lineno, ast.unparse(node)


def test_no_module_outside_the_heads_asks_a_heads_name():
    found = [f"{_rel(path)}:{line}: {text}" for path, tree in _trees() if _rel(path) not in HEAD_ROOM
             for line, text in _head_names_compared(tree)]
    assert not found, "branches on task.head's value; declare it in ptune/head_kinds.py instead:\n" + "\n".join(found)


def test_every_head_room_file_exists_and_every_head_builds_from_it():
    assert all((ROOT / f).is_file() for f in HEAD_ROOM)
    assert set(head_kinds.CLASSIFICATION) == {"linear", "verbalizer", "soft-verbalizer", "proto-verbalizer",
                                              "knowledgeable", "rules"}
    for kind in head_kinds.HEADS.values():
        assert kind.build is not None or kind.generates, kind.name
        assert kind.served is None or kind.served in ("pooled", "words", "state", "text"), kind.name


def test_the_name_check_finds_what_it_looks_for():
    """The check above is not vacuous: it flags the shapes of comparison it is meant to catch."""
    code = ast.parse('if method.name == "p-tuning" or cfg.task.name in ("e2e", "xsum") or kind == "prompt": pass')
    hits = list(_names_compared(code, set(methods.METHODS) | set(tasks.TASKS), ("method", "task")))
    assert len(hits) >= 3
    code = ast.parse('if task.head == "rules" or cfg.task.get("head") in ("linear", "x") or self._head(e) != "lm" '
                     'or "verbalizer" in state or mode == "linear": pass')
    assert [t for _, t in _head_names_compared(code)] == [
        "task.head == 'rules'", "cfg.task.get('head') in ('linear', 'x')", "self._head(e) != 'lm'"]


def _imports(tree: ast.AST):
    """(module, [names]) for every import in the tree (relative imports do not occur in ptune)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_the_wings_meet_only_in_the_shared_modules():
    crossings = []
    for path, tree in _trees():
        rel = _rel(path)
        for module, names in _imports(tree):
            full = [module] + [f"{module}.{n}" for n in names]
            if rel.startswith("ptune/train/") and any(m.startswith("ptune.infer") for m in full):
                crossings.append(f"{rel} imports {module} {names}")
            if rel.startswith("ptune/infer/") and any(m.startswith("ptune.train") for m in full):
                crossings.append(f"{rel} imports {module} {names}")
    assert not crossings, "\n".join(crossings)


def test_no_module_imports_a_private_name_of_another():
    found = [f"{_rel(path)}: from {module} import {n}" for path, tree in _trees()
             for module, names in _imports(tree) if module.startswith("ptune")
             for n in names if n.startswith("_")]
    assert not found, "\n".join(found)


def _config_keys(group: str, option: str) -> set[str]:
    return set(OmegaConf.load(CONF_DIR / group / f"{option}.yaml")) - {"name"}


@pytest.mark.parametrize("group, registry", [("method", methods.METHODS), ("task", tasks.TASKS)])
def test_constructors_restate_no_yaml_default(group, registry):
    restated = []
    for option, cls in registry.items():
        keys = _config_keys(group, option)
        if inspect.isfunction(cls):  # task=custom: a function choosing one of its module's classes
            module = inspect.getmodule(cls)
            klasses = [cls] + [k for _, k in inspect.getmembers(module, inspect.isclass) for k in k.__mro__
                               if k.__module__.startswith("ptune.tasks")]
        else:
            klasses = list(cls.__mro__)
        for klass in klasses:
            init = klass if inspect.isfunction(klass) else klass.__dict__.get("__init__")
            if init is None:
                continue
            for name, param in inspect.signature(init).parameters.items():
                if name in keys and param.default is not inspect.Parameter.empty:
                    restated.append(f"{option}: {klass.__name__}.{name}={param.default!r}")
    assert not restated, "defaults belong in conf/" + group + "/*.yaml: " + ", ".join(restated)


def test_p_tuning_v2_is_prefix_with_its_own_yaml():
    assert methods.METHODS["p-tuning-v2"] is methods.METHODS["prefix"]
    assert _config_keys("method", "p-tuning-v2") == _config_keys("method", "prefix")


def test_train_args_come_from_the_trainer_keys_by_name():
    fields = dataclasses.fields(TrainArgs)
    assert all(f.default is dataclasses.MISSING for f in fields), "TrainArgs restates a default of trainer/*.yaml"
    cfg = compose(["trainer.max_steps=7", "trainer.eval_split=test", "trainer.group_by_length=false"])
    args = train_args(cfg)
    assert {f.name: getattr(args, f.name) for f in fields} == {f.name: cfg.trainer[f.name] for f in fields}
    assert (args.max_steps, args.eval_split, args.group_by_length) == (7, "test", False)


def test_files_are_replaced_only_through_the_atomic_writer():
    """write_text / os.replace outside ptune/rundir.py: only the folder swaps that need them (a
    checkpoint folder, an export folder, the model cache) may rename."""
    allowed = {"ptune/rundir.py", "ptune/train/checkpoint.py", "ptune/infer/export.py", "ptune/models.py"}
    found = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                call = ast.unparse(node.func)
                if node.func.attr == "write_text" or (call == "os.replace" and _rel(path) not in allowed):
                    found.append(f"{_rel(path)}:{node.lineno}: {call}")
    assert not found, "\n".join(found)
