"""ptune: configuration-driven prompt-based parameter-efficient tuning (prompt, prefix, p-tuning)."""

__version__ = "0.1.0"
