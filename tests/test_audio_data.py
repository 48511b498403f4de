"""Behavioural tests for `clip_jax.data.audio`: the sound of a shapes scene is checked against the Fourier series of
the ideal waves and a measured SNR, the WAV reader against files written byte by byte with the stdlib `wave`
module, and the ESC-50 table reader against hand-written CSVs."""

import csv
import io
import math
import struct
import wave

import numpy as np
import pytest
from scipy.io import wavfile

from clip_jax.data.audio import (
    COLOUR_PITCH_HZ,
    AudioError,
    read_audio_table,
    read_wav,
    scene_waveform,
    write_shapes_audio_set,
    write_wav,
)
from clip_jax.data.shapes import COLOURS, SHAPES, Scene, ShapeObject, ShapesConfig, ShapesDataset, class_index

SR = 8000
CLEAN = (200.0, 200.0)  # an SNR at which the noise is far below float32 resolution


def one_object(colour: str, shape: str, size: str = "large", texture: str = "solid") -> Scene:
    return Scene("grey", (ShapeObject(colour, shape, size, cell=4, texture=texture),))


def spectrum(x: np.ndarray, sample_rate: int = SR) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies, magnitudes) of the Hann-windowed signal, zero-padded 8x so that a partial between two 1-Hz bins
    is measured at its peak (no scalloping loss skewing the ratios of partials)."""
    n = 8 * len(x)
    return np.fft.rfftfreq(n, 1 / sample_rate), np.abs(np.fft.rfft(x * np.hanning(len(x)), n))


def level(freqs: np.ndarray, mags: np.ndarray, hz: float, width: float = 1.5) -> float:
    return float(mags[np.abs(freqs - hz) <= width].max())


def render(scene: Scene, seed: int = 0, **kwargs) -> np.ndarray:
    return scene_waveform(scene, np.random.default_rng(seed), **kwargs)


# ---------------------------------------------------------------------------------------------- synthetic audio


def test_pitches_are_the_pentatonic_set_at_least_two_semitones_apart():
    assert list(COLOUR_PITCH_HZ) == list(COLOURS)
    assert list(COLOUR_PITCH_HZ.values()) == [220.00, 261.63, 293.66, 329.63, 392.00, 440.00, 523.25, 587.33]
    pitches = np.array(list(COLOUR_PITCH_HZ.values()))
    assert np.all(12 * np.log2(pitches[1:] / pitches[:-1]) > 1.99)


@pytest.mark.parametrize("shape", SHAPES)
def test_strongest_frequency_is_the_colour_pitch(shape):
    for colour in COLOURS:
        x = render(one_object(colour, shape), snr_db=CLEAN)
        peak_hz = np.argmax(np.abs(np.fft.rfft(x))) * SR / len(x)  # 1-Hz bins
        assert abs(peak_hz - COLOUR_PITCH_HZ[colour]) <= 1.0, (colour, shape, peak_hz)


@pytest.mark.parametrize("colour", ["red", "yellow", "cyan"])
def test_timbres_follow_the_fourier_series_of_the_ideal_waves(colour):
    f = COLOUR_PITCH_HZ[colour]

    def ratios(shape):
        freqs, mags = spectrum(render(one_object(colour, shape), snr_db=CLEAN))
        fundamental = level(freqs, mags, f)
        return {h: level(freqs, mags, h * f) / fundamental for h in (0.4, 2, 2.4, 3, 4)}

    sine, square, triangle, saw, pulse, bell = map(ratios, SHAPES)
    assert max(sine[2], sine[3]) < 1e-3  # a pure tone
    assert square[2] < 0.01 and square[3] == pytest.approx(1 / 3, abs=0.03)  # odd harmonics, 1/k
    assert triangle[2] < 0.01 and triangle[3] == pytest.approx(1 / 9, abs=0.015)  # odd harmonics, 1/k^2
    assert saw[2] == pytest.approx(1 / 2, abs=0.04) and saw[3] == pytest.approx(1 / 3, abs=0.03)  # all, 1/k
    # Pulse of duty 1/3: |sin(pi k / 3)| / k, every third harmonic missing.
    assert pulse[2] == pytest.approx(1 / 2, abs=0.04) and pulse[3] < 0.01 and pulse[4] == pytest.approx(1 / 4, abs=0.03)
    # FM with modulator 1.4 f: sidebands at f +- 1.4 f k (2.4 f, |-0.4 f|), none at the harmonics 2f and 3f.
    assert bell[2.4] > 0.05 and bell[0.4] > 0.05 and max(bell[2], bell[3]) < 0.01


@pytest.mark.parametrize("colour", ["white", "cyan"])
def test_square_and_pulse_waves_do_not_alias(colour):
    # A naive square wave at 587 Hz folds its 7th harmonic (4111 Hz) back to 3889 Hz, between two harmonics.
    f = COLOUR_PITCH_HZ[colour]
    for shape in ("square", "star", "cross"):
        freqs, mags = spectrum(render(one_object(colour, shape), snr_db=CLEAN))
        power = mags**2
        near_harmonic = np.abs(freqs / f - np.round(freqs / f)) * f <= 6
        assert power[~near_harmonic].sum() < 1e-5 * power.sum(), (colour, shape)


@pytest.mark.parametrize(("texture", "rate"), [("striped", 4), ("dotted", 8), ("checkered", 12)])
def test_texture_is_a_tremolo_rate(texture, rate):
    f = COLOUR_PITCH_HZ["green"]
    freqs, mags = spectrum(render(one_object("green", "circle", texture=texture), snr_db=CLEAN))
    carrier = level(freqs, mags, f, 0.5)
    assert level(freqs, mags, f + rate, 0.5) > 0.15 * carrier and level(freqs, mags, f - rate, 0.5) > 0.15 * carrier
    other = [r for r in (4, 8, 12) if r != rate]
    assert all(level(freqs, mags, f + r, 0.5) < 0.05 * carrier for r in other)
    freqs, mags = spectrum(render(one_object("green", "circle", texture="solid"), snr_db=CLEAN))
    assert level(freqs, mags, f + rate, 0.5) < 0.01 * level(freqs, mags, f, 0.5)


@pytest.mark.parametrize("shape", SHAPES)
def test_size_sets_loudness_and_nothing_else_does(shape):
    # A scene needs its one large object, so an object of another size is heard as the difference between a scene
    # with it and the same scene (same generator, drawn first) without it.
    salient = ShapeObject("red", "circle", "large", 0)

    def rms(obj: ShapeObject) -> float:
        x = render(Scene("grey", (obj,)), snr_db=CLEAN) if obj.size == "large" else (
            render(Scene("grey", (salient, obj)), snr_db=CLEAN) - render(Scene("grey", (salient,)), snr_db=CLEAN))
        return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))

    large = rms(ShapeObject("blue", shape, "large", 4))
    # The amplitudes of the design: large 1, medium 0.3, small 0.15 (the salient object 10.5 dB over a medium one).
    assert rms(ShapeObject("blue", shape, "medium", 4)) == pytest.approx(0.3 * large, rel=0.05)
    assert rms(ShapeObject("blue", shape, "small", 4)) == pytest.approx(0.15 * large, rel=0.05)
    for texture in ("striped", "dotted", "checkered"):
        assert rms(ShapeObject("blue", shape, "large", 4, texture=texture)) == pytest.approx(large, rel=0.1)
    assert large == pytest.approx(rms(ShapeObject("blue", "circle", "large", 4)), rel=0.1)  # every timbre alike


def test_salient_object_dominates_a_mixture():
    objects = (ShapeObject("red", "square", "medium", 0), ShapeObject("purple", "circle", "large", 4),
               ShapeObject("cyan", "star", "small", 8, texture="dotted"), ShapeObject("green", "cross", "medium", 2))
    x = render(Scene("slate", objects), snr_db=CLEAN)
    freqs, mags = spectrum(x)
    assert abs(freqs[np.argmax(mags)] - COLOUR_PITCH_HZ["purple"]) <= 1
    # Every object is heard: each one's fundamental stands well above the floor between the partials.
    floor = np.median(mags)
    assert all(level(freqs, mags, COLOUR_PITCH_HZ[c]) > 100 * floor for c in ("red", "cyan", "green"))


@pytest.mark.parametrize("seed", range(4))
def test_measured_snr_matches_the_requested_one(seed):
    scene = ShapesDataset(ShapesConfig(seed=seed), "train").scene(seed)
    clean = render(scene, seed, snr_db=CLEAN).astype(np.float64)
    noisy = render(scene, seed, snr_db=(10.0, 10.0)).astype(np.float64)
    # noisy = gain * (clean + noise), gain < 1 only if the noisy mix was rescaled to peak 1: the projection on the
    # clean mix finds the gain (white noise is nearly orthogonal to it), the residual is the noise.
    gain = noisy @ clean / (clean @ clean)
    noise = noisy - gain * clean
    snr = 10 * np.log10(np.sum((gain * clean) ** 2) / np.sum(noise**2))
    assert snr == pytest.approx(10.0, abs=0.3)
    flat = np.abs(np.fft.rfft(noise)) ** 2  # white: as much power in the top half of the band as in the bottom
    assert flat[len(flat) // 2:].sum() == pytest.approx(flat[: len(flat) // 2].sum(), rel=0.15)


def test_snr_is_drawn_from_the_range():
    scene = one_object("orange", "triangle")
    snrs = []
    for seed in range(12):
        clean = render(scene, seed, snr_db=CLEAN).astype(np.float64)
        noisy = render(scene, seed, snr_db=(5.0, 25.0)).astype(np.float64)
        gain = noisy @ clean / (clean @ clean)
        snrs.append(10 * np.log10(np.sum((gain * clean) ** 2) / np.sum((noisy - gain * clean) ** 2)))
    assert 4.5 < min(snrs) and max(snrs) < 25.5 and np.ptp(snrs) > 8


def test_waveform_is_deterministic_bounded_and_sized():
    dataset = ShapesDataset(ShapesConfig(max_objects=9), "train")
    for i in range(20):
        scene = dataset.scene(i)
        x = scene_waveform(scene, np.random.default_rng([0, i, 7]), snr_db=(0.0, 0.0))  # loudest noise
        assert x.dtype == np.float32 and x.shape == (SR,)
        assert np.abs(x).max() <= 1.0
        np.testing.assert_array_equal(x, scene_waveform(scene, np.random.default_rng([0, i, 7]), snr_db=(0.0, 0.0)))
    other = scene_waveform(dataset.scene(0), np.random.default_rng([0, 1, 7]), snr_db=(0.0, 0.0))
    assert not np.array_equal(other, scene_waveform(dataset.scene(0), np.random.default_rng([0, 0, 7]),
                                                    snr_db=(0.0, 0.0)))
    assert render(one_object("red", "cross"), sample_rate=16000, seconds=0.5).shape == (8000,)
    assert render(one_object("red", "cross"), seconds=0.3).shape == (2400,)
    x = render(one_object("red", "cross"), snr_db=CLEAN)
    assert abs(x[0]) < 1e-3 and abs(x[-1]) < 1e-3  # faded in and out: no click


def test_bad_scene_arguments_raise():
    with pytest.raises(ValueError, match="snr_db"):
        render(one_object("red", "circle"), snr_db=(20.0, 10.0))
    with pytest.raises(ValueError, match="positive duration"):
        render(one_object("red", "circle"), seconds=0.0)
    with pytest.raises(ValueError, match="large"):  # no salient object
        render(Scene("grey", (ShapeObject("red", "circle", "small", 0),)))


# ---------------------------------------------------------------------------------------------- WAV decoding


def write_pcm(path, frames: bytes, sampwidth: int, rate: int = SR, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(sampwidth)
        f.setframerate(rate)
        f.writeframes(frames)


def test_16_bit_round_trip(tmp_path):
    x = np.random.default_rng(0).uniform(-1, 1, 1000).astype(np.float32)
    x[:3] = (-1.0, 1.0, 0.0)
    write_wav(tmp_path / "a.wav", x, SR)
    with wave.open(str(tmp_path / "a.wav")) as f:  # what the stdlib sees: 16-bit mono PCM at the rate
        assert (f.getsampwidth(), f.getnchannels(), f.getframerate(), f.getnframes()) == (2, 1, SR, 1000)
    y = read_wav(tmp_path / "a.wav", SR, 1000)
    assert y.dtype == np.float32 and y.shape == (1000,)
    assert np.abs(y - x).max() <= 1 / 32768


def test_8_bit_unsigned(tmp_path):
    write_pcm(tmp_path / "a.wav", bytes([128, 0, 255, 192, 64]), 1)
    np.testing.assert_allclose(read_wav(tmp_path / "a.wav", SR, 5), [0, -1, 127 / 128, 0.5, -0.5], atol=1e-7)


def test_24_bit(tmp_path):
    values = [0, 1, -1, 2**23 - 1, -(2**23), 4194304, -1234567]
    write_pcm(tmp_path / "a.wav", b"".join(v.to_bytes(3, "little", signed=True) for v in values), 3)
    np.testing.assert_allclose(read_wav(tmp_path / "a.wav", SR, len(values)), np.array(values) / 2**23, atol=1e-6)


def test_32_bit_int_and_float(tmp_path):
    ints = np.array([0, 2**30, -(2**31), 2**31 - 1, -123456789], np.int32)
    wavfile.write(tmp_path / "i.wav", SR, ints)
    np.testing.assert_allclose(read_wav(tmp_path / "i.wav", SR, 5), ints / 2**31, atol=1e-6)
    for dtype in (np.float32, np.float64):
        floats = np.array([0.0, 0.25, -0.75, 1.0, -1.0, 1.5], dtype)
        wavfile.write(tmp_path / "f.wav", SR, floats)
        np.testing.assert_allclose(read_wav(tmp_path / "f.wav", SR, 6), [0, 0.25, -0.75, 1, -1, 1], atol=1e-7)


def test_stereo_is_averaged(tmp_path):
    left, right = np.array([1000, -2000, 30000, 0], np.int16), np.array([3000, 2000, -10000, -32768], np.int16)
    write_pcm(tmp_path / "a.wav", np.stack([left, right], axis=1).astype("<i2").tobytes(), 2, channels=2)
    expected = (left.astype(np.float64) + right) / 2 / 32768
    np.testing.assert_allclose(read_wav(tmp_path / "a.wav", SR, 4), expected, atol=1e-7)


@pytest.mark.parametrize("rate", [16000, 22050, 44100])
def test_other_sample_rates_are_resampled(tmp_path, rate):
    t = np.arange(rate) / rate
    write_wav(tmp_path / "a.wav", 0.5 * np.sin(2 * np.pi * 1000 * t), rate)
    y = read_wav(tmp_path / "a.wav", SR, SR)
    assert y.shape == (SR,)
    freqs, mags = spectrum(y)
    assert abs(freqs[np.argmax(mags)] - 1000) <= 1
    assert np.sqrt(np.mean(y[100:-100] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)  # amplitude kept
    # Reading fewer samples resamples only the start, with the same result.
    np.testing.assert_allclose(read_wav(tmp_path / "a.wav", SR, 1000), y[:1000], atol=1e-6)


def test_padding_and_cropping(tmp_path):
    x = np.linspace(-0.5, 0.5, 100)
    write_wav(tmp_path / "a.wav", x, SR)
    padded = read_wav(tmp_path / "a.wav", SR, 300)
    np.testing.assert_allclose(padded[:100], x, atol=1 / 32768)
    assert np.all(padded[100:] == 0)
    np.testing.assert_allclose(read_wav(tmp_path / "a.wav", SR, 40), x[:40], atol=1 / 32768)


def riff(fmt_chunk: bytes, data: bytes) -> bytes:
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(body) + len(data)) + body + data


def good_wav(num: int = 50) -> bytes:
    buffer = io.BytesIO()
    wavfile.write(buffer, SR, np.zeros(num, np.int16))
    return buffer.getvalue()


BAD_FILES = {
    "text": (b"filename,category\n1.wav,dog\n", "not a WAV"),
    "png": (b"\x89PNG\r\n\x1a\n" + bytes(64), "PNG image"),
    "mp3": (b"ID3\x03\x00" + bytes(64), "MP3"),
    "empty": (b"", "empty"),
    "cut_in_riff_header": (good_wav()[:10], "truncated or corrupt"),
    "cut_in_fmt_chunk": (good_wav()[:30], "truncated or corrupt"),
    "no_samples": (good_wav()[:44], "no samples"),
    "adpcm": (riff(struct.pack("<HHIIHH", 2, 1, SR, SR, 1, 4), bytes(40)), "unsupported encoding"),
    "garbage_fmt": (b"RIFF" + struct.pack("<I", 100) + b"WAVEfmt " + struct.pack("<I", 3) + b"\x01\x02\x03" + bytes(8),
                    "truncated or corrupt"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_raise_one_line_audio_errors(tmp_path, case):
    content, problem = BAD_FILES[case]
    path = tmp_path / f"{case}.wav"
    path.write_bytes(content)
    with pytest.raises(AudioError) as info:
        read_wav(path, SR, 100)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and problem in message, message
    # No scipy exception chained to it (raised `from None` where one was caught): no traceback but the line.
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    assert isinstance(info.value, ValueError)


def test_missing_oversized_and_non_files_raise_one_line_audio_errors(tmp_path):
    (tmp_path / "big.wav").write_bytes(good_wav(1000))
    cases = [(tmp_path / "missing.wav", {}, "does not exist"), (tmp_path / "big.wav", {"max_bytes": 1000}, "limit"),
             (tmp_path, {}, "directory")]
    for path, kwargs, problem in cases:
        with pytest.raises(AudioError) as info:
            read_wav(path, SR, 100, **kwargs)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and problem in message, message
    assert read_wav(tmp_path / "big.wav", SR, 100, max_bytes=2044).shape == (100,)  # exactly at the limit


def test_a_sample_rate_beyond_resampling_is_one_line(tmp_path):
    """A header's rate of 999,999,937 Hz (a prime) asked scipy for a filter of 149 GiB: a MemoryError took the
    command down. An odd rate within reason (44,101 Hz, a prime too) is resampled."""
    buffer = io.BytesIO()
    wavfile.write(buffer, 999_999_937, np.zeros(50, np.int16))
    (tmp_path / "absurd.wav").write_bytes(buffer.getvalue())
    with pytest.raises(AudioError, match="declares a sample rate of 999999937 Hz, which cannot be resampled"):
        read_wav(tmp_path / "absurd.wav", SR, 100)
    t = np.arange(44_101) / 44_101
    write_wav(tmp_path / "odd.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 44_101)
    want = 0.5 * np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
    np.testing.assert_allclose(read_wav(tmp_path / "odd.wav", SR, SR)[100:-100], want[100:-100], atol=2e-3)


# ---------------------------------------------------------------------------------------------- labelled folder

ESC_HEADER = ("filename", "fold", "target", "category", "esc10", "src_file", "take")


def write_table(path, header, rows, files_in=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    if files_in is not None:
        files_in.mkdir(parents=True, exist_ok=True)
        for row in rows:
            write_wav(files_in / row[0], np.zeros(10), SR)


def esc_rows():
    return [("1-1-A-0.wav", 1, 0, "dog", "True", "1", "A"), ("1-2-A-40.wav", 1, 2, "chirping_birds", "False", "2", "A"),
            ("2-3-A-1.wav", 2, 1, "rooster", "True", "3", "A"), ("3-4-A-0.wav", 3, 0, "dog", "True", "4", "A"),
            ("3-5-B-40.wav", 3, 2, "chirping_birds", "False", "5", "B")]  # fmt: skip


def test_esc50_layout_with_targets_and_folds(tmp_path):
    csv_path = tmp_path / "ESC-50" / "meta" / "esc50.csv"
    write_table(csv_path, ESC_HEADER, esc_rows(), files_in=tmp_path / "ESC-50" / "audio")
    table = read_audio_table(csv_path)  # audio root: meta/../audio
    assert table.class_names == ["dog", "rooster", "chirping birds"]  # ordered by target, underscores as spaces
    assert table.labels.tolist() == [0, 2, 1, 0, 2] and table.labels.dtype.kind == "i"
    assert table.paths[0] == str(tmp_path / "ESC-50" / "audio" / "1-1-A-0.wav") and len(table) == 5
    fold_3 = read_audio_table(csv_path, folds=(3,))
    assert [p.rsplit("/", 1)[1] for p in fold_3.paths] == ["3-4-A-0.wav", "3-5-B-40.wav"]
    assert fold_3.labels.tolist() == [0, 2] and fold_3.class_names == table.class_names  # classes of the whole table
    assert read_audio_table(csv_path, folds=(1, 2)).labels.tolist() == [0, 2, 1]


def test_table_without_target_or_fold(tmp_path):
    rows = [("a.wav", "rooster"), ("b.wav", "chirping_birds"), ("c.wav", "dog"), ("d.wav", "rooster")]
    write_table(tmp_path / "set" / "labels.csv", ("filename", "category"), rows, files_in=tmp_path / "set")
    table = read_audio_table(tmp_path / "set" / "labels.csv")  # no audio/ beside the folder: the CSV's own folder
    assert table.class_names == ["chirping birds", "dog", "rooster"]  # sorted by name
    assert table.labels.tolist() == [2, 0, 1, 2]
    assert table.paths[1] == str(tmp_path / "set" / "b.wav")
    with pytest.raises(AudioError, match="no fold column"):
        read_audio_table(tmp_path / "set" / "labels.csv", folds=(1,))


def test_an_audio_folder_beside_the_csv_is_found(tmp_path):
    rows = [("a.wav", "rooster"), ("b.wav", "dog")]
    write_table(tmp_path / "esc" / "labels.csv", ("filename", "category"), rows, files_in=tmp_path / "esc" / "audio")
    table = read_audio_table(tmp_path / "esc" / "labels.csv")  # the layout users read "its sibling audio/" as
    assert table.paths == [str(tmp_path / "esc" / "audio" / "a.wav"), str(tmp_path / "esc" / "audio" / "b.wav")]


def test_an_audio_folder_above_is_read_for_a_csv_in_meta_only(tmp_path):
    """ESC-50's meta/../audio: another folder's CSV read an unrelated audio/ above it, files of the same names."""
    rows = [("a.wav", "rooster"), ("b.wav", "dog")]
    write_table(tmp_path / "proj" / "eval" / "labels.csv", ("filename", "category"), rows,
                files_in=tmp_path / "proj" / "eval")
    (tmp_path / "proj" / "audio").mkdir()
    write_wav(tmp_path / "proj" / "audio" / "a.wav", np.ones(10) / 2, SR)
    table = read_audio_table(tmp_path / "proj" / "eval" / "labels.csv")
    assert table.paths == [str(tmp_path / "proj" / "eval" / "a.wav"), str(tmp_path / "proj" / "eval" / "b.wav")]


def test_categories_that_are_one_text_are_refused(tmp_path):
    """"Dog" and "dog" (or "dog_bark" and "dog bark") are one prompt: the later class was never predicted."""
    rows = [("a.wav", "Dog"), ("b.wav", "cat"), ("c.wav", "dog")]
    write_table(tmp_path / "t.csv", ("filename", "category"), rows, files_in=tmp_path)
    assert "the categories 'Dog' and 'dog' are one text to CLIP" in audio_error(tmp_path / "t.csv")
    rows = [("a.wav", "dog_bark"), ("b.wav", "cat"), ("c.wav", "dog  bark")]
    write_table(tmp_path / "u.csv", ("filename", "category"), rows, files_in=tmp_path)
    assert "'dog  bark' and 'dog_bark'" in audio_error(tmp_path / "u.csv")  # by sorted name, the class order


def test_explicit_audio_root_and_target_gaps(tmp_path):
    rows = [("a.wav", "5", "cat"), ("b.wav", "2", "dog")]
    write_table(tmp_path / "t.csv", ("filename", "target", "category"), rows, files_in=tmp_path / "clips")
    table = read_audio_table(tmp_path / "t.csv", audio_root=str(tmp_path / "clips"))
    assert table.labels.tolist() == [5, 2]
    assert table.class_names == ["", "", "dog", "", "", "cat"]  # indices no row uses have no name


def audio_error(csv_path, **kwargs) -> str:
    with pytest.raises(AudioError) as info:
        read_audio_table(csv_path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(csv_path) in message, message
    return message


def test_table_errors_are_one_line(tmp_path):
    rows = esc_rows()
    write_table(tmp_path / "meta" / "esc50.csv", ESC_HEADER, rows, files_in=tmp_path / "audio")
    csv_path = tmp_path / "meta" / "esc50.csv"
    (tmp_path / "audio" / rows[1][0]).unlink()
    (tmp_path / "audio" / rows[3][0]).unlink()
    message = audio_error(csv_path)
    assert "2 of the 5" in message and rows[1][0] in message
    assert "1 of the 2" in audio_error(csv_path, folds=(3,))
    assert "no row in folds [4]" in audio_error(csv_path, folds=(4,))

    def table(name, header, body):
        write_table(tmp_path / name, header, body)
        return tmp_path / name

    assert "'category'" in audio_error(table("no_category.csv", ("filename", "label"), [("a.wav", "dog")]))
    assert "'filename'" in audio_error(table("no_filename.csv", ("file", "category"), [("a.wav", "dog")]))
    assert "no rows" in audio_error(table("empty.csv", ESC_HEADER, []))
    assert "no column" in audio_error(table("nothing.csv", (), []))
    contradiction = [("a.wav", 0, "dog"), ("b.wav", 0, "cat")]
    assert "category 'cat' with target 0 contradicts an earlier row (target 0 is category 'dog'); give each category " \
           "one target" in audio_error(table("two_names.csv", ("filename", "target", "category"), contradiction))
    contradiction = [("a.wav", 0, "dog"), ("b.wav", 1, "dog")]  # its message named "category None"
    assert "category 'dog' with target 1 contradicts an earlier row (category 'dog' has target 0)" in audio_error(
        table("two_targets.csv", ("filename", "target", "category"), contradiction))
    # one category: every sound right whatever the model (it scored top-1 1.0)
    assert "names one category, 'dog': zero-shot classification needs two or more" in audio_error(
        table("one_class.csv", ("filename", "category"), [("a.wav", "dog"), ("b.wav", "dog")]))
    assert "not an integer" in audio_error(table("bad_target.csv", ("filename", "target", "category"),
                                                 [("a.wav", "x", "dog")]))
    assert "no filename" in audio_error(table("blank.csv", ("filename", "category"), [("", "dog")]))
    assert "does not exist" in audio_error(tmp_path / "nope.csv")


def test_shapes_audio_set_round_trip(tmp_path):
    csv_path = write_shapes_audio_set(tmp_path / "shapes_audio", 12, split="test_held_out", seed=3)
    assert csv_path == tmp_path / "shapes_audio" / "meta" / "esc50.csv"
    with open(csv_path, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header) == ESC_HEADER
    table = read_audio_table(csv_path)
    dataset = ShapesDataset(ShapesConfig(seed=3), "test_held_out")
    scenes = [dataset.scene(i) for i in range(12)]
    assert table.labels.tolist() == [class_index(s.salient.colour, s.salient.shape) for s in scenes]
    assert set(table.labels.tolist()) <= set(dataset.held_out_classes())
    assert [table.class_names[label] for label in table.labels] == [dataset.class_names()[i] for i in table.labels]
    assert [int(p.rsplit("/", 1)[1].removesuffix(".wav")) for p in read_audio_table(csv_path, folds=(2,)).paths] == [
        1, 6, 11]
    expected = scene_waveform(scenes[4], np.random.default_rng([3, 4, 7]))
    np.testing.assert_allclose(read_wav(table.paths[4], SR, SR), expected, atol=1 / 32768)
    assert math.isclose(float(np.abs(expected).max()), float(np.abs(read_wav(table.paths[4], SR, SR)).max()),
                        abs_tol=1 / 32768)
