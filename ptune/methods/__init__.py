"""Method registry. Keys are the file names in conf/method/ (a test keeps them in sync)."""

from ptune.methods.base import Method
from ptune.methods.hard_prompt import HardPrompt
from ptune.methods.prefix import Prefix

METHODS: dict[str, type[Method]] = {
    "hard-prompt": HardPrompt,
    "prefix": Prefix,
}


def build(name: str, backbone, **kwargs) -> Method:
    """Wrap a frozen backbone with method `name`; kwargs are the method's config keys."""
    return METHODS[name](backbone, **kwargs)
