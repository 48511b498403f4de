"""End to end through the `clip-jax` command line, in-process, on a tiny model: a training run and everything it
writes; a run interrupted after its mid-run checkpoint and relaunched ends bit-identical to an uninterrupted one;
`eval` and `encode` on the trained workdir, and the same from Python (`clip_jax.load`); configuration mistakes stop
the command with a one-line message."""

import json
import logging
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax import cli
from clip_jax.data.shapes import ShapesConfig, ShapesDataset
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.errors import ConfigError
from clip_jax.models.clip import CLIP
from clip_jax.train.checkpoint import read_state as saved_state
from clip_jax.train.loop import load_trained
from clip_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")
STEPS, HALF, LOG_EVERY, WARMUP, LR = 4, 2, 2, 2, 1e-3  # configs/demo.py has optimizer.lr = 1e-3
VOCAB, EMBED, IMAGE, CONTEXT = 600, 16, 32, 16


def tower(name):
    sizes = dict(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64)
    return [f"--config.model.{name}.{k}={v}" for k, v in sizes.items()]


TINY = [
    *tower("vision"),
    *tower("text"),
    f"--config.model.vision.image_size={IMAGE}",
    "--config.model.vision.patch_size=16",
    f"--config.model.text.context_length={CONTEXT}",
    f"--config.model.text.vocab_size={VOCAB}",
    f"--config.model.embed_dim={EMBED}",
    f"--config.data.tokenizer_vocab_size={VOCAB}",
    "--config.batch_size=16",
    f"--config.total_steps={STEPS}",
    f"--config.optimizer.warmup_steps={WARMUP}",
    f"--config.checkpoint.every_steps={HALF}",
    f"--config.log.every_steps={LOG_EVERY}",
    "--config.log.progress_bar=False",
    "--config.eval.every_steps=0",
    "--config.eval.num_examples=64",
    "--config.eval.batch_size=64",
]
RESULT_KEYS = {"zero_shot_top1", "zero_shot_top1_seen", "i2t_r1", "t2i_r1"}


def train_args(workdir, *extra):
    return ["train", "--config", DEMO, "--workdir", str(workdir), *TINY, *extra]


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_state(want, got) -> None:
    """Two train states (host arrays) with the same structure and bitwise equal leaves; a difference names its path."""
    want_leaves, want_def = jax.tree.flatten_with_path(want)
    got_leaves, got_def = jax.tree.flatten_with_path(got)
    assert want_def == got_def
    for (path, w), (_, g) in zip(want_leaves, got_leaves, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("e2e") / "run"
    cli.main(train_args(workdir))
    return workdir


@pytest.fixture(scope="module")
def resumed(trained, tmp_path_factory):
    """The same run killed right after its step-HALF checkpoint was committed, then relaunched (`train --workdir`,
    no --config: the run's own config.json). The killed run is the uninterrupted one's workdir rolled back to what
    it held at that moment (runs are deterministic): checkpoint HALF, the metrics up to HALF, no results."""
    workdir = tmp_path_factory.mktemp("e2e") / "resumed"
    shutil.copytree(trained, workdir)
    for step in checkpoint_steps(workdir):
        if step > HALF:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    for name in ("results.json", "curves.png"):
        (workdir / name).unlink()
    kept = [line for line in (workdir / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= HALF]
    (workdir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    assert checkpoint_steps(workdir) == [HALF]
    cli.main(["train", "--workdir", str(workdir)])
    return workdir


# --- train --------------------------------------------------------------------------------------------------------


def expected_lr(step):
    """optax warmup_cosine_decay by hand: linear 0 -> LR over WARMUP steps, then cosine to 0 at STEPS."""
    if step < WARMUP:
        return LR * step / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def test_train_writes_config_and_tokenizer(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["total_steps"] == STEPS and config["batch_size"] == 16
    assert config["model"]["vision"]["width"] == 32 and config["model"]["text"]["context_length"] == CONTEXT
    assert config["optimizer"]["lr"] == LR  # from configs/demo.py, not the default
    tokenizer = ClipTokenizer.load(trained / "tokenizer.json")
    assert tokenizer.vocab_size == VOCAB


def test_train_metrics(trained):
    records = read_metrics(trained / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for r in train:
        for key in ("loss", "lr", "logit_scale", "samples_per_s", "grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["samples_per_s"] > 0 and r["nonfinite"] == 0
        # A log record averages the steps of its window; each step's lr is the schedule at the step before it.
        window = range(r["step"] - LOG_EVERY, r["step"])
        assert r["lr"] == pytest.approx(np.mean([expected_lr(s) for s in window]), rel=1e-6)
        # Contrastive loss of a barely trained model: near ln(batch) = ln 16.
        assert 1.0 < r["loss"] < 6.0
        # Procedural data has no bad samples; some long captions exceed the 16-token context and are counted.
        assert [r[f"data_{k}"] for k in ("dropped", "converted", "upscaled", "bad_utf8")] == [0, 0, 0, 0]
        assert 0 < r["data_truncated_caption"] < LOG_EVERY * 16
    # The temperature starts at 1 / 0.07 and barely moves in a few steps.
    assert train[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=0.01)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [STEPS]
    assert RESULT_KEYS <= set(evals[0])


def test_train_results_json(trained):
    results = json.loads((trained / "results.json").read_text())
    assert results["step"] == STEPS
    assert RESULT_KEYS <= set(results)
    for key in RESULT_KEYS:
        assert 0.0 <= results[key] <= 1.0
    # The same numbers as the final evaluation logged in metrics.jsonl.
    final_eval = [r for r in read_metrics(trained / "metrics.jsonl") if r["split"] == "eval"][-1]
    for key in RESULT_KEYS:
        assert results[key] == pytest.approx(final_eval[key], abs=1e-12)


def test_train_writes_curves_tensorboard_and_checkpoints(trained):
    with Image.open(trained / "curves.png") as png:
        assert png.format == "PNG" and png.size == (1100, 400)  # figsize (11, 4) at 100 dpi
    events = list((trained / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    data = b"".join(p.read_bytes() for p in events)
    assert b"train/loss" in data and b"eval/zero_shot_top1" in data
    assert checkpoint_steps(trained) == [HALF, STEPS]
    assert saved_state(trained, STEPS)["step"] == STEPS


# --- resume -------------------------------------------------------------------------------------------------------


def test_resumed_run_equals_uninterrupted_run(trained, resumed):
    want, got = saved_state(trained, STEPS), saved_state(resumed, STEPS)
    assert int(got["step"]) == STEPS
    assert_same_state(want, got)
    # The parameters did change after the resume point (the comparison above is not of two copies of step HALF).
    half = saved_state(trained, HALF)
    assert not np.array_equal(half["params"]["logit_scale"], got["params"]["logit_scale"])
    # The data iterator's saved position agrees too.
    data = lambda w: sorted(p.read_text() for p in (w / "checkpoints" / str(STEPS) / "data").glob("*.json"))
    assert data(resumed) == data(trained)
    # The steps after the resume saw the same batches: same logged loss, same final evaluation.
    loss_at = lambda w: {r["step"]: r["loss"] for r in read_metrics(w / "metrics.jsonl") if r["split"] == "train"}
    assert loss_at(resumed) == loss_at(trained)
    assert json.loads((resumed / "results.json").read_text()) == json.loads((trained / "results.json").read_text())


# --- eval and encode ----------------------------------------------------------------------------------------------


def test_eval_reproduces_results_json(trained, capsys):
    cli.main(["eval", "--workdir", str(trained)])
    out = capsys.readouterr().out
    results = json.loads((trained / "results.json").read_text())
    evaluated = json.loads((trained / f"eval_{STEPS}.json").read_text())
    assert evaluated.pop("settings")["evals"].keys() == {"shapes"}  # what produced them, with them
    assert evaluated.keys() == results.keys()
    for key, value in results.items():
        assert evaluated[key] == pytest.approx(value, abs=1e-6), key
    for key in RESULT_KEYS:
        assert f"{key}" in out and f"{results[key]:.4f}" in out


def test_encode_writes_normalised_embeddings_and_skips_corrupt_images(trained, tmp_path, capsys, monkeypatch):
    # (a line holding U+2028 or a form feed is one text: str.splitlines made three rows of it, every later row off)
    texts = ["a red circle.", "a picture of a blue square.", "there is a green star\u2028in the\x0cimage.", "x"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    images = tmp_path / "images"
    images.mkdir()
    source = ShapesDataset(ShapesConfig(image_size=48), "test")  # not the model's 32 px: encode resizes
    for i in range(3):
        Image.fromarray(source[i]["image"]).save(images / f"img{i}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "out"

    cli.main(["encode", "--workdir", str(trained), "--texts", str(tmp_path / "texts.txt"), "--images", str(images),
              "--out", str(out), "--batch-size", "8"])
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "warning" in captured.err
    assert "not in any image format PIL recognises" in captured.err and "BytesIO" not in captured.err
    assert "1 undecodable" in captured.out

    text_emb = np.load(out / "text_embeddings.npy")
    image_emb = np.load(out / "image_embeddings.npy")
    kept = (out / "image_files.txt").read_text().splitlines()
    assert text_emb.shape == (len(texts), EMBED) and image_emb.shape == (3, EMBED)
    assert [pathlib.Path(f).name for f in kept] == ["img0.png", "img1.png", "img2.png"]
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=1), 1.0, atol=1e-5)

    # Row i is the embedding of input i: the model applied directly (one device, no batching or padding).
    run = load_trained(trained)
    model, params, tokenizer = run.model, run.params, run.tokenizer
    small = np.stack([np.asarray(Image.open(images / f"img{i}.png").resize((IMAGE, IMAGE), Image.BICUBIC))
                      for i in range(3)])

    @jax.jit
    def embed(p, tokens, pixels):
        return (model.apply({"params": p}, tokens, method=CLIP.encode_text),
                model.apply({"params": p}, pixels, method=CLIP.encode_image))

    want_text, want_image = embed(jax.device_get(params), tokenizer(texts, CONTEXT), small)
    np.testing.assert_allclose(text_emb, want_text, atol=1e-5)
    np.testing.assert_allclose(image_emb, want_image, atol=1e-5)

    # Read and embedded two images at a time (any folder fits in memory): the same rows of the same files.
    monkeypatch.setattr("clip_jax.data.images.image_chunk_size", lambda batch_size: 2)
    cli.main(["encode", "--workdir", str(trained), "--images", str(images), "--out", str(tmp_path / "chunked"),
              "--batch-size", "1"])
    assert "1 undecodable" in capsys.readouterr().out
    assert (tmp_path / "chunked" / "image_files.txt").read_text() == (out / "image_files.txt").read_text()
    np.testing.assert_allclose(np.load(tmp_path / "chunked" / "image_embeddings.npy"), image_emb, atol=1e-6)

    # A write that fails midway (a full disk at the second file) leaves nothing: the rerun is not refused.
    real_write, writes = cli.write_atomic, []

    def full_at_the_second(path, data):
        writes.append(path)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(cli, "write_atomic", full_at_the_second)
    with pytest.raises(SystemExit):
        cli.main(["encode", "--workdir", str(trained), "--texts", str(tmp_path / "texts.txt"), "--images", str(images),
                  "--out", str(tmp_path / "full")])
    assert len(writes) == 2 and not (tmp_path / "full").exists()


# --- from Python ----------------------------------------------------------------------------------------------------


def test_the_python_api_embeds_and_classifies_as_the_model_does(trained, tmp_path):
    model = clip_jax.load(trained)
    source = ShapesDataset(ShapesConfig(image_size=48), "test")  # not the model's 32 px: the API resizes
    pixels = [source[i]["image"] for i in range(3)]
    Image.fromarray(pixels[0]).save(tmp_path / "a.png")
    Image.fromarray(pixels[1]).convert("L").save(tmp_path / "b.png")  # grayscale: read as RGB

    # A file, a PIL image of another mode and an array give the same rows as the model applied by hand.
    got = model.encode_images([tmp_path / "a.png", Image.open(tmp_path / "b.png"), pixels[2]])
    by_hand = [pixels[0], np.asarray(Image.open(tmp_path / "b.png").convert("RGB")), pixels[2]]
    small = np.stack([np.asarray(Image.fromarray(p).resize((IMAGE, IMAGE), Image.BICUBIC)) for p in by_hand])
    params = jax.device_get(model.trained.params)
    apply = model.trained.model.apply
    want = apply({"params": params}, small, method=CLIP.encode_image)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(model.encode_images(np.stack(pixels)), model.encode_images(pixels), atol=1e-6)
    with pytest.MonkeyPatch.context() as patch:  # two images at a time: the same rows
        patch.setattr("clip_jax.data.images.image_chunk_size", lambda batch_size: 2)
        np.testing.assert_allclose(model.encode_images(pixels), model.encode_images(np.stack(pixels)), atol=1e-6)
        chunked_names, chunked_probs = model.classify(pixels, ["red circle", "blue square"])
    gray = np.asarray(Image.open(tmp_path / "b.png"))  # [H, W]: a grayscale array is the grayscale image
    np.testing.assert_allclose(model.encode_images([gray]), got[1:2], atol=1e-6)

    texts = ["a red circle.", "a blue square."]
    want_text = apply({"params": params}, model.trained.tokenizer(texts, CONTEXT), method=CLIP.encode_text)
    np.testing.assert_allclose(model.encode_texts(texts), want_text, atol=1e-5)

    # Zero-shot: the softmax of the temperature times the cosine similarities to the prompt ensemble of the shapes
    # prompts (a run on shapes, without templates of its own: those of its evaluations), computed here from the
    # embeddings above (each prompt's normalised, averaged, normalised again) and the logit scale parameter.
    from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES

    names, probs = model.classify(pixels, ["red circle", "blue square"])
    per_template = np.stack([model.encode_texts([t.format("red circle"), t.format("blue square")])
                             for t in ZERO_SHOT_TEMPLATES]).mean(0)
    prompts = per_template / np.linalg.norm(per_template, axis=-1, keepdims=True)
    scale = min(np.exp(params["logit_scale"]), model.trained.config.model.max_logit_scale)
    assert model.logit_scale == pytest.approx(float(scale), rel=1e-6)
    assert (model.tokenize(texts) == model.trained.tokenizer(texts, CONTEXT)).all()
    assert "load" in dir(clip_jax) and "Model" in dir(clip_jax)
    logits = scale * model.encode_images(pixels) @ prompts.T
    want_probs = np.exp(logits - logits.max(1, keepdims=True))
    assert names == ["red circle", "blue square"] == chunked_names
    np.testing.assert_allclose(probs, want_probs / want_probs.sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(chunked_probs, probs, atol=1e-6)

    # The class names' embeddings are kept for the next call with the same names, and only for those names.
    encoded = []
    encode_texts = model.encoder.texts
    model.encoder.texts = lambda tokens: encoded.append(len(tokens)) or encode_texts(tokens)
    assert model.classify(pixels, ["red circle", "blue square"])[1] == pytest.approx(probs) and encoded == []
    swapped_names, swapped = model.classify(pixels, ["blue square", "red circle"])
    assert swapped_names == ["blue square", "red circle"] and encoded == [2 * len(ZERO_SHOT_TEMPLATES)]
    np.testing.assert_allclose(swapped, probs[:, ::-1], atol=1e-6)
    # Templates of one's own: the default spelt out gives the same; another prompt, other embeddings.
    same = model.classify(pixels, ["red circle", "blue square"], templates=list(ZERO_SHOT_TEMPLATES))[1]
    np.testing.assert_allclose(same, probs, atol=1e-6)
    other = model.encode_texts(["a red circle.", "a blue square."])
    logits = scale * model.encode_images(pixels) @ other.T
    want_other = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(model.classify(pixels, ["red circle", "blue square"], templates=["a {}."])[1],
                               want_other / want_other.sum(1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="templates: give at least one"):  # not the run's own, silently
        model.classify(pixels, ["red circle", "blue square"], templates=[])


def test_the_python_api_names_what_it_cannot_use(trained, tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="not a clip_jax workdir"):
        clip_jax.load(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["CLIPModel"]}')  # another tool's folder
    with pytest.raises(FileNotFoundError, match=r"not a clip_jax workdir \(its config.json is not a clip_jax run's\)"):
        clip_jax.load(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"no checkpoint of step 3; its steps: {HALF}, {STEPS}"):
        clip_jax.load(trained, step=3)
    model = clip_jax.load(trained)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match="broken.png"):  # an error, not a skip: row i of a result is input i
        model.encode_images([tmp_path / "broken.png"])
    with pytest.raises(ValueError, match=r"image 0: expected uint8 .*, got float32 \[8, 8, 3\]"):
        model.encode_images([np.zeros((8, 8, 3), np.float32)])
    with pytest.MonkeyPatch.context() as patch:  # read two at a time, an image is still named by its place
        patch.setattr("clip_jax.data.images.image_chunk_size", lambda batch_size: 2)
        with pytest.raises(ValueError, match=r"image 2: expected uint8 .*, got float32 \[8, 8, 3\]"):
            model.encode_images([np.zeros((8, 8, 3), np.uint8)] * 2 + [np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(TypeError, match="list of texts"):
        model.encode_texts("a red circle.")
    with pytest.raises(TypeError, match="text 1: expected a str, got int"):
        model.encode_texts(["a red circle.", 2])
    texts = ["a red circle.", "a blue square."]
    np.testing.assert_array_equal(model.encode_texts(np.array(texts)), model.encode_texts(texts))
    with pytest.raises(ValueError, match=r"image 0: an empty array \[0, 0, 3\]"):
        model.encode_images([np.zeros((0, 0, 3), np.uint8)])
    with pytest.raises(TypeError, match="step must be an int .* got str '4'"):
        clip_jax.load(trained, step="4")
    # Another compute dtype (a bf16 run compared with PyTorch in float32): the same parameters, computed otherwise
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'fp32'"):
        clip_jax.load(trained, dtype="fp32")
    bf16 = clip_jax.load(trained, dtype="bfloat16")
    assert bf16.trained.config.model.dtype == "bfloat16" and model.trained.config.model.dtype == "float32"
    texts = ["a red circle.", "a blue star."]
    difference = np.abs(bf16.encode_texts(texts) - model.encode_texts(texts)).max()
    assert 0 < difference < 0.05, difference
    with pytest.raises(TypeError, match="list of images"):
        model.encode_images(str(tmp_path / "broken.png"))
    # The usual mistakes of an array, each with its fix; [H, W, 1] is grayscale, as [H, W] is.
    gray = np.full((8, 8), 200, np.uint8)
    np.testing.assert_array_equal(model.encode_images([gray[..., None]]), model.encode_images([gray]))
    for array, hint in ((np.ones((8, 8, 3), np.float32), "(array * 255).round().astype(np.uint8)"),
                        (np.zeros((3, 8, 8), np.uint8), "array.transpose(1, 2, 0)"),
                        (np.zeros((8, 8, 3), np.uint16), "scale it to 0-255")):
        with pytest.raises(ValueError, match=r"image 0: expected uint8 .*" + re.escape(hint)):
            model.encode_images([array])
    with pytest.raises(ConfigError, match="no classes of its own"):  # refused before the broken image is read
        model.classify([tmp_path / "broken.png"])
    for names, given in (([], "no class name"), (["red circle"], "1 class name")):  # one won every image, p = 1
        with pytest.raises(ConfigError, match=f"^{given} given: zero-shot classification chooses"):
            model.classify([np.zeros((8, 8, 3), np.uint8)], names)
    with caplog.at_level("WARNING"):  # a name its prompts cut: counted, as encode counts its cut texts
        model.classify([np.zeros((8, 8, 3), np.uint8)], ["red circle", "blue square " * 20], templates=["a {}."])
    assert "class names: 1 of the 2 are longer in their prompts than the" in caplog.text, caplog.text
    with pytest.raises(ConfigError, match="class name 'red circle' is given twice"):
        model.classify([np.zeros((8, 8, 3), np.uint8)], ["red circle", "blue square", "red circle"])
    with pytest.raises(ConfigError, match="class names: 'red circle' and 'Red Circle' are one text to this model"):
        model.classify([np.zeros((8, 8, 3), np.uint8)], ["red circle", "Red Circle"])  # the CLI's refusal too
    with pytest.raises(ConfigError, match="class name 1 is 2: class names are non-empty texts"):
        model.classify([np.zeros((8, 8, 3), np.uint8)], ["red circle", 2])
    with pytest.raises(TypeError, match="list of class names"):
        model.classify([np.zeros((8, 8, 3), np.uint8)], "red circle")
    # a group of a few-shot run's own classes beside names given was ignored
    with pytest.raises(ConfigError, match="classes base picks among a few-shot run's own classes; with class names"):
        model.classify([np.zeros((8, 8, 3), np.uint8)], ["red circle", "blue square"], classes="base")
    for wrong, said in ((None, "got NoneType"), (b"\x89PNG", "got bytes (the file's bytes: give its path")):
        with pytest.raises(TypeError, match=re.escape(f"image 1: expected a file path, a PIL image or a uint8 array, "
                                                      f"{said}")):
            model.encode_images([np.zeros((8, 8, 3), np.uint8), wrong])


# --- mistakes -----------------------------------------------------------------------------------------------------


def exit_message(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_misspelt_config_key_exits_before_any_work(tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started despite the bad key")

    monkeypatch.setattr("clip_jax.train.loop.train_and_evaluate", fail)
    monkeypatch.setattr("clip_jax.train.step.compile_train_step", fail)
    workdir = tmp_path / "run"
    message = exit_message(train_args(workdir, "--config.optimzer.lr=1"), capsys)
    assert message.startswith("clip-jax train: error:") and "'optimzer'" in message
    assert not workdir.exists()


@pytest.mark.parametrize("overrides, expected", [
    (["--config.mesh.data=16"], "config.mesh: mesh {'data': 16, 'fsdp': 1, 'tensor': 1} needs 16 devices but 8 are"),
    (["--config.mesh.data=3", "--config.mesh.tensor=-1"], "config.mesh: mesh {'data': 3, 'fsdp': 1, 'tensor': -1}: 8 "
     "devices do not divide by the fixed axes' product 3; set the fixed sizes so they multiply to a divisor of 8"),
    (["--config.batch_size=12"], "batch_size 12 must be a multiple of 8"),
    # the examples keep the run's kind of parallelism (they offered data parallelism to an FSDP mesh)
    (["--config.mesh.data=1", "--config.mesh.fsdp=4"], "needs 4 devices but 8 are available; set config.mesh so the "
     "sizes multiply to 8, e.g. --config.mesh.fsdp=-1"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one axis may be -1; give the others a size, e.g. "
     "--config.mesh.data=1"),
])
def test_a_mesh_or_batch_that_does_not_fit_the_devices_exits_before_writing(tmp_path, capsys, overrides, expected):
    """This session has 8 devices (tests/conftest.py): a mesh over more, or over sizes that do not divide them, or a
    batch that does not split over the mesh is one line, and the workdir is not created."""
    workdir = tmp_path / "run"
    message = exit_message(train_args(workdir, *overrides), capsys)
    assert expected in message, message
    assert not workdir.exists()


def test_train_refuses_a_workdir_of_another_model(trained, capsys):
    before = {p: p.read_bytes() for p in (trained / "config.json", trained / "metrics.jsonl")}
    steps = checkpoint_steps(trained)
    message = exit_message(
        train_args(trained, "--config.model.vision.width=64", "--config.model.text.layers=2",
                   "--config.model.attention=xla", "--config.model.remat_policy=full"), capsys
    )
    assert "different model" in message
    assert "model.vision.width: 32 -> 64" in message and "model.text.layers: 1 -> 2" in message
    # only the fields that differ in what the model computes (any resume may choose its attention and remat)
    assert message.count(" -> ") == 2
    # init_from takes the parameters as they are: no way to other widths or depths, so not offered
    assert "init_from" not in message
    assert {p: p.read_bytes() for p in before} == before
    assert checkpoint_steps(trained) == steps


def test_a_warm_up_as_long_as_the_run_is_warned_of(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cli.main(train_args(tmp_path / "run", "--config.total_steps=2", "--config.optimizer.warmup_steps=5",
                            "--config.evals.shapes=None"))
    assert "optimizer.warmup_steps 5 is not below total_steps 2: the learning rate rises for the whole run" in (
        caplog.text)
    # no evaluation: no eval record of a step alone
    assert [r["split"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == ["train"]


def test_a_resume_may_choose_how_the_step_is_computed(tmp_path):
    # model.layer_norm (Pallas kernels run on GPUs only, so not through `train` here) is one of the execution
    # fields any resume may change, as attention, remat, patch dropout and stochastic depth are; the model's shape is
    # not.
    from clip_jax.config import default_config
    from clip_jax.errors import ConfigError
    from clip_jax.train.loop import prepare_workdir

    workdir = tmp_path / "run"
    prepare_workdir(default_config(), workdir)
    config = default_config()
    config.model.layer_norm, config.model.attention, config.model.remat_policy = "pallas", "xla", "full"
    config.model.vision.patch_dropout = config.model.vision.stochastic_depth = 0.5
    prepare_workdir(config, workdir, checkpoint_step=5)
    config.model.vision.width = 64
    with pytest.raises(ConfigError, match=r"different model \(model.vision.width: 768 -> 64\)"):
        prepare_workdir(config, workdir, checkpoint_step=5)


def test_a_run_whose_config_json_holds_relative_paths_resumes_from_the_same_folder(tmp_path, monkeypatch, caplog):
    """config.json held paths as given before launches made them absolute (`config.absolute_paths`): a relaunch
    from the folder they were relative to is the same run, its cached arrays too; one naming other files is not."""
    from types import SimpleNamespace

    from clip_jax.config import absolute_paths, default_config
    from clip_jax.methods.base import cached_arrays
    from clip_jax.train.loop import prepare_workdir

    monkeypatch.chdir(tmp_path)
    earlier = default_config()
    earlier.few_shot.update(dataset="table", train="k.csv", test="test.csv")
    workdir = tmp_path / "run"
    prepare_workdir(earlier, workdir)  # written as an earlier version wrote it: relative
    prep = SimpleNamespace(workdir=workdir, is_primary=True, training=True)
    settings = json.dumps(earlier.few_shot.to_dict(), sort_keys=True, default=list)
    cached_arrays(prep, "cache.npz", settings, lambda: {"x": np.arange(3)}, "test arrays")

    relaunch = default_config()
    relaunch.few_shot.update(dataset="table", train="k.csv", test="test.csv")
    absolute_paths(relaunch)
    assert relaunch.few_shot.train == os.path.join(os.getcwd(), "k.csv")
    with caplog.at_level("WARNING", logger="clip_jax.train.loop"):
        prepare_workdir(relaunch, workdir, checkpoint_step=5, fixed=("model", "few_shot"))
    assert "changed settings" not in caplog.text
    settings = json.dumps(relaunch.few_shot.to_dict(), sort_keys=True, default=list)

    def made_again():
        pytest.fail("the cache was made again")

    np.testing.assert_array_equal(cached_arrays(prep, "cache.npz", settings, made_again, "test arrays")["x"],
                                  np.arange(3))
    monkeypatch.chdir(workdir)  # the cache now holds the absolute form: read from any folder
    np.testing.assert_array_equal(cached_arrays(prep, "cache.npz", settings, made_again, "test arrays")["x"],
                                  np.arange(3))

    relaunch.few_shot.train = "/elsewhere/k.csv"
    with pytest.raises(ConfigError, match="other few_shot settings .few_shot.train: .*k.csv' -> '/elsewhere/k.csv'"):
        prepare_workdir(relaunch, workdir, checkpoint_step=5, fixed=("model", "few_shot"))
    settings = json.dumps(relaunch.few_shot.to_dict(), sort_keys=True, default=list)
    with pytest.raises(ConfigError, match="holds test arrays of other settings"):
        cached_arrays(prep, "cache.npz", settings, made_again, "test arrays")


def test_cached_arrays_store_their_source_and_refuse_a_changed_one(tmp_path):
    """What the arrays were made from beyond the settings (class names, a file's hash) is stored with them: read back
    unchanged it is not returned; changed, the method's message; a cache of an earlier version without it is read."""
    from types import SimpleNamespace

    from clip_jax.methods.base import cached_arrays

    prep = SimpleNamespace(workdir=tmp_path, is_primary=True, training=True)

    def load(name, names, make=lambda: {"x": np.arange(3)}):
        return cached_arrays(prep, name, "{}", make, "test arrays", {"names": np.asarray(names)},
                             lambda stored: f"made from {stored['names'].tolist()}")

    def made_again():
        pytest.fail("the cache was made again")

    assert list(load("cache.npz", ["a", "b"])) == ["x"]
    assert np.load(tmp_path / "cache.npz")["names"].tolist() == ["a", "b"]
    np.testing.assert_array_equal(load("cache.npz", ["a", "b"], made_again)["x"], np.arange(3))
    with pytest.raises(ConfigError, match=r"^made from \['a', 'b'\]$"):
        load("cache.npz", ["a"], made_again)
    np.savez(tmp_path / "earlier.npz", settings=np.array("{}"), x=np.arange(2))
    assert np.load(tmp_path / "earlier.npz").files == ["settings", "x"]
    np.testing.assert_array_equal(load("earlier.npz", ["c"], made_again)["x"], np.arange(2))


def test_changed_settings_are_told_against_what_trained(tmp_path, caplog):
    """A launch that changed the lr and died before its first step left its config.json; the next launch was told of
    a change from that lr, which never trained."""
    from clip_jax.config import default_config, read_config
    from clip_jax.train.loop import prepare_workdir

    workdir = tmp_path / "run"
    prepare_workdir(default_config(), workdir)
    relaunch = default_config()  # another machine's mesh, more logging, an evaluation added: nothing trains otherwise
    relaunch.mesh.data, relaunch.log.every_steps, relaunch.eval.num_examples = 2, 7, 64
    with caplog.at_level("WARNING", logger="clip_jax.train.loop"):
        prepare_workdir(relaunch, workdir, checkpoint_step=5)
    assert "changed settings" not in caplog.text and not (workdir / "config_until_step_5.json").exists()
    prepare_workdir(default_config(), workdir, checkpoint_step=5)
    trained_lr = default_config().optimizer.lr
    failed = default_config()
    failed.optimizer.lr = trained_lr / 2
    with caplog.at_level("WARNING", logger="clip_jax.train.loop"):
        prepare_workdir(failed, workdir, checkpoint_step=5)  # killed during compilation
        assert f"optimizer.lr {trained_lr} -> {trained_lr / 2}" in caplog.text
        caplog.clear()
        prepare_workdir(default_config(), workdir, checkpoint_step=5)  # back to the trained settings
        assert "changed settings" not in caplog.text
    assert read_config(workdir / "config_until_step_5.json").optimizer.lr == trained_lr


def test_train_refuses_another_context_length_and_names_the_fix(trained, capsys):
    """A caption context that differs from the checkpoint's positional embedding: one line with both lengths, every
    other differing field, and the ways out (keep the run's model, or `clip-jax stretch`), nothing written."""
    before = {p: p.read_bytes() for p in (trained / "config.json", trained / "metrics.jsonl")}
    message = exit_message(train_args(trained, f"--config.model.text.context_length={2 * CONTEXT}",
                                      "--config.model.vision.layers=2"), capsys)
    assert f"model.text.context_length: {CONTEXT} -> {2 * CONTEXT}" in message
    assert "model.vision.layers: 1 -> 2" in message  # named too, not only the context length
    assert "clip-jax stretch" in message
    # the run's own values, as flags to give (a config file that sets other ones needs them, e.g. a Long-CLIP config
    # on a workdir stretched to another length)
    assert f"train it with its own model (--config.model.text.context_length={CONTEXT} " \
           "--config.model.vision.layers=1)" in message
    assert "init_from" not in message  # it takes the parameters as they are: no route to other shapes
    assert {p: p.read_bytes() for p in before} == before
    # a change that keeps the shapes (the compute dtype): a new run may start from these parameters
    message = exit_message(train_args(trained, "--config.model.dtype=bfloat16"), capsys)
    assert f"or use a new --workdir (--config.init_from={trained} starts one from this run's parameters)" in message
    assert {p: p.read_bytes() for p in before} == before


def test_init_from_starts_a_new_run_from_another_runs_parameters(trained, tmp_path, capsys):
    """With lr 0 the new run keeps the parameters it starts from: they must be `trained`'s last ones, bit for bit,
    while its step, optimizer state and data start afresh, and `trained` is left as it was. Given relative, the
    path is stored absolute: wise-ft or eval run from another folder read the same run."""
    before = checkpoint_steps(trained)
    workdir = tmp_path / "run"
    cli.main(train_args(workdir, f"--config.init_from={os.path.relpath(trained)}", "--config.optimizer.lr=0.0"))
    assert f"warm start: {workdir} starts from the parameters of {trained / 'checkpoints' / str(STEPS)}" in (
        capsys.readouterr().out)
    assert json.loads((workdir / "config.json").read_text())["init_from"] == str(trained)
    new, source = saved_state(workdir, STEPS), saved_state(trained, STEPS)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(source["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert checkpoint_steps(workdir)[0] == HALF  # a run of its own from step 0, not a resume of `trained`
    assert checkpoint_steps(trained) == before


def test_init_from_a_folder_without_checkpoints_is_one_line(tmp_path, capsys):
    message = exit_message(train_args(tmp_path / "run", f"--config.init_from={tmp_path / 'nothing'}"), capsys)
    assert "config.init_from" in message and "holds no checkpoint" in message
    assert "clip-jax train --config configs/demo.py --workdir workdirs/demo" in message  # what to do
    assert not (tmp_path / "nothing").exists()
    # open_clip's --pretrained FILE habit: the file is named as one, with the conversion to run
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    message = exit_message(train_args(tmp_path / "run", f"--config.init_from={weights}"), capsys)
    assert message.endswith(f"is a PyTorch weights file; init_from takes a workdir: clip-jax convert {weights} "
                            "--to-workdir DIR, then --config.init_from=DIR"), message


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "clip_jax", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "eval", "encode"):
        assert command in result.stdout


def test_eval_of_other_settings_keeps_the_earlier_result(trained, tmp_path, capsys):
    """A smaller protocol replaced the run's 1,000-example eval_<step>.json without a word; no evaluation at all
    wrote a file holding only the step."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    first = workdir / f"eval_{STEPS}.json"
    cli.main(["eval", "--workdir", str(workdir)])
    kept = first.read_bytes()
    cli.main(["eval", "--workdir", str(workdir), "--config.eval.num_examples=20"])
    assert first.read_bytes() == kept
    other = json.loads((workdir / f"eval_{STEPS}_2.json").read_text())
    assert other["settings"]["eval"]["num_examples"] == 20
    cli.main(["eval", "--workdir", str(workdir)])  # the same settings again: the same file, rewritten
    assert sorted(p.name for p in workdir.glob("eval_*.json")) == [f"eval_{STEPS}.json", f"eval_{STEPS}_2.json"]
    capsys.readouterr()
    message = exit_message(["eval", "--workdir", str(workdir), "--config.evals.shapes=None"], capsys)
    assert "nothing to evaluate: config.evals is empty" in message
    # Every entry skipped (no audio tower here): an error, not an eval file of the step alone.
    message = exit_message(["eval", "--workdir", str(workdir), "--config.evals.shapes=None",
                            "--config.evals.sounds={'type': 'shapes_audio'}"], capsys)
    assert "nothing evaluated: every entry of config.evals (sounds) was skipped" in message
    assert sorted(p.name for p in workdir.glob("eval_*.json")) == [f"eval_{STEPS}.json", f"eval_{STEPS}_2.json"]


def test_eval_of_the_same_relative_path_from_another_folder_keeps_the_earlier_result(trained, tmp_path,
                                                                                      monkeypatch):
    """The entry's path was recorded as typed: from another folder, other images under the same relative path were
    the same settings, and their figures were written over the first ones."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    for folder, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / folder / "set").mkdir(parents=True)
        for i, c in enumerate((colour, (0, 255, 0))):
            Image.new("RGB", (32, 32), c).save(tmp_path / folder / "set" / f"{i}.png")
        (tmp_path / folder / "set" / "pairs.json").write_text('{"0.png": "a red square.", "1.png": "a green one."}')
    entry = "--config.evals.mine={'type': 'long_text_set', 'path': 'set/pairs.json'}"
    for folder in ("a", "b"):
        monkeypatch.chdir(tmp_path / folder)
        cli.main(["eval", "--workdir", str(workdir), "--config.evals.shapes=None", entry])
    settings = [json.loads(p.read_text())["settings"]["evals"] for p in workdir.glob(f"eval_{STEPS}*.json")]
    recorded = sorted(entries["mine"]["path"] for entries in settings if "mine" in entries)
    assert recorded == [str(tmp_path / "a" / "set" / "pairs.json"), str(tmp_path / "b" / "set" / "pairs.json")]


def tensorboard_scalars(workdir, tag):
    """The (step, value) of every `tag` event in the workdir's TensorBoard files, in file order."""
    from tensorboardX.proto import event_pb2

    found = []
    for events in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data = events.read_bytes()
        while data:  # TFRecord framing: length (8 bytes), its CRC (4), the record, its CRC (4)
            length = int.from_bytes(data[:8], "little")
            event = event_pb2.Event.FromString(data[12:12 + length])
            data = data[16 + length:]
            found += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return found


def test_a_finished_run_relaunched_says_so_and_compiles_nothing(trained, tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    capsys.readouterr()

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled a step for a run with no step left")

    monkeypatch.setattr("clip_jax.train.step.compile_train_step", no_compile)
    # A Ctrl-C during the final evaluation: the final checkpoint is saved, results.json not written. Its relaunch
    # evaluated it "again".
    (workdir / "results.json").unlink()
    cli.main(train_args(workdir))
    out = capsys.readouterr().out
    assert f"resuming {workdir} from step {STEPS} of {STEPS}: the run is complete; evaluating its final checkpoint " \
           "(not evaluated yet: no results.json of this step)" in out and "again" not in out, out
    logged = tensorboard_scalars(workdir, "eval/zero_shot_top1")
    cli.main(train_args(workdir))
    out = capsys.readouterr().out
    assert f"resuming {workdir} from step {STEPS} of {STEPS}: the run is complete; evaluating its final checkpoint" \
           " again" in out
    # TensorBoard, which keeps every event, got another copy of the same evaluation at each such relaunch
    assert tensorboard_scalars(workdir, "eval/zero_shot_top1") == logged and logged[-1][0] == STEPS
    assert json.loads((workdir / "results.json").read_text()) == json.loads((trained / "results.json").read_text())
    # With other evaluation settings its results.json would hold figures of another kind: refused, nothing written.
    before = {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}
    message = exit_message(train_args(workdir, "--config.eval.num_examples=32"), capsys)
    assert f"{workdir} is complete (step {STEPS}), and its results.json holds the figures of its own evaluation " \
           "settings, which these differ from (eval.num_examples " in message and "clip-jax eval --workdir" in message
    assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == before
    cli.main(train_args(workdir, "--config.eval.every_steps=3", "--config.eval.batch_size=32"))  # the same figures
    assert json.loads((workdir / "results.json").read_text()) == json.loads((trained / "results.json").read_text())


def test_throughput_is_of_the_steps_and_a_stop_during_the_final_save_keeps_it(tmp_path, monkeypatch, capsys):
    """Two things of the loop's edges in one small run. (1) An evaluation inside a logging window: its time is left
    out of the window's throughput, and the steps' time before it is kept (it was dropped too: samples_per_s came
    out about twice the steps' rate). (2) A first Ctrl-C during the final checkpoint's save: the save finishes and
    the run stops with it (the handlers were gone by then: the save was cut short, a temporary folder left, and
    the relaunch trained the last steps again)."""
    from clip_jax.train import loop

    pauses = []  # ("eval" or "save", seconds) of each evaluation and save during the run, in order
    real_evaluate, real_save = loop.evaluate, loop.Checkpointer.save

    def timed_evaluate(config, model, params, mesh, tokenizer, due=None, method=None):
        started = time.time()
        result = real_evaluate(config, model, params, mesh, tokenizer, due, method)
        if due is not None:
            pauses.append(("eval", time.time() - started))
        return result

    def save(self, step, *args, force=False, **kwargs):
        if force and step == 8:  # the final save: Ctrl-C while it is being written
            os.kill(os.getpid(), signal.SIGINT)
            return real_save(self, step, *args, force=force, **kwargs)
        started = time.time()
        real_save(self, step, *args, force=force, **kwargs)
        pauses.append(("save", time.time() - started))

    monkeypatch.setattr(loop, "evaluate", timed_evaluate)
    monkeypatch.setattr(loop.Checkpointer, "save", save)
    workdir = tmp_path / "run"
    args = train_args(workdir, "--config.total_steps=8", "--config.log.every_steps=4", "--config.eval.every_steps=2",
                      "--config.checkpoint.every_steps=4", "--config.eval.num_examples=32")
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    assert stopped.value.code == 130
    assert "interrupted: saved the final checkpoint, step 8; the same command evaluates it" in capsys.readouterr().out
    assert 8 in checkpoint_steps(workdir) and not list((workdir / "checkpoints").glob("*tmp*"))
    assert not (workdir / "results.json").exists()
    # (1) the window of steps 5-8 holds the save and the evaluation after step 4 (after its record), and the
    # evaluation after step 6; the one of step 2 is in the first window
    records = {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "train"}
    assert sorted(records) == [4, 8] and [kind for kind, _ in pauses] == ["eval", "save", "eval", "eval"], pauses
    steps_seconds = records[8]["time"] - records[4]["time"] - sum(seconds for _, seconds in pauses[1:])
    assert steps_seconds > 0, (pauses, records)
    ratio = records[8]["samples_per_s"] / (4 * 16 / steps_seconds)
    assert 0.7 < ratio < 1.3, (ratio, pauses, records[8])  # (the 2x of before is far outside)
    # The relaunch trains nothing more: it evaluates the final checkpoint
    monkeypatch.setattr(loop.Checkpointer, "save", real_save)
    cli.main(args)
    assert f"resuming {workdir} from step 8 of 8: the run is complete" in capsys.readouterr().out
    assert (workdir / "results.json").exists()


def test_a_tensor_axis_that_does_not_divide_the_heads_is_told():
    # sharding drops such an axis for the dimension (logical_to_spec): the heads stayed whole on every device, unsaid
    from clip_jax.config import default_config
    from clip_jax.train.loop import unsplit_by_tensor

    config = default_config()
    config.model.vision.update(heads=2, mlp_dim=64)
    config.model.text.update(heads=8, mlp_dim=36)
    assert unsplit_by_tensor(config, 1) is None and unsplit_by_tensor(config, 2) is None
    said = unsplit_by_tensor(config, 8)
    assert said.startswith("mesh.tensor 8 does not divide the vision tower's 2 heads, the text tower's 36 MLP width:")
    assert "8 heads" not in said and "64 MLP width" not in said


def test_a_tensor_axis_across_hosts_is_told():
    """A launcher's mesh with mesh.tensor over more GPUs than a node has (launch/gpu.py takes any mesh) ran its
    per-layer all-reduces over the network between nodes, without a word."""
    import types

    from clip_jax.sharding import MESH_AXES, tensor_across_processes

    # two hosts of 4 devices, numbered host by host as jax.devices() lists them; the mesh's last axis is `tensor`
    devices = np.asarray([types.SimpleNamespace(process_index=i // 4) for i in range(8)], dtype=object)
    assert MESH_AXES[-1] == "tensor"
    assert tensor_across_processes(devices.reshape(2, 1, 4), MESH_AXES) is None
    assert tensor_across_processes(devices.reshape(1, 4, 2), MESH_AXES) is None
    said = tensor_across_processes(devices.reshape(1, 1, 8), MESH_AXES)
    assert said.startswith("mesh.tensor 8 spans 2 processes (hosts of 4 devices): its all-reduces in every layer")
    # the tensor groups are the mesh's, whatever its axes' order
    assert tensor_across_processes(devices.reshape(8, 1, 1), ("tensor", "fsdp", "data"))
    assert tensor_across_processes(devices.reshape(2, 1, 4), ("tensor", "fsdp", "data"))  # 0 and 4 together


def _abstract_state(workdir, scan_layers, frozen=()):
    """The abstract train state (shapes, dtypes, shardings) of the run in `workdir`, its blocks stacked or not, with
    `frozen` rules, on a mesh that splits the parameters over 4 of the 8 devices."""
    from clip_jax.config import read_config
    from clip_jax.methods import get_method
    from clip_jax.sharding import reader_mesh
    from clip_jax.train.loop import abstract_train_state, create_state

    config = read_config(workdir / "config.json")
    config.model.scan_layers, config.optimizer.frozen = scan_layers, list(frozen)
    config.mesh.update(data=2, fsdp=4)
    method = get_method(config)
    init_fn, shardings, _ = create_state(config, method, method.model(), reader_mesh(config.mesh.to_dict()))
    return config, abstract_train_state(init_fn, shardings)


def parameter_trees(tree, like):
    """The trees of `tree` (a train state) shaped as the parameters `like`: the parameters, the optimizer's moments."""
    is_parameter_tree = lambda sub: isinstance(sub, dict) and set(sub) == set(like)
    return [sub for sub in jax.tree.leaves(tree, is_leaf=is_parameter_tree) if is_parameter_tree(sub)]


def test_a_resume_may_stack_or_unroll_the_blocks(tmp_path, caplog):
    """model.scan_layers is the blocks' layout: a resume may change it (a run moved between TPUs and GPUs). The
    parameters and the optimizer state are stacked or unrolled on restore (the same numbers, in the run's
    shardings), and training goes on as it would have in the old layout."""
    from clip_jax.models.layers import relayout_parameter_trees
    from clip_jax.train.checkpoint import Checkpointer

    two_blocks = ["--config.model.vision.layers=2", "--config.model.text.layers=2"]
    unrolled, stacked = tmp_path / "unrolled", tmp_path / "stacked"
    cli.main(train_args(unrolled, *two_blocks))
    shutil.copytree(unrolled, stacked)
    shutil.rmtree(stacked / "checkpoints" / str(STEPS))
    (stacked / "results.json").unlink()
    with caplog.at_level("WARNING"):
        cli.main(train_args(stacked, *two_blocks, "--config.model.scan_layers=True"))
    assert f"checkpoint {HALF} holds its Transformer blocks unrolled: the parameters and the optimizer state" in (
        caplog.text)
    assert checkpoint_steps(stacked) == [HALF, STEPS]

    take = lambda leaf, i: leaf[i]
    like_unrolled = saved_state(unrolled, HALF)["params"]
    like_stacked = saved_state(stacked, STEPS)["params"]
    assert "resblocks" in like_stacked["visual"]["transformer"]
    assert "resblocks_1" in like_unrolled["text"]["transformer"]
    # The steps after the resume in the stacked layout, against the uninterrupted run's in the unrolled one
    want = saved_state(unrolled, STEPS)
    got = relayout_parameter_trees(saved_state(stacked, STEPS), like_unrolled, np.stack, take)
    want_leaves, want_def = jax.tree.flatten_with_path(want)
    got_leaves, got_def = jax.tree.flatten_with_path(got)
    assert want_def == got_def
    for (path, w), (_, g) in zip(want_leaves, got_leaves, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert not np.array_equal(want["params"]["logit_scale"], saved_state(unrolled, HALF)["params"]["logit_scale"])

    # The restore itself, both ways, moves numbers without changing them, into the run's shardings
    for workdir, step, scan, saved_like in ((unrolled, HALF, True, like_stacked),
                                            (stacked, STEPS, False, like_unrolled)):
        config, abstract = _abstract_state(workdir, scan_layers=scan)
        checkpointer = Checkpointer(workdir, config.checkpoint, reader=True)
        state = checkpointer.restore(abstract, step=step)
        checkpointer.close()
        want = relayout_parameter_trees(saved_state(workdir, step), saved_like, np.stack, take)
        assert int(state.step) == step
        assert_same_state(want["params"], jax.device_get(state.params))
        moments = [parameter_trees(tree, saved_like) for tree in (want["opt_state"], jax.device_get(state.opt_state))]
        assert len(moments[0]) == len(moments[1]) == 2  # Adam's mu and nu
        for w, g in zip(*moments, strict=True):
            assert_same_state(w, g)
        assert all(jax.tree.leaves(jax.tree.map(lambda r, a: r.sharding == a.sharding, state, abstract)))
        assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state.params))

    # Blocks that the frozen rules split (some trained, some frozen) cannot be read from stacked ones
    config, abstract = _abstract_state(stacked, scan_layers=False, frozen=["visual/transformer/resblocks_0/"])
    with pytest.raises(ConfigError, match="holds its Transformer blocks stacked, and this run's frozen rules freeze "
                                          "some blocks and train others .*: resume with "
                                          "--config.model.scan_layers=True"):
        Checkpointer(stacked, config.checkpoint, reader=True).restore(abstract, step=STEPS)


def test_a_resume_refuses_another_tokenizer(tmp_path):
    """The workdir's tokenizer.json stays a run's (its model's token ids come from it): another data.tokenizer, or
    vocabulary size of a trained one, was written to config.json as if applied."""
    from clip_jax.config import ConfigError, default_config, read_config
    from clip_jax.train.loop import prepare_workdir

    workdir = tmp_path / "run"
    config = default_config()
    config.data.tokenizer, config.data.tokenizer_vocab_size = "train", 514
    prepare_workdir(config, workdir)
    for key, value in (("tokenizer", "openai"), ("tokenizer_vocab_size", 2048)):
        changed = default_config()
        changed.data.update(tokenizer="train", tokenizer_vocab_size=514)
        changed.data[key] = value
        with pytest.raises(ConfigError, match=f"was made with data.{key} {config.data[key]!r}, which its model's "
                                              f"token ids come from: a resume keeps it \\(drop --config.data.{key}\\)"):
            prepare_workdir(changed, workdir, checkpoint_step=5)
        assert read_config(workdir / "config.json").data[key] == config.data[key]  # as it was
    prepare_workdir(config, workdir, checkpoint_step=5)  # its own tokenizer: resumes


def _caption_table(folder: pathlib.Path, rows: int) -> pathlib.Path:
    folder.mkdir(exist_ok=True)
    for i in range(rows):
        Image.new("RGB", (40, 40), (20 * i % 256, 255 - 20 * i % 256, 90)).save(folder / f"{i}.png")
    table = folder / "t.csv"
    table.write_text("image,caption\n" + "".join(f"{i}.png,picture number {i}\n" for i in range(rows)))
    return table


def test_a_resume_on_a_table_that_changed_is_told(tmp_path, caplog):
    """The stream goes on from the checkpoint's position in the table as it is now: rows appended since the last
    launch moved every later position, silently."""
    table = _caption_table(tmp_path / "data", 12)
    workdir, data = tmp_path / "run", ["--config.data.source=captions", f"--config.data.path={table}"]
    cli.main(train_args(workdir, *data, f"--config.total_steps={HALF}"))
    table.write_text(table.read_text() + "0.png,picture number 0 again\n")
    with caplog.at_level(logging.WARNING, logger="clip_jax.train.loop"):
        cli.main(train_args(workdir, *data))
    assert (f"data.path {table} changed since the run's last launch (12 rows then, 13 now): training goes on from "
            f"the checkpoint's data position (global batch {HALF})") in caplog.text, caplog.text
    assert json.loads((workdir / "train_data.json").read_text())["rows"] == 13


def test_what_tells_a_changed_table_or_shard_set(tmp_path, caplog):
    """A table written again with the same rows, or another data.path (told with the settings), is not a change;
    other rows of the same count, or shards added to a set, are."""
    from clip_jax.config import default_config
    from clip_jax.train.loop import tell_data_changes

    table = _caption_table(tmp_path / "data", 3)
    config = default_config()
    config.data.update(source="captions", path=str(table))

    def told(resume_step=2) -> str:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clip_jax.train.loop"):
            tell_data_changes(tmp_path, config, resume_step)
        return caplog.text

    assert not told(None)  # a new run records it
    table.write_text(table.read_text())  # the same rows, a newer file
    assert not told()
    table.write_text(table.read_text().replace("number 2", "number two"))
    assert "(3 rows then and now, not all the same)" in told()
    assert not told()  # told once: the record is of this launch
    config.data.path = str(_caption_table(tmp_path / "other", 5))
    assert not told()  # the config's data.path changed: the resume's settings line says so
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        (shards / f"s-{i:05d}-of-00003.arrayrecord").write_bytes(b"")
    config.data.update(source="records", path=str(shards / "*.arrayrecord"))
    assert not told()
    (shards / "s-00002-of-00003.arrayrecord").write_bytes(b"")
    assert "(2 shards then, 3 now)" in told()
    # A shard written again under its name (`data convert` of an input that changed): resumed without a word. Its
    # report says when (ArrayRecord pads a shard: its size seldom changes); without one, its size.
    (shards / "s-00001-of-00003.arrayrecord").write_bytes(b"other records")
    assert "(3 shards then and now, not all the same)" in told()
    (shards / "reports").mkdir()
    report = shards / "reports" / "s-00000-of-00003.json"
    report.write_text(json.dumps({"input_fingerprint": {"sha256": "a"}, "finished": "2026-12-07T10:00:00+00:00"}))
    told()
    report.write_text(json.dumps({"input_fingerprint": {"sha256": "b"}, "finished": "2026-12-08T10:00:00+00:00"}))
    assert "(3 shards then and now, not all the same)" in told()
    # A record of an earlier version, without the shards' versions, is compared on what it has
    record = json.loads((tmp_path / "train_data.json").read_text())
    (tmp_path / "train_data.json").write_text(json.dumps({k: v for k, v in record.items() if k != "versions"}))
    assert not told()


def _run_at(workdir: pathlib.Path, config, steps) -> None:
    """A workdir as a run with `config` leaves it: config.json, and checkpoint folders of `steps` (empty: what
    prepare_workdir reads of them is their steps)."""
    from clip_jax.train.loop import prepare_workdir

    prepare_workdir(config, workdir)
    for step in steps:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)


def test_a_resume_that_starts_another_run_is_refused(tmp_path):
    """Another method was accepted (its loss and records then mixed with the run's, and a later launch failed on
    them), and an init_from was written to config.json and never read."""
    from clip_jax.config import default_config
    from clip_jax.train.loop import prepare_workdir

    workdir = tmp_path / "run"
    _run_at(workdir, default_config(), [2, 4])
    other = default_config()
    other.method.name = "siglip"
    with pytest.raises(ConfigError, match=f"workdir {workdir} holds a run of method 'clip' \\(step 4\\), and a "
                                          "resume keeps its method: drop --config.method.name=siglip"):
        prepare_workdir(other, workdir, checkpoint_step=4)
    started = default_config()
    started.init_from = str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=f"init_from {tmp_path / 'elsewhere'} starts a new run only"):
        prepare_workdir(started, workdir, checkpoint_step=4)
    prepare_workdir(default_config(), workdir, checkpoint_step=4)  # its own settings: resumes


def test_a_relaunch_that_would_delete_the_checkpoints_kept_forever_is_refused(tmp_path):
    """A relaunch that left out --config.checkpoint.keep_period let the rotation delete the steps it had kept."""
    from clip_jax.config import default_config
    from clip_jax.train.loop import prepare_workdir

    workdir, kept = tmp_path / "run", default_config()
    kept.checkpoint.update(keep_period=20, max_to_keep=2)
    kept.total_steps = 100
    _run_at(workdir, kept, [20, 40, 50, 60])
    relaunch = default_config()
    relaunch.checkpoint.max_to_keep, relaunch.total_steps = 2, 100
    with pytest.raises(ConfigError, match=r"checkpoints 20, 40, 60 are kept by the run's checkpoint.keep_period 20, "
                                          r"and "
                                          r"this launch's keep_period 0 would let the rotation \(max_to_keep 2\) "
                                          r"delete them: relaunch with --config.checkpoint.keep_period=20"):
        prepare_workdir(relaunch, workdir, checkpoint_step=60)
    relaunch.checkpoint.keep_period = 10  # keeps them too
    prepare_workdir(relaunch, workdir, checkpoint_step=60)


def test_a_complete_run_relaunched_keeps_the_settings_that_trained(tmp_path, caplog):
    """Relaunched with other training settings, it evaluated and wrote them to config.json, though no step had them."""
    from clip_jax.config import default_config, read_config
    from clip_jax.train.loop import prepare_workdir

    workdir, config = tmp_path / "run", default_config()
    config.total_steps = 60
    _run_at(workdir, config, [30, 60])
    relaunch = default_config()
    relaunch.total_steps, relaunch.batch_size = 60, config.batch_size // 2
    with caplog.at_level(logging.WARNING, logger="clip_jax.train.loop"):
        prepare_workdir(relaunch, workdir, checkpoint_step=60)
    assert f"run is complete (step 60): this launch's other settings (batch_size {config.batch_size} -> " in (
        caplog.text.replace(str(workdir) + " is", "run is"))
    assert read_config(workdir / "config.json").batch_size == config.batch_size
    assert not (workdir / "config_until_step_60.json").exists()


def test_a_trained_run_without_its_tokenizer_is_refused_and_readers_write_nothing(tmp_path):
    """A missing tokenizer.json was fitted again (by eval too, into the workdir), from captions that may have changed
    since: other token ids than the model learnt, silently."""
    from clip_jax.config import default_config
    from clip_jax.data.pipeline import make_tokenizer

    config = default_config()
    with pytest.raises(ConfigError, match=f"{tmp_path} has checkpoints and no tokenizer.json: its model's token ids "
                                          "come from the vocabulary that run fitted"):
        make_tokenizer(config, tmp_path, reader=True)
    config.data.tokenizer = "openai"  # a function of the setting: made again, and a reader writes nothing
    assert make_tokenizer(config, tmp_path, reader=True).vocab_size == 49408
    assert not (tmp_path / "tokenizer.json").exists()


def test_a_workdir_that_cannot_be_written_is_refused_at_launch(tmp_path, monkeypatch):
    """A read-only checkpoints/ hung 5 minutes in Orbax's save, then named no cause."""
    from clip_jax.train.loop import check_writable

    (tmp_path / "checkpoints").mkdir()
    check_writable(tmp_path)
    read_only = str(tmp_path / "checkpoints")
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != read_only)  # (root may write anything)
    with pytest.raises(ConfigError, match=f"{read_only} is not writable"):
        check_writable(tmp_path)


def test_a_resume_says_which_changes_move_the_schedule_and_which_change_its_figures(tmp_path, caplog):
    """A weight-decay rule changed by a version's defaults was said as "the learning rate follows the new schedule",
    and an evaluation entry's prompts changed (a default of a newer version) unsaid: metrics.jsonl's figures before
    and after the resume were of two kinds."""
    from clip_jax.config import default_config
    from clip_jax.train.loop import prepare_workdir

    workdir = tmp_path / "run"
    _run_at(workdir, default_config(), [2])
    changed = default_config()
    changed.optimizer.no_decay = ("bias$",)
    changed.evals.shapes.num_examples = 7
    with caplog.at_level(logging.WARNING, logger="clip_jax.train.loop"):
        prepare_workdir(changed, workdir, checkpoint_step=2)
    assert "resuming at step 2 with changed settings (optimizer.no_decay " in caplog.text
    assert "learning rate follows" not in caplog.text and "without --config a relaunch goes on" in caplog.text
    assert "resuming at step 2 with other evaluation settings (evals.shapes.num_examples " in caplog.text
