"""Test session setup: 8 fake CPU devices (must be set before jax is imported), float32 matmuls, and one XLA
compilation cache for the session: many tests (and the training processes some of them start) compile the same
tiny models, and a compile done once is then read back instead of redone. The cache is a new folder per session,
removed at its end, so no run reads another's. Likewise a test process fits the BPE vocabulary of a shapes run once
per setting, not once per run."""

import atexit
import contextlib
import importlib.util
import io
import mmap
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest


def _known_to_jaxlib(flag: str) -> bool:
    """Whether the installed jaxlib defines an XLA flag: an unknown one in XLA_FLAGS aborts every process."""
    folder = pathlib.Path(importlib.util.find_spec("jaxlib").origin).parent
    for library in folder.glob("*.so"):
        with open(library, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(flag.encode()) >= 0:
                return True
    return False


# The tests run tiny models, whose time goes to compiling them, not to running them. XLA's CPU backend compiles
# about twice as fast without LLVM's optimisation passes (the HLO passes, fusion included, are unchanged), and a
# method's train step compiled in 40-65% less time with the loop emitters than with the newer fusion emitters: the
# suite took 992 s instead of 1,224 s (VM D, 2026-12-06).
FAST_COMPILE = ["--xla_backend_optimization_level=0"]
if _known_to_jaxlib("xla_cpu_use_fusion_emitters"):
    FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int) -> str:
    """XLA_FLAGS of a process that a test starts with `devices` fake CPU devices, compiling as this one does."""
    return " ".join([f"--xla_force_host_platform_device_count={devices}", *FAST_COMPILE])


os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags(8)]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # inherited by the subprocesses tests start
    _cache = tempfile.mkdtemp(prefix="clip_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


def clip_jax(*args) -> subprocess.CompletedProcess:
    """`clip-jax ARGS` as a user runs it, in this process (a new Python per call costs seconds of imports, and traces
    again and reads back from the compilation cache the programs this process holds): the exit status and everything
    it printed. Tests that need a process of their own (another device count, signals, the interpreter's exit) start
    one."""
    from clip_jax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True, scope="session")
def _shapes_vocabularies_fitted_once():
    """A fresh run of `data.tokenizer="train"` fits its vocabulary on 3,000 shapes scenes' captions: 1-1.5 s of CPU,
    about 50 times a suite, many of them repeats of a setting in the same process. Fitting is deterministic (the
    same merges every time: tests/test_tokenizer.py), so a test process keeps each setting's tokenizer; runs of
    other sources, whose captions are files a test writes, fit theirs."""
    from clip_jax.data import pipeline

    fit, fitted = pipeline.train_tokenizer, {}

    def train_tokenizer(config):
        if config.data.source != "shapes":
            return fit(config)
        key = (repr(pipeline.shapes_config(config)), config.data.tokenizer_vocab_size)
        if key not in fitted:
            fitted[key] = fit(config)
        return fitted[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "train_tokenizer", train_tokenizer)
        yield
