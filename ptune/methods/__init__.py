"""Method registry. Keys are the file names in conf/method/ (a test keeps them in sync)."""

from ptune.methods.base import Method
from ptune.methods.fine_tune import FineTune
from ptune.methods.hard_prompt import HardPrompt
from ptune.methods.p_tuning import PTuning
from ptune.methods.p_tuning_v2 import PTuningV2
from ptune.methods.prefix import Prefix
from ptune.methods.prompt import Prompt

METHODS: dict[str, type[Method]] = {
    "fine-tune": FineTune,
    "hard-prompt": HardPrompt,
    "p-tuning": PTuning,
    "p-tuning-v2": PTuningV2,
    "prefix": Prefix,
    "prompt": Prompt,
}


def build(name: str, backbone, **kwargs) -> Method:
    """Wrap a frozen backbone with method `name`; kwargs are the method's config keys."""
    return METHODS[name](backbone, **kwargs)
