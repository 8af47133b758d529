"""Method registry. Keys are the file names in conf/method/ (a test keeps them in sync)."""

from ptune.config import group_defaults
from ptune.methods.base import Method
from ptune.methods.fine_tune import FineTune
from ptune.methods.hard_prompt import HardPrompt
from ptune.methods.p_tuning import PTuning
from ptune.methods.prefix import Prefix
from ptune.methods.prompt import Prompt

METHODS: dict[str, type[Method]] = {
    "fine-tune": FineTune,
    "hard-prompt": HardPrompt,
    "p-tuning": PTuning,
    "p-tuning-v2": Prefix,  # P-tuning v2 (Liu et al. 2022): prefix's class with its own YAML (prefix.py)
    "prefix": Prefix,
    "prompt": Prompt,
}


def build(name: str, backbone, **kwargs) -> Method:
    """Wrap a frozen backbone with method `name`; kwargs are the method's config keys, and every key
    not given takes its default from conf/method/<name>.yaml (the one place defaults live)."""
    method = METHODS[name](backbone, **{**group_defaults("method", name), **kwargs})
    method.name = name  # the registry key: one class can serve several entries (prefix, p-tuning-v2)
    return method


def trains_backbone(name: str | None) -> bool:
    """Whether method `name` trains the backbone's own weights (a quantized or sharded backbone is frozen)."""
    return name in METHODS and METHODS[name].trains_backbone
