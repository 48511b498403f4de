"""AudioCLIP: the audio tower's features against independent computations (PyTorch's STFT, the HTK mel formula by
hand), its refusals, and end to end through the command line: a full run, a partial run warm-started from it (the
image and text towers bitwise unchanged, the audio tower new), `encode --audio` against the model applied directly,
and the labelled-folder evaluation. The method's conformance (sharded step, checkpoint, evaluators) is in
test_methods.py, the pairwise loss against a hand-written sum in test_losses.py, the audio FLOPs in test_flops.py."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import clip_jax
from clip_jax import cli
from clip_jax.config import ConfigError, load_config
from clip_jax.data.audio import read_wav, write_shapes_audio_set, write_wav
from clip_jax.methods import get_method
from clip_jax.models.audio import (
    AudioConfig,
    config_problem,
    hz_to_mel,
    log_mel_spectrogram,
    mel_filterbank,
    mel_to_hz,
    power_spectrogram,
)
from clip_jax.models.clip import CLIP
from clip_jax.train.checkpoint import read_state
from clip_jax.train.loop import load_trained

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "audioclip_shapes.py")
SAMPLES, EMBED = 2048, 16


def test_power_spectrogram_equals_torch_stft():
    wave = np.random.default_rng(0).normal(size=(2, 3000)).astype(np.float32)
    got = np.asarray(power_spectrogram(jnp.asarray(wave), 256, 128))
    window = torch.hann_window(256, periodic=True, dtype=torch.float64)
    spec = torch.stft(torch.from_numpy(wave.astype(np.float64)), 256, 128, window=window, center=False,
                      return_complex=True)
    want = (spec.abs() ** 2).numpy().transpose(0, 2, 1)  # torch: [B, freq, frames]
    assert got.shape == want.shape == (2, 1 + (3000 - 256) // 128, 129)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-3)


def test_mel_filters_sit_on_the_htk_scale():
    # HTK's mel scale, by hand: 1000 Hz is ~1000 mel, 700 Hz is 2595 log10(2) mel.
    assert hz_to_mel(1000.0) == pytest.approx(999.99, abs=0.01)
    assert hz_to_mel(700.0) == pytest.approx(781.17, abs=0.01)
    assert mel_to_hz(hz_to_mel(440.0)) == pytest.approx(440.0)
    bank = mel_filterbank(8000, 256, 64)
    assert bank.shape == (129, 64) and bank.min() >= 0 and (bank.max(0) > 0).all()  # no empty band
    centres = mel_to_hz(np.linspace(0, hz_to_mel(4000), 66))[1:-1]
    bin_hz = 8000 / 256
    # Each filter peaks at one of the two FFT bins around its centre frequency (the triangles are asymmetric in Hz)
    assert np.all(np.abs(np.argmax(bank, 0) * bin_hz - centres) < bin_hz)
    # and sums to 1 between consecutive centres, where two triangles overlap
    between = (np.arange(129) * bin_hz > centres[0]) & (np.arange(129) * bin_hz < centres[-1])
    np.testing.assert_allclose(bank[between].sum(1), 1.0, atol=1e-6)


@pytest.mark.parametrize("hz", [220.0, 440.0, 1500.0])
def test_a_pure_tone_is_loudest_in_the_band_around_its_frequency(hz):
    cfg = AudioConfig(width=8, layers=1, heads=1, head_dim=8, mlp_dim=8)
    t = np.arange(cfg.num_samples) / cfg.sample_rate
    features = np.asarray(log_mel_spectrogram(jnp.asarray(0.5 * np.sin(2 * np.pi * hz * t))[None], cfg))[0]
    assert features.shape == (cfg.frames, cfg.n_mels)
    centres = mel_to_hz(np.linspace(0, hz_to_mel(4000), cfg.n_mels + 2))[1:-1]
    loudest = np.argmax(features.mean(0))
    assert abs(centres[loudest] - hz) <= np.max(np.diff(centres)[max(loudest - 1, 0):loudest + 1])
    # the 80 dB floor below the peak, scaled by 1/4 after log10: at most 2 below the peak
    assert features.max() - features.min() <= 2.0 + 1e-6


@pytest.mark.parametrize("fields, words", [
    (dict(num_samples=100), "shorter than one frame"),
    (dict(patch_time=100), "hold no 100x8 patch"),
    (dict(n_mels=0), "'model.audio.n_mels' must be >= 1"),
])
def test_an_audio_tower_that_cannot_be_built_is_one_line(fields, words):
    tower = dict(width=8, layers=1, heads=1, head_dim=8, mlp_dim=8, **fields)
    assert words in config_problem(tower)


@pytest.mark.parametrize("config, overrides, words", [
    ("demo.py", ["--config.method.name=audioclip"], "set model.audio"),
    (CONFIG, ["--config.data.source=captions"], "'captions' has no audio"),
    (CONFIG, ["--config.method.pairs=('audio_text', 'audio_video')"], "must be distinct names among audio_text"),
    (CONFIG, ["--config.model.audio.hop=0"], "'model.audio.hop' must be >= 1"),
    (CONFIG, ["--config.model.audio.typ=x"], "unknown config key 'model.audio.typ'"),
    (CONFIG, ["--config.model.audio.type=esresnext"], "unknown model.audio.type 'esresnext'"),
])
def test_audioclip_config_mistakes_are_one_line(config, overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(str(REPO / "configs" / config), overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("training, pairs, refused", [
    ("partial", ("image_text",), True),  # the image and text towers are frozen, the audio tower is in no pair
    ("partial", ("audio_text",), False),
    ("full", ("image_text",), False),
])
def test_pairs_that_reach_no_tower_that_trains_are_refused(training, pairs, refused):
    config = load_config(f"{CONFIG}:{training}", [f"--config.method.pairs={pairs!r}"])
    if not refused:
        get_method(config).check(None)
        return
    with pytest.raises(ConfigError) as e:
        get_method(config).check(None)
    message = str(e.value)
    assert message.startswith("method.pairs ('image_text',) trains no tower: optimizer.frozen freezes the image and "
                              "text towers") and "audio_text" in message and "\n" not in message


# --- end to end ---------------------------------------------------------------------------------------------------
def tower(name, **extra):
    sizes = dict(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64, **extra)
    return [f"--config.model.{name}.{k}={v}" for k, v in sizes.items()]


TINY = [
    *tower("vision", image_size=32, patch_size=16),
    *tower("text", context_length=16, vocab_size=600),
    *tower("audio", num_samples=SAMPLES, n_mels=32, patch_time=5),
    f"--config.model.embed_dim={EMBED}", "--config.data.tokenizer_vocab_size=600", "--config.batch_size=16",
    "--config.total_steps=4", "--config.optimizer.warmup_steps=1", "--config.checkpoint.every_steps=2",
    "--config.log.every_steps=2", "--config.log.progress_bar=False", "--config.eval.num_examples=32",
    "--config.eval.batch_size=32",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full run from scratch, then a partial run warm-started from it."""
    root = tmp_path_factory.mktemp("audioclip")
    cli.main(["train", "--config", f"{CONFIG}:full", "--workdir", str(root / "full"), *TINY,
              "--config.init_from="])
    cli.main(["train", "--config", f"{CONFIG}:partial", "--workdir", str(root / "partial"), *TINY,
              "--config.total_steps=2", f"--config.init_from={root / 'full'}"])
    return root / "full", root / "partial"


def test_partial_training_keeps_the_image_text_model_and_trains_a_new_audio_tower(runs):
    full, partial = runs
    start = read_state(full, 4)["params"]
    end = read_state(partial, 2)["params"]
    for name in ("visual", "text", "logit_scale"):  # frozen: bitwise the warm start's
        for w, g in zip(jax.tree.leaves(start[name]), jax.tree.leaves(end[name]), strict=True):
            np.testing.assert_array_equal(g, w)
    # the audio tower and its temperatures start anew (not the full run's), then train
    assert not np.allclose(end["audio"]["proj"], start["audio"]["proj"])
    assert float(end["logit_scale_audio_text"]) != pytest.approx(np.log(100.0), abs=0)
    results = json.loads((partial / "results.json").read_text())
    for key in ("audio_zero_shot_top1", "audio_zero_shot_top1_seen", "a2i_r1", "i2a_r1", "zero_shot_top1"):
        assert 0.0 <= results[key] <= 1.0
    metrics = [json.loads(line) for line in (partial / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "loss" in m][-1]
    assert {"loss_audio_text", "loss_audio_image", "logit_scale_audio_image"} <= set(train)
    assert "loss_image_text" not in train  # partial: the two audio pairs only


def test_encode_audio_equals_the_model_and_skips_bad_files(runs, tmp_path, capsys):
    _, partial = runs
    csv = write_shapes_audio_set(tmp_path / "set", 3, seconds=SAMPLES / 8000)
    folder = csv.parent.parent / "audio"
    (folder / "z_not_audio.wav").write_text("this is text, not a WAV file\n")
    # A folder is read as --images reads one: at any depth (a sub-folder was left out), hidden files left out (macOS's
    # ._x.wav was one more undecodable file).
    (folder / "sub").mkdir()
    shutil.copy(folder / "0.wav", folder / "sub" / "3.wav")
    shutil.copy(folder / "1.wav", folder / ".hidden.wav")
    out = tmp_path / "out"
    cli.main(["encode", "--workdir", str(partial), "--audio", str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert "z_not_audio.wav" in captured.err and "1 undecodable" in captured.out
    got = np.load(out / "audio_embeddings.npy")
    kept = (out / "audio_files.txt").read_text().splitlines()
    assert [pathlib.Path(f).relative_to(folder).as_posix() for f in kept] == ["0.wav", "1.wav", "2.wav", "sub/3.wav"]
    trained = load_trained(partial)
    sounds = np.stack([read_wav(f, 8000, SAMPLES) for f in kept])
    want = trained.model.apply({"params": jax.device_get(trained.params)}, sounds, method=CLIP.encode_audio)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    model = clip_jax.load(partial)  # the Python API: files as the command reads them, or waveforms
    np.testing.assert_allclose(model.encode_audio(kept), got, atol=1e-6)
    np.testing.assert_allclose(model.encode_audio(sounds), got, atol=1e-6)
    np.testing.assert_allclose(model.encode_audio([np.concatenate([s, s]) for s in sounds]), got, atol=1e-6)  # cut


def test_encode_audio_without_a_readable_sound_is_one_line_and_writes_nothing(runs, tmp_path, capsys):
    """It printed "encoded 0 sounds -> .../audio_embeddings.npy", wrote no such file, and left an audio_files.txt
    that refused the retry."""
    _, partial = runs
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.wav").write_text("not a WAV file\n")
    (tmp_path / "clips" / "b.mp3").write_bytes(b"ID3")  # not read, as before, but now named: it was left out silently
    (tmp_path / "clips" / "c.WAVE").write_text("not a WAV file either\n")  # a WAV's other suffix: read (and skipped)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli.main(["encode", "--workdir", str(partial), "--audio", str(tmp_path / "clips"), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--audio: no readable WAV file among the 2 files given" in err
    assert f"warning: --audio {tmp_path / 'clips'}: its .mp3 files are not read (WAV only" in err
    assert not out.exists()


def test_an_export_says_which_towers_it_holds_and_what_stays(runs, tmp_path, capsys):
    _, partial = runs
    for fmt, held in (("openai", "the image and text towers"), ("hf-text", "the text tower")):
        cli.main(["export", "--workdir", str(partial), "--format", fmt, "--out", str(tmp_path / fmt)])
        note = capsys.readouterr().err
        assert f"note: the export holds {held}; the audio tower has no OpenAI or Hugging Face layout" in note, note


def test_the_labelled_folder_evaluation_counts_and_skips(runs, tmp_path, capsys):
    _, partial = runs
    csv = write_shapes_audio_set(tmp_path / "set", 10, seconds=SAMPLES / 8000)
    write_wav(csv.parent.parent / "audio" / "3.wav", np.zeros(0, np.float32), 8000)  # no samples: skipped
    entry = f"{{'type': 'zero_shot_audio_folder', 'path': '{csv}', 'templates': ('a picture of a {{}}.',)}}"
    cli.main(["eval", "--workdir", str(partial), f"--config.evals.esc={entry}"])
    out = capsys.readouterr().out
    lines = dict(line.split()[:2] for line in out.splitlines() if line.startswith("esc_"))
    assert float(lines["esc_skipped"]) == 1 and 0.0 <= float(lines["esc_top1"]) <= 1.0
    for wav in (csv.parent.parent / "audio").iterdir():  # none readable: it printed `esc_skipped 10` and exited 0
        wav.write_text("not a WAV file\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", "--workdir", str(partial), f"--config.evals.esc={entry}"])
    assert info.value.code == 2
    assert "evals.esc: none of the 10 audio files of" in capsys.readouterr().err


def test_encode_audio_with_a_model_without_audio_is_one_line(runs, tmp_path, capsys):
    """Found from the workdir's config.json, before the model is loaded."""
    config = json.loads((runs[1] / "config.json").read_text())
    del config["model"]["audio"]
    config["method"] = {"name": "clip", "label_smoothing": 0.0, "multi_positive": True, "reset_logit_scale": False}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit):
        cli.main(["encode", "--workdir", str(tmp_path / "run"), "--audio", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "--audio needs a model with an audio tower" in err and len(err.strip().splitlines()) == 1


def test_export_writes_the_clip_and_says_the_audio_tower_stays(runs, tmp_path, capsys):
    _, partial = runs
    cli.main(["export", "--workdir", str(partial), "--format", "openai", "--out", str(tmp_path / "m.safetensors")])
    assert "the audio tower has no OpenAI or Hugging Face layout" in capsys.readouterr().err
    from safetensors.numpy import load_file

    keys = load_file(tmp_path / "m.safetensors").keys()
    assert "visual.proj" in keys and "text_projection" in keys and not any("audio" in k for k in keys)
