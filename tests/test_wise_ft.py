"""WiSE-FT (clip_jax/methods/wise_ft.py): the head starts as the zero-shot classifier computed by hand and the
method's first scores are zero-shot CLIP's; the frozen rules it needs; label smoothing against optax; the
interpolation is exactly linear; and `clip-jax wise-ft` on a tiny run: every alpha in the JSON, alpha 1 = the run's
own evaluation, alpha 0 = zero-shot CLIP, bad inputs in one line."""

import json
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from clip_jax.config import ConfigError, load_config, save_config
from clip_jax.data.pipeline import tokenizer_corpus
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.evaluate.encoder import Encoder
from clip_jax.evaluate.suite import eval_defaults, evaluate
from clip_jax.interop.workdir import write_workdir
from clip_jax.losses import classification_loss, shard_loss
from clip_jax.methods import get_method
from clip_jax.methods.base import Preparation
from clip_jax.methods.few_shot import FROZEN as FEW_SHOT_FROZEN
from clip_jax.methods.wise_ft import interpolate
from clip_jax.models.clip import CLIP
from clip_jax.sharding import make_mesh

from .test_methods import CONTEXT, VOCAB, compiled, tiny_config, tiny_few_shot


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer.train(tokenizer_corpus(tiny_config("clip"), 500), VOCAB)


def one_device():
    return make_mesh({"data": 1}, jax.devices()[:1])


def clip_params(config):
    """A randomly initialised CLIP's parameters (the CLIP a run starts from)."""
    clip = CLIP(get_method(config).model_config())
    return nn.unbox(clip.init(jax.random.PRNGKey(0), *get_method(config).init_inputs())["params"])


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- the method ------------------------------------------------------------------------------------------------------
def test_the_head_starts_as_zero_shot_clip(tokenizer):
    config = tiny_few_shot(tiny_config("wise_ft"))
    clip_config = get_method(config).model_config()
    base = clip_params(config)
    method = get_method(config)
    encoder = Encoder(CLIP(clip_config), base, one_device(), 64)
    method.prepare(Preparation(None, tokenizer, True, encoder.images, encoder.texts))
    initial = nn.unbox(jax.jit(method.model().init)(jax.random.PRNGKey(1), *method.init_inputs())["params"])
    started = method.warm_start(base, initial)

    # By hand: the class embeddings (each template's embedding normalised, averaged, renormalised) x exp(logit_scale).
    clip, task = CLIP(clip_config), method.task

    def class_embeddings(classes):
        prompts = [t.format(task.class_names[c]) for c in classes for t in task.templates]
        texts = compiled(clip, CLIP.encode_text)({"params": base}, jnp.asarray(tokenizer(prompts, CONTEXT)))
        return unit(unit(np.asarray(texts)).reshape(len(classes), len(task.templates), -1).mean(axis=1))

    scale = float(np.exp(base["logit_scale"]))
    np.testing.assert_allclose(
        started["learner"]["kernel"], class_embeddings(task.base).T * scale, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(started["learner"]["bias"], np.zeros(len(task.base)))
    assert jax.tree.structure(started) == jax.tree.structure(initial)

    # Its scores, through the head (base classes) or against the zero-shot embeddings (new): zero-shot CLIP's.
    images = task.test.read(range(12))
    features = np.asarray(clip.apply({"params": base}, jnp.asarray(images), method=CLIP.encode_image))
    for classes in (task.base, task.new):
        got = method.scores(started, {"images": images}, classes)
        np.testing.assert_allclose(got, scale * features @ class_embeddings(classes).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "frozen, words",
    [
        (FEW_SHOT_FROZEN, "freezes the image tower (visual/"),
        ((), "trains the text tower or temperature (logit_scale)"),
    ],
)
def test_a_wise_ft_run_must_train_the_image_tower_and_freeze_the_text_tower(frozen, words):
    config = tiny_config("wise_ft")
    config.optimizer.frozen = frozen
    with pytest.raises(ConfigError) as e:
        get_method(config).check(None)
    message = str(e.value)
    assert words in message and "--config.optimizer.frozen=\"('^(text|logit_scale|logit_bias)/?',)\"" in message
    assert "\n" not in message


def test_label_smoothing_is_optaxs_smoothed_cross_entropy():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(6, 5)).astype(np.float32) * 3, np.array([0, 1, 4, 2, 2, 3], np.int32)
    loss = lambda out, *, axis_name: classification_loss(out, axis_name=axis_name, label_smoothing=0.1)
    got, metrics = shard_loss(loss, one_device())({"logits": jnp.asarray(logits), "label": jnp.asarray(labels)}, {})
    want = optax.softmax_cross_entropy(logits, optax.smooth_labels(np.eye(5)[labels], 0.1)).mean()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert float(metrics["train_acc"]) == pytest.approx(np.mean(logits.argmax(-1) == labels))


# --- weight-space ensembling ------------------------------------------------------------------------------------------
def test_the_interpolation_is_exactly_linear():
    rng = np.random.default_rng(0)
    tree = lambda: {
        "visual": {
            "kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32),
        },
        "learner": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)},
        "logit_scale": np.float32(rng.normal()),
    }
    x, y = tree(), tree()
    for trees in ((x, y), jax.tree.map(jnp.asarray, (x, y))):  # host arrays, and device arrays as a run holds them
        for alpha, want in ((0.0, x), (1.0, y)):
            got = interpolate(*trees, alpha)
            jax.tree.map(lambda g, w: np.testing.assert_array_equal(np.asarray(g), w, strict=True), got, want)
        got = interpolate(*trees, 0.3)
        want = jax.tree.map(lambda a, b: 0.7 * a.astype(np.float64) + 0.3 * b.astype(np.float64), x, y)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-6), got, want)
        assert all(np.asarray(g).dtype == np.float32 for g in jax.tree.leaves(got))

    missing = {**y, "learner": {}}
    with pytest.raises(ConfigError, match=r"1 parameters are in one only \(e.g. \['learner'\]\['kernel'\]\)"):
        interpolate(x, missing, 0.5)
    other = {**y, "learner": {"kernel": np.zeros((4, 6), np.float32)}}
    with pytest.raises(
        ConfigError,
        match=r"differ at \['learner'\]\['kernel'\]: shape/dtype \(\(4, 5\), 'float32'\) "
        r"vs \(\(4, 6\), 'float32'\)",
    ):
        interpolate(x, other, 0.5)


# --- clip-jax wise-ft -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wise_ft_run(tmp_path_factory, tokenizer):
    """(folder, config, results, base params): a 2-step wise_ft run in folder/ft from the random CLIP in folder/base.
    Tests may add sweep files to it, and leave its config and checkpoints as they found them."""
    from clip_jax.train.loop import train_and_evaluate

    tmp_path = tmp_path_factory.mktemp("wise_ft")
    base_config = tiny_config("clip")
    base = clip_params(base_config)
    write_workdir(base_config, base, tokenizer, tmp_path / "base")
    config = tiny_few_shot(tiny_config("wise_ft"))
    config.evals = {"few_shot": {**eval_defaults("few_shot"), "shapes_domain": "shifted"}}  # two domains
    config.update(init_from=str(tmp_path / "base"), total_steps=2, batch_size=8)
    config.checkpoint.update(async_save=False)
    config.log.update(progress_bar=False, tensorboard=False)
    results = train_and_evaluate(config, tmp_path / "ft")
    return tmp_path, config, results, base


def test_the_cli_evaluates_every_alpha_of_a_trained_run(wise_ft_run, tmp_path, tokenizer, capsys):
    from clip_jax.cli import main
    from clip_jax.train.loop import load_trained

    run, config, results, base = wise_ft_run
    ft = run / "ft"
    capsys.readouterr()

    main(["wise-ft", "--workdir", str(ft), "--alphas", "0,0.5,1"])
    sweep = json.loads((ft / "wise_ft.json").read_text())
    assert list(sweep) == ["0.0", "0.5", "1.0"]
    keys = {f"few_shot{d}_{g}" for d in ("", "_shifted") for g in ("base", "new", "hm")}
    assert all(set(metrics) == keys for metrics in sweep.values())
    assert sweep["1.0"] == pytest.approx({k: results[k] for k in keys})  # the fine-tuned run's own evaluation
    # alpha 0 is the CLIP the run started from, scored zero-shot by the evaluation (no method)
    zero_shot = evaluate(config, CLIP(get_method(config).model_config()), base, one_device(), tokenizer)
    assert sweep["0.0"] == pytest.approx(zero_shot)
    out = capsys.readouterr().out
    assert "few_shot_shifted_hm" in out.splitlines()[0] and f"wrote {ft / 'wise_ft.json'}" in out

    main(["wise-ft", "--workdir", str(ft), "--alphas", "0.25", "--out", str(tmp_path / "a.json")])
    assert list(json.loads((tmp_path / "a.json").read_text())) == ["0.25"]
    main(["wise-ft", "--workdir", str(ft), "--alphas", "0.75", "--out", str(tmp_path / "a.json")])
    assert list(json.loads((tmp_path / "a.json").read_text())) == ["0.75"]  # an earlier sweep is replaced
    own = (ft / "wise_ft.json").resolve()  # the run's own sweep file, however it is spelt
    main(["wise-ft", "--workdir", str(ft), "--alphas", "0.5", "--out", str(own)])
    assert list(json.loads(own.read_text())) == ["0.5"]

    # alpha is chosen on the val set (docs/few_shot.md): the few-shot entries score few_shot.val there.
    test_sweep = own.read_bytes()
    with pytest.raises(SystemExit):  # test numbers into the val sweep's file: refused, as any file in the workdir
        main(["wise-ft", "--workdir", str(ft), "--alphas", "1", "--out",
              str(ft / "wise_ft_val.json")])
    main(["wise-ft", "--workdir", str(ft), "--alphas", "1", "--split", "val"])
    on_val = json.loads((ft / "wise_ft_val.json").read_text())["1.0"]  # beside the test sweep
    assert own.read_bytes() == test_sweep
    assert set(on_val) == {k.replace("few_shot", "few_shot_val") for k in keys}
    trained = load_trained(ft)  # alpha 1 is the run itself, evaluated with the entry's split set to val
    trained.config.evals.few_shot.split = "val"
    assert on_val == pytest.approx(evaluate(trained.config, trained.model, trained.params, trained.mesh,
                                            trained.tokenizer, method=trained.method))
    assert on_val != pytest.approx({k.replace("few_shot", "few_shot_val"): v for k, v in sweep["1.0"].items()})
    saved = (ft / "config.json").read_text()
    (ft / "config.json").write_text(json.dumps({**json.loads(saved), "evals": {}}))
    capsys.readouterr()
    with pytest.raises(SystemExit):  # no few_shot entry: --split val would score the test sets of the others
        main(["wise-ft", "--workdir", str(ft), "--alphas", "1", "--split", "val", "--out",
              str(tmp_path / "none.json")])
    assert "--split val chooses the set of the run's few_shot evaluations" in capsys.readouterr().err
    (ft / "config.json").write_text(saved)

    # Nothing else is: the run's config.json written over broke it for train, eval and clip_jax.load.
    (tmp_path / "notes.txt").write_text("mine")
    capsys.readouterr()
    for out, words in ((ft / "config.json", "lies inside the clip_jax workdir"),
                       (tmp_path / "notes.txt", "is not an earlier output of this command"), (tmp_path, "is a folder")):
        before = out.read_bytes() if out.is_file() else None
        with pytest.raises(SystemExit) as e:
            main(["wise-ft", "--workdir", str(ft), "--alphas", "0.5", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and words in err and "\n" not in err, err
        assert before is None or out.read_bytes() == before


def test_one_alpha_is_saved_as_a_workdir_that_eval_and_classify_read(wise_ft_run, tmp_path, capsys, caplog):
    from clip_jax.cli import main
    from clip_jax.train.loop import load_trained

    run, config, results, base = wise_ft_run
    ft, saved = run / "ft", tmp_path / "alpha"
    sweeps = {p.name: p.read_bytes() for p in ft.glob("wise_ft*.json")}
    # a relative --workdir: wise_ft_alpha.json names the run by its absolute path, which reads from any folder
    main(["wise-ft", "--workdir", os.path.relpath(ft), "--alphas", "0.25", "--save-workdir", str(saved),
          "--out", str(tmp_path / "sweep.json")])
    assert f"saved alpha 0.25 -> {saved}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in ft.glob("wise_ft*.json")} == sweeps  # the run's sweeps untouched

    # Its parameters, by hand: the towers 3/4 the CLIP the run started from and 1/4 the fine-tuned run's (the text
    # tower, frozen, is the start's); the head 3/4 the zero-shot head (the step-0 head of a fresh start) and 1/4 the
    # trained one.
    tuned, mixed = load_trained(ft), load_trained(saved)
    # its step 0 is its start (a sweep on it, or a new fine-tune from it): no init_from to take precedence
    assert mixed.step == 0 and mixed.config.init_from == ""
    assert mixed.config.to_dict() == {**tuned.config.to_dict(), "init_from": ""}
    tuned_params, mixed_params = jax.device_get(tuned.params), jax.device_get(mixed.params)
    for key in ("visual", "text", "logit_scale"):
        jax.tree.map(lambda m, b, t: np.testing.assert_allclose(m, 0.75 * b + 0.25 * t, rtol=1e-6, atol=1e-7),
                     mixed_params[key], base[key], tuned_params[key])
    jax.tree.map(np.testing.assert_array_equal, mixed_params["text"], base["text"])
    # the zero-shot head of `base` (test_the_head_starts_as_zero_shot_clip checks it by hand)
    zero_shot_head = jax.device_get(tuned.method.init_learner(tuned_params["learner"], base))
    jax.tree.map(lambda m, z, t: np.testing.assert_allclose(m, 0.75 * z + 0.25 * t, rtol=1e-5, atol=1e-6),
                 mixed_params["learner"], zero_shot_head, tuned_params["learner"])
    assert not np.allclose(zero_shot_head["kernel"], tuned_params["learner"]["kernel"])  # training moved the head
    source = json.loads((saved / "wise_ft_alpha.json").read_text())
    assert source == {"alpha": 0.25, "fine_tuned": str(ft), "step": 2, "zero_shot": str(run / "base")}
    assert (saved / "few_shot_classes.npz").read_bytes() == (ft / "few_shot_classes.npz").read_bytes()

    # `eval` of the saved workdir gives the sweep's figures for that alpha, and `classify` reads it.
    main(["eval", "--workdir", str(saved)])
    evaluated = json.loads((saved / "eval_0.json").read_text())
    assert {k: evaluated[k] for k in results if k.startswith("few_shot")} == pytest.approx(
        json.loads((tmp_path / "sweep.json").read_text())["0.25"])
    with caplog.at_level("WARNING"):
        main(["wise-ft", "--workdir", str(saved), "--alphas", "0", "--out", str(tmp_path / "from_saved.json")])
    assert json.loads((tmp_path / "from_saved.json").read_text())["0.0"] == pytest.approx(
        json.loads((tmp_path / "sweep.json").read_text())["0.25"])  # its alpha 0 is theta_0.25, not the base CLIP
    # (not trained since: every alpha is that model, which ran without a word)
    assert f"{saved} is the interpolation at alpha 0.25 of {ft} (wise-ft --save-workdir), not trained since" in \
        caplog.text
    (tmp_path / "images").mkdir()
    image = np.zeros((config.model.vision.image_size,) * 2 + (3,), np.uint8)
    Image.fromarray(image).save(tmp_path / "images" / "black.png")
    main(["classify", "--workdir", str(saved), "--images", str(tmp_path / "images"), "--classes", "base",
          "--out", str(tmp_path / "preds.csv")])
    label = (tmp_path / "preds.csv").read_text().splitlines()[1].split(",")[1]
    assert label in {mixed.method.task.class_names[c] for c in mixed.method.task.base}

    # Refused in one line before anything is read or written: more than one alpha, a folder in use, a bucket.
    capsys.readouterr()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    for alphas, folder, words in (("0.25,0.5", tmp_path / "new", "--save-workdir saves one model: give one alpha"),
                                  ("0.5", tmp_path / "used", "is not empty"),
                                  ("0.5", saved, "is already a clip_jax workdir"),
                                  ("0.5", "gs://bucket/alpha", "the model is saved to a local folder")):
        with pytest.raises(SystemExit) as e:
            main(["wise-ft", "--workdir", str(ft), "--alphas", alphas, "--save-workdir", str(folder)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and words in err and "\n" not in err, err
    assert not (tmp_path / "new").exists() and (tmp_path / "used" / "notes.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in ft.glob("wise_ft*.json")} == sweeps


def test_a_sweep_whose_start_has_moved_says_to_put_it_back(wise_ft_run, tmp_path, capsys):
    """The advice was train's, "point --config.init_from at a workdir that has one": a flag wise-ft refuses."""
    import shutil

    from clip_jax.cli import main

    run, *_ = wise_ft_run
    moved = tmp_path / "ft"
    shutil.copytree(run / "ft", moved)
    config = json.loads((moved / "config.json").read_text())
    config["init_from"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as e:
        main(["wise-ft", "--workdir", str(moved), "--alphas", "0.5"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err, err
    assert f"config.init_from: {tmp_path / 'gone'}, the CLIP this run started from, holds no checkpoint now" in err
    assert "put that workdir back at this path" in err and "--config" not in err


def test_a_start_that_trained_on_since_is_found_among_its_checkpoints(wise_ft_run, tmp_path, tokenizer, capsys):
    """The CLIP of init_from trained on after the run had started from it: wise-ft refused ("not the CLIP this run
    started from") though the step it started from was still there."""
    import shutil

    from clip_jax.cli import main

    run, config, _, base = wise_ft_run
    shutil.copytree(run / "ft", tmp_path / "ft")
    shutil.copytree(run / "base", tmp_path / "base")
    later = jax.tree.map(lambda x: x + 0.5, base)  # its training since: other parameters, a later step
    write_workdir(tiny_config("clip"), later, tokenizer, tmp_path / "later")
    shutil.copytree(tmp_path / "later" / "checkpoints" / "0", tmp_path / "base" / "checkpoints" / "7")
    moved = json.loads((tmp_path / "ft" / "config.json").read_text())
    moved["init_from"] = str(tmp_path / "base")
    (tmp_path / "ft" / "config.json").write_text(json.dumps(moved))
    capsys.readouterr()
    main(["wise-ft", "--workdir", str(tmp_path / "ft"), "--alphas", "0"])
    sweep = json.loads((tmp_path / "ft" / "wise_ft.json").read_text())
    zero_shot = evaluate(config, CLIP(get_method(config).model_config()), base, one_device(), tokenizer)
    assert sweep["0.0"] == pytest.approx(zero_shot)  # alpha 0: the step it started from, not the latest
    shutil.rmtree(tmp_path / "base" / "checkpoints" / "0")  # the start itself gone: refused, naming the steps tried
    with pytest.raises(SystemExit):
        main(["wise-ft", "--workdir", str(tmp_path / "ft"), "--alphas", "0"])
    assert (f"config.init_from {tmp_path / 'base'} no longer holds the CLIP this run started from (step 7: a CLIP "
            "whose text differs from the run's frozen one)") in capsys.readouterr().err
    # a model of another size there: the restore's advice named train's --config flags, which wise-ft has not
    other = tiny_config("clip")
    other.model.embed_dim *= 2  # (a model with more blocks restores into fewer: its text then differs)
    other_params = clip_params(other)
    shutil.rmtree(tmp_path / "base" / "checkpoints" / "7")
    write_workdir(other, other_params, tokenizer, tmp_path / "bigger")
    shutil.copytree(tmp_path / "bigger" / "checkpoints" / "0", tmp_path / "base" / "checkpoints" / "7")
    with pytest.raises(SystemExit):
        main(["wise-ft", "--workdir", str(tmp_path / "ft"), "--alphas", "0"])
    err = capsys.readouterr().err
    assert "(step 7: a model of another size)" in err and "--config" not in err, err


@pytest.mark.parametrize(
    "case, words",
    [
        ("no_checkpoint", "has no checkpoint yet"),
        ("not_wise_ft", "holds a clip run: clip-jax wise-ft interpolates a fine-tuned wise_ft run"),
        ("alpha_outside", "--alphas: 1.5 is outside [0, 1]"),
        ("alpha_unparsable", "--alphas '0,half': give comma-separated numbers in [0, 1]"),
        ("no_workdir", "is not a clip_jax workdir (no config.json)"),
    ],
)
def test_bad_wise_ft_inputs_are_one_line(tmp_path, capsys, case, words):
    from clip_jax.cli import main

    name = "clip" if case == "not_wise_ft" else "wise_ft"
    config = tiny_few_shot(tiny_config(name)) if name == "wise_ft" else tiny_config(name)
    if case != "no_workdir":
        save_config(config, tmp_path / "config.json")
    alphas = {"alpha_outside": "0,1.5", "alpha_unparsable": "0,half"}.get(case, "0,1")
    with pytest.raises(SystemExit) as e:
        main(["wise-ft", "--workdir", str(tmp_path), "--alphas", alphas])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and err.startswith("clip-jax wise-ft: error: ") and "\n" not in err
    assert not (tmp_path / "checkpoints").exists()  # a reader makes no folder in the workdir


@pytest.mark.parametrize("arg, steps, warmup, classes", [
    ("16", 156, 15, "base"), ("128", 1250, 125, "base"), ("128,all", 2500, 250, "all"), ("16,all", 312, 31, "all"),
])
def test_the_b16_recipe_counts_its_epochs_over_the_shots_and_classes_of_its_argument(arg, steps, warmup, classes):
    """10 epochs of K x C images at batch 512, warm-up min(500, a tenth): `:128,all` is the docstring's 2,500 steps
    with 250 of warm-up (an override of few_shot.classes after the recipe would keep the base half's 1,250)."""
    recipe = pathlib.Path(__file__).resolve().parents[1] / "configs" / "wise_ft" / "b16.py"
    config = load_config(f"{recipe}:{arg}")
    assert (config.total_steps, config.optimizer.warmup_steps, config.few_shot.classes) == (steps, warmup, classes)
    assert config.few_shot.shots == int(arg.split(",")[0])


def test_an_export_says_the_classes_head_stays_in_the_workdir(wise_ft_run, tmp_path, capsys):
    """The fine-tuned CLIP exports without its classes' head, which `classify --classes` uses: it said nothing, so
    the exported model classified otherwise, silently (SLIP's, LSeg's and AudioCLIP's exports say what stays)."""
    from clip_jax.cli import main

    run, *_ = wise_ft_run
    main(["export", "--workdir", str(run / "ft"), "--format", "openai", "--out", str(tmp_path / "clip")])
    assert ("note: the export holds the image and text towers; this few-shot run's learner (its classes' prompts, "
            "adapter, cache or head) has no OpenAI or Hugging Face layout and stays in the workdir") in \
        capsys.readouterr().err
