"""Checkpoint interop against the real peers: randomly initialised open_clip and Hugging Face models (no downloads).

Parity: image embeddings, text embeddings and logits of the imported model vs PyTorch on the same inputs, max abs
diff <= 1e-5 in float32. Exports reload in open_clip (strict) and transformers and give the same outputs; round
trips clip_jax -> file -> clip_jax are bit-exact.
"""

import json
import pathlib
import pickle
import sys
import types

import jax
import numpy as np
import pytest

# The torchvision build here is broken; open_clip and transformers import it only for this module's side effects.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")
from open_clip.model import CLIP as OpenClipCLIP  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

from clip_jax.cli import main  # noqa: E402
from clip_jax.data.tokenizer import ClipTokenizer  # noqa: E402
from clip_jax.interop import ConversionError  # noqa: E402
from clip_jax.interop import hf as hf_lib  # noqa: E402
from clip_jax.interop import openai as oa  # noqa: E402
from clip_jax.interop import workdir as wd  # noqa: E402
from clip_jax.interop.safe_load import read_tensors, write_tensors  # noqa: E402
from clip_jax.models.clip import CLIP, CLIP_MEAN, CLIP_STD, CLIPConfig  # noqa: E402

from .test_methods import compiled  # noqa: E402

TOL = 1e-5


def small_open_clip(quick_gelu=False, context_length=16, vocab_size=100, text_width=64, seed=0):
    torch.manual_seed(seed)
    return OpenClipCLIP(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=text_width, heads=2, layers=2),
        quick_gelu=quick_gelu,
    ).eval()


def state_dict(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def inputs(image_size, context_length, vocab_size, batch=2, seed=0):
    """Images (NHWC, already normalised) and ids whose EOT (= vocab_size - 1, the largest id) occurs once per row:
    argmax pooling (ours, open_clip) and first-EOS pooling (HF) pick the same position."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    ids = np.zeros((batch, context_length), np.int64)
    for row in range(batch):
        n = int(rng.integers(2, context_length - 1))
        ids[row, : n] = rng.integers(1, vocab_size - 2, n)
        ids[row, 0], ids[row, n] = vocab_size - 2, vocab_size - 1
    return images, ids


def ours(model_dict, params, images, ids):
    model = CLIP(CLIPConfig.from_dict(model_dict))
    if model_dict.get("scan_layers") and "resblocks_0" in params["visual"]["transformer"]:
        params = oa.stack_layers(params)
    out = jax.jit(model.apply)({"params": params}, images, ids)  # compiled: one program, not op by op
    image, text = np.asarray(out["image"]), np.asarray(out["text"])
    return image, text, float(out["logit_scale"]) * image @ text.T


def assert_close(name, a, b):
    diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    print(f"{name}: max abs diff {diff:.2e}")
    assert diff <= TOL, (name, diff)


def open_clip_outputs(model, images, ids):
    with torch.no_grad():
        image, text, scale = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(ids))
    return image.numpy(), text.numpy(), (scale * image @ text.T).numpy()


def hf_outputs(model, images, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def assert_parity(prefix, theirs, mine):
    for name, a, b in zip(("image", "text", "logits"), theirs, mine, strict=True):
        assert_close(f"{prefix} {name}", a, b)


def trees_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("size", [224, 32])
def test_eval_transform_is_open_clips(size):
    """`resize_center_crop` gives the very pixels of open_clip's (and OpenAI's) eval transform, torchvision's
    Resize(size, bicubic) then CenterCrop(size), on images whose resized longer side is not a whole number."""
    from PIL import Image
    from torchvision import transforms

    from clip_jax.data.images import resize_center_crop

    theirs = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                                 transforms.CenterCrop(size)])
    rng = np.random.default_rng(0)
    for width, height in [(640, 480), (640, 427), (375, 500), (500, 333), (31, 97), (size + 1, size), (size, size)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        np.testing.assert_array_equal(resize_center_crop(image, size), np.asarray(theirs(image)),
                                      err_msg=f"{width}x{height}")


# ---- import: open_clip -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_small_open_clip_parity(tmp_path, quick_gelu):
    torch_model = small_open_clip(quick_gelu)
    write_tensors(tmp_path / "small.safetensors", state_dict(torch_model))
    imported = wd.load_source(
        tmp_path / "small.safetensors", heads_vision=2, heads_text=2, activation="quick_gelu" if quick_gelu else "gelu"
    )
    assert imported.model["vision"]["heads"] == 2 and imported.model["text"]["context_length"] == 16
    images, ids = inputs(32, 16, 100)
    assert_parity("open_clip small", open_clip_outputs(torch_model, images, ids), ours(imported.model,
                                                                                      imported.params, images, ids))


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu"])  # GELU's import flag: test_small_open_clip_parity
def test_b32_parity(name):
    """Full-size B/32 (random init): shapes, heads (width // 64) and activation as OpenAI's. One forward of 2."""
    torch_model = open_clip.create_model(name).eval()
    # No flags for the quickgelu model: OpenAI-layout defaults are QuickGELU and width // 64 heads.
    imported = wd.load_source_state_dict(state_dict(torch_model), activation=None if "quick" in name else "gelu")
    model = dict(imported.model, scan_layers=True)  # the stacked layout, and a faster compile
    assert (model["vision"]["heads"], model["text"]["heads"], model["vision"]["image_size"]) == (12, 8, 224)
    images, ids = inputs(224, 77, 49408)
    assert_parity(name, open_clip_outputs(torch_model, images, ids), ours(model, imported.params, images, ids))


def test_open_clip_training_checkpoint_and_longclip(tmp_path):
    torch_model = small_open_clip(context_length=248)
    sd = state_dict(torch_model)
    # open_clip training checkpoint: wrapped, DDP prefix
    torch.save({"epoch": 1, "name": "run", "state_dict": {"module." + k: torch.from_numpy(v) for k, v in sd.items()}},
               tmp_path / "epoch_1.pt")
    imported = wd.load_source(tmp_path / "epoch_1.pt", heads_vision=2, heads_text=2, activation="gelu")
    assert trees_equal(imported.params, wd.load_source_state_dict(sd, heads_vision=2, heads_text=2).params)


def test_longclip_two_tables_import_export(tmp_path):
    """Long-CLIP: a frozen table for positions < 20 and a trained one for the rest. Both import as they are
    (keep_positions 20), the model uses where(pos < 20, first, second), the openai export writes both back
    bit-exact, and the HF text export holds that merged table."""
    torch_model = small_open_clip(context_length=248)
    sd = {k: v.copy() for k, v in state_dict(torch_model).items()}  # not views of the torch model's memory
    frozen, trained = sd["positional_embedding"], sd["positional_embedding"] + 1.0
    longclip = {**sd, "positional_embedding": frozen, "positional_embedding_res": trained}
    write_tensors(tmp_path / "longclip.safetensors", longclip)
    imported = wd.load_source(tmp_path / "longclip.safetensors", heads_vision=2, heads_text=2, activation="gelu")
    assert imported.source == "longclip" and imported.model["text"]["keep_positions"] == 20
    np.testing.assert_array_equal(imported.params["text"]["positional_embedding"], frozen)
    np.testing.assert_array_equal(imported.params["text"]["positional_embedding_res"], trained)

    merged = np.where(np.arange(248)[:, None] < 20, frozen, trained)
    with torch.no_grad():
        torch_model.positional_embedding.copy_(torch.from_numpy(merged))  # open_clip holding the merged table
    images, ids = inputs(32, 248, 100)
    # (image and text embeddings; logits multiply the text difference, ~2e-6 at 248 tokens, by the scale 14.3)
    theirs, mine = open_clip_outputs(torch_model, images, ids), ours(imported.model, imported.params, images, ids)
    for name, a, b in zip(("image", "text"), theirs, mine, strict=False):
        assert_close(f"Long-CLIP {name}", a, b)

    back = read_tensors(wd.export_params(imported.params, imported.model, "openai", tmp_path / "b.safetensors")[0])
    assert set(back) == set(longclip) and all(np.array_equal(back[k], longclip[k]) for k in longclip)
    # Another kept count (a `stretch --keep 10` run): the two tables read back as keep 20's, another text model
    # without a word; the file holds the one table they amount to, which reads back as the same model.
    keep_10 = dict(imported.model, text=dict(imported.model["text"], keep_positions=10))
    file = wd.export_params(imported.params, keep_10, "openai", tmp_path / "k10.safetensors")[0]
    again = wd.load_source(file, heads_vision=2, heads_text=2, activation="gelu")
    assert again.model["text"]["keep_positions"] == 0 and "positional_embedding_res" not in read_tensors(file)
    np.testing.assert_array_equal(again.params["text"]["positional_embedding"],
                                  np.where(np.arange(248)[:, None] < 10, frozen, trained))

    wd.export_params(imported.params, imported.model, "hf-text", tmp_path / "text")
    hf_text = wd.load_source(tmp_path / "text")
    assert hf_text.model["text"]["keep_positions"] == 0
    np.testing.assert_array_equal(hf_text.params["text"]["positional_embedding"], merged)
    model = CLIP(CLIPConfig.from_dict(imported.model))
    unnormalised = compiled(model, lambda m, t: m.encode_text(t, normalize=False))
    expected = np.asarray(unnormalised({"params": imported.params}, ids))
    with torch.no_grad():
        reloaded = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "text").eval()
        assert_close("Long-CLIP hf-text", reloaded(torch.from_numpy(ids)).text_embeds, expected)


# ---- import: Hugging Face ----------------------------------------------------------------------------------------
def small_hf(max_positions=16):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=max_positions, hidden_act="quick_gelu",
                         bos_token_id=98, eos_token_id=99, pad_token_id=99),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=24,
    )
    return transformers.CLIPModel(config).eval()


def test_hf_parity(tmp_path):
    hf_model = small_hf()
    assert hf_model.config.text_config.eos_token_id == 99  # first-EOS pooling, at the largest id here
    hf_model.save_pretrained(tmp_path / "hf")
    imported = wd.load_source(tmp_path / "hf")
    m = imported.model
    assert (m["vision"]["activation"], m["text"]["activation"]) == ("gelu", "quick_gelu")
    assert (m["vision"]["heads"], m["text"]["heads"], m["embed_dim"]) == (3, 4, 24)
    images, ids = inputs(32, 16, 100)
    assert_parity("HF CLIPModel", hf_outputs(hf_model, images, ids), ours(m, imported.params, images, ids))


def test_a_flag_mends_an_hf_config_that_cannot_be_read(tmp_path):
    small_hf().save_pretrained(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["num_attention_heads"] = 3  # does not divide the width 64
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="pass --heads-text"):
        wd.load_source(tmp_path / "hf")
    assert wd.load_source(tmp_path / "hf", heads_text=4).model["text"]["heads"] == 4  # the flag mends it


def test_a_bare_weights_file_of_an_open_clip_width_with_wider_heads_is_warned_of(monkeypatch, caplog):
    """Heads are not in the weights: a bare file converts with width // 64 of them. At the image widths of open_clip
    models whose heads are wider (ViT-H-14, -g-14, -bigG-14: 16 heads) that is likely the wrong model, converted
    without error; the conversion says so, and says nothing once --heads-vision is given. (The small model stands
    in for one: its width, 64, mapped to a stand-in entry with its true 2 heads.)"""
    configs = pathlib.Path(open_clip.__file__).parent / "model_configs"  # the table, against open_clip's own
    for width, (name, heads) in wd._OPEN_CLIP_WIDE_HEADS.items():
        vision = json.loads((configs / f"{name}.json").read_text())["vision_cfg"]
        assert (vision["width"], vision["width"] // vision["head_width"]) == (width, heads)
    monkeypatch.setitem(wd._OPEN_CLIP_WIDE_HEADS, 64, ("ViT-stand-in", 2))
    sd = state_dict(small_open_clip())
    with caplog.at_level("WARNING"):
        assumed = wd.load_source_state_dict(sd, heads_text=2, activation="gelu", where="model.bin")
    assert assumed.model["vision"]["heads"] == 1
    assert "model.bin holds no config, so its image tower's heads are assumed to be 1 (width // 64" in caplog.text
    said = "open_clip's ViT-stand-in, 64 wide too, has 2: if that is this model, convert again with --heads-vision 2"
    assert said in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        wd.load_source_state_dict(sd, heads_vision=2, heads_text=2, activation="gelu")
    assert "heads are assumed" not in caplog.text


# ---- export ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_import():
    torch_model = small_open_clip()
    imported = wd.load_source_state_dict(state_dict(torch_model), heads_vision=2, heads_text=2, activation="gelu")
    return torch_model, imported


def test_export_openai_strict_load_and_round_trip(tmp_path, small_import):
    torch_model, imported = small_import
    images, ids = inputs(32, 16, 100)
    expected = ours(imported.model, imported.params, images, ids)
    for out, pt in (("m.safetensors", False), ("m.pt", True), ("oc_dir", False)):
        paths = wd.export_params(imported.params, imported.model, "openai", tmp_path / out, pt=pt)
        if out == "oc_dir":
            reloaded = open_clip.create_model(f"local-dir:{tmp_path / out}").eval()
            back = wd.load_source(tmp_path / out)  # heads and activation from open_clip_config.json
        else:
            reloaded = small_open_clip(seed=1)
            sd = torch.load(paths[0], weights_only=True) if pt else {
                k: torch.from_numpy(v) for k, v in read_tensors(paths[0]).items()}
            reloaded.load_state_dict(sd, strict=True)
            back = wd.load_source(paths[0], heads_vision=2, heads_text=2, activation="gelu")
        assert_parity(f"export openai {out}", open_clip_outputs(reloaded, images, ids), expected)
        assert trees_equal(back.params, imported.params) and back.model == imported.model


def test_export_openai_folder_carries_the_runs_own_vocabulary(tmp_path, caplog):
    """A run trained with its own BPE vocabulary (data.tokenizer "train"): the export folder holds it, so that
    open_clip's local-dir tokenizer gives clip_jax's ids (but for the padding: EOT there, 0 here, which the
    end-of-text pooling never reads) and the same text embeddings; `convert` reads the vocabulary back."""
    words = "red green blue circle square star cross the a of in on big small photo picture next to".split()
    rng = np.random.default_rng(0)
    tokenizer = ClipTokenizer.train([" ".join(rng.choice(words, 8)) for _ in range(400)], 600)
    tokenizer.save(tmp_path / "tokenizer.json")
    torch_model = small_open_clip(vocab_size=tokenizer.vocab_size)
    imported = wd.load_source_state_dict(state_dict(torch_model), heads_vision=2, heads_text=2, activation="gelu")
    wd.export_params(imported.params, imported.model, "openai", tmp_path / "oc",
                     tokenizer=json.loads((tmp_path / "tokenizer.json").read_text()))
    captions = ["a red circle.", "A Photo of a BIG blue star next to a small cross!", "<start_of_text> red",
                "café naïve ΟΔΟΣ οδος", "unseen words like zebra", "red " * 30]
    want = tokenizer(captions, 16)
    got = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(captions).numpy()
    eot = tokenizer.eot_id
    for mine, theirs in zip(want, got, strict=True):
        end = list(mine).index(eot) + 1
        assert list(theirs[:end]) == list(mine[:end]) and set(theirs[end:]) <= {eot}
    model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    with torch.no_grad():
        theirs = model.encode_text(torch.from_numpy(got), normalize=True).numpy()
    images = np.zeros((len(captions), 32, 32, 3), np.float32)
    assert_close("text of the exported vocabulary", theirs, ours(imported.model, imported.params, images, want)[1])
    back = wd.resolve_tokenizer(wd.load_source(tmp_path / "oc"))
    assert (back(captions, 16) == want).all()
    # One file has no room for the vocabulary: the export says where it is.
    with caplog.at_level("WARNING", logger="clip_jax.interop.workdir"):
        wd.export_params(imported.params, imported.model, "openai", tmp_path / "oc.safetensors",
                         tokenizer=json.loads((tmp_path / "tokenizer.json").read_text()))
    assert "oc.safetensors holds the weights only, and this run has a vocabulary of its own" in caplog.text


def test_export_openai_from_scanned_params(tmp_path, small_import):
    _, imported = small_import
    path = wd.export_params(oa.stack_layers(imported.params), imported.model, "openai", tmp_path / "s.safetensors")[0]
    assert trees_equal(wd.load_source(path, heads_vision=2, heads_text=2, activation="gelu").params, imported.params)


def test_export_hf_round_trip(tmp_path, small_import):
    _, imported = small_import
    images, ids = inputs(32, 16, 100)
    wd.export_params(imported.params, imported.model, "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == "gelu" and config["vision_config"]["num_attention_heads"] == 2
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert_parity("export hf", hf_outputs(reloaded, images, ids), ours(imported.model, imported.params, images, ids))
    back = wd.load_source(tmp_path / "hf")
    assert trees_equal(back.params, imported.params) and back.model == imported.model


def test_a_refused_hf_export_leaves_nothing(tmp_path, small_import):
    """A SigLIP model's logit_bias has no place in a CLIPModel: refused, naming the formats that take the model,
    and no folder or record is left to block the retry (a record of files never written did)."""
    _, imported = small_import
    params = {**imported.params, "logit_bias": np.float32(-10.0)}
    model = {**imported.model, "logit_bias_init": -10.0}
    with pytest.raises(ConversionError, match="logit_bias.*export --format openai"):
        wd.export_params(params, model, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    with pytest.raises(ConversionError, match="logit_bias"):
        wd.export_params(params, model, "hf", tmp_path / "mine", force=True)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.md"]


def test_a_mean_pooled_vit_goes_to_open_clip_as_its_avg_pool_and_back(tmp_path, small_import):
    """`model.vision.pool` "mean" is open_clip's pool_type "avg" (ln_post, then the mean of the patch tokens): the
    folder export says so in its open_clip_config.json, open_clip computes our embeddings from it, and convert reads
    it back as the same model."""
    _, imported = small_import
    model = {**imported.model, "vision": {**imported.model["vision"], "pool": "mean"}}
    images, ids = inputs(32, 16, 100)
    expected = ours(model, imported.params, images, ids)
    assert np.abs(expected[0] - ours(imported.model, imported.params, images, ids)[0]).max() > 1e-2  # not the token's
    wd.export_params(imported.params, model, "openai", tmp_path / "oc")
    assert json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"][
        "pool_type"] == "avg"
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    assert_parity("export mean-pooled", open_clip_outputs(reloaded, images, ids), expected)
    back = wd.load_source(tmp_path / "oc")
    assert back.model == model and trees_equal(back.params, imported.params)


@pytest.mark.parametrize(("fmt", "out", "where"), [("openai", "m.safetensors", r"m\.safetensors \(a state dict"),
                                                   ("hf", "hf", "Hugging Face's CLIPModel")])
def test_a_mean_pooled_vit_is_refused_where_the_file_cannot_say_so(tmp_path, small_import, fmt, out, where):
    """A bare state dict and HF's CLIPModel are read with the class token as the image's feature: a mean-pooled model
    would be silently another function there. Refused, naming the export that keeps it; nothing written."""
    _, imported = small_import
    model = {**imported.model, "vision": {**imported.model["vision"], "pool": "mean"}}
    with pytest.raises(ConversionError, match=f"model.vision.pool is 'mean': {where}.*export --format openai to a "
                                              "folder"):
        wd.export_params(imported.params, model, fmt, tmp_path / out)
    assert not (tmp_path / out).exists()


def test_a_models_own_image_normalisation_goes_to_open_clip_and_hf_and_back(tmp_path, small_import, caplog):
    """open_clip's ViT-L-14 laion2b_s32b_b82k (HF: laion/CLIP-ViT-L-14-laion2B-s32B-b82K) normalises its images with
    mean and std 0.5, as its open_clip_config.json (preprocess_cfg) and preprocessor_config.json say. convert read
    neither: the converted model normalised with OpenAI's, silently another function of the pixels. Compared here on
    the same uint8 pixels, each library preprocessing them its own way from the files written."""
    from PIL import Image

    _, imported = small_import
    half = (0.5, 0.5, 0.5)
    model = {**imported.model, "image_mean": half, "image_std": half}
    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    _, ids = inputs(32, 16, 100)
    mine = ours(model, imported.params, pixels, ids)
    assert np.abs(mine[0] - ours(imported.model, imported.params, pixels, ids)[0]).max() > 1e-2  # not OpenAI's
    wd.export_params(imported.params, model, "openai", tmp_path / "oc")
    assert json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["preprocess_cfg"] == {
        "mean": [0.5] * 3, "std": [0.5] * 3}
    reloaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    images = torch.stack([preprocess(Image.fromarray(p)) for p in pixels])  # 32 px already: only normalised
    with torch.no_grad():
        assert_close("open_clip image, own normalisation", reloaded.eval().encode_image(images, normalize=True),
                     mine[0])
    back = wd.load_source(tmp_path / "oc")
    assert (back.model["image_mean"], back.model["image_std"]) == (half, half)

    wd.export_params(imported.params, model, "hf", tmp_path / "hf")
    processor = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "hf")
    values = processor(images=[Image.fromarray(p) for p in pixels], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()(
            input_ids=torch.from_numpy(ids), pixel_values=values).image_embeds
    assert_close("HF image, own normalisation", theirs, mine[0])
    back = wd.load_source(tmp_path / "hf")
    assert (back.model["image_mean"], back.model["image_std"]) == (half, half)

    # A bare weights file cannot say it: written, with a warning naming what open_clip must be told.
    with caplog.at_level("WARNING"):
        wd.export_params(imported.params, model, "openai", tmp_path / "m.safetensors")
    assert "normalises its images with mean [0.5, 0.5, 0.5] and std [0.5, 0.5, 0.5], not OpenAI's" in caplog.text
    # A bad preprocess_cfg is one line naming the file.
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["std"] = [0.5, 0.0, 0.5]
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"open_clip_config.json: preprocess_cfg: its std \[0.5, 0.0, 0.5\] is "
                                              "not three numbers"):
        wd.load_source(tmp_path / "oc")


def test_a_bare_file_export_names_the_convert_flags_it_needs_back(tmp_path, small_import, caplog):
    """A weights file holds neither heads nor activation: the small model (2 heads of 32, GELU) came back from
    `convert` of its export as 1 head and QuickGELU, another model, without a word. A name in capitals
    (M.SAFETENSORS) is a file too: it was written as a folder of that name."""
    _, imported = small_import
    with caplog.at_level("WARNING"):
        (path,) = wd.export_params(imported.params, imported.model, "openai", tmp_path / "M.SAFETENSORS")
    assert path.is_file() and path == tmp_path / "M.SAFETENSORS"
    said = ("M.SAFETENSORS holds the weights only, and this model's 2 vision heads and 2 text heads and activation "
            "gelu are not what a weights file is read with (heads of 64 wide, QuickGELU): `clip-jax convert "
            f"{tmp_path / 'M.SAFETENSORS'} --heads-vision 2 --heads-text 2 --activation gelu` reads it back as this "
            "model")  # the path given to --out, where it named the file alone
    assert said in caplog.text
    assert wd.load_source(path).model != imported.model  # without the flags: another model
    back = wd.load_source(path, heads_vision=2, heads_text=2, activation="gelu")
    assert back.model == imported.model and trees_equal(back.params, imported.params)
    # OpenAI's own conventions: nothing to say
    caplog.clear()
    default = wd.load_source(path)
    with caplog.at_level("WARNING"):
        wd.export_params(default.params, default.model, "openai", tmp_path / "d.safetensors")
    assert "holds the weights only" not in caplog.text


def test_how_a_source_prepares_its_images_is_read_or_told(tmp_path, small_import, caplog):
    """transformers 5 saves a CLIPProcessor's image settings in processor_config.json, under "image_processor": its
    mean and std were not read (OpenAI's taken instead, silently). A source that resizes otherwise than clip_jax
    (open_clip's "squash", an HF resize larger than its crop) converted without a word."""
    half = [0.5, 0.5, 0.5]
    small_hf().save_pretrained(tmp_path / "hf5")
    settings = {**hf_lib.hf_preprocessor_config(32, half, half), "size": {"shortest_edge": 36}}
    (tmp_path / "hf5" / "processor_config.json").write_text(json.dumps(
        {"image_processor": settings, "processor_class": "CLIPProcessor"}))
    with caplog.at_level("WARNING"):
        model = wd.load_source(tmp_path / "hf5").model
    assert (model["image_mean"], model["image_std"]) == (tuple(half), tuple(half))
    assert (f"{tmp_path / 'hf5' / 'processor_config.json'}: the source prepares images with size "
            "{'shortest_edge': 36}, where clip_jax resizes the shorter side to 32 (bicubic) and centre-crops 32") in (
        caplog.text)

    _, imported = small_import  # an export of clip_jax's own: prepared as clip_jax prepares them, nothing said
    caplog.clear()
    wd.export_params(imported.params, imported.model, "openai", tmp_path / "oc")
    wd.export_params(imported.params, imported.model, "hf", tmp_path / "hf")
    with caplog.at_level("WARNING"):
        wd.load_source(tmp_path / "oc")
        wd.load_source(tmp_path / "hf")
    assert "prepares images" not in caplog.text
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["resize_mode"] = "squash"  # open_clip's DFN5B ViT-H-14 entry, for one
    (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING"):
        wd.load_source(tmp_path / "oc")
    assert "open_clip_config.json: preprocess_cfg: the source prepares images with resize_mode 'squash'," in (
        caplog.text)


def test_a_temperature_above_clips_clamp_is_kept(small_import):
    """exp(logit_scale) = 148 (an HF fine-tune need not clamp it) became 100 in the converted model: other
    probabilities than the source's, and an export wrote 148 again."""
    torch_model, _ = small_import
    sd = state_dict(torch_model)
    sd["logit_scale"] = np.asarray(5.0, np.float32)
    imported = wd.load_source_state_dict(sd, heads_vision=2, heads_text=2, activation="gelu")
    assert imported.model["max_logit_scale"] == 148.42  # exp(5) = 148.413..., rounded up
    scale, _ = CLIP(CLIPConfig.from_dict(imported.model)).apply({"params": imported.params},
                                                                 method=CLIP.temperature)
    np.testing.assert_allclose(float(scale), np.exp(5.0), rtol=1e-6)
    sd["logit_scale"] = np.asarray(np.log(50.0), np.float32)  # within the clamp: CLIP's bound stays
    assert wd.load_source_state_dict(sd, heads_vision=2, heads_text=2, activation="gelu").model[
        "max_logit_scale"] == 100.0


def test_a_bare_file_keeps_one_activation_for_both_towers(tmp_path, small_import):
    """open_clip and convert rebuild a weights file with one activation for both towers: a model mixing them (an HF
    model may) was written there silently, and read back as another function."""
    _, imported = small_import
    model = {**imported.model, "vision": {**imported.model["vision"], "activation": "quick_gelu"}}
    for out in ("m.safetensors", "oc"):
        with pytest.raises(ConversionError, match="the image tower's activation is quick_gelu and the text tower's "
                                                  "gelu: .* export --format hf"):
            wd.export_params(imported.params, model, "openai", tmp_path / out)
        assert not (tmp_path / out).exists()


def test_an_open_clip_pooling_we_do_not_compute_is_refused():
    for vision, named in (({"pool_type": "none"}, "pool_type='none'"),  # the tokens, unpooled
                          ({"pool_type": "avg", "final_ln_after_pool": True},  # the mean, then ln_post
                           "pool_type='avg' with final_ln_after_pool")):
        with pytest.raises(ConversionError, match=f"vision_cfg.{named} is not supported by clip_jax"):
            oa.open_clip_overrides({"model_cfg": {"vision_cfg": vision}})


def test_export_hf_text_248_positions(tmp_path):
    torch_model = small_open_clip(context_length=248)
    imported = wd.load_source_state_dict(state_dict(torch_model), heads_vision=2, heads_text=2, activation="gelu")
    wd.export_params(imported.params, imported.model, "hf-text", tmp_path / "text")
    _, ids = inputs(32, 248, 100)
    model = CLIP(CLIPConfig.from_dict(imported.model))
    unnormalised = compiled(model, lambda m, t: m.encode_text(t, normalize=False))
    expected = np.asarray(unnormalised({"params": imported.params}, ids))
    with torch.no_grad():
        with_proj = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "text").eval()
        assert with_proj.config.max_position_embeddings == 248
        assert_close("hf-text CLIPTextModelWithProjection", with_proj(torch.from_numpy(ids)).text_embeds, expected)
        plain = transformers.CLIPTextModel.from_pretrained(tmp_path / "text").eval()
        pooled = plain(torch.from_numpy(ids)).pooler_output @ with_proj.text_projection.weight.T
        assert_close("hf-text CLIPTextModel", pooled, expected)
    back = wd.load_source(tmp_path / "text")
    assert back.towers == ("text",) and trees_equal(back.params["text"], imported.params["text"])


# ---- errors ------------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this calls open(marker, "w"): a file appears if anything ran
        return (open, (self.marker, "w"))


def test_refuses_arbitrary_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(_Payload(marker)))
    for name in ("evil.pt", "evil.bin"):
        with pytest.raises(ConversionError, match=f"refusing to load .*{name}.*arbitrary Python unpickling"):
            read_tensors(tmp_path / name)
        assert not marker.exists()
    pickle.loads((tmp_path / "evil.bin").read_bytes())  # the payload is live: plain pickle does run it
    assert marker.exists()


def test_refuses_torchscript(tmp_path):
    torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)).save(str(tmp_path / "ViT-B-32.pt"))
    with pytest.raises(ConversionError, match="TorchScript archive.*torch.jit.load"):
        read_tensors(tmp_path / "ViT-B-32.pt")


def test_the_weights_of_an_open_clip_torchscript_convert_despite_its_causal_mask(small_import):
    """The recipe that the TorchScript refusal gives (`state_dict()` of the loaded program) keeps an open_clip model's
    causal mask buffer, -inf above the diagonal: convert called the weights damaged ("NaN or infinite")."""
    torch_model, imported = small_import
    extracted = {**state_dict(torch_model), "attn_mask": torch_model.attn_mask.numpy()}
    assert np.isinf(extracted["attn_mask"]).any()
    again = wd.load_source_state_dict(extracted, heads_vision=2, heads_text=2, activation="gelu")
    assert again.model == imported.model and trees_equal(again.params, imported.params)


def test_shape_and_key_messages(tmp_path, small_import):
    torch_model, _ = small_import
    sd = state_dict(torch_model)
    bad = {**sd, "transformer.resblocks.1.mlp.c_fc.weight": np.zeros((128, 64), np.float32)}
    with pytest.raises(ConversionError, match=r"key 'transformer.resblocks.1.mlp.c_fc.weight': expected shape "
                                              r"\(256, 64\), found \(128, 64\)"):
        wd.load_source_state_dict(bad, heads_vision=2, heads_text=2)
    missing = {k: v for k, v in sd.items() if k != "visual.ln_post.weight"}
    with pytest.raises(ConversionError, match=r"missing key 'visual.ln_post.weight' \(expected shape \(64,\)\)"):
        wd.load_source_state_dict(missing, heads_vision=2, heads_text=2)
    with pytest.raises(ConversionError, match=r"unexpected key 'visual.extra' \(shape \(3,\)\)"):
        wd.load_source_state_dict({**sd, "visual.extra": np.zeros(3, np.float32)}, heads_vision=2, heads_text=2)
    # HF: the message names the HF key
    small_hf().save_pretrained(tmp_path / "hf")
    weights = read_tensors(tmp_path / "hf" / "model.safetensors")
    weights["text_model.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 32), np.float32)
    write_tensors(tmp_path / "hf" / "model.safetensors", weights, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"key 'text_model.encoder.layers.0.self_attn.q_proj.weight': "
                                              r"expected shape \(64, 64\), found \(64, 32\)"):
        wd.load_source(tmp_path / "hf")


# ---- CLI: convert -> restore as train does -> export ------------------------------------------------------
def test_cli_convert_and_export(tmp_path):
    from clip_jax.config import read_config
    from clip_jax.data.pipeline import train_iterator
    from clip_jax.train.checkpoint import Checkpointer
    from clip_jax.train.loop import abstract_train_state, create_state, load_trained
    from clip_jax.train.state import TrainState

    torch_model = small_open_clip(vocab_size=49408, text_width=32)
    torch.save({"epoch": 2, "state_dict": {"module." + k: v for k, v in torch_model.state_dict().items()}},
               tmp_path / "epoch_2.pt")
    work = tmp_path / "work"
    main(["convert", str(tmp_path / "epoch_2.pt"), "--to-workdir", str(work), "--heads-vision", "2",
          "--heads-text", "2", "--activation", "gelu", "--scan-layers"])
    config = read_config(work / "config.json")
    assert config.data.tokenizer == "openai" and config.model.text.activation == "gelu" and config.model.scan_layers
    assert ClipTokenizer.load(work / "tokenizer.json").name == "openai-bpe-16e6"
    assert tuple(config.model.image_mean) == CLIP_MEAN  # a bare file says none: OpenAI's, unless told
    # class names are prompted as CLIP's, not with the shapes prompts of the defaults' data (a drawing of one {}.)
    from clip_jax.data.classification import name_templates

    assert name_templates(config, reads_data=True) == name_templates(config) == ("a photo of a {}.",)
    main(["convert", str(tmp_path / "epoch_2.pt"), "--to-workdir", str(tmp_path / "half"), "--heads-vision", "2",
          "--heads-text", "2", "--activation", "gelu", "--image-mean", "0.5,0.5,0.5", "--image-std", ".5,.5,.5"])
    half = read_config(tmp_path / "half" / "config.json").model
    assert tuple(half.image_mean) == tuple(half.image_std) == (0.5, 0.5, 0.5)

    # what `train` does on this workdir: restore the full state (optimizer, data iterator) into its shardings
    trained = load_trained(work)
    config, params, tokenizer, step = trained.config, trained.params, trained.tokenizer, trained.step
    init_fn, shardings, _ = create_state(config, trained.method, trained.model, trained.mesh)
    abstract = abstract_train_state(init_fn, shardings)
    checkpointer = Checkpointer(work, config.checkpoint)
    state = checkpointer.restore(abstract, train_iterator(config, tokenizer))
    checkpointer.close()
    assert isinstance(state, TrainState) and int(state.step) == 0 and step == 0
    assert trees_equal(jax.device_get(state.params), jax.device_get(params))

    texts = ["a photo of a cat", "two red squares &amp; a blue circle"]
    ids = tokenizer(texts, 16).astype(np.int64)
    images, _ = inputs(32, 16, 49408)
    assert_parity("CLI convert", open_clip_outputs(torch_model, images, ids), ours(config.model.to_dict(),
                  jax.device_get(params), images, ids))

    main(["export", "--workdir", str(work), "--format", "openai", "--out", str(tmp_path / "out.safetensors")])
    exported = read_tensors(tmp_path / "out.safetensors")
    original = state_dict(torch_model)
    assert exported.keys() == original.keys() and all(np.array_equal(exported[k], original[k]) for k in original)

    main(["export", "--workdir", str(work), "--format", "hf", "--out", str(tmp_path / "hf")])
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")
    plain = ["a photo of a cat", "Two red squares, one blue circle!"]  # HF does not unescape HTML: plain text
    hf_ids = hf_tokenizer(plain, padding="max_length", max_length=16, truncation=True, return_tensors="np")["input_ids"]
    our_ids = tokenizer(plain, 16)
    eot = tokenizer.eot_id
    for mine, theirs in zip(our_ids, hf_ids, strict=True):  # HF pads with EOT, we with 0
        n = int(np.argmax(mine == eot)) + 1
        assert mine[:n].tolist() == theirs[:n].tolist() and (theirs[n:] == eot).all()
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert_parity("CLI export hf", hf_outputs(reloaded, images, hf_ids.astype(np.int64)),
                  ours(config.model.to_dict(), jax.device_get(params), images, hf_ids))
    # CLIPProcessor loads (its image processor's settings exported) and preprocesses as clip_jax does: a 60x45 image
    # (the 45 side to 32, the 60 to int(42.67) = 42, cropped from x 5; an even margin, where transformers' truncated
    # offset and torchvision's rounded one agree), normalised by OpenAI's statistics.
    from PIL import Image

    from clip_jax.data.images import resize_center_crop

    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    theirs = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    mine = (resize_center_crop(image, 32) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    # transformers' resampling rounds a few pixels the other way: at most one grey level apart (on random pixels a
    # crop or size one pixel off would be far apart everywhere)
    np.testing.assert_allclose(theirs, mine, atol=1.01 / 255 / min(CLIP_STD))
    assert np.mean(np.abs(theirs - mine) > 1e-5) < 0.02
    # the exported HF directory's tokenizer files come back as OpenAI's vocabulary
    back = wd.load_source(tmp_path / "hf")
    assert wd.resolve_tokenizer(back).name == "openai-bpe-16e6"


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        main(["convert", str(tmp_path / "junk.safetensors"), "--to-workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert "clip-jax convert: error:" in err and "junk.safetensors" in err
    assert not (tmp_path / "w").exists()


def test_the_weights_file_of_a_folder_is_sent_to_the_folder(tmp_path, small_import):
    """An HF folder's model.safetensors given alone was read as a bare state dict, with width // 64 heads where its
    config.json says others (and OpenAI's image normalisation where its preprocessor_config.json says another):
    another model, silently. The folder converts right, so the file alone is refused naming it."""
    _, imported = small_import
    wd.export_params(imported.params, imported.model, "hf", tmp_path / "hf")
    wd.export_params(imported.params, imported.model, "openai", tmp_path / "oc")
    for weights in (tmp_path / "hf" / "model.safetensors", tmp_path / "oc" / "open_clip_model.safetensors"):
        with pytest.raises(ConversionError, match=f"is the weights file of the folder .* convert the folder "
                                                  f"{weights.parent}, whose config gives"):
            wd.load_source(weights)
        assert wd.load_source(weights.parent).model == imported.model


def test_missing_vocab_message(monkeypatch, small_import):
    _, imported = small_import
    monkeypatch.setattr(ClipTokenizer, "find_openai_vocab", classmethod(lambda cls: None))
    with pytest.raises(ConversionError, match="--vocab PATH to bpe_simple_vocab_16e6.txt.gz"):
        wd.resolve_tokenizer(imported)


def test_pt_needs_matching_suffix(tmp_path, small_import):
    _, imported = small_import
    with pytest.raises(ConversionError, match="--pt writes a torch pickle"):
        wd.export_params(imported.params, imported.model, "openai", tmp_path / "x.safetensors", pt=True)
    assert not pathlib.Path(tmp_path / "x.safetensors").exists()


def test_converted_workdir_fine_tunes_with_its_own_frozen_rules(tmp_path, capsys):
    """A converted workdir is a warm start: `train` takes its parameters and builds the optimizer of the run's
    config, here one that freezes the image tower (LiT-style), which the converted optimizer state did not, and
    with its blocks scanned (stacked), where the conversion unrolled them."""
    from clip_jax.train.loop import load_trained

    torch_model = small_open_clip(vocab_size=49408, text_width=32)
    write_tensors(tmp_path / "model.safetensors", state_dict(torch_model))
    work = tmp_path / "work"
    main(["convert", str(tmp_path / "model.safetensors"), "--to-workdir", str(work), "--heads-vision", "2",
          "--heads-text", "2", "--activation", "gelu"])
    converted = jax.device_get(load_trained(work).params)
    main(["train", "--workdir", str(work), "--config.optimizer.frozen=('^visual/',)", "--config.total_steps=2",
          "--config.model.scan_layers=True",
          "--config.batch_size=16", "--config.optimizer.warmup_steps=1", "--config.log.progress_bar=False",
          "--config.eval.num_examples=16", "--config.eval.batch_size=16", "--config.log.every_steps=1"])
    # No data settings given: the converted config's default, shapes, is trained on, and the user is told.
    assert "holds a converted or stretched model, and its first run trains on the procedural shapes data" in (
        capsys.readouterr().err)
    trained = load_trained(work)
    tuned, step = jax.device_get(trained.params), trained.step
    assert step == 2 and "resblocks_0" in converted["visual"]["transformer"]
    assert trees_equal(tuned["visual"], oa.stack_layers(converted)["visual"])  # (interop's own stacking)
    assert not np.array_equal(tuned["text"]["text_projection"], converted["text"]["text_projection"])


@pytest.mark.parametrize("scanned_source", [False, True])
def test_a_warm_start_reads_blocks_stored_in_the_other_layout_into_its_shardings(tmp_path, scanned_source):
    """model.scan_layers is the layout of the blocks, not what they are: a warm start reads a checkpoint of the
    other layout (`Checkpointer.restore_params`), stacking or unrolling its blocks straight into the run's
    shardings (here split over 4 of the 8 devices)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from clip_jax.config import read_config
    from clip_jax.errors import ConfigError
    from clip_jax.sharding import make_mesh
    from clip_jax.train.checkpoint import Checkpointer
    from clip_jax.train.loop import load_trained

    write_tensors(tmp_path / "model.safetensors", state_dict(small_open_clip(vocab_size=49408, text_width=32)))
    work = tmp_path / "work"
    main(["convert", str(tmp_path / "model.safetensors"), "--to-workdir", str(work), "--heads-vision", "2",
          "--heads-text", "2", "--activation", "gelu", *(["--scan-layers"] if scanned_source else [])])
    stored = jax.device_get(load_trained(work).params)
    wanted = oa.unstack_layers(stored) if scanned_source else oa.stack_layers(stored)
    assert jax.tree.structure(wanted) != jax.tree.structure(stored)
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    # the last axis over fsdp where it divides, as a sharded run's would be
    spec = lambda shape: PartitionSpec(*(None,) * (len(shape) - 1), "fsdp") if shape and shape[-1] % 4 == 0 else (
        PartitionSpec())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
        mesh, spec(a.shape))), wanted)
    reader = Checkpointer(work, read_config(work / "config.json").checkpoint, reader=True)
    restored = reader.restore_params(0, abstract)
    assert trees_equal(jax.device_get(restored), wanted)
    assert jax.tree.leaves(jax.tree.map(lambda r, a: r.sharding == a.sharding, restored, abstract)) == (
        [True] * len(jax.tree.leaves(wanted)))
    if not scanned_source:  # three stacked blocks asked of a checkpoint of two: the missing one is named
        blocks = abstract["visual"]["transformer"]["resblocks"]
        abstract["visual"]["transformer"]["resblocks"] = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((3, *a.shape[1:]), a.dtype, sharding=a.sharding), blocks)
        with pytest.raises(ConfigError, match=r"it lacks \[\"\['visual'\]\['transformer'\]\['resblocks_2'\]"):
            reader.restore_params(0, abstract)
