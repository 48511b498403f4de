"""Batched, sharded embedding of host arrays: images or token ids in, L2-normalised numpy embeddings out.

Each tower is compiled once for one fixed global batch shape. The last, partial batch is padded to that shape
(so it does not compile again) and the padding rows are dropped from the result, so every example is embedded
exactly once whatever N is.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from clip_jax.host_memory import dispatch_depth
from clip_jax.models.clip import CLIP
from clip_jax.sharding import LOGICAL_RULES, batch_divisor, batch_sharding, replicated


def _place_params(params: Any, mesh: Mesh) -> tuple[Any, Any]:
    """(params, shardings): leaves already laid out on `mesh` keep their sharding (e.g. fsdp-sharded training
    params are used as they are); anything else (host arrays, arrays on one device or on another mesh) is
    replicated onto `mesh`."""
    params = nn.meta.unbox(params)

    def sharding_of(x):
        s = getattr(x, "sharding", None)
        return s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated(mesh)

    shardings = jax.tree.map(sharding_of, params)
    return jax.device_put(params, shardings), shardings


def _finite(embeddings: np.ndarray, what: str) -> np.ndarray:
    """`embeddings`, or a FloatingPointError (a one-line error of the commands) where one is NaN or inf: the model's
    parameters have diverged, and every figure computed from them would be meaningless."""
    if not np.isfinite(embeddings).all():
        raise FloatingPointError(
            f"the model gives NaN/inf {what} embeddings: its parameters have diverged (a learning rate too high, or a "
            "warm-up too short); use an earlier checkpoint (docs/your_data.md: when a run diverges)")
    return embeddings


class Encoder:
    """Embeds images and tokenized texts with `model` on `mesh`, `batch_size` examples per device call.

    `batch_size` is rounded up to a multiple of the number of batch shards so every batch divides over the mesh.
    Inputs are host numpy arrays that every process holds in full; the results are replicated, so each process
    gets all rows back.
    """

    def __init__(self, model: CLIP, params: Any, mesh: Mesh, batch_size: int = 256) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model = model
        self.mesh = mesh
        divisor = batch_divisor(mesh)
        self.batch_size = -(-batch_size // divisor) * divisor
        self.embed_dim = model.config.embed_dim
        # How often each function was traced (python side effect inside the jitted body): 1 after any number of
        # calls with the same input shape and dtype.
        self.trace_counts = {"images": 0, "texts": 0, "audio": 0, "segment": 0}
        self.params, self._param_shardings = _place_params(params, mesh)
        self._build()

    def images(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, D] embeddings of uint8 RGB images [N, H, W, 3] (or float images already normalised)."""
        return _finite(self._run(self._image_fn, np.asarray(images)), "image")

    def texts(self, tokens: np.ndarray) -> np.ndarray:
        """float32 [N, D] embeddings of token ids [N, T] (T <= the model's context length)."""
        return _finite(self._run(self._text_fn, np.asarray(tokens, dtype=np.int32)), "text")

    def audio(self, waveforms: np.ndarray) -> np.ndarray:
        """float32 [N, D] embeddings of float waveforms [N, samples] (a model with an audio tower: AudioCLIP)."""
        return _finite(self._run(self._audio_fn, np.asarray(waveforms, dtype=np.float32)), "audio")

    def segment(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label int32 [N, H, W], its probability float32 [N, H, W]) of each pixel of uint8 images [N, H, W, 3]
        among L labels given as L2-normalised embeddings [L, D]: the model's `dense_logits` (the method's dense
        predict function) upsampled bilinearly to the image size, softmax over the labels."""
        labels = jax.device_put(np.asarray(labels, np.float32), replicated(self.mesh))
        return self._run(self._segment_fn, np.asarray(images), labels)

    def predict(self, name: str, images: np.ndarray, *args: Any) -> Any:
        """The model's method `name`(images, *args) over uint8 images [N, H, W, 3] in batches, `args` (arrays or
        pytrees of them, e.g. a detector's queries) replicated to every device: a method's predict function (a
        detector's `detect`), compiled once per name and shapes. Returns its outputs with N rows."""
        if name not in self._predict_fns:
            self.trace_counts.setdefault(name, 0)
            method = getattr(type(self.model), name)

            def fn(params, batch, *rest):
                return self.model.apply({"params": params}, batch, *rest, method=method)

            self._predict_fns[name] = self._jit(name, fn, replicated_args=len(args)) if args else self._jit(name,
                                                                                                          method)
        args = jax.device_put(jax.tree.map(np.asarray, args), replicated(self.mesh))
        return self._run(self._predict_fns[name], np.asarray(images), *args)

    def _build(self) -> None:
        self._predict_fns: dict[str, Callable] = {}
        self._image_fn = self._jit("images", CLIP.encode_image)
        self._text_fn = self._jit("texts", CLIP.encode_text)
        self._audio_fn = self._jit("audio", CLIP.encode_audio)

        def segment(params, batch, labels):
            logits = self.model.apply({"params": params}, batch, labels, method=type(self.model).dense_logits)
            logits = jax.image.resize(logits, (*batch.shape[:3], logits.shape[-1]), "bilinear")
            probs = jax.nn.softmax(logits.astype(np.float32), axis=-1)
            return jnp.argmax(probs, axis=-1).astype(jnp.int32), jnp.max(probs, axis=-1)

        self._segment_fn = self._jit("segment", segment, replicated_args=1)

    def _jit(self, name: str, method: Callable, replicated_args: int = 0) -> Callable:
        """`method` of the model (or a function of (params, batch, *args)) compiled over batches on the mesh, with
        `replicated_args` more arguments replicated to every device."""
        model = self.model

        # The params are an argument, not a closure: closed-over arrays would be embedded in the executable as
        # constants (a second copy of the weights) and fix them at compile time.
        def encode(params, batch, *args):
            self.trace_counts[name] += 1
            if replicated_args:
                return method(params, batch, *args)
            return model.apply({"params": params}, batch, method=method)

        return jax.jit(
            encode,
            in_shardings=(self._param_shardings, batch_sharding(self.mesh), *[replicated(self.mesh)] * replicated_args),
            # Replicated output: fully addressable on every process, so device_get works on any number of hosts.
            out_shardings=replicated(self.mesh),
        )

    def _put(self, batch: np.ndarray) -> jax.Array:
        # Every process holds the whole host batch and supplies the shards of its own devices: the same call
        # works on one host and on many.
        return jax.make_array_from_callback(batch.shape, batch_sharding(self.mesh), lambda index: batch[index])

    def _run(self, fn: Callable, inputs: np.ndarray, *args: jax.Array) -> Any:
        """`fn(params, batch, *args)` over `inputs` in batches: float32 [N, D] embeddings, or for a function with
        several outputs a tuple of arrays with N rows, each of its own dtype."""
        n, size = len(inputs), self.batch_size
        results: list[Any] = []
        pending: collections.deque[tuple[Any, int]] = collections.deque()
        # Batches dispatched beyond the one being fetched (`dispatch_depth`): on an accelerator the device stays busy
        # while the host copies results back; a large evaluation set is never all on the device at once.
        ahead = dispatch_depth()

        def fetch():
            out, rows = pending.popleft()
            results.append(jax.tree.map(lambda a: np.asarray(a)[:rows], jax.device_get(out)))  # drop padding rows

        # The model's sharding constraints resolve logical axis names through these rules at trace time.
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_RULES):
            for start in range(0, n, size):
                batch = inputs[start : start + size]
                rows = len(batch)
                if rows < size:
                    # Zero rows are valid inputs for every tower (a black image; an all-padding text pooled at
                    # position 0; silence); they are computed and discarded.
                    batch = np.concatenate([batch, np.zeros((size - rows, *batch.shape[1:]), batch.dtype)])
                pending.append((fn(self.params, self._put(batch), *args), rows))
                if len(pending) > ahead:
                    fetch()
            while pending:
                fetch()
        if not results:
            return np.zeros((0, self.embed_dim), np.float32)
        if isinstance(results[0], tuple):
            return tuple(np.concatenate(parts) for parts in zip(*results, strict=True))
        return np.concatenate(results).astype(np.float32)
