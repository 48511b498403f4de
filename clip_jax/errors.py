"""The error a user can act on: its own module, importing nothing, so that any module may raise it without
importing the configuration (which imports the models and the data registries)."""


class ConfigError(ValueError):
    """A problem with the configuration or an input, stated in one line that names the key or file."""


def one_line(error: BaseException) -> str:
    """An error's type and message on one line (a decoder's multi-line message inside a ConfigError)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


class UnscorableClasses(ValueError):
    """A method asked to score classes it has no scores for (the new classes of a linear probe or of class-specific
    prompt contexts): the evaluation and `clip-jax classify` report what it can score instead."""
