"""Captions/s of ClipTokenizer vs open_clip's tokenizer, timed interleaved, with cold and with warm caches.

    python benchmarks/tokenizer.py            # ~2-3 minutes on 2 cores; --n 5000 for a quick look

Corpora (none needs a download):
  * mixed: generated captions, 4-20 words, Zipf-like over common words and a long tail of made-up ones, 10%
    with non-ASCII text (accents, CJK, emoji, curly quotes, mojibake), 3% with '&' / HTML entities;
  * ascii: the same generator with neither;
  * real: English prose of the Python reference manual shipped with CPython (`pydoc_data.topics`): its
    paragraphs (not code blocks), cut into sentences and those into caption-length pieces of 5-25 words;
  * real_intl (where the machine has it): translated messages of the gettext catalogs under /usr/share/locale
    (GNU/Debian programs' UI strings by human translators) in 17 languages and scripts, 20-200 characters.
Both tokenizers cache per word/chunk, so each is timed "cold" (fresh instances, first pass over the corpus: every
distinct word is new; constructing them is timed apart, median of 5) and "warm" (caches filled by an untimed pass).
The two run on the same batches alternately, batch by batch (which one goes first alternates too), so load from
other jobs hits both alike; each pass is timed by wall clock and by process CPU time; reported are the best pass of
each (captions/s and their ratio) and the median of the per-pass ratios, pass by pass paired (steadier when the
machine's load changes between passes). The garbage collector stays on (objects alive before a pass are frozen, see
race()). Every batch's ids are compared between the two, cold and warm; any difference aborts the benchmark.
Writes benchmarks/results/tokenizer_<host>.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import itertools
import os
import pathlib
import random
import re
import socket
import struct
import sys
import time
import types
from collections.abc import Callable

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from machine import environment_facts  # noqa: E402
from result_files import checked_out_file, count, fraction  # noqa: E402

from clip_jax.data.tokenizer import ClipTokenizer, clean_text  # noqa: E402
from clip_jax.files import results_json

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
INTL_LANGUAGES = [
    "de", "fr", "es", "it", "pt_BR", "pl", "cs", "tr", "vi", "ru", "uk", "el", "ja", "zh_CN", "ko", "ar", "he",
]  # fmt: skip


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


def real_english(seed: int = 0) -> list[str]:
    """Caption-length pieces (5-25 words) of the prose of Python's reference manual, in the manual's order."""
    import pydoc_data.topics

    rng = random.Random(seed)
    out = []
    for name in sorted(pydoc_data.topics.topics):
        for paragraph in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            lines = paragraph.strip("\n").split("\n")
            # Indented lines are code, grammar or tables; a line of *, =, - is a heading's underline.
            if any(line.startswith((" ", "\t")) for line in lines) or re.fullmatch(r"[*=\-^~]*", lines[-1].strip()):
                continue
            for sentence in re.split(r"(?<=[.!?:;])\s+", " ".join(line.strip() for line in lines)):
                words = sentence.split()
                while len(words) >= 5:
                    k = rng.randint(5, 25)
                    out.append(" ".join(words[:k]))
                    words = words[k:]
    return out


def read_mo(path: pathlib.Path) -> list[str]:
    """The translated strings of a gettext .mo catalog (plural forms each on their own), UTF-8 ones only."""
    data = path.read_bytes()
    if len(data) < 28:
        return []
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(struct.unpack("<I", data[:4])[0])
    if order is None:
        return []
    n, originals, translations = struct.unpack(order + "3I", data[8:20])
    out = []
    for i in range(n):
        (original_length,) = struct.unpack(order + "I", data[originals + 8 * i : originals + 8 * i + 4])
        length, offset = struct.unpack(order + "2I", data[translations + 8 * i : translations + 8 * i + 8])
        if original_length == 0:  # the catalog's header entry
            continue
        try:
            out.extend(data[offset : offset + length].decode("utf-8").split("\x00"))
        except UnicodeDecodeError:
            continue
    return out


def real_intl(n: int, seed: int = 0, root: pathlib.Path = pathlib.Path("/usr/share/locale")) -> list[str]:
    """n translated UI messages (20-200 characters) from the machine's gettext catalogs; [] where none."""
    messages = []
    for language in INTL_LANGUAGES:
        for path in sorted((root / language / "LC_MESSAGES").glob("*.mo")):
            if not path.name.startswith("iso_"):  # ISO code lists: names of countries and languages, not prose
                messages += [m for m in read_mo(path) if 20 <= len(m.strip()) <= 200]
    messages = sorted(set(messages))
    return random.Random(seed).sample(messages, min(n, len(messages)))


def race(make: Callable[[], tuple], batches: list[list[str]], passes: int, warm: bool, length: int) -> dict:
    """Best pass of each tokenizer, timed batch by batch in alternation. `make()` gives fresh (ours, theirs);
    cold: fresh ones for every pass; warm: one pair, after an untimed pass that fills their caches."""
    runs = {"clip_jax": [], "open_clip": []}
    pair = make() if warm else None
    for p in range(passes + warm):
        ours, theirs = pair if warm else make()
        # The collector's full passes walk every object the imports made (torch's: ~0.1 s a pass) and start
        # at whichever allocation crosses a threshold, mostly inside open_clip's calls but not always: frozen,
        # those objects are left out of its passes, which keeps its work in the timings without its noise.
        gc.collect()
        gc.freeze()
        totals = {name: [0.0, 0.0] for name in runs}
        for i, batch in enumerate(batches):
            order = [("clip_jax", ours), ("open_clip", theirs)]
            out = {}
            for name, fn in order if (i + p) % 2 == 0 else order[::-1]:
                wall, cpu = time.perf_counter(), time.process_time()
                out[name] = fn(batch, context_length=length)
                totals[name][0] += time.perf_counter() - wall
                totals[name][1] += time.process_time() - cpu
            if not np.array_equal(out["clip_jax"], np.asarray(out["open_clip"])):
                bad = np.flatnonzero((out["clip_jax"] != np.asarray(out["open_clip"])).any(axis=1))
                sys.exit(f"ids differ from open_clip's ({'warm' if warm else 'cold'}), e.g. {batch[bad[0]]!r}")
        if not (warm and p == 0):
            for name in runs:
                runs[name].append(totals[name])
    n = sum(map(len, batches))
    result = {}
    for name, passes_ in runs.items():
        result[name] = {
            "wall": n / min(w for w, _ in passes_),
            "cpu": n / min(c for _, c in passes_),
            "passes_wall_cpu_s": [[round(w, 4), round(c, 4)] for w, c in passes_],
        }
    # Within a pass both met the same load; between passes it can change a lot on a shared machine, so the
    # ratio of each pass (paired) is the steadier figure; its median is reported next to the best passes' one.
    result["paired_ratios"] = {
        clock: sorted(
            round(theirs[k] / ours[k], 2) for ours, theirs in zip(runs["clip_jax"], runs["open_clip"], strict=True)
        )
        for k, clock in enumerate(("wall", "cpu"))
    }
    return result


CORPORA = ("mixed", "ascii", "real", "real_intl")  # the module docstring describes each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=count, default=20000, help="captions of the generated and real_intl corpora")
    parser.add_argument("--context-length", type=count, default=77)
    parser.add_argument("--batch-size", type=count, default=1024, help="captions per tokenizer call")
    parser.add_argument("--cold-passes", type=count, default=5, help="cold passes (fresh tokenizers each)")
    parser.add_argument("--warm-passes", type=count, default=5)
    parser.add_argument("--non-ascii", type=fraction, default=0.1, help="mixed: share of captions with non-ASCII text")
    parser.add_argument("--ampersand", type=float, default=0.03, help="mixed: share of captions with '&'")
    parser.add_argument("--corpora", default=",".join(CORPORA), help="comma-separated, of those four")
    parser.add_argument("--out", default=None,
                        help="the JSON file, or a folder for the default name (default: "
                             "benchmarks/results/tokenizer_<host>.json; an earlier run's is never replaced: _2, ...)")
    args = parser.parse_args()
    corpus_names = args.corpora.split(",")
    unknown = [name for name in corpus_names if name not in CORPORA]
    if unknown:
        parser.error(f"--corpora: unknown {', '.join(map(repr, unknown))}; known: {', '.join(CORPORA)}")
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname().split(".")[0]) or "host"
    out = checked_out_file(args.out, pathlib.Path(__file__).parent / "results" / f"tokenizer_{host}.json")

    vocab = ClipTokenizer.find_openai_vocab()
    if vocab is None:
        sys.exit("open_clip is not installed (pip install open_clip_torch): it ships bpe_simple_vocab_16e6.txt.gz, "
                 "and it is what we compare with")
    # torchvision's C++ ops are broken on some installs; open_clip does not need them for tokenizing.
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import open_clip
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    # open_clip's rows are torch tensors; torch's intra-op threads would spin after each op, and process CPU time
    # counts that spinning to whichever tokenizer runs next. Tokenizing is single-threaded on both sides.
    torch.set_num_threads(1)

    makers = {
        "mixed": lambda: make_captions(args.n, args.non_ascii, args.ampersand),
        "ascii": lambda: make_captions(args.n, 0.0, 0.0, seed=1),
        "real": real_english,
        "real_intl": lambda: real_intl(args.n // 2),
    }
    corpora = {name: makers[name]() for name in corpus_names}
    if "real_intl" in corpora and not corpora["real_intl"]:
        print("real_intl: no gettext catalogs under /usr/share/locale here, skipped")
        del corpora["real_intl"]

    def make() -> tuple:
        return ClipTokenizer.from_openai_vocab(vocab), SimpleTokenizer()

    # Construction, not in any pass's time: ours reads the merges, builds HF's BPE and the table of the
    # vocabulary's own words (which spares most English words the BPE); open_clip's reads the merges into dicts.
    construction: dict[str, list[float]] = {"clip_jax": [], "open_clip": []}
    make_ours = functools.partial(ClipTokenizer.from_openai_vocab, vocab)
    for _ in range(5):
        for name, build in (("clip_jax", make_ours), ("open_clip", SimpleTokenizer)):
            start = time.perf_counter()
            build()
            construction[name].append(time.perf_counter() - start)
    construction_ms = {name: round(1e3 * float(np.median(times)), 1) for name, times in construction.items()}
    print(f"construction (median of 5): clip_jax {construction_ms['clip_jax']} ms, open_clip "
          f"{construction_ms['open_clip']} ms", flush=True)

    load_before = os.getloadavg()
    results = {}
    header = (
        f"{'corpus':10} {'caches':6} {'clock':5} {'clip_jax/s':>11} {'open_clip/s':>11} {'ratio':>6} "
        f"{'paired median (min-max)':>24}"
    )
    table = [header, "-" * len(header)]
    print("\n".join(table), flush=True)  # the rows follow corpus by corpus, as they are measured
    for name, captions in corpora.items():
        cleaned = [clean_text(c) for c in captions]
        row = {
            "captions": len(captions),
            "mean_chars": round(sum(map(len, captions)) / len(captions), 1),
            "share_non_ascii": round(sum(not c.isascii() for c in captions) / len(captions), 4),
            "share_ampersand": round(sum("&" in c for c in captions) / len(captions), 4),
            "distinct_chunks": len({w for c in cleaned for w in c.split()}),
        }
        batches = [captions[i : i + args.batch_size] for i in range(0, len(captions), args.batch_size)]
        row["cold"] = race(make, batches, args.cold_passes, False, args.context_length)
        row["warm"] = race(make, batches, args.warm_passes, True, args.context_length)
        row["mean_tokens"] = round(
            float(ClipTokenizer.from_openai_vocab(vocab).tokenize_with_lengths(captions)[1].mean()), 2
        )  # BPE ids per caption, without SOT/EOT
        row["ratio"] = {
            f"{kind}_{clock}": round(row[kind]["clip_jax"][clock] / row[kind]["open_clip"][clock], 2)
            for kind in ("cold", "warm")
            for clock in ("wall", "cpu")
        }
        row["ratio_paired_median"] = {
            f"{kind}_{clock}": float(np.median(row[kind]["paired_ratios"][clock]))
            for kind in ("cold", "warm")
            for clock in ("wall", "cpu")
        }
        row["identical_ids"] = True  # race() exits otherwise
        results[name] = row
        for kind in ("cold", "warm"):
            ours, theirs = row[kind]["clip_jax"], row[kind]["open_clip"]
            for clock in ("wall", "cpu"):
                paired = row[kind]["paired_ratios"][clock]
                table.append(
                    f"{name:10} {kind:6} {clock:5} {ours[clock]:>11,.0f} {theirs[clock]:>11,.0f} "
                    f"{row['ratio'][f'{kind}_{clock}']:>5.1f}x "
                    f"{row['ratio_paired_median'][f'{kind}_{clock}']:>11.1f}x ({paired[0]:.1f}-{paired[-1]:.1f})"
                )
        print("\n".join(table[-4:]), flush=True)

    report = {
        "benchmark": "tokenizer",
        "command": "python benchmarks/tokenizer.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": environment_facts(),
        "args": {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in vars(args).items()},
        "vocabulary": ClipTokenizer.from_openai_vocab(vocab).name,
        "open_clip_version": getattr(open_clip, "__version__", None),
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "units": "captions/s by wall clock and by process CPU time (all threads), best pass; cold = fresh "
        "tokenizers' first pass, warm = caches filled by an untimed pass; the two tokenizers alternate batch by "
        "batch; ratio = clip_jax / open_clip of the best passes, ratio_paired_median = median over passes of "
        "that pass's ratio; ids compared on every batch",
        "table": "\n".join(table),
        "construction_ms_median": construction_ms,
        "results": results,
    }
    out.write_text(results_json(report))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
