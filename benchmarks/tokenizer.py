"""Captions/s of ClipTokenizer vs open_clip's tokenizer on generated captions.

    python benchmarks/tokenizer.py --n 20000 --context-length 77

Captions are generated (no data set needed): 4-20 words, Zipf-like over common words and a long tail of
made-up ones, with a share of non-ASCII text (accents, CJK, emoji, mojibake) and of '&' / HTML entities, the
inputs that cannot skip ftfy. Both tokenizers cache per word/chunk across calls, so each is timed "cold" (a
fresh instance's first pass) and "warm" (best later pass, as deep into a training run), on the same batches.
Writes benchmarks/results/tokenizer_<host>.json.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import pathlib
import platform
import random
import re
import socket
import sys
import time
import types
from functools import partial

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from clip_jax.data.tokenizer import ClipTokenizer, clean_text  # noqa: E402

COMMON = (
    "a an the of in on with and at to for by from is are two three white black red blue green small large old young "
    "man woman people child dog cat bird horse car bus train boat bicycle pizza cake table chair tree house street "
    "beach park kitchen field river mountain city forest market station office garden sitting standing running "
    "walking holding eating looking playing lying parked flying riding photo image view close-up sunset night day"
).split()
SYLLABLES = "ka lo mi ra te su ne vi do pa ri en an or is ul st tr ch sh ph th ber man ton ville ing er ly".split()
NON_ASCII = [
    "café", "Zürich", "naïve", "São Paulo", "東京", "北京の夜景", "Москва", "Αθήνα", "😂", "🐶", "👍🏽", "❤️",
    "donâ€™t", "CafÃ©", "—", "“quoted”", "résumé", "½", "İstanbul", "서울", "it’s", "•", "™",
]  # fmt: skip
AMPERSAND = ["&amp;", "&", "&quot;", "R&B", "&#39;"]


def make_captions(n: int, non_ascii: float, ampersand: float, seed: int = 0) -> list[str]:
    """Captions of 4-20 words drawn Zipf-like from common words then 40k made-up ones (names, rare words),
    so that, as in real alt-text, the number of distinct words keeps growing with the corpus."""
    rng = random.Random(seed)
    tail = {"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(40000)}
    vocab = COMMON + sorted(tail - set(COMMON))
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** 1.05 for rank in range(len(vocab))))
    out = []
    for _ in range(n):
        words = rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(4, 20))
        for i in range(len(words)):
            r = rng.random()
            words[i] = (
                words[i].title() if r < 0.08 else f"{words[i]}," if r < 0.12 else str(rng.randint(1, 2024))
                if r < 0.14 else words[i]
            )  # fmt: skip
        if rng.random() < non_ascii:
            words.insert(rng.randrange(len(words)), rng.choice(NON_ASCII))
        if rng.random() < ampersand:
            words.insert(rng.randrange(len(words)), rng.choice(AMPERSAND))
        text = " ".join(words)
        out.append(text[0].upper() + text[1:] + rng.choice(["", ".", ".", "!", " #travel", " (2019)"]))
    return out


def one_pass(fn, batches: list[list[str]]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds, all threads) for fn over all batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        fn(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def rates(contenders: dict, captions: list[str], batch_size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Captions/s by wall clock and by CPU time. repeats=0: one pass ("cold"); else the best of `repeats`
    passes after a first one that fills the caches, contenders interleaved so that they share any noise."""
    batches = [captions[i : i + batch_size] for i in range(0, len(captions), batch_size)]
    best = {name: [float("inf"), float("inf")] for name in contenders}
    for r in range(repeats + 1):
        for name, fn in contenders.items():
            if r == 0 and repeats:
                fn(captions)  # warm-up pass
                continue
            wall, cpu = one_pass(fn, batches)
            best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
    return {name: {"wall": len(captions) / w, "cpu": len(captions) / c} for name, (w, c) in best.items()}


def map_list(fn, batch: list[str]) -> list:
    return [fn(x) for x in batch]


def cpu_model() -> str:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
    except (OSError, AttributeError):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="captions per corpus")
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--batch-size", type=int, default=1024, help="captions per tokenizer call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--non-ascii", type=float, default=0.1, help="share of captions with non-ASCII text")
    parser.add_argument("--ampersand", type=float, default=0.03, help="share of captions with '&'")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()

    vocab = ClipTokenizer.find_openai_vocab()
    if vocab is None:
        sys.exit("open_clip is not installed: it ships bpe_simple_vocab_16e6.txt.gz, needed here")
    ours = ClipTokenizer.from_openai_vocab(vocab)
    try:
        # torchvision's C++ ops are broken on some installs; open_clip does not need them for tokenizing.
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
        import open_clip
    except ImportError:
        open_clip = None

    corpora = {
        "mixed": make_captions(args.n, args.non_ascii, args.ampersand),
        "ascii": make_captions(args.n, 0.0, 0.0, seed=1),
    }
    results = {}
    length = args.context_length
    load_before = os.getloadavg()
    for name, captions in corpora.items():
        row = {"mean_chars": sum(map(len, captions)) / len(captions)}
        row["mean_tokens"] = sum(len(ours.encode(c)) for c in captions) / len(captions)  # without SOT/EOT
        row["distinct_words"] = len({w for c in captions for w in clean_text(c).split()})
        # "cold": a fresh tokenizer's first pass, every distinct word BPE-encoded once; "warm": caches filled.
        cold = {"clip_jax": partial(ClipTokenizer.from_openai_vocab(vocab), context_length=length)}
        warm = {"clip_jax": partial(ours, context_length=length), "clean_text_only": partial(map_list, clean_text)}
        if open_clip is not None:
            cold["open_clip"] = partial(open_clip.tokenizer.SimpleTokenizer(), context_length=length)
            warm["open_clip"] = partial(open_clip.tokenize, context_length=length)
        row["cold"] = rates(cold, captions, args.batch_size, 0)
        row["warm"] = rates(warm, captions, args.batch_size, args.repeats)
        if open_clip is not None:
            row["ratio"] = {
                f"{kind}_{clock}": round(row[kind]["clip_jax"][clock] / row[kind]["open_clip"][clock], 2)
                for kind in ("warm", "cold")
                for clock in ("wall", "cpu")
            }
            same = ours(captions, length) == open_clip.tokenize(captions, length).numpy()
            row["identical_ids"] = bool(same.all())
        results[name] = row
        print(f"[{name}] {row['mean_chars']:.0f} chars, {row['mean_tokens']:.1f} tokens, captions/s (wall | cpu):")
        for kind in ("warm", "cold"):
            for who, r in row[kind].items():
                print(f"  {kind:4} {who:17} {r['wall']:>10,.0f} | {r['cpu']:>10,.0f}")
        print(f"  ratios vs open_clip: {row.get('ratio')}; identical ids: {row.get('identical_ids')}")

    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname().split(".")[0]) or "host"
    out = args.out or pathlib.Path(__file__).parent / "results" / f"tokenizer_{host}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "tokenizer",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "hostname": socket.gethostname(),
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "vocabulary": ours.name,
        "open_clip_version": getattr(open_clip, "__version__", None),
        "load_average_before_after": [load_before, os.getloadavg()],
        "units": "captions/s by wall clock and by process CPU time (all threads); warm = best of repeats with "
        "caches filled, cold = first pass of a fresh tokenizer; ratio = clip_jax / open_clip",
        "results": results,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
