"""The ModifiedResNet image tower (models/resnet.py) against open_clip's, and its conversion both ways.

open_clip initialises every BatchNorm to mean 0, var 1, weight 1 (the blocks' last to weight 0, which silences
every residual branch), so the PyTorch models here get random BatchNorm statistics and affines first: the
parity then exercises the folding of real statistics and every branch of every block.
"""

import json
import pathlib
import re
import sys
import types

import jax
import numpy as np
import pytest

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP as OpenClipCLIP  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from clip_jax.config import ConfigError, load_config  # noqa: E402
from clip_jax.data.pipeline import tokenizer_corpus  # noqa: E402
from clip_jax.data.tokenizer import ClipTokenizer  # noqa: E402
from clip_jax.interop import ConversionError  # noqa: E402
from clip_jax.interop import workdir as wd  # noqa: E402
from clip_jax.interop.safe_load import read_tensors, write_tensors  # noqa: E402
from clip_jax.methods import get_method  # noqa: E402
from clip_jax.models import flops  # noqa: E402
from clip_jax.models.clip import CLIP, CLIPConfig  # noqa: E402
from clip_jax.models.positions import resize_grid_positions, resize_image_positions  # noqa: E402
from clip_jax.sharding import make_mesh  # noqa: E402

from .test_methods import VOCAB, compiled, run, tiny_config  # noqa: E402
from .test_train_step import assert_trees_close  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4  # the bound; measured differences are printed (-s)


def randomize_batch_norms(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


def small_resnet_clip(seed=0, vocab_size=100):
    """A ModifiedResNet of another size than RN50: one block per stage but two in the third, width 16, 64 px (a
    2x2 attention-pool grid), 4 heads instead of OpenAI's 32 * width / 64 = 8."""
    torch.manual_seed(seed)
    model = OpenClipCLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=[1, 1, 2, 1], width=16, head_width=128, image_size=64),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=vocab_size, width=64, heads=2, layers=1),
    )
    return randomize_batch_norms(model, seed)


def state_dict(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def images(size, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def their_image_embeddings(model, x):
    with torch.no_grad():
        return model.encode_image(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def our_image_embeddings(model_dict, params, x):
    model = CLIP(CLIPConfig.from_dict(model_dict))
    return np.asarray(compiled(model, lambda m, x: m.encode_image(x, normalize=False))({"params": params}, x))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.fixture(scope="module")
def rn50():
    model = randomize_batch_norms(open_clip.create_model("RN50-quickgelu"))
    return model, wd.load_source_state_dict(state_dict(model))


def test_rn50_imports_with_image_embeddings_of_open_clip(rn50):
    torch_model, imported = rn50
    v = imported.model["vision"]
    assert v["type"] == "resnet" and v["norm"] == "frozen_bn"
    assert (v["layers"], v["width"], v["heads"], v["image_size"], imported.model["embed_dim"]) == (
        (3, 4, 6, 3), 64, 32, 224, 1024)
    x = images(224)
    diff = max_diff(their_image_embeddings(torch_model, x), our_image_embeddings(imported.model, imported.params, x))
    print(f"RN50 image embeddings: max abs diff {diff:.2e}")
    assert diff <= TOL


def test_rn50_flops_formula_matches_torch_flop_counter(rn50):
    """Our analytic count against PyTorch's count (2 per multiply-add of every convolution and matmul) of open_clip's
    convolutions, then of the attention pool as OpenAI computes it: one query, the mean token. (open_clip's pool
    projects all 50 tokens as queries, through c_proj too, and keeps the first: 0.6 GFLOPs more, same output.)"""
    torch_model, imported = rn50
    visual = torch_model.visual
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        x = visual.stem(torch.zeros(1, 3, 224, 224))
        for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = stage(x)
        tokens = x.flatten(2).permute(0, 2, 1)  # [1, 49, 2048]
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + visual.attnpool.positional_embedding
        pool, heads = visual.attnpool, visual.attnpool.num_heads
        split = lambda t: t.reshape(1, t.shape[1], heads, -1).transpose(1, 2)
        q = split(torch.nn.functional.linear(tokens[:, :1], pool.q_proj.weight, pool.q_proj.bias))
        k = split(torch.nn.functional.linear(tokens, pool.k_proj.weight, pool.k_proj.bias))
        v = split(torch.nn.functional.linear(tokens, pool.v_proj.weight, pool.v_proj.bias))
        attended = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        torch.nn.functional.linear(attended.transpose(1, 2).reshape(1, 1, -1), pool.c_proj.weight, pool.c_proj.bias)
    ours = flops.image_forward_flops(CLIPConfig.from_dict(imported.model))
    assert ours == pytest.approx(counter.get_total_flops(), rel=1e-6)


def test_small_resnet_converts_both_ways(tmp_path):
    """Another size, with non-default heads: import (through a file and the open_clip config's heads), parity of
    image and text embeddings, then export that open_clip loads strictly and that computes the same."""
    torch_model = small_resnet_clip()
    folder = tmp_path / "oc"
    folder.mkdir()
    write_tensors(folder / "open_clip_model.safetensors", state_dict(torch_model))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32, "vision_cfg": {"layers": [1, 1, 2, 1], "width": 16, "head_width": 128, "image_size": 64},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1}}}))
    imported = wd.load_source(folder)
    assert imported.model["vision"]["heads"] == 4 and imported.model["vision"]["layers"] == (1, 1, 2, 1)
    x = images(64)
    ids = np.array([[98, 5, 7, 99] + [0] * 12, [98, 3, 99] + [0] * 13])
    expected = their_image_embeddings(torch_model, x)
    diff = max_diff(expected, our_image_embeddings(imported.model, imported.params, x))
    model = CLIP(CLIPConfig.from_dict(imported.model))
    with torch.no_grad():
        their_text = torch_model.encode_text(torch.from_numpy(ids)).numpy()
    text_diff = max_diff(their_text, compiled(model, lambda m, t: m.encode_text(t, normalize=False))(
        {"params": imported.params}, ids))
    print(f"small resnet: image {diff:.2e}, text {text_diff:.2e}")
    assert diff <= TOL and text_diff <= TOL

    out = tmp_path / "export"
    wd.export_params(imported.params, imported.model, "openai", out)
    config = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert config["vision_cfg"] == {"image_size": 64, "layers": [1, 1, 2, 1], "width": 16, "head_width": 128}
    reloaded = OpenClipCLIP(config["embed_dim"], CLIPVisionCfg(**config["vision_cfg"]),
                            CLIPTextCfg(**config["text_cfg"]), quick_gelu=config["quick_gelu"])
    exported = read_tensors(out / "open_clip_model.safetensors")
    reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    diff = max_diff(expected, their_image_embeddings(reloaded.eval(), x))
    print(f"small resnet exported and reloaded in open_clip: {diff:.2e}")
    assert diff <= TOL

    # The neutral statistics written for the folded BatchNorms read back as the same folded parameters.
    again = wd.load_source_state_dict(exported, heads_vision=4, heads_text=2)
    for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("vision_cfg, words", [
    ({"layers": 2, "width": 64, "head_width": 64, "image_size": 64, "patch_size": 16},  # a ViT's config
     "says a ViT image tower but its weights are a ResNet's"),
    ({"layers": [1, 1, 1, 1], "width": 16, "head_width": 128, "image_size": 64}, "vision_cfg.layers (1, 1, 1, 1)"),
    ({"layers": [1, 1, 2, 1], "width": 16, "head_width": 128, "image_size": 288}, "vision_cfg.image_size 288"),
])
def test_an_open_clip_folder_whose_config_is_another_resnets_is_refused(tmp_path, vision_cfg, words):
    """Its heads come from the config: another model's read the weights with other heads (1 for a ViT's config,
    where the model has 4), and converted without a word."""
    write_tensors(tmp_path / "open_clip_model.safetensors", state_dict(small_resnet_clip()))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32, "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 1}}}))
    with pytest.raises(ConversionError, match=re.escape(words)):
        wd.load_source(tmp_path)


def test_a_group_norm_resnet_the_hf_format_and_a_damaged_batch_norm_are_refused(tmp_path):
    imported = wd.load_source_state_dict(state_dict(small_resnet_clip()), heads_vision=4)
    group = dict(imported.model, vision=dict(imported.model["vision"], norm="group"))
    with pytest.raises(ConversionError, match="norm 'group' has no OpenAI / open_clip layout"):
        wd.export_params(imported.params, group, "openai", tmp_path / "g.safetensors")
    with pytest.raises(ConversionError, match="Hugging Face's CLIPModel has no ResNet image tower: export --format "
                                              "openai"):
        wd.export_params(imported.params, imported.model, "hf", tmp_path / "hf")
    # a GroupNorm tower: --format openai was suggested, and then refused too
    with pytest.raises(ConversionError, match="no ResNet image tower: nor does any PyTorch format hold a GroupNorm"):
        wd.export_params(imported.params, group, "hf", tmp_path / "hf")
    damaged = state_dict(small_resnet_clip())
    del damaged["visual.layer2.0.bn2.running_var"]
    with pytest.raises(ConversionError, match="BatchNorm 'visual.layer2.0.bn2' has running_mean but no "
                                              "visual.layer2.0.bn2.running_var"):
        wd.load_source_state_dict(damaged, heads_vision=4)
    # named_parameters() alone: the weights were read as folded scales (embeddings 0.31 away), silently
    parameters_only = {k: v for k, v in state_dict(small_resnet_clip()).items()
                       if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    with pytest.raises(ConversionError, match=r"BatchNorms of the image tower, the first 'visual.bn1.weight', have a "
                                              r"weight but no running statistics .* save the model's state_dict\(\)"):
        wd.load_source_state_dict(parameters_only, heads_vision=4)
    for statistic, value in (("running_var", -1.0), ("running_mean", np.nan)):  # named the folded weight and bias
        damaged = state_dict(small_resnet_clip())
        damaged[f"visual.layer2.0.bn2.{statistic}"][0] = value
        with pytest.raises(ConversionError, match=f"BatchNorm 'visual.layer2.0.bn2' has a damaged {statistic}"):
            wd.load_source_state_dict(damaged, heads_vision=4)
    written = wd.export_params(imported.params, imported.model, "hf-text", tmp_path / "text")  # the text tower is
    assert (tmp_path / "text" / "config.json") in written  # a plain transformer


def test_resize_grid_positions_keeps_the_leading_rows_and_averages_when_halving():
    table = np.arange(17 * 3, dtype=np.float32).reshape(17, 3)  # a mean token, then a 4x4 grid
    np.testing.assert_array_equal(resize_grid_positions(table, 4), table)
    half = resize_grid_positions(table, 2)
    assert half.shape == (5, 3)
    np.testing.assert_array_equal(half[0], table[0])
    grid = table[1:].reshape(4, 4, 3)
    # Bilinear halving samples between every 2x2 block's four cells: their mean.
    np.testing.assert_allclose(half[1:].reshape(2, 2, 3), grid.reshape(2, 2, 2, 2, 3).mean(axis=(1, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="not 1 \\+ a square grid"):
        resize_grid_positions(table[:-1], 2)


# ---- training --------------------------------------------------------------------------------------------------
def test_a_resnet_clip_step_on_a_2x2x2_mesh_equals_one_device():
    """The tower's parameters and activations shard by their logical names (kernels' output channels over fsdp),
    and GroupNorm normalises each example by itself: two steps on a 2x2x2 mesh are two steps on one device."""
    config = tiny_config("clip")
    config.model.vision = {"type": "resnet", "layers": (1, 1, 1, 1), "width": 8, "heads": 2, "image_size": 32,
                           "norm": "group"}
    method = get_method(config)
    tokenizer = ClipTokenizer.train(tokenizer_corpus(config, 500), VOCAB)
    batches = method.train_data(config, tokenizer, list(range(config.batch_size)))
    batches = [{k: v for k, v in next(batches).items() if k != "stats"} for _ in range(2)]
    want, want_metrics, initial = run(config, method, batches, make_mesh({"data": 1}, jax.devices()[:1]))
    got, got_metrics, _ = run(config, method, batches, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), initial=initial)
    for w, g in zip(want_metrics, got_metrics, strict=True):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
        np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-4)
    assert_trees_close(jax.device_get(got.params), jax.device_get(want.params), rtol=1e-4, atol=2e-5)


# ---- configuration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, words", [
    ("model.vision.layers=(1, 1, 1)", ("model.vision.layers", "4 block counts")),
    ("model.vision.image_size=100", ("model.vision.image_size 100", "multiple of 32")),
    ("model.vision.heads=3", ("model.vision.heads 3", "512")),
    ("model.vision.width=15", ("model.vision.width 15", "even")),
    ("model.vision.norm='batch'", ("model.vision.norm", "frozen_bn, group")),
    ("model.vision.patch_size=16", ("'model.vision.patch_size'",)),
    ("method.name=maple", ("maple", "model.vision.type 'vit'")),
])
def test_a_resnet_config_that_cannot_build_is_refused_in_one_line(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(str(REPO / "configs" / "resnet_shapes.py"), [f"--config.{override}"])
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_another_resolution_interpolates_the_pool_positions():
    """What `clip-jax convert --image-size` does to a ResNet: 64 -> 96 px, a 2x2 grid of pool positions -> 3x3."""
    torch_model = small_resnet_clip()
    imported = wd.load_source_state_dict(state_dict(torch_model), heads_vision=4, heads_text=2, activation="gelu")
    params, vision = resize_image_positions(imported.params, imported.model["vision"], 96)
    assert vision["image_size"] == 96
    table = params["visual"]["attnpool"]["positional_embedding"]
    original = torch_model.visual.attnpool.positional_embedding.detach().numpy()
    assert table.shape == (10, 512)  # the mean token and a 3x3 grid, 32 x width wide
    np.testing.assert_array_equal(table[0], original[0])
    np.testing.assert_array_equal(imported.params["visual"]["attnpool"]["positional_embedding"], original)  # a copy
    embeddings = our_image_embeddings(dict(imported.model, vision=vision), params, images(96))
    assert embeddings.shape == (2, 32) and np.isfinite(embeddings).all()
    with pytest.raises(ConfigError, match="--image-size 100: must be a positive multiple of 32"):
        resize_image_positions(params, vision, 100)


def test_a_config_file_of_ones_own_gives_a_recipe_the_other_tower(tmp_path, caplog):
    """A few-shot recipe names a ViT and overrides cannot switch the tower type: a file of the user's, outside the
    checkout, could not import the recipes (no `configs` on its path). And an init_from of the other tower's type
    failed on the first parameter it lacked (the ViT's class_embedding)."""
    import subprocess

    from clip_jax.config import default_config, save_config
    from clip_jax.train.loop import _tell_init_from_changes

    own = tmp_path / "my_coop_resnet.py"
    own.write_text("from configs.common import small_resnet\nfrom configs.coop import shapes\n\n\ndef get_config():\n"
                   "    config = shapes.get_config()\n    config.model.vision = small_resnet('group')\n"
                   "    return config\n")
    read = ("import sys; from clip_jax.config import load_config; "
            f"print(load_config({str(own)!r}).model.vision.type, 'configs' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", read], cwd=tmp_path, capture_output=True, text=True,
                            env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert result.stdout.split() == ["resnet", "True"], result.stderr
    # the same file in a package of the user's (its own folder then first on the path): "No module named 'configs'"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "__init__.py").write_text("")
    in_package = tmp_path / "mine" / own.name
    in_package.write_text(own.read_text())
    result = subprocess.run([sys.executable, "-c", read.replace(str(own), str(in_package))], cwd=tmp_path,
                            capture_output=True, text=True,
                            env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert result.stdout.split() == ["resnet", "True"], result.stderr
    vit_run = tmp_path / "vit_run"
    vit_run.mkdir()
    save_config(default_config(), vit_run / "config.json")
    config = load_config(str(own), [f"--config.init_from={vit_run}"])
    with pytest.raises(ConfigError, match=f"config.init_from {vit_run} holds a CLIP with a vit image tower, and this "
                                          "config's is a resnet: give the recipe that tower in a config file"):
        _tell_init_from_changes(config)
    # A converted ResNet (BatchNorm folded) read into a GroupNorm recipe (configs/pretrain.py:RN50's) trained
    # another function of the same parameters without a word; another attention-pool head count, likewise.
    bn_run = tmp_path / "bn_run"
    bn_run.mkdir()
    converted = default_config()
    converted.model.vision = {"type": "resnet", "layers": (1, 1, 1, 1), "width": 8, "heads": 2, "image_size": 32,
                              "norm": "frozen_bn"}
    save_config(converted, bn_run / "config.json")
    config = load_config(str(own), [f"--config.init_from={bn_run}"])
    with pytest.raises(ConfigError, match=f"config.init_from {bn_run} holds a ResNet with norm 'frozen_bn', and "
                                          "this config's is 'group': .* set --config.model.vision.norm=frozen_bn"):
        _tell_init_from_changes(config)
    config = load_config(str(own), [f"--config.init_from={bn_run}", "--config.model.vision.norm=frozen_bn",
                                    "--config.model.vision.heads=4"])
    with caplog.at_level("WARNING", logger="clip_jax.train.loop"):
        _tell_init_from_changes(config)
    assert "other model settings (model.vision.heads 2 -> 4)" in caplog.text, caplog.text


@pytest.mark.parametrize("name, norm", [("clip", "frozen_bn"), ("clip", "group"), ("lseg", None), ("vild", None),
                                        ("groupvit", None), ("glip", None), ("audioclip", None)])
def test_the_default_weight_decay_spares_every_norm_and_temperature(name, norm):
    """A ResNet's BatchNorm (or GroupNorm) scales and a method's own norms were decayed (the rules named LayerNorms
    only): a fine-tuned converted ResNet's folded scales shrank, where open_clip, which decays no 1-D parameter,
    keeps them; AudioCLIP's audio temperatures too. The kernels and projections are decayed."""
    import flax.linen as nn

    from clip_jax.train.state import match_any, param_paths

    config = tiny_config(name)
    if norm:
        config.model.vision = {"type": "resnet", "layers": (1, 1, 1, 1), "width": 8, "heads": 2, "image_size": 32,
                               "norm": norm}
    method = get_method(config)
    params = nn.unbox(jax.eval_shape(method.model().init, jax.random.PRNGKey(0), *method.init_inputs())["params"])
    leaves = dict(zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(params), strict=True))
    decayed = {path for path in leaves if not match_any(config.optimizer.no_decay, path)}
    assert not [path for path in decayed if leaves[path].ndim < 2], decayed
    # (attention biases are [heads, head_dim]: 1-D in open_clip's in_proj_bias)
    assert not [path for path in leaves if leaves[path].ndim >= 2 and path not in decayed
                and not path.endswith("bias") and "embedding" not in path]
    if norm:
        assert "visual/layer1_0/bn1/scale" in leaves and "visual/layer1_0/conv1/kernel" in decayed
