"""Evaluations of a model with an audio tower (AudioCLIP; `config.evals` entries, registered in suite.py).

- `shapes_audio`: zero-shot audio classification of shapes scenes' sounds against the class prompts, on held-out
  colour-shape pairs (never heard nor captioned in training: pitch and timbre only known apart) and on seen pairs,
  among all 48 pairs (`audio_zero_shot_top1`, `..._top1_seen`, top-5 too); and audio-image retrieval on test scenes,
  each sound against its own image (`a2i_r1`, `i2a_r1`, R@5, R@10). Sounds are rendered with a generator fixed by
  the example, with noise at an SNR drawn from the entry's `snr_db`.
- `zero_shot_audio_folder`: zero-shot top-1/5 on a labelled WAV folder in ESC-50's layout (`path`: the CSV, e.g.
  meta/esc50.csv; data/audio.py::read_audio_table), with the reference's prompt "{}" by default. Files that do not
  decode are skipped and counted (`<name>_skipped`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging

import ml_collections
import numpy as np

from clip_jax.data.audio import AudioError, read_audio_table, read_wav, scene_waveform
from clip_jax.data.classification import class_embeddings
from clip_jax.data.pipeline import get_source, shapes_held_out_split
from clip_jax.data.shapes import SPLITS, ZERO_SHOT_TEMPLATES, class_index
from clip_jax.evaluate import tell_skipped, trained_on_shapes
from clip_jax.evaluate.retrieval import retrieval_recall
from clip_jax.evaluate.zero_shot import accuracy_entries, zero_shot_accuracy, zero_shot_by_split
from clip_jax.models.audio import AudioConfig
from clip_jax.models.clip import CLIPConfig

log = logging.getLogger(__name__)


def audio_config(config: ml_collections.ConfigDict) -> AudioConfig:
    """The run's audio tower, its fields defaulted."""
    return CLIPConfig.from_dict(config.model.to_dict()).audio


def _has_audio(ctx, name: str) -> bool:
    if "audio" in ctx.config.model:
        return True
    tell_skipped(name, "the model has no audio tower (AudioCLIP's: docs/audioclip.md)")
    return False


@dataclasses.dataclass(frozen=True)
class ShapesAudioEval:
    every_steps: int | None = None
    num_examples: int | None = None  # None: eval.num_examples
    snr_db: tuple = (0.0, 30.0)


def shapes_sounds(config: ml_collections.ConfigDict, split: str, n: int, snr_db: tuple[float, float]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation sounds of the first n examples of a shapes split [n, samples] and their class labels [n]: each
    scene with noise drawn from a generator fixed by (seed, split, index), apart from the training sounds'."""
    a = audio_config(config)
    source = get_source(config, split)
    sounds, labels = [], []
    for index in range(n):
        scene = source.scene(index)
        rng = np.random.default_rng([config.seed, SPLITS.index(split), index, 7])
        sounds.append(scene_waveform(scene, rng, a.sample_rate, a.num_samples / a.sample_rate, tuple(snr_db)))
        labels.append(class_index(scene.salient.colour, scene.salient.shape))
    return np.stack(sounds), np.asarray(labels)


@functools.lru_cache(maxsize=8)
def _shapes_audio_data(config_json: str, split: str, n: int, snr_db: tuple[float, float]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """`shapes_sounds`, rendered once per process."""
    return shapes_sounds(ml_collections.ConfigDict(json.loads(config_json)), split, n, snr_db)


def run_shapes_audio(ctx, name: str, entry: ShapesAudioEval) -> dict[str, float]:
    if not _has_audio(ctx, name):
        return {}
    if not trained_on_shapes(ctx.config, name):
        return {}
    config, n, snr = ctx.config, ctx.num_examples(entry), tuple(entry.snr_db)
    key = config.to_json()
    classes = class_embeddings(ctx.texts, get_source(config, "test").class_names(), ZERO_SHOT_TEMPLATES)
    splits = {}
    for split, suffix in (shapes_held_out_split(config), ("test_seen", "_seen")):
        sounds, labels = _shapes_audio_data(key, split, n, snr)
        splits[suffix] = ctx.encoder.audio(sounds), labels
    results = zero_shot_by_split(splits, classes, "audio_zero_shot")
    sounds, _ = _shapes_audio_data(key, "test", n, snr)
    source = get_source(config, "test")
    images = np.stack([source[i]["image"] for i in range(n)])
    recall = retrieval_recall(ctx.encoder.audio(sounds), ctx.encoder.images(images))
    results.update({k.replace("i2t", "a2i").replace("t2i", "i2a"): float(v) for k, v in recall.items()})
    return results


@dataclasses.dataclass(frozen=True)
class ZeroShotAudioFolderEval:
    path: str = ""  # the CSV (columns filename, category[, target, fold]); files in audio_root
    # "": ESC-50's `audio/` beside the CSV's folder named `meta`, else `audio/` beside the CSV, else the CSV's folder
    audio_root: str = ""
    folds: tuple = ()  # keep these folds only (ESC-50: 1-5); () = every row
    templates: tuple = ("{}",)  # the reference's prompt: the class name alone
    every_steps: int | None = None


def run_zero_shot_audio_folder(ctx, name: str, entry: ZeroShotAudioFolderEval) -> dict[str, float]:
    if not _has_audio(ctx, name):
        return {}
    a = audio_config(ctx.config)
    table = read_audio_table(entry.path, entry.audio_root, tuple(entry.folds))
    sounds, labels, skipped = [], [], 0
    for path, label in zip(table.paths, table.labels, strict=True):
        try:
            sounds.append(read_wav(path, a.sample_rate, a.num_samples))
            labels.append(label)
        except AudioError as e:
            skipped += 1
            if skipped <= 10:
                log.warning("evals.%s: a file skipped: %s", name, e)
    if not sounds:  # an accuracy of nothing: no figure, and no silent success either
        raise AudioError(f"evals.{name}: none of the {len(table)} audio files of {entry.path} could be read (the "
                         "warnings above say why); convert them to WAV or fix the table")
    results = {f"{name}_skipped": skipped}
    # The classes the table names (a table's targets may skip indices: those have no name and no prompt).
    named = [i for i, class_name in enumerate(table.class_names) if class_name]
    index = {old: new for new, old in enumerate(named)}
    classes = class_embeddings(ctx.texts, [table.class_names[i] for i in named], tuple(entry.templates))
    labels = np.asarray([index[label] for label in labels])
    acc = zero_shot_accuracy(ctx.encoder.audio(np.stack(sounds)), labels, classes)
    results |= accuracy_entries(name, acc, len(classes))
    return results
