"""Configuration: typos, wrong types and inconsistent values are one-line ConfigErrors naming the key; every file
in configs/ loads, validates and builds its model and optimizer; config.json round-trips."""

import inspect
import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from clip_jax.config import (
    ConfigError,
    absolute_paths,
    apply_overrides,
    default_config,
    load_config,
    method_config,
    model_config,
    read_config,
    save_config,
    validate,
)
from clip_jax.evaluate.suite import eval_defaults
from clip_jax.files import same_setting
from clip_jax.methods import get_method, method_class
from clip_jax.methods.few_shot import FewShotMethod
from clip_jax.models.clip import CLIP
from clip_jax.models.presets import PRESETS
from clip_jax.train.state import make_optimizer

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
DEMO = str(CONFIGS / "demo.py")


def write_config_file(tmp_path, body, name="my_config.py"):
    """A config file whose get_config() starts from the defaults and runs `body` (lines using `c`)."""
    path = tmp_path / name
    lines = "\n".join(f"    {line}" for line in body)
    path.write_text(
        "from clip_jax.config import default_config\n"
        "from clip_jax.models.presets import model_preset\n\n\n"
        f"def get_config(arg=None):\n    c = default_config()\n{lines}\n    return c\n"
    )
    return str(path)


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- unknown keys -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("--config.totl_steps=5", "totl_steps"),  # top level
        ("--config.optimzer.lr=1", "optimzer"),  # a misspelt group
        ("--config.optimizer.learning_rate=1e-3", "optimizer.learning_rate"),  # a misspelt leaf in a group
        ("--config.model.vision.widht=64", "model.vision.widht"),  # inside the model
    ],
)
def test_unknown_override_key(override, key):
    assert f"'{key}'" in config_error(DEMO, [override])


@pytest.mark.parametrize(
    "line, key",
    [
        ("c.total_step = 5", "total_step"),
        ("c.optimizer.learning_rate = 1e-3", "optimizer.learning_rate"),
        ("c.model.vision.patchsize = 8", "model.vision.patchsize"),
        ("c.model.embed_dims = 64", "model.embed_dims"),
    ],
)
def test_unknown_key_set_in_a_config_file(tmp_path, line, key):
    message = config_error(write_config_file(tmp_path, [line]))
    assert f"unknown config key '{key}'" in message


def test_an_override_of_an_unknown_key_with_nothing_close_lists_the_valid_keys():
    message = config_error("configs/siglip.py", ["--config.method.variant=ring"])
    assert message.endswith("; valid keys here: multi_positive, name, reset_logit_scale, ring"), message


def test_unknown_key_in_a_file_lists_the_valid_keys(tmp_path):
    message = config_error(write_config_file(tmp_path, ["c.optimizer.warmup_step = 10"]))
    assert "did you mean 'warmup_steps'?" in message
    assert set(message.split("valid keys here: ")[1].split(", ")) == set(default_config().optimizer)


def test_model_keys_follow_the_tower_type():
    """The model schema is the chosen tower's dataclass: a ViT field on the text tower is unknown."""
    message = config_error(DEMO, ["--config.model.text.patch_size=16"])
    assert "'model.text.patch_size'" in message


# --- wrong types --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("batch_size=abc", "batch_size"),
        ("batch_size=1.5", "batch_size"),
        ("total_steps=True", "total_steps"),  # bools are not ints here
        ("total_steps=None", "total_steps"),
        ("seed=None", "seed"),
        ("log.tensorboard=1", "log.tensorboard"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("model.vision.width=64.0", "model.vision.width"),
        ("optimizer=3", "optimizer"),
    ],
)
def test_wrong_type_override(override, key):
    assert f"'{key}'" in config_error(DEMO, [f"--config.{override}"])


@pytest.mark.parametrize(
    "line, key",
    [
        ('c.total_steps = "100"', "total_steps"),
        ("c.model.text.layers = 2.0", "model.text.layers"),
        ("c.optimizer = 3", "optimizer"),
        ("c.data.augment = None", "data.augment"),
    ],
)
def test_wrong_type_in_a_config_file(tmp_path, line, key):
    """Caught when the file assigns (ConfigDict is type-safe; its message names the field) or by validation."""
    path = write_config_file(tmp_path, [line])
    message = config_error(path)
    assert f"'{key}'" in message or (path in message and f"'{key.split('.')[-1]}'" in message)


def test_override_values_are_python_literals():
    config = load_config(
        DEMO,
        [
            "--config.optimizer.lr=1",  # an int for a float field becomes a float
            "--config.data.source=shapes",  # a bare word is a string
            "--config.data.crop_scale=(0.5, 1.0)",
            "--config.model.logit_bias_init=-10.0",  # None by default: SigLIP's bias switched on
            "--config.optimizer.frozen=('^visual/',)",
        ],
    )
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.data.source == "shapes"
    assert tuple(config.data.crop_scale) == (0.5, 1.0)
    assert config.model.logit_bias_init == -10.0
    assert tuple(config.optimizer.frozen) == ("^visual/",)
    config = load_config(DEMO, ["--config.model.logit_bias_init=None"])  # and off again
    assert config.model.logit_bias_init is None


def test_the_evaluations_table_is_replaced_whole_by_one_override():
    assert dict(load_config(DEMO, ["--config.evals={}"]).evals) == {}  # no evaluation
    config = load_config(DEMO, ["--config.evals={'small': {'type': 'shapes', 'num_examples': 100}}"])
    assert list(config.evals) == ["small"] and config.evals.small.num_examples == 100
    assert config.evals.small.every_steps is None  # the entry's other fields at their defaults, as for evals.NAME
    for text, words in (("3", "'evals' is a table of evaluations: give {} (none)"),
                        ("{'x': {'path': 'd'}}", "an evaluation is a dict with a 'type'")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(DEMO, [f"--config.evals={text}"])


def test_override_without_value():
    assert "--config.eval.every_steps=VALUE" in config_error(DEMO, ["--config.eval.every_steps"])


# --- inconsistent values ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["batch_size=96", "accum_steps=5"], ("batch_size 96", "accum_steps 5")),
        (["model.vision.image_size=72"], ("image_size 72", "patch_size 16")),
        (["model.vision.patch_size=0"], ("model.vision.patch_size",)),
        (["model.text.heads=0"], ("model.text.heads",)),
        (["model.vision.width=0"], ("model.vision.width",)),
        (["total_steps=0"], ("total_steps",)),
        (["accum_steps=0"], ("accum_steps",)),
        (["checkpoint.every_steps=0"], ("checkpoint.every_steps",)),
        (["log.every_steps=0"], ("log.every_steps",)),
        (["data.crop_scale=(0.9, 0.5)"], ("data.crop_scale",)),
        (["data.crop_scale=(0.0, 1.0)"], ("data.crop_scale",)),
        (["data.colour_jitter=(0.4, 0.4)"], ("data.colour_jitter must be (brightness, contrast, saturation, hue)",
                                             "got (0.4, 0.4)")),
        (["data.colour_jitter=(0.4, 0.4, 0.4, 0.6)"], ("hue at most 0.5", "got (0.4, 0.4, 0.4, 0.6)")),
        (["data.colour_jitter=(1.5, 0.0, 0.0, 0.0)"], ("each in [0, 1]",)),
        (["data.colour_jitter_prob=1.5"], ("data.colour_jitter_prob must be a probability in [0, 1], got 1.5",)),
        (["model.vision.type=convnext"], ("model.vision.type", "resnet", "vit")),
        (["model.vision.type=resnet"], ("a tower's type is not switched by an override", "a config file of your own")),
        (["data.tokenizer_vocab_size=513"], ("data.tokenizer_vocab_size", ">= 514")),
        (["model.attention=flash"], ("model.attention", "auto", "cudnn", "xla")),
        (["model.attention=cudnn"], ("model.attention 'cudnn' needs model.dtype bfloat16",)),
        (["model.vision.patch_dropout=1.0"], ("model.vision.patch_dropout must be in [0, 1)", "patches a training")),
        (["model.vision.stochastic_depth=-0.1"], ("stochastic_depth must be in [0, 1)", "residual branch")),
        (["model.vision.pool=max"], ("unknown model.vision.pool 'max'; choose one of mean, token",)),
        (["data.grayscale_shape_prob=1.5"], ("data.grayscale_shape_prob must be a probability in [0, 1], got 1.5",)),
        (["data.long_caption_prob=-0.1"], ("data.long_caption_prob must be a probability",)),
        (["data.long_caption_prob=0.8"], ("long_caption_prob + data.partial_caption_prob must be at most 1", "+ 0.3")),
        (["data.grayscale_shape_captions=True"], ("is now 'data.grayscale_shape_prob', a probability (True: 1.0",)),
    ],
)
def test_inconsistent_values(overrides, words):
    message = config_error(DEMO, [f"--config.{o}" for o in overrides])
    for word in words:
        assert word in message


@pytest.mark.parametrize("field", ["patch_dropout", "stochastic_depth"])
def test_image_dropout_is_refused_for_a_method_whose_step_would_ignore_it(field):
    message = config_error(str(CONFIGS / "groupvit_shapes.py"), [f"--config.model.vision.{field}=0.5"])
    assert f"method 'groupvit' does not train with model.vision.{field}; set it to 0" in message
    assert load_config(DEMO, [f"--config.model.vision.{field}=0.5"]).model.vision[field] == 0.5


def test_consistent_edge_values_pass():
    overrides = ["batch_size=96", "accum_steps=4", "data.crop_scale=(1.0, 1.0)", "model.vision.image_size=48"]
    config = load_config(DEMO, [f"--config.{o}" for o in overrides])
    assert (config.batch_size, config.accum_steps, config.model.vision.image_size) == (96, 4, 48)


def test_missing_or_broken_config_file(tmp_path, monkeypatch):
    assert "not found" in config_error(str(tmp_path / "nope.py"))
    # a recipe's path as the docs give it, from another folder: the message names the project's file
    monkeypatch.chdir(tmp_path)
    from clip_jax.config import PROJECT_ROOT

    assert config_error("configs/demo.py:b128") == (
        f"config file configs/demo.py not found; the project's recipe is {PROJECT_ROOT / 'configs/demo.py'}")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert "get_config" in config_error(str(empty))


def test_an_error_in_a_config_files_code_keeps_its_frames_for_debug(tmp_path):
    """--debug showed only clip_jax's frames, ending at the config file's line: a helper of the user's that raised
    was not in the traceback (the error was raised `from None`)."""
    path = write_config_file(tmp_path, ["1 / 0"])
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "get_config() failed: ZeroDivisionError" in str(error.value)
    assert isinstance(error.value.__cause__, ZeroDivisionError)


@pytest.mark.parametrize("line, said", [
    ('c.method.name = "siglip"', "unknown config key 'method.label_smoothing'; valid keys here: multi_positive, name, "
                                 "reset_logit_scale, ring: a field of method audioclip / clip / groupvit / ..., not of "
                                 "'siglip'; a config file switches methods with config.method = "
                                 "method_config('siglip')"),
    ('c.model.vision.type = "resnet"', "a field of another type of tower than model.vision.type 'resnet'; a config "
                                       "file switches a tower by giving model.vision whole"),
])
def test_a_method_or_tower_switched_by_its_name_alone_says_how_to_switch_it(tmp_path, line, said):
    """"unknown config key 'method.label_smoothing'": a key the user never wrote, left by the method before."""
    assert said in config_error(write_config_file(tmp_path, [line]))


def test_a_value_of_another_type_in_a_config_file_is_said_as_an_overrides(tmp_path):
    """ConfigDict's words: "Could not override field 'lr' (reference). 1e-3 is of original type <class 'str'> and
    cannot be casted to type <class 'float'>", where the "original type" is the new value's."""
    message = config_error(write_config_file(tmp_path, ['c.optimizer.lr = "1e-3"']))
    assert message.endswith("get_config() failed: field 'lr' must be float, got str '1e-3' (line 7)"), message


def test_an_override_given_twice_is_told_and_a_second_config_refused(caplog, capsys):
    """--config.total_steps=5 --config.total_steps=7 trained 7 without a word, and a second --config (another
    recipe) was taken silently."""
    from clip_jax import cli

    with caplog.at_level("WARNING", logger="clip_jax.config"):
        config = load_config(DEMO, ["--config.total_steps=5", "--config.total_steps=7"])
    assert config.total_steps == 7
    assert "--config.total_steps is given 2 times (5, 7): the last, 7, is taken" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", DEMO, "--config", f"{DEMO}:b128", "--workdir", "unused"])
    assert exit_info.value.code == 2
    assert f"--config is given twice ({DEMO} and {DEMO}:b128): give it once" in capsys.readouterr().err


def test_a_negative_period_of_an_evaluation_is_refused():
    assert config_error(DEMO, ["--config.evals.shapes.every_steps=-3"]).startswith(
        "evals.shapes.every_steps -3 is negative")  # it evaluated every 3 steps (Python's modulo)


@pytest.mark.parametrize("override, said", [
    ("log.progress_bar=false", "must be bool, got str (--config.log.progress_bar=True or "
                               "--config.log.progress_bar=False)"),
    ("data.path=2024", "must be str, got int (to give it as a text, quote it: \"--config.data.path='2024'\")"),
    ("optimizer.frozen=None", "must be tuple, got None (none: --config.optimizer.frozen=())"),
])
def test_a_value_of_another_type_says_how_to_write_it(override, said):
    """"must be bool, got str" for `false`: the message did not say that Python's literals are read."""
    assert said in config_error(DEMO, [f"--config.{override}"])


def test_a_group_written_whole_in_a_config_file_keeps_the_fields_it_leaves_out(tmp_path):
    """`c.log = {"every_steps": 2}` (configs/pretrain.py writes its mesh so) had no other log field: the run failed
    after compiling ("unexpected error: AttributeError 'tensorboard'"), and `--config.mesh.data=1` on a mesh written
    {"fsdp": -1} was "unknown config key 'mesh.data'"."""
    path = write_config_file(tmp_path, ['c.log = {"every_steps": 2}', 'c.mesh = {"fsdp": -1}',
                                        'c.checkpoint = {"every_steps": 4}'])
    config = load_config(path, ["--config.mesh.tensor=2"])
    defaults = default_config()
    assert config.log.every_steps == 2 and config.log.tensorboard == defaults.log.tensorboard
    assert config.checkpoint.to_dict() == {**defaults.checkpoint.to_dict(), "every_steps": 4}
    assert config.mesh.to_dict() == {"data": 1, "fsdp": -1, "tensor": 2}  # the -1 takes the devices left
    config = load_config(write_config_file(tmp_path, ['c.mesh = {"fsdp": 2}'], "m.py"))
    assert config.mesh.to_dict() == {**defaults.mesh.to_dict(), "fsdp": 2}


def test_config_file_argument(tmp_path):
    path = write_config_file(tmp_path, ["c.model = model_preset(arg or 'tiny')"])
    assert load_config(path).model.vision.width == 128
    config = load_config(f"{path}:L/14")
    assert (config.model.vision.width, config.model.vision.patch_size, config.model.text.width) == (1024, 14, 768)


def test_a_variant_of_a_recipe_without_variants_or_of_the_wrong_kind_is_one_line():
    """`path.py:arg` where get_config takes no argument says so (not Python's TypeError); the WiSE-FT recipe's
    argument is a shot count, and a set's name there says what it takes."""
    coop = str(CONFIGS / "coop" / "shapes.py")
    assert config_error(f"{coop}:foo") == f"config file {coop} has no variants (':foo' given)"
    message = config_error(str(CONFIGS / "wise_ft" / "b16.py") + ":dtd")
    assert "the argument is the shot count per class" in message and "'dtd'" in message and "\n" not in message


def test_demo_recipes():
    # The committed demo (chosen on validation pairs, docs/demo.md) and the recipe before it, which the recipes
    # measured on it (SLIP, AudioCLIP, the ResNet comparison) keep.
    now, before = load_config(DEMO), load_config(f"{DEMO}:b128")
    assert (now.batch_size, now.total_steps, now.optimizer.warmup_steps) == (256, 1200, 160)
    assert (before.batch_size, before.total_steps, before.optimizer.warmup_steps) == (128, 1500, 200)
    # patch dropout in the default recipe only (the fourth validation round)
    assert (now.model.vision.patch_dropout, before.model.vision.patch_dropout) == (0.5, 0.0)
    before.model.vision.patch_dropout = 0.5
    for part in ("model", "data", "method"):
        assert now[part].to_dict() == before[part].to_dict(), part
    for recipe in ("configs/slip_shapes.py", "configs/audioclip_shapes.py", "configs/resnet_shapes.py"):
        assert load_config(str(CONFIGS.parent / recipe)).batch_size == 128
    # The ResNet recipe: the default one but for the image tower (the comparison's) and its steps.
    resnet = load_config(f"{DEMO}:resnet")
    assert (resnet.batch_size, resnet.total_steps, resnet.optimizer.warmup_steps) == (256, 400, 53)
    comparison = load_config(str(CONFIGS / "resnet_shapes.py"))
    assert resnet.model.vision.to_dict() == comparison.model.vision.to_dict() and resnet.model.vision.type == "resnet"
    assert resnet.model.text.to_dict() == now.model.text.to_dict()
    for part in ("data", "method"):
        assert resnet[part].to_dict() == now[part].to_dict(), part
    # weight decay 0.2 in the default recipe only (the seventh validation round); the other two were measured at 0.1
    assert (now.optimizer.weight_decay, before.optimizer.weight_decay, resnet.optimizer.weight_decay) == (0.2, 0.1, 0.1)
    assert resnet.optimizer.lr == now.optimizer.lr == before.optimizer.lr
    assert "unknown recipe" in config_error(f"{DEMO}:b64")


# --- the files in configs/ ----------------------------------------------------------------------------------------


def config_specs():
    specs = []
    for path in sorted(CONFIGS.rglob("*.py")):  # the methods' recipes too (configs/<method>/*.py)
        spec = str(path)
        source = path.read_text()
        if "def get_config" not in source:  # the package's __init__ and shared snippets
            continue
        specs.append(spec)
        # A file whose get_config takes a preset name (configs/pretrain.py:B/16): every preset.
        namespace = {"__file__": spec}  # as when imported (configs/longclip_l14.py builds on longclip_b16.py)
        exec(compile(source, spec, "exec"), namespace)
        params = list(inspect.signature(namespace["get_config"]).parameters.values())
        if params and params[0].default in PRESETS:
            specs += [f"{spec}:{preset}" for preset in PRESETS]
    return specs


@pytest.mark.parametrize("spec", config_specs(), ids=lambda s: s.split("configs/")[-1])
def test_every_config_file_loads_and_builds(spec):
    config = load_config(spec)
    validate(config)
    # The model it describes builds (shapes only: nothing is computed), and the optimizer's regex rules each
    # match a parameter of it.
    t = config.model.text
    if issubclass(method_class(config.method.name), FewShotMethod):  # its learner's size depends on its data
        v = config.model.vision
        image = jnp.zeros((1, v.image_size, v.image_size, 3), jnp.uint8)
        text = jnp.zeros((1, t.context_length), jnp.int32)
        params = nn.unbox(jax.eval_shape(CLIP(model_config(config)).init, jax.random.key(0), image, text)["params"])
        params["learner"] = {"kernel": jax.ShapeDtypeStruct((1,), jnp.float32)}
    else:  # the method's own model (AudioCLIP's third tower, SLIP's head, ...)
        method = get_method(config)
        params = nn.unbox(jax.eval_shape(method.model().init, jax.random.key(0), *method.init_inputs())["params"])
    make_optimizer(config.optimizer, config.total_steps, params)
    if config.data.tokenizer == "train":
        assert config.data.tokenizer_vocab_size <= t.vocab_size
    # The global batch splits evenly into micro-batches.
    assert config.batch_size % config.accum_steps == 0


# --- config.json --------------------------------------------------------------------------------------------------


def as_json_types(value):
    if isinstance(value, dict):
        return {k: as_json_types(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [as_json_types(v) for v in value]
    return value


@pytest.mark.parametrize("overrides", [[], ["--config.model.logit_bias_init=-10.0", "--config.optimizer.lr=3e-4",
                                            "--config.optimizer.frozen=('^visual/',)"]])
def test_config_json_round_trip(tmp_path, overrides):
    config = load_config(DEMO, overrides)
    save_config(config, tmp_path / "config.json")
    back = read_config(tmp_path / "config.json")
    # Same values and value types (tuples come back as lists, as JSON has no tuples).
    want, got = as_json_types(config.to_dict()), back.to_dict()
    assert got == want
    flat = lambda d, p="": [(p + k, type(v)) for k, v in d.items() if not isinstance(v, dict)] + [
        x for k, v in d.items() if isinstance(v, dict) for x in flat(v, p + k + ".")
    ]
    assert flat(got) == flat(want)
    # A second save is byte-identical, and the file is plain sorted JSON.
    save_config(back, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == config.optimizer.lr


def test_read_config_accepts_overrides_like_a_fresh_config(tmp_path):
    """Resuming reads config.json then applies --config overrides: tuple-valued fields (now lists) take tuples."""
    save_config(load_config(DEMO), tmp_path / "config.json")
    config = read_config(tmp_path / "config.json")
    apply_overrides(config, ["--config.total_steps=3000", "--config.data.crop_scale=(0.5, 1.0)"])
    validate(config)
    assert config.total_steps == 3000 and list(config.data.crop_scale) == [0.5, 1.0]


def test_read_config_validates(tmp_path):
    data = default_config().to_dict()
    data["optimizer"]["learning_rate"] = 1e-3
    (tmp_path / "config.json").write_text(json.dumps(data, default=list))
    with pytest.raises(ConfigError, match="optimizer.learning_rate"):
        read_config(tmp_path / "config.json")


@pytest.mark.parametrize("switch, prob", [(True, 1.0), (False, 0.0)])
def test_config_json_with_the_grayscale_switch_reads_as_its_probability(tmp_path, switch, prob):
    """Workdirs written while `data.grayscale_shape_captions` was a switch (the demo's and every run started from
    it) resume with the probability that draws the same examples."""
    written = json.loads(json.dumps(load_config(DEMO).to_dict(), default=list))
    del written["data"]["grayscale_shape_prob"]
    written["data"]["grayscale_shape_captions"] = switch
    (tmp_path / "config.json").write_text(json.dumps(written))
    config = read_config(tmp_path / "config.json")
    assert config.data.grayscale_shape_prob == prob and "grayscale_shape_captions" not in config.data


def test_config_json_of_a_vit_without_its_pool_reads_as_the_class_token(tmp_path):
    """Every ViT pooled its class token before `model.vision.pool`: such a workdir reads back as "token", so a
    resume with today's configs sees no change of model; a ResNet has no pool."""
    written = json.loads(json.dumps(load_config(DEMO).to_dict(), default=list))
    del written["model"]["vision"]["pool"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert read_config(tmp_path / "config.json").model.vision.pool == "token"
    resnet = json.loads(json.dumps(load_config(f"{DEMO}:resnet").to_dict(), default=list))
    (tmp_path / "config.json").write_text(json.dumps(resnet))
    assert "pool" not in read_config(tmp_path / "config.json").model.vision


def test_config_json_of_an_older_version_takes_the_defaults_of_newer_fields(tmp_path):
    """A workdir written before a field existed resumes: the field takes its default; the rest stays as written."""
    written = json.loads(json.dumps(default_config().to_dict(), default=list))
    del written["init_from"], written["data"]["prefetch"]
    written["total_steps"] = 7
    path = tmp_path / "config.json"
    path.write_text(json.dumps(written))
    config = read_config(path)
    assert config.init_from == "" and config.data.prefetch == default_config().data.prefetch
    assert config.total_steps == 7


def test_relative_paths_are_made_absolute_and_nothing_else(tmp_path, monkeypatch):
    """What config.json stores, so that eval, wise-ft or a relaunch from another folder read the same files: every
    relative path against the launch folder; keywords, split names, URIs and absolute paths as given."""
    here = tmp_path.resolve()  # os.getcwd() resolves links
    monkeypatch.chdir(here)
    config = default_config()
    config.init_from = "runs/clip"
    config.data.update(source="records", path="shards/a, gs://bucket/b,/data/c", image_root="", tokenizer="openai")
    config.few_shot.update(dataset="table", train="k.csv", val="", test="../test.csv", names_file="names.txt")
    config.method = method_config("vild", annotations="coco/train.json", image_root="coco/images")
    config.evals.folder = {**eval_defaults("zero_shot_folder"), "path": "val"}
    config.evals.tfds = {**eval_defaults("zero_shot_tfds"), "dataset": "imagenet2012", "data_dir": "tfds"}
    absolute_paths(config)
    assert config.init_from == f"{here}/runs/clip"
    assert config.data.path == f"{here}/shards/a,gs://bucket/b,/data/c"
    assert (config.data.image_root, config.data.tokenizer) == ("", "openai")
    assert (config.few_shot.train, config.few_shot.val, config.few_shot.test, config.few_shot.names_file) == (
        f"{here}/k.csv", "", f"{here.parent}/test.csv", f"{here}/names.txt")
    assert (config.method.annotations, config.method.image_root) == (f"{here}/coco/train.json", f"{here}/coco/images")
    assert config.evals.folder.path == f"{here}/val"
    assert (config.evals.tfds.dataset, config.evals.tfds.split, config.evals.tfds.data_dir) == (
        "imagenet2012", eval_defaults("zero_shot_tfds")["split"], f"{here}/tfds")

    config = default_config()  # a file source's one path may hold a comma; tfds few-shot sets are split names
    config.data.update(source="captions", path="pairs,2024.csv", tokenizer="tok.json")
    config.few_shot.update(dataset="tfds", tfds_name="oxford_flowers102", train="train", test="test")
    absolute_paths(config)
    assert (config.data.path, config.data.tokenizer) == (f"{here}/pairs,2024.csv", f"{here}/tok.json")
    assert (config.few_shot.train, config.few_shot.test, config.few_shot.tfds_name) == (
        "train", "test", "oxford_flowers102")


def test_a_relative_path_of_an_earlier_config_json_is_the_same_setting_as_its_absolute_form(tmp_path, monkeypatch):
    here = tmp_path.resolve()
    monkeypatch.chdir(here)
    assert same_setting("k.csv", f"{here}/k.csv")
    assert same_setting({"few_shot": {"train": "k.csv", "shots": 16}}, {"few_shot": {"train": f"{here}/k.csv",
                                                                                     "shots": 16}})
    assert same_setting(["a, b"], [f"{here}/a,{here}/b"])  # a shard list, item by item
    assert same_setting("sets/train,v2.csv", f"{here}/sets/train,v2.csv")  # one path with a comma in its name
    assert not same_setting("k.csv", "/elsewhere/k.csv")  # another file
    assert not same_setting(f"{here}/k.csv", "k.csv")  # only an older relative form is read as absolute
    assert not same_setting("a,b", f"{here}/a")
    assert not same_setting("cat", "dog") and not same_setting({"a": 1}, {"a": 1, "b": 2})
    assert not same_setting({"shots": 16}, {"shots": 8}) and same_setting(1, 1.0)


def test_a_data_path_that_the_shapes_source_does_not_read_is_told(tmp_path, caplog):
    """A caption table given without data.source trained on shapes, without a word that the file was never read
    (stretch's printed recipe for a shapes run even held a placeholder --config.data.path)."""
    from clip_jax.config import check_input_paths

    (tmp_path / "caps.csv").write_text("image,caption\na.png,a red circle.\n")
    config = load_config(DEMO, [f"--config.data.path={tmp_path / 'caps.csv'}"])
    with caplog.at_level("WARNING"):
        check_input_paths(config)
    assert f"data.path {tmp_path / 'caps.csv'} is not read: data.source is 'shapes'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        check_input_paths(load_config(DEMO))
    assert "is not read" not in caplog.text


@pytest.mark.parametrize("override, said", [
    ("--config.lr=1e-4", "(open_clip's --lr is optimizer.lr here)"),
    ("--config.model.precision=bf16", "(open_clip's --precision is model.dtype ('bfloat16' or 'float32') here)"),
    ("--config.grad_checkpointing=True", "(open_clip's --grad-checkpointing is model.remat_policy (e.g. 'full') here)"),
    ("--config.epochs=2", "(open_clip's --epochs is total_steps (steps: epochs x rows / batch_size) here)"),
    ("--config.optimizer.frozen=('^visual/')", "(a tuple of one needs its comma: \"--config.optimizer.frozen="
                                               "('^visual/',)\")"),
    ("--config.data.source=webdataset",
     "(WebDataset .tar shards: clip-jax data convert --format webdataset SHARDS_FOLDER --out RECORDS, then "
     "data.source 'records' and data.path RECORDS)"),
])
def test_open_clips_flag_names_are_answered_with_this_projects_keys(override, said):
    """An open_clip user's flags got "did you mean 'checkpoint'?" for grad_checkpointing, 'vision' for
    model.precision, or the top-level keys alone; ('^visual/') "must be tuple, got str" and no more."""
    with pytest.raises(ConfigError) as e:
        load_config(str(CONFIGS / "demo.py"), [override])
    assert str(e.value).endswith(said), str(e.value)

