"""The method layer's contract: what a method of the CLIP family gives the generic trainer.

A method is a subclass of `Method`, registered by name in `clip_jax.methods.METHODS` and chosen by
`config.method.name`. It owns:
- its hyperparameters: `Config`, a frozen dataclass whose fields are the rest of `config.method` (type-checked and
  defaulted from it, like the towers' fields are from theirs);
- its batch: `fields()` (the arrays the compiled step receives, per example), `captions()` (which caption strings
  the input pipeline tokenizes into which fields, and a picklable map adding caption strings of its own);
- its model, the inputs that initialise it, and its step pieces (`step_fns`, see `StepFns`);
- its training data (`train_data`: by default the caption pipeline over `captions()`, with the fields its
  `field_hooks` add), and what it computes once before training from the data and the model it starts from
  (`prepare`, e.g. cached image embeddings);
- its checks before compilation (`check`), its warm start (`base_params`, `warm_start`) and its FLOPs
  (`flops_per_example`).
`train/loop.py`, `train/step.py`, `config.py` and `data/pipeline.py` name no method: they ask the method.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, NoReturn

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from clip_jax.data.pipeline import Captions, FieldHook, FieldHooks, train_iterator
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.errors import ConfigError
from clip_jax.files import same_setting, write_atomic

PyTree = Any
Outputs = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of the batch, per example: `shape` excludes the batch dimension."""

    shape: tuple[int, ...]
    dtype: Any


def _nothing(*_) -> Outputs:
    return {}


@dataclasses.dataclass(frozen=True)
class StepFns:
    """What one training step computes, in pieces the generic step composes (train/step.py):
    - `embed(params, batch, rng)`: per-example differentiable outputs [B, ...]. GradCache accumulation embeds
      micro-batches separately, so one example's outputs must not depend on the others'. `rng` is fresh every step
      (micro-batch k of an accumulated step gets `fold_in(rng, k)`).
    - `shared(params)`: batch-independent outputs (temperatures, class embeddings, caches), replicated to every
      shard of the loss, whatever their rank.
    - `loss(outputs, *, axis_name)`: the loss of the global batch, written for one device's shard (see
      clip_jax/losses.py); `outputs` holds the local rows of `embed` and `targets` and the whole of `shared`.
    - `targets(batch)`: per-example values without gradient the loss reads (labels, caption keys, boxes).
    - `log(shared)`: scalars logged with the step's metrics (e.g. the temperature).
    """

    embed: Callable[[PyTree, dict[str, jax.Array], jax.Array], Outputs]
    shared: Callable[[PyTree], Outputs]
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    targets: Callable[[dict[str, jax.Array]], Outputs] = _nothing
    log: Callable[[Outputs], Outputs] = _nothing


@dataclasses.dataclass(frozen=True)
class Preparation:
    """What the loop gives `Method.prepare`: the run's workdir (None outside a run), tokenizer, whether this process
    writes shared files, embedding functions (normalised, float32 [N, D]) of the model the run starts from (images
    uint8 [N, H, W, 3] and token ids [N, T]; they load that model on their first call), and what the launch is: a
    `training` one (a reader such as `eval` or `classify` writes no cache and refuses nothing it could still read),
    `resumed` from a checkpoint of its own."""

    workdir: Any
    tokenizer: ClipTokenizer
    is_primary: bool
    encode_images: Callable[[np.ndarray], np.ndarray]
    encode_texts: Callable[[np.ndarray], np.ndarray]
    training: bool = True
    resumed: bool = False


@dataclasses.dataclass(frozen=True)
class NoConfig:
    """The hyperparameters of a method that has none."""


class Method:
    """A method of the CLIP family (module docstring). Instances are built from the whole run config."""

    name: ClassVar[str]
    Config: ClassVar[type] = NoConfig
    # Config groups a resumed run must keep (train/loop.py::prepare_workdir): the model, and what the method built
    # its cached state from.
    fixed_groups: ClassVar[tuple[str, ...]] = ("model",)
    # Whether the training step applies the image tower's random drops, `model.vision.patch_dropout` and
    # `model.vision.stochastic_depth` (it passes each example's key to the image tower); a config that sets either
    # for a method that does not is refused rather than silently trained without it.
    image_dropout: ClassVar[bool] = False
    # Whether the method adapts a pretrained CLIP (a converted or stretched model at the workdir's step 0, or
    # `config.init_from`): a new run without one trains from random weights, which the launch warns about.
    fine_tunes: ClassVar[bool] = False
    # Whether it needs that pretrained CLIP: a new run without one is refused, not warned (a few-shot learner on
    # random towers learns nothing of use).
    needs_pretrained: ClassVar[bool] = False
    # Whether training reads `config.data` (the few-shot methods read their own `few_shot` sets instead).
    reads_data: ClassVar[bool] = True
    # How `segment` finds a run's background: "label", a label the method trained (LSeg's), or "threshold" on the
    # best label's probability; None for a method that is no segmenter (its CLIP's patch features then, said).
    segment_background: ClassVar[str | None] = None
    # What `export` leaves in the workdir, which has no OpenAI or Hugging Face layout: (what, e.g. "LSeg's decoder
    # has", and what uses it there), said in a note; and whether the image tower exports at all (GroupViT's grouping
    # stages do not: only --format hf-text, its text tower).
    export_leaves: ClassVar[tuple[str, str] | None] = None
    exports_image_tower: ClassVar[bool] = True

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.hparams = self.Config(**{k: v for k, v in config.method.items() if k != "name"})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """`config.method` of this method with every field at its default."""
        return {"name": cls.name, **dataclasses.asdict(cls.Config())}

    def _required(self, hook: str) -> NoReturn:
        raise NotImplementedError(f"{type(self).__name__} must define {hook}, a hook every method has (docs/methods.md,"
                                  " 'Adding a method'; ClipMethod defines it for a CLIP-like batch)")

    # --- the batch (required) ---------------------------------------------------------------------------------
    def fields(self) -> dict[str, Field]:
        """The arrays of one example of the batch, by name."""
        self._required("fields")

    def captions(self) -> Captions:
        """The caption source the default `train_data` reads (a method with a `train_data` of its own needs none)."""
        self._required("captions")

    # --- model and step (required) ----------------------------------------------------------------------------
    def model_config(self) -> Any:
        """The towers' CLIPConfig the model is built on (the FLOP counts and the method contract tests read it)."""
        self._required("model_config")

    def model(self) -> nn.Module:
        self._required("model")

    def init_inputs(self) -> tuple[np.ndarray, ...]:
        """Arguments of `model.init` after the rng: a batch of one."""
        self._required("init_inputs")

    def step_fns(self, model: nn.Module) -> StepFns:
        self._required("step_fns")

    # --- data -----------------------------------------------------------------------------------------------
    def prepare(self, prep: Preparation) -> None:
        """Called once before `model()` and `train_data`: what the method computes from the data and the model it
        starts from (nothing by default)."""

    def train_data(self, config: ml_collections.ConfigDict, tokenizer: ClipTokenizer, rows: Sequence[int]
                   ) -> Iterator[dict]:
        """This host's rows `rows` of every global batch, with the host-only `stats` of data/pipeline.py, as a
        checkpointable grain iterator: by default the caption pipeline over `captions()`, with `field_hooks()`."""
        hooks = self.field_hooks()
        return train_iterator(config, tokenizer, rows, self.captions(), FieldHooks(hooks) if hooks else None)

    def field_hooks(self) -> tuple[FieldHook, ...]:
        """The pipeline's hooks that add this method's own fields to an example (`TrainExample`'s `add_fields`), in
        the order they draw from the example's generator: none by default."""
        return ()

    # --- around the step --------------------------------------------------------------------------------------
    def check(self, mesh: Mesh) -> None:
        """Raises ConfigError for a configuration that validates but cannot work on `mesh` (before compiling)."""

    def check_batch_shards(self, shards: int) -> None:
        """Raises ConfigError where the batch, split into `shards` (the mesh's data x fsdp), is too small a part for
        the method (Long-CLIP's per-device PCA): the trainer's check, and a launcher's before its job is queued."""

    def base_params(self, params: PyTree) -> PyTree:
        """The part of the parameters a warm start (a converted or stretched model, `init_from`) reads from the
        checkpoint: all of them by default."""
        return params

    def warm_start(self, restored: PyTree, initial: PyTree) -> PyTree:
        """The parameters a warm start trains from, given those read from the checkpoint (`base_params`) and the
        freshly initialised ones."""
        return restored

    def flops_per_example(self, trainable: Mapping[str, Any]) -> float:
        """Model FLOPs of one training example (2 per multiply-add), given the tree of trainable flags (required)."""
        self._required("flops_per_example")


def abstract_batch(fields: Mapping[str, Field], batch_size: int, sharding: Any = None
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """The batch the step is compiled for: `batch_size` rows of every field."""
    return {name: jax.ShapeDtypeStruct((batch_size, *f.shape), f.dtype, sharding=sharding)
            for name, f in fields.items()}


def cached_arrays(prep: Preparation, name: str, settings: str, make: Callable[[], dict[str, np.ndarray]],
                  what: str, source: dict[str, np.ndarray] | None = None,
                  source_changed: Callable[[dict[str, np.ndarray]], str] | None = None) -> dict[str, np.ndarray]:
    """Arrays a method computes once before training (`prepare`), cached in the workdir as `name` (.npz): read back
    when the file exists, made and written (by a training's primary process) when not, made alone without a workdir
    or by a reader.
    `settings` (a JSON string of what the arrays depend on) is stored with them: a file made with other settings
    (`files.same_setting`) is a ConfigError. A resume with other settings is refused earlier (`fixed_groups`), but a
    launch that stopped before its first checkpoint leaves the cache and lets the next launch change them.

    `source`: what the arrays are made from beyond the settings, which name files by their paths (the class names
    a folder holds, an annotation file's hash), stored with them too; a file whose stored source differs is a
    ConfigError whose message is `source_changed(stored source)`. A file of an earlier version, without it, is read
    as before."""
    source = source or {}
    writes = prep.is_primary and prep.training  # a reader (eval, classify) writes nothing into the workdir
    cache = prep.workdir / name if prep.workdir is not None else None
    if cache is not None and cache.exists():
        with cache.open("rb") as f:
            stored = dict(np.load(f))
        written = str(stored.pop("settings"))
        if not same_setting(json.loads(written), json.loads(settings)):
            raise ConfigError(f"{cache} holds {what} of other settings (they changed since this run started): resume "
                              "with the run's own settings, or use a new --workdir")
        made_from = {key: stored.pop(key) for key in source if key in stored}
        if len(made_from) == len(source) and any(not np.array_equal(made_from[k], v) for k, v in source.items()):
            raise ConfigError(source_changed(made_from) if source_changed else f"{cache} holds {what} made from other "
                              "files than the run's now")
        if written != settings and writes:  # an earlier version's relative paths: kept absolute from now on
            _write_npz(cache, settings, {**stored, **made_from})
        return stored
    arrays = make()
    if cache is not None and writes:
        _write_npz(cache, settings, {**arrays, **source})
    return arrays


def _write_npz(path: Any, settings: str, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, settings=np.array(settings), **arrays)
    write_atomic(path, buffer.getvalue())
