"""The house (docs/design.md): the rooms of the package and what may cross between them.

- No module outside ptune/methods/ branches on a method's name, none outside ptune/tasks/ on a
  task's name, none outside the heads' own files on a head's name (task.head): components declare
  what they are (Method.acts_on, .num_virtual_tokens, .peft_type; Task.head, .input_fields, .prediction_inputs;
  ptune.heads.HeadKind) and callers read that.
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
from conftest import ROOT
from omegaconf import OmegaConf

from ptune import heads, methods, tasks
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


# the heads' own room: the registry (ptune/heads/__init__.py) and each head's module
HEAD_ROOM = {f"ptune/heads/{f}.py" for f in ("__init__", "lm", "linear", "verbalizer", "mask_state", "soft_verbalizer",
                                              "proto_verbalizer", "knowledgeable", "rules", "calibration")}


def _head_names_compared(tree: ast.AST):
    """Comparisons of something named like a head (task.head, cfg.task.get("head"), trained_head,
    self._head(e)) with a task.head value."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        consts = [c.value for op in operands for c in ([op] if isinstance(op, ast.Constant) else
                  op.elts if isinstance(op, (ast.Tuple, ast.List, ast.Set)) else []) if isinstance(c, ast.Constant)]
        if any(v in heads.HEADS for v in consts) and any("head" in ast.unparse(op) for op in operands
                                                              if not isinstance(op, ast.Constant)):
            yield node.lineno, ast.unparse(node)


def test_no_module_outside_the_heads_asks_a_heads_name():
    found = [f"{_rel(path)}:{line}: {text}" for path, tree in _trees() if _rel(path) not in HEAD_ROOM
             for line, text in _head_names_compared(tree)]
    assert not found, "branches on task.head's value; declare it in ptune/heads/__init__.py instead:\n" + "\n".join(found)


def test_every_head_room_file_exists_and_every_head_builds_from_it():
    assert all((ROOT / f).is_file() for f in HEAD_ROOM)
    assert {_rel(p) for p in (PKG / "heads").glob("*.py")} == HEAD_ROOM  # a new head file is named above
    assert set(heads.CLASSIFICATION) == {"linear", "verbalizer", "soft-verbalizer", "proto-verbalizer",
                                              "knowledgeable", "rules"}
    for kind in heads.HEADS.values():
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


# -- imports: arrows only downward, no cycles, at the top of files ----------------------------------
# The floors of the house, top to bottom (docs/design.md): a module imports from its own floor or
# below, and on the wings' floor only from its own wing. Every other module is the ground floor
# (models, data, config, generate, metrics, adapter, rundir, errors).
FLOORS = (("ptune.cli", "ptune.__main__"), ("ptune.train", "ptune.infer", "ptune.search"), ("ptune.build",),
          ("ptune.tasks",), ("ptune.heads",), ("ptune.methods",))
# Third-party packages a function may import locally, and why; everything else, ptune's own modules
# first, is imported at the top of the file, so a file's head shows what it depends on.
LOCAL_OK = {
    "transformers": "its model and tokenizer classes take seconds to import; checks and refusals answer before",
    "datasets": "the hub path only (no task.data_dir); it pulls in pyarrow and pandas",
    "evaluate": "imports datasets; only when a shipped metric is computed",
    "matplotlib": "ptune report's plots only",
    "accelerate": "accelerate.tracking imports each tracker's package; only when trainer.log_with names one",
    "mlflow": "an optional tracker (trainer.log_with=mlflow)",
    "submitit": "only inside a SLURM job, to requeue it (0.1 s at every start otherwise)",
    "torchao": "model.quantize only; its import takes ~1 s and logs a warning per CUDA extension it lacks",
}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_nodes(tree: ast.AST):
    """(node, [imported dotted names]) for every import statement, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node, [f"{node.module}.{a.name}" for a in node.names]


def import_graph(trees) -> dict[str, set[str]]:
    """module -> the ptune modules it imports (a `from a.b import c` names a.b.c if that is a module, else a.b)."""
    mods = {_module(path) for path, _ in trees}

    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in mods}
    for path, tree in trees:
        m = _module(path)
        graph[m] |= {resolve(n) for _, names in _import_nodes(tree) for n in names if n.startswith("ptune")} - {m, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root), on.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w), on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _floor(module: str) -> int:
    """0 for the top floor (cli), len(FLOORS) for the ground floor."""
    return next((i for i, rooms in enumerate(FLOORS) for r in rooms if module == r or module.startswith(r + ".")),
                len(FLOORS))


def test_no_import_cycle_inside_ptune():
    found = cycles(import_graph(_trees()))
    assert not found, "import cycles (break each with a move down, not a function-local import):\n" + \
        "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_check_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}) == [["c", "d"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_arrows_point_down():
    up = [f"{m} -> {t}" for m, targets in sorted(import_graph(_trees()).items()) for t in sorted(targets)
          if _floor(t) < _floor(m) or (_floor(t) == _floor(m) == 1 and t.split(".")[1] != m.split(".")[1])]
    assert not up, "imports that run up a floor (or across the wings):\n" + "\n".join(up)
    assert _floor("ptune.cli") < _floor("ptune.train.job") < _floor("ptune.build") < _floor("ptune.tasks.sst2") \
        < _floor("ptune.heads.rules") < _floor("ptune.methods.prefix") < _floor("ptune.models")


def test_imports_sit_at_the_top_of_files():
    local = []
    for path, tree in _trees():
        top = {id(n) for n in tree.body}
        for node, names in _import_nodes(tree):
            if id(node) not in top and any(n.split(".")[0] not in LOCAL_OK for n in names):
                local.append(f"{_rel(path)}:{node.lineno}: {ast.unparse(node)}")
    assert not local, "imports inside functions (move them to the file's head, or name the package in LOCAL_OK " \
                      "with the reason):\n" + "\n".join(local)
