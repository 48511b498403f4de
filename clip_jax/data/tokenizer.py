"""CLIP's byte-level BPE tokenizer, id-for-id compatible with open_clip, built on HF `tokenizers`.

Rules reproduced (open_clip's `SimpleTokenizer` with its default `clean="lower"`):
  * cleaning: `ftfy.fix_text`, `html.unescape` twice, whitespace runs -> one space, strip, lower-case;
  * words: `_WORD_RE` (module `regex`, IGNORECASE); a word's UTF-8 bytes become GPT-2 byte symbols;
  * BPE with `</w>` on a word's last symbol, merge priority = line order of the merges file;
  * vocabulary: 256 byte symbols, the same with `</w>`, one token per merge, SOT, EOT (EOT = largest id);
  * rows: [SOT] + tokens + [EOT], cut to `context_length` keeping EOT last, zero padded.

Speed. open_clip spends a caption's time in ftfy (30-70 us on text that is not plain ASCII), in Python per word
and in its Python BPE; HF's `encode_batch` would spend ~4 us a word on bookkeeping (offsets, alignments), and its
Oniguruma word-split regex disagrees with `regex` on a few code points (letters new in Unicode 17; U+0345, which
`regex` with IGNORECASE drops). So a batch goes:
  1. cleaning: plain ASCII without '&' or control characters skips ftfy (`_ASCII_NEEDS_FTFY`); other text gets
     ftfy.fix_text's output from `_FtfyShortcut` (the argument is in the comment above it): ~1 us where no ftfy
     step can act, a few us where per-character fixers (curly quotes, ligatures, fullwidth forms, C1 controls...)
     and HTML unescaping act, replayed with ftfy's own functions, ~30 us where ftfy's mojibake test holds and its
     own fix_encoding runs; ftfy.fix_text itself only for text with CR, ESC or surrogates;
  2. the cleaned batch is joined, lower-cased and split at whitespace once into chunks: no word match can span
     whitespace, so a chunk's ids do not depend on its neighbours, and one dict maps chunks and words to ids;
  3. new chunks: one of ASCII letters only is one word; the others are split with open_clip's pattern in one
     findall per batch (the stdlib's `re` for ASCII, with the same matches there); a new word that is itself a
     token of the vocabulary (with '</w>') is that token, read from a table built with the vocabulary (where BPE
     gives such a word back whole: all of OpenAI's 34,483); the other new words go through HF's Rust BPE in one
     call (~2 us a word, `end_of_word_suffix="</w>"`), whose ids word_ids splits back;
  4. numpy gathers the stored ids into [N, context_length], with no Python loop over tokens or texts.
benchmarks/tokenizer.py (2 cores shared with other work, both tokenizers on the same batches in alternation;
results/tokenizer_vm_2026-12-04_2.json): warm caches 13x open_clip on generated mixed captions (10% non-ASCII, 3%
'&'), 16x on ASCII ones, 17x on English prose, 11x on translated UI messages (17 languages); cold caches (a fresh
tokenizer's first pass, every distinct word new) 10x on mixed and on prose, 11x on ASCII, ~7x on the translations.
What cold adds is the Rust BPE of new words that are not a token of their own (~2-4 us a word, the more bytes the
more) and the bookkeeping of new chunks (~1 us each); the dict lookups (~0.1 us a chunk once open_clip's work has
evicted the CPU caches) and ftfy's mojibake repair (~1% of the mixed captions) are most of what is left when warm.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.util
import itertools
import json
import logging
import operator
import os
import pathlib
import re
import re._constants as _sre  # re's own parser: exact character sets of ftfy's patterns
import re._parser as _sre_parse
import threading
import unicodedata
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

log = logging.getLogger(__name__)

OPENAI_VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
OPENAI_VOCAB_NAME = "openai-bpe-16e6"
# open_clip reads lines [1 : 49152 - 256 - 2 + 1] of the file: 48,894 merges after a header line.
_MAX_MERGES = 49152 - 256 - 2
# sha256 of those 48,894 lines joined by "\n", so OpenAI's vocabulary is recognised under any file name.
_OPENAI_MERGES_SHA256 = "f61f2adf497e6f5357c347aeb4646fabe82f341e946de5bdec5d2858e41bef4a"
# Merge lists (by that digest) under which BPE gives every word that is itself a token (with '</w>') back as that
# one token, so such a word's id is read from the vocabulary (see `_find_whole_words`): OpenAI's 34,483 such tokens
# all are (tests/test_tokenizer.py recomputes it with HF's BPE). Any other list is checked at construction.
_WHOLE_WORDS_CHECKED = frozenset({_OPENAI_MERGES_SHA256})
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
# The same split with "\n" as a word of its own, to split many chunks joined by "\n" in one call.
_WORD_SPLIT = regex.compile(r"\n|" + _WORD_RE.pattern, regex.IGNORECASE)
# _WORD_SPLIT for ASCII text with the stdlib's faster engine: on ASCII, \p{L} is [a-z] (both cases under
# IGNORECASE), \p{N} is [0-9] and \s is [ \t\n\r\f\v], so every alternative matches the same strings.
_ASCII_WORD_SPLIT = re.compile(
    f"\\n|{re.escape(SOT_TOKEN)}|{re.escape(EOT_TOKEN)}|" + r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""",
    re.IGNORECASE | re.ASCII,
)
_SEP = "\x00"  # between texts of a batch (see _encode_batch)
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
_SYMBOLS_KEEP_SPACE = {**_SYMBOLS, 0x20: " "}
_BYTES_OF_SYMBOLS = {ord(symbol): byte for symbol, byte in _BYTE_OF_SYMBOL.items()}  # the other way, as latin-1
# BPE training spells base-vocabulary token i (a byte symbol, or one with '</w>' from 256 on) as the private-use
# character U+E000 + i: the trainer numbers its alphabet by code point, so its ids are ours, and it breaks ties
# between merges of equal count by those ids. With '</w>' as its own suffix it numbered the word-final symbols in the
# order it met them in a hash map, so ties, and the merges, changed from one run to the next.
_TRAIN_BASE = 0xE000
_TRAIN_CHARS = {b: chr(_TRAIN_BASE + i) for i, b in enumerate(_BYTE_ORDER)} | {0x20: " "}  # latin-1-decoded bytes
_FINAL = 256  # base-vocabulary offset of the word-final symbols


# ---- ftfy's answer without running ftfy -------------------------------------------------------------------
# open_clip runs ftfy.fix_text on every caption: 30-70 us on text that is not plain ASCII, a third of it in
# ftfy's mojibake test (`ftfy.badness.is_bad`, one large regex tried at every position). What fix_text does, in
# ftfy 6.3.1 (the version this was read from; any other version runs ftfy itself), with open_clip's defaults:
#   (a) it cuts the text after each "\n" (and every `max_decode_length` characters) and fixes each segment alone;
#       HTML unescaping is switched off for a segment holding "<" and stays off for every later segment;
#   (b) a segment is fixed in rounds until a round changes nothing; a round is unescape_html (if on),
#       fix_encoding, the eight fixers of `_FTFY_FIXERS` in that order, then NFC normalization;
#   (c) fix_encoding returns its input unchanged unless `is_bad` holds for it (the first test it makes);
#   (d) the eight fixers act on each character alone -- str.translate with ftfy's LIGATURES, WIDTH_MAP and
#       CONTROL_CHARS tables, regex substitutions whose pattern is one character class (C1 controls, curly
#       quotes), str.replace of \u2028, \u2029, \x85 and \r -- except three rules that read more than one
#       character: "\r\n" -> "\n", surrogate pairs -> one character, ANSI escapes (which start with ESC).
# So on a segment without \r, ESC and surrogates the eight fixers together are one per-character map: it is
# computed once by running ftfy's own fixers on each character some fixer can change (those characters are
# read from ftfy's tables and from its compiled patterns, parsed with re's own parser, so ranges are exact).
# `_FtfyShortcut.fix` replays (a)-(c) with ftfy's own unescape_html, an exact but cheaper is_bad (below) that
# decides whether to run fix_encoding's step (ftfy's own, ~25 us) at all, that map and unicodedata's NFC, and gives up
# (None: the caller runs ftfy) where a segment holds \r, ESC or a surrogate, or still changes after a few rounds.
#
# is_bad(s) is `BADNESS_RE.search(s)`: some alternative of that alternation matches at some start. Each
# alternative consumes, outside any group, at least one character class; taking for each the least common one
# (so that ordinary accented text rarely meets any) gives a set R of characters and, per character, the offsets
# from a match's start where an alternative consumes it (the widths its prefix can have). A match starting at s
# thus puts a character c of R at some q = s + o with o among c's offsets; so trying BADNESS_RE.match(s, q - o)
# for each character of R in s and each of its offsets finds a match if and only if search() does (match at a
# position is the same attempt search makes there, "^" included), and text without R's characters -- most
# text -- needs no attempt at all.
_FTFY_VERSIONS = ("6.3.1",)
_FTFY_FIXERS = (  # the order of ftfy.fix_and_explain's loop over its fixers
    "fix_c1_controls",
    "fix_latin_ligatures",
    "fix_character_width",
    "uncurl_quotes",
    "fix_line_breaks",
    "fix_surrogates",
    "remove_terminal_escapes",
    "remove_control_chars",
)
_LINE_BREAKS = "\r\u2028\u2029\x85"  # the characters fix_line_breaks replaces (str.replace calls in its body)
_MULTI_CHAR = "\r\x1b"  # with the surrogates: the characters that start a rule reading more than one character
# Flags under which a parsed literal, class or "^" would mean more than it is read as here.
_SRE_FLAGS_REFUSED = re.IGNORECASE | re.LOCALE | re.MULTILINE


class _Refused(ValueError):
    """ftfy's patterns or tables are not of the shape the shortcut's argument needs: run ftfy instead."""


def _class_chars(items: list) -> set[int] | None:
    """Code points of a parsed character class; None for a negated class or one with a category (\\s, \\w)."""
    out: set[int] = set()
    for op, av in items:
        if op == _sre.LITERAL:
            out.add(av)
        elif op == _sre.RANGE:
            out.update(range(av[0], av[1] + 1))
        else:
            return None
    return out


def _commonness(chars: set[int]) -> tuple[int, int, int]:
    """Sort key: ASCII and lower-case/other letters first (they fill ordinary text), then other letters, size."""
    categories = [unicodedata.category(chr(c)) for c in chars]
    common = sum(c < 128 or cat in ("Ll", "Lo") for c, cat in zip(chars, categories, strict=True))
    return common, sum(cat.startswith("L") for cat in categories), len(chars)


def _required_chars(items: list) -> set[int] | None:
    """A set of characters one of which every match of the parsed sequence consumes; None if none is bounded."""
    choices = []
    for op, av in items:
        if op == _sre.LITERAL:
            choice = {av}
        elif op == _sre.IN:
            choice = _class_chars(av)
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
            choice = _required_chars(av[2]) if av[0] >= 1 else None  # an optional item may be absent
        elif op == _sre.SUBPATTERN:
            if av[1] & _SRE_FLAGS_REFUSED:  # an inline (?i) would widen the literals
                raise _Refused("inline flags")
            choice = _required_chars(av[3])
        elif op == _sre.ATOMIC_GROUP:
            choice = _required_chars(av)
        elif op == _sre.BRANCH:  # a match takes one alternative: the union of theirs
            parts = [_required_chars(alternative) for alternative in av[1]]
            choice = None if any(p is None for p in parts) else set().union(*parts)
        else:  # zero-width items, and ANY / NOT_LITERAL / categories, which bound nothing: no candidate
            choice = None
        if choice:
            choices.append(choice)
    return min(choices, key=_commonness, default=None)


def _match_anchors(items: list) -> dict[str, tuple[int, ...]]:
    """For a pattern that is an alternation of sequences: character -> offsets from a match's start at which some
    alternative must consume that character (per alternative, one of the character classes it consumes outside
    any group: the least common one, at the offsets its prefix's possible widths allow)."""
    alternatives = items[0][1][1] if len(items) == 1 and items[0][0] == _sre.BRANCH else [items]
    anchors: dict[str, set[int]] = {}
    for alternative in map(list, alternatives):
        candidates = []
        for k, (op, av) in enumerate(alternative):
            chars = {av} if op == _sre.LITERAL else _class_chars(av) if op == _sre.IN else None
            if chars:
                lo, hi = _sre_parse.SubPattern(_sre_parse.State(), alternative[:k]).getwidth()
                candidates.append((chars, range(lo, hi + 1)))
        if not candidates:
            raise _Refused("an alternative without a character class of its own")
        chars, offsets = min(candidates, key=lambda candidate: _commonness(candidate[0]))
        if len(offsets) > 8:  # a prefix of unbounded width
            raise _Refused("an alternative whose classes can sit anywhere")
        for c in chars:
            anchors.setdefault(chr(c), set()).update(offsets)
    return {c: tuple(sorted(offsets)) for c, offsets in anchors.items()}


def _parse(pattern: re.Pattern) -> list:
    if pattern.flags & _SRE_FLAGS_REFUSED or isinstance(pattern.pattern, bytes):
        raise _Refused(f"flags of {pattern.pattern!r}")
    return list(_sre_parse.parse(pattern.pattern, pattern.flags))


def _one_char_class(pattern: re.Pattern) -> set[int]:
    """The characters of a pattern that is exactly one character or one character class (matches one char)."""
    items = _parse(pattern)
    chars = None
    if len(items) == 1 and items[0][0] == _sre.LITERAL:
        chars = {items[0][1]}
    elif len(items) == 1 and items[0][0] == _sre.IN:
        chars = _class_chars(items[0][1])
    if not chars:
        raise _Refused(f"{pattern.pattern!r} is not one character class")
    return chars


def _char_class(chars: Iterable[int]) -> re.Pattern:
    """A compiled [...] of exactly these code points (as ranges, so large sets stay small)."""
    parts, run = [], []
    for c in sorted(set(chars)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            parts.append(f"\\U{run[0]:08x}-\\U{run[-1]:08x}")
        run = [c]
    if run:
        parts.append(f"\\U{run[0]:08x}-\\U{run[-1]:08x}")
    return re.compile(f"[{''.join(parts)}]")


class _FtfyShortcut:
    """ftfy.fix_text's output where it can be proved cheaply (see the comment above), else None."""

    def __init__(self) -> None:
        from ftfy import badness, chardata, fixes

        if ftfy.__version__ not in _FTFY_VERSIONS:
            raise _Refused(f"ftfy {ftfy.__version__}")
        self._unescape_html = fixes.unescape_html
        # ftfy.fix_encoding's loop body and the config it runs with (see fix_encoding below)
        self._encoding_step = ftfy._fix_encoding_one_step_and_explain
        self._encoding_config = ftfy.TextFixerConfig(explain=False)
        if _required_chars(_parse(chardata.HTML_ENTITY_RE)) != {ord("&")}:  # so a text without '&' is left alone
            raise _Refused("HTML_ENTITY_RE")
        if _required_chars(_parse(fixes.ANSI_RE)) != {0x1B}:
            raise _Refused("ANSI_RE")
        surrogates = _one_char_class(fixes.SURROGATE_RE)
        if surrogates != set(range(0xD800, 0xE000)):
            raise _Refused("SURROGATE_RE")
        multi_char = set(map(ord, _MULTI_CHAR)) | surrogates
        changed = (
            _one_char_class(chardata.C1_CONTROL_RE)
            | {k for k, v in chardata.LIGATURES.items() if v != chr(k)}
            | {k for k, v in chardata.WIDTH_MAP.items() if v != chr(k)}
            | _one_char_class(chardata.SINGLE_QUOTE_RE)
            | _one_char_class(chardata.DOUBLE_QUOTE_RE)
            | set(map(ord, _LINE_BREAKS))
            | set(chardata.CONTROL_CHARS)
        ) - multi_char
        fixers = [getattr(fixes, name) for name in _FTFY_FIXERS]
        self._map: dict[int, str] = {}
        for c in sorted(changed):
            out = chr(c)
            for fixer in fixers:
                out = fixer(out)
            if any(ord(o) in multi_char for o in out):  # the next fixer would read it with its neighbour
                raise _Refused(f"{chr(c)!r} -> {out!r}")
            self._map[c] = out
        by_char = {chr(c): out for c, out in self._map.items()}
        self._replace = lambda match: by_char[match.group()]
        self._multi_char = _char_class(multi_char)
        self._local = _char_class(changed | multi_char)
        self._bad_re = badness.BADNESS_RE
        self._bad_anchors = _match_anchors(_parse(self._bad_re))
        bad_required = set(map(ord, self._bad_anchors))
        self._bad_required = _char_class(bad_required)
        # Text with none of these characters, NFC and on one line, is left unchanged by every step of (a)-(c).
        self.look = _char_class(changed | multi_char | bad_required | {ord("&")})
        self._max_segment = ftfy.TextFixerConfig().max_decode_length

    def is_bad(self, text: str) -> bool:
        """ftfy.badness.is_bad(text), trying a match only where one could start (see the comment above)."""
        bad, anchors = self._bad_re, self._bad_anchors
        for m in self._bad_required.finditer(text):
            q = m.start()
            for offset in anchors[m.group()]:
                if offset <= q and bad.match(text, q - offset):
                    return True
        return False

    def fix_encoding(self, text: str) -> str:
        """ftfy.fix_encoding(text), as fix_and_explain calls it. That repeats ftfy's one step until a step changes
        nothing, and a step changes nothing where the text is ASCII or is_bad fails; asked here first, with the
        cheaper is_bad, most text needs no step, and mojibake skips the last step's full is_bad search."""
        while not text.isascii() and self.is_bad(text):
            fixed = self._encoding_step(text, self._encoding_config).text
            if fixed == text:
                break
            text = fixed
        return text

    def _fix_segment(self, text: str, unescape: bool) -> str | None:
        for _ in range(4):  # ftfy's rounds, (b); more than this is rare enough to leave to ftfy
            before = text
            if unescape and "&" in text:
                text = self._unescape_html(text)
            text = self.fix_encoding(text)  # (c)
            if self._local.search(text):
                if self._multi_char.search(text):
                    return None
                # = text.translate(self._map), which costs a dict lookup per character on non-ASCII text
                text = self._local.sub(self._replace, text)
            if not unicodedata.is_normalized("NFC", text):
                text = unicodedata.normalize("NFC", text)
            if text == before:
                return text
        return None

    def fix(self, text: str) -> str | None:
        """ftfy.fix_text(text), or None where that is not proved."""
        if len(text) > self._max_segment:
            return None
        if "\n" not in text:
            return self._fix_segment(text, "<" not in text)
        lines = text.split("\n")
        segments = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        out, unescape = [], True
        for segment in segments:
            unescape = unescape and "<" not in segment  # (a): off from the first segment with "<" on
            fixed = self._fix_segment(segment, unescape)
            if fixed is None:
                return None
            out.append(fixed)
        return "".join(out)


@functools.cache
def _ftfy_shortcut() -> _FtfyShortcut | None:
    """Built on first use (tens of ms), not at import; None where ftfy's code is not the one argued about."""
    try:
        return _FtfyShortcut()
    except (_Refused, ImportError, AttributeError) as e:
        warnings.warn(f"ftfy shortcut off, every non-ASCII caption pays ftfy.fix_text: {e}", stacklevel=3)
        return None


def _fix_text(text: str) -> str:
    """ftfy.fix_text(text) then html.unescape twice: open_clip's basic_clean without its strip."""
    if not (text.isascii() and not _ASCII_NEEDS_FTFY.search(text)):
        shortcut = _ftfy_shortcut()
        if shortcut is None:
            text = ftfy.fix_text(text)
        elif "\n" in text or shortcut.look.search(text) or not unicodedata.is_normalized("NFC", text):
            fixed = shortcut.fix(text)
            text = ftfy.fix_text(text) if fixed is None else fixed
        # else: ftfy leaves it unchanged
    return html.unescape(html.unescape(text)) if "&" in text else text


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy, html.unescape twice, collapse whitespace, strip, lower-case."""
    if text.isascii() and not _ASCII_NEEDS_FTFY.search(text):
        return " ".join(text.split()).lower()
    # str.split() drops leading/trailing whitespace too, which covers both of open_clip's .strip() calls.
    return " ".join(_fix_text(text).split()).lower()


# Why two names are one text to CLIP, as messages say it (`clean_text`: ftfy's fixes, then lower-case).
READS_ALIKE = "its tokenizer lower-cases and undoes HTML entities, character widths and ligatures"


def same_text(names: Sequence[str]) -> tuple[int, int] | None:
    """(earlier, later) indices of the first two of `names` that CLIP's tokenizer reads as one text (`clean_text`:
    case, white space, HTML entities aside), None if every one differs: two classes of one prompt, the later never
    predicted."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if (earlier := seen.setdefault(clean_text(name), i)) != i:
            return earlier, i
    return None


def _base_vocab() -> list[str]:
    return BYTE_SYMBOLS + [s + "</w>" for s in BYTE_SYMBOLS]


def _training_words(text: str) -> str:
    """A caption's words for BPE training, space-separated, each in training characters with its last one final."""
    words = [w for w in _WORD_RE.findall(clean_text(text)) if w not in (SOT_TOKEN, EOT_TOKEN)]
    chars = " ".join(words).encode("utf-8").decode("latin-1").translate(_TRAIN_CHARS)
    return " ".join(w[:-1] + chr(ord(w[-1]) + _FINAL) for w in chars.split(" ") if w)


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


class _IdStore:
    """str -> a run of token ids: a dict to rows, and per row a start and length into one growing id array."""

    def __init__(self) -> None:
        self.row_of: dict[str, int] = {}
        self.starts = np.zeros(1024, np.int64)
        self.lengths = np.zeros(1024, np.int64)
        self.ids = np.zeros(16384, np.int32)
        self.n_ids = 0

    def add(self, keys: list[str], lengths: np.ndarray, ids: np.ndarray) -> None:
        """New keys (not stored yet), their id counts and all their ids concatenated, in the same order."""
        n_rows, n_keys, n_new = len(self.row_of), len(keys), len(ids)
        if n_rows + n_keys > len(self.starts):
            grow = max(2 * len(self.starts), n_rows + n_keys)
            self.starts, self.lengths = np.resize(self.starts, grow), np.resize(self.lengths, grow)
        if self.n_ids + n_new > len(self.ids):
            self.ids = np.resize(self.ids, max(2 * len(self.ids), self.n_ids + n_new))
        self.lengths[n_rows : n_rows + n_keys] = lengths
        self.starts[n_rows : n_rows + n_keys] = self.n_ids + np.cumsum(lengths) - lengths
        self.ids[self.n_ids : self.n_ids + n_new] = ids
        self.n_ids += n_new
        self.row_of.update(zip(keys, range(n_rows, n_rows + n_keys), strict=True))

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the ids of these rows, concatenated; the running end of each row's ids in that array)."""
        starts, lengths = self.starts[rows], self.lengths[rows]
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        return self.ids[np.repeat(starts - (ends - lengths), lengths) + np.arange(total)], ends


class ClipTokenizer:
    """CLIP BPE tokenizer: `tok(texts, context_length)` -> int32 [N, context_length] ids, pad 0, EOT largest."""

    pad_id: int = 0

    def __init__(self, vocab: Sequence[str], merges: Sequence[tuple[str, str]], *, name: str | None = None) -> None:
        """`vocab` in id order, ending with SOT and EOT; `merges` in priority order. Prefer the classmethods. Without
        a `name`, the merges name it: OpenAI's by their digest, any other list as "bpe-<digest>"."""
        if len(vocab) < MIN_VOCAB_SIZE or tuple(vocab[-2:]) != (SOT_TOKEN, EOT_TOKEN):
            raise ValueError(f"vocab must hold the 512 byte symbols, ..., {SOT_TOKEN}, {EOT_TOKEN} (got {len(vocab)})")
        index = {tok: i for i, tok in enumerate(vocab)}  # a repeated string keeps its last id, as in open_clip
        for a, b in merges:
            if a not in index or b not in index or a + b not in index:
                raise ValueError(f"merge {a!r} {b!r}: its parts and their concatenation must be in vocab")
        digest = hashlib.sha256("\n".join(map(" ".join, merges)).encode("utf-8")).hexdigest()  # as the file's lines
        self.name = name or (OPENAI_VOCAB_NAME if digest == _OPENAI_MERGES_SHA256 else f"bpe-{digest[:12]}")
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = self.vocab_size - 2, self.vocab_size - 1
        self._vocab = list(vocab)
        self._merges = [tuple(m) for m in merges]
        # No Rust-side word cache: our store already BPEs a word once, and filling a cache costs ~15% of a word.
        self._bpe = models.BPE(vocab=index, merges=self._merges, end_of_word_suffix="</w>", cache_capacity=0)
        self._hf = Tokenizer(self._bpe)  # only to BPE many words in one call (see _cache_chunks)
        self._hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        self._whole_words = self._find_whole_words(index, digest)
        self._lock = threading.Lock()  # the chunk cache is shared state
        self._reset_cache()

    def _find_whole_words(self, index: dict[str, int], merges_digest: str) -> dict[str, int]:
        """Word -> id, for the words that are a token with '</w>' and that BPE gives back as that one token: such a
        word needs no BPE (two thirds of English prose's distinct words are one)."""
        symbols = {token[:-4]: i for token, i in index.items() if token.endswith("</w>") and len(token) > 4}
        if merges_digest not in _WHOLE_WORDS_CHECKED and symbols:
            # BPE can stop short of a token that its merges built (a higher-ranked merge takes a symbol first);
            # keep the words it gives back whole, found with one BPE call over them all (~3 us a word).
            keys = list(symbols)
            encoding = self._hf.encode(" ".join(keys), add_special_tokens=False)
            counts = np.bincount(np.array(encoding.word_ids, np.int64), minlength=len(keys))
            first_ids = np.array(encoding.ids, np.int64)[np.cumsum(counts) - counts]
            whole = (counts == 1) & (first_ids == np.fromiter(symbols.values(), np.int64, count=len(keys)))
            symbols = {key: symbols[key] for key in itertools.compress(keys, whole)}
        # Keyed by the word's text, as the store is: the symbols' bytes as UTF-8. No word holds a space (those
        # tokens are left out, so that spaces can join the others), and a token that is not whole UTF-8 (part of
        # a character) is no word of any text: its surrogate escapes keep it from matching one.
        symbols = {key: i for key, i in symbols.items() if _SYMBOLS[0x20] not in key}
        joined = " ".join(symbols).translate(_BYTES_OF_SYMBOLS).encode("latin-1").decode("utf-8", "surrogateescape")
        return dict(zip(joined.split(" "), symbols.values(), strict=True))

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
        return cls(vocab + [SOT_TOKEN, EOT_TOKEN], merges)  # named by the merges' digest

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
        """Learn CLIP-style merges on captions; ids laid out as OpenAI's, so SOT = V-2 and EOT = V-1. Greedy: the
        most frequent pair of adjacent symbols within a word first, ties to the lower token ids, so the same captions
        give the same merges in every run."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (512 byte symbols + SOT + EOT), got {vocab_size}")
        scratch = Tokenizer(models.BPE())
        scratch.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        base = _base_vocab()
        # HF's vocabulary is the alphabet (the 512 base tokens) and a token per merge; ask for more than needed and
        # take the first merges, which is the same as stopping training earlier.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size + 512,
            min_frequency=min_frequency,
            show_progress=False,
            initial_alphabet=[chr(_TRAIN_BASE + i) for i in range(len(base))],
        )
        # One string per caption: its words, split with open_clip's regex as encoding splits them, in training
        # characters, joined by spaces (a word holds none). One string per word cost 60% more CPU on the demo's
        # captions, in the crossings to HF's library.
        scratch.train_from_iterator((_training_words(t) for t in texts), trainer=trainer)
        spelled = {_TRAIN_BASE + i: token for i, token in enumerate(base)}
        vocab = list(base)
        known = set(vocab)
        merges = []
        for merge in json.loads(scratch.to_str())["model"]["merges"]:
            if len(vocab) == vocab_size - 2:
                break
            a, b = (part.translate(spelled) for part in (merge.split(" ") if isinstance(merge, str) else merge))
            merges.append((a, b))
            # Two merges can build the same string ("a bc", "ab c"): keep both merges, one token.
            if a + b not in known:
                vocab.append(a + b)
                known.add(a + b)
        if len(vocab) < vocab_size - 2:
            # A log line, not a Python warning: on the console it is one line without this file's source line.
            log.warning("the training captions give %d BPE tokens at min_frequency=%d, of the %d requested: the other "
                        "ids stay unused (data.tokenizer_vocab_size and model.text.vocab_size %d would fit them; "
                        "data.tokenizer 'train' fits a vocabulary to these captions, 'openai' is OpenAI's BPE, as "
                        "open_clip and the OpenAI checkpoints use)", len(vocab) + 2, min_frequency, vocab_size,
                        len(vocab) + 2)
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
        # One store for chunks and for the words they split into: a string's ids are the same either way (a
        # word, split again on its own, is that one word: findall's first alternative to match at a word's start
        # is the one that matched it, and it takes the whole word), so a word met inside "dog," serves a later
        # chunk "dog", and the other way round. Row 0 is the separator between texts, row 1 the "\n" between
        # chunks (see _cache_chunks), neither with ids; a chunk or word that is exactly a special's string is that
        # id, as in open_clip.
        self._store = _IdStore()
        self._store.add(
            [_SEP, "\n", SOT_TOKEN, EOT_TOKEN], np.array([0, 0, 1, 1]), np.array([self.sot_id, self.eot_id], np.int32)
        )

    def _cache_chunks(self, chunks: list[str]) -> None:
        """BPE-encode new chunks (distinct space-free pieces of cleaned text, none stored) and store them."""
        store = self._store
        # A chunk of ASCII letters only is one word (`[\p{L}]+` takes it whole; no other alternative starts with
        # a letter), which needs no split: most chunks of English text.
        is_word = list(map(operator.and_, map(str.isascii, chunks), map(str.isalpha, chunks)))
        others = list(itertools.compress(chunks, map(operator.not_, is_word)))
        is_ascii = list(map(str.isascii, others))
        groups = []
        for group, splitter in (
            (list(itertools.compress(others, is_ascii)), _ASCII_WORD_SPLIT),
            (list(itertools.compress(others, map(operator.not_, is_ascii))), _WORD_SPLIT),
        ):
            if group:
                # One findall over the group joined by "\n" instead of one per chunk: no word contains
                # whitespace, so these are each chunk's words in turn, with "\n" between chunks.
                groups.append((group, splitter.findall("\n".join(group))))
        words_of_others = itertools.chain.from_iterable(words for _, words in groups)
        new_words = itertools.filterfalse(store.row_of.__contains__, words_of_others)
        new = list(dict.fromkeys(itertools.chain(itertools.compress(chunks, is_word), new_words)))
        if new:
            # A new word that is a token of its own is that token (see _find_whole_words); the others go through
            # the Rust BPE in one call: joined by spaces (a word's bytes never include 0x20, so only the joins are
            # spaces), split back into words by WhitespaceSplit, '</w>' on each word's last symbol; word_ids tells
            # which word each id came from.
            is_whole = list(map(self._whole_words.__contains__, new))
            if True in is_whole:
                whole = list(itertools.compress(new, is_whole))
                ids = np.fromiter(map(self._whole_words.__getitem__, whole), np.int32, count=len(whole))
                store.add(whole, np.ones(len(whole), np.int64), ids)
                new = list(itertools.compress(new, map(operator.not_, is_whole)))
        if new:
            symbols = " ".join(new).encode().decode("latin-1").translate(_SYMBOLS_KEEP_SPACE)
            encoding = self._hf.encode(symbols, add_special_tokens=False)
            counts = np.bincount(np.array(encoding.word_ids, np.int64), minlength=len(new))
            store.add(new, counts, np.array(encoding.ids, np.int32))
        for group, words in groups:
            rows = np.fromiter(map(store.row_of.__getitem__, words), np.int64, count=len(words))
            flat, ends = store.gather(rows)
            chunk_ends = np.concatenate([ends[rows == 1], [len(flat)]])  # ids so far at each chunk's end
            if len(chunk_ends) != len(group):
                raise RuntimeError(f"internal: {len(group)} chunks split into {len(chunk_ends)}")
            lengths = np.diff(chunk_ends, prepend=0)
            keep = np.fromiter(map(operator.not_, map(store.row_of.__contains__, group)), bool, count=len(group))
            if not keep.all():  # chunks just stored as words of other chunks ("'s" and "it's")
                group, flat = list(itertools.compress(group, keep)), flat[np.repeat(keep, lengths)]
                lengths = lengths[keep]
            store.add(group, lengths, flat)

    def _encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """BPE ids of raw texts (no SOT/EOT), as (all ids concatenated, int64 ids per text)."""
        if not texts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        joined = "\n".join(texts)
        if not joined.isascii() or _ASCII_NEEDS_FTFY.search(joined):  # else every text is ASCII needing no ftfy
            # Find the texts that need cleaning without a Python call per text: non-ASCII ones, and those
            # holding one of the ASCII characters ftfy acts on (found in the joined batch).
            special = set(itertools.compress(range(len(texts)), map(operator.not_, map(str.isascii, texts))))
            triggers = [m.start() for m in _ASCII_NEEDS_FTFY.finditer(joined)]
            if triggers:  # which text each position falls in: where the texts start in `joined`
                starts = np.cumsum(np.fromiter(map(len, texts), np.int64, count=len(texts)) + 1)
                special.update(np.searchsorted(starts, triggers, side="right").tolist())
            texts = list(texts)
            for i in special:
                texts[i] = _fix_text(texts[i])
        # The cleaned batch's chunks in one pass: texts joined by " \0 ", lower-cased, split at whitespace.
        # Splitting then joining with single spaces changes no chunk, so this gives each text's chunks of
        # open_clip's " ".join(text.split()).lower(): lower() turns no character into whitespace or back, and
        # its one context rule (final sigma) does not see past whitespace (tests/test_tokenizer.py checks both
        # over all of Unicode). No cleaned text holds "\0" (ftfy deletes it and html.unescape never makes it),
        # so the "\0" chunks are exactly the n - 1 separators (checked below).
        chunks = f" {_SEP} ".join(texts).lower().split()
        with self._lock:
            if len(self._store.row_of) > self.max_cached_chunks or self._store.n_ids > 64 * self.max_cached_chunks:
                self._reset_cache()
            row_of = self._store.row_of
            # -1: not cached yet (.get costs a hit ~7% more than [], and a miss no exception or Python call)
            rows = np.fromiter(map(row_of.get, chunks, itertools.repeat(-1)), np.int64, count=len(chunks))
            new = np.flatnonzero(rows < 0).tolist()
            if new:
                missing = list(map(chunks.__getitem__, new))
                self._cache_chunks(list(dict.fromkeys(missing)))
                rows[new] = np.fromiter(map(row_of.__getitem__, missing), np.int64, count=len(new))
            flat, ends = self._store.gather(rows)
        separators = np.flatnonzero(rows == 0)
        if len(separators) != len(texts) - 1:
            raise RuntimeError(f"internal: {len(texts)} texts but {len(separators)} separators")
        return flat, np.diff(ends[separators], prepend=0, append=len(flat))

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT."""
        return self._encode_batch([text])[0].tolist()

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
        """int32 [N, context_length]: [SOT] + ids + [EOT], cut to context_length keeping EOT last, 0-padded."""
        return self.tokenize_with_lengths(texts, context_length)[0]

    def tokenize_with_lengths(self, texts: str | Sequence[str], context_length: int = 77
                              ) -> tuple[np.ndarray, np.ndarray]:
        """(`self(texts, context_length)`, int64 [N] BPE ids per text before the cut): a text was truncated where
        its length exceeds context_length - 2."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        flat, lengths = self._encode_batch(texts)
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
