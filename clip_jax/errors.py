"""The error a user can act on: its own module, importing nothing, so that any module may raise it without
importing the configuration (which imports the models and the data registries)."""


class ConfigError(ValueError):
    """A problem with the configuration or an input, stated in one line that names the key or file."""


class UnscorableClasses(ValueError):
    """A method asked to score classes it has no scores for (the new classes of a linear probe or of class-specific
    prompt contexts): the evaluation and `clip-jax classify` report what it can score instead."""
