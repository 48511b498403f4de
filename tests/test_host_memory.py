"""host_memory.keep_freed_memory: XLA:CPU's temporaries stop being faulted in afresh at every call."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from clip_jax import host_memory

# A jitted function with one 128 MiB temporary (sin(x), read by a matrix-vector product), called 8 times after 2
# warm-up calls; prints the minor page faults of each call and the temporary's size.
_SCRIPT = """
import json, resource, sys
from clip_jax.host_memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x[0])).sum())
x = jnp.ones((4096, 8192), jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
f(x).block_until_ready(); f(x).block_until_ready()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "temp_pages": temp // resource.getpagesize(), "faults": faults}))
"""


def _faults(mode: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_temporaries_are_reused_instead_of_faulted_in_again():
    default, kept = _faults("default"), _faults("keep")
    pages = default["temp_pages"]
    assert pages > 64 * 2**20 // 4096  # past the 64 MB a glibc thread arena can grow to: the mmap case
    assert kept["applied"] and not default["applied"]
    # glibc's default: every call maps the temporary afresh and faults in all of its pages.
    assert min(default["faults"]) >= 0.9 * pages, default
    # kept: the heap holds the freed buffer and a later call takes it back without a fault (the heap may take a
    # few calls to settle into a layout where the buffer fits its old place, so not every call).
    assert min(kept["faults"]) < 0.05 * pages, kept


def test_not_applied_once_jax_started_or_on_an_accelerator(monkeypatch):
    jnp.zeros(()).block_until_ready()  # this process's backend has started its threads
    assert host_memory.keep_freed_memory() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert host_memory._accelerator_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not host_memory._accelerator_expected()
