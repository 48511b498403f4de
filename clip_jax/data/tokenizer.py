"""CLIP's byte-level BPE tokenizer, id-for-id compatible with open_clip, built on HF `tokenizers`.

Rules reproduced (open_clip's `SimpleTokenizer` with its default `clean="lower"`):
  * cleaning: `ftfy.fix_text`, `html.unescape` twice, whitespace runs -> one space, strip, lower-case;
  * words: `_WORD_RE` (module `regex`, IGNORECASE); a word's UTF-8 bytes become GPT-2 byte symbols;
  * BPE with `</w>` on a word's last symbol, merge priority = line order of the merges file;
  * vocabulary: 256 byte symbols, the same with `</w>`, one token per merge, SOT, EOT (EOT = largest id);
  * rows: [SOT] + tokens + [EOT], cut to `context_length` keeping EOT last, zero padded.

Speed. On captions, HF `encode_batch` spends ~4 us per word in per-word bookkeeping (offsets, alignments),
its Oniguruma word-split regex is slow with IGNORECASE and disagrees with `regex` on a few code points (letters
new in Unicode 17; U+0345, which `regex` with IGNORECASE drops), and open_clip spends ~15 us per caption in
ftfy. So a batch goes:
  1. clean each text in Python; plain ASCII skips ftfy, with identical output (`_ASCII_NEEDS_FTFY`);
  2. cut the cleaned batch at spaces into chunks: no word match can span a space, so a chunk's ids do not
     depend on its neighbours, and a dict caches chunk -> ids (open_clip caches per word, for the same reason);
  3. a chunk not cached yet is split with open_clip's own `regex` pattern and each new word goes through HF's
     Rust BPE model (`models.BPE.tokenize`, ~1.5 us a word, with `end_of_word_suffix="</w>"`);
  4. numpy gathers the cached ids into [N, context_length], with no Python loop over tokens.
Text that needs ftfy (non-ASCII, '&', control characters) still pays it, ~30-70 us a caption.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import itertools
import json
import os
import pathlib
import re
import threading
import warnings
import zlib
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex
from etils import epath
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from clip_jax.errors import ConfigError
from clip_jax.files import write_atomic

OPENAI_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_VOCAB_NAME = "openai-bpe-16e6"
# open_clip reads lines [1 : 49152 - 256 - 2 + 1] of the file: 48,894 merges after a header line.
_MAX_MERGES = 49152 - 256 - 2
# sha256 of those 48,894 lines joined by "\n", so OpenAI's vocabulary is recognised under any file name.
_OPENAI_MERGES_SHA256 = "f61f2adf497e6f5357c347aeb4646fabe82f341e946de5bdec5d2858e41bef4a"
# open_clip's spelling (OpenAI's repo and HF use <|startoftext|>). It shows in decode(), and open_clip maps
# these exact strings, when a caption contains them as a word, to the special ids; so do we.
MIN_VOCAB_SIZE = 514  # 512 byte-level symbols (a byte and its end-of-word form) + SOT + EOT
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_WORD_RE = regex.compile(
    f"{re.escape(SOT_TOKEN)}|{re.escape(EOT_TOKEN)}|"
    + r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# On ASCII text ftfy only unescapes HTML entities ('&'), removes ANSI escapes (ESC) and the control characters
# U+00-08, U+0B, U+0E-1F, U+7F, and turns \r into \n; html.unescape needs '&'. Without those characters the
# only change is \r -> \n, which whitespace collapsing erases, so skipping ftfy gives identical output.
_ASCII_NEEDS_FTFY = re.compile(r"[&\x00-\x08\x0b\x0e-\x1f\x7f]")
_FORMAT = "clip_jax.ClipTokenizer"

_PRINTABLE_BYTES = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
]
# GPT-2's byte -> unicode map, in the map's order (= CLIP's vocabulary order): printable bytes stand for
# themselves, the other 68 bytes get code points 256.. so that no symbol is whitespace or a control character.
_BYTE_ORDER = _PRINTABLE_BYTES + [b for b in range(256) if b not in _PRINTABLE_BYTES]
BYTE_SYMBOLS = [chr(b) for b in _PRINTABLE_BYTES] + [chr(256 + i) for i in range(256 - len(_PRINTABLE_BYTES))]
_BYTE_OF_SYMBOL = dict(zip(BYTE_SYMBOLS, _BYTE_ORDER, strict=True))
_SYMBOLS = dict(zip(_BYTE_ORDER, BYTE_SYMBOLS, strict=True))  # str.translate table for latin-1-decoded bytes


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy, html.unescape twice, collapse whitespace, strip, lower-case."""
    if text.isascii() and not _ASCII_NEEDS_FTFY.search(text):
        return " ".join(text.split()).lower()
    # str.split() drops leading/trailing whitespace too, which covers both of open_clip's .strip() calls.
    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()


def _base_vocab() -> list[str]:
    return BYTE_SYMBOLS + [s + "</w>" for s in BYTE_SYMBOLS]


def _read_text(path: pathlib.Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found: {path} (expected a merges file such as {OPENAI_VOCAB_FILENAME}, "
            "gzip-compressed or plain text)"
        )
    data = path.read_bytes()
    try:
        if data[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: expected a UTF-8 BPE merges file (optionally gzip-compressed): {e}") from e


class ClipTokenizer:
    """CLIP BPE tokenizer: `tok(texts, context_length)` -> int32 [N, context_length] ids, pad 0, EOT largest."""

    pad_id: int = 0

    def __init__(self, vocab: Sequence[str], merges: Sequence[tuple[str, str]], *, name: str) -> None:
        """`vocab` in id order, ending with SOT and EOT; `merges` in priority order. Prefer the classmethods."""
        if len(vocab) < MIN_VOCAB_SIZE or tuple(vocab[-2:]) != (SOT_TOKEN, EOT_TOKEN):
            raise ValueError(f"vocab must hold the 512 byte symbols, ..., {SOT_TOKEN}, {EOT_TOKEN} (got {len(vocab)})")
        index = {tok: i for i, tok in enumerate(vocab)}  # a repeated string keeps its last id, as in open_clip
        for a, b in merges:
            if a not in index or b not in index or a + b not in index:
                raise ValueError(f"merge {a!r} {b!r}: its parts and their concatenation must be in vocab")
        self.name = name
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = self.vocab_size - 2, self.vocab_size - 1
        self._vocab = list(vocab)
        self._merges = [tuple(m) for m in merges]
        self._bpe = models.BPE(vocab=index, merges=self._merges, end_of_word_suffix="</w>")
        self._lock = threading.Lock()  # the chunk cache is shared state
        self._reset_cache()

    def __getstate__(self) -> dict:  # pickling (e.g. to data-loader workers) rebuilds rather than copy caches
        return {"vocab": self._vocab, "merges": self._merges, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["vocab"], state["merges"], name=state["name"])

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_openai_vocab(cls, path: str | os.PathLike) -> ClipTokenizer:
        """Load OpenAI's merges file (`bpe_simple_vocab_16e6.txt.gz`, or any file in that format)."""
        path = pathlib.Path(path)
        lines = _read_text(path).split("\n")[1 : _MAX_MERGES + 1]
        while lines and not lines[-1].strip():  # a short file's trailing newline
            lines.pop()
        if not lines:
            raise ValueError(f"{path}: expected a header line then BPE merges 'A B', found no merges")
        vocab = _base_vocab()
        known = set(vocab)
        merges = []
        for lineno, line in enumerate(lines, start=2):
            parts = line.split()
            if len(parts) != 2 or parts[0] not in known or parts[1] not in known:
                raise ValueError(
                    f"{path}:{lineno}: expected a BPE merge 'A B' of two known symbols (byte symbols, "
                    f"'</w>'-suffixed, or earlier merges), got {line[:80]!r}"
                )
            merges.append((parts[0], parts[1]))
            vocab.append(parts[0] + parts[1])
            known.add(vocab[-1])
        digest = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
        name = OPENAI_VOCAB_NAME if digest == _OPENAI_MERGES_SHA256 else f"bpe-{digest[:12]}"
        return cls(vocab + [SOT_TOKEN, EOT_TOKEN], merges, name=name)

    @classmethod
    def find_openai_vocab(cls) -> pathlib.Path | None:
        """OpenAI's vocabulary file shipped inside an installed open_clip, located without importing it."""
        try:
            spec = importlib.util.find_spec("open_clip")
        except (ImportError, ValueError):
            return None
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = pathlib.Path(location) / OPENAI_VOCAB_FILENAME
            if candidate.is_file():
                return candidate
        return None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> ClipTokenizer:
        """Learn CLIP-style merges on captions; ids laid out as OpenAI's, so SOT = V-2 and EOT = V-1."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (512 byte symbols + SOT + EOT), got {vocab_size}")
        scratch = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
        # Each input "sequence" is one word: no split, only UTF-8 bytes -> byte symbols.
        scratch.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        # HF's own vocabulary counts only the byte symbols it saw with '</w>'; ask for more than needed and
        # take the first merges, which is the same as stopping training earlier.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size + 512,
            min_frequency=min_frequency,
            show_progress=False,
            initial_alphabet=BYTE_SYMBOLS,
            end_of_word_suffix="</w>",
        )
        # Words split here with open_clip's regex, so training sees exactly the words encoding will.
        words = ([w for w in _WORD_RE.findall(clean_text(t)) if w not in (SOT_TOKEN, EOT_TOKEN)] for t in texts)
        scratch.train_from_iterator(words, trainer=trainer)
        vocab = _base_vocab()
        known = set(vocab)
        merges = []
        for merge in json.loads(scratch.to_str())["model"]["merges"]:
            if len(vocab) == vocab_size - 2:
                break
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            merges.append((a, b))
            # Two merges can build the same string ("a bc", "ab c"): keep both merges, one token.
            if a + b not in known:
                vocab.append(a + b)
                known.add(a + b)
        if len(vocab) < vocab_size - 2:
            warnings.warn(
                f"corpus supports only {len(vocab) + 2} tokens at min_frequency={min_frequency}; "
                f"requested {vocab_size}",
                stacklevel=2,
            )
        return cls(vocab + [SOT_TOKEN, EOT_TOKEN], merges, name="trained")

    def save(self, path: epath.PathLike) -> None:
        """One JSON file: which vocabulary, the special ids, the tokens in id order and the merges."""
        state = {
            "format": _FORMAT, "version": 1, "name": self.name, "vocab_size": self.vocab_size,
            "sot_id": self.sot_id, "eot_id": self.eot_id, "pad_id": self.pad_id,
            "sot_token": SOT_TOKEN, "eot_token": EOT_TOKEN,
            "vocab": self._vocab, "merges": [f"{a} {b}" for a, b in self._merges],
        }  # fmt: skip
        write_atomic(path, json.dumps(state, ensure_ascii=False))  # a torn tokenizer.json would stop every relaunch

    @classmethod
    def load(cls, path: epath.PathLike) -> ClipTokenizer:
        path = epath.Path(path)  # pathlib would turn gs://bucket/run into gs:/bucket/run
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (expected JSON written by ClipTokenizer.save)")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if state.get("format") != _FORMAT or state.get("version") != 1:
                raise ValueError(f"format is {state.get('format')!r} version {state.get('version')!r}")
            tok = cls(state["vocab"], [tuple(m.split(" ")) for m in state["merges"]], name=state["name"])
            recorded = (state["sot_id"], state["eot_id"], state["vocab_size"])
            if (tok.sot_id, tok.eot_id, tok.vocab_size) != recorded:
                raise ValueError(f"recorded (sot_id, eot_id, vocab_size) {recorded} do not match the vocabulary")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path} is damaged or not ours: expected a {_FORMAT} v1 JSON file written by "
                              f"ClipTokenizer.save ({e})") from e
        return tok

    # ---- encoding -----------------------------------------------------------------------------------------
    max_cached_chunks: int = 1 << 18  # ~50 MB; the cache restarts when full (frequent chunks come back at once)

    def _reset_cache(self) -> None:
        self._row_of: dict[str, int] = {}  # chunk -> row of the tables below
        self._starts = np.zeros(1024, np.int64)  # row -> offset into _ids
        self._lengths = np.zeros(1024, np.int64)  # row -> number of ids
        self._ids = np.zeros(16384, np.int32)
        self._n_ids = 0

    def _cache_chunks(self, chunks: list[str]) -> None:
        """BPE-encode chunks (space-free pieces of cleaned text) and add their ids to the cache."""
        words = [_WORD_RE.findall(c) for c in chunks]  # open_clip's own split, exact on any text
        # A word that is exactly a special's string is that id, as in open_clip.
        ids_of = {SOT_TOKEN: [self.sot_id], EOT_TOKEN: [self.eot_id]}
        for word in dict.fromkeys(w for ws in words for w in ws if w not in ids_of):
            # UTF-8 bytes -> byte symbols, then the Rust BPE (with '</w>' and its own word cache).
            ids_of[word] = [t.id for t in self._bpe.tokenize(word.encode().decode("latin-1").translate(_SYMBOLS))]
        chunk_ids = [[i for w in ws for i in ids_of[w]] for ws in words]
        n_rows, n_new = len(self._row_of), sum(map(len, chunk_ids))
        if n_rows + len(chunks) > len(self._starts):
            grow = max(2 * len(self._starts), n_rows + len(chunks))
            self._starts, self._lengths = np.resize(self._starts, grow), np.resize(self._lengths, grow)
        if self._n_ids + n_new > len(self._ids):
            self._ids = np.resize(self._ids, max(2 * len(self._ids), self._n_ids + n_new))
        lengths = np.fromiter(map(len, chunk_ids), np.int64, count=len(chunks))
        self._lengths[n_rows : n_rows + len(chunks)] = lengths
        self._starts[n_rows : n_rows + len(chunks)] = self._n_ids + np.cumsum(lengths) - lengths
        self._ids[self._n_ids : self._n_ids + n_new] = np.fromiter(
            itertools.chain.from_iterable(chunk_ids), np.int32, count=n_new
        )
        self._n_ids += n_new
        self._row_of.update(zip(chunks, range(n_rows, n_rows + len(chunks)), strict=True))

    def _encode_cleaned(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """BPE ids of cleaned texts (no SOT/EOT) as (all ids concatenated, ids per text)."""
        # Cleaned text has single spaces and no other whitespace, so " ".join + split(" ") recovers the chunks
        # and a text holds count(" ") + 1 of them (0 if empty).
        n_chunks = np.fromiter((t.count(" ") + 1 if t else 0 for t in texts), np.int64, count=len(texts))
        joined = " ".join(t for t in texts if t)
        chunks = joined.split(" ") if joined else []
        with self._lock:
            if len(self._row_of) > self.max_cached_chunks or self._n_ids > 64 * self.max_cached_chunks:
                self._reset_cache()
            try:
                rows = np.fromiter(map(self._row_of.__getitem__, chunks), np.int64, count=len(chunks))
            except KeyError:
                self._cache_chunks([c for c in dict.fromkeys(chunks) if c not in self._row_of])
                rows = np.fromiter(map(self._row_of.__getitem__, chunks), np.int64, count=len(chunks))
            starts, lengths, ids = self._starts[rows], self._lengths[rows], self._ids
        ends = np.cumsum(lengths)
        flat = ids[np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)]
        ends = np.concatenate([[0], ends])
        chunk_ends = np.cumsum(n_chunks)
        return flat, ends[chunk_ends] - ends[chunk_ends - n_chunks]

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        return self._encode_cleaned([clean_text(text)])[0].tolist()

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
        """int32 [N, context_length]: [SOT] + ids + [EOT], cut to context_length keeping EOT last, 0-padded."""
        return self.tokenize_with_lengths(texts, context_length)[0]

    def tokenize_with_lengths(self, texts: str | Sequence[str], context_length: int = 77
                              ) -> tuple[np.ndarray, np.ndarray]:
        """(`self(texts, context_length)`, int64 [N] BPE ids per text before the cut): a text was truncated where
        its length exceeds context_length - 2."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        flat, lengths = self._encode_cleaned([clean_text(t) for t in texts])
        n = len(lengths)
        out = np.zeros((n, context_length), dtype=np.int32)
        out[:, 0] = self.sot_id
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
        keep = cols < context_length - 1  # open_clip cuts to L then overwrites the last with EOT: L-2 ids
        out[rows[keep], cols[keep]] = flat[keep]
        out[np.arange(n), np.minimum(lengths, context_length - 2) + 1] = self.eot_id
        return out, lengths

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """open_clip's decode: tokens joined, bytes UTF-8 decoded (errors replaced), '</w>' -> ' '.

        With skip_special_tokens, SOT is dropped and decoding stops at the first EOT (so a padded row of
        `__call__` decodes to its text; id 0 is '!', not a reserved padding token).
        """
        ids = [int(i) for i in ids]
        if not all(0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        if skip_special_tokens:
            ids = [i for i in itertools.takewhile(lambda i: i != self.eot_id, ids) if i != self.sot_id]
        text = "".join(self._vocab[i] for i in ids)
        return bytes(_BYTE_OF_SYMBOL[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __repr__(self) -> str:
        return f"ClipTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"
