"""ClipTokenizer against an independent pure-Python CLIP BPE, against open_clip, and its own contracts."""

from __future__ import annotations

import gzip
import html
import itertools
import json
import os
import pathlib
import pickle
import random
import subprocess
import sys
import types
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
    counts: dict[tuple[str, ...], int] = {}
    for text in texts:
        for piece in REF_PATTERN.findall(ref_clean(text)):
            syms = [byte_map[b] for b in piece.encode("utf-8")]
            word = (*syms[:-1], syms[-1] + "</w>")
            counts[word] = counts.get(word, 0) + 1
    merges: list[tuple[str, str]] = []
    made = {s for w in counts for s in w} | set(byte_map.values()) | {s + "</w>" for s in byte_map.values()}
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for word, c in counts.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] = pairs.get(pair, 0) + c
        candidates = [p for p in pairs if p[0] + p[1] not in made]  # unique tokens: one id per merge
        if not candidates:
            break
        best = max(candidates, key=lambda p: (pairs[p], p))
        merges.append(best)
        made.add(best[0] + best[1])
        new_counts: dict[tuple[str, ...], int] = {}
        for word, c in counts.items():
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            new_counts[tuple(merged)] = new_counts.get(tuple(merged), 0) + c
        counts = new_counts
    return merges


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
    assert len(tok._row_of) <= 40 + max(len(clean_text(" ".join(b)).split()) for b in batches) < n_chunks
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


def test_train_save_load(tmp_path):
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
    # Same layout as OpenAI's, so the reference BPE with the trained merges agrees.
    ref = RefBPE(tok._merges) if len(set(tok._vocab)) == len(tok._vocab) == 514 + len(tok._merges) else None
    if ref is not None:
        assert_same_as_reference(tok, ref, corpus[:100] + corpus[-100:])
    tok.save(tmp_path / "tok.json")
    loaded = ClipTokenizer.load(tmp_path / "tok.json")
    assert (loaded.name, loaded.vocab_size, loaded.sot_id, loaded.eot_id) == ("trained", 700, 698, 699)
    assert (loaded(corpus, context_length=248) == tok(corpus, context_length=248)).all()
    with pytest.warns(UserWarning, match="requested"):
        assert ClipTokenizer.train(["tiny corpus"], vocab_size=5000).vocab_size < 5000
    with pytest.raises(ValueError, match="514"):
        ClipTokenizer.train(corpus, vocab_size=100)


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
