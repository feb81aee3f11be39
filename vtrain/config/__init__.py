"""The config tree and what a config must be before anything is built with it (the lowest layer).

``ConfigError`` is re-exported here: the error every layer raises on bad input."""
from vtrain.config.errors import ConfigError

__all__ = ["ConfigError"]
