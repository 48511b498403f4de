"""Few-shot transfer (clip_jax/methods/few_shot.py, clip_jax/data/classification.py): the labelled sets and their
mistakes, the K-shot sample and the class split, CoOp's prompts against token embeddings assembled by hand,
Tip-Adapter's logits against the paper's formula in numpy, CLIP-Adapter's and the linear probe's scores by hand,
`clip-jax classify` against the evaluation and against a zero-shot prompt ensemble by hand, and a CoOp run from a
CLIP workdir that resumes from its cached embeddings and evaluates from `clip-jax eval`."""

import json
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from clip_jax.config import ConfigError, apply_overrides, default_config, load_config, validate
from clip_jax.data import classification
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.evaluate import suite
from clip_jax.interop.workdir import write_workdir
from clip_jax.methods import get_method
from clip_jax.methods.few_shot import FROZEN, FewShotCLIP, PromptContext, prompt_layout, tip_logits
from clip_jax.models.clip import CLIP, CLIPConfig

from .test_methods import VOCAB, compiled, prepared, tiny_config, tiny_few_shot

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _write_image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), colour).save(path)


# --- data ----------------------------------------------------------------------------------------------------------
def test_a_folder_set_labels_by_folder_and_reads_only_what_is_asked(tmp_path):
    for i in range(3):
        _write_image(tmp_path / "red_car" / f"{i}.png", (255, 0, 0))
        _write_image(tmp_path / "blue_bus" / f"{i}.png", (0, 0, 255))
    data = classification.folder_set(str(tmp_path), 16)
    assert data.class_names == ["blue bus", "red car"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    images = data.read([0, 4])
    assert images.shape == (2, 16, 16, 3) and images[0, 0, 0].tolist() == [0, 0, 255]
    assert images[1, 0, 0].tolist() == [255, 0, 0]


def test_a_names_file_picks_folders_and_says_which_it_leaves_out(tmp_path, caplog):
    for i in range(2):
        _write_image(tmp_path / "set" / "red_car" / f"{i}.png", (255, 0, 0))
        _write_image(tmp_path / "set" / "blue_bus" / f"{i}.png", (0, 0, 255))
    (tmp_path / "names.txt").write_text("red_car\tred car\n")
    with caplog.at_level("WARNING", logger="clip_jax.data.classification"):
        data = classification.folder_set(str(tmp_path / "set"), 8, str(tmp_path / "names.txt"))
    assert data.class_names == ["red car"] and data.labels.tolist() == [0, 0]
    assert "the folders ['blue_bus'] are not in the names file" in caplog.text


def test_a_table_set_takes_its_classes_and_their_order_from_the_names_file(tmp_path):
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0))):
        _write_image(tmp_path / name, colour)
    (tmp_path / "set.jsonl").write_text('{"image": "a.png", "label": "n01"}\n{"image": "b.png", "label": "n02"}\n')
    (tmp_path / "names.txt").write_text("n02\tgreen thing\nn01\tred thing\n")
    data = classification.table_set(str(tmp_path / "set.jsonl"), 8, str(tmp_path / "names.txt"))
    assert data.class_names == ["green thing", "red thing"]
    assert data.labels.tolist() == [1, 0]


def test_hidden_folders_are_no_classes_and_loose_images_are_told(tmp_path, caplog):
    _write_image(tmp_path / "red" / "0.png", (255, 0, 0))
    (tmp_path / ".ipynb_checkpoints").mkdir()  # Jupyter's; was "the class folder holds no image"
    _write_image(tmp_path / ".git" / "0.png", (1, 2, 3))
    _write_image(tmp_path / "stray.png", (1, 2, 3))  # in no class: left out, as before, but no longer in silence
    # inside a class folder too: a notebook's checkpoint copy was one more example, macOS's ._0.png an undecodable one
    _write_image(tmp_path / "red" / ".ipynb_checkpoints" / "0-checkpoint.png", (255, 0, 0))
    (tmp_path / "red" / "._0.png").write_bytes(b"x")
    with caplog.at_level("WARNING"):
        data = classification.folder_set(str(tmp_path), 8)
    assert data.class_names == ["red"] and len(data) == 1
    assert "1 images at the top are in no class folder and are left out" in caplog.text


@pytest.mark.parametrize("case, words", [
    ("empty_class", "the class folder 'empty' holds no image"),
    ("unknown_label", "the labels ['n03'] are not in the names file"),
    ("too_few_shots", "class 'blue star' has 2 examples, fewer than 3 shots"),
    ("one_name_twice", "the classes 'red circle' and 'red_circle' are both named 'red circle'"),
    ("one_name_two_cases", "the classes 'Red Circle' and 'red circle' are named 'Red Circle' and 'red circle', one "
                           "text to CLIP (its tokenizer lower-cases and undoes HTML entities"),
    ("label_twice", "line 3: the label 'n01' is listed again; list each class once"),
])
def test_bad_few_shot_data_is_one_line(tmp_path, case, words):
    if case == "empty_class":
        _write_image(tmp_path / "full" / "0.png", (1, 2, 3))
        (tmp_path / "empty").mkdir()
        call = lambda: classification.folder_set(str(tmp_path), 8)
    elif case == "unknown_label":
        (tmp_path / "set.csv").write_text("image,label\na.png,n01\nb.png,n03\n")
        (tmp_path / "names.txt").write_text("n01\nn02\n")
        call = lambda: classification.table_set(str(tmp_path / "set.csv"), 8, str(tmp_path / "names.txt"))
    elif case in ("one_name_twice", "one_name_two_cases"):
        for key in ("red_circle", "red circle") if case == "one_name_twice" else ("Red Circle", "red circle"):
            _write_image(tmp_path / key / "0.png", (255, 0, 0))
        call = lambda: classification.folder_set(str(tmp_path), 8)
    elif case == "label_twice":
        (tmp_path / "names.txt").write_text("n01\tred thing\nn02\nn01\tcrimson thing\n")
        call = lambda: classification.read_names(str(tmp_path / "names.txt"))
    else:
        call = lambda: classification.sample_shots(np.array([0, 0, 0, 1, 1]), [0, 1], 3, seed=0,
                                                   class_names=["red circle", "blue star"])
    with pytest.raises(ValueError) as e:
        call()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    """Windows editors may start a UTF-8 file with a byte-order mark: it was read into the first label (the names file's
    'red circle' then matched no folder 'red circle') and into classify's and encode's first text."""
    from clip_jax import cli

    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffred circle\tcrimson disc\r\nblue star\r\n".encode())
    assert classification.read_names(str(path)) == {"red circle": "crimson disc", "blue star": "blue star"}
    assert cli._read_lines(str(path)) == ["red circle\tcrimson disc", "blue star"]


def _folder_task(root, **few_shot):
    """A config of a folder task at `root`: 4 colour classes, 2 training and 3 val and test images each."""
    colours = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0), "yellow": (255, 255, 0)}
    for split, count in (("train", 2), ("val", 3), ("test", 3)):
        for name, colour in colours.items():
            for i in range(count):
                _write_image(root / split / name / f"{i}.png", colour)
    config = default_config()
    config.few_shot.update(dataset="folder", train=str(root / "train"), val=str(root / "val"),
                           test=str(root / "test"), shots=1, **few_shot)
    config.model.vision.image_size = 16
    return config


def test_a_bad_image_stops_the_k_shot_sample_before_training_and_is_skipped_in_the_test_set(tmp_path):
    """A truncated test image was an unexpected error at the end of the run, once training was spent; one in the
    K-shot sample was an unexpected error too, rather than one line naming it."""
    config = _folder_task(tmp_path)
    good = (tmp_path / "test" / "red" / "1.png").read_bytes()
    (tmp_path / "test" / "red" / "1.png").write_bytes(good[: len(good) // 2])
    task, images = suite._few_shot_scored(config.to_json(), "")
    assert task.test.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3] and len(images) == 11
    for i in range(2):  # a base class's images: one of them is in the K-shot sample
        (tmp_path / "train" / "blue" / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"train: cannot decode image .*blue/\d.png .*; replace or remove the file"):
        task.train.read(range(len(task.train)))


def test_a_task_of_one_class_is_refused_and_a_group_of_one_is_told(tmp_path, caplog):
    """One class trained with a loss of 0 and scored 1.0; three split into two base classes and one new one, whose
    top-1 is 1.0 whatever the model: both passed without a word."""
    from clip_jax.data.classification import few_shot_task

    config = _folder_task(tmp_path)
    for colour in ("green", "red", "yellow"):  # blue left alone, in every set
        for split in ("train", "val", "test"):
            shutil.rmtree(tmp_path / split / colour)
    with pytest.raises(ConfigError, match=r"few_shot: .*train holds one class, 'blue': a few-shot task needs two or "
                                          "more"):
        few_shot_task(config)
    for split in ("train", "val", "test"):
        for colour, rgb in (("green", (0, 255, 0)), ("red", (255, 0, 0))):
            _write_image(tmp_path / split / colour / "0.png", rgb)
    with caplog.at_level("WARNING"):
        task = few_shot_task(config)
    assert (len(task.base), len(task.new)) == (2, 1)
    assert "the 3 classes split into 2 base and 1 new: a group of one class scores top-1 1.0" in caplog.text
    assert "(few_shot_new)" in caplog.text
    caplog.clear()
    config.few_shot.classes = "all"
    with caplog.at_level("WARNING"):
        few_shot_task(config)
    assert "a group of one class" not in caplog.text


@pytest.mark.parametrize("name, record", [("clip_adapter", "few_shot_train.npz"), ("maple", "few_shot_classes.npz"),
                                          ("wise_ft", "few_shot_classes.npz")])
def test_a_run_refuses_sets_whose_classes_changed_since_it_was_trained(tmp_path, tokenizer, name, record):
    """A class folder added after training: the same few_shot settings, another task. Evaluated, the base classes
    were other ones than the learner was trained on, without a word. The methods whose batch holds images (MaPLe,
    WiSE-FT) record the classes alone, and read no image to prepare (eval and classify need none). Only a training
    launch writes the record: a reader of a run without one (trained by an earlier version) is not checked."""
    config = tiny_few_shot(tiny_config(name))
    folder = _folder_task(tmp_path / "data")
    config.few_shot.update({k: folder.few_shot[k] for k in ("dataset", "train", "val", "test", "shots")})
    (tmp_path / "run").mkdir()
    prepared(config, tokenizer, tmp_path / "run", training=False)  # a reader (eval, classify) writes nothing
    assert not list((tmp_path / "run").iterdir())
    if record == "few_shot_classes.npz":  # a resume of a run without a record does not guess it from the folders
        prepared(config, tokenizer, tmp_path / "run", resumed=True)
        assert not list((tmp_path / "run").iterdir())
    method = prepared(config, tokenizer, tmp_path / "run")  # the classes recorded (with the K-shot embeddings)
    assert np.load(tmp_path / "run" / record)["class_names"].tolist() == ["blue", "green", "red", "yellow"]
    if method.inputs == "images":
        assert not method.train_arrays
        batch = next(method.train_data(config, tokenizer, range(2)))
        size = config.model.vision.image_size
        assert batch["images"].shape == (2, size, size, 3)
        assert len(method.train_arrays["images"]) == len(method.task.train)
    trained = prepared(config, tokenizer, tmp_path / "run")  # read back: the same classes
    # The sets moved (the workdir copied to another machine to classify): a reader takes the recorded classes, split
    # as in training; a training launch, and whatever reads the sets' images (an evaluation), still needs them.
    shutil.move(tmp_path / "data", tmp_path / "moved")
    reader = prepared(config, tokenizer, tmp_path / "run", training=False)
    assert reader.task.class_names == trained.task.class_names and len(reader.task.test) == 0
    assert (reader.task.base, reader.task.new) == (trained.task.base, trained.task.new)
    with pytest.raises(ConfigError, match=r"^few_shot.train: .*data/train does not exist \(a typo\? A run that has "
                                          "trained reads its sets where it trained on them"):
        reader.task.test.read([0])
    with pytest.raises(ConfigError, match=r"^few_shot.train: .*data/train does not exist"):  # ("few_shot: few_shot.")
        prepared(config, tokenizer, tmp_path / "run")
    shutil.move(tmp_path / "moved", tmp_path / "data")
    for split in ("train", "val", "test"):
        _write_image(tmp_path / "data" / split / "black" / "0.png", (0, 0, 0))
    with pytest.raises(ConfigError, match=r"was trained on other classes than few_shot's sets now hold \(with "
                                          r"\['black'\] too\): restore the sets"):
        prepared(config, tokenizer, tmp_path / "run")


def test_a_folder_task_spreads_its_evaluation_subset_over_the_classes_and_names_a_missing_class(tmp_path):
    """few_shot.eval_examples below a set's size took its first rows, and a folder set is listed class by class:
    the last classes went unscored (a new-class accuracy of NaN, or of one class). A val set without a class was
    refused naming the first three classes of each set, the same three."""
    config = _folder_task(tmp_path, eval_examples=8)
    task = classification.few_shot_task(config)
    assert (task.base, task.new) == ([0, 1], [2, 3])  # the reference split: the first half of the classes is base
    assert task.test.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # two of each class, in the set's order
    assert task.val.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    shutil.rmtree(tmp_path / "val" / "yellow")
    with pytest.raises(ConfigError, match=r"val's classes differ from the training set's \(without \['yellow'\]\)"):
        classification.few_shot_task(config)


def test_the_k_shot_sample_is_k_per_class_and_fixed_by_its_seed():
    labels = np.random.default_rng(0).integers(0, 5, size=200)
    picked = classification.sample_shots(labels, [1, 3, 4], 4, seed=7)
    assert np.bincount(labels[picked], minlength=5).tolist() == [0, 4, 0, 4, 4]
    assert np.array_equal(picked, classification.sample_shots(labels, [1, 3, 4], 4, seed=7))
    assert not np.array_equal(picked, classification.sample_shots(labels, [1, 3, 4], 4, seed=8))


def test_the_class_splits():
    names = [str(i) for i in range(7)]
    assert classification.split_classes(names, "reference") == ([0, 1, 2, 3], [4, 5, 6])
    base, new = classification.split_classes(names, "balanced", seed=3)
    assert sorted(base + new) == list(range(7)) and len(base) == 4
    assert (base, new) == classification.split_classes(names, "balanced", seed=3)
    # shapes: only the 40 pairs seen in pretraining, the first 20 by label are base (red, green, blue, yellow)
    config = default_config()
    config.few_shot.update(shapes_pool=200, eval_examples=20, shots=1, shapes_domain="clean")
    config.model.vision.image_size = 32
    task = classification.few_shot_task(config)
    assert len(task.base) == len(task.new) == 20
    assert {task.class_names[c].split()[0] for c in task.base} == {"red", "green", "blue", "yellow"}
    assert set(task.train.labels) == set(task.base) and set(task.test.labels) <= set(task.base + task.new)


# --- CoOp ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from clip_jax.data.pipeline import tokenizer_corpus

    return ClipTokenizer.train(tokenizer_corpus(tiny_config("clip"), 500), VOCAB)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_coop_prompts_equal_token_embeddings_assembled_by_hand(tokenizer, position):
    config = tiny_config("coop")
    config.method.update(n_ctx=4, class_position=position)
    method = prepared(tiny_few_shot(config), tokenizer)
    model = method.model()
    params = nn.unbox(model.init(jax.random.PRNGKey(1), *method.init_inputs())["params"])
    classes = method.task.base[:3]
    features = np.random.default_rng(2).normal(size=(5, config.model.embed_dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    got = method.scores(params, {"features": features}, classes)

    table = np.asarray(params["text"]["token_embedding"]["embedding"])
    ctx = np.asarray(params["learner"]["ctx"])
    texts = []
    for c in classes:
        name = tokenizer.encode(method.task.class_names[c])
        words = lambda ids: [table[i] for i in ids]
        parts = {"end": [list(ctx), words(name)], "middle": [list(ctx[:2]), words(name), list(ctx[2:])],
                 "front": [words(name), list(ctx)]}[position]
        rows = words([tokenizer.sot_id]) + sum(parts, []) + words([*tokenizer.encode("."), tokenizer.eot_id])
        eot = len(rows) - 1
        rows += words([0] * (config.model.text.context_length - len(rows)))
        texts.append(model.apply({"params": params}, token_embeddings=jnp.asarray(np.stack(rows))[None],
                                 pool_index=jnp.array([eot]),
                                 method=FewShotCLIP.encode_text)[0])
    scale = float(jnp.exp(params["logit_scale"]))
    np.testing.assert_allclose(got, scale * features @ np.stack(texts).T, rtol=1e-5, atol=1e-5)


def test_coop_starts_from_the_phrase_and_counts_its_context_in_tokens(tokenizer, caplog):
    config = tiny_config("coop")
    config.method.ctx_init = "a photo of the"
    with caplog.at_level("INFO", logger="clip_jax.methods.few_shot"):
        method = prepared(tiny_few_shot(config), tokenizer)
    phrase = tokenizer.encode("a photo of the")
    # config.json keeps n_ctx, which read as the context's length: said
    assert (f"method.ctx_init 'a photo of the' gives the learned context its {len(phrase)} tokens (method.n_ctx "
            f"{config.method.n_ctx} is not used)") in caplog.text
    model = method.model()
    initial = nn.unbox(model.init(jax.random.PRNGKey(0), *method.init_inputs())["params"])
    assert initial["learner"]["ctx"].shape == (len(phrase), config.model.text.width)
    clip = {k: v for k, v in initial.items() if k != "learner"}
    started = method.warm_start(clip, initial)
    table = np.asarray(initial["text"]["token_embedding"]["embedding"])
    np.testing.assert_array_equal(started["learner"]["ctx"], table[phrase])


def test_a_prompt_longer_than_the_context_is_one_line(tokenizer):
    with pytest.raises(ConfigError, match="the model's context length is 24: lower method.n_ctx"):
        prompt_layout(tokenizer, "red circle", 22, "end", 24)


@pytest.mark.parametrize("name, ctx_init", [("coop", ""), ("coop", "a photo of a"), ("maple", "a photo of a")])
def test_a_new_class_whose_prompt_cannot_fit_is_refused_before_training(tmp_path, tokenizer, name, ctx_init):
    """The new classes' prompts were laid out at the first evaluation, after the training: its steps were lost, and
    a relaunch with a smaller n_ctx could not load the trained context."""
    config = tiny_few_shot(tiny_config(name))
    config.method.ctx_init = ctx_init
    folder = _folder_task(tmp_path / "data")
    long_name = "zz " + " ".join(["purple"] * 16)  # sorted last: a new class
    for split in ("train", "val", "test"):
        for i in range(2):
            _write_image(tmp_path / "data" / split / long_name / f"{i}.png", (128, 0, 128))
    config.few_shot.update({k: folder.few_shot[k] for k in ("dataset", "train", "val", "test", "shots")})
    method = get_method(config)
    assert method.task.class_names.index(long_name) in method.task.new
    with pytest.raises(ConfigError, match=f"the prompt of class '{long_name}' needs") as error:
        prepared(config, tokenizer)
    # With ctx_init the phrase sets the prompt's length, not n_ctx.
    fix = "shorten method.ctx_init" if config.method.ctx_init else "lower method.n_ctx"
    assert str(error.value).endswith(fix) or f": {fix}" in str(error.value), (config.method.ctx_init, error.value)
    prepared(config, tokenizer, training=False)  # a reader of such a run (trained before the check) still loads it


def test_class_specific_contexts_have_one_context_per_class():
    ctx = PromptContext(3, 8, n_classes=5).init(jax.random.PRNGKey(0))["params"]["ctx"]
    assert ctx.shape == (5, 3, 8) and 0.01 < float(jnp.std(ctx)) < 0.03  # N(0, 0.02)


# --- Tip-Adapter ---------------------------------------------------------------------------------------------------
def test_tip_adapter_logits_are_the_papers_formula():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    f, keys, w = unit(rng.normal(size=(4, 8))), unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(3, 8)))
    values = np.eye(3)[[0, 0, 1, 1, 2, 2]]
    want = np.zeros((4, 3))
    for i in range(4):
        for c in range(3):
            cache = sum(np.exp(-5.0 * (1 - f[i] @ keys[n])) * values[n, c] for n in range(6))
            want[i, c] = 50.0 * f[i] @ w[c] + 2.0 * cache
    got = tip_logits(jnp.asarray(f), jnp.asarray(keys), jnp.asarray(values), jnp.asarray(w), 50.0, 2.0, 5.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_tip_adapter_scores_new_classes_zero_shot(tokenizer, capsys):
    """The cache holds base examples only: on new classes its columns are empty and Tip-Adapter is zero-shot CLIP.
    The alpha and beta it chooses on the validation set are said."""
    method = prepared(tiny_few_shot(tiny_config("tip_adapter")), tokenizer)
    inputs = method.class_inputs(method.task.new)
    assert not inputs["values"].any()
    base = method.class_inputs(method.task.base)["values"]
    assert base.sum(axis=0).tolist() == [method.config.few_shot.shots] * len(method.task.base)
    capsys.readouterr()
    alpha, beta = method.select_alpha_beta(jnp.asarray(method.train_arrays["features"]), 50.0)
    assert alpha in method.hparams.alphas and beta in method.hparams.betas
    # On the console (it was an INFO log record, below what the CLI shows).
    assert f"tip_adapter: alpha {alpha:g} and beta {beta:g} chosen on few_shot.val (top-1 " in capsys.readouterr().out


def test_a_tip_adapter_that_trains_nothing_must_freeze_its_cache():
    config = tiny_config("tip_adapter")
    config.optimizer.frozen = FROZEN
    with pytest.raises(ConfigError, match="add '\\^learner/' to optimizer.frozen"):
        get_method(config).check(None)


def test_a_tip_adapter_f_whose_frozen_rules_freeze_the_cache_is_refused():
    """fine_tune=True over the training-free recipe (its frozen rules hold '^learner/') would train nothing while
    config.json said Tip-Adapter-F: refused in one line naming the rule and the recipe variant that fine-tunes."""
    recipe = str(CONFIGS / "tip_adapter" / "shapes.py")
    config = load_config(recipe, ["--config.method.fine_tune=True"])
    with pytest.raises(ConfigError) as e:
        get_method(config).check(None)
    message = str(e.value)
    assert "method tip_adapter with fine_tune trains nothing: optimizer.frozen rule '^learner/' freezes the cache " \
        "keys (learner/keys)" in message
    assert "configs/tip_adapter/shapes.py:f" in message and "\n" not in message
    get_method(load_config(f"{recipe}:f")).check(None)  # the recipe's own Tip-Adapter-F trains its keys


# --- CLIP-Adapter and the linear probe -----------------------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("method.reduction=0", "method.reduction must be between 1 and model.embed_dim (16), got 0"),
    ("method.reduction=17", "method.reduction must be between 1 and model.embed_dim (16), got 17"),
    ("method.alpha=1.5", "method.alpha must be in [0, 1] (the residual ratio"),
    ("method.alpha=-0.2", "method.alpha must be in [0, 1] (the residual ratio"),
])
def test_clip_adapter_settings_it_cannot_train_are_one_line(tmp_path, override, words):
    """A bottleneck of no width (reduction 0: a ZeroDivisionError; above embed_dim: 0 units) or a residual ratio
    outside [0, 1] is refused when the config is read, before the run prepares anything."""
    config = tiny_config("clip_adapter")
    apply_overrides(config, [f"--config.{override}"])
    with pytest.raises(ConfigError) as e:
        validate(config)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert load_config(str(CONFIGS / "clip_adapter" / "shapes.py"), ["--config.method.reduction=1"])  # the edge


def test_clip_adapter_and_linear_probe_scores_by_hand(tokenizer):
    """CLIP-Adapter: scale * normalise(alpha relu(relu(f A) B) + (1 - alpha) f) . w_c, w_c the prompt ensemble of the
    class (its templates' normalised embeddings averaged, renormalised); the linear probe: f W + b."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    rng = np.random.default_rng(4)
    for name in ("clip_adapter", "linear_probe"):
        config = tiny_few_shot(tiny_config(name))
        method = prepared(config, tokenizer)
        params = nn.unbox(method.model().init(jax.random.PRNGKey(2), *method.init_inputs())["params"])
        learner = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params["learner"])
        params = {**params, "learner": learner}
        f = unit(rng.normal(size=(5, config.model.embed_dim))).astype(np.float32)
        classes = method.task.base[:4] if name == "clip_adapter" else method.task.base
        got = method.scores(params, {"features": f}, classes)
        if name == "linear_probe":
            np.testing.assert_allclose(got, f @ learner["kernel"] + learner["bias"], rtol=1e-5, atol=1e-5)
            continue
        prompts = [t.format(method.task.class_names[c]) for c in classes for t in method.task.templates]
        texts = unit(method.prep.encode_texts(tokenizer(prompts, config.model.text.context_length)))
        w = unit(texts.reshape(len(classes), len(method.task.templates), -1).mean(axis=1))
        relu = lambda x: np.maximum(x, 0)
        alpha = config.method.alpha
        adapted = unit(alpha * relu(relu(f @ learner["down"]["kernel"]) @ learner["up"]["kernel"]) + (1 - alpha) * f)
        scale = min(np.exp(float(params["logit_scale"])), config.model.max_logit_scale)
        np.testing.assert_allclose(got, scale * adapted @ w.T, rtol=1e-4, atol=1e-4)


# --- a run ---------------------------------------------------------------------------------------------------------
def test_coop_trains_from_a_clip_workdir_resumes_from_its_cache_and_evaluates(tmp_path, tokenizer):
    from clip_jax.cli import main
    from clip_jax.train.loop import load_trained, train_and_evaluate

    # The CLIP to start from: a randomly initialised one written as a workdir (what `clip-jax convert` writes).
    base = tiny_config("clip")
    clip = CLIP(CLIPConfig.from_dict(base.model.to_dict()))
    params = nn.unbox(clip.init(jax.random.PRNGKey(0), *get_method(base).init_inputs())["params"])
    write_workdir(base, params, tokenizer, tmp_path / "base")

    config = tiny_few_shot(tiny_config("coop"))
    config.update(init_from=str(tmp_path / "base"), total_steps=4, batch_size=8)
    config.checkpoint.update(async_save=False, every_steps=2)
    config.log.update(progress_bar=False, tensorboard=False)
    results = train_and_evaluate(config, tmp_path / "coop")
    assert {"few_shot_base", "few_shot_new", "few_shot_hm"} <= set(results)
    cache = tmp_path / "coop" / "few_shot_train.npz"
    assert len(np.load(cache)["label"]) == 2 * 20
    before = cache.stat().st_mtime_ns
    config.total_steps = 6
    again = train_and_evaluate(config, tmp_path / "coop")  # resumes at 4, reads the cache
    assert cache.stat().st_mtime_ns == before and again["step"] == 6
    # Other embeddings: refused before config.json is touched.
    domain, config.few_shot.shapes_domain = config.few_shot.shapes_domain, "shifted"
    with pytest.raises(ConfigError, match="holds a run with other few_shot settings .few_shot.shapes_domain"):
        train_and_evaluate(config, tmp_path / "coop")
    config.few_shot.shapes_domain = domain
    # Another learner: the trained context would not load. Refused when the checkpoint is read, config.json as it was.
    run_config = (tmp_path / "coop" / "config.json").read_bytes()
    config.method.n_ctx += 1
    with pytest.raises(ConfigError, match=r"holds parameters of another model \(\['learner'\]\['ctx'\] of shape"):
        train_and_evaluate(config, tmp_path / "coop")
    assert (tmp_path / "coop" / "config.json").read_bytes() == run_config
    config.method.n_ctx -= 1
    main(["eval", "--workdir", str(tmp_path / "coop")])
    evaluated = json.loads((tmp_path / "coop" / "eval_6.json").read_text())
    assert evaluated["few_shot_base"] == pytest.approx(again["few_shot_base"])
    # Read back, the run embeds with the towers of its own checkpoint, which holds the learner too (the zero-shot
    # class embeddings of CLIP-Adapter, Tip-Adapter and WiSE-FT come from there).
    trained = load_trained(tmp_path / "coop")
    tokens = tokenizer(["a red circle."], config.model.text.context_length)
    want = clip.apply({"params": params}, jnp.asarray(tokens), method=CLIP.encode_text)
    np.testing.assert_allclose(trained.method.prep.encode_texts(tokens), want, atol=1e-5)

    # classify: the base-class test images as files; its predictions among the base classes score what eval did.
    task = classification.few_shot_task(config)
    rows = np.flatnonzero(np.isin(task.test.labels, task.base))
    (tmp_path / "images").mkdir()
    for row, image in zip(rows, task.test.read(rows), strict=True):
        Image.fromarray(image).save(tmp_path / "images" / f"{row:03d}.png")  # lossless: the pixels eval scored
    main(["classify", "--workdir", str(tmp_path / "coop"), "--images", str(tmp_path / "images"), "--classes", "base",
          "--out", str(tmp_path / "preds.csv")])
    predicted = {line.split(",")[0]: line.split(",")[1]
                 for line in (tmp_path / "preds.csv").read_text().splitlines()[1:]}
    hits = [predicted[str(tmp_path / "images" / f"{row:03d}.png")] == task.class_names[task.test.labels[row]]
            for row in rows]
    assert len(predicted) == len(rows) and np.mean(hits) == pytest.approx(evaluated["few_shot_base"])


def test_zero_shot_classify_is_the_prompt_ensemble_by_hand(tmp_path, tokenizer, capsys, monkeypatch):
    from clip_jax.cli import main

    config = tiny_config("clip")
    clip = CLIP(CLIPConfig.from_dict(config.model.to_dict()))
    params = nn.unbox(jax.jit(clip.init)(jax.random.PRNGKey(3), *get_method(config).init_inputs())["params"])
    write_workdir(config, params, tokenizer, tmp_path / "clip")
    size = config.model.vision.image_size
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    names = ["red circle", "blue square", "green triangle"]
    (tmp_path / "names.txt").write_text("\n\n".join(names) + "\n \n")  # blank lines name no class

    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit) as exit_info:  # CLIP itself has no classes: it needs names
        main(["classify", "--workdir", str(tmp_path / "clip"), "--images", str(tmp_path / "images"),
              str(tmp_path / "broken.png"), "--out", str(tmp_path / "preds.csv")])
    err = capsys.readouterr().err.strip()  # that error alone, before any image is read (no warning on broken.png)
    assert exit_info.value.code == 2 and "--names FILE" in err and len(err.splitlines()) == 1, err
    main(["classify", "--workdir", str(tmp_path / "clip"), "--images", str(tmp_path / "images"),
          "--names", str(tmp_path / "names.txt"), "--out", str(tmp_path / "preds.csv")])

    # By hand: each class's prompt ensemble of the shapes prompts (a run on shapes: its evaluations' prompts), the
    # images' embeddings, CLIP's clamped scale, a softmax.
    from clip_jax.data.shapes import ZERO_SHOT_TEMPLATES

    variables = {"params": params}
    unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
    tokens = tokenizer([t.format(n) for n in names for t in ZERO_SHOT_TEMPLATES], config.model.text.context_length)
    text = unit(unit(compiled(clip, CLIP.encode_text)(variables, jnp.asarray(tokens))).reshape(
        len(names), len(ZERO_SHOT_TEMPLATES), -1).mean(axis=1))
    image = unit(compiled(clip, CLIP.encode_image)(variables, jnp.asarray(images)))
    logits = min(np.exp(float(params["logit_scale"])), config.model.max_logit_scale) * image @ text.T
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    lines = (tmp_path / "preds.csv").read_text().splitlines()
    assert lines[0] == "image,label,probability"
    for i, line in enumerate(lines[1:]):
        path, label, probability = line.split(",")
        assert path.endswith(f"{i}.png") and label == names[int(np.argmax(logits[i]))]
        assert float(probability) == pytest.approx(probabilities[i].max(), abs=1e-4)
    assert f"prompted by the shapes prompts of its evaluations ('{ZERO_SHOT_TEMPLATES[0]}'" in capsys.readouterr().out

    # --templates: each name's prompts embedded, each embedding normalised, averaged and normalised again.
    templates = ["a {}.", "a drawing of the {} shape."]
    main(["classify", "--workdir", str(tmp_path / "clip"), "--images", str(tmp_path / "images"),
          "--names", str(tmp_path / "names.txt"), "--out", str(tmp_path / "templated.csv"), "--templates", *templates])
    assert "prompted by --templates ('a {}.', 'a drawing of the {} shape.')" in capsys.readouterr().out
    tokens = tokenizer([t.format(n) for n in names for t in templates], config.model.text.context_length)
    per_prompt = unit(clip.apply(variables, jnp.asarray(tokens), method=CLIP.encode_text)).reshape(3, 2, -1)
    ensemble = unit(per_prompt.mean(axis=1))
    templated = min(np.exp(float(params["logit_scale"])), config.model.max_logit_scale) * image @ ensemble.T
    for i, line in enumerate((tmp_path / "templated.csv").read_text().splitlines()[1:]):
        assert line.split(",")[1] == names[int(np.argmax(templated[i]))]
        top = np.exp(templated[i] - templated[i].max())
        assert float(line.split(",")[2]) == pytest.approx(top.max() / top.sum(), abs=1e-4)
    for flags, words in ((["--templates", "a photo"], "--templates 'a photo': a template needs one {}"),
                         (["--templates", "a {}."], "--templates prompt the class names of --names FILE")):
        names_flag = ["--names", str(tmp_path / "names.txt")] if "a photo" in flags else []
        with pytest.raises(SystemExit):
            main(["classify", "--workdir", str(tmp_path / "clip"), "--images", str(tmp_path / "images"), *names_flag,
                  "--out", str(tmp_path / "bad.csv"), *flags])
        assert words in capsys.readouterr().err

    # read and scored two images at a time: the same
    monkeypatch.setattr("clip_jax.data.images.image_chunk_size", lambda batch_size: 2)
    main(["classify", "--workdir", str(tmp_path / "clip"), "--images", str(tmp_path / "images"),
          "--names", str(tmp_path / "names.txt"), "--out", str(tmp_path / "chunked.csv"), "--batch-size", "1"])
    assert (tmp_path / "chunked.csv").read_text() == (tmp_path / "preds.csv").read_text()
    # Two names of one text to the tokenizer (it lower-cases) would split one class's probability between them.
    (tmp_path / "names.txt").write_text("red circle\nblue square\nRed  Circle\n")
    with pytest.raises(SystemExit):
        main(["classify", "--workdir", str(tmp_path / "clip"), "--images", str(tmp_path / "images"),
              "--names", str(tmp_path / "names.txt"), "--out", str(tmp_path / "preds2.csv")])
    err = capsys.readouterr().err
    assert "--names: 'red circle' and 'Red Circle' are one text to this model" in err and not (
        tmp_path / "preds2.csv").exists()


def test_a_group_a_method_cannot_score_is_refused_before_any_image_is_read():
    """classify on a linear probe with the default --classes all decoded every image of --images first, then said
    that the probe scores its training classes only."""
    import types

    from clip_jax.errors import UnscorableClasses
    from clip_jax.evaluate.classify import requested_classes

    class Probe:
        scores = True  # a few-shot method: it scores classes of its own
        task = types.SimpleNamespace(base=[0, 1], new=[2], class_names=["red", "green", "blue"])

        def class_inputs(self, classes):
            if list(classes) != self.task.base:
                raise UnscorableClasses("a linear probe scores only its training classes")
            return {}

    trained = types.SimpleNamespace(config=tiny_config("linear_probe"), method=Probe())
    assert requested_classes(trained, "base").names == ("red", "green")
    for group in ("all", "new"):
        with pytest.raises(ConfigError, match=f"method linear_probe cannot score --classes {group} \\(a linear probe "
                                              "scores only its training classes\\): use --classes base"):
            requested_classes(trained, group)


# --- the ViT-B/16 recipes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe, arg, epochs, batch", [
    ("coop", "oxford_flowers102", 200, 32), ("coop", "dtd,ctxv1", 200, 32), ("cocoop", "dtd", 10, 1),
    ("maple", "oxford_flowers102", 5, 4), ("clip_adapter", "dtd", 200, 32),
    ("linear_probe", "oxford_flowers102", 100, 32),
    ("tip_adapter", "oxford_flowers102,f", 20, 256),
])
def test_a_b16_recipe_on_all_classes_counts_its_epochs_over_all_of_them(recipe, arg, epochs, batch):
    """`:<set>,all` trains on every class for the recipe's epochs (an override of few_shot.classes after the recipe
    would keep the steps of the base half: half the epochs)."""
    spec = str(CONFIGS / recipe / "b16.py")
    classes = {"oxford_flowers102": 102, "dtd": 47}[arg.split(",")[0]]
    base, every = load_config(f"{spec}:{arg}"), load_config(f"{spec}:{arg},all")
    assert (base.few_shot.classes, every.few_shot.classes) == ("base", "all")
    per_epoch = lambda n: -(-16 * n // batch)
    assert base.total_steps == epochs * per_epoch(-(-classes // 2))
    assert every.total_steps == epochs * per_epoch(classes)
    assert every.optimizer.warmup_steps == per_epoch(classes)  # one epoch
    for part in ("model", "method"):
        assert base[part].to_dict() == every[part].to_dict()


def test_a_b16_recipe_refuses_an_unknown_option_in_one_line():
    with pytest.raises(ConfigError, match=r"unknown option 'al' .*'all' \(train on every class\)") as e:
        load_config(str(CONFIGS / "coop" / "b16.py") + ":dtd,al")
    assert "\n" not in str(e.value)
