"""The evaluations a config lists (`config.evals`, clip_jax/evaluate/suite.py): entries added, dropped and checked
from the command line; old workdirs' eval fields migrated; the periods; the zero-shot evaluators on a folder of
class folders and on a TFDS set, scored against hand-computed accuracies with an encoder whose embeddings are known."""

import dataclasses
import functools
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from clip_jax.config import ConfigError, check_input_paths, load_config, read_config
from clip_jax.data.folder_source import ImageFolderSource
from clip_jax.data.images import list_images
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.evaluate import suite

DEMO = "configs/demo.py"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


# --- configuration ------------------------------------------------------------------------------------------------
def test_entries_are_added_set_and_dropped_from_the_command_line(tmp_path):
    config = load_config(DEMO, [
        f"--config.evals.pets={{'type': 'zero_shot_folder', 'path': '{tmp_path}'}}",
        "--config.evals.pets.num_examples=50",
        "--config.evals.shapes=None",
    ])
    assert list(config.evals) == ["pets"]
    assert config.evals.pets.to_dict() == {**suite.eval_defaults("zero_shot_folder"), "path": str(tmp_path),
                                           "num_examples": 50}


@pytest.mark.parametrize("overrides, words", [
    (["--config.evals.x={'type': 'zero_shot_flder'}"], "unknown evaluator type 'zero_shot_flder'; choose one of"),
    (["--config.evals.x={'path': '/tmp'}"], "an evaluation is a dict with a 'type'"),
    (["--config.evals.x={'type': 'zero_shot_folder'}"], "evals.x (zero_shot_folder) needs path"),
    (["--config.evals.x={'type': 'shapes', 'pth': 1}"], "unknown config key 'evals.x.pth'"),
    (["--config.evals.shapes.num_examples='10'"], "'evals.shapes.num_examples' must be"),
    (["--config.evals.fs={'type': 'few_shot', 'split': 'tset'}"],  # found before the training, not after it
     "config key 'evals.fs.split' is 'tset': choose one of 'test', 'val'"),
    (["--config.eval.long_text=True"], "--config.evals.shapes_long_text="),
    # a probability: above 1 every pixel was background, scored as a result (segment refuses it too)
    (["--config.evals.s={'type': 'segmentation_folder', 'path': '/tmp', 'threshold': 1.5}"],
     "config key 'evals.s.threshold' must be in [0, 1], got 1.5"),
])
def test_entry_mistakes_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    assert words in str(e.value)


def test_an_entry_set_to_none_in_a_config_file_is_told_how_to_drop_it(tmp_path):
    (tmp_path / "mine.py").write_text("from configs.demo import get_config as demo\n\n\ndef get_config():\n"
                                      "    config = demo()\n    config.evals.shapes = None\n    return config\n")
    with pytest.raises(ConfigError, match=r"to drop the entry in a config file, `del config.evals\['shapes'\]`"):
        load_config(str(tmp_path / "mine.py"))


def test_dropping_an_evaluation_the_run_lacks_is_said_not_refused(caplog):
    """A command that dropped an entry (the README's fine-tune: --config.evals.shapes=None) is re-run as it was to
    resume, and the run's config.json has that entry no more: it was refused, and the run could not resume."""
    config = load_config(DEMO, ["--config.evals.shapes=None"])
    assert "shapes" not in config.evals
    with caplog.at_level("WARNING"):
        again = load_config(DEMO, ["--config.evals.shapes=None", "--config.evals.shapes=None"])
    assert again.evals.to_dict() == config.evals.to_dict()
    assert "override '--config.evals.shapes=None': no evaluation named 'shapes' to drop (the run has " in caplog.text


def test_a_missing_path_is_found_when_the_run_starts_not_when_the_config_loads():
    config = load_config(DEMO, ["--config.evals.x={'type': 'long_text_set', 'path': '/no/such/set'}"])
    assert config.evals.x.path == "/no/such/set"  # a workdir whose data moved still loads, evaluates, exports
    with pytest.raises(ConfigError, match="evals.x.path: /no/such/set does not exist"):
        check_input_paths(config, training=False)


def test_an_audio_table_is_read_before_training(tmp_path):
    """A wrong audio_root, or a table whose files are not there, stopped the run after training, at its evaluation."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "labels.csv").write_text("filename,category\na.wav,dog\nb.wav,cat\n")
    entry = f"{{'type': 'zero_shot_audio_folder', 'path': '{tmp_path / 'labels.csv'}'"
    config = load_config(DEMO, [f"--config.evals.esc={entry}, 'audio_root': '{tmp_path / 'clipz'}'}}"])
    with pytest.raises(ConfigError, match=r"evals.esc.audio_root: .*clipz does not exist"):
        check_input_paths(config)
    config = load_config(DEMO, [f"--config.evals.esc={entry}, 'audio_root': '{tmp_path / 'clips'}'}}"])
    with pytest.raises(ConfigError, match=r"evals.esc: 2 of the 2 audio files of .*labels.csv do not exist"):
        check_input_paths(config)


def test_a_config_json_with_the_old_eval_fields_reads_as_entries(tmp_path):
    data = json.loads(json.dumps(load_config(DEMO).to_dict(), default=list))
    del data["evals"]
    data["eval"].update(long_text=True, long_text_set="/data/urban1k")
    (tmp_path / "config.json").write_text(json.dumps(data))
    evals = read_config(tmp_path / "config.json").evals.to_dict()
    assert evals == {"shapes": suite.eval_defaults("shapes"),
                     "shapes_long_text": suite.eval_defaults("shapes_long_text"),
                     "long_set": {**suite.eval_defaults("long_text_set"), "path": "/data/urban1k"}}
    data["eval"].update(long_text=False, long_text_set="")  # the defaults: only the shapes suite
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert list(read_config(tmp_path / "config.json").evals) == ["shapes"]


def test_each_entry_runs_at_its_own_period():
    config = load_config(DEMO, ["--config.eval.every_steps=100",
                                "--config.evals.long={'type': 'shapes_long_text', 'every_steps': 30}",
                                "--config.evals.end={'type': 'shapes', 'every_steps': 0}"])
    assert suite.due(config, 100) == ["shapes"]  # configs/demo.py's shapes entry takes eval.every_steps
    assert sorted(suite.due(config, 300)) == ["long", "shapes"]
    assert suite.due(config, 30) == ["long"]
    assert suite.due(config, 7) == []


def test_a_shapes_entry_on_a_run_of_other_data_is_skipped_and_said_once(caplog):
    config = load_config(DEMO, ["--config.data.source=captions", "--config.data.path=unused.csv"])
    ctx = suite.Context(config, None, None)
    entry = suite.parse_entry("shapes", config.evals.shapes.to_dict())
    with caplog.at_level("WARNING", logger="clip_jax.evaluate"):
        assert suite.run_shapes(ctx, "shapes_other_data", entry) == {}
        assert suite.run_shapes(ctx, "shapes_other_data", entry) == {}  # every evaluation step: said only once
    said = [r.message for r in caplog.records if "evals.shapes_other_data: skipped" in r.message]
    assert len(said) == 1 and "not trained on shapes" in said[0]


def test_results_of_skipped_entries_alone_say_so(capsys):
    suite.print_results({"step": 40})
    assert capsys.readouterr().out.strip() == ("no evaluation results at step 40 (config.evals is empty, or every "
                                               "entry was skipped: the warnings above say why)")
    suite.print_results({"step": 40, "shapes_top1": 0.5})
    assert "shapes_top1" in capsys.readouterr().out


# --- the zero-shot evaluators, with an encoder whose embeddings are known ---------------------------------------------
class ColourEncoder:
    """Embeds an image as the one-hot of its brightest channel (red, green, blue)."""

    def images(self, images):
        return np.eye(3, dtype=np.float32)[np.asarray(images, np.float32).mean(axis=(1, 2)).argmax(-1)]


@dataclasses.dataclass(frozen=True)
class KnownContext(suite.Context):
    """A text is embedded as the one-hot of the colour it names (no tokenizer, no model)."""

    def texts(self, texts):
        return np.stack([np.eye(3, dtype=np.float32)[[c in t for c in COLOURS].index(True)] for t in texts])


@functools.cache
def colour_tokenizer() -> ClipTokenizer:
    """A small BPE tokenizer of the colours' texts: what the evaluators tokenize besides embedding (a check that two
    class names are one prompt)."""
    return ClipTokenizer.train([f"a photo of a {c} thing." for c in COLOURS] * 3, 600)


def context(config):
    return KnownContext(config, ColourEncoder(), tokenizer=colour_tokenizer())


@pytest.mark.parametrize("encoder", ["words", "salient_colour", "pairs"])
def test_the_binding_tests_score_what_the_embeddings_hold(encoder):
    """`shapes_binding` with embeddings that are known: "words", a bag of the colour and shape words of the text
    and of the image's salient object; "salient_colour", the same without the image's shape; "pairs", a bag of the
    colour-shape pairs a text names and the image holds (all its objects). A replaced word the image holds always
    loses, one it does not hold ties (a failure); a swap of colours between two objects ties for bags of words and
    loses for pairs, unless the image holds the swapped pair too (another of its objects)."""
    from clip_jax.data.pipeline import get_source, shapes_held_out_split
    from clip_jax.data.shapes import COLOURS as PALETTE
    from clip_jax.data.shapes import SHAPES

    config = load_config(DEMO, ["--config.eval.num_examples=40", "--config.data.shapes_validation_pairs=True"])
    words, pairs = [*PALETTE, *SHAPES], [f"{c} {s}" for c in PALETTE for s in SHAPES]
    held_out = shapes_held_out_split(config)[0]
    image_tokens = {}  # image bytes -> what the image encoder holds of it
    for split, n in ((held_out, 40), ("test_seen", 800)):  # the swap test reads up to 20 x 40 scenes
        source = get_source(config, split)
        for i in range(n):
            scene = source.scene(i)
            salient = scene.salient
            held = {"words": {salient.colour, salient.shape}, "salient_colour": {salient.colour},
                    "pairs": {f"{o.colour} {o.shape}" for o in scene.objects}}[encoder]
            image_tokens[source[i]["image"].tobytes()] = held

    def bag(tokens):
        vocabulary = pairs if encoder == "pairs" else words
        vector = np.array([t in tokens for t in vocabulary], np.float32) + 1e-3  # never all zeros
        return vector / np.linalg.norm(vector)

    def text_tokens(text):
        text = text.rstrip(".").replace(" an ", " a ").removeprefix("an ").removeprefix("a ")
        if encoder != "pairs":
            return set(text.split())
        return {" ".join(part.split()[-2:]) for part in text.split(" and a ")}

    class KnownImages:
        def images(self, images):
            return np.stack([bag(image_tokens[image.tobytes()]) for image in images])

    @dataclasses.dataclass(frozen=True)
    class KnownTexts(suite.Context):
        def texts(self, texts):
            return np.stack([bag(text_tokens(t)) for t in texts])

    entry = suite.parse_entry("binding", suite.eval_defaults("shapes_binding"))
    got = suite.run_shapes_binding(KnownTexts(config, KnownImages(), None), "binding", entry)
    assert set(got) == {f"binding_{a}_acc{s}" for a in ("colour", "shape") for s in ("_val", "_seen")} | {
        "binding_swap_acc"}
    if encoder == "pairs":
        assert got["binding_swap_acc"] >= 0.9  # 1.0 but where a third object is one of the swapped pairs
    else:
        shape = 1.0 if encoder == "words" else 0.0
        assert got == {"binding_colour_acc_val": 1.0, "binding_shape_acc_val": shape, "binding_colour_acc_seen": 1.0,
                       "binding_shape_acc_seen": shape, "binding_swap_acc": 0.0}


def test_the_binding_tests_of_single_object_scenes_leave_out_the_swap(caplog):
    class Flat:
        def images(self, images):
            return np.ones((len(images), 4), np.float32)

    @dataclasses.dataclass(frozen=True)
    class FlatTexts(suite.Context):
        def texts(self, texts):
            return np.ones((len(texts), 4), np.float32)

    config = load_config(DEMO, ["--config.eval.num_examples=8", "--config.data.max_objects=1"])
    entry = suite.parse_entry("binding", suite.eval_defaults("shapes_binding"))
    with caplog.at_level("INFO"):
        got = suite.run_shapes_binding(FlatTexts(config, Flat(), None), "binding", entry)
    assert set(got) == {f"binding_{a}_acc{s}" for a in ("colour", "shape") for s in ("", "_seen")}
    assert set(got.values()) == {0.0}  # every pair ties
    assert "no binding_swap_acc: no test scene has two objects" in caplog.text


def write_folder(root, misfiled: int):
    """Class folders red/green/blue with 4 images of their colour each, except `misfiled` blue images filed under
    green, and one file that is not an image."""
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            colour = COLOURS["blue"] if name == "green" and i < misfiled else rgb
            Image.new("RGB", (20, 20), colour).save(root / name / f"{i}.png")
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg")


def test_two_long_text_sets_keep_their_own_results(tmp_path, caplog):
    # "one": a red and a blue image, both captioned red (in other words)
    sets = {"three": [("red", "red"), ("green", "green"), ("blue", "blue")], "one": [("red", "red"), ("blue", "red")]}
    for name, pairs in sets.items():
        (tmp_path / name).mkdir()
        captions = {}
        for i, (colour, said) in enumerate(pairs):
            Image.new("RGB", (20, 20), COLOURS[colour]).save(tmp_path / name / f"{i}.png")
            captions[f"{i}.png"] = f"a long caption, number {i}, about a {said} square"
        (tmp_path / name / "pairs.json").write_text(json.dumps(captions))
    entries = [f"--config.evals.{n}={{'type': 'long_text_set', 'path': '{tmp_path / n / 'pairs.json'}'}}" for n in sets]
    config = load_config(DEMO, entries)
    got = {}
    for name in ("three", "one"):
        got |= suite.run_long_text_set(context(config), name, suite.parse_entry(name, config.evals[name].to_dict()))
    # "three": every caption names its image's colour alone: all found. "one": both captions embed as red, so each
    # image's two captions tie and its own is first half of the time (ties count evenly).
    assert got["three_i2t_r1"] == 1.0 and got["three_t2i_r1"] == 1.0 and got["three_skipped"] == 0
    assert got["one_i2t_r1"] == 0.5 and got["one_skipped"] == 0

    assert "evals.three: 3 images, so its text-to-image R@5/R@10 is 1.0 whatever the model" in caplog.text

    # a caption table whose red image has two captions: one image of two captions, not two images that tie
    (tmp_path / "table.csv").write_text("image,caption\nthree/0.png,a red square\nthree/2.png,a blue square\n"
                                        "three/0.png,a red square again\n")
    config = load_config(DEMO, [f"--config.evals.table={{'type': 'long_text_set', 'path': '{tmp_path}/table.csv'}}"])
    got = suite.run_long_text_set(context(config), "table", suite.parse_entry("table", config.evals.table.to_dict()))
    assert got["table_i2t_r1"] == got["table_t2i_r1"] == 1.0 and got["table_skipped"] == 0


class WordTokens:
    """A tokenizer of one token a word."""

    def encode(self, text: str) -> list[str]:
        return text.split()


def test_a_long_text_set_says_how_many_captions_the_context_cuts(tmp_path, caplog):
    """A set of "long" captions scored on their first 24 tokens without a word (captions that differ after the cut
    tie: retrieval at chance)."""
    (tmp_path / "set").mkdir()
    captions = {}
    for i, words in enumerate((10, 22, 23, 40)):  # 22 words + start and end: 24 tokens, the demo's context
        Image.new("RGB", (20, 20), COLOURS["red"]).save(tmp_path / "set" / f"{i}.png")
        captions[f"{i}.png"] = " ".join(["red"] * words)
    (tmp_path / "set" / "pairs.json").write_text(json.dumps(captions))
    path = tmp_path / "set" / "pairs.json"
    config = load_config(DEMO, [f"--config.evals.long={{'type': 'long_text_set', 'path': '{path}'}}"])
    with caplog.at_level("WARNING"):
        suite.run_long_text_set(KnownContext(config, ColourEncoder(), tokenizer=WordTokens()), "long",
                                suite.parse_entry("long", config.evals.long.to_dict()))
    assert "evals.long: 2 of the 4 captions are longer than the model's 24 tokens" in caplog.text


def test_zero_shot_folder_scores_the_fraction_filed_right(tmp_path):
    write_folder(tmp_path / "set", misfiled=3)
    config = load_config(DEMO, [f"--config.evals.colours={{'type': 'zero_shot_folder', 'path': '{tmp_path / 'set'}', "
                                "'templates': ('a {} thing.', 'the colour {}.')}"])
    entry = suite.parse_entry("colours", config.evals.colours.to_dict())
    got = suite.run_zero_shot_folder(context(config), "colours", entry)
    # 12 readable images, 3 of them blue in the green folder: 9 right; no top-5 among 3 classes (always 1.0)
    assert got == {"colours_top1": 9 / 12, "colours_skipped": 1}


def test_zero_shot_folder_of_wordnet_ids_prompts_with_its_names_file(tmp_path, caplog):
    """ImageNet's layout names its class folders by WordNet id: a names_file gives their class names (the same
    figures as folders named by colour, above); one that leaves a folder out is refused before training, and ids
    left as the prompts' class names are warned of."""
    write_folder(tmp_path / "named", misfiled=3)
    ids = {"red": "n00000001", "green": "n00000002", "blue": "n00000003"}
    (tmp_path / "set").mkdir()
    for colour, wordnet_id in ids.items():
        (tmp_path / "named" / colour).rename(tmp_path / "set" / wordnet_id)
    names = tmp_path / "names.txt"
    names.write_text("# WordNet id, class name\n" + "".join(f"{i}\t{c}\n" for c, i in ids.items()))
    entry = f"{{'type': 'zero_shot_folder', 'path': '{tmp_path / 'set'}', 'templates': ('a {{}} thing.',)"
    config = load_config(DEMO, [f"--config.evals.ids={entry}, 'names_file': '{names}'}}"])
    check_input_paths(config)
    got = suite.run_zero_shot_folder(context(config), "ids", suite.parse_entry("ids", config.evals.ids.to_dict()))
    assert got == {"ids_top1": 9 / 12, "ids_skipped": 1}
    names.write_text("n00000001\tred\nn00000002\tgreen\n")
    with pytest.raises(ConfigError, match=r"evals.ids.names_file: .*names.txt names no class for the folders "
                                          r"\['n00000003'\]; give each class folder one line"):
        check_input_paths(config)
    config = load_config(DEMO, [f"--config.evals.ids={entry}}}"])
    with caplog.at_level("WARNING"), pytest.raises(ValueError):  # (the stand-in text encoder knows colours only)
        suite.run_zero_shot_folder(context(config), "ids", suite.parse_entry("ids", config.evals.ids.to_dict()))
    assert ("the class folders of " in caplog.text and "are WordNet ids (n00000001, ...), and the prompts say them as "
            "they are ('a n00000001 thing.'): give the entry a names_file" in caplog.text)


def test_class_names_cut_to_one_prompt_by_the_context_are_refused(tmp_path):
    """Names the cleaning tells apart whose prompts the context cuts to the same tokens (Hindi in OpenAI's
    vocabulary, ~3 tokens a character) were scored, one of them never predicted; classify refused them."""
    write_folder(tmp_path / "set", misfiled=0)
    names = tmp_path / "names.txt"
    long = "red green blue " * 6
    names.write_text(f"red\t{long}red\ngreen\t{long}green\nblue\tblue\n")
    entry = f"{{'type': 'zero_shot_folder', 'path': '{tmp_path / 'set'}', 'names_file': '{names}'}}"
    config = load_config(DEMO, [f"--config.evals.cut={entry}", "--config.model.text.context_length=16"])
    check_input_paths(config)  # the cleaning tells them apart; the tokenizer is the run's, known at evaluation
    words = (r"evals.cut: 'red green blue .* are one text to this model \(its text tower reads 14 tokens, and they "
             r"differ only after them\): they would get one embedding; give them distinct names early on \(the "
             r"entry's names_file")
    with pytest.raises(ConfigError, match=words):
        suite.run_zero_shot_folder(context(config), "cut", suite.parse_entry("cut", config.evals.cut.to_dict()))
    with pytest.raises(ConfigError, match=words):  # before training, once the run's tokenizer is made
        suite.check_prompts(config, colour_tokenizer())


def test_a_folder_of_fewer_than_two_classes_is_refused_before_training(tmp_path, caplog):
    """One class folder scored 100% whatever the model (images at the top, in no class folder, were passed over
    without a word): refused when the config is checked, as a missing folder is."""
    write_folder(tmp_path / "set", misfiled=0)
    for name in ("green", "blue"):
        shutil.rmtree(tmp_path / "set" / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "set" / "loose.png")
    config = load_config(DEMO, [f"--config.evals.one={{'type': 'zero_shot_folder', 'path': '{tmp_path / 'set'}'}}"])
    with pytest.raises(ConfigError, match=r"evals.one.path: .*set holds one class folder, red/; its 1 images at the "
                                          r"top are in no class folder: zero-shot classification needs two or more"):
        check_input_paths(config)
    (tmp_path / "set" / "blue").mkdir()
    Image.new("RGB", (8, 8), COLOURS["blue"]).save(tmp_path / "set" / "blue" / "0.png")
    with caplog.at_level("WARNING"):
        check_input_paths(config)
    assert "1 images at the top are in no class folder and are not scored" in caplog.text
    assert "hold no image" not in caplog.text
    (tmp_path / "set" / "purple").mkdir()  # an empty class folder: a class to choose from that no image belongs to
    with caplog.at_level("WARNING"):
        check_input_paths(config)
    assert "set: the class folders ['purple'] hold no image: they stay classes to choose from" in caplog.text


def test_few_shot_on_a_folder_set_scores_base_and_new_classes_skipping_a_bad_test_image(tmp_path, caplog):
    """Zero-shot CLIP (no method) on a folder task of blue, green (base) and red (new): each group among its own
    classes. The test set's broken file is skipped, not the end of the run; the shapes-only shifted domain of a
    WiSE-FT entry is not scored on a set that has none (it repeated the figures under other names)."""
    for split in ("train", "val", "test"):
        write_folder(tmp_path / split, misfiled=1 if split == "test" else 0)
    config = load_config(DEMO, ["--config.evals.fs={'type': 'few_shot', 'shapes_domain': 'shifted'}",
                                "--config.few_shot.dataset=folder", "--config.few_shot.shots=1",
                                *(f"--config.few_shot.{s}={tmp_path / s}" for s in ("train", "val", "test"))])
    entry = suite.parse_entry("fs", config.evals.fs.to_dict())
    with caplog.at_level("WARNING"):
        got = suite.run_few_shot(context(config), "fs", entry)
    # base: 8 images, the blue one filed under green wrong; new: the 4 readable red ones, among red alone
    assert got == pytest.approx({"fs_base": 7 / 8, "fs_new": 1.0, "fs_hm": 2 * 7 / 8 / (7 / 8 + 1)})
    assert "broken.jpg" in caplog.text


def test_an_image_folder_names_its_classes_and_spreads_a_subset_over_them(tmp_path):
    write_folder(tmp_path, misfiled=0)
    (tmp_path / "dark_red").mkdir()
    Image.new("RGB", (8, 8), (100, 0, 0)).save(tmp_path / "dark_red" / "a.png")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden: no class, as in a few-shot set
    # hidden inside a class folder too (a notebook's copy was one more image, macOS's ._a.png an undecodable one)
    (tmp_path / "dark_red" / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8), (100, 0, 0)).save(tmp_path / "dark_red" / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / "dark_red" / "._a.png").write_bytes(b"x")
    source = ImageFolderSource(tmp_path, 16)
    assert source.class_names() == ["blue", "dark red", "green", "red"] and len(source) == 14
    assert list_images([str(tmp_path / "dark_red")]) == [tmp_path / "dark_red" / "a.png"]  # the commands' --images
    images, labels, skipped = source.arrays(4)  # each class's first file
    assert images.shape == (4, 16, 16, 3) and labels.tolist() == [0, 1, 2, 3] and skipped == 0
    images, labels, skipped = source.arrays(9)  # then the second files of the classes that have one, ...
    assert labels.tolist() == [0, 1, 2, 3, 0, 2, 3, 0, 2] and skipped == 0
    with pytest.raises(ValueError, match="holds no class folder"):
        ImageFolderSource(tmp_path / "red", 16)


def test_zero_shot_tfds_reads_a_classification_set():
    tfds = pytest.importorskip("tensorflow_datasets")
    config = load_config(DEMO, ["--config.evals.digits={'type': 'zero_shot_tfds', 'dataset': 'mnist'}",
                                "--config.eval.num_examples=6"])
    entry = suite.parse_entry("digits", config.evals.digits.to_dict())

    @dataclasses.dataclass(frozen=True)
    class DigitContext(suite.Context):
        def texts(self, texts):  # "a photo of a 7." -> one-hot 7
            return np.eye(10, dtype=np.float32)[[int(t.split()[-1].rstrip(".")) for t in texts]]

    class ZeroEncoder:  # every image embeds like digit 0
        def images(self, images):
            return np.tile(np.eye(10, dtype=np.float32)[:1], (len(images), 1))

    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        labels = [int(x["label"]) for x in tfds.data_source("mnist", split="test")]
        got = suite.run_zero_shot_tfds(DigitContext(config, ZeroEncoder(), None), "digits", entry)
    assert got["digits_top1"] == pytest.approx(labels.count(0) / 6)


def test_a_tfds_set_that_cannot_be_read_stops_the_run_before_any_work():
    pytest.importorskip("tensorflow_datasets")
    config = load_config(DEMO, ["--config.evals.x={'type': 'zero_shot_tfds', 'dataset': 'no_such_dataset'}"])
    with pytest.raises(ConfigError) as e:
        check_input_paths(config, training=False)
    assert str(e.value) == "evals.x: TFDS has no dataset named 'no_such_dataset' (tfds.list_builders() lists the names)"
    assert "\n" not in str(e.value)


def test_what_an_evaluation_cannot_take_is_refused_before_training(tmp_path):
    """A template without "{}" failed after the training (an unexpected error, no results.json, and config.json kept
    it); a negative count evaluated all but the last images; two class folders of one text to CLIP were scored at
    chance between them; a folder of no decodable image was an unexpected error; a JSON naming an image twice kept
    its last caption alone."""
    write_folder(tmp_path / "set", misfiled=0)
    entry = f"'type': 'zero_shot_folder', 'path': '{tmp_path / 'set'}'"
    for extra, words in ((", 'templates': ('a photo',)", "evals.z.templates 'a photo': a template needs one {}"),
                         (", 'templates': ()", "evals.z.templates is empty: give at least one"),
                         (", 'num_examples': -3", "evals.z.num_examples -3 is negative")):
        with pytest.raises(ConfigError, match=words):
            load_config(DEMO, [f"--config.evals.z={{{entry}{extra}}}"])
    config = load_config(DEMO, [f"--config.evals.z={{{entry}}}"])
    (tmp_path / "set" / "green").rename(tmp_path / "set" / "Red")  # "red" and "Red": one text to CLIP
    with pytest.raises(ConfigError, match="evals.z: the class folders 'Red' and 'red' are named 'Red' and 'red', one "
                                          "text to CLIP"):
        check_input_paths(config)
    (tmp_path / "set" / "Red").rename(tmp_path / "set" / "green")
    for image in (tmp_path / "set").rglob("*.png"):
        image.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"evals.z.path: .*set: no readable image"):
        suite.run_zero_shot_folder(context(config), "z", suite.parse_entry("z", config.evals.z.to_dict()))
    (tmp_path / "pairs.json").write_text('{"a.png": "a red circle.", "a.png": "a blue square."}')
    with pytest.raises(ValueError, match="pairs.json names image 'a.png' twice"):
        suite.long_text_pairs(tmp_path / "pairs.json")


def test_a_folders_warning_is_said_once_though_the_folder_is_opened_twice(tmp_path, caplog):
    """The launch's check and the evaluation both open the folder: its warning was printed twice."""
    write_folder(tmp_path / "set", misfiled=0)
    (tmp_path / "set" / "purple").mkdir()
    with caplog.at_level("WARNING"):
        for _ in range(2):
            ImageFolderSource(tmp_path / "set", 16)
    assert caplog.text.count("the class folders ['purple'] hold no image") == 1
