"""ptune: configuration-driven prompt-based parameter-efficient tuning (prompt, prefix, p-tuning)."""

__version__ = "0.1.0"

import logging as _logging

# transformers imports torchao (model.quantize's library) whenever it is installed, and torchao then logs a
# warning for each of its optional CUDA extensions a CPU machine cannot load, and torch one per enum it
# registers: noise on every command. Their errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
