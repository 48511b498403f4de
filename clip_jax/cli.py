"""`clip-jax` command line: a thin layer of flags over library calls.

  clip-jax train  --config configs/demo.py[:arg] --workdir DIR [--config.key=value ...]
  clip-jax eval   --workdir DIR
  clip-jax encode --workdir DIR [--texts FILE] [--images DIR_OR_FILES ...] --out DIR
  clip-jax convert SRC --to-workdir DIR [--vocab PATH] [--activation quick_gelu|gelu] [--heads-vision N]
                   [--heads-text N] [--scan-layers]
  clip-jax export --workdir DIR --format {openai,hf,hf-text} --out PATH [--pt]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys

from clip_jax.config import ConfigError


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.config import load_config, read_config
    from clip_jax.train.loop import train_and_evaluate

    workdir = pathlib.Path(args.workdir)
    if args.config:
        config = load_config(args.config, overrides)
    elif (workdir / "config.json").exists():  # resume a run with the config it was started with
        config = read_config(workdir / "config.json")
        from clip_jax.config import apply_overrides, validate

        apply_overrides(config, overrides)
        validate(config)
    else:
        raise ConfigError("train needs --config (or a --workdir that already holds config.json)")
    train_and_evaluate(config, workdir)


def _eval(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.evaluate.suite import evaluate, print_results
    from clip_jax.train.loop import load_trained

    config, model, params, tokenizer, mesh, step = load_trained(args.workdir)
    results = {"step": step, **evaluate(config, model, params, mesh, tokenizer)}
    out = pathlib.Path(args.workdir) / f"eval_{step}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_results(results)
    print(f"wrote {out}")


def _encode(args: argparse.Namespace, overrides: list[str]) -> None:
    import numpy as np

    from clip_jax.data.images import list_images, load_image
    from clip_jax.evaluate.encoder import Encoder
    from clip_jax.train.loop import load_trained

    if not args.texts and not args.images:
        raise ConfigError("encode needs --texts FILE and/or --images DIR_OR_FILES")
    config, model, params, tokenizer, mesh, _ = load_trained(args.workdir)
    encoder = Encoder(model, params, mesh, args.batch_size)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.texts:
        texts = pathlib.Path(args.texts).read_text(encoding="utf-8").splitlines()
        tokens = tokenizer(texts, config.model.text.context_length)
        np.save(out / "text_embeddings.npy", encoder.texts(tokens))
        print(f"encoded {len(texts)} texts -> {out / 'text_embeddings.npy'}")
    if args.images:
        files = list_images(args.images)
        size = config.model.vision.image_size
        images, kept, skipped = [], [], []
        for f in files:
            try:
                images.append(load_image(f, size))
                kept.append(str(f))
            except ValueError as e:  # a corrupt file is reported and skipped, never fatal
                skipped.append(str(f))
                print(f"warning: {e}", file=sys.stderr)
        if images:
            np.save(out / "image_embeddings.npy", encoder.images(np.stack(images)))
        (out / "image_files.txt").write_text("".join(f + "\n" for f in kept))
        print(f"encoded {len(kept)} images -> {out / 'image_embeddings.npy'}" + (
            f" ({len(skipped)} undecodable files skipped)" if skipped else ""))


def _convert(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.interop.workdir import convert_to_workdir

    summary = convert_to_workdir(
        args.src, args.to_workdir, vocab=args.vocab, activation=args.activation, heads_vision=args.heads_vision,
        heads_text=args.heads_text, scan_layers=args.scan_layers,
    )
    v, t = summary["model"]["vision"], summary["model"]["text"]
    print(
        f"converted {args.src} ({summary['source']} layout) -> {args.to_workdir}: image {v['width']}w/{v['layers']}L/"
        f"{v['heads']}h patch {v['patch_size']} at {v['image_size']}px, text {t['width']}w/{t['layers']}L/"
        f"{t['heads']}h {t['context_length']} tokens, activation {v['activation']}/{t['activation']}, "
        f"tokenizer {summary['tokenizer']}"
    )


def _export(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.interop.workdir import export_workdir

    for path in export_workdir(args.workdir, args.format, args.out, pt=args.pt):
        print(f"wrote {path}")


COMMANDS = {"train": _train, "eval": _eval, "encode": _encode, "convert": _convert, "export": _export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-jax", description="Train, evaluate and use CLIP models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) a model; overrides as --config.key=value")
    train.add_argument("--config", help="config file, e.g. configs/demo.py or configs/pretrain.py:B/16")
    train.add_argument("--workdir", required=True)
    ev = sub.add_parser("eval", help="evaluate the latest checkpoint of a workdir")
    ev.add_argument("--workdir", required=True)
    enc = sub.add_parser("encode", help="write normalised text / image embeddings as .npy")
    enc.add_argument("--workdir", required=True)
    enc.add_argument("--texts", help="text file, one text per line")
    enc.add_argument("--images", nargs="+", help="image files or directories")
    enc.add_argument("--out", required=True, help="output directory")
    enc.add_argument("--batch-size", type=int, default=256)
    conv = sub.add_parser("convert", help="make a workdir from a PyTorch checkpoint (OpenAI, open_clip, Long-CLIP, HF)")
    conv.add_argument("src", help="state dict file (.safetensors/.pt/.bin) or open_clip / HF CLIPModel directory")
    conv.add_argument("--to-workdir", required=True)
    conv.add_argument("--vocab", help="BPE merges file (bpe_simple_vocab_16e6.txt.gz) or a tokenizer.json of ours")
    conv.add_argument("--activation", choices=("quick_gelu", "gelu"),
                      help="MLP activation (not stored in weights); default: source config, else quick_gelu")
    conv.add_argument("--heads-vision", type=int, help="attention heads; default: source config, else width // 64")
    conv.add_argument("--heads-text", type=int, help="attention heads; default: source config, else width // 64")
    conv.add_argument("--scan-layers", action="store_true", help="store blocks stacked (model.scan_layers=True)")
    exp = sub.add_parser("export", help="write a workdir's checkpoint as PyTorch files (open_clip or HF)")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--format", required=True, choices=("openai", "hf", "hf-text"))
    exp.add_argument("--out", required=True, help="file (.safetensors/.pt) or directory")
    exp.add_argument("--pt", action="store_true", help="torch.save pickle instead of .safetensors (needs torch)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if overrides and args.command != "train":
        parser.error("--config.key=value overrides apply to train only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        COMMANDS[args.command](args, overrides)
    except (ConfigError, FileNotFoundError, FloatingPointError) as e:
        if os.environ.get("CLIP_JAX_DEBUG"):
            raise
        print(f"clip-jax {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
