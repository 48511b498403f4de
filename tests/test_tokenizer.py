"""ClipTokenizer against an independent pure-Python CLIP BPE, against open_clip, and its own contracts."""

from __future__ import annotations

import copy
import gzip
import html
import itertools
import json
import logging
import os
import pathlib
import pickle
import random
import re
import subprocess
import sys
import types
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import ftfy
import numpy as np
import pytest
import regex

import clip_jax
from clip_jax.data.tokenizer import ClipTokenizer, clean_text

SOT, EOT = "<start_of_text>", "<end_of_text>"


# ---- reference: CLIP BPE written out plainly, no shortcuts -------------------------------------------------
def ref_byte_map() -> dict[int, str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in mapping):
        mapping[b] = chr(256 + extra)
    return mapping  # insertion order (printable bytes first) is the vocabulary order


REF_PATTERN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def ref_clean(text: str) -> str:
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class RefBPE:
    def __init__(self, merges: list[tuple[str, str]]):
        self.byte_map = ref_byte_map()
        symbols = list(self.byte_map.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.cache: dict[str, list[str]] = {}

    @classmethod
    def from_file(cls, path) -> RefBPE:
        lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        return cls([tuple(line.split()) for line in lines if line.strip()])

    @classmethod
    def from_file_plain(cls, path) -> RefBPE:
        lines = pathlib.Path(path).read_text(encoding="utf-8").split("\n")[1:]
        return cls([tuple(line.split()) for line in lines if line.strip()])

    def bpe(self, word: str) -> list[str]:
        if word not in self.cache:
            parts = list(word[:-1]) + [word[-1] + "</w>"]
            while len(parts) > 1:
                pairs = list(zip(parts, parts[1:], strict=False))
                best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
                if best not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(parts):  # every occurrence, left to right, non-overlapping
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            self.cache[word] = parts
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in REF_PATTERN.findall(ref_clean(text)):
            if piece in (SOT, EOT):
                out.append(self.ids[piece])
                continue
            word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            out.extend(self.ids[t] for t in self.bpe(word))
        return out

    def rows(self, texts: list[str], context_length: int) -> np.ndarray:
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for r, text in enumerate(texts):
            tokens = [self.ids[SOT], *self.encode(text), self.ids[EOT]]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = self.ids[EOT]
            out[r, : len(tokens)] = tokens
        return out


# ---- corpora --------------------------------------------------------------------------------------------------
WORDS = (
    "a photo of the dog cat man woman sitting on with in at red blue green big small two people street city "
    "night beach tree car house running playing table food plate wooden old new black white close-up view"
).split()
UNICODE = [
    "Привет мир", "Καλημέρα κόσμε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "你好世界", "東京の夜景",
    "안녕하세요", "สวัสดีครับ", "Ünïcödé façade naïve", "STRASSE straße ſtraße", "ﬁne ﬂower", "ＬＯＵＤ　ＮＯＩＳＥ",
    "e\u0301 cafe\u0301", "ᾳ b\u0345c", "\u088f\ua7ce letters", "İstanbul", "Ωmega", "K\u212a",
]  # fmt: skip
EMOJI = ["🐶", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "❤️", "✔", "😂😂😂"]
ENTITIES = [
    "&amp;",
    "&amp;amp;",
    "&lt;b&gt;",
    "&quot;",
    "&#39;",
    "&#x27;",
    "&nbsp;",
    "&eacute;",
    "<b>x</b>",
    "&",
]
MOJIBAKE = ["CafÃ©", "donâ€™t", "Ã¼ber", "â€œquotedâ€\x9d", "Ã\xa0 la", "sÃ³"]
PUNCT = [
    "!",
    "?!",
    "...",
    ",",
    "'s",
    "'LL",
    "we're",
    "'",
    "(",
    ")",
    "-",
    "#",
    "$5",
    "3.14",
    "1,000",
    "2024",
    "½",
    "٣",
]
SPACES = [" ", "  ", "\t", "\n", " \r\n ", "\u00a0", "\u3000", "\u200b", "\x0b", "\x0c"]
ODD = [SOT, EOT, "!" + EOT, "<|endoftext|>", "\x1b[31mred\x1b[0m", "\x00", "\x7f", "</w>"]

FIXED_CASES = [
    "", " ", "   \t\n  ", "a", "A Photo Of A Dog.", "hello   world", "It's 3.14159 o'clock, isn't it?!",
    "Tom &amp; Jerry", "Tom &amp;amp; Jerry", "&lt;3 &lt;b&gt;bold&lt;/b&gt;", "CafÃ© crème", "donâ€™t stop",
    "naïve café Zürich", "東京タワー at night 🗼", "👨\u200d👩\u200d👧 family", "1234567890", "!!!???...",
    "x" * 300, "word " * 100, "🐶 " * 120, "1 2 3 " * 90, "a, " * 130, f"a {EOT} b !{EOT} {SOT}",
]  # fmt: skip


def generated_corpus(n: int = 1200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [WORDS] * 6 + [UNICODE, EMOJI, ENTITIES, MOJIBAKE, PUNCT, PUNCT, ODD]
    out = []
    for i in range(n):
        if i % 50 == 0:
            out.append(rng.choice(["", " ", "\n\t "]))
            continue
        count = rng.randint(80, 400) if i % 20 == 1 else rng.randint(1, 25)  # long ones cross 77 and 248
        parts = []
        for _ in range(count):
            piece = rng.choice(rng.choice(pools))
            if i % 2 == 0 and not piece.isascii():  # half the texts plain ASCII: the ftfy-free path
                piece = rng.choice(WORDS)
            piece = piece.upper() if rng.random() < 0.1 else piece.title() if rng.random() < 0.1 else piece
            parts.append(piece + (rng.choice(SPACES) if rng.random() < 0.2 else "" if rng.random() < 0.1 else " "))
        out.append("".join(parts))
    return out


def train_small_merges(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain greedy BPE training: merge the most frequent adjacent pair, n_merges times."""
    byte_map = ref_byte_map()
    counts = symbol_words([piece for text in texts for piece in REF_PATTERN.findall(ref_clean(text))])
    merges: list[tuple[str, str]] = []
    made = {s for w in counts for s in w} | set(byte_map.values()) | {s + "</w>" for s in byte_map.values()}
    while len(merges) < n_merges:
        pairs = pair_counts(counts)
        candidates = [p for p in pairs if p[0] + p[1] not in made]  # unique tokens: one id per merge
        if not candidates:
            break
        best = max(candidates, key=lambda p: (pairs[p], p))
        merges.append(best)
        made.add(best[0] + best[1])
        counts = {tuple(merge_pair(word, best)): c for word, c in counts.items()}  # distinct words stay distinct
    return merges


def symbol_words(words: list[str]) -> dict[tuple[str, ...], int]:
    """How often each word occurs, as its byte symbols, the last one with '</w>'."""
    byte_map = ref_byte_map()
    counts: dict[tuple[str, ...], int] = {}
    for word in words:
        syms = [byte_map[b] for b in word.encode("utf-8")]
        key = (*syms[:-1], syms[-1] + "</w>")
        counts[key] = counts.get(key, 0) + 1
    return counts


def pair_counts(counts: dict[tuple[str, ...], int]) -> dict[tuple[str, str], int]:
    """How often each pair of adjacent symbols occurs within the words."""
    pairs: dict[tuple[str, str], int] = {}
    for word, c in counts.items():
        for pair in zip(word, word[1:], strict=False):
            pairs[pair] = pairs.get(pair, 0) + c
    return pairs


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> list[str]:
    """`word` with each occurrence of `pair`, left to right, made one symbol."""
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> tuple[str, list[tuple[str, str]]]:
    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)] + UNICODE + FIXED_CASES[:17]
    merges = train_small_merges(texts, 300)
    path = tmp_path_factory.mktemp("vocab") / "small_vocab.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2 (test)\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return str(path), merges


def assert_same_as_reference(tok: ClipTokenizer, ref: RefBPE, texts: list[str]) -> None:
    for context_length in (77, 248):
        got, want = tok(texts, context_length=context_length), ref.rows(texts, context_length)
        assert got.dtype == np.int32 and got.shape == want.shape
        bad = [texts[i] for i in np.flatnonzero((got != want).any(axis=1))]
        assert not bad, f"{len(bad)} rows differ at L={context_length}, e.g. {bad[:3]!r}"
    # The lengths before the cut (the pipeline counts captions longer than the context with them).
    ids, lengths = tok.tokenize_with_lengths(texts, 77)
    assert (ids == tok(texts, 77)).all() and lengths.tolist() == [len(ref.encode(t)) for t in texts]
    for text in texts[:200]:
        assert tok.encode(text) == ref.encode(text), text


# ---- tests ----------------------------------------------------------------------------------------------------
def test_small_vocab_matches_reference(small_vocab):
    path, merges = small_vocab
    tok, ref = ClipTokenizer.from_openai_vocab(path), RefBPE.from_file(path)
    assert tok.vocab_size == 512 + len(merges) + 2 == len(ref.ids)
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (tok.vocab_size - 2, tok.vocab_size - 1, 0)
    assert tok.name.startswith("bpe-")
    assert_same_as_reference(tok, ref, FIXED_CASES + generated_corpus(300, seed=3))
    # The same merges uncompressed give the same tokenizer.
    plain = path.replace(".txt.gz", ".txt")
    with open(plain, "wb") as f:
        f.write(gzip.open(path).read())
    texts = FIXED_CASES + UNICODE
    assert (ClipTokenizer.from_openai_vocab(plain)(texts) == tok(texts)).all()


def test_rows_layout(small_vocab):
    tok = ClipTokenizer.from_openai_vocab(small_vocab[0])
    rows = tok(["", "a dog", "word " * 200], context_length=8)
    ids = tok.encode("a dog")
    assert rows[0].tolist() == [tok.sot_id, tok.eot_id] + [0] * 6
    assert rows[1].tolist() == [tok.sot_id, *ids, tok.eot_id] + [0] * (6 - len(ids))
    assert rows[2, 0] == tok.sot_id and rows[2, -1] == tok.eot_id and (rows[2, 1:-1] != tok.eot_id).all()
    assert (rows.argmax(axis=1) == [1, len(ids) + 1, 7]).all()  # the model pools at argmax(ids): EOT
    assert tok("a dog").shape == (1, 77) and tok([]).shape == (0, 77)
    assert tok(["a dog"], context_length=2).tolist() == [[tok.sot_id, tok.eot_id]]
    with pytest.raises(ValueError, match="context_length"):
        tok("a", context_length=1)
    assert tok.decode(rows[1], skip_special_tokens=True) == "a dog "
    with pytest.raises(ValueError, match="ids must lie"):
        tok.decode([tok.vocab_size])


def test_chunk_cache_reset_pickle_and_threads(small_vocab):
    texts = FIXED_CASES + generated_corpus(600, seed=13)
    want = ClipTokenizer.from_openai_vocab(small_vocab[0])(texts)
    tok = ClipTokenizer.from_openai_vocab(small_vocab[0])
    tok.max_cached_chunks = 40  # forces many cache restarts and table growth between batches
    batches = [texts[i : i + 37] for i in range(0, len(texts), 37)]
    with ThreadPoolExecutor(4) as pool:
        got = np.concatenate(list(pool.map(tok, batches)))
    assert (got == want).all()
    n_chunks = len({c for t in texts for c in clean_text(t).split()})
    assert len(tok._store.row_of) <= 40 + max(len(clean_text(" ".join(b)).split()) for b in batches) < n_chunks
    # One text per call: every call appends new chunks to a non-empty cache.
    one_by_one = ClipTokenizer.from_openai_vocab(small_vocab[0])
    assert (np.concatenate([one_by_one(t) for t in texts]) == want).all()
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.name == tok.name and (clone(texts) == want).all()


def test_clean_text_fast_path_equals_ftfy():
    ascii_chars = [chr(i) for i in range(128)]
    texts = [f"x{a}Y{b}z" for a, b in itertools.product(ascii_chars, ascii_chars)]
    texts += FIXED_CASES + generated_corpus(200, seed=5)
    assert [clean_text(t) for t in texts] == [ref_clean(t) for t in texts]


def test_real_openai_vocab_matches_reference():
    path = ClipTokenizer.find_openai_vocab()
    if path is None:
        pytest.skip("open_clip (which ships bpe_simple_vocab_16e6.txt.gz) is not installed")
    tok, ref = ClipTokenizer.from_openai_vocab(path), RefBPE.from_file(path)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.name) == (49408, 49406, 49407, "openai-bpe-16e6")
    assert_same_as_reference(tok, ref, FIXED_CASES + generated_corpus(400, seed=7))


def test_whole_words_are_read_from_the_vocabulary(tmp_path, monkeypatch):
    """A word that is a token of its own skips BPE only where BPE would give that token back: here merge 1 takes
    "ab" first, so "abc" is [ab, c</w>] although merge 3 built "abc</w>"."""
    path = tmp_path / "unreachable.txt"
    path.write_text("#version: 0.2 (test)\na b\nb c</w>\na bc</w>\n", encoding="utf-8")
    tok, ref = ClipTokenizer.from_openai_vocab(path), RefBPE.from_file_plain(path)
    assert "bc" in tok._whole_words and "abc" not in tok._whole_words and "a" in tok._whole_words
    texts = ["abc", "bc", "abc, bc. abcabc", "x abc", "abc"]
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text
    assert tok.encode("abc") == [ref.ids["ab"], ref.ids["c</w>"]] and tok.encode("bc") == [ref.ids["bc</w>"]]
    assert (tok(texts) == ref.rows(texts, 77)).all()

    # OpenAI's merges skip that check (all 34,483 of its whole-word tokens come back whole): run it and see.
    vocab = ClipTokenizer.find_openai_vocab()
    if vocab is None:
        pytest.skip("open_clip (which ships bpe_simple_vocab_16e6.txt.gz) is not installed")
    trusted = ClipTokenizer.from_openai_vocab(vocab)._whole_words
    monkeypatch.setattr("clip_jax.data.tokenizer._WHOLE_WORDS_CHECKED", frozenset())
    assert ClipTokenizer.from_openai_vocab(vocab)._whole_words == trusted and len(trusted) > 34000


def test_find_openai_vocab_does_not_import_open_clip():
    code = (
        "import sys; from clip_jax.data.tokenizer import ClipTokenizer as T; p = T.find_openai_vocab(); "
        "assert 'open_clip' not in sys.modules; assert p is None or p.name == 'bpe_simple_vocab_16e6.txt.gz'"
    )
    root = pathlib.Path(clip_jax.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_parity_with_open_clip():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    open_clip = pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    tok = ClipTokenizer.from_openai_vocab(ClipTokenizer.find_openai_vocab())
    texts = FIXED_CASES + generated_corpus(1200, seed=11)
    for context_length in (77, 248):
        got = tok(texts, context_length=context_length)
        want = open_clip.tokenize(texts, context_length=context_length).numpy()
        bad = [texts[i] for i in np.flatnonzero((got != want).any(axis=1))]
        assert not bad, f"{len(bad)} of {len(texts)} rows differ at L={context_length}, e.g. {bad[:3]!r}"
    assert (want[:, -1] != 0).any(), "corpus should contain texts truncated at 248"
    simple = SimpleTokenizer()
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (
        simple.sot_token_id,
        simple.eot_token_id,
        simple.vocab_size,
    )
    for text in texts[:300]:
        ids = simple.encode(text)
        assert tok.encode(text) == ids
        assert tok.decode(ids) == simple.decode(ids)


def test_train_save_load(tmp_path, caplog):
    rng = random.Random(2)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(2000)]
    corpus += [rng.choice(UNICODE) + " " + rng.choice(EMOJI) + rng.choice(PUNCT) for _ in range(300)]
    tok = ClipTokenizer.train(corpus, vocab_size=700)
    assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.name) == (700, 698, 699, "trained")
    rows = tok(corpus)
    assert rows.max() == tok.eot_id and ((rows == tok.eot_id).sum(axis=1) == 1).all()
    for text in corpus:
        # Round trip up to cleaning: decode gives the words of the cleaned text, each followed by a space.
        assert tok.decode(tok.encode(text)).split(" ")[:-1] == REF_PATTERN.findall(clean_text(text)), text
    assert len(tok.encode("a photo of the dog")) < len("a photo of the dog")  # it learnt merges
    # Every merge joins symbols of one word: no learnt token holds a space (the 512 byte symbols do).
    space = ref_byte_map()[ord(" ")]
    assert not [t for t in tok._vocab[512:-2] if space in t]
    # Same layout as OpenAI's, so the reference BPE with the trained merges agrees.
    ref = RefBPE(tok._merges) if len(set(tok._vocab)) == len(tok._vocab) == 514 + len(tok._merges) else None
    if ref is not None:
        assert_same_as_reference(tok, ref, corpus[:100] + corpus[-100:])
    tok.save(tmp_path / "tok.json")
    loaded = ClipTokenizer.load(tmp_path / "tok.json")
    assert (loaded.name, loaded.vocab_size, loaded.sot_id, loaded.eot_id) == ("trained", 700, 698, 699)
    assert (loaded(corpus, context_length=248) == tok(corpus, context_length=248)).all()
    with caplog.at_level(logging.WARNING, logger="clip_jax.data.tokenizer"):
        assert ClipTokenizer.train(["tiny corpus"], vocab_size=5000).vocab_size < 5000
    assert "of the 5000 requested" in caplog.text
    with pytest.raises(ValueError, match="514"):
        ClipTokenizer.train(corpus, vocab_size=100)


def greedy_merges_lowest_ids_first(words: list[str], min_frequency: int = 2) -> list[tuple[str, str]]:
    """Plain greedy BPE with ClipTokenizer.train's rules: the most frequent pair of adjacent symbols in a word, at least
    min_frequency times; among pairs of equal count the one of lower token ids (first symbol, then second), ids laid out
    as the vocabulary: the byte symbols, the same with '</w>', then each new token in the order it was made."""
    byte_map = ref_byte_map()
    symbols = [byte_map[b] for b in sorted(byte_map, key=lambda b: (byte_map[b] != chr(b), ord(byte_map[b])))]
    ids = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    counts = symbol_words(words)
    merges = []
    while True:
        pairs = pair_counts(counts)
        best = max(pairs, key=lambda p: (pairs[p], -ids[p[0]], -ids[p[1]]), default=None)
        if best is None or pairs[best] < min_frequency:
            return merges
        merges.append(best)
        ids.setdefault(best[0] + best[1], len(ids))
        counts = {tuple(merge_pair(word, best)): c for word, c in counts.items()}


def test_training_is_greedy_and_breaks_ties_by_token_id():
    """Many pairs of equal count (words of distinct letters, some of two bytes): the merges, in order, are plain greedy
    BPE's with ties to the lower ids, run after run. HF's trainer numbered the word-final symbols in a hash map's order,
    so such ties, and the merges, changed between runs."""
    rng = random.Random(5)
    letters = list("abcdefgé")
    words = ["".join(rng.sample(letters, rng.randint(2, 5))) for _ in range(120)]
    corpus = [" ".join(words[i:i + 6]) for i in range(0, len(words), 6)] * 2  # every word at least twice
    expected = greedy_merges_lowest_ids_first([w for text in corpus for w in text.split()])
    assert len(expected) > 100
    for _ in range(3):  # each training hashes afresh
        assert ClipTokenizer.train(corpus, vocab_size=5000)._merges == expected
    assert ClipTokenizer.train(corpus, vocab_size=514 + 40)._merges == expected[:40]  # cut by the vocabulary


def test_openai_vocab_save_load(tmp_path, small_vocab):
    tok = ClipTokenizer.from_openai_vocab(small_vocab[0])
    tok.save(tmp_path / "t.json")
    state = json.loads((tmp_path / "t.json").read_text())
    assert state["name"] == tok.name and (state["sot_id"], state["eot_id"]) == (tok.sot_id, tok.eot_id)
    texts = FIXED_CASES + UNICODE
    assert (ClipTokenizer.load(tmp_path / "t.json")(texts) == tok(texts)).all()


def test_errors(tmp_path, small_vocab):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope.txt.gz.*expected"):
        ClipTokenizer.from_openai_vocab(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt.gz"):
        ClipTokenizer.load(missing)
    cases = {
        "empty.txt": b"",
        "header_only.txt": b"#version: 0.2\n",
        "three.txt": b"#version: 0.2\ni n\nt h e\n",
        "unknown.txt": b"#version: 0.2\ni n\nin zz_not_a_symbol\n",
        "binary.gz": b"\x1f\x8b\x08\x00garbage",
        "latin1.txt": "#version\n\xe9 \xe9\n".encode("latin-1"),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}.*expected"):
            ClipTokenizer.from_openai_vocab(tmp_path / name)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="bad.json.*expected"):
        ClipTokenizer.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="small_vocab.txt.gz.*expected"):
        ClipTokenizer.load(small_vocab[0])


# ---- ftfy's answer without ftfy (clean_text's shortcut) -------------------------------------------------------
def ref_fix(text: str) -> str:
    """open_clip's basic_clean without its strip: what tokenizer._fix_text must return."""
    return html.unescape(html.unescape(ftfy.fix_text(text)))


# Texts on each boundary of the shortcut: every kind of character some ftfy step acts on, alone and next to text
# the shortcut passes, and text it must pass through unchanged.
BOUNDARY_TEXTS = [
    "donâ€™t stop", "CafÃ© crème", "Ã  la carte", "voilÃ  le travail", "â€œquotedâ€\x9d", "sÃ³ isso", "Ã¼ber",
    "CafÃƒÂ© crÃƒÂ¨me", "donÃ¢â‚¬â„¢t stop",  # encoded twice: ftfy's repair takes two steps
    "it’s “quoted” ‘single’ „low‟ ‛x", "ﬁne ﬂower ﬃ ĳ Ǆ", "ＡＢ　ＣＤ ｶﾞ ｈｅｌｌｏ！", "x\x80y\x85z\x9fw \x91hi\x92",
    "a\u00a0b NBSP\u00a0", "café vs cafe\u0301", "e\u0301", "\u0301start", "line\u2028sep\u2029para\x85next",
    "a\r\nb\rc é", "\ud83d\ude00 pair", "lone \udc00 surrogate é", "\ufeffbom é", "\u206a\ufff9x é",
    "\x1b[31mred\x1b[0m é", "\x00nul é\x7f", "&amp;", "&amp;amp; é", "&lt;b&gt;bold&lt;/b&gt;", "a < b &amp; c",
    "x &amp; y\nz < w\nq &amp; r", "x &amp; y\n\nq &amp;amp; r é", "&#x2019;s &eacute; &hellip;",
    "&#128; &#x92; &#0; &AMP; &notanentity; &amp &#x1F600; &#xD800;", "R&B & rock’n’roll", "&amp;#x2019;",
    "😂 🐶 👍🏽 ❤️ 👨\u200d👩\u200d👧", "東京の夜景 北京 서울", "Москва Привет ВГРС вЂ", "Αθήνα ΣΑΣ ΟΔΟΣ. ΒΓΞΟ",
    "Ünïcödé ÀÉÎÕÜ ½ ² ™ • € £ ©", "Â wrong", "aÃ b", "Ã", "√± ≈° ‚Ä", "×² à½ Œx", "│┌ ░▒ ═╗ö", "\uf8ff ¿¡",
    "ÂÃÎÐ€ ‘Ä", "İstanbul ǅ ẞ ß", "tab\tand\x0bvt\x0cff é", "\x1c\x1d\x1e\x1f seps é", "ſ K Å µ", "\u3000ideo",
    "", "\n", "é\n", "\né", "a\n<\n&amp;",
]  # fmt: skip


def test_clean_text_matches_ftfy_on_boundaries():
    from clip_jax.data import tokenizer as tokenizer_module

    shortcut = tokenizer_module._ftfy_shortcut()
    if ftfy.__version__ in tokenizer_module._FTFY_VERSIONS:
        assert shortcut is not None
        # The shortcut answers where it should (calling ftfy's fix_encoding for mojibake), and gives up on the
        # characters that start ftfy's rules over several characters.
        assert shortcut.fix("it’s “quoted” ﬁne ＡＢ café\u00a0&amp;") == "it's \"quoted\" fine AB café\u00a0&"
        assert shortcut.fix("donâ€™t") == "don't" and shortcut.is_bad("donâ€™t")
        assert shortcut.fix("a\r\nb é") is None and shortcut.fix("\x1b[1mé") is None
    texts = BOUNDARY_TEXTS + [t.upper() for t in BOUNDARY_TEXTS] + [f"A dog, {t}; the end" for t in BOUNDARY_TEXTS]
    texts += [f"{a} {b}" for a, b in itertools.combinations(BOUNDARY_TEXTS[::3], 2)]
    got = [tokenizer_module._fix_text(t) for t in texts]
    want = [ref_fix(t) for t in texts]
    bad = [(t, g, w) for t, g, w in zip(texts, got, want, strict=True) if g != w]
    assert not bad, bad[:3]
    assert [clean_text(t) for t in texts] == [ref_clean(t) for t in texts]


def test_ftfy_shortcut_per_character():
    """Each character some fixer changes (the shortcut's map) and each character of the mojibake test's set, in
    a few contexts, against ftfy; and every other code point is left alone by every per-character fixer."""
    from ftfy import fixes

    from clip_jax.data import tokenizer as tokenizer_module

    shortcut = tokenizer_module._ftfy_shortcut()
    if shortcut is None:
        pytest.skip(f"the shortcut is off for ftfy {ftfy.__version__}")
    chars = [chr(c) for c in shortcut._map] + list(shortcut._bad_anchors)
    texts = [f"{a}{c}{b}" for c in chars for a, b in (("", ""), ("x", "y"), ("Ã", " "), ("é", "€"), (" ", "\n"))]
    bad = [t for t in texts if tokenizer_module._fix_text(t) != ref_fix(t)]
    assert not bad, bad[:5]
    # The argument's premise, exhaustively: a fixer changes no code point outside the shortcut's map and the
    # multi-character starts (\r, ESC, surrogates). One call on one string of all of them per fixer.
    skip = set(shortcut._map) | {0x0D, 0x1B} | set(range(0xD800, 0xE000))
    others = "".join(chr(c) for c in range(0x110000) if c not in skip)
    for name in tokenizer_module._FTFY_FIXERS:
        assert getattr(fixes, name)(others) == others, name
    assert tokenizer_module._FTFY_FIXERS in fix_and_explain_constants()


def fix_and_explain_constants() -> list:
    """The tuples in ftfy.fix_and_explain's code: its loop over the fixers, in order."""
    return [c for c in ftfy.fix_and_explain.__code__.co_consts if isinstance(c, tuple)]


def draw_texts(rng: random.Random, n: int, shortcut) -> list[str]:
    """Short random strings mixing ASCII, characters the shortcut lets through, characters it watches and
    pieces that make ftfy act (entities, mojibake, line breaks, combining marks)."""
    watched = sorted(set(shortcut._map) | {ord(c) for c in shortcut._bad_anchors} | {0x0D, 0x1B, 0xD800, 0xDC00})
    passed = [c for c in range(0xA0, 0x3000) if not shortcut.look.match(chr(c))]
    pieces = ["&amp;", "&amp;amp;", "&lt;", "&#39;", "&#x2019;", "&eacute;", "&#128;", "&AMP;", "<", "Ã©", "â€™",
              "Ã ", "Â ", "\r\n", "\n", "e\u0301", "ｶﾞ", "\x1b[1m", "\ud83d\ude00", "“", "’s"]  # fmt: skip
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 10)):
            r = rng.random()
            if r < 0.35:
                parts.append(chr(rng.randint(32, 126)))
            elif r < 0.55:
                parts.append(chr(rng.choice(passed)))
            elif r < 0.8:
                parts.append(chr(rng.choice(watched)))
            else:
                parts.append(rng.choice(pieces))
        out.append("".join(parts))
    return out


def shortcut_errors(shortcut, texts: list[str]) -> list[str]:
    """Texts where the shortcut disagrees with ftfy: its "unchanged" test says yes but ftfy changes the text,
    its answer differs from ftfy's, or its is_bad differs from ftfy's."""
    from ftfy import badness

    errors = []
    for text in texts:
        fixed = ftfy.fix_text(text)
        untouched = "\n" not in text and not shortcut.look.search(text) and unicodedata.is_normalized("NFC", text)
        answer = shortcut.fix(text)
        if (untouched and fixed != text) or (answer is not None and answer != fixed):
            errors.append(text)
        elif shortcut.is_bad(text) != badness.is_bad(text):
            errors.append(text)
    return errors


def test_ftfy_shortcut_randomized():
    from clip_jax.data import tokenizer as tokenizer_module

    shortcut = tokenizer_module._ftfy_shortcut()
    if shortcut is None:
        pytest.skip(f"the shortcut is off for ftfy {ftfy.__version__}")
    texts = draw_texts(random.Random(0), 25000, shortcut)
    assert sum(shortcut.fix(t) is not None for t in texts) > len(texts) // 3  # the draws exercise the fast path
    assert sum(shortcut.fix(t) is None for t in texts) > len(texts) // 50  # and its refusals
    assert sum(shortcut.is_bad(t) for t in texts) > len(texts) // 50  # and ftfy's mojibake repair
    assert not shortcut_errors(shortcut, texts)[:3]
    # The same draws catch a shortcut that were wrong: one that overlooks the right single quote, or that tries
    # too few starts for the mojibake test.
    blind = copy.copy(shortcut)
    blind.look = re.compile(f"(?!\u2019){shortcut.look.pattern}")
    assert shortcut_errors(blind, texts)
    hasty = copy.copy(shortcut)
    hasty._bad_anchors = {c: offsets[:1] for c, offsets in shortcut._bad_anchors.items()}
    assert shortcut_errors(hasty, texts)


def test_lower_and_whitespace_commute():
    """_encode_batch lower-cases a whole joined batch, then splits at whitespace: lower() must turn no character
    into whitespace or whitespace into anything else, and its final-sigma rule must not see past whitespace."""
    for c in map(chr, range(0x110000)):
        low = c.lower()
        if c.isspace():
            assert low == c, hex(ord(c))
        else:
            assert not any(ch.isspace() for ch in low), hex(ord(c))
    for w in (chr(c) for c in range(0x110000) if chr(c).isspace()):
        assert ("AΣ" + w + "B").lower() == "aς" + w + "b" and ("A" + w + "ΣB").lower() == "a" + w + "σb", hex(ord(w))
    # The separator between texts never comes out of cleaning.
    assert ftfy.fix_text("\x00a\x00") == "a" and "\x00" not in html.unescape("&#0; &#x0; &#00; &#x00000;")


def test_ascii_word_split_matches_regex():
    from clip_jax.data.tokenizer import _ASCII_WORD_SPLIT, _WORD_SPLIT

    chars = [chr(i) for i in range(128)]
    pairs = "\n".join(a + b for a, b in itertools.product(chars, chars))
    assert _ASCII_WORD_SPLIT.findall(pairs) == _WORD_SPLIT.findall(pairs)
    rng = random.Random(3)
    pool = chars + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", SOT, EOT, SOT.upper(), "<start_of"]
    text = "\n".join("".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(5000))
    assert _ASCII_WORD_SPLIT.findall(text) == _WORD_SPLIT.findall(text)


def test_boundaries_cold_and_warm_match_open_clip():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    open_clip = pytest.importorskip("open_clip")

    path = ClipTokenizer.find_openai_vocab()
    # Chunks that are also words of other chunks, both orders ("'s" alone and inside "it's"; "dog" and "dog,").
    shared = ["it's 's dog dog, ,dog (dog) 東京 東京の", "'s it's , dog, dog 東京の 東京", "x'll 'll ll"]
    texts = BOUNDARY_TEXTS + shared + [t.upper() for t in BOUNDARY_TEXTS] + generated_corpus(300, seed=21)
    want = open_clip.tokenize(texts, context_length=77).numpy()
    cold = ClipTokenizer.from_openai_vocab(path)
    got_cold = cold(texts)
    warm_rows = cold(texts)  # every chunk cached now
    one_by_one = ClipTokenizer.from_openai_vocab(path)
    got_one = np.concatenate([one_by_one([t]) for t in texts])
    for got in (got_cold, warm_rows, got_one):
        bad = [texts[i] for i in np.flatnonzero((got != want).any(axis=1))]
        assert not bad, bad[:3]
