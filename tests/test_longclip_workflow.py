"""Long-CLIP end to end through the command line on a tiny model: a 77-token base, `stretch` (keep 20 x 4 and plain
interpolation), a fine-tune with primary component matching (kept positions frozen, temperature reset to 100), and
the fine-tuned text tower exported for diffusers as HF `CLIPTextModel(WithProjection)` with 248 positions, which
transformers loads offline and which reproduces clip_jax's text features."""

import json
import math
import pathlib
import shlex
import sys
import types

import jax
import numpy as np
import pytest

from clip_jax import cli
from clip_jax.models.clip import CLIP
from clip_jax.models.positions import interpolate_positions, stretch_positions
from clip_jax.train.loop import load_trained
from clip_jax.train.metrics import read_metrics

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "longclip_shapes.py")
SIZES = dict(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64)
TINY = [
    *(f"--config.model.{tower}.{k}={v}" for tower in ("vision", "text") for k, v in SIZES.items()),
    "--config.model.vision.image_size=32", "--config.model.text.vocab_size=600", "--config.model.embed_dim=16",
    "--config.data.tokenizer_vocab_size=600", "--config.batch_size=16", "--config.total_steps=2",
    "--config.optimizer.warmup_steps=1", "--config.log.every_steps=1", "--config.eval.num_examples=16",
    "--config.eval.batch_size=16",
]


def params_of(workdir):
    return jax.tree.map(np.asarray, jax.device_get(load_trained(workdir).params))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("longclip")
    cli.main(["train", "--config", f"{CONFIG}:base", "--workdir", str(root / "base"), *TINY])
    cli.main(["stretch", "--workdir", str(root / "base"), "--out-workdir", str(root / "keep")])
    stretched = params_of(root / "keep")  # before the fine-tune writes its own checkpoints there
    # 8 fake devices hold 2 rows each: PCA over the global batch of 16
    cli.main(["train", "--config", CONFIG, "--workdir", str(root / "keep"), *TINY, "--config.method.pca_components=4",
              "--config.method.pca_scope=global"])
    return root, stretched


def test_stretch_writes_a_warm_start_workdir(runs, capsys):
    root, stretched = runs
    base = params_of(root / "base")
    table = stretch_positions(base["text"]["positional_embedding"], keep=20, ratio=4)
    np.testing.assert_array_equal(stretched["text"]["positional_embedding"], table)
    np.testing.assert_array_equal(stretched["text"]["positional_embedding_res"], table)
    flat = lambda tree: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    before, after = flat(base), flat(stretched)
    changed = {k for k in after if k not in before or not np.array_equal(after[k], before[k])}
    assert changed == {"['text']['positional_embedding']", "['text']['positional_embedding_res']"}
    assert (root / "keep" / "tokenizer.json").read_bytes() == (root / "base" / "tokenizer.json").read_bytes()

    capsys.readouterr()
    cli.main(["stretch", "--workdir", str(root / "base"), "--out-workdir", str(root / "interp"), "--method",
              "interpolate", "--length", "100"])
    said = capsys.readouterr().out  # from how many positions, and the recipe that fits this model and stretch
    assert f"-> {root / 'interp'}: 77 -> 100 text positions, keep_positions 0" in said
    # (a model of no recipe's size: its own config.json, with Long-CLIP's settings; nothing frozen, and shapes' long
    # captions)
    assert f"clip-jax train --workdir {root / 'interp'} --config.method.name=longclip" in said
    assert "--config.data.long_caption_prob=1.0 --config.data.partial_caption_prob=0.0 (with your run's" in said
    assert "--config.optimizer.frozen" not in said
    trained = load_trained(root / "interp")
    config, params = trained.config, trained.params
    assert (config.model.text.context_length, config.model.text.keep_positions) == (100, 0)
    assert "positional_embedding_res" not in params["text"]
    np.testing.assert_array_equal(np.asarray(params["text"]["positional_embedding"]),
                                  interpolate_positions(base["text"]["positional_embedding"], 100))


def test_finetune_freezes_kept_positions_and_resets_the_temperature(runs):
    root, stretched = runs
    tuned = params_of(root / "keep")
    np.testing.assert_array_equal(tuned["text"]["positional_embedding"], stretched["text"]["positional_embedding"])
    moved = np.abs(tuned["text"]["positional_embedding_res"] - stretched["text"]["positional_embedding_res"])
    assert moved[20:].max() > 0 and moved[:20].max() == 0  # rows < 20 of the second table get no gradient
    # The stretched model stays readable as step 0, though its optimizer state is the converter's (other frozen rules).
    start = jax.tree.map(np.asarray, jax.device_get(load_trained(root / "keep", step=0).params))
    jax.tree.map(np.testing.assert_array_equal, start, stretched)
    config = json.loads((root / "keep" / "config.json").read_text())
    assert config["method"]["name"] == "longclip" and config["model"]["max_logit_scale"] == 0
    train = [r for r in read_metrics(root / "keep" / "metrics.jsonl") if r["split"] == "train"]
    # The base trained with a temperature starting at 1/0.07; the fine-tune starts at 100, unclamped.
    assert train[0]["logit_scale"] == pytest.approx(100.0, rel=1e-5)
    assert math.isfinite(train[-1]["loss_long"]) and math.isfinite(train[-1]["loss_short"])
    results = json.loads((root / "keep" / "results.json").read_text())
    assert {"long_t2i_r1", "long_i2t_r1", "hard_pairs_acc", "hard_pairs_image_acc"} <= set(results)


def test_a_run_that_would_train_the_kept_positions_is_warned():
    from clip_jax.config import load_config
    from clip_jax.train.loop import positions_warning
    from clip_jax.train.state import trainable_mask

    params = {"text": {"positional_embedding": 0, "positional_embedding_res": 0}, "visual": {"proj": 0}}
    recipe = load_config(CONFIG)  # Long-CLIP's: the kept table frozen
    assert positions_warning(recipe, trainable_mask(params, recipe.optimizer.frozen)) is None
    bare = load_config(CONFIG, ["--config.optimizer.frozen=()"])  # what a stretched workdir's config.json holds
    said = positions_warning(bare, trainable_mask(params, bare.optimizer.frozen))
    assert "keep_positions is 20" in said and "'^text/positional_embedding$'" in said
    # its override, followed (it named the B/16 and L/14 recipes, which another model's run cannot use), keeps the
    # run's other rules and freezes the kept table
    visual = load_config(CONFIG, ["--config.optimizer.frozen=('^visual/',)"])
    said = positions_warning(visual, trainable_mask(params, visual.optimizer.frozen))
    followed = load_config(CONFIG, [shlex.split(said.rsplit(": ", 1)[1])[0]])
    assert followed.optimizer.frozen == ("^visual/", "^text/positional_embedding$")
    assert positions_warning(followed, trainable_mask(params, followed.optimizer.frozen)) is None
    plain = load_config(CONFIG, ["--config.optimizer.frozen=()", "--config.model.text.keep_positions=0"])
    assert positions_warning(plain, trainable_mask({"text": {"positional_embedding": 0}}, ())) is None


def test_pca_wider_than_the_batch_is_refused_before_compiling(runs, capsys):
    root, _ = runs
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", CONFIG, "--workdir", str(root / "refused"), *TINY])  # 16 components, 2 rows
    err = capsys.readouterr().err
    assert "method.pca_components 16 must be below the local batch the PCA runs over minus one (2: batch_size 16" in err
    assert "compiled" not in capsys.readouterr().out


def test_pca_refusal_on_one_batch_shard_does_not_suggest_the_global_scope():
    from clip_jax.config import load_config
    from clip_jax.errors import ConfigError
    from clip_jax.methods import get_method

    config = load_config(CONFIG, [*TINY, "--config.method.pca_components=16"])  # batch 16 on one shard: 15 at most
    with pytest.raises(ConfigError, match="lower method.pca_components or raise batch_size") as refused:
        get_method(config).check_batch_shards(1)
    assert "pca_scope" not in str(refused.value)  # global is the same single batch here: no remedy


# ---- export for diffusers ----------------------------------------------------------------------------------------
def test_hf_text_export_of_the_finetuned_model(runs):
    # The torchvision build here is broken; transformers imports it only for this module's side effects.
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    root, _ = runs
    cli.main(["export", "--workdir", str(root / "keep"), "--format", "hf-text", "--out", str(root / "text")])
    trained = load_trained(root / "keep")
    model, params, tokenizer = trained.model, trained.params, trained.tokenizer
    from clip_jax.data.shapes import ShapesConfig, ShapesDataset

    captions = [ShapesDataset(ShapesConfig(image_size=32, min_objects=8, max_objects=8), "test")[i]["long_caption"]
                for i in range(3)]
    ids = tokenizer(captions, 248)
    assert ((ids > 0).sum(axis=1) > 77).all()  # captions longer than CLIP's 77 tokens
    expected = np.asarray(model.apply({"params": params}, ids, normalize=False, method=CLIP.encode_text))

    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "text", local_files_only=True)
    hf_ids = hf_tokenizer(captions, padding="max_length", max_length=248, truncation=True, return_tensors="np")
    eot = tokenizer.eot_id
    for mine, theirs in zip(ids, hf_ids["input_ids"], strict=True):  # HF pads with EOT, we with 0
        n = int(np.argmax(mine == eot)) + 1
        assert mine[:n].tolist() == theirs[:n].tolist()
    with torch.no_grad():
        with_proj = transformers.CLIPTextModelWithProjection.from_pretrained(root / "text", local_files_only=True)
        assert with_proj.config.max_position_embeddings == 248
        got = with_proj.eval()(torch.from_numpy(hf_ids["input_ids"].astype(np.int64))).text_embeds.numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        plain = transformers.CLIPTextModel.from_pretrained(root / "text", local_files_only=True).eval()
        pooled = plain(torch.from_numpy(hf_ids["input_ids"].astype(np.int64))).pooler_output
        np.testing.assert_allclose((pooled @ with_proj.text_projection.weight.T).numpy(), expected, atol=1e-5)


def test_the_recipe_on_an_interpolated_stretch_is_told_to_let_the_table_train(tmp_path):
    # An interpolated stretch keeps no positions; the keep recipe refuses it naming keep_positions=0, and its rule
    # freezing text/positional_embedding would then freeze every position, the stretched ones too, silently.
    from clip_jax.config import load_config
    from clip_jax.errors import ConfigError
    from clip_jax.train.loop import positions_warning, prepare_workdir
    from clip_jax.train.state import trainable_mask

    stretched = load_config(f"{CONFIG}:interpolate", TINY)  # what `stretch --method interpolate` leaves: keep 0
    prepare_workdir(stretched, tmp_path)
    recipe = load_config(CONFIG, TINY)  # keep 20, the kept table frozen
    with pytest.raises(ConfigError) as refused:
        prepare_workdir(recipe, tmp_path, checkpoint_step=0)
    assert "--config.model.text.keep_positions=0 '--config.optimizer.frozen=()'" in str(refused.value)
    told = load_config(CONFIG, [*TINY, "--config.model.text.keep_positions=0"])  # half of what the refusal says
    params = {"text": {"positional_embedding": 0}, "visual": {"proj": 0}}
    said = positions_warning(told, trainable_mask(params, told.optimizer.frozen))
    assert "none of them will train" in said and said.endswith("'--config.optimizer.frozen=()'")
    followed = load_config(CONFIG, [*TINY, "--config.model.text.keep_positions=0", "--config.optimizer.frozen=()"])
    assert positions_warning(followed, trainable_mask(params, followed.optimizer.frozen)) is None
    prepare_workdir(followed, tmp_path, checkpoint_step=0)  # and the workdir takes it


def test_stretch_and_its_refusals_name_the_command_that_gives_the_length_asked():
    from clip_jax.models.positions import check_stretch
    from clip_jax.train.loop import _stretch_flags

    # each suggestion, run through stretch's own arithmetic, gives the length asked
    for current, wanted, keep, flags in [(77, 248, 20, ""), (248, 476, 20, " --ratio 2"), (77, 134, 20, " --ratio 2"),
                                         (248, 476, 10, ""), (77, 300, 0, " --method interpolate --length 300"),
                                         (77, 77 + 2 * 67, 10, " --keep 10 --ratio 3")]:
        assert _stretch_flags(current, wanted, keep) == flags
        if flags and "interpolate" not in flags:
            ratio = int(flags.split("--ratio ")[1])
            assert check_stretch(current, keep=keep, ratio=ratio) == wanted


def test_the_recipe_stretch_names_fits_the_model(tmp_path, monkeypatch):
    from clip_jax.cli import LONGCLIP_CONTEXT, LONGCLIP_KEEP, LONGCLIP_RECIPES, longclip_recipe
    from clip_jax.config import load_config

    root = pathlib.Path(__file__).resolve().parents[1]
    for size, recipe in LONGCLIP_RECIPES.items():  # the table agrees with the recipes themselves
        model = load_config(str(root / recipe)).model
        assert (model.vision.width, model.vision.layers, model.vision.patch_size) == size
        assert (model.text.context_length, model.text.keep_positions) == (LONGCLIP_CONTEXT, LONGCLIP_KEEP)
        told = longclip_recipe(model.to_dict(), "out")
        assert told == f"clip-jax train --config {recipe} --workdir out --config.data.path=..."
        model.text.update(keep_positions=0, context_length=300)  # an interpolated stretch to 300
        told = longclip_recipe(model.to_dict(), "out")
        assert ("--config.model.text.keep_positions=0 '--config.optimizer.frozen=()' "
                "--config.model.text.context_length=300") in told
        # and what it says is what the recipe needs: the workdir's model, nothing frozen
        flags = told.split(" --workdir out ")[1].split(" --config.data.path")[0]
        followed = load_config(str(root / recipe), shlex.split(flags))
        assert followed.optimizer.frozen == () and followed.model.text.to_dict() == model.text.to_dict()
    shapes = load_config(f"{CONFIG}:base").model.to_dict()
    shapes["text"].update(context_length=248, keep_positions=20)
    assert longclip_recipe(shapes, "o") == "clip-jax train --config configs/longclip_shapes.py --workdir o"
    shapes["text"].update(keep_positions=0)
    assert ":interpolate --workdir o" in longclip_recipe(shapes, "o")
    # A model stretched from a run on a table of the user's: the command names that table (it trained on shapes, or
    # on ShareGPT4V's path placeholder, with the recipes' data.skip of its first 1,000 rows)
    table = {"source": "captions", "path": "/d/my table.csv", "image_root": "/d/images"}
    told = longclip_recipe(shapes, "o", table)
    assert told.endswith("--config.data.source=captions '--config.data.path=/d/my table.csv' "
                         "--config.data.image_root=/d/images"), told
    followed = load_config(str(root / "configs/longclip_shapes.py:interpolate"), shlex.split(told)[6:])
    assert (followed.data.source, followed.data.path, followed.data.image_root) == (
        "captions", "/d/my table.csv", "/d/images")
    b16 = load_config(str(root / LONGCLIP_RECIPES[(768, 12, 16)])).model.to_dict()
    assert longclip_recipe(b16, "o", table).endswith("--config.data.skip=0")
    # A model of no recipe's size (a converted one of one's own): the shapes recipe's command was refused (another
    # tokenizer, another model); its own config.json is fine-tuned with Long-CLIP's settings.
    own = load_config(str(root / "configs/pretrain.py:B/32")).model.to_dict()
    own["text"].update(context_length=248, keep_positions=20)
    told = longclip_recipe(own, "o", table)
    assert told.startswith("clip-jax train --workdir o --config.method.name=longclip") and "--config " not in told
    command = shlex.split(told.split(" (with your run's")[0])
    followed = load_config(str(root / "configs/pretrain.py:B/32"), command[4:])  # as its config.json, B/32's
    assert followed.method.name == "longclip" and followed.optimizer.frozen == (r"^text/positional_embedding$",)
    assert (followed.model.max_logit_scale, followed.data.path) == (0, "/d/my table.csv")
    # from another folder, a recipe path that resolves
    monkeypatch.chdir(tmp_path)
    assert f"--config {root / 'configs' / 'longclip_shapes.py'}:interpolate --workdir o" in longclip_recipe(shapes, "o")
