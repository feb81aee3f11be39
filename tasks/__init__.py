"""One subpackage per task. A task never imports another task; the core finds a task only through a config's ``_target_``."""
