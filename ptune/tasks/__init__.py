"""Task registry. Keys are the file names in conf/task/ (a test keeps them in sync)."""

from ptune.tasks.base import Task
from ptune.tasks.e2e import E2E
from ptune.tasks.sst2 import SST2
from ptune.tasks.xsum import XSum

TASKS: dict[str, type[Task]] = {
    "e2e": E2E,
    "sst2": SST2,
    "xsum": XSum,
}


def build(name: str, **kwargs) -> Task:
    return TASKS[name](**kwargs)
