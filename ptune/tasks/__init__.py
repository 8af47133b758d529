"""Task registry. Keys are the file names in conf/task/ (a test keeps them in sync)."""

from ptune.config import group_defaults
from ptune.tasks.base import Task
from ptune.tasks.custom import Custom
from ptune.tasks.e2e import E2E
from ptune.tasks.lama import LAMA
from ptune.tasks.sst2 import SST2
from ptune.tasks.superglue import CB, RTE, BoolQ
from ptune.tasks.xsum import XSum

TASKS: dict[str, type[Task]] = {
    "boolq": BoolQ,
    "cb": CB,
    "custom": Custom,  # a function: the classification or generation variant by task.type
    "e2e": E2E,
    "lama": LAMA,
    "rte": RTE,
    "sst2": SST2,
    "xsum": XSum,
}


def build(name: str, **kwargs) -> Task:
    """Task `name` with its config keys; every key not given takes its default from
    conf/task/<name>.yaml (the one place defaults live)."""
    task = TASKS[name]
    return task(**{**group_defaults("task", name), **task.upgrade(dict(kwargs))})
