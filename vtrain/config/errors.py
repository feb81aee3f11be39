"""The one kind of error a user's input raises: a line that says what is wrong and how to fix it."""


class ConfigError(ValueError):
    """Bad input found before training starts; the message is one line saying what and how to fix it."""
