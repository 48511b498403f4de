"""The error a user can act on: its own module, importing nothing, so that any module may raise it without
importing the configuration (which imports the models and the data registries)."""

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator

# Set by `--debug`: every background error in full, as Python reports it (quiet_background_errors stands aside).
SHOW_BACKGROUND_ERRORS = False


class ConfigError(ValueError):
    """A problem with the configuration or an input, stated in one line that names the key or file."""


def shortened(text: str, limit: int, quote: bool = False) -> str:
    """`text` cut to `limit` characters with its length said (quoted with `quote`): a name of a thousand words, a
    caption of megabytes, would otherwise fill the line or the screen that shows it."""
    shown = repr if quote else str
    if len(text) <= limit:
        return shown(text)
    return f"{shown(text[:limit])}... ({len(text):,} characters in all)"


def quoted(text: str, limit: int = 60) -> str:
    """`text` quoted and `shortened` for the one line of a message (a label, a query, a class name)."""
    return shortened(text, limit, quote=True)


def one_line(error: BaseException) -> str:
    """An error's type and message on one line (a decoder's multi-line message inside a ConfigError)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


class UnscorableClasses(ValueError):
    """A method asked to score classes it has no scores for (the new classes of a linear probe or of class-specific
    prompt contexts): the evaluation and `clip-jax classify` report what it can score instead."""


class BackgroundErrorsOnce:
    """A `sys.unraisablehook` that shows each kind of background-thread error once, in one line. TensorStore's threads
    report the failed reads of a damaged checkpoint as unraisable, a traceback per array and per callback ("Event
    loop is closed"): 16,769 lines for the demo's 15 MB model read through `clip_jax.load`, burying the one warning
    that matters. A kind is the error's type and its message up to the first colon (the rest names the array)."""

    def __init__(self, hint: str = ""):
        self.hint = hint  # how to see them all (the CLI's --debug)
        self.seen: set[str] = set()

    def __call__(self, unraisable) -> None:
        text = one_line(unraisable.exc_value)
        kind = ":".join(text.split(":")[:2])
        if kind not in self.seen:
            self.seen.add(kind)
            print(f"warning: in a background thread: {tensorstore_brief(text, 300)} (further ones not shown"
                  f"{self.hint})", file=sys.stderr)


def tensorstore_brief(text: str, limit: int = 400) -> str:
    """The gist of a TensorStore error's message: its first line, without the multi-kilobyte spec it quotes (a
    background thread's error printed it whole, now and then, where the restore's own warning left it out)."""
    text = text.splitlines()[0] if text else ""
    text = text.split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def sigterm_raises(stop: Callable[[], BaseException]) -> Iterator[None]:
    """Within the block, SIGTERM (a `timeout`, a scheduler, a machine shutting down) raises `stop()` in the main
    thread, so the block unwinds as after a Ctrl-C (files being written aborted, workers stopped, a line said), where
    the signal's default action ended the process at once. Off the main thread no handler can be set: none is."""
    def raise_stop(signum, frame):
        raise stop()

    try:
        previous = signal.signal(signal.SIGTERM, raise_stop)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
