"""Where a `shapes` model's held-out zero-shot errors come from (docs/demo.md).

    python benchmarks/demo_probe.py --workdir workdirs/demo [--n 96]

Prints and saves (benchmarks/results/demo_probe_<workdir name>.json):
- per held-out class: correct / total on the `test_held_out` split (the run's zero_shot_top1 images) and the
  commonest wrong answers;
- top-1 with prompts naming only the shape ("a cross.") or only the colour, on the same images;
- for each held-out pair, single-object scenes rendered in colour and the same scenes in grayscale, read with the
  shape-only prompts: a pair that is right in grayscale and wrong in colour fails on how the image tower mixes
  colour and shape, not on shape recognition as such.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # result_files.py beside it
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file, count  # noqa: E402

from clip_jax.data.classification import class_embeddings, normalize  # noqa: E402
from clip_jax.data.pipeline import get_source  # noqa: E402
from clip_jax.data.shapes import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    TEXTURES,
    ZERO_SHOT_TEMPLATES,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
)  # fmt: skip
from clip_jax.evaluate.encoder import Encoder  # noqa: E402
from clip_jax.files import results_json
from clip_jax.train.loop import load_trained  # noqa: E402

SHAPE_TEMPLATES = ("a {}.", "a picture of a {}.", "the shape is a {}.")  # as the training's shape-only captions
COLOUR_TEMPLATES = ("a {} shape.", "a {} object.", "something {}.")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def grayscale(images: np.ndarray) -> np.ndarray:
    gray = images.astype(np.float32) @ LUMA
    return np.repeat(gray[..., None], 3, axis=-1).round().astype(np.uint8)


def single_object_scenes(colour: str, shape: str, n: int, rng: np.random.Generator) -> list[Scene]:
    """One large object of the pair, at a random cell, texture, outline, jitter and background."""
    return [
        Scene(str(rng.choice(BACKGROUNDS)), (ShapeObject(
            colour, shape, "large", int(rng.integers(len(POSITIONS))), str(rng.choice(TEXTURES)),
            bool(rng.integers(2)), (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))),
        ),))
        for _ in range(n)
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--n", type=count, default=96, help="single-object scenes per held-out pair")
    parser.add_argument("--out", default="", help="result JSON, or a folder for the default name (default "
                        "benchmarks/results/demo_probe_<name>.json; never over an earlier one: _2, _3...)")
    args = parser.parse_args()
    if not (pathlib.Path(args.workdir) / "config.json").is_file():
        parser.error(f"--workdir {args.workdir}: no trained run there (no config.json)")
    out = checked_out_file(args.out, pathlib.Path(__file__).parent / "results" /
                           f"demo_probe_{pathlib.Path(args.workdir).name}.json")

    trained = load_trained(args.workdir)
    config, model, params, tokenizer, mesh, step = (trained.config, trained.model, trained.params, trained.tokenizer,
                                                    trained.mesh, trained.step)
    encoder = Encoder(model, params, mesh, config.eval.batch_size)
    encode_texts = lambda texts: encoder.texts(tokenizer(list(texts), config.model.text.context_length))
    embed = lambda images: normalize(np.asarray(encoder.images(images)))
    source = get_source(config, "test_held_out")
    names = source.class_names()
    pairs = np.asarray(class_embeddings(encode_texts, names, ZERO_SHOT_TEMPLATES))
    shapes = np.asarray(class_embeddings(encode_texts, list(SHAPES), SHAPE_TEMPLATES))
    colours = np.asarray(class_embeddings(encode_texts, list(COLOURS), COLOUR_TEMPLATES))

    items = [source[i] for i in range(config.eval.num_examples)]
    images = embed(np.stack([it["image"] for it in items]))
    labels = np.asarray([it["label"] for it in items])
    predicted = (images @ pairs.T).argmax(-1)
    per_class = {}
    for label in sorted(set(labels.tolist())):
        mine = labels == label
        wrong = collections.Counter(names[p] for p in predicted[mine] if p != label)
        per_class[names[label]] = {"correct": int((predicted[mine] == label).sum()), "total": int(mine.sum()),
                                   "wrong_as": dict(wrong.most_common(3))}
    shape_only = float(((images @ shapes.T).argmax(-1) == labels % len(SHAPES)).mean())
    colour_only = float(((images @ colours.T).argmax(-1) == labels // len(SHAPES)).mean())

    rng = np.random.default_rng(0)
    dataset = ShapesDataset(ShapesConfig(image_size=config.model.vision.image_size, seed=config.seed), "test")
    colour_vs_gray = {}
    for label in sorted(set(labels.tolist())):
        colour, shape = names[label].split(" ")
        rendered = np.stack([dataset.render(s)["image"] for s in single_object_scenes(colour, shape, args.n, rng)])
        read = {}
        for kind, batch in (("colour", rendered), ("grayscale", grayscale(rendered))):
            answers = (embed(batch) @ shapes.T).argmax(-1)
            read[kind] = dict(collections.Counter(SHAPES[a] for a in answers).most_common(3))
        colour_vs_gray[names[label]] = read

    result = {
        "workdir": str(args.workdir), "step": step, "date": datetime.date.today().isoformat(),
        "machine": environment_facts(),
        "held_out_per_class": per_class, "shape_only_top1": shape_only, "colour_only_top1": colour_only,
        "single_objects_shape_prompts": colour_vs_gray, "n_single": args.n,
    }  # fmt: skip
    print(f"{args.workdir} (step {step}): held-out images read with shape-only prompts {shape_only:.3f}, "
          f"colour-only prompts {colour_only:.3f}")
    print(f"{'held-out pair':16s} {'right':>9s}  commonest wrong answers | shape read, colour -> grayscale")
    for name, row in per_class.items():
        read = colour_vs_gray[name]
        print(f"{name:16s} {row['correct']:>4d}/{row['total']:<4d}  {row['wrong_as']} | {read['colour']} -> "
              f"{read['grayscale']}")
    out.write_text(results_json(result))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
