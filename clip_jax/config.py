"""Configuration: the default schema, loading of config files with `--config.a.b=value` overrides, validation
with one clear line per error, and the `config.json` written to every workdir.

Config files in `configs/` define `get_config(arg: str | None = None)` and start from `default_config()`, changing
only what differs. Every key a file or an override sets must exist here: a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib.util
import inspect
import json
import logging
import math
import os
import pathlib
import re
import sys
import traceback
from typing import Any

import ml_collections
from etils import epath

from clip_jax.data.classification import CLASS_SPLITS, FEW_SHOT_DATASETS
from clip_jax.data.images import DEFAULT_MAX_IMAGE_BYTES
from clip_jax.data.pipeline import NEGATIVE_CAPTION, TRAIN_SOURCES, shapes_config
from clip_jax.data.tokenizer import MIN_VOCAB_SIZE
from clip_jax.errors import ConfigError  # noqa: F401 (re-exported: clip_jax.config.ConfigError)
from clip_jax.evaluate.classify import check_templates
from clip_jax.evaluate.suite import EVALUATORS, check_sources, eval_defaults, parse_entry
from clip_jax.files import absolute_path, is_remote, write_atomic
from clip_jax.methods import METHODS, get_method, method_class
from clip_jax.models.audio import config_problem as audio_config_problem
from clip_jax.models.clip import CLIP_MEAN, CLIP_STD, REQUIRED_TOWERS, TOWERS, CLIPConfig, normalisation_problem
from clip_jax.models.layers import ACTIVATIONS, ATTENTION_IMPLEMENTATIONS, LAYER_NORM_IMPLEMENTATIONS, REMAT_POLICIES
from clip_jax.models.presets import model_preset
from clip_jax.models.resnet import config_problem as resnet_config_problem
from clip_jax.models.towers import IMAGE_DROPOUT_FIELDS, VISION_POOLS
from clip_jax.sharding import BATCH_AXES, MESH_AXES, mesh_shape

log = logging.getLogger(__name__)


def default_config() -> ml_collections.ConfigDict:
    """Every configurable field, with its default. Config files override a subset."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 256  # global batch, over all hosts and devices
    # Micro-batches per step. The loss still sees the whole batch of negatives: embeddings of all micro-batches
    # are computed first, then each micro-batch is backpropagated with its slice of the embedding gradients.
    c.accum_steps = 1
    # A new run that starts from the parameters of another workdir's latest checkpoint (same parameter names and
    # shapes; the model's dtype, remat and the optimizer may differ). Its optimizer state, step and data position
    # are not taken, and that workdir is only read. "" = from scratch.
    c.init_from = ""

    # Mesh axis sizes; -1 = all remaining devices. The batch is split over data x fsdp.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.model = ml_collections.ConfigDict(model_preset("B/16"))

    # The method: `name` (clip, siglip, longclip, coop, ...: clip_jax.methods.METHODS) and its own fields, those of its
    # Config dataclass (e.g. clip_jax/methods/clip.py::ClipConfig). `--config.method.name=X` switches to X's fields
    # at their defaults, keeping the values set before that X also has; a config file uses `method_config`.
    c.method = method_config("clip")

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 5e-4  # >= 0 (0: the parameters stay as they are, e.g. to evaluate a warm start)
    c.optimizer.min_lr_ratio = 0.0  # cosine decays to lr * min_lr_ratio
    c.optimizer.warmup_steps = 100
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.2
    c.optimizer.grad_clip_norm = 1.0  # <= 0 disables clipping
    # Regexes over parameter paths like "visual/transformer/resblocks_0/attn/in_proj/kernel" (re.search): biases,
    # every scale (a norm's: LayerNorm's, a ResNet's BatchNorm or GroupNorm, a method's own; the temperatures,
    # logit_scale and AudioCLIP's logit_scale_audio_*; GLIP's layer scales: 1-D all, as open_clip decays none) and the
    # embeddings (token and position tables, the class token).
    c.optimizer.no_decay = (r"bias$", r"scale", r"embedding")
    c.optimizer.frozen = ()  # matching parameters get no update and no optimizer state (e.g. r"^visual/" for LiT)
    # A step whose loss or gradient is NaN/inf is skipped (parameters and optimizer state unchanged); this many in
    # a row stop the run, since the run is then diverging rather than hitting one bad batch.
    c.optimizer.max_consecutive_nonfinite = 10

    c.data = ml_collections.ConfigDict()
    c.data.source = "shapes"  # shapes | sharegpt4v | captions | records | segmentation_folder (see data.path)
    c.data.min_objects = 1  # shapes: objects per image
    c.data.max_objects = 3
    c.data.shapes_domain = "clean"  # shapes: rendering domain, a key of clip_jax.data.shapes.DOMAINS (clean | shifted)
    c.data.long_caption_prob = 0.0  # probability of training on the long caption instead of the short one
    c.data.partial_caption_prob = 0.0  # probability of a caption naming only the colour or only the shape (shapes)
    # probability of showing the image in grayscale when its caption names only the shape (shapes; 1.0: always)
    c.data.grayscale_shape_prob = 0.0
    # probability of showing the image's pixels in a random order (its colours, no shape) when its caption names only
    # the colour (shapes): the colour-side counterpart of grayscale_shape_prob
    c.data.shuffled_colour_prob = 0.0
    # shapes: also keep shapes.VALIDATION_HELD_OUT out of training, and score the held-out zero-shot on those pairs
    # (zero_shot_top1_val) instead of the test pairs: for choosing a recipe without looking at the test pairs.
    c.data.shapes_validation_pairs = False
    # Each example also carries a caption that does not match it: the hard negatives of method negclip. shapes: for
    # each of its captions (the salient object's colour or shape replaced by another training pair's); caption files
    # (data.source "captions"): each row's negative_caption_field column (e.g. neg_caption; one, or a list to draw
    # one from per example, as NegCLIP's TSV has), against its caption (a short_caption column is then not read);
    # records: that key of each record's metadata (where the converter keeps a table's other columns). An example
    # without one is dropped and counted.
    c.data.negative_captions = False
    c.data.negative_caption_field = "negative_caption"
    # File sources (data.source "sharegpt4v": ShareGPT4V JSON; "captions": JSONL or CSV of image, caption
    # [, short_caption]); see clip_jax/data/captions.py. Image paths are relative to image_root (default: the
    # file's folder); undecodable images are skipped and counted. "records": ArrayRecord shards written by
    # `clip-jax data convert` (a directory, which must hold every shard of its set, a glob, or a comma-separated
    # list; gs:// works); see docs/data.md. "segmentation_folder": images and masks in the PASCAL VOC layout, its
    # ImageSets/Segmentation/train.txt (LSeg; data/segmentation.py).
    c.data.path = ""
    c.data.image_root = ""
    # captions (csv, tsv, jsonl): the columns of the image path and the caption (open_clip's CSVs: filepath, title);
    # a short_caption column is read when there is one
    c.data.image_field = "image"
    c.data.caption_field = "caption"
    c.data.skip = 0  # leave out the first N records (ShareGPT4V-1k: the first 1,000 are the test set)
    c.data.augment = True  # random resized crop for training (eval: resize + centre crop)
    c.data.crop_scale = (0.8, 1.0)
    # Colour jitter of training images, torchvision's ColorJitter (open_clip's aug_cfg color_jitter): brightness,
    # contrast and saturation each scaled by a factor drawn from [1 - s, 1 + s], the hue shifted by up to h of the
    # colour circle, in a random order; on an image with probability colour_jitter_prob. All 0: off.
    c.data.colour_jitter = (0.0, 0.0, 0.0, 0.0)  # (brightness, contrast, saturation, hue)
    c.data.colour_jitter_prob = 0.8  # SimCLR's
    # "train": fit a BPE vocabulary on the captions of 3,000 training examples (spread over a caption table; the
    # first ones of records); "openai": OpenAI's; or a path (a tokenizer.json, a BPE merges file). A resume keeps its
    # workdir's tokenizer.json.
    c.data.tokenizer = "train"
    c.data.tokenizer_vocab_size = 1024  # for "train"
    # Bytes read at most per image file; larger files, FIFOs and devices are dropped as bad samples (docs/data.md).
    c.data.max_image_bytes = DEFAULT_MAX_IMAGE_BYTES
    c.data.workers = 0  # grain worker processes (0: in the main process)
    c.data.prefetch = 2  # batches prepared ahead in a background thread

    # Few-shot transfer (docs/few_shot.md, clip_jax/data/classification.py): the labelled set that the few-shot
    # methods train on and the `few_shot` evaluation scores, its K-shot sample and its base/new split of the classes.
    c.few_shot = ml_collections.ConfigDict()
    c.few_shot.dataset = "shapes"  # shapes | folder | table (CSV/JSONL of image, label) | tfds
    # The sets: folder and table, their paths; tfds, split names of few_shot.tfds_name; shapes, unused (its train,
    # val and test splits). val is where hyperparameters and checkpoints are chosen: never the test set.
    c.few_shot.train = ""
    c.few_shot.val = ""
    c.few_shot.test = ""
    c.few_shot.names_file = ""  # one class a line, `label` or `label<TAB>prompt name`: the classes and their order
    c.few_shot.tfds_name = ""
    c.few_shot.tfds_data_dir = ""
    c.few_shot.shots = 16  # training examples per class, drawn by few_shot.seed
    c.few_shot.seed = 1
    c.few_shot.classes = "base"  # the classes trained on: base (then tested on base and new) | all
    c.few_shot.class_split = "reference"  # reference: the first half of the classes is base | balanced: a random half
    c.few_shot.templates = ()  # zero-shot prompts ("{}": the class name); () = the dataset's (shapes: its six)
    c.few_shot.eval_examples = 1000  # at most, per val or test set (shapes: rendered)
    c.few_shot.shapes_pool = 4000  # shapes: the train scenes the shots are drawn from
    c.few_shot.shapes_domain = "shifted"  # shapes: the rendering domain of every set (clip_jax/data/shapes.py)

    # Settings shared by the evaluations.
    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # period of the entries that set none; 0: only at the end
    c.eval.batch_size = 250
    c.eval.num_examples = 1000  # examples per evaluation set, for the entries that set none
    # The evaluations: name -> {type, ...that type's fields} (clip_jax/evaluate/suite.py: shapes, shapes_long_text,
    # shapes_binding, long_text_set, zero_shot_folder, zero_shot_tfds, few_shot, shapes_audio, zero_shot_audio_folder,
    # shapes_segmentation, segmentation_folder, shapes_detection, coco_detection). Add one with
    # --config.evals.NAME="{'type': ..., ...}",
    # drop one with --config.evals.NAME=None.
    c.evals = ml_collections.ConfigDict({"shapes": eval_defaults("shapes")})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500
    c.checkpoint.max_to_keep = 3  # >= 1: the newest checkpoints kept (0 is refused: Orbax would keep none)
    c.checkpoint.keep_period = 0  # also keep every K-th step forever (0: off); step 0, a warm start, is always kept
    c.checkpoint.async_save = True

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10  # a train record (metrics.jsonl, TensorBoard, console) per this many steps, their means
    c.log.tensorboard = True  # also write the records as TensorBoard events under WORKDIR/tensorboard/
    c.log.progress_bar = True  # on a terminal; in a log file (not a terminal) each record is a line instead
    return c


def method_config(name: str, **fields: Any) -> ml_collections.ConfigDict:
    """`config.method` for the method `name`: its fields at their defaults, then `fields`."""
    group = ml_collections.ConfigDict(method_class(name).defaults())
    _check_against(group, fields, "method")
    group.update(fields)
    return group


# Keys of earlier versions and where they went: a config.json holding them is migrated (`_migrate`), an override
# naming them is answered with the new key.
_MOVED = {"loss": "method", "reset_logit_scale": "method.reset_logit_scale",
          "data.short_context_length": "method.short_context_length",
          "eval.long_text": "evals.shapes_long_text=\"{'type': 'shapes_long_text'}\"",
          "eval.long_text_set": "evals.long_set=\"{'type': 'long_text_set', 'path': ...}\"",
          "data.grayscale_shape_captions": "data.grayscale_shape_prob"}
# loss.name of earlier versions -> (method.name, fields)
_OLD_LOSSES = {"clip": ("clip", {}), "siglip": ("siglip", {"ring": False}), "siglip_ring": ("siglip", {"ring": True}),
               "longclip": ("longclip", {})}


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


# The top-level groups that `validate` checks against schemas of their own (the towers', the method's, each entry's).
_SEPARATELY_CHECKED = ("model", "method", "evals")


# open_clip's training flags (open_clip_train.main), where an open_clip user looks for them: said for an unknown key of
# that name (docs/open_clip.md has the whole table).
_OPEN_CLIP_FLAGS = {
    "lr": "optimizer.lr",
    "wd": "optimizer.weight_decay",
    "warmup": "optimizer.warmup_steps (steps)",
    "beta1": "optimizer.b1",
    "beta2": "optimizer.b2",
    "eps": "optimizer.eps",
    "grad_clip_norm": "optimizer.grad_clip_norm",
    "epochs": "total_steps (steps: epochs x rows / batch_size)",
    "precision": "model.dtype ('bfloat16' or 'float32')",
    "grad_checkpointing": "model.remat_policy (e.g. 'full')",
    "lock_image": "optimizer.frozen, e.g. ('^visual/',)",
    "lock_text": "optimizer.frozen, e.g. ('^text/',)",
    "accum_freq": "accum_steps (it splits batch_size, every device's batch together, into micro-batches)",
    "pretrained": "init_from, a workdir (clip-jax convert a PyTorch checkpoint into one)",
    "resume": "nothing to set: relaunching on the same --workdir resumes",
    "train_data": "data.path (data.source 'captions' for a table)",
    "csv_img_key": "data.image_field",
    "csv_caption_key": "data.caption_field",
    "csv_separator": "nothing to set: a .tsv file is read tab-separated, a .csv comma-separated",
    "zeroshot_frequency": "eval.every_steps (steps)",
    "save_frequency": "checkpoint.every_steps (steps)",
    "force_patch_dropout": "model.vision.patch_dropout",
    "report_to": "log.tensorboard (no wandb)",
    "local_loss": "nothing to set: the CLIP loss scores each device's rows against every column",
    "gather_with_grad": "nothing to set: the CLIP loss's gather carries gradients",
}


# Data formats other projects train from, by the name a user gives data.source: how they are read here.
_OTHER_SOURCES = {
    name: " (WebDataset .tar shards: clip-jax data convert --format webdataset SHARDS_FOLDER --out RECORDS, then "
          "data.source 'records' and data.path RECORDS)" for name in ("webdataset", "wds", "tar")
} | {name: " (a caption table, .csv/.tsv/.jsonl: data.source 'captions', data.path the file)"
     for name in ("csv", "tsv", "jsonl", "table")}


def _open_clip_flag(key: str) -> str:
    """Where open_clip's flag `key` (its last part, - or _) is here, for an unknown key of that name; "" if none."""
    where = _OPEN_CLIP_FLAGS.get(str(key).split(".")[-1].replace("-", "_"))
    return f" (open_clip's --{key.split('.')[-1].replace('_', '-')} is {where} here)" if where else ""


def _did_you_mean(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_against(schema: Any, value: Any, path: str) -> None:
    if isinstance(schema, ml_collections.ConfigDict) or isinstance(schema, dict):
        if not isinstance(value, ml_collections.ConfigDict | dict):
            raise ConfigError(f"config key '{path}' must be a group of fields, got {type(value).__name__}")
        for key in value:
            sub = f"{path}.{key}" if path else key
            if key not in schema:
                valid = sorted({*schema, *_SEPARATELY_CHECKED}) if not path else sorted(schema)
                hint = _open_clip_flag(key) or _did_you_mean(key, valid)
                raise ConfigError(f"unknown config key '{sub}'{hint}; valid keys here: {', '.join(valid)}")
            _check_against(schema[key], value[key], sub)
    elif value is None and schema is not None and path not in _NULLABLE:
        raise ConfigError(f"config key '{path}' must be {type(schema).__name__}, got None"
                          f"{_how_to_write(path, schema, value)}")
    elif not _type_ok(schema, value):
        raise ConfigError(f"config key '{path}' must be {type(schema).__name__}, got {type(value).__name__} "
                          f"{value!r}{_how_to_write(path, schema, value)}")


def _model_schema(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model's own schema: the dataclass fields of the chosen tower types (and of the optional towers set)."""
    reference = model_preset("tiny")
    schema = {k: v for k, v in reference.items() if k not in TOWERS}
    for modality, (registry, default) in TOWERS.items():
        if modality not in model and modality not in REQUIRED_TOWERS:
            continue
        kind = (model.get(modality) or {}).get("type", default)
        if kind not in registry:
            raise ConfigError(f"unknown model.{modality}.type {kind!r}; choose one of {sorted(registry)}")
        # A field's type comes from its dataclass default, else from the preset's vision tower (the fields without a
        # default: width, layers, heads, ... are ints in every tower).
        preset = reference.get(modality, reference["vision"])
        schema[modality] = {f.name: preset.get(f.name) if f.default is dataclasses.MISSING else f.default
                            for f in dataclasses.fields(registry[kind][0])}
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
    "model.text.context_length": 2, "model.embed_dim": 1, "few_shot.shots": 1, "few_shot.eval_examples": 1,
    "few_shot.shapes_pool": 1,
}


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _check_names(config: ml_collections.ConfigDict) -> None:
    """Names that pick an implementation from a registry, checked before any work rather than where they are used."""
    choices = {
        "data.source": TRAIN_SOURCES, "model.remat_policy": REMAT_POLICIES,
        "model.attention": ATTENTION_IMPLEMENTATIONS, "model.layer_norm": LAYER_NORM_IMPLEMENTATIONS,
        "model.vision.activation": ACTIVATIONS, "model.vision.pool": VISION_POOLS, "model.text.activation": ACTIVATIONS,
        "model.audio.activation": ACTIVATIONS, "model.dtype": COMPUTE_DTYPES,
        "few_shot.dataset": FEW_SHOT_DATASETS, "few_shot.classes": ("base", "all"),
        "few_shot.class_split": CLASS_SPLITS,
    }
    for key, registry in choices.items():
        value = config
        for part in key.split("."):
            value = value.get(part) if value is not None else None  # None where the key does not apply (a resnet
            # has no activation, a model without audio no audio tower)
        if value is not None and value not in registry:
            raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(sorted(registry))}"
                              + (_OTHER_SOURCES.get(str(value).lower(), "") if key == "data.source" else ""))
    for key in ("no_decay", "frozen"):
        for pattern in config.optimizer[key]:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"optimizer.{key} rule {pattern!r} is not a regular expression ({e})") from None
    if config.data.source == "shapes":
        try:  # the renderer's own checks (sizes, object counts), before any image is drawn
            shapes_config(config)
        except ValueError as e:
            raise ConfigError(f"data.source 'shapes': {e}") from None


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (one line naming the key) for unknown keys, wrong types and inconsistent values."""
    schema = default_config()
    del schema.model, schema.method, schema.evals
    top = {k: v for k, v in config.items() if k not in _SEPARATELY_CHECKED}
    _check_against(schema, top, "")
    try:
        _check_against(_model_schema(config.model), config.model, "model")
    except ConfigError as e:  # a tower's type switched alone (in a config file: an override of it is refused)
        tower = next((t for t in TOWERS if str(e).startswith(f"unknown config key 'model.{t}.")), None)
        if tower is None:
            raise
        kind = config.model[tower].get("type")
        raise ConfigError(f"{e}: a field of another type of tower than model.{tower}.type {kind!r}; a config file "
                          f"switches a tower by giving model.{tower} whole (configs/common.py's small_resnet, or "
                          "model_preset('RN50')['vision'])") from None
    if "method" not in config or "name" not in config.method:
        raise ConfigError("config is missing method.name")
    try:
        _check_against(method_class(config.method.name).defaults(), config.method, "method")
    except ConfigError as e:  # a method switched by its name alone: the fields of the one before are left
        key = str(e).removeprefix("unknown config key 'method.").partition("'")[0]
        owners = sorted(n for n, m in METHODS.items() if n != config.method.name and key in m.defaults())
        if not str(e).startswith("unknown config key 'method.") or not owners:
            raise
        named = " / ".join(owners[:3]) + (" / ..." if len(owners) > 3 else "")
        raise ConfigError(f"{e}: a field of method {named}, not of {config.method.name!r}; a config file "
                          f"switches methods with config.method = method_config({config.method.name!r}), which "
                          "gives it that method's fields") from None
    missing = [f"model.{k}" for k in REQUIRED_TOWERS if k not in config.model]
    if missing:
        raise ConfigError(f"config is missing {', '.join(missing)}")
    for key, low in _MINIMUM.items():
        value = config
        for part in key.split("."):
            value = value[part]
        if value < low:
            raise ConfigError(f"config key '{key}' must be >= {low}, got {value}")
    _check_names(config)
    probs = {k: config.data[k] for k in ("long_caption_prob", "partial_caption_prob", "grayscale_shape_prob",
                                         "shuffled_colour_prob", "colour_jitter_prob")}
    for key, p in probs.items():
        if not 0 <= p <= 1:
            raise ConfigError(f"data.{key} must be a probability in [0, 1], got {p}")
    if probs["long_caption_prob"] + probs["partial_caption_prob"] > 1:
        raise ConfigError(f"data.long_caption_prob + data.partial_caption_prob must be at most 1 (the rest are short "
                          f"captions), got {probs['long_caption_prob']} + {probs['partial_caption_prob']}")
    if config.model.attention == "cudnn" and config.model.dtype == "float32":
        raise ConfigError("model.attention 'cudnn' needs model.dtype bfloat16 or float16 (cuDNN's fused attention has "
                          "no float32), and an NVIDIA GPU; set model.dtype or use model.attention 'xla'")
    if config.batch_size % config.accum_steps:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by accum_steps {config.accum_steps}")
    towers = [("text", ("context_length", "vocab_size"))]
    if config.model.vision.type == "vit":
        towers.append(("vision", ("patch_size", "image_size")))
    elif problem := resnet_config_problem(config.model.vision.to_dict()):
        raise ConfigError(problem)
    if "audio" in config.model and (problem := audio_config_problem(config.model.audio.to_dict())):
        raise ConfigError(problem)
    for tower, sizes in towers:
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
    if v.type == "vit" and v.image_size % v.patch_size:
        raise ConfigError(f"model.vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
    drops = {field: v.get(field, 0.0) for field in IMAGE_DROPOUT_FIELDS}  # a ViT's fields
    for field, value in drops.items():
        if not 0 <= value < 1:
            raise ConfigError(f"model.vision.{field} must be in [0, 1) ({IMAGE_DROPOUT_FIELDS[field]}), got {value}")
    method = get_method(config)  # the method's own checks of its fields
    for field, value in drops.items():
        if value > 0 and not method.image_dropout:
            raise ConfigError(f"method {config.method.name!r} does not train with model.vision.{field}; set it to 0")
    if config.data.source == "segmentation_folder" and method.reads_data and method.captions().fields:
        raise ConfigError(f"data.source 'segmentation_folder' holds images and masks, no captions, and method "
                          f"{config.method.name!r} trains on captions; train it on captions (data.source captions or "
                          "records), or train method lseg on the masks")
    if config.data.negative_captions and not (
            method.reads_data and NEGATIVE_CAPTION in {f.caption for f in method.captions().fields.values()}):
        raise ConfigError(f"method {config.method.name!r} does not train on data.negative_captions (method negclip "
                          "does); set it to False")
    for name, entry in config.evals.items():
        if not isinstance(entry, ml_collections.ConfigDict | dict) or "type" not in entry:
            drop = (f"; to drop the entry in a config file, `del config.evals[{name!r}]` (None drops it as an "
                    "override only)") if entry is None else ""
            raise ConfigError(f"config key 'evals.{name}' must be a dict with a 'type' (clip_jax/evaluate/suite.py)"
                              f"{drop}")
        _check_against(eval_defaults(entry["type"]), entry, f"evals.{name}")
        parse_entry(name, dict(entry))
        _check_eval_entry(name, entry, eval_defaults(entry["type"]))
    for key in ("image_mean", "image_std"):
        if problem := normalisation_problem(key, config.model.get(key)):
            raise ConfigError(f"model.{key} {config.model.get(key)!r} {problem}, of pixels in [0, 1]")
    scale = config.data.crop_scale
    if len(scale) != 2 or not all(isinstance(x, int | float) for x in scale) or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must be (min, max) with 0 < min <= max <= 1, got {tuple(scale)}")
    jitter = config.data.colour_jitter
    if (len(jitter) != 4 or not all(isinstance(x, int | float) for x in jitter) or not all(0 <= x <= 1 for x in jitter)
            or jitter[3] > 0.5):
        raise ConfigError("data.colour_jitter must be (brightness, contrast, saturation, hue) with each in [0, 1] and "
                          f"hue at most 0.5 (half the colour circle), got {tuple(jitter)}")


# The keys of an evaluation entry that name a local file or folder: what it reads, and where it writes (overlays, COCO
# results).
_EVAL_PATH_KEYS = ("path", "names_file", "annotations", "image_root", "audio_root", "data_dir", "overlay_dir",
                   "results_file")


def absolute_paths(config: ml_collections.ConfigDict) -> None:
    """Makes the relative paths of `config` absolute against the current folder, in place, so that config.json names
    the same files whichever folder a later command runs from (eval, wise-ft, classify, a relaunch). Keywords
    (data.tokenizer "train" or "openai"), tfds split names and URIs stay; data.path's comma-separated shard list is
    resolved item by item."""
    fields = [(config, "init_from"), (config.data, "image_root"), (config.few_shot, "names_file"),
              (config.few_shot, "tfds_data_dir")]
    if config.data.tokenizer not in ("train", "openai"):
        fields.append((config.data, "tokenizer"))
    if config.few_shot.dataset in ("folder", "table"):  # for tfds they are split names
        fields += [(config.few_shot, key) for key in ("train", "val", "test")]
    fields += [(config.method, key) for key in ("annotations", "image_root") if key in config.method]
    fields += [(entry, key) for entry in config.evals.values() for key in _EVAL_PATH_KEYS if key in entry]
    for group, key in fields:
        if isinstance(group[key], str):
            group[key] = absolute_path(group[key])
    if isinstance(config.data.path, str) and config.data.path:
        items = config.data.path.split(",") if config.data.source == "records" else [config.data.path]
        config.data.path = ",".join(absolute_path(item.strip()) for item in items)


def check_input_paths(config: ml_collections.ConfigDict, *, training: bool = True,
                      workdir: str | os.PathLike | None = None) -> None:
    """Files a run reads, looked for before any work (not in `validate`: a workdir whose data has moved must still
    be evaluated, encoded and exported). A path that is a pattern or a list (records) is left to its source. The
    evaluations' outputs are checked with them (`check_sources`), `workdir` the run's."""
    paths = {f"evals.{name}.{key}": entry[key] for name, entry in config.evals.items()
             for key in ("path", "names_file", "annotations", "image_root", "audio_root") if key in entry}
    if training:
        for key in ("annotations", "image_root"):  # a detection method's COCO training file
            if config.method.get(key):
                paths[f"method.{key}"] = config.method[key]
        if config.data.source != "shapes" and not config.data.path:
            raise ConfigError(f"data.source {config.data.source!r} reads files: set --config.data.path (see the "
                              "schema's comment in clip_jax/config.py)")
        if config.data.source == "shapes" and config.data.path and get_method(config).reads_data:
            log.warning("data.path %s is not read: data.source is 'shapes', which generates its examples; to train on "
                        "the file, set --config.data.source (captions, records, ...)", config.data.path)
        if config.data.source in ("captions", "sharegpt4v", "segmentation_folder"):
            paths["data.path"] = config.data.path
        if config.data.source in ("captions", "sharegpt4v"):  # the images' folder: a wrong one drops every row
            paths["data.image_root"] = config.data.image_root
        if config.data.tokenizer not in ("train", "openai"):
            paths["data.tokenizer"] = config.data.tokenizer
    for key, path in paths.items():
        if path and not is_remote(path) and not pathlib.Path(path).exists():
            raise ConfigError(f"{key}: {path} does not exist")
        is_root = key.endswith(("image_root", "audio_root"))
        if is_root and path and not is_remote(path) and not pathlib.Path(path).is_dir():
            raise ConfigError(f"{key}: {path} is not a folder (the folder that the file paths are relative to)")
    check_sources(config, workdir)


def model_config(config: ml_collections.ConfigDict) -> CLIPConfig:
    return CLIPConfig.from_dict(config.model.to_dict())


# The checkout this package runs from (an editable install): its configs/ are the recipes.
PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]`, applies `a.b=value` overrides (Python literals; bare words are strings),
    and validates. Errors are ConfigError with one line naming the problem."""
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        recipe = PROJECT_ROOT / path
        # the recipes' paths in the docs are relative to the project, which a command from another folder misses
        hint = (f"; the project's recipe is {recipe}" if not file.is_absolute() and recipe.is_file()
                and not file.is_dir() else "")
        raise ConfigError(f"config file {path} not found" + (" (it is a folder)" if file.is_dir() else "") + hint)
    name = f"clip_jax_config_{file.stem}"
    package = file.resolve().parent
    parts = [file.stem]
    while (package / "__init__.py").is_file():  # a config in a package (configs/, configs/coop/)
        parts.insert(0, package.name)
        package = package.parent
    if len(parts) > 1:
        # It imports its siblings and the shared snippets as `configs.<module>`.
        root = str(package)
        if root not in sys.path:
            sys.path.insert(0, root)
        name = ".".join(parts)
    if (PROJECT_ROOT / "configs" / "__init__.py").is_file() and str(PROJECT_ROOT) not in sys.path:
        # A config file of the user's, anywhere (in a package of theirs too), may import the project's recipes
        # (`from configs.coop import shapes`), as the recipes' variants import a default: last on the path, after
        # the user's own packages.
        sys.path.append(str(PROJECT_ROOT))
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None:  # Python loads only .py files as modules
        raise ConfigError(f"config file {path} is not a Python file: --config takes a .py file defining get_config() "
                          "(configs/demo.py is one)")
    module = importlib.util.module_from_spec(module_spec)
    # A config file is the user's code: whatever it raises (a syntax error, a typo, an unknown preset in
    # get_config's argument, ConfigDict's type check) is a mistake in that file, reported as one line naming it.
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:  # (chained: --debug shows the frames of the user's code, helpers of theirs too)
        raise ConfigError(f"config file {path} failed to load: {_code_error(e, file)}") from e
    if not callable(getattr(module, "get_config", None)):
        raise ConfigError(f"config file {path} defines no get_config()")
    if arg and not _takes_an_argument(module.get_config):
        raise ConfigError(f"config file {path} has no variants ({':' + arg!r} given)")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"config file {path}: {call} failed: {_code_error(e, file)}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned {type(config).__name__}, not the ConfigDict of "
                          "default_config() (a missing `return config`?)")
    _complete_groups(config, default_config())
    apply_overrides(config, overrides)
    validate(config)
    return config


def _complete_groups(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
                     where: str = "") -> None:
    """Adds, in place, the default fields a config file's group lacks: a group written whole (`config.log =
    {"every_steps": 2}`, as configs/pretrain.py writes its mesh) had only the fields given, and the trainer's first
    read of another failed deep in a run ("unexpected error: KeyError 'max_to_keep'"). The mesh axes not given are 1
    beside a -1 (that axis takes every device), else their defaults. The model, the method and the evaluations are
    left as written: their fields depend on a tower type, a method or an entry (`validate` checks them)."""
    for key, default in defaults.items():
        given = config.get(key)
        if where == "" and key in ("model", "method", "evals"):
            continue
        if key not in config:
            if where:  # (a top-level field left out is validate's to name)
                config[key] = copy.deepcopy(default)
        elif isinstance(default, ml_collections.ConfigDict) and isinstance(given, ml_collections.ConfigDict):
            if key == "mesh" and not where and -1 in given.values():
                default = ml_collections.ConfigDict({axis: 1 for axis in default})
            _complete_groups(given, default, f"{where}{key}.")


def _check_eval_entry(name: str, entry: Any, defaults: dict) -> None:
    """What an evaluation cannot take, found when the config is read: it failed in the evaluation, after a training
    (a template without "{}": an unexpected error, no results.json, and config.json kept it); a negative count
    evaluated the examples but the last ones."""
    templates = entry.get("templates")
    if templates is not None:
        if not templates and defaults.get("templates"):  # (an entry whose default is () prompts as the run does)
            raise ConfigError(f"evals.{name}.templates is empty: give at least one, e.g. ('a photo of a {{}}.',)")
        check_templates(templates, f"evals.{name}.templates")
    if (n := entry.get("num_examples")) is not None and n < 0:
        raise ConfigError(f"evals.{name}.num_examples {n} is negative: give a count, or None for every example")
    if (every := entry.get("every_steps")) is not None and every < 0:  # (-3 evaluated every 3 steps: Python's %)
        raise ConfigError(f"evals.{name}.every_steps {every} is negative: give a period in steps, 0 for the end only, "
                          "or None for eval.every_steps")


def check_devices(config: ml_collections.ConfigDict, num_devices: int, fewer_devices: str = "") -> dict[str, int]:
    """The mesh's axis sizes over `num_devices` devices. Refuses (ConfigError) a `config.mesh` that does not fit
    them, a batch_size that the batch's shards (data x fsdp, times accum_steps) do not divide, and a part of it too
    small for the method (`Method.check_batch_shards`): the trainer's first check, and a launcher's before the job
    waits in a queue. `fewer_devices`: how the caller's user gives the job fewer devices, for the message."""
    try:
        sizes = dict(zip(MESH_AXES, mesh_shape(config.mesh.to_dict(), num_devices), strict=True))
    except ValueError as e:  # sizes that do not fit the devices: a configuration mistake, said in one line
        raise ConfigError(f"config.mesh: {e}") from None
    batch_shards = math.prod(sizes[axis] for axis in BATCH_AXES)
    if config.batch_size % (batch_shards * config.accum_steps):
        raise ConfigError(
            f"batch_size {config.batch_size} must be a multiple of {batch_shards * config.accum_steps} (batch shards "
            f"{batch_shards} x accum_steps {config.accum_steps}, on {num_devices} devices): give such a batch_size, "
            "fewer batch shards (--config.mesh.data, --config.mesh.fsdp), or fewer devices"
            + (f" ({fewer_devices})" if fewer_devices else "")
        )
    get_method(config).check_batch_shards(batch_shards)
    return sizes


def train_config(spec: str | None, overrides: list[str] | tuple[str, ...], workdir: epath.PathLike
                 ) -> ml_collections.ConfigDict | None:
    """The settings `clip-jax train` runs with: the recipe `spec` (`path.py[:arg]`) with the overrides, or without
    one the workdir's config.json (a resume, or the first run of a converted model) with them; None where neither
    is there."""
    if spec:
        return load_config(spec, overrides)
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        return None
    config = read_config(path)
    apply_overrides(config, overrides)
    validate(config)
    return config


def check_recipe(label: str, spec: str | None, overrides: list[str] | tuple[str, ...], base: pathlib.Path,
                 num_devices: int | None = None, workdir: str | None = None, fewer_devices: str = "") -> None:
    """For a launcher: exits (status 2, as the trainer and argparse) with `label: error: ...` where the trainer
    would refuse the settings (`train_config`: a recipe `path.py[:arg]`, a relative path taken from `base`, where
    the job starts, or without one the config.json of `workdir` where this machine sees it) and its overrides, or,
    given the job's `num_devices`, where its mesh or batch would not fit them (`check_devices`), so that a mistake
    is found before the job waits in a queue or starts on every host. Neither there: nothing (the job may see a
    workdir this machine does not). Of `overrides`, the `--config.` ones are read (a launcher passes the trainer's
    `--debug` along with them)."""
    overrides = [o for o in overrides if o.startswith("--config.")]
    if spec:
        path, _, arg = spec.partition(":")
        if not pathlib.Path(path).is_absolute():
            spec = str(base / path) + (f":{arg}" if arg else "")
    elif not workdir or is_remote(workdir):
        return
    elif not pathlib.Path(workdir).is_absolute():
        workdir = str(base / workdir)
    try:
        config = train_config(spec, overrides, workdir or "")
        if config is not None and num_devices is not None:
            check_devices(config, num_devices, fewer_devices)
    except ConfigError as e:
        print(f"{label}: error: {e}", file=sys.stderr)
        sys.exit(2)


def _takes_an_argument(get_config) -> bool:
    """Whether a config file's get_config takes the argument of `path.py:arg` (its variants)."""
    try:
        inspect.signature(get_config).bind("arg")
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): let the call say
        return True
    return True


# ConfigDict's own words for a value of another type set in a config file ("original type" is the new value's)
_CONFIGDICT_TYPE = re.compile(r"Could not override field '(.+)' \(reference\)\. (.*) is of original type "
                              r"<class '(\w+)'> and cannot be casted to type <class '(\w+)'>$", re.S)


def _code_error(error: Exception, file: pathlib.Path) -> str:
    """`ValueError: unknown preset 'B/99' (line 12)`: an exception raised by a config file, with the line of that
    file it was raised from; a value of another type than the field's is said as an override's is."""
    line = next((f.lineno for f in reversed(traceback.extract_tb(error.__traceback__))
                 if pathlib.Path(f.filename).resolve() == file.resolve()), None)
    if isinstance(error, TypeError) and (m := _CONFIGDICT_TYPE.match(str(error))):
        field, value, given, expected = m.groups()
        text = f"field '{field}' must be {expected}, got {given} {value!r}"
    else:
        text = f"{type(error).__name__}: {error}"
    return text + (f" (line {line})" if line else "")


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> None:
    """Sets `--config.a.b=VALUE` items in order, except `method.name`, which goes first: it sets the fields the
    other `method.*` items override."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.removeprefix("--").removeprefix("config.")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --config.{key}=VALUE")
        for old, new in _MOVED.items():
            if key == old or (key.startswith(old + ".") and old == "loss"):
                _moved_key(item, key, new + key[len(old):], text)
        parsed.append((item, key, text))
    given = [key for _, key, _ in parsed]
    for key in sorted({k for k in given if given.count(k) > 1}):  # a script that appends may mean it; said anyway
        values = [text for _, k, text in parsed if k == key]
        log.warning("--config.%s is given %d times (%s): the last, %s, is taken", key, len(values), ", ".join(values),
                    values[-1])
    for item, key, text in sorted(parsed, key=lambda p: p[1] != "method.name"):
        if key == "method.name":
            _switch_method(config, _parse_value(text), item)
            continue
        *parents, leaf = key.split(".")
        if parents == ["evals"]:
            _set_eval_entry(config, leaf, _parse_value(text), item)
            continue
        if (len(parents) == 2 and parents[0] == "model" and leaf == "type" and parents[1] in config.model
                and parents[1] in TOWERS and _parse_value(text) in TOWERS[parents[1]][0]
                and _parse_value(text) != config.model[parents[1]].get("type")):  # (fields left, then refused)
            raise ConfigError(f"override {item!r}: a tower's type is not switched by an override (a "
                              f"{config.model[parents[1]].get('type')}'s fields are not a {_parse_value(text)}'s): "
                              "give the recipe that tower in a config file of your own (docs/resnet.md, \"A recipe "
                              "on the other tower\")")
        if key == "evals":  # the whole table: {} for no evaluation, or {NAME: entry, ...}
            table = _parse_value(text)
            if not isinstance(table, dict):
                raise ConfigError(f"override {item!r}: 'evals' is a table of evaluations: give {{}} (none) or "
                                  "\"{'NAME': {'type': ...}, ...}\", or set one: --config.evals.NAME=...")
            with config.evals.unlocked():
                for name in list(config.evals):
                    del config.evals[name]
            for name, entry in table.items():
                _set_eval_entry(config, name, entry, item)
            continue
        node = config
        for i, part in enumerate(parents):
            if part not in node:
                raise ConfigError(f"unknown config key '{'.'.join(parents[: i + 1])}' in override "
                                  f"{item!r}{_open_clip_flag(part) or _did_you_mean(part, node)}")
            node = node[part]
        if leaf not in node:
            owners = sorted(n for n, m in METHODS.items() if parents == ["method"] and leaf in m.defaults())
            hint = (f" (a field of method {' / '.join(owners)}: also set --config.method.name="
                    f"{owners[0] if len(owners) == 1 else '...'})" if owners
                    else _open_clip_flag(leaf) or _did_you_mean(leaf, node))
            if not hint and len(node) <= 30:  # nothing close: the keys there, as an evals entry's error lists them
                hint = f"; valid keys here: {', '.join(sorted(node))}"
            raise ConfigError(f"unknown config key '{key}' in override {item!r}{hint}")
        value = _parse_value(text)
        if isinstance(node[leaf], ml_collections.ConfigDict) and isinstance(value, dict):  # a group, whole
            fields = " ".join(f"--config.{key}.{k}={v!r}" for k, v in value.items())
            raise ConfigError(f"override {item!r}: '{key}' is a group of settings, set one by one: {fields}")
        if not _type_ok(node[leaf], value):
            raise ConfigError(f"override {item!r}: '{key}' must be {type(node[leaf]).__name__}, got "
                              f"{type(value).__name__}{_how_to_write(key, node[leaf], value)}")
        with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
            node[leaf] = float(value) if isinstance(node[leaf], float) and not isinstance(value, bool) else value


def _how_to_write(key: str, expected: Any, value: Any) -> str:
    """How to write a value of `expected`'s type on the command line, where the one given was read as another:
    Python literals (True, not true), and a string that reads as a number quoted."""
    if isinstance(expected, bool):
        return f" (--config.{key}=True or --config.{key}=False)"
    if isinstance(expected, str) and not isinstance(value, str):  # 2024, 1e3, True: Python literals of another type
        return f" (to give it as a text, quote it: \"--config.{key}='{value}'\")"
    if isinstance(expected, tuple) and value is None:
        return f" (none: --config.{key}=())"
    if isinstance(expected, tuple) and isinstance(value, str):  # ('^visual/') is a string in parentheses
        return f" (a tuple of one needs its comma: \"--config.{key}=('{value}',)\")"
    return ""


def _moved_key(item: str, key: str, new: str, text: str) -> None:
    if key == "loss.name" and text in _OLD_LOSSES:
        name, fields = _OLD_LOSSES[text]
        new = " ".join([f"--config.method.name={name}", *(f"--config.method.{k}={v}" for k, v in fields.items())])
        raise ConfigError(f"override {item!r}: losses are now methods; use {new} (docs/methods.md)")
    if key == "data.grayscale_shape_captions":
        raise ConfigError(f"override {item!r}: '{key}' is now '{new}', a probability (True: 1.0, False: 0.0)")
    if "=" in new:
        raise ConfigError(f"override {item!r}: '{key}' is now an evaluation entry: --config.{new} (docs/methods.md)")
    raise ConfigError(f"override {item!r}: '{key}' is now '{new}' (the method's fields: docs/methods.md)")


def _set_eval_entry(config: ml_collections.ConfigDict, name: str, value: Any, item: str) -> None:
    """`--config.evals.NAME={'type': ..., ...}` adds (or replaces) an entry, its other fields at their defaults;
    `--config.evals.NAME=None` drops it."""
    with config.evals.unlocked():
        if value is None:
            # Said, not refused: a command that dropped an entry is re-run as it was to resume, where the run's
            # config.json has the entry no more.
            if name in config.evals:
                del config.evals[name]
            else:
                log.warning("override %r: no evaluation named %r to drop (the run has %s)", item, name,
                            ", ".join(config.evals) or "none")
            return
        if not isinstance(value, dict) or "type" not in value:
            raise ConfigError(f"override {item!r}: an evaluation is a dict with a 'type', e.g. "
                              f"--config.evals.{name}=\"{{'type': 'zero_shot_folder', 'path': 'DIR'}}\"")
        entry = eval_defaults(value["type"])
        _check_against(entry, value, f"evals.{name}")
        config.evals[name] = ml_collections.ConfigDict({**entry, **value})


def _switch_method(config: ml_collections.ConfigDict, name: Any, item: str) -> None:
    """config.method for the method `name`: its defaults, and the values set in the current group that differ from
    the current method's defaults, for the fields both methods have."""
    if not isinstance(name, str):
        raise ConfigError(f"override {item!r}: 'method.name' must be str, got {type(name).__name__}")
    old = config.method.to_dict()
    old_defaults = method_class(old["name"]).defaults() if old.get("name") in METHODS else {}
    group = method_class(name).defaults()
    for key, value in old.items():
        if key != "name" and key in group and value != old_defaults.get(key):
            group[key] = value
    config.method = ml_collections.ConfigDict(group)


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
        raise ConfigError(f"{path} is damaged ({e}); restore it from a copy, or move it aside (mv {path} "
                          f"{path}.damaged) and relaunch `clip-jax train` with the run's --config FILE and overrides, "
                          "which its checkpoint's shapes are checked against") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a clip_jax config (a JSON object of fields expected)")
    _migrate(data)
    _fill_defaults(data, default_config().to_dict())
    if isinstance(data.get("method"), dict) and data["method"].get("name") in METHODS:
        data["method"] = {**method_class(data["method"]["name"]).defaults(), **data["method"]}
    if isinstance(data.get("evals"), dict):
        for name, entry in data["evals"].items():
            if isinstance(entry, dict) and entry.get("type") in EVALUATORS:
                data["evals"][name] = {**eval_defaults(entry["type"]), **entry}
    config = ml_collections.ConfigDict(data)
    validate(config)
    return config


def _migrate(data: dict) -> None:
    """A config.json of earlier versions, in place: from before the method layer, `loss.*`, `reset_logit_scale` and
    `data.short_context_length` become the method's fields, `eval.long_text` and `eval.long_text_set` entries of
    `evals`; `data.grayscale_shape_captions` (a switch until 2026-12-05) becomes `data.grayscale_shape_prob` 1.0
    or 0.0; a ViT without `model.vision.pool` (2026-12-06) pooled its class token, "token"; a model without
    `model.image_mean` / `image_std` (2026-12-07) normalised its images with OpenAI's."""
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if model:
        model.setdefault("image_mean", list(CLIP_MEAN))
        model.setdefault("image_std", list(CLIP_STD))
    vision = model.get("vision")
    if isinstance(vision, dict) and vision.get("type") == "vit":
        vision.setdefault("pool", "token")
    data_group = data.get("data") if isinstance(data.get("data"), dict) else {}
    if "grayscale_shape_captions" in data_group:
        data_group["grayscale_shape_prob"] = 1.0 if data_group.pop("grayscale_shape_captions") else 0.0
    old_eval = data.get("eval") if isinstance(data.get("eval"), dict) else {}
    if "evals" not in data and ("long_text" in old_eval or "long_text_set" in old_eval):
        evals = {"shapes": eval_defaults("shapes")}
        if old_eval.pop("long_text", False):
            evals["shapes_long_text"] = eval_defaults("shapes_long_text")
        if path := old_eval.pop("long_text_set", ""):
            evals["long_set"] = {**eval_defaults("long_text_set"), "path": path}
        data["evals"] = evals
    loss = data.pop("loss", None)
    if not isinstance(loss, dict) or "method" in data:
        return
    name, fields = _OLD_LOSSES.get(loss.get("name"), (loss.get("name"), {}))
    group = {"name": name, **fields}
    known = method_class(name).defaults() if name in METHODS else {}
    for key, value in loss.items():
        if key in known and key != "name":
            group[key] = value
    short = data.get("data", {}).pop("short_context_length", None) if isinstance(data.get("data"), dict) else None
    if short is not None and "short_context_length" in known:
        group["short_context_length"] = short
    reset = data.pop("reset_logit_scale", None)
    if reset is not None:
        group["reset_logit_scale"] = reset
    data["method"] = group


def _fill_defaults(data: dict, schema: dict) -> None:
    """Adds, in place, the schema's fields that `data` lacks. The model and the method are left as written: their
    fields depend on the tower types and the method's name, and `evals` on its entries (read_config fills them)."""
    for key, default in schema.items():
        if key not in data:
            data[key] = default
        elif key not in ("model", "method", "evals") and isinstance(default, dict) and isinstance(data[key], dict):
            _fill_defaults(data[key], default)
