"""Host-side audio data for AudioCLIP's audio tower: synthetic audio of a ``shapes`` scene, WAV decoding, and a
labelled audio folder in the ESC-50 layout.

Synthetic audio (`scene_waveform`) gives the procedural ``shapes`` dataset a third modality with the same labels:
every object of a scene is a tone whose attributes map to independent, audible properties.
- colour -> fundamental (`COLOUR_PITCH_HZ`): 8 pitches of a pentatonic set, 2-3 semitones apart, so even a pitch
  estimate off by a semitone names the right colour;
- shape -> timbre (`SHAPE_TIMBRE`): the harmonic recipe of sine, square, triangle, sawtooth, a narrow pulse, and an
  inharmonic FM bell. Every wave is additive synthesis of partials below 0.45 x the sample rate, so nothing aliases
  (a naive square wave at 8 kHz folds its upper harmonics back as inharmonic tones that would blur the timbres);
- texture -> amplitude modulation rate (`TEXTURE_AM_HZ`), size -> amplitude (`SIZE_AMPLITUDE`). The salient
  (large) object is 10 dB above a medium one, so a scene is a mixture dominated by the labelled object, as its
  image is.
Every timbre and every modulation envelope has the same power, so loudness says the size and nothing else. All
randomness (start phases, SNR, noise) comes from the caller's generator: an example's audio is a function of its
(seed, split, index), like its image.

WAV decoding (`read_wav`) reads PCM 8/16/24/32-bit and float 32/64-bit files through scipy, mixes channels to mono,
resamples with a polyphase filter, and fits the length. Every problem with a file is an `AudioError` of one line
that names it: a dataset of thousands of clips is fixed from the message, not from scipy's traceback.

The labelled folder (`read_audio_table`) reads ESC-50's ``meta/esc50.csv`` (``filename,fold,target,category,...``,
audio in ``audio/``) or any CSV with at least ``filename`` and ``category`` columns; `write_shapes_audio_set` writes
shapes scenes in that layout, for tests and demos of a folder evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
import warnings

import numpy as np
from etils import epath

from clip_jax.data.captions import decode_text
from clip_jax.data.images import RefusedFile, read_image_file
from clip_jax.data.shapes import (
    COLOURS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    ShapesConfig,
    ShapesDataset,
    class_index,
    validate_scene,
)
from clip_jax.data.tokenizer import READS_ALIKE, same_text
from clip_jax.errors import ConfigError, one_line
from clip_jax.files import is_remote


class AudioError(ConfigError):
    """An audio file or table that cannot be used, in one line naming the file, the problem and what to do. A
    ConfigError (so a ValueError), so that the command line reports it as one line, like any bad input."""


# Pentatonic pitches (A3 to D5) in COLOURS order: consecutive pitches are 2 or 3 semitones apart.
COLOUR_PITCH_HZ: dict[str, float] = dict(
    zip(COLOURS, (220.00, 261.63, 293.66, 329.63, 392.00, 440.00, 523.25, 587.33), strict=True))
SHAPE_TIMBRE: dict[str, str] = dict(
    zip(SHAPES, ("sine", "square", "triangle", "sawtooth", "pulse", "fm_bell"), strict=True))
# Amplitude modulation rates: solid is steady, the patterned textures flutter at clearly different rates (a few
# cycles per second is heard as tremolo, not as a pitch, and its sidebands stay within a few Hz of each partial).
TEXTURE_AM_HZ: dict[str, float] = dict(zip(TEXTURES, (0.0, 4.0, 8.0, 12.0), strict=True))
# Large is 10.5 dB over medium: even 8 medium objects (a full 3x3 grid) have less power than the salient one.
SIZE_AMPLITUDE: dict[str, float] = dict(zip(SIZES, (0.15, 0.3, 1.0), strict=True))

# Partials stay below this fraction of the sample rate: the guard band below Nyquist leaves room for the AM and
# FM-envelope sidebands and the fades, which widen each partial by a few Hz to a few tens of Hz.
_MAX_PARTIAL = 0.45
_AM_DEPTH = 0.8  # of a patterned texture: the envelope swings between 1 - depth and 1 before its normalisation
# A pulse high for a third of each period: harmonics 1/k like the sawtooth's but with every third one missing (the
# square wave misses every second), so the fundamental stays the strongest partial, 6 dB above the second.
_PULSE_DUTY = 1 / 3
_FM_RATIO, _FM_INDEX, _FM_DECAY_S, _FM_SIDEBANDS = 1.4, 2.0, 0.25, 8  # J_9(2) < 1e-6: no sideband beyond is heard
_FADE_S = 0.01  # raised-cosine fade in and out: a tone starting at full amplitude clicks
# The clean mix is scaled by this before the noise: a scene with several objects still rarely peaks over 1, so
# the final rescaling (which would change the loudness of whole scenes) mostly happens only at low SNR.
_HEADROOM = 0.25
DEFAULT_MAX_AUDIO_BYTES = 64 * 2**20  # 64 MiB: over 6 minutes of 16-bit stereo at 44.1 kHz


def _harmonic_amplitudes(timbre: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(amplitude, phase offset) of harmonics 1..count of a periodic wave as a sum of sines (Fourier series),
    scaled so that the amplitudes' squares sum to 1: every timbre has the power of a unit sine."""
    k = np.arange(1, count + 1, dtype=np.float64)
    odd = k % 2 == 1
    offset = np.zeros(count)
    if timbre == "sine":
        amp = (k == 1).astype(np.float64)
    elif timbre == "square":
        amp = np.where(odd, 1 / k, 0.0)
    elif timbre == "triangle":
        amp = np.where(odd, (-1.0) ** ((k - 1) // 2) / k**2, 0.0)
    elif timbre == "sawtooth":
        amp = (-1.0) ** (k + 1) / k
    elif timbre == "pulse":  # a pulse of width d has cosine harmonics sin(pi k d) / k (zero at multiples of 1/d)
        amp = np.sin(np.pi * k * _PULSE_DUTY) / k
        offset[:] = np.pi / 2
    else:
        raise ValueError(f"unknown harmonic timbre {timbre!r}")
    return amp / np.sqrt(np.sum(amp**2)), offset


def _tone(timbre: str, f0: float, t: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One object's band-limited tone of unit-sine power (peak about 1), with a random start phase."""
    phase, mod_phase = rng.uniform(0, 2 * np.pi, size=2)
    nyquist_guard = _MAX_PARTIAL * sample_rate
    if timbre == "fm_bell":
        # sin(c + I sin m) = sum_k J_k(I) sin(c + k m) for every value of I, so a time-varying index I(t) is the
        # same identity at each instant: FM as a sum of sidebands at f (1 + 1.4 k), each of which can be dropped if
        # it would not fit below the guard band (a plain FM oscillator would alias). Negative frequencies are kept:
        # sin(-x) = -sin(x) is the real reflection of a sideband, not aliasing.
        index = _FM_INDEX * np.exp(-t / _FM_DECAY_S)
        ks = np.arange(-_FM_SIDEBANDS, _FM_SIDEBANDS + 1)
        freqs = f0 * (1 + _FM_RATIO * ks)
        ks = ks[np.abs(freqs) < nyquist_guard]
        freqs = f0 * (1 + _FM_RATIO * ks)
        partials = np.sin(2 * np.pi * freqs[:, None] * t + phase + ks[:, None] * mod_phase)
        import scipy.special  # here, as scipy.io and scipy.signal below: see read_wav

        # Bessel functions are slow (they were 90% of the time): the index decays smoothly (0.4% per ms), so they
        # are evaluated once a millisecond and interpolated, which changes the samples by less than 1e-5.
        coarse = np.unique(np.append(np.arange(0, len(t), max(1, sample_rate // 1000)), len(t) - 1))
        weights = scipy.special.jv(ks[:, None], index[coarse])
        return sum(np.interp(t, t[coarse], w) * p for w, p in zip(weights, partials, strict=True))
    count = max(1, int(nyquist_guard / f0))
    amp, offset = _harmonic_amplitudes(timbre, count)
    k = np.arange(1, count + 1)
    # Harmonic k starts at phase k * phase: a time shift of the whole wave, which keeps its shape.
    return amp @ np.sin(2 * np.pi * f0 * k[:, None] * t + k[:, None] * phase + offset[:, None])


def _am_envelope(rate_hz: float, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tremolo at `rate_hz` with a random phase, of unit mean square (so it changes no object's loudness); 1 for
    a solid texture. The phase is drawn either way, so the generator's stream does not depend on the texture."""
    phase = rng.uniform(0, 2 * np.pi)
    if rate_hz == 0:
        return np.ones_like(t)
    envelope = 1 - _AM_DEPTH / 2 + _AM_DEPTH / 2 * np.cos(2 * np.pi * rate_hz * t + phase)
    # The mean square of a + b cos over whole cycles is a^2 + b^2 / 2; exact up to a partial last cycle.
    a, b = 1 - _AM_DEPTH / 2, _AM_DEPTH / 2
    return envelope / math.sqrt(a * a + b * b / 2)


def _fade(n: int, sample_rate: int) -> np.ndarray:
    ramp = min(n // 2, round(_FADE_S * sample_rate))
    gain = np.ones(n)
    if ramp:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        gain[:ramp], gain[n - ramp:] = rise, rise[::-1]
    return gain


def scene_waveform(scene: Scene, rng: np.random.Generator, sample_rate: int = 8000, seconds: float = 1.0,
                   snr_db: tuple[float, float] = (0.0, 30.0)) -> np.ndarray:
    """The sound of a shapes scene: float32 [round(sample_rate * seconds)], peak at most 1.

    Each object is a tone (pitch from its colour, timbre from its shape, tremolo from its texture, amplitude from
    its size; see the module docstring), the mix fades in and out over 10 ms, then white Gaussian noise is added at
    an SNR (to the mix's power) drawn uniformly from `snr_db`, and the result is divided by its peak only if that
    exceeds 1. Deterministic given `rng`: the draws are, in order, per object (in scene order) its tone's phases
    and its tremolo phase, then the SNR, then the noise, so two calls from equal generators that differ only in
    `snr_db` share the clean mix."""
    validate_scene(scene)
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive number of Hz, got {sample_rate}")
    n = round(sample_rate * seconds)
    if n < 1:
        raise ValueError(f"{seconds} s at {sample_rate} Hz is no sample; give a positive duration")
    low, high = snr_db
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"snr_db must be a finite range (low, high) with low <= high, got {snr_db}")
    t = np.arange(n) / sample_rate
    mix = np.zeros(n)
    for obj in scene.objects:
        tone = _tone(SHAPE_TIMBRE[obj.shape], COLOUR_PITCH_HZ[obj.colour], t, sample_rate, rng)
        mix += SIZE_AMPLITUDE[obj.size] * _am_envelope(TEXTURE_AM_HZ[obj.texture], t, rng) * tone
    mix *= _fade(n, sample_rate) * _HEADROOM
    snr = rng.uniform(low, high)
    noise_std = math.sqrt(np.mean(mix**2) / 10 ** (snr / 10))
    audio = mix + noise_std * rng.standard_normal(n)
    peak = np.max(np.abs(audio))
    if peak > 1:
        audio /= peak
    return audio.astype(np.float32)


# Leading bytes of formats that are often mistaken for (or renamed to) .wav, for a message that says what it is.
_OTHER_FORMATS = ((b"ID3", "an MP3 file"), (b"\xff\xfb", "an MP3 file"), (b"\xff\xf3", "an MP3 file"),
                  (b"fLaC", "a FLAC file"), (b"OggS", "an Ogg file"), (b"\x89PNG", "a PNG image"),
                  (b"\xff\xd8\xff", "a JPEG image"), (b"FORM", "an AIFF file"))  # fmt: skip
# Resampling's up or down factor (the rates over their gcd) beyond which a file is refused: 44,101 Hz to 16 kHz is
# 44,101; a header's rate of 999,999,937 Hz (a prime) is 10^9, a filter too large to allocate.
_MAX_RESAMPLING_FACTOR = 1 << 20
_CONVERT = "convert it to WAV (e.g. ffmpeg -i IN -ac 1 OUT.wav)"


def _read_bytes(path: epath.PathLike, max_bytes: int, heard_seconds: float) -> bytes:
    try:
        # The project's one bounded reader: refuses a FIFO or device without blocking, and a file over the cap
        # without reading it (a wrong path to a disk image costs a message, not the host's memory).
        data = read_image_file(path, max_bytes)
    except RefusedFile as e:
        if e.reason == "file_too_large":
            raise AudioError(f"audio file {path} is over the limit of {max_bytes} bytes; cut it into shorter clips "
                             f"(the model hears the first {heard_seconds:g} s)") from None
        raise AudioError(f"{e}; give the path of a WAV file") from None
    except FileNotFoundError:
        raise AudioError(f"audio file {path} does not exist; check the path (and the audio root)") from None
    except OSError as e:
        raise AudioError(f"cannot read audio file {path}: {e.strerror or e}") from None
    if not data:
        raise AudioError(f"audio file {path} is empty (0 bytes); re-export or remove it")
    return data


def _to_float(samples: np.ndarray, path: epath.PathLike) -> np.ndarray:
    """PCM or float samples as float64 in [-1, 1]. Integer PCM is scaled by its container's full scale: scipy
    returns 24-bit (and any other odd width) samples left-justified in int32, i.e. already multiplied by 2^8, so
    dividing every int32 by 2^31 is right for both 24- and 32-bit files."""
    if samples.dtype == np.uint8:  # 8-bit WAV is unsigned, silence at 128
        return (samples.astype(np.float64) - 128) / 128
    if samples.dtype.kind == "i":
        return samples.astype(np.float64) / 2.0 ** (8 * samples.dtype.itemsize - 1)
    if samples.dtype.kind == "f":
        # Float WAV may exceed full scale (and a broken writer may store NaN): clip rather than pass it to a model.
        return np.clip(np.nan_to_num(samples.astype(np.float64)), -1, 1)
    raise AudioError(f"WAV file {path} holds {samples.dtype} samples, which this reader does not decode; {_CONVERT}"
                     " as 16-bit PCM")


def read_wav(path: epath.PathLike, sample_rate: int, num_samples: int, max_bytes: int = DEFAULT_MAX_AUDIO_BYTES
             ) -> np.ndarray:
    """A WAV file as float32 mono [num_samples] in [-1, 1] at `sample_rate`.

    Reads PCM 8-bit (unsigned), 16-, 24- and 32-bit, and float 32/64-bit files (local or remote through etils).
    Channels are averaged; another sample rate is converted with a polyphase filter (scipy.signal.resample_poly,
    up/down = the rates over their gcd). The first `num_samples` samples are kept; a shorter file is padded with
    zeros at the end. A data chunk cut short on a frame's boundary (an interrupted copy) gives the samples it holds;
    one cut within a frame is refused as truncated.

    Raises AudioError (one line naming the file, the problem and what to do) for a missing, empty or over
    `max_bytes` file, a file that is not a WAV, a truncated or corrupt header, an encoding scipy cannot decode
    (e.g. ADPCM) and a file of no samples."""
    if sample_rate < 1 or num_samples < 1:
        raise ValueError(f"sample_rate and num_samples must be positive, got {sample_rate} and {num_samples}")
    data = _read_bytes(path, max_bytes, num_samples / sample_rate)
    # A header cut short of the WAVE tag is scipy's to report as truncated, not a different format.
    if data[:4] not in (b"RIFF", b"RIFX", b"RF64") or not b"WAVE".startswith(data[8:12]):
        kind = next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)
        what = kind or f"not a WAV file (it starts with {data[:12]!r}, not a RIFF/WAVE header)"
        raise AudioError(f"audio file {path} is {what}; {_CONVERT}")
    # scipy's modules are imported where used, not at the top: they were ~0.4 s of CPU (scipy.signal ~1 s) of the
    # start of every command, including the many that read no audio.
    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():
            # A data chunk shorter than its header says is read as far as it goes, without scipy's warning per file.
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            rate, samples = wavfile.read(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - scipy raises ValueError, EOFError, struct.error, ... on a damaged file
        raise AudioError(f"cannot decode WAV file {path} ({one_line(e)}): its header is truncated or corrupt, or it "
                         f"uses an unsupported encoding; re-export it as PCM WAV") from None
    if samples.size == 0:
        raise AudioError(f"WAV file {path} holds no samples; re-export or remove it")
    if rate < 1:
        raise AudioError(f"WAV file {path} declares a sample rate of {rate} Hz; re-export it with its real rate")
    audio = _to_float(samples, path)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if rate != sample_rate:
        g = math.gcd(rate, sample_rate)
        up, down = sample_rate // g, rate // g
        if max(up, down) > _MAX_RESAMPLING_FACTOR:  # the filter has 20 * max(up, down) taps: 10^9 Hz would be 149 GiB
            raise AudioError(f"WAV file {path} declares a sample rate of {rate} Hz, which cannot be resampled to "
                             f"{sample_rate} Hz in reasonable memory (a corrupt header?); re-export it at a common "
                             "rate (e.g. 44100 or 48000 Hz)")
        # Resample only the input that the first num_samples outputs depend on: output j needs input around
        # j * down / up, within the filter's half-length of 10 * max(up, down) taps at the upsampled rate.
        needed = math.ceil(num_samples * down / up) + math.ceil(10 * max(up, down) / up) + 1
        from scipy import signal

        audio = np.clip(signal.resample_poly(audio[:needed], up, down), -1, 1)  # filter ringing may overshoot
    return fit_length(audio, num_samples)


def fit_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """float32 [num_samples]: the first `num_samples` samples of a 1-D waveform, zeros after a shorter one's end."""
    out = np.zeros(num_samples, np.float32)
    kept = min(num_samples, len(waveform))
    out[:kept] = waveform[:kept]
    return out


def write_wav(path: epath.PathLike, waveform: np.ndarray, sample_rate: int) -> None:
    """Writes float samples in [-1, 1] (clipped) as a 16-bit PCM mono WAV file. Scaled by 2^15, as `read_wav`
    reads it back, so a round trip is exact to half a step (a full step at +1, which becomes 32767)."""
    waveform = np.asarray(waveform, np.float64)
    if waveform.ndim != 1:
        raise ValueError(f"write_wav writes mono: expected a 1-D waveform, got shape {waveform.shape}")
    pcm = np.clip(np.round(np.clip(waveform, -1, 1) * 32768), -32768, 32767).astype(np.int16)
    from scipy.io import wavfile  # see read_wav

    buffer = io.BytesIO()
    wavfile.write(buffer, sample_rate, pcm)
    epath.Path(path).write_bytes(buffer.getvalue())


@dataclasses.dataclass(frozen=True)
class AudioClassificationSet:
    """`labels[i]` is the class index (into `class_names`, the names for prompts) of the audio file `paths[i]`."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _int_cell(row: dict, column: str, csv_path: epath.PathLike, line: int) -> int:
    try:
        return int(row.get(column, ""))
    except ValueError:
        raise AudioError(f"{csv_path}, line {line}: {column} {row.get(column, '')!r} is not an integer; fix the "
                         "row") from None


def _classes(rows: list[tuple[int, dict]], has_target: bool, csv_path: epath.PathLike) -> dict[str, int]:
    """category -> class index. From the target column (which must give each category one index and each index
    one category), else by sorted category name."""
    if not has_target:
        return {c: i for i, c in enumerate(sorted({row["category"] for _, row in rows}))}
    classes: dict[str, int] = {}
    by_target: dict[int, str] = {}
    for line, row in rows:
        category, target = row["category"], _int_cell(row, "target", csv_path, line)
        if target < 0:
            raise AudioError(f"{csv_path}, line {line}: target {target} is negative; class indices start at 0")
        earlier_target, earlier_category = classes.setdefault(category, target), by_target.setdefault(target, category)
        if earlier_target != target or earlier_category != category:
            clash = (f"category {category!r} has target {earlier_target}" if earlier_target != target else
                     f"target {target} is category {earlier_category!r}")
            raise AudioError(f"{csv_path}, line {line}: category {category!r} with target {target} contradicts an "
                             f"earlier row ({clash}); give each category one target")
    return classes


def read_audio_table(csv_path: epath.PathLike, audio_root: str = "", folds: tuple[int, ...] = ()
                     ) -> AudioClassificationSet:
    """A labelled audio set from a CSV in the ESC-50 layout (``meta/esc50.csv``: filename, fold, target, category).

    Columns `filename` and `category` are needed. With a `target` column the class indices are its values (class
    names ordered by target; an index no row uses is named "", e.g. the classes absent from a shapes test split),
    else categories sorted by name. Classes come from the whole table, so every fold of it has the same indices.
    Underscores in a category become spaces in its class name ("chirping_birds" -> "chirping birds"). `folds`
    keeps the rows whose `fold` is one of them (ESC-50's five cross-validation folds are 1-5).

    File names are relative to `audio_root`, by default ESC-50's `audio/` beside a CSV's folder named `meta`, else
    an `audio/` folder beside the CSV, else the CSV's folder. Raises AudioError, in one line, for a missing file or
    column, an empty table or selection, a non-integer fold or target, targets that contradict the categories, and
    audio files that do not exist (the first one and how many)."""
    csv_path = epath.Path(csv_path)
    try:
        text = decode_text(csv_path.read_bytes())
    except FileNotFoundError:
        raise AudioError(f"audio table {csv_path} does not exist; give the path of the CSV (ESC-50: "
                         "meta/esc50.csv)") from None
    except OSError as e:
        raise AudioError(f"cannot read audio table {csv_path}: {e.strerror or e}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    # Stripped: "filename, category" headers (spaces after the commas) are common in hand-made CSVs.
    header = [c.strip() for c in next(reader, None) or ()]
    missing = [c for c in ("filename", "category") if c not in header]
    if missing:
        raise AudioError(f"audio table {csv_path} has no column {', '.join(map(repr, missing))} (header: {header}); "
                         "it needs filename and category, optionally target and fold, as ESC-50's meta/esc50.csv")
    if folds and "fold" not in header:
        raise AudioError(f"audio table {csv_path} has no fold column, so folds {tuple(folds)} cannot be selected; "
                         "add a fold column or select no folds")
    rows: list[tuple[int, dict]] = []  # (the line the row starts on, {column: stripped cell})
    end = reader.line_num
    for cells in reader:
        start, end = end + 1, reader.line_num
        if not cells:  # a blank line
            continue
        row = {column: cell.strip() for column, cell in zip(header, cells, strict=False)}
        if not row.get("filename") or not row.get("category"):
            raise AudioError(f"{csv_path}, line {start}: the row has no filename or no category; fix or remove it")
        rows.append((start, row))
    if not rows:
        raise AudioError(f"audio table {csv_path} has no rows; it lists no audio file")
    classes = _classes(rows, "target" in header, csv_path)
    if len(classes) < 2:  # every sound "right", whatever the model
        raise AudioError(f"audio table {csv_path} names one category, {next(iter(classes))!r}: zero-shot "
                         "classification needs two or more")
    names = [""] * (max(classes.values()) + 1)
    for category, index in classes.items():
        names[index] = category.replace("_", " ")
    categories = list(classes)
    if pair := same_text([category.replace("_", " ") for category in categories]):  # one prompt for two classes
        first, second = (categories[i] for i in pair)
        raise AudioError(f"audio table {csv_path}: the categories {first!r} and {second!r} are one text to CLIP "
                         f"({READS_ALIKE}, and '_' is read as a space): the model could not tell them apart; "
                         "give them distinct names")
    if folds:
        wanted = {int(f) for f in folds}
        fold_of = [_int_cell(row, "fold", csv_path, line) for line, row in rows]
        kept = [r for r, fold in zip(rows, fold_of, strict=True) if fold in wanted]
        if not kept:
            raise AudioError(f"audio table {csv_path} has no row in folds {sorted(wanted)} (its folds: "
                             f"{sorted(set(fold_of))}); choose folds it has")
        rows = kept
    root = epath.Path(audio_root) if audio_root else _default_audio_root(csv_path)
    paths = [row["filename"] if row["filename"].startswith("/") or is_remote(row["filename"])
             else os.fspath(root / row["filename"]) for _, row in rows]
    absent = [p for p in paths if not epath.Path(p).is_file()]
    if absent:
        raise AudioError(f"{len(absent)} of the {len(paths)} audio files of {csv_path} do not exist, the first "
                         f"{absent[0]}; check audio_root ({root})")
    labels = np.array([classes[row["category"]] for _, row in rows], np.int64)
    return AudioClassificationSet(paths=paths, labels=labels, class_names=names)


def _default_audio_root(csv_path: epath.Path) -> epath.Path:
    """Where the files of a table without audio_root are: ESC-50's layout (a CSV in `meta/` beside `audio/`), else
    an `audio/` folder beside the CSV, else the CSV's own folder. The folder above is looked at only when the CSV's
    is named `meta`: an `audio/` there may hold other files of the same names."""
    candidates = [csv_path.parent / "audio"]
    if csv_path.parent.name == "meta":
        candidates.insert(0, csv_path.parent.parent / "audio")
    return next((root for root in candidates if root.is_dir()), csv_path.parent)


def write_shapes_audio_set(out_dir: epath.PathLike, num_examples: int, split: str = "test_held_out", seed: int = 0,
                           sample_rate: int = 8000, seconds: float = 1.0) -> pathlib.Path:
    """Writes the audio of the first `num_examples` scenes of the shapes `split` (at `seed`) in the ESC-50 layout:
    ``out_dir/audio/<i>.wav`` and ``out_dir/meta/esc50.csv``, where category is the salient object's class name
    with "_" for the space ("red_circle"), target its shapes class index, fold 1 + i % 5. Returns the CSV's path.
    Example i's audio is drawn from the generator seeded with [seed, i, 7], apart from the image's streams."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    dataset = ShapesDataset(ShapesConfig(seed=seed), split)
    out = pathlib.Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "meta").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_examples):
        scene = dataset.scene(i)
        waveform = scene_waveform(scene, np.random.default_rng([seed, i, 7]), sample_rate, seconds)
        write_wav(out / "audio" / f"{i}.wav", waveform, sample_rate)
        salient = scene.salient
        rows.append((f"{i}.wav", 1 + i % 5, class_index(salient.colour, salient.shape),
                     f"{salient.colour}_{salient.shape}", False, f"shapes-{split}-{i}", "A"))
    csv_path = out / "meta" / "esc50.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("filename", "fold", "target", "category", "esc10", "src_file", "take"))
        writer.writerows(rows)
    return csv_path
