"""vtrain: compose a backbone, a task head and a Lightning trainer from Hydra configs."""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """Bad input found before training starts; the message is one line saying what and how to fix it."""
