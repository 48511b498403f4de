"""`clip-jax` command line: a thin layer of flags over library calls.

  clip-jax train  --config configs/demo.py[:arg] --workdir DIR [--config.key=value ...]
  clip-jax eval   --workdir DIR [--config.eval.key=value ...]
  clip-jax encode --workdir DIR [--texts FILE] [--images DIR_OR_FILES ...] --out DIR
  clip-jax convert SRC --to-workdir DIR [--vocab PATH] [--activation quick_gelu|gelu] [--heads-vision N]
                   [--heads-text N] [--scan-layers]
  clip-jax export --workdir DIR --format {openai,hf,hf-text} --out PATH [--pt]
  clip-jax stretch --workdir DIR --out-workdir DIR [--keep K --ratio R | --method interpolate --length L]
  clip-jax data convert --format {webdataset,csv,tsv,jsonl,sharegpt4v,folder} INPUT... --out DIR [--image-root DIR]
                        [--workers N] [--shard-index I --num-shards N] [--shard-size N] [--min-size PX]
  clip-jax data inspect PATH [-n N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from clip_jax.config import ConfigError
from clip_jax.files import CheckpointWriteError


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
    from etils import epath

    from clip_jax.config import load_config, read_config
    from clip_jax.distributed import maybe_initialize
    from clip_jax.train.loop import train_and_evaluate

    maybe_initialize()
    workdir = epath.Path(args.workdir)  # pathlib would turn gs://bucket/run into gs:/bucket/run
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
    import jax
    from etils import epath

    from clip_jax.config import apply_overrides, validate
    from clip_jax.distributed import maybe_initialize
    from clip_jax.evaluate.suite import evaluate, print_results
    from clip_jax.train.loop import load_trained

    maybe_initialize()
    config, model, params, tokenizer, mesh, step = load_trained(args.workdir)
    apply_overrides(config, overrides)  # eval.* only (main checks): e.g. --config.eval.long_text_set=DIR
    validate(config)
    results = {"step": step, **evaluate(config, model, params, mesh, tokenizer)}  # every process has them all
    if jax.process_index() == 0:
        out = epath.Path(args.workdir) / f"eval_{step}.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print_results(results)
        print(f"wrote {out}")


def _encode(args: argparse.Namespace, overrides: list[str]) -> None:
    import jax
    import numpy as np
    from etils import epath

    from clip_jax.data.images import list_images, load_image
    from clip_jax.distributed import maybe_initialize
    from clip_jax.evaluate.encoder import Encoder
    from clip_jax.train.loop import load_trained

    if not args.texts and not args.images:
        raise ConfigError("encode needs --texts FILE and/or --images DIR_OR_FILES")
    maybe_initialize()
    config, model, params, tokenizer, mesh, _ = load_trained(args.workdir)
    encoder = Encoder(model, params, mesh, args.batch_size)
    # Every process embeds every input (the encoder's results are replicated); process 0 writes them.
    primary = jax.process_index() == 0
    out = epath.Path(args.out)

    def save(name: str, array: np.ndarray) -> None:
        with (out / name).open("wb") as f:  # through epath: --out may be a bucket
            np.save(f, array)

    if primary:
        out.mkdir(parents=True, exist_ok=True)
    if args.texts:
        texts = epath.Path(args.texts).read_text(encoding="utf-8").splitlines()
        tokens = tokenizer(texts, config.model.text.context_length)
        embeddings = encoder.texts(tokens)
        if primary:
            save("text_embeddings.npy", embeddings)
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
        embeddings = encoder.images(np.stack(images)) if images else None
        if primary:
            if embeddings is not None:
                save("image_embeddings.npy", embeddings)
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


def _stretch(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.longclip import stretch_workdir

    if args.method == "interpolate" and args.length is None:
        raise ConfigError("stretch --method interpolate needs --length L")
    out = stretch_workdir(args.workdir, args.out_workdir, method=args.method, keep=args.keep, ratio=args.ratio,
                          length=args.length)
    print(f"stretched {args.workdir} -> {args.out_workdir}: {out['context_length']} text positions, keep_positions "
          f"{out['keep_positions']}; fine-tune with clip-jax train --workdir {args.out_workdir} [--config ...]")


def _data(args: argparse.Namespace, overrides: list[str]) -> None:
    from clip_jax.data import convert, records

    if args.data_command == "inspect":
        print(json.dumps(records.describe(args.path, args.n), indent=2, ensure_ascii=False))
        return

    def progress(report: dict) -> None:
        if "error" in report:
            print(f"{report['shard']}: FAILED ({report['input']}): {report['error']}", file=sys.stderr, flush=True)
        elif report.get("resumed"):
            print(f"{report['shard']}: converted before, skipped", flush=True)
        else:
            skipped = ", ".join(f"{k} {v}" for k, v in report["skipped"].items()) or "none"
            print(f"{report['shard']}: {report['written']} of {report['samples']} samples written in "
                  f"{report['seconds']} s (skipped: {skipped})", flush=True)

    try:
        summary = convert.convert(
            args.format, args.inputs, args.out, image_root=args.image_root, workers=args.workers,
            shard_index=args.shard_index, num_shards=args.num_shards, shard_size=args.shard_size,
            min_size=args.min_size, prefix=args.prefix,
            fields=(args.image_field, args.caption_field, args.short_caption_field), progress=progress,
        )
    except ValueError as e:  # a bad argument or an input that cannot be read at all (bad samples never raise)
        raise ConfigError(str(e)) from None
    skipped = ", ".join(f"{k} {v}" for k, v in summary["skipped"].items()) or "none"
    print(f"{args.out}: {summary['shards_done']} of {summary['shards']} shards done, {summary['written']} of "
          f"{summary['samples']} samples written (skipped: {skipped}); report: "
          f"{args.out}/reports/{args.prefix}-summary.json")
    if summary["failed"]:
        print(f"clip-jax data convert: {len(summary['failed'])} shards failed; run the command again to retry them",
              file=sys.stderr)
        sys.exit(1)


COMMANDS = {"train": _train, "eval": _eval, "encode": _encode, "convert": _convert, "export": _export,
            "stretch": _stretch, "data": _data}


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
    st = sub.add_parser("stretch", help="Long-CLIP: a new workdir with the text positions stretched (a warm start)")
    st.add_argument("--workdir", required=True, help="source workdir (its latest checkpoint)")
    st.add_argument("--out-workdir", required=True, help="new workdir to write")
    st.add_argument("--method", choices=("keep", "interpolate"), default="keep",
                    help="keep: Long-CLIP's knowledge-preserving stretching (default); interpolate: the plain baseline")
    st.add_argument("--keep", type=int, default=20, help="keep: positions kept as they are (and frozen by Long-CLIP "
                    "configs); the new length is keep + ratio * (length - keep)")
    st.add_argument("--ratio", type=int, default=4, help="keep: stretch factor of the other positions")
    st.add_argument("--length", type=int, help="interpolate: the new number of positions")
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
    dc.add_argument("--prefix", default="train", help="shard names: PREFIX-00000-of-00016.arrayrecord")
    dc.add_argument("--image-field", default="image", help="csv/tsv/jsonl: the image path column")
    dc.add_argument("--caption-field", default="caption", help="csv/tsv/jsonl: the caption column")
    dc.add_argument("--short-caption-field", default="short_caption", help="csv/tsv/jsonl: optional short caption")
    di = data_sub.add_parser("inspect", help="shard and record counts and the first records of a shard set")
    di.add_argument("path", help="shard directory, glob or comma-separated list (as data.path)")
    di.add_argument("-n", type=int, default=3, help="records to show")
    return parser


def _orbax_without_traceback(record: logging.LogRecord) -> bool:
    """Orbax logs a failed background save with its traceback once per thread it passes through (five for a full
    disk); the error then reaches the training loop, which states it in one line. Its log lines stay, without the
    tracebacks (CLIP_JAX_DEBUG=1 keeps them)."""
    if f"{os.sep}orbax{os.sep}" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    if overrides and args.command != "train" and not (
        args.command == "eval" and all(o.startswith("--config.eval.") for o in overrides)
    ):
        parser.error("--config.key=value overrides apply to train (and --config.eval.* to eval) only")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    debug = bool(os.environ.get("CLIP_JAX_DEBUG"))
    if not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_orbax_without_traceback)
    try:
        COMMANDS[args.command](args, overrides)
    except (ConfigError, FileNotFoundError, FloatingPointError, CheckpointWriteError) as e:
        if debug:
            raise
        print(f"clip-jax {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
