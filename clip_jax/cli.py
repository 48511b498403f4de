"""`clip-jax` command line: a thin layer of flags over library calls.

  clip-jax train  --config configs/demo.py[:arg] --workdir DIR [--config.key=value ...]
  clip-jax eval   --workdir DIR [--config.eval.key=value ...] [--config.evals.NAME=... ...]
  clip-jax encode --workdir DIR [--texts FILE] [--images DIR_OR_FILES ...] [--audio DIR_OR_WAVS ...] --out DIR
                  [--max-image-bytes N]
  clip-jax classify --workdir DIR --images DIR_OR_FILES ... --out preds.csv [--classes all|base|new]
                    [--names FILE [--templates T ...]]
  clip-jax convert SRC --to-workdir DIR [--vocab PATH] [--activation quick_gelu|gelu] [--heads-vision N]
                   [--heads-text N] [--scan-layers] [--image-size N]
  clip-jax export --workdir DIR --format {openai,hf,hf-text} --out PATH [--pt] [--force]
  clip-jax stretch --workdir DIR --out-workdir DIR [--keep K --ratio R | --method interpolate --length L]
  clip-jax wise-ft --workdir DIR [--alphas 0,0.1,...,1] [--out FILE] [--split test|val] [--save-workdir NEW]
  clip-jax data convert --format {webdataset,csv,tsv,jsonl,sharegpt4v,folder} INPUT... --out DIR [--image-root DIR]
                        [--workers N] [--shard-index I --num-shards N] [--shard-size N] [--min-size PX]
                        [--max-image-bytes N] [--runner BEAM_RUNNER [-- PIPELINE_OPTIONS...]]
  clip-jax data inspect PATH [-n N]

Any command takes --debug (or CLIP_JAX_DEBUG=1): full tracebacks instead of the one-line errors.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import pathlib
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from clip_jax import errors
from clip_jax.config import ConfigError
from clip_jax.errors import BackgroundErrorsOnce, quoted
from clip_jax.files import (
    CheckpointWriteError,
    is_remote,
    refuse_inside_workdir,
    refuse_replacing,
    results_json,
    same_setting,
    visible_files,
    write_atomic,
)
from clip_jax.host_memory import keep_freed_memory


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
    from etils import epath

    from clip_jax.config import train_config
    from clip_jax.distributed import maybe_initialize
    from clip_jax.methods import get_method
    from clip_jax.train.loop import Terminated, checkpoint_steps, train_and_evaluate

    maybe_initialize()
    workdir = epath.Path(args.workdir)  # pathlib would turn gs://bucket/run into gs:/bucket/run
    config = train_config(args.config, overrides, workdir)  # without --config: the run's config.json (a resume)
    if config is None:
        raise ConfigError("train needs --config (or a --workdir that already holds config.json)")
    if (not args.config and config.data.source == "shapes" and checkpoint_steps(workdir) == [0]
            and get_method(config).reads_data):
        # A converted (or stretched) model's config.json has the schema's data settings, not the user's.
        print(f"warning: {workdir} holds a converted or stretched model, and its first run trains on the "
              "procedural shapes data (data.source's default); for your data, set --config.data.source and "
              "--config.data.path (docs/data.md)", file=sys.stderr)
    try:
        train_and_evaluate(config, workdir)
    except Terminated as stop:  # a preemption's status: 0, which the SLURM script requeues on
        print(f"clip-jax train: {stop}", file=sys.stderr, flush=True)
        _exit_at_once(0)


def _eval(args: argparse.Namespace, overrides: list[str]) -> None:
    import jax
    from etils import epath

    from clip_jax.config import absolute_paths, apply_overrides, check_input_paths, validate
    from clip_jax.distributed import maybe_initialize
    from clip_jax.evaluate.suite import evaluate, evaluation_settings, print_results
    from clip_jax.train.loop import load_trained

    def adjust(config) -> None:  # before the checkpoint is read: a mistake here is found without waiting for it
        apply_overrides(config, overrides)  # eval.* and evals.* only (main checks): e.g. an evaluation to add
        # As train stores them: the eval file's settings name the files read, so that the same relative path from
        # another folder (other files) is other settings, written beside, not over, the first one's figures.
        absolute_paths(config)
        validate(config)
        check_input_paths(config, training=False, workdir=args.workdir)
        if not config.evals:
            raise ConfigError("nothing to evaluate: config.evals is empty (the run's entries, less those set to None "
                              "here); add one, e.g. \"--config.evals.shapes={'type': 'shapes'}\" (docs/methods.md)")

    maybe_initialize()
    trained = load_trained(args.workdir, args.step, adjust)
    config, step = trained.config, trained.step
    settings = evaluation_settings(config)
    out = _eval_path(epath.Path(args.workdir), step, settings)
    primary = jax.process_index() == 0
    if primary and not is_remote(out) and not os.access(out.parent, os.W_OK):  # found now, not after the evaluation
        raise ConfigError(f"cannot write {out}: the workdir is not writable; make it writable, or copy the workdir "
                          "and evaluate the copy")
    # every process has them all
    results = {"step": step, **evaluate(config, trained.model, trained.params, trained.mesh, trained.tokenizer,
                                         method=trained.method)}
    if len(results) == 1:  # an eval file of a step alone would read as a result
        raise ConfigError(f"nothing evaluated: every entry of config.evals ({', '.join(config.evals)}) was skipped, "
                          "for the reasons above; nothing written")
    if primary:
        print_results(results)  # shown before the write, which may still fail (a full disk)
        write_atomic(out, results_json({**results, "settings": settings}))
        print(f"wrote {out}")


def _eval_path(workdir, step: int, settings: dict):
    """eval_<step>.json, unless it holds results of other settings (another eval.num_examples, other evals: it
    records them): then eval_<step>_<n>.json, the first free n, so no result is replaced by one of another kind."""
    out, n = workdir / f"eval_{step}.json", 1
    while out.exists():
        try:
            earlier = json.loads(out.read_text()).get("settings")
        except (ValueError, AttributeError):
            earlier = None
        if earlier is not None and same_setting(earlier, settings):  # (an earlier version's relative paths too)
            return out
        n += 1
        out = workdir / f"eval_{step}_{n}.json"
    return out


ENCODE_OUTPUTS = ("text_embeddings.npy", "image_embeddings.npy", "image_files.txt", "audio_embeddings.npy",
                  "audio_files.txt")


def _encode(args: argparse.Namespace, overrides: list[str]) -> None:
    import jax
    import numpy as np
    from etils import epath

    from clip_jax.distributed import maybe_initialize
    from clip_jax.evaluate.encoder import Encoder
    from clip_jax.train.loop import load_trained

    if not args.texts and not args.images and not args.audio:
        raise ConfigError("encode needs --texts FILE, --images DIR_OR_FILES and/or --audio DIR_OR_WAVS")
    _check_batch_size(args.batch_size)
    out = epath.Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the .npy files")
    refuse_inside_workdir(out, "--out")  # its files would mix with the run's (docs/your_data.md)
    _refuse_previous_output(out, ENCODE_OUTPUTS, "encode")  # new embeddings beside another model's would mix
    texts = _read_lines(args.texts) if args.texts else None  # a bad file is found before the model is loaded
    files = _listed_images(args.images) if args.images else None
    if args.audio:
        _check_audio_model(args.workdir)
    maybe_initialize()
    trained = load_trained(args.workdir, args.step)
    config, tokenizer = trained.config, trained.tokenizer
    if args.audio:  # read before anything is written
        sounds, sound_files, sounds_skipped = _read_sounds(args.audio, config)
    encoder = Encoder(trained.model, trained.params, trained.mesh, args.batch_size)
    # Everything is embedded before anything is written (no readable image is an error, not an empty output; a
    # model giving NaN stops with no file written): every process embeds every input (the encoder's results are
    # replicated), process 0 writes them.
    if files is not None:
        image_embeddings, kept, skipped = _per_image(encoder.images, files, config.model.vision.image_size,
                                                     args.max_image_bytes, encoder.batch_size)
    if args.audio:
        audio_embeddings = encoder.audio(np.stack(sounds))
    if texts is not None:
        context = config.model.text.context_length
        tokens, lengths = tokenizer.tokenize_with_lengths(texts, context)
        text_embeddings = encoder.texts(tokens)
    if jax.process_index() != 0:
        return
    outputs: dict[str, bytes] = {}  # file name -> content, all written or none
    said = []

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    if texts is not None:
        outputs["text_embeddings.npy"] = npy(text_embeddings)
        cut = int((lengths > context - 2).sum())
        said.append(f"encoded {len(texts)} texts -> {out / 'text_embeddings.npy'}" + (
            f" ({cut} cut to the model's {context} tokens)" if cut else ""))
    with_files = []  # (kind, what, embeddings, the files embedded in order, files skipped)
    if files is not None:
        with_files.append(("image", "images", image_embeddings, [str(files[i]) for i in kept], len(skipped)))
    if args.audio:
        with_files.append(("audio", "sounds", audio_embeddings, sound_files, sounds_skipped))
    for kind, what, embeddings, inputs, n_skipped in with_files:
        outputs[f"{kind}_embeddings.npy"] = npy(embeddings)
        outputs[f"{kind}_files.txt"] = "".join(f + "\n" for f in inputs).encode("utf-8")
        said.append(f"encoded {len(inputs)} {what} -> {out / f'{kind}_embeddings.npy'}" + (
            f" ({n_skipped} undecodable files skipped)" if n_skipped else ""))
    # Written whole or not at all (through epath: --out may be a bucket): a failure midway (a full disk) removes the
    # files of this run, and --out if it made it, so that the rerun is not refused as another encode's output.
    written: list = [] if out.exists() else [out]
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, content in outputs.items():
            write_atomic(out / name, content)
            written.append(out / name)
    except BaseException:
        _remove_written(written)
        raise
    print("\n".join(said))


def _remove_written(written: list) -> None:
    """What a command wrote before it failed, newest first: its files, then the folders it made (empty by then)."""
    for path in reversed(written):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()


def _image_chunks(files: list, size: int, max_bytes: int, batch_size: int, skipped: list[str],
                  pad: tuple[int, int, int] | None = None) -> Iterator[tuple[Any, list[int]]]:
    """(uint8 images [n, size, size, 3], the indices of their files) of every readable file of `files`, a chunk of
    whole batches at a time (data/images.py::image_chunks, about IMAGE_CHUNK images: a folder of any size fits in
    memory): centre crops, or the whole images letterboxed in `pad` (a detector's). A file that cannot be read is
    warned of as it is found and its message added to `skipped`; none readable is a ConfigError once all are
    tried."""
    import numpy as np

    from clip_jax.data.images import image_chunk_size, image_chunks
    from clip_jax.distributed import kept_by_all, refuse_different_inputs

    refuse_different_inputs("image files", [str(f) for f in files])
    found, chunk = False, image_chunk_size(batch_size)
    for start, (images, indices, messages) in zip(range(0, len(files), chunk),
                                                   image_chunks(files, size, max_bytes, chunk, pad), strict=True):
        # On several processes, only the files every process read: the hosts then embed the same batches.
        read = np.zeros(min(chunk, len(files) - start), bool)
        read[np.asarray(indices, int) - start] = True
        if not (everywhere := kept_by_all(read))[read].all():
            rows = everywhere[np.asarray(indices, int) - start]
            messages += [f"{files[i]}: skipped, as another process could not read it" for i, keep
                         in zip(indices, rows, strict=True) if not keep]
            images, indices = (images[rows] if rows.any() else None), [i for i, k in zip(indices, rows, strict=True)
                                                                      if k]
        for message in messages:
            print(f"warning: {message}", file=sys.stderr)
        skipped.extend(messages)
        if images is not None:
            found = True
            yield images, indices
    if not found:
        raise ConfigError(f"no readable image among the {len(files)} files of --images")


def _listed_images(paths: list[str]) -> list:
    """The image files of --images (`list_images`), or one line where there is none (it said "no readable image
    among the 0 files")."""
    from clip_jax.data.images import IMAGE_SUFFIXES, list_images

    files = list_images(paths)
    if not files:
        raise ConfigError(f"--images {' '.join(paths)}: no image files there ({', '.join(IMAGE_SUFFIXES)}, in "
                          "folders and their subfolders)")
    return files


def _per_image(fn: Callable[[Any], Any], files: list, size: int, max_bytes: int, batch_size: int
               ) -> tuple[Any, list[int], list[str]]:
    """`fn`'s rows ([n, ...] of uint8 images [n, size, size, 3]) of every readable file, read as `_image_chunks`
    does: (the rows, the indices of the files they came from, the messages of the files skipped)."""
    import numpy as np

    rows, kept, skipped = [], [], []
    for images, indices in _image_chunks(files, size, max_bytes, batch_size, skipped):
        rows.append(np.asarray(fn(images)))
        kept.extend(indices)
    return np.concatenate(rows), kept, skipped


def _check_audio_model(workdir: str) -> None:
    from etils import epath

    from clip_jax.config import read_config
    from clip_jax.evaluate.audio import audio_config

    path = epath.Path(workdir) / "config.json"
    if path.exists() and audio_config(read_config(path)) is None:
        raise ConfigError(f"--audio needs a model with an audio tower (an AudioCLIP run, configs/audioclip_shapes.py);"
                          f" the model of {workdir} has none")


# Audio formats a folder given to --audio may hold that are not read: named in a warning, with the conversion.
_OTHER_AUDIO_SUFFIXES = {".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".wma"}


def _read_sounds(paths: list[str], config) -> tuple[list, list[str], int]:
    """`encode --audio`'s inputs: (the sounds, their files, the number skipped) of WAV files (a folder: its *.wav and
    *.wave at any depth, sorted, hidden ones left out; its files of other audio formats named in a warning) for a
    model with an audio tower; a file that does not decode is skipped with a warning, and none readable is an error
    (it printed "encoded 0 sounds" and wrote no embeddings)."""
    from etils import epath

    from clip_jax.data.audio import AudioError, read_wav
    from clip_jax.evaluate.audio import audio_config

    audio = audio_config(config)
    files = []
    for path in map(epath.Path, paths):
        if path.is_dir():  # read as --images reads a folder: at any depth, hidden files left out
            found = sorted(visible_files(path))
            files.extend(p for p in found if p.suffix.lower() in (".wav", ".wave"))
            if other := sorted({p.suffix.lower() for p in found} & _OTHER_AUDIO_SUFFIXES):
                print(f"warning: --audio {path}: its {', '.join(other)} files are not read (WAV only; convert them, "
                      "e.g. with ffmpeg -i IN -ac 1 OUT.wav)", file=sys.stderr)
        elif path.exists():
            files.append(path)
        else:
            raise ConfigError(f"--audio: {path} does not exist")
    sounds, kept = [], []
    for file in files:
        try:
            sounds.append(read_wav(file, audio.sample_rate, audio.num_samples))
            kept.append(str(file))
        except AudioError as e:
            print(f"warning: a file skipped: {e}", file=sys.stderr)
    if not sounds:
        raise ConfigError(f"--audio: no readable WAV file among the {len(files)} files given (the warnings above say "
                          "why)" if files else "--audio: no WAV file (.wav, .wave) in the folders given")
    return sounds, kept, len(files) - len(kept)


def _classify(args: argparse.Namespace, overrides: list[str]) -> None:
    import csv

    import jax
    import numpy as np
    from etils import epath
    from scipy.special import softmax

    from clip_jax.data.classification import DEFAULT_TEMPLATES
    from clip_jax.distributed import maybe_initialize
    from clip_jax.evaluate.classify import (
        check_templates,
        class_scores,
        refuse_group_with_names,
        requested_classes,
        zero_shot_embeddings,
    )
    from clip_jax.evaluate.encoder import Encoder
    from clip_jax.train.loop import load_trained

    if args.names:  # before the checkpoint is read
        refuse_group_with_names(args.classes, "--classes", "--names")
    if args.templates:
        if not args.names:
            raise ConfigError("--templates prompt the class names of --names FILE (zero-shot); a few-shot run's own "
                              "classes are scored by its method: give --names, or drop --templates")
        check_templates(args.templates)
    _check_batch_size(args.batch_size)
    out = epath.Path(args.out)
    refuse_inside_workdir(out, "--out")
    # a bad file is found before the model is loaded; blank lines (a trailing one, a gap) name no class
    names = [n.strip() for n in _read_lines(args.names) if n.strip()] if args.names else None
    tabbed = next((n for n in names or () if "\t" in n), None)
    if tabbed is not None:  # a few-shot names file's `label<TAB>name`: the tab would be part of the prompt
        raise ConfigError(f"--names {args.names}: the line {tabbed!r} holds a tab; give one class name a line (the "
                          "name the prompts say and the output shows)")
    files = _listed_images(args.images)
    # (args.out as given: a trailing '/', a folder meant, is gone from the Path)
    refuse_replacing(args.out, _earlier_classify_csv, [*files, *([args.names] if args.names else [])])
    maybe_initialize()
    trained = load_trained(args.workdir, args.step)
    # refused before the images are read
    request = requested_classes(trained, args.classes, names, "--names", args.templates)
    encoder = Encoder(trained.model, trained.params, trained.mesh, args.batch_size)
    embeds = zero_shot_embeddings(trained, encoder, request) if request.few_shot is None else None
    logits, kept, skipped = _per_image(lambda images: class_scores(trained, encoder, images, request, embeds),
                                       files, trained.config.model.vision.image_size, args.max_image_bytes,
                                       encoder.batch_size)
    class_names = request.names
    probabilities = softmax(logits, axis=-1)
    best = np.argmax(logits, axis=-1)
    if jax.process_index() == 0:
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CLASSIFY_HEADER)
        for row, i in enumerate(kept):
            writer.writerow([str(files[i]), class_names[best[row]], f"{probabilities[row, best[row]]:.4f}"])
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, text.getvalue())
        prompts = ""
        if names is not None:
            templates = request.templates
            where = ("--templates" if args.templates else "the run's few_shot.templates"
                     if trained.config.few_shot.templates else "the shapes prompts of its evaluations"
                     if templates != DEFAULT_TEMPLATES else "the default")
            prompts = f" prompted by {where} ({', '.join(map(quoted, templates[:2]))}{', ...' * (len(templates) > 2)})"
        images = "1 image" if len(kept) == 1 else f"{len(kept)} images"
        print(f"classified {images} among {len(class_names)} classes{prompts} -> {out}" + (
            f" ({len(skipped)} undecodable files skipped)" if skipped else ""))


CLASSIFY_HEADER = ("image", "label", "probability")


def _earlier_classify_csv(path) -> bool:
    with path.open("rb") as f:
        return f.readline().decode("utf-8", "replace").strip() == ",".join(CLASSIFY_HEADER)


def _output_names(files: list) -> list[str]:
    """A PNG name per input image, no two alike, even to a disk that ignores case (a Mac's: A.png is a.png there):
    its stem where no other input has that stem; else its whole name, a.jpg.png beside a.png.png, numbered where that
    too is taken (x.png-2.png for x.png in a second folder). The stems' names are reserved before any other is
    chosen: a number added to one image's stem once gave another image's (a-1.png for a.jpg, beside a-1.png's own),
    and one mask overwrote the other."""
    import collections

    stems = collections.Counter(f.stem.casefold() for f in files)
    names = [f"{f.stem}.png" if stems[f.stem.casefold()] == 1 else "" for f in files]
    taken = {name.casefold() for name in names if name}
    for i, f in enumerate(files):
        if not names[i]:
            name, n = f"{f.name}.png", 1
            while name.casefold() in taken:
                n += 1
                name = f"{f.name}-{n}.png"
            taken.add(name.casefold())
            names[i] = name
    return names


def _refuse_out_in_images(out, images: list[str]) -> None:
    """An --out that is, or lies inside, a folder of --images: the folder is read with its subfolders, so the next
    run over it would take this one's masks, overlays or drawn boxes for inputs."""
    import pathlib

    if is_remote(out):
        return
    resolved = pathlib.Path(out).resolve()
    for folder in images:
        root = pathlib.Path(folder).resolve()
        if root.is_dir() and (resolved == root or root in resolved.parents):
            where = "is" if resolved == root else "lies inside"
            raise ConfigError(f"--out {out} {where} the --images folder {folder}, whose images (subfolders too) the "
                              "next run would read with these outputs among them: name a folder outside it")


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:  # else the encoder's ValueError, reported as an unexpected error
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")


def _split_queries(text: str) -> list[str]:
    """--queries as its help says: names separated by ". " (any white space after the '.'), final '.'s dropped. A
    '.' inside a name (3.5 inch) is part of it: splitting on every '.' made "3.5 inch circle" two queries."""
    import re

    text = text.strip().rstrip(".")
    return [q.strip() for q in re.split(r"\.+\s+", text) if q.strip()]  # ("a.. b": a doubled '.' is one separator)


def _refuse_previous_output(out, parts: tuple[str, ...], command: str) -> None:
    """An --out holding an earlier run's outputs: new files beside stale ones (of other images or labels) would be
    read as one result."""
    earlier = [part for part in parts if (out / part).exists()]
    if earlier:
        raise ConfigError(f"--out {out} holds an earlier {command}'s output ({', '.join(earlier)}): name a new folder, "
                          "or remove it first")


def _segment(args: argparse.Namespace, overrides: list[str]) -> None:
    import jax
    from etils import epath
    from PIL import Image

    from clip_jax.data.segmentation import BACKGROUND, mask_png
    from clip_jax.distributed import maybe_initialize
    from clip_jax.evaluate.encoder import Encoder
    from clip_jax.evaluate.segmentation import check_labels, label_request, overlay, predict_labels
    from clip_jax.train.loop import load_trained

    labels = [name.strip() for name in args.labels.split(",") if name.strip()]
    if any(". " in label for label in labels):  # detect's --queries take ". "; segment's --labels commas
        print(f"note: --labels separates names with commas: {', '.join(map(repr, labels))} "
              f"{'is one label' if len(labels) == 1 else 'are the labels'}", file=sys.stderr)
    check_labels(labels, args.threshold, args.templates)  # before the model is read
    _check_batch_size(args.batch_size)
    out = epath.Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the masks and overlays")
    refuse_inside_workdir(out, "--out")
    _refuse_out_in_images(out, args.images)
    _refuse_previous_output(out, ("masks", "overlays", "labels.txt", "images.txt"), "segment")
    files = _listed_images(args.images)
    maybe_initialize()
    trained = load_trained(args.workdir, args.step)
    config = trained.config
    encoder = Encoder(trained.model, trained.params, trained.mesh, args.batch_size)
    request = label_request(trained, lambda t: encoder.texts(trained.tokenizer(t, config.model.text.context_length)),
                            labels, args.background, args.threshold, args.templates)
    if trained.method.segment_background is None:
        print(f"note: {args.workdir} is a {config.method.name} run, not a segmenter: segment uses its CLIP's patch "
              "features (the training-free dense baseline of docs/segmentation.md)", file=sys.stderr)
    primary, names, kept, skipped = jax.process_index() == 0, _output_names(files), [], []
    # This run's files and folders (--out too, if it made it): removed if it stops midway, as a half output would
    # block the rerun.
    written: list = [] if out.exists() else [out]
    try:
        for images, indices in _image_chunks(files, config.model.vision.image_size, args.max_image_bytes,
                                             encoder.batch_size, skipped):
            masks = predict_labels(*encoder.segment(images, request.embeddings), request.threshold)
            kept.extend(indices)
            if not primary:
                continue
            for folder in ("masks", "overlays"):
                if not (out / folder).exists():
                    (out / folder).mkdir(parents=True)
                    written.append(out / folder)
            for image, mask, i in zip(images, masks, indices, strict=True):
                write_atomic(out / "masks" / names[i], mask_png(mask))
                written.append(out / "masks" / names[i])
                buffer = io.BytesIO()
                Image.fromarray(overlay(image, mask)).save(buffer, format="PNG")
                write_atomic(out / "overlays" / names[i], buffer.getvalue())
                written.append(out / "overlays" / names[i])
        if primary:
            written += [out / "labels.txt", out / "images.txt"]
            write_atomic(out / "labels.txt", "".join(f"{n}\n" for n in [BACKGROUND, *labels]))
            write_atomic(out / "images.txt", "".join(f"{names[i]}\t{files[i]}\n" for i in kept))
    except BaseException:
        _remove_written(written)
        raise
    if primary:
        print(f"segmented {len(kept)} images into {len(labels)} label{'s' if len(labels) > 1 else ''} and the "
              f"background ({request.background}), "
              f"with {request.templates_from} ({len(request.templates)}) -> "
              f"{out}/masks, {out}/overlays, {out}/labels.txt, {out}/images.txt" + (
                  f" ({len(skipped)} undecodable files skipped)" if skipped else ""))


def _detect(args: argparse.Namespace, overrides: list[str]) -> None:
    import jax
    from etils import epath
    from PIL import Image, ImageDraw

    from clip_jax.data.images import rgb_image
    from clip_jax.distributed import maybe_initialize
    from clip_jax.evaluate.detection import (
        detect,
        in_original_pixels,
        letterbox_extent,
        letterbox_fill,
        prepared_queries,
    )
    from clip_jax.evaluate.encoder import Encoder
    from clip_jax.train.loop import load_trained

    queries = _split_queries(args.queries)
    if any("," in q for q in queries):  # segment's --labels take commas; a detector's prompt takes ". "
        print(f'note: --queries separates names with ". ": {", ".join(map(repr, queries))} '
              f"{'is one query' if len(queries) == 1 else 'are the queries'}", file=sys.stderr)
    if not queries or len(set(queries)) != len(queries):
        raise ConfigError(f'--queries needs distinct names separated by ". ", e.g. "red circle. blue star", got '
                          f"{args.queries!r}")
    if not 0 <= args.min_score < 1:
        raise ConfigError(f"--min-score must be in [0, 1), got {args.min_score}")
    if args.max_detections < 1:  # 0 kept no box, silently
        raise ConfigError(f"--max-detections must be >= 1, got {args.max_detections}")
    _check_batch_size(args.batch_size)
    out = epath.Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for detections.json and the drawn boxes")
    refuse_inside_workdir(out, "--out")
    _refuse_out_in_images(out, args.images)
    _refuse_previous_output(out, ("boxes", "detections.json"), "detect")
    files = _listed_images(args.images)
    maybe_initialize()
    trained = load_trained(args.workdir, args.step)
    context, size = trained.config.model.text.context_length, trained.config.model.vision.image_size
    encoder = Encoder(trained.model, trained.params, trained.mesh, args.batch_size)
    prepared = prepared_queries(trained, lambda t: encoder.texts(trained.tokenizer(t, context)), queries)
    # The whole image, letterboxed as ViLD and GLIP see theirs (a centre crop searched only the middle square of a wide
    # image)
    found, kept, skipped = [], [], []
    for images, indices in _image_chunks(files, size, args.max_image_bytes, encoder.batch_size, skipped,
                                         letterbox_fill(trained.config)):
        extents = []  # each image's part of its square: a box in the padding is none
        for i in indices:
            with Image.open(files[i]) as header:
                extents.append(letterbox_extent(*header.size, size))
        found.extend(detect(encoder, prepared, images, extents, max_detections=args.max_detections,
                            min_score=args.min_score))
        kept.extend(indices)
    if jax.process_index() != 0:
        return
    (out / "boxes").mkdir(parents=True, exist_ok=True)
    report, total, names = [], 0, _output_names(files)
    for det, i in zip(found, kept, strict=True):
        with Image.open(files[i]) as original:
            original.load()
            picture = rgb_image(original)  # as the model saw it (16-bit pixels scaled, not saturated to white)
        boxes = in_original_pixels(det, queries, picture.width, picture.height, size)
        draw = ImageDraw.Draw(picture)
        for box in boxes:
            x0, y0, x1, y1 = box["box_xyxy"]
            draw.rectangle((x0, y0, x1, y1), outline=(255, 0, 0), width=max(1, picture.width // 200))
            draw.text((x0 + 2, y0 + 1), f"{box['label']} {box['score']:.2f}", fill=(255, 0, 0))
        total += len(boxes)
        report.append({"image": str(files[i]), "drawn": f"boxes/{names[i]}", "width": picture.width,
                       "height": picture.height, "detections": boxes})
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        write_atomic(out / "boxes" / names[i], buffer.getvalue())
    write_atomic(out / "detections.json", json.dumps(report, indent=1))
    print(f"{total} boxes of {len(queries)} queries in {len(kept)} images -> {out}/detections.json, {out}/boxes" + (
        f" ({len(skipped)} undecodable files skipped)" if skipped else ""))


def _read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark, as Windows editors write, dropped); one line naming the file
    and line where it is not UTF-8 or holds nothing."""
    from etils import epath

    from clip_jax.data.captions import text_lines

    data = epath.Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8"
                          ) from None
    lines = text_lines(text)  # (str.splitlines split a line at U+2028 and the like: row i was another line's)
    if not lines:
        raise ConfigError(f"{path} holds no text (one text per line expected)")
    return lines


def _three_numbers(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B (e.g. 0.5,0.5,0.5), got {text!r}")
    return values


def _convert(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.interop.workdir import convert_to_workdir

    summary = convert_to_workdir(
        args.src, args.to_workdir, vocab=args.vocab, activation=args.activation, heads_vision=args.heads_vision,
        heads_text=args.heads_text, scan_layers=args.scan_layers, image_size=args.image_size,
        image_mean=args.image_mean, image_std=args.image_std,
    )
    v, t = summary["model"]["vision"], summary["model"]["text"]
    if v["type"] == "resnet":
        image = f"resnet {'-'.join(map(str, v['layers']))} blocks width {v['width']}/{v['heads']}h"
    else:
        image = f"{v['width']}w/{v['layers']}L/{v['heads']}h patch {v['patch_size']} {v['activation']}"
    print(
        f"converted {args.src} ({summary['source']} layout) -> {args.to_workdir}: image {image} at "
        f"{v['image_size']}px, text {t['width']}w/{t['layers']}L/{t['heads']}h {t['context_length']} tokens "
        f"{t['activation']}, tokenizer {summary['tokenizer']}"
    )


def _export(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.config import read_config
    from clip_jax.interop.workdir import export_workdir
    from clip_jax.methods import method_class

    config_path = os.path.join(args.workdir, "config.json")
    method = method_class(read_config(config_path).method.name) if os.path.exists(config_path) else None
    if method is not None and not method.exports_image_tower and args.format != "hf-text":
        raise ConfigError(f"{args.workdir} is a {method.name} run: its image tower has no OpenAI or Hugging Face "
                          "layout; export its text tower alone (--format hf-text), or use the workdir itself "
                          "(clip-jax segment, encode, eval)")
    for path in export_workdir(args.workdir, args.format, args.out, pt=args.pt, force=args.force,
                               step=args.step):
        print(f"wrote {path}")
    # What the workdir holds beyond the exported towers, and what uses it there.
    beyond = method.export_leaves if method is not None else None
    if "audio" in read_config(config_path).model:  # export read it: it exists
        beyond = ("the audio tower has", "clip-jax encode --audio")
    if beyond:
        held = "the text tower" if args.format == "hf-text" else "the image and text towers"
        print(f"note: the export holds {held}; {beyond[0]} no OpenAI or Hugging Face layout and stays in the workdir "
              f"({beyond[1]})", file=sys.stderr)


def _stretch(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.config import read_config
    from clip_jax.interop.workdir import stretch_workdir

    out = stretch_workdir(args.workdir, args.out_workdir, method=args.method, keep=args.keep, ratio=args.ratio,
                          length=args.length)
    # from how many: a second stretch of a stretched model (248 -> 932) is otherwise easy to miss
    print(f"stretched {args.workdir} -> {args.out_workdir}: {out['source_context_length']} -> "
          f"{out['context_length']} text positions, keep_positions {out['keep_positions']}")
    data = read_config(os.path.join(args.workdir, "config.json")).data.to_dict()
    print(f"fine-tune it with {longclip_recipe(out['model'], args.out_workdir, data)}. Its config.json is "
          f"{args.workdir}'s with the new text context: without --config a run fine-tunes with {args.workdir}'s "
          "settings (its loss, data and frozen rules)")


# The Long-CLIP recipes' models (configs/longclip_*.py): the image tower's (width, layers, patch) and the text
# context they set (keep 20; 248 = 20 + 4 x (77 - 20)).
LONGCLIP_RECIPES = {(768, 12, 16): "configs/longclip_b16.py", (1024, 24, 14): "configs/longclip_l14.py"}
LONGCLIP_CONTEXT, LONGCLIP_KEEP = 248, 20


def longclip_recipe(model: dict, workdir: str, data: dict | None = None) -> str:
    """The `clip-jax train` command that fine-tunes a stretched `model` (its config dict) in `workdir`: the recipe
    of its size, with the overrides its stretch needs (another length, or an interpolated table: no kept
    positions, so nothing frozen); a model of no recipe's size (a `shapes` one) gets configs/longclip_shapes.py.
    `data`: the `data` group of the run it was stretched from, whose files (a caption table, records) the command
    names (the recipes' own data is ShareGPT4V, or shapes); else a placeholder for the user's captions."""
    text, vision = model["text"], model["vision"]
    interpolated = text.get("keep_positions", 0) == 0
    recipe = LONGCLIP_RECIPES.get((vision.get("width"), vision.get("layers"), vision.get("patch_size")))
    if recipe is None and not _shapes_recipe_size(model):  # a model of one's own (a converted one): its config.json
        return _longclip_command(model, workdir, data)
    flags, files = [], ["--config.data.path=..."]  # your captions
    if data and data.get("source", "shapes") != "shapes" and data.get("path"):  # the stretched run's own files
        files = [f"--config.data.source={data['source']}", shlex.quote(f"--config.data.path={data['path']}")]
        files += [shlex.quote(f"--config.data.image_root={data['image_root']}")] * bool(data.get("image_root"))
        files += ["--config.data.skip=0"] * (recipe is not None)  # the recipes' ShareGPT4V test rows
    elif recipe is None:
        files = []  # shapes' own
    if recipe is None:  # the shapes recipe: its interpolate phase is the plain baseline, nothing frozen
        recipe = "configs/longclip_shapes.py" + (":interpolate" if interpolated else "")
    elif interpolated:
        flags += ["--config.model.text.keep_positions=0", shlex.quote("--config.optimizer.frozen=()")]
    if not interpolated and text["keep_positions"] != LONGCLIP_KEEP:
        flags.append(f"--config.model.text.keep_positions={text['keep_positions']}")
    if text["context_length"] != LONGCLIP_CONTEXT:
        flags.append(f"--config.model.text.context_length={text['context_length']}")
    recipe_file, _, variant = recipe.partition(":")
    if (shipped := pathlib.Path(__file__).resolve().parents[1] / recipe_file).is_file() and \
            pathlib.Path(recipe_file).resolve() != shipped:  # run from another folder: a path that resolves
        recipe = str(shipped) + (f":{variant}" if variant else "")
    return " ".join(["clip-jax train --config", shlex.quote(recipe), "--workdir", shlex.quote(str(workdir)), *flags,
                     *files])


def _shapes_recipe_size(model: dict) -> bool:
    """Whether `model` has the size of configs/longclip_shapes.py's (the tiny model at 96 px, a vocabulary of
    1,024): that recipe restores it."""
    from clip_jax.config import PROJECT_ROOT, load_config

    def size(m: dict) -> tuple:
        return (m["embed_dim"], *(m["vision"].get(k) for k in ("type", "width", "layers", "patch_size", "image_size",
                                                                "heads")),
                *(m["text"].get(k) for k in ("width", "layers", "heads", "vocab_size")))

    return size(model) == size(load_config(str(PROJECT_ROOT / "configs" / "longclip_shapes.py")).model.to_dict())


def _longclip_command(model: dict, workdir: str, data: dict | None) -> str:
    """The fine-tune of a stretched model of no recipe's size: its own config.json (its model and tokenizer) with
    Long-CLIP's method, temperature and frozen kept table; the length of the run is the user's to give."""
    keep = model["text"].get("keep_positions", 0)
    flags = ["--config.method.name=longclip", f"--config.model.logit_scale_init={math.log(100)}",
             "--config.model.max_logit_scale=0", "--config.method.reset_logit_scale=True"]
    if keep:  # the kept first positions stay as stretched
        flags.append(shlex.quote("--config.optimizer.frozen=('^text/positional_embedding$',)"))
    if data and data.get("source", "shapes") == "shapes":  # shapes' long captions, all of them
        flags += ["--config.data.long_caption_prob=1.0", "--config.data.partial_caption_prob=0.0"]
    elif data and data.get("path"):  # the stretched run's own files
        flags += [f"--config.data.source={data['source']}", shlex.quote(f"--config.data.path={data['path']}")]
    else:
        flags += ["--config.data.source=captions", "--config.data.path=..."]  # your long captions
    return (" ".join(["clip-jax train --workdir", shlex.quote(str(workdir)), *flags])
            + " (with your run's --config.total_steps, --config.batch_size and --config.optimizer.lr)")


def _wise_ft(args: argparse.Namespace, overrides: list[str]) -> None:
    import jax

    from clip_jax.distributed import maybe_initialize
    from clip_jax.train.wise_ft import format_table, parse_alphas, run_sweep, sweep_out

    alphas = parse_alphas(args.alphas)  # found before the model is loaded
    maybe_initialize()
    out = sweep_out(args.workdir, args.out, args.split, args.save_workdir)
    results = run_sweep(args.workdir, alphas, out, args.split, args.save_workdir)
    if jax.process_index() == 0:
        print(format_table(results))
        if out is not None:
            print(f"wrote {out}")
        if args.save_workdir is not None:
            print(f"saved alpha {alphas[0]:g} -> {args.save_workdir} (a workdir: clip-jax classify / eval / export "
                  f"--workdir {args.save_workdir})")


def _data(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.data import convert, records
    from clip_jax.data.captions import MissingColumns

    if args.data_command == "inspect":
        if args.n < 0:
            raise ConfigError(f"-n must be >= 0 (records to show), got {args.n}")
        try:
            info = records.describe(args.path, args.n)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{e} (data inspect reads the shards that `clip-jax data convert --out DIR` writes: give "
                              "DIR, a glob of .arrayrecord files or a comma-separated list of them)") from None
        print(json.dumps(info, indent=2, ensure_ascii=False))
        return

    def progress(report: dict) -> None:
        print(convert.progress_line(report), file=sys.stderr if "error" in report else sys.stdout, flush=True)

    if args.runner:
        summary = _convert_on_beam(args)
    else:
        try:
            summary = convert.convert(
                args.format, args.inputs, args.out, image_root=args.image_root, workers=args.workers,
                shard_index=args.shard_index, num_shards=args.num_shards, shard_size=args.shard_size,
                min_size=args.min_size, max_image_bytes=args.max_image_bytes, prefix=args.prefix,
                fields=(args.image_field, args.caption_field, args.short_caption_field), progress=progress,
            )
        except MissingColumns as e:
            raise ConfigError(f"{e}; name them with --image-field and --caption-field") from None
        except ValueError as e:  # a bad argument or an input that cannot be read at all (bad samples never raise)
            raise ConfigError(str(e)) from None
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    print(f"{args.out}: {summary['shards_done']} of {summary['shards']} shards done, {summary['written']} of "
          f"{summary['samples']} samples written (skipped: {skipped}); report: "
          f"{args.out.rstrip('/')}/reports/{args.prefix}-summary.json")
    if summary.get("stale_count"):
        stale = ", ".join(summary["stale"][:3]) + (" ..." if summary["stale_count"] > 3 else "")
        print(f"clip-jax data convert: {summary['stale_count']} shards of {args.out} ({stale}) were converted from "
              "another version of their input, or with other options, than this command's: run the command again "
              "for their slices (their --shard-index) before training on the set", file=sys.stderr)
    if summary["failed"]:
        print(f"clip-jax data convert: {len(summary['failed'])} shards failed; run the command again to retry them",
              file=sys.stderr)
        sys.exit(1)
    if summary["this_run"]["written"] == 0:  # not a success, though no shard failed: say why
        raise ConfigError(_nothing_written(summary["this_run"], args.out))


def _convert_on_beam(args: argparse.Namespace) -> dict:
    """`data convert --runner R [-- PIPELINE_OPTIONS]`: the conversion as an Apache Beam pipeline; prints its
    counters and returns the summary."""
    local = [flag for flag, value, default in (("--workers", args.workers, 1), ("--shard-index", args.shard_index, 0),
                                               ("--num-shards", args.num_shards, 1)) if value != default]
    if local:
        raise ConfigError(f"{', '.join(local)} {'does' if len(local) == 1 else 'do'} not combine with --runner: Beam "
                          "spreads the shards over its own workers (size them with pipeline options after --, e.g. "
                          "--max_num_workers=32 on Dataflow)")
    from clip_jax.data import convert

    try:
        from clip_jax.data import beam_convert
    except ModuleNotFoundError as e:
        if e.name is None or e.name.partition(".")[0] != "apache_beam":
            raise
        raise ConfigError('--runner needs Apache Beam, which is not installed: install the [beam] extra '
                          '(pip install -e ".[beam]")') from None
    try:
        summary = beam_convert.convert(
            args.format, args.inputs, args.out, runner=args.runner, pipeline_options=args.pipeline_options,
            image_root=args.image_root, shard_size=args.shard_size, min_size=args.min_size,
            max_image_bytes=args.max_image_bytes, prefix=args.prefix,
            fields=(args.image_field, args.caption_field, args.short_caption_field),
        )
    except (ValueError, beam_convert.PipelineNotDone) as e:
        raise ConfigError(str(e)) from None
    counters = summary["counters"]
    work = ", ".join(f"{k} {v}" for k, v in counters.items() if not k.startswith(beam_convert.SKIPPED)) or "none"
    bad = ", ".join(f"{k.removeprefix(beam_convert.SKIPPED)} {v}" for k, v in counters.items()
                    if k.startswith(beam_convert.SKIPPED)) or "none"
    print(f"Beam counters of this run: {work}; bad samples by reason: {bad}")
    for failed in summary["failed"]:
        print(convert.progress_line(failed), file=sys.stderr)
    return summary


def _nothing_written(run: dict, out: str) -> str:
    """Why a `data convert` run wrote no sample: its inputs held none, or every one was skipped (the reasons)."""
    if not run["samples"]:
        return f"no sample written: the inputs of its {run['shards']} shards hold no samples"
    reasons = ", ".join(f"{reason} {n}" for reason, n in run["skipped"].items())
    first = next(iter(run["skipped"]))
    # every row without an image path or a caption: a JSONL's keys (a CSV's header is checked) under other names
    names = ("; do the rows name their image and caption as --image-field and --caption-field say?"
             if set(run["skipped"]) <= {"bad_row", "missing_caption"} else "")
    return (f"no sample written: all {run['samples']} samples were skipped ({reasons}; e.g. "
            f"{run['examples'][first]}){names}; see {out.rstrip('/')}/reports/ for more examples, fix the inputs (or "
            "--image-root) and run again")


def _byte_count(text: str) -> int:
    """argparse type of a positive number of bytes."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of bytes, not {text!r}")
    return int(text)


COMMANDS = {"train": _train, "eval": _eval, "encode": _encode, "classify": _classify, "segment": _segment,
            "detect": _detect, "convert": _convert, "export": _export, "stretch": _stretch, "wise-ft": _wise_ft,
            "data": _data}


class _GivenOnce(argparse.Action):
    """An option that may be given once: argparse takes the last of two silently, and a second --config (a recipe
    of another model) trained that one."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} is given twice ({getattr(namespace, self.dest)} and {values}): give it once")
        setattr(namespace, self.dest, values)


# --workdir of the commands that read a run's checkpoint
READ_WORKDIR_HELP = "a run's folder, trained or converted (its latest checkpoint, or --step's)"


def build_parser() -> argparse.ArgumentParser:
    from clip_jax.data.images import DEFAULT_MAX_IMAGE_BYTES

    debug = "--debug (anywhere; or CLIP_JAX_DEBUG=1): full tracebacks instead of the one-line errors"
    parser = argparse.ArgumentParser(prog="clip-jax", description="Train, evaluate and use CLIP models in JAX.",
                                     epilog=debug)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train (or resume) a model; overrides as --config.key=value",
        epilog="Any config field is set on the command line as --config.key=value (one argument, with '='), e.g. "
        "--config.batch_size=256 --config.model.vision.layers=6; clip_jax/config.py's default_config() is the "
        f"commented schema. Without --config, the workdir's own config.json (a resume). {debug}")
    train.add_argument("--config", action=_GivenOnce,
                       help="config file, e.g. configs/demo.py or configs/pretrain.py:B/16")
    train.add_argument("--workdir", required=True, action=_GivenOnce,
                       help="a new or empty folder, or a run's to resume it")
    ev = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir",
                        epilog=f"--config.eval.*=value and --config.evals.*=value override the run's evaluation "
                        f"settings and entries. {debug}")
    ev.add_argument("--workdir", required=True, help=READ_WORKDIR_HELP)
    enc = sub.add_parser("encode", help="write normalised text / image / audio embeddings as .npy")
    enc.add_argument("--workdir", required=True, help=READ_WORKDIR_HELP)
    enc.add_argument("--texts", help="text file, one text per line (a blank line is an empty text: row i of "
                     "text_embeddings.npy stays line i)")
    enc.add_argument("--images", nargs="+", help="image files or directories")
    enc.add_argument("--audio", nargs="+", help="WAV files or directories (a model with an audio tower)")
    enc.add_argument("--out", required=True, help="output directory")
    enc.add_argument("--batch-size", type=int, default=256)
    enc.add_argument("--max-image-bytes", type=_byte_count, default=DEFAULT_MAX_IMAGE_BYTES,
                     help="skip image files larger than this (default: %(default)s)")
    cls = sub.add_parser("classify", help="predict classes of images: a few-shot run's classes, or zero-shot --names")
    cls.add_argument("--workdir", required=True, help=READ_WORKDIR_HELP)
    cls.add_argument("--images", nargs="+", required=True, help="image files or directories")
    cls.add_argument("--out", required=True, help="CSV file to write: image, label, probability")
    cls.add_argument("--classes", choices=("all", "base", "new"), default="all",
                     help="a few-shot run's classes to choose among: all (default), base (trained on) or new")
    cls.add_argument("--names", help="class names file, one a line: zero-shot CLIP over these classes instead")
    cls.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                     help="with --names: the prompts of the names, \"{}\" the name, one an argument, e.g. "
                     "\"a photo of a {}.\" \"a {}.\" (their embeddings averaged; default: the run's "
                     "few_shot.templates, else the shapes prompts for a run on shapes, else \"a photo of a {}.\")")
    cls.add_argument("--batch-size", type=int, default=256)
    cls.add_argument("--max-image-bytes", type=_byte_count, default=DEFAULT_MAX_IMAGE_BYTES,
                     help="skip image files larger than this (default: %(default)s)")
    seg = sub.add_parser("segment", help="per-pixel labels of images, named in text (LSeg, GroupViT, any CLIP)")
    seg.add_argument("--workdir", required=True, help=READ_WORKDIR_HELP)
    seg.add_argument("--images", nargs="+", required=True, help="image files or directories")
    seg.add_argument("--labels", required=True, help='comma-separated label names, e.g. "red circle,blue star"')
    seg.add_argument("--out", required=True, help="a folder outside --images: masks/<image>.png (palette PNG, value = "
                     "line of labels.txt, 0 the background), overlays/<image>.png, labels.txt, images.txt (each "
                     "output name, a tab, its input file); <image> is the input's stem, or its whole name (a.jpg.png) "
                     "where two inputs share a stem")
    seg.add_argument("--templates", nargs="+", metavar="TEMPLATE",
                     help='the labels\' prompts, "{}" the label, one an argument, e.g. "a photo of a {}." "a {}." '
                     "(their embeddings averaged; default: the run's own, LSeg's method.templates or GroupViT's "
                     "method.prompt_templates, else the six shapes prompts)")
    seg.add_argument("--background", choices=("label", "threshold"),
                     help="the background: a label of its own (LSeg's default) or pixels below --threshold (others)")
    seg.add_argument("--threshold", type=float,
                     help="with --background threshold: the threshold on the best label's probability (default: 0.5; "
                     "choose it on a validation set: the shapes_segmentation evaluation prints the one it chose)")
    seg.add_argument("--batch-size", type=int, default=64)
    seg.add_argument("--max-image-bytes", type=_byte_count, default=DEFAULT_MAX_IMAGE_BYTES,
                     help="skip image files larger than this (default: %(default)s)")
    det = sub.add_parser("detect", help="boxes of objects named in text (a ViLD or GLIP run)")
    det.add_argument("--workdir", required=True, help=READ_WORKDIR_HELP)
    det.add_argument("--images", nargs="+", required=True, help="image files or directories")
    det.add_argument("--queries", required=True, help='names separated by ". ", e.g. "red circle. blue star" (a "." '
                     "followed by no space is part of a name: 3.5 inch); ViLD puts each in the run's method.templates, "
                     "GLIP joins them into its prompt, as each trained")
    det.add_argument("--out", required=True, help="a folder outside --images: detections.json (per image: its file, "
                     "its drawn file, boxes in its pixels, x0 y0 x1 y1) and boxes/<image>.png (drawn; named as "
                     "segment's masks)")
    det.add_argument("--min-score", type=float, default=0.3, help="keep boxes scoring at least this "
                     "(default: %(default)s)")
    det.add_argument("--max-detections", type=int, default=100, help="per image, >= 1 (default: %(default)s)")
    det.add_argument("--batch-size", type=int, default=64)
    det.add_argument("--max-image-bytes", type=_byte_count, default=DEFAULT_MAX_IMAGE_BYTES,
                     help="skip image files larger than this (default: %(default)s)")
    conv = sub.add_parser("convert", help="make a workdir from a PyTorch checkpoint (OpenAI, open_clip, Long-CLIP, HF)")
    conv.add_argument("src", help="state dict file (.safetensors/.pt/.bin) or open_clip / HF CLIPModel directory")
    conv.add_argument("--to-workdir", required=True,
                      help="the new workdir to write (a new or empty folder): train, eval, encode or export it")
    conv.add_argument("--vocab", help="BPE merges file (bpe_simple_vocab_16e6.txt.gz) or a tokenizer.json of ours")
    conv.add_argument("--activation", choices=("quick_gelu", "gelu"),
                      help="MLP activation (not stored in weights); default: source config, else quick_gelu")
    conv.add_argument("--heads-vision", type=int, help="attention heads; default: source config, else width // 64")
    conv.add_argument("--heads-text", type=int, help="attention heads; default: source config, else width // 64")
    conv.add_argument("--scan-layers", action="store_true", help="store blocks stacked (model.scan_layers=True)")
    conv.add_argument("--image-size", type=int, help="another image resolution: the image position table (a ViT's, "
                      "or a ResNet's attention pool's) is interpolated to its grid")
    for which in ("mean", "std"):
        conv.add_argument(f"--image-{which}", type=_three_numbers, metavar="R,G,B",
                          help=f"the RGB {which} the model's images were normalised with (pixels in [0, 1]); default: "
                          "source config (open_clip's preprocess_cfg, HF's preprocessor_config.json), else OpenAI's")
    exp = sub.add_parser("export", help="write a workdir's checkpoint as PyTorch files (open_clip or HF)")
    exp.add_argument("--workdir", required=True, help=READ_WORKDIR_HELP)
    exp.add_argument("--format", required=True, choices=("openai", "hf", "hf-text"))
    exp.add_argument("--out", required=True, help="file (.safetensors/.pt) or directory")
    exp.add_argument("--pt", action="store_true", help="torch.save pickle instead of .safetensors (needs torch)")
    exp.add_argument("--force", action="store_true", help="overwrite an existing --out: a file, or the files an "
                     "earlier export wrote in a folder (its clip_jax_export.json lists them; others are kept); a "
                     "clip_jax workdir is never written into")
    st = sub.add_parser("stretch", help="Long-CLIP: a new workdir with the text positions stretched (a warm start)")
    st.add_argument("--workdir", required=True, help="source workdir (its latest checkpoint)")
    st.add_argument("--out-workdir", required=True, help="new workdir to write")
    st.add_argument("--method", choices=("keep", "interpolate"), default="keep",
                    help="keep: Long-CLIP's knowledge-preserving stretching (default); interpolate: the plain baseline")
    st.add_argument("--keep", type=int, help="keep: positions kept as they are (and frozen by Long-CLIP configs), "
                    "default 20; the new length is keep + ratio * (length - keep)")
    st.add_argument("--ratio", type=int, help="keep: stretch factor of the other positions, default 4")
    st.add_argument("--length", type=int, help="interpolate: the new number of positions")
    wf = sub.add_parser("wise-ft", help="WiSE-FT: evaluate a wise_ft run interpolated with its zero-shot start")
    wf.add_argument("--workdir", required=True, help="a wise_ft run (its latest checkpoint is alpha 1)")
    wf.add_argument("--alphas", default=",".join(f"{i / 10:g}" for i in range(11)),
                    help="comma-separated weights of the fine-tuned model, in [0, 1] (default: %(default)s)")
    wf.add_argument("--out", help="JSON file {alpha: {metric: value}} (default: WORKDIR/wise_ft.json, with --split val "
                    "WORKDIR/wise_ft_val.json)")
    wf.add_argument("--split", choices=("test", "val"), default="test",
                    help="the few-shot set scored: val to choose alpha, test to report it (default: %(default)s)")
    wf.add_argument("--save-workdir", metavar="DIR",
                    help="save the model of the one alpha given as a new workdir DIR (then no sweep file is written "
                    "unless --out is given)")
    for command in ("eval", "encode", "classify", "segment", "detect", "export"):  # the readers of one checkpoint
        sub.choices[command].add_argument("--step", type=int, help="the checkpoint of this step (default: the "
                                          "latest; a workdir's steps are its checkpoints/ folders)")
    data = sub.add_parser("data", help="image-caption data sets: convert to ArrayRecord shards, inspect shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dc = data_sub.add_parser("convert", help="WebDataset tars, CSV/TSV/JSONL, ShareGPT4V JSON or an image folder -> "
                             "ArrayRecord shards for data.source=records (see docs/data.md)")
    dc.add_argument("inputs", nargs="+", metavar="INPUT", help="input files (globs and, for tars, folders expand)")
    dc.add_argument("--format", required=True, choices=("webdataset", "csv", "tsv", "jsonl", "sharegpt4v", "folder"))
    dc.add_argument("--out", required=True, help="output directory (local or gs://)")
    dc.add_argument("--image-root", help="folder image paths are relative to (default: each input file's folder)")
    dc.add_argument("--workers", type=int, default=1, help="shards converted in parallel processes")
    dc.add_argument("--shard-index", type=int, default=0, help="this machine's slice: shards i with i %% N == I")
    dc.add_argument("--num-shards", type=int, default=1, help="N machines converting slices of the same command")
    dc.add_argument("--shard-size", type=int, default=10_000, help="samples per output shard (tables and folders)")
    dc.add_argument("--min-size", type=int, default=32, help="skip images whose shorter side is below this (px)")
    dc.add_argument("--max-image-bytes", type=_byte_count, default=DEFAULT_MAX_IMAGE_BYTES,
                    help="skip image files larger than this (default: %(default)s)")
    dc.add_argument("--prefix", default="train", help="shard names: PREFIX-00000-of-00016.arrayrecord")
    dc.add_argument("--image-field", default="image", help="csv/tsv/jsonl: the image path column")
    dc.add_argument("--caption-field", default="caption", help="csv/tsv/jsonl: the caption column")
    dc.add_argument("--short-caption-field", help="csv/tsv/jsonl: the short caption column (default: short_caption, "
                    "where there is one)")
    dc.add_argument("--runner", help="convert as an Apache Beam pipeline on this runner (DirectRunner, DataflowRunner, "
                    "...; needs the [beam] extra); Beam pipeline options go after --, e.g. -- --project=P")
    di = data_sub.add_parser("inspect", help="shard and record counts and the first records of a shard set")
    di.add_argument("path", help="shard directory, glob or comma-separated list (as data.path)")
    di.add_argument("-n", type=int, default=3, help="records to show")
    return parser


def _without_traceback(record: logging.LogRecord) -> bool:
    """Libraries log a failure with its traceback, some once per thread it passes through (Orbax: five for a full
    disk; TensorStore's asyncio tasks for a damaged checkpoint); our own code then states the failure in one line.
    Their log lines stay, without the tracebacks (--debug keeps them)."""
    if not record.name.startswith("clip_jax"):
        record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def _exit_at_once(status: int) -> NoReturn:
    """Ends the process without the interpreter's teardown. Not sys.exit: a stop (Ctrl-C, SIGTERM) can land while XLA
    compiles (a jit's first call) in its own thread pool, and the teardown then frees the JAX client under that
    compilation: a segfault (exit 139) after the last line. What a command writes is written whole or already closed,
    so nothing is lost by skipping it."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_exit_timers: list[threading.Timer] = []  # the pending exits of _install_sigint: cancelled once main handles Ctrl-C


def _install_sigint(command: str):
    """Ctrl-C raises KeyboardInterrupt as usual, and with JAX loaded also ends the process 10 s later if main has
    not handled it by then: a KeyboardInterrupt that lands inside XLA's garbage-collection callback is swallowed
    (Python reports it as unraisable) and a training went on to its end. The training loop takes SIGINT over while it
    steps (it saves first). Returns the handler it replaced, or None off the main thread (none can be installed)."""

    def interrupt(signum, frame):
        if "jax" in sys.modules:
            def stop() -> None:
                print(f"clip-jax {command}: interrupted", file=sys.stderr, flush=True)
                os._exit(130)

            timer = threading.Timer(10.0, stop)
            timer.daemon = True
            _exit_timers.append(timer)
            timer.start()
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGINT, interrupt)
    except ValueError:
        return None


# Failures of the user's input or environment, whose message says what to do: one line, exit 2.
_USER_ERRORS = (ConfigError, FloatingPointError, CheckpointWriteError)


def _one_line(error: BaseException) -> str:
    """The message of an error, in one line. An OSError names the file it is about (FileNotFoundError's own message
    is ours already; a raw one from the system is `[Errno 2] No such file or directory: 'x'`)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
        text = f"{where}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


# What the collectives of a multi-process run raise when a peer is gone (gloo on CPUs, NCCL on GPUs, the
# coordination service everywhere): its connection closed, or a rendezvous timed out waiting for it.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "DEADLINE_EXCEEDED", "Gloo context",
              "NCCL", "coordination service", "Barrier timed out")


def _another_process_stopped(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process of a multi-process run stopped."""
    jax = sys.modules.get("jax")
    return (jax is not None and isinstance(error, jax.errors.JaxRuntimeError) and jax.process_count() > 1
            and any(marker in str(error) for marker in _PEER_GONE))


def _report_unexpected(command: str, error: BaseException) -> None:
    """An error we did not foresee: one line on the console and the traceback in a file, for a bug report."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="clip-jax-error-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"clip-jax {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(error, file=f)
    print(f"clip-jax {command}: unexpected error: {type(error).__name__}: {_one_line(error)[:500]} (the traceback is "
          f"in {path}; --debug prints it; please report it if the input looks right)", file=sys.stderr)


def _misspelt_option(parser: argparse.ArgumentParser, argv: list[str]
                     ) -> tuple[argparse.ArgumentParser, str] | None:
    """(the (sub)command's parser, "unrecognised argument --workdr: did you mean --workdir?") for an option close to
    one of the command's, or None. argparse alone says "the following arguments are required: --workdir", which
    hides the typo."""
    import difflib

    command = parser
    for word in argv:  # the (sub)command the options belong to: clip-jax data convert ...
        choices = next((a.choices for a in command._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        command = choices[word]
    known = [option for action in command._actions for option in action.option_strings if option.startswith("--")]
    for word in argv:
        name = word.split("=", 1)[0]
        if not name.startswith("--") or name.startswith("--config.") or any(k.startswith(name) for k in known):
            continue  # (argparse takes a unique prefix of an option)
        if close := difflib.get_close_matches(name, known, n=1, cutoff=0.75):
            return command, f"unrecognised argument {name}: did you mean {close[0]}?"
    return None


def _split_override(argv: list[str], first_unknown: str) -> str:
    """A hint for unrecognised words that are the rest of a `--config.X={...}` (or [...], (...)) value the shell cut
    at its spaces, having dropped its quotes: an override before them opens a bracket it does not close. Else ""."""
    # an example of each kind of value, its strings in double quotes (single quotes cannot nest)
    examples = {"{": '{"key": "..."}', "[": '["...", "..."]', "(": '("...", "...")'}
    for word in argv[:argv.index(first_unknown)]:
        name, equals, value = word.partition("=")
        unclosed = [o for o, c in ("{}", "[]", "()") if value.count(o) > value.count(c)]
        if name.startswith("--config.") and equals and unclosed:
            opening = min(unclosed, key=value.index)  # the outermost bracket the value opens
            return (f" (they look like the rest of {name}'s value, split by the shell at its spaces: quote the whole "
                    f"override in single quotes, with double quotes inside, e.g. '{name}={examples[opening]}')")
    return ""


def _log_info_to_stderr() -> None:
    """The commands' INFO lines (a run's mesh and devices, a restored checkpoint) on stderr in one format. Importing
    orbax has absl call logging.basicConfig at WARNING already, which made a basicConfig here a no-op and those lines
    were lost: its stderr handler takes the format instead. (Other handlers, e.g. pytest's, are left as they are.)"""
    root, form = logging.getLogger(), logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            handler.setFormatter(form)
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CLIP_JAX_DEBUG", "").lower() not in ("", "0", "false", "no")
    argv = [a for a in argv if a != "--debug"]
    # after `--`: Apache Beam's own flags, passed through as they are (data convert --runner)
    split = argv.index("--") if "--" in argv else len(argv)
    argv, pipeline_options = argv[:split], argv[split + 1:]
    parser = build_parser()
    if misspelt := _misspelt_option(parser, argv):  # before argparse's "required: --workdir" for a `--workdr`
        command, message = misspelt
        command.error(message)
    args, rest = parser.parse_known_args(argv)
    args.pipeline_options = pipeline_options
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    spaced = next((o for o in overrides if "=" not in o), None)
    if spaced:  # `--config.key value`: argparse leaves the value as an unknown argument
        parser.error(f"{spaced}: give its value after '=', as one argument: {spaced}=VALUE")
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}{_split_override(argv, unknown[0])}")
    if overrides and args.command != "train" and not (
        args.command == "eval"
        and all(o.startswith(("--config.eval.", "--config.evals.", "--config.evals=")) for o in overrides)
    ):
        parser.error("--config.key=value overrides apply to train (and --config.eval.*, --config.evals.* and "
                     "--config.evals= to eval) only")
    if pipeline_options and not getattr(args, "runner", None):
        parser.error("arguments after -- are Apache Beam pipeline options: only data convert --runner takes them")
    _log_info_to_stderr()
    for noisy in ("absl", "orbax", "jax._src", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # a NaN loss is told by the run itself (skipped=N, its record's nonfinite); not once per TensorBoard scalar
    logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
    errors.SHOW_BACKGROUND_ERRORS = debug
    if not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_without_traceback)
        sys.unraisablehook = BackgroundErrorsOnce("; --debug shows them")
    keep_freed_memory()  # before any command starts JAX (host_memory.py says why)
    # what messages call the command: with its subcommand (clip-jax data inspect: error: ...)
    label = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    previous_sigint = _install_sigint(label)
    try:
        COMMANDS[args.command](args, overrides)
    except KeyboardInterrupt:
        for timer in _exit_timers:  # handled: the clean-up on the way here (a lock released on a bucket) may be slow
            timer.cancel()
        if debug:
            raise
        print(f"clip-jax {label}: interrupted", file=sys.stderr)
        if "jax" in sys.modules:
            _exit_at_once(130)
        sys.exit(130)
    except (*_USER_ERRORS, OSError) as e:
        if debug:
            raise
        print(f"clip-jax {label}: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except ImportError as e:
        if debug:
            raise
        missing = getattr(e, "name", None) or ("gcsfs" if "gcsfs" in str(e) else None)
        if missing != "gcsfs":
            _report_unexpected(label, e)
            sys.exit(1)
        # etils' gs:// file system: an environment without the [gcs] extra
        print(f"clip-jax {label}: error: gs:// paths need gcsfs: pip install gcsfs (the [gcs] extra of clip_jax)",
              file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if debug:
            raise
        if _another_process_stopped(e):
            # not a bug of this process's: and JAX's shutdown would wait for the gone process, then abort in C++
            print(f"clip-jax {label}: error: a collective with the run's other processes failed "
                  f"({_one_line(e)[:200]}): another process of this run most likely stopped (its log says why: an "
                  "error, a crash, a kill); stop every process and launch them all again with one command (a "
                  "training resumes from its latest checkpoint)", file=sys.stderr)
            _exit_at_once(1)
        _report_unexpected(label, e)
        sys.exit(1)
    finally:
        if previous_sigint is not None:
            signal.signal(signal.SIGINT, previous_sigint)


if __name__ == "__main__":
    main()
