"""Test session setup: 8 fake CPU devices (must be set before jax is imported), float32 matmuls, and one XLA
compilation cache for the session: many tests (and the training processes some of them start) compile the same
tiny models, and a compile done once is then read back instead of redone. The cache is a new folder per session,
removed at its end, so no run reads another's."""

import atexit
import os
import shutil
import tempfile

# The tests run tiny models, whose time goes to compiling them, not to running them: XLA's CPU backend without LLVM's
# optimisation passes compiles about twice as fast (the HLO passes, fusion included, are unchanged).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # inherited by the subprocesses tests start
    _cache = tempfile.mkdtemp(prefix="clip_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
