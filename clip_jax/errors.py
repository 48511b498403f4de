"""The error a user can act on: its own module, importing nothing, so that any module may raise it without
importing the configuration (which imports the models and the data registries)."""


class ConfigError(ValueError):
    """A problem with the configuration or an input, stated in one line that names the key or file."""
