"""Configuration: the default schema, loading of config files with `--config.a.b=value` overrides, validation
with one clear line per error, and the `config.json` written to every workdir.

Config files in `configs/` define `get_config(arg: str | None = None)` and start from `default_config()`, changing
only what differs. Every key a file or an override sets must exist here: a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib
import re
import traceback
from typing import Any

import ml_collections
from etils import epath

from clip_jax.data.images import DEFAULT_MAX_IMAGE_BYTES
from clip_jax.data.tokenizer import MIN_VOCAB_SIZE
from clip_jax.errors import ConfigError  # noqa: F401 (re-exported: clip_jax.config.ConfigError)
from clip_jax.files import is_remote, write_atomic
from clip_jax.models.clip import CLIPConfig
from clip_jax.models.presets import model_preset
from clip_jax.models.towers import TEXT_TOWERS, VISION_TOWERS


def default_config() -> ml_collections.ConfigDict:
    """Every configurable field, with its default. Config files override a subset."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 256  # global batch, over all hosts and devices
    # Micro-batches per step. The loss still sees the whole batch of negatives: embeddings of all micro-batches
    # are computed first, then each micro-batch is backpropagated with its slice of the embedding gradients.
    c.accum_steps = 1
    # Warm starts (a workdir whose only checkpoint is step 0: converted or stretched) set logit_scale to
    # model.logit_scale_init instead of keeping the checkpoint's value (Long-CLIP restarts from ln 100).
    c.reset_logit_scale = False
    # A new run that starts from the parameters of another workdir's latest checkpoint (same parameter names and
    # shapes; the model's dtype, remat and the optimizer may differ). Its optimizer state, step and data position
    # are not taken, and that workdir is only read. "" = from scratch.
    c.init_from = ""

    # Mesh axis sizes; -1 = all remaining devices. The batch is split over data x fsdp.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.model = ml_collections.ConfigDict(model_preset("B/16"))

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "clip"  # clip | siglip | siglip_ring | longclip (see clip_jax.losses.LOSSES)
    c.loss.label_smoothing = 0.0  # clip and longclip (Long-CLIP: 0.1)
    c.loss.multi_positive = False  # identical captions in a batch are positives of each other
    # longclip: long_weight * CLIP(image, long text) + short_weight * CLIP(PCA-reduced image, short text)
    c.loss.long_weight = 1.0
    c.loss.short_weight = 1.0
    c.loss.pca_components = 32  # principal components kept; must be below the batch the PCA runs over
    c.loss.pca_scope = "local"  # PCA over each device's batch (the reference) or the "global" all-gathered one

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 5e-4  # >= 0 (0: the parameters stay as they are, e.g. to evaluate a warm start)
    c.optimizer.min_lr_ratio = 0.0  # cosine decays to lr * min_lr_ratio
    c.optimizer.warmup_steps = 100
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.2
    c.optimizer.grad_clip_norm = 1.0  # <= 0 disables clipping
    # Regexes over parameter paths like "visual/transformer/resblocks_0/attn/in_proj/kernel" (re.search).
    c.optimizer.no_decay = (r"bias$", r"ln_[^/]*/scale$", r"ln_(pre|post|final)/", r"embedding", r"logit_")
    c.optimizer.frozen = ()  # matching parameters get no update and no optimizer state (e.g. r"^visual/" for LiT)
    # A step whose loss or gradient is NaN/inf is skipped (parameters and optimizer state unchanged); this many in
    # a row stop the run, since the run is then diverging rather than hitting one bad batch.
    c.optimizer.max_consecutive_nonfinite = 10

    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes"  # shapes | sharegpt4v | captions | records (see data.path)
    c.data.min_objects = 1  # shapes: objects per image
    c.data.max_objects = 3
    c.data.long_caption_prob = 0.0  # probability of training on the long caption instead of the short one
    c.data.partial_caption_prob = 0.0  # probability of a caption naming only the colour or only the shape (shapes)
    c.data.grayscale_shape_captions = False  # show the image in grayscale when its caption names only the shape
    # Long-CLIP (a loss that reads `short_text`): the short caption is the data's own, else the long caption's first
    # sentence, tokenized to this length (capped at the model's). The causal text tower gives the same features at
    # any length that holds the whole caption, so 77 tokens cost a third of 248 for nothing lost.
    c.data.short_context_length = 77
    # File sources (data.source "sharegpt4v": ShareGPT4V JSON; "captions": JSONL or CSV of image, caption
    # [, short_caption]); see clip_jax/data/captions.py. Image paths are relative to image_root (default: the
    # file's folder); undecodable images are skipped and counted. "records": ArrayRecord shards written by
    # `clip-jax data convert` (a directory, which must hold every shard of its set, a glob, or a comma-separated
    # list; gs:// works); see docs/data.md.
    c.data.path = ""
    c.data.image_root = ""
    c.data.skip = 0  # leave out the first N records (ShareGPT4V-1k: the first 1,000 are the test set)
    c.data.augment = True  # random resized crop for training (eval: resize + centre crop)
    c.data.crop_scale = (0.8, 1.0)
    c.data.tokenizer = "train"  # "train": fit a BPE vocabulary on training captions; "openai": OpenAI's; or a path
    c.data.tokenizer_vocab_size = 1024  # for "train"
    # Bytes read at most per image file; larger files, FIFOs and devices are dropped as bad samples (docs/data.md).
    c.data.max_image_bytes = DEFAULT_MAX_IMAGE_BYTES
    c.data.workers = 0  # grain worker processes (0: in the main process)
    c.data.prefetch = 2  # batches prepared ahead in a background thread

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0: only at the end
    c.eval.batch_size = 250
    c.eval.num_examples = 1000  # per zero-shot split and for retrieval
    # shapes: also long-text retrieval on captions over 77 tokens and the hard-pairs test (see evaluate/long_text.py)
    c.eval.long_text = False
    # Long-text retrieval on a folder in the Urban-1k layout (image/N.jpg, caption/N.txt) or a JSON file
    # {image file name: caption}; "" = off
    c.eval.long_text_set = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.max_to_keep = 3  # >= 1: the newest checkpoints kept (0 is refused: Orbax would keep none)
    c.checkpoint.keep_period = 0  # also keep every K-th step forever (0: off)
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.tensorboard = True
    c.log.progress_bar = True
    return c


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, tuple | list):
        return isinstance(value, tuple | list)
    return isinstance(value, type(default))


# Fields that may be None although their schema gives a type (None switches the feature off).
_NULLABLE = ("model.logit_bias_init",)


def _check_against(schema: Any, value: Any, path: str) -> None:
    if isinstance(schema, ml_collections.ConfigDict) or isinstance(schema, dict):
        if not isinstance(value, ml_collections.ConfigDict | dict):
            raise ConfigError(f"config key '{path}' must be a group of fields, got {type(value).__name__}")
        for key in value:
            sub = f"{path}.{key}" if path else key
            if key not in schema:
                close = [k for k in schema if k.lower()[:3] == str(key).lower()[:3]]
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key '{sub}'{hint}; valid keys here: {', '.join(sorted(schema))}")
            _check_against(schema[key], value[key], sub)
    elif value is None and schema is not None and path not in _NULLABLE:
        raise ConfigError(f"config key '{path}' must be {type(schema).__name__}, got None")
    elif not _type_ok(schema, value):
        raise ConfigError(
            f"config key '{path}' must be {type(schema).__name__}, got {type(value).__name__} {value!r}"
        )


def _model_schema(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model's own schema: the dataclass fields of the chosen tower types."""
    vision_type = model.get("vision", {}).get("type", "vit")
    text_type = model.get("text", {}).get("type", "transformer")
    if vision_type not in VISION_TOWERS:
        raise ConfigError(f"unknown model.vision.type {vision_type!r}; choose one of {sorted(VISION_TOWERS)}")
    if text_type not in TEXT_TOWERS:
        raise ConfigError(f"unknown model.text.type {text_type!r}; choose one of {sorted(TEXT_TOWERS)}")
    reference = model_preset("tiny")
    schema = {k: v for k, v in reference.items() if k not in ("vision", "text")}
    for tower, registry, kind in (("vision", VISION_TOWERS, vision_type), ("text", TEXT_TOWERS, text_type)):
        schema[tower] = {f.name: reference[tower].get(f.name) for f in dataclasses.fields(registry[kind][0])}
    schema["logit_bias_init"] = 0.0
    return schema


# Lower bounds of numeric fields. The every_steps are step moduli; max_to_keep 0 would make Orbax delete every
# checkpoint, the earlier runs' too; a context of one token has no room for the start and end tokens.
_MINIMUM = {
    "total_steps": 1, "batch_size": 1, "accum_steps": 1, "log.every_steps": 1, "checkpoint.every_steps": 1,
    "checkpoint.max_to_keep": 1, "checkpoint.keep_period": 0, "eval.every_steps": 0, "eval.batch_size": 1,
    "eval.num_examples": 1, "optimizer.lr": 0, "optimizer.warmup_steps": 0, "optimizer.weight_decay": 0,
    "optimizer.min_lr_ratio": 0, "optimizer.max_consecutive_nonfinite": 1, "data.prefetch": 0,
    "data.workers": 0, "data.skip": 0, "data.max_image_bytes": 1, "data.tokenizer_vocab_size": MIN_VOCAB_SIZE,
    "model.text.context_length": 2, "model.embed_dim": 1,
}


_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _check_names(config: ml_collections.ConfigDict) -> None:
    """Names that pick an implementation from a registry, checked before any work rather than where they are used."""
    from clip_jax.data.pipeline import TRAIN_SOURCES  # here: the pipeline imports this module
    from clip_jax.losses import LOSSES
    from clip_jax.models.layers import ACTIVATIONS, REMAT_POLICIES

    choices = {
        "data.source": TRAIN_SOURCES, "loss.name": LOSSES, "model.remat_policy": REMAT_POLICIES,
        "model.vision.activation": ACTIVATIONS, "model.text.activation": ACTIVATIONS, "model.dtype": _COMPUTE_DTYPES,
    }
    for key, registry in choices.items():
        value = config
        for part in key.split("."):
            value = value[part]
        if value not in registry:
            raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(sorted(registry))}")
    for key in ("no_decay", "frozen"):
        for pattern in config.optimizer[key]:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"optimizer.{key} rule {pattern!r} is not a regular expression ({e})") from None
    if config.data.source == "shapes":
        from clip_jax.data.pipeline import shapes_config

        try:  # the renderer's own checks (sizes, object counts), before any image is drawn
            shapes_config(config)
        except ValueError as e:
            raise ConfigError(f"data.source 'shapes': {e}") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (one line naming the key) for unknown keys, wrong types and inconsistent values."""
    schema = default_config()
    del schema.model
    top = {k: v for k, v in config.items() if k != "model"}
    _check_against(schema, top, "")
    _check_against(_model_schema(config.model), config.model, "model")
    missing = [f"model.{k}" for k in ("vision", "text") if k not in config.model]
    if missing:
        raise ConfigError(f"config is missing {', '.join(missing)}")
    for key, low in _MINIMUM.items():
        value = config
        for part in key.split("."):
            value = value[part]
        if value < low:
            raise ConfigError(f"config key '{key}' must be >= {low}, got {value}")
    _check_names(config)
    if config.batch_size % config.accum_steps:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by accum_steps {config.accum_steps}")
    for tower, sizes in (("vision", ("patch_size", "image_size")), ("text", ("context_length", "vocab_size"))):
        t = config.model[tower]
        for field in ("width", "layers", "heads", "head_dim", "mlp_dim", *sizes):
            if t[field] < 1:
                raise ConfigError(f"config key 'model.{tower}.{field}' must be >= 1, got {t[field]}")
    t = config.model.text
    if not 0 <= t.get("keep_positions", 0) < t.context_length:
        raise ConfigError(
            f"model.text.keep_positions must be in [0, context_length {t.context_length}), got {t.keep_positions}"
        )
    v = config.model.vision
    if v.image_size % v.patch_size:
        raise ConfigError(f"model.vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    if config.loss.pca_scope not in ("local", "global"):
        raise ConfigError(f"loss.pca_scope must be 'local' or 'global', got {config.loss.pca_scope!r}")
    if config.loss.pca_components < 1 or config.data.short_context_length < 2:
        raise ConfigError("loss.pca_components must be >= 1 and data.short_context_length >= 2")
    scale = config.data.crop_scale
    if len(scale) != 2 or not all(isinstance(x, int | float) for x in scale) or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")


def check_input_paths(config: ml_collections.ConfigDict, *, training: bool = True) -> None:
    """Files a run reads, looked for before any work (not in `validate`: a workdir whose data has moved must still
    be evaluated, encoded and exported). A path that is a pattern or a list (records) is left to its source."""
    paths = {"eval.long_text_set": config.eval.long_text_set}
    if training:
        if config.data.source != "shapes" and not config.data.path:
            raise ConfigError(f"data.source {config.data.source!r} reads files: set --config.data.path (see the "
                              "schema's comment in clip_jax/config.py)")
        if config.data.source in ("captions", "sharegpt4v"):
            paths["data.path"] = config.data.path
        if config.data.tokenizer not in ("train", "openai"):
            paths["data.tokenizer"] = config.data.tokenizer
    for key, path in paths.items():
        if path and not is_remote(path) and not pathlib.Path(path).exists():
            raise ConfigError(f"{key}: {path} does not exist")


def model_config(config: ml_collections.ConfigDict) -> CLIPConfig:
    return CLIPConfig.from_dict(config.model.to_dict())


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]`, applies `a.b=value` overrides (Python literals; bare words are strings),
    and validates. Errors are ConfigError with one line naming the problem."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found" + (" (it is a folder)" if file.is_dir() else ""))
    module_spec = importlib.util.spec_from_file_location(f"clip_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    # A config file is the user's code: whatever it raises (a syntax error, a typo, an unknown preset in
    # get_config's argument, ConfigDict's type check) is a mistake in that file, reported as one line naming it.
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        raise ConfigError(f"config file {path} failed to load: {_code_error(e, file)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"config file {path}: {call} failed: {_code_error(e, file)}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned {type(config).__name__}, not the ConfigDict of "
                          "default_config() (a missing `return config`?)")
    apply_overrides(config, overrides)
    validate(config)
    return config


def _code_error(error: Exception, file: pathlib.Path) -> str:
    """`ValueError: unknown preset 'B/99' (line 12)`: an exception raised by a config file, with the line of that
    file it was raised from."""
    line = next((f.lineno for f in reversed(traceback.extract_tb(error.__traceback__))
                 if pathlib.Path(f.filename).resolve() == file.resolve()), None)
    return f"{type(error).__name__}: {error}" + (f" (line {line})" if line else "")


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.removeprefix("--").removeprefix("config.")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --config.{key}=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise ConfigError(f"unknown config key '{'.'.join(parents[: i + 1])}' in override {item!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"unknown config key '{key}' in override {item!r}")
        value = _parse_value(text)
        if not _type_ok(node[leaf], value):
            raise ConfigError(
                f"override {item!r}: '{key}' must be {type(node[leaf]).__name__}, got {type(value).__name__}"
            )
        with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
            node[leaf] = float(value) if isinstance(node[leaf], float) and not isinstance(value, bool) else value


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def save_config(config: ml_collections.ConfigDict, path: epath.PathLike) -> None:
    """Writes config.json atomically: a relaunch (`train --workdir`) reads it back, and every launch rewrites it."""
    write_atomic(path, json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list) + "\n")


def read_config(path: epath.PathLike) -> ml_collections.ConfigDict:
    """Reads a workdir's config.json back (tuples come back as lists; types otherwise as saved). Fields added to the
    schema since the file was written take their defaults, so a workdir of an older version resumes."""
    try:
        data = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # ValueErrors both
        raise ConfigError(f"{path} is damaged ({e}); restore it from a copy, or write the run's config again with "
                          "`clip-jax train --config FILE` on that workdir") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a clip_jax config (a JSON object of fields expected)")
    _fill_defaults(data, default_config().to_dict())
    config = ml_collections.ConfigDict(data)
    validate(config)
    return config


def _fill_defaults(data: dict, schema: dict) -> None:
    """Adds, in place, the schema's fields that `data` lacks. The model is left as written: its fields depend on the
    tower types, and a missing one is an error that `validate` names."""
    for key, default in schema.items():
        if key not in data:
            data[key] = default
        elif key != "model" and isinstance(default, dict) and isinstance(data[key], dict):
            _fill_defaults(data[key], default)
