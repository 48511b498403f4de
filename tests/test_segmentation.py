"""Zero-shot segmentation: the metrics against hand-counted cases, the shapes masks against the rendered pixels, the
dense predict functions of CLIP (the training-free baseline), LSeg and GroupViT against their definitions, and the
`segment` command and the `segmentation_folder` evaluation end to end on files the tests write; and, sharing that
module's small CLIP (a training costs seconds), the detectors' end to end: ViLD trained on a COCO folder with novel
categories left out, the `coco_detection` evaluation and the `detect` command (their parts: tests/test_detection.py,
test_boxes.py, test_coco.py)."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

import clip_jax as clip_jax_api
from clip_jax.cli import main
from clip_jax.config import load_config
from clip_jax.data.segmentation import SegmentationFolder, write_shapes_segmentation_set
from clip_jax.data.shapes import (
    BACKGROUND_RGB,
    DEFAULT_HELD_OUT,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    class_index,
    scene_masks,
)
from clip_jax.errors import ConfigError
from clip_jax.evaluate.encoder import Encoder
from clip_jax.evaluate.segmentation import (
    THRESHOLDS,
    choose_threshold,
    class_iou,
    confusion_matrix,
    mean_iou,
    predict_labels,
)
from clip_jax.methods import get_method
from clip_jax.methods.groupvit import GroupViTCLIP, GroupViTConfig, ObjectPhrases
from clip_jax.methods.lseg import LSegCLIP, PixelLabels
from clip_jax.models.clip import CLIP, CLIPConfig, l2_normalize, normalize_images
from clip_jax.models.layers import layer_norm
from clip_jax.sharding import make_mesh

from .conftest import clip_jax
from .test_methods import compiled, tiny_config


# --- metrics ---------------------------------------------------------------------------------------------------------
def test_confusion_matrix_and_iou_match_a_hand_count():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    # Counted by hand, the 255 pixel left out: row = truth, column = prediction.
    want = np.array([[1, 1, 0],   # truth 0: one right, one called 1
                     [0, 2, 1],   # truth 1: two right, one called 2
                     [1, 0, 1]])  # truth 2: one right, one called 0
    confusion = confusion_matrix(target, pred, 3)
    np.testing.assert_array_equal(confusion, want)
    # IoU = TP / (TP + FP + FN): class 0: 1 / (1 + 1 + 1); class 1: 2 / (2 + 1 + 1); class 2: 1 / (1 + 1 + 1).
    np.testing.assert_allclose(class_iou(confusion), [1 / 3, 2 / 4, 1 / 3])
    assert mean_iou(confusion) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert mean_iou(confusion, [1]) == pytest.approx(0.5)


def test_a_class_absent_from_truth_and_prediction_has_no_iou_and_does_not_count():
    confusion = confusion_matrix(np.array([0, 0, 2]), np.array([0, 0, 2]), 4)
    iou = class_iou(confusion)
    assert iou[0] == iou[2] == 1.0 and np.isnan(iou[1]) and np.isnan(iou[3])
    assert mean_iou(confusion) == 1.0
    assert np.isnan(mean_iou(confusion, [1, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        confusion_matrix(np.array([5]), np.array([0]), 4)


def test_the_threshold_turns_unsure_pixels_into_background_and_is_chosen_on_given_data():
    label = np.array([[0, 1, 1, 0]])  # class indices without the background: map values 1, 2
    probability = np.array([[0.9, 0.3, 0.8, 0.45]])
    np.testing.assert_array_equal(predict_labels(label, probability, 0.5), [[1, 0, 2, 0]])
    np.testing.assert_array_equal(predict_labels(label, probability, None), label)  # the background is label 0
    # The truth: pixels 1 and 3 are background; any threshold in (0.45, 0.8] is perfect, the first such candidate
    # is chosen.
    target = np.array([[1, 0, 2, 0]])
    chosen = choose_threshold(label, probability, target, 3)
    assert chosen == min(t for t in THRESHOLDS if 0.45 < t <= 0.8)


# --- shapes masks ----------------------------------------------------------------------------------------------------
def test_scene_masks_are_exactly_the_painted_pixels():
    """Every pixel whose colour is not the background's belongs to an object of the class map, and no other; each
    instance is one object's pixels, labelled with its pair."""
    source = ShapesDataset(ShapesConfig(image_size=96, min_objects=3, max_objects=9), "train")
    for i in range(20):
        scene, image = source.scene(i), source[i]["image"]
        classes, instances = source.masks(i)
        painted = (image != np.array(BACKGROUND_RGB[scene.background])).any(axis=-1)
        np.testing.assert_array_equal(classes > 0, painted)
        np.testing.assert_array_equal(instances > 0, painted)
        for k, obj in enumerate(scene.objects, start=1):
            assert (instances == k).any()
            assert set(np.unique(classes[instances == k])) == {1 + class_index(obj.colour, obj.shape)}


def test_test_novel_puts_a_held_out_pair_in_every_scene_as_any_object_and_train_never():
    config = ShapesConfig(image_size=64, min_objects=3, max_objects=6)
    held = {class_index(c, s) for c, s in DEFAULT_HELD_OUT}
    novel = ShapesDataset(config, "test_novel")
    salient_novel = 0
    for i in range(200):
        pairs = [class_index(o.colour, o.shape) for o in novel.scene(i).objects]
        assert held & set(pairs)
        salient_novel += pairs[0] in held
    assert 0.15 < salient_novel / 200 < 0.6  # as the salient object sometimes, as a small one mostly
    train = ShapesDataset(config, "train")
    assert not any(held & {class_index(o.colour, o.shape) for o in train.scene(i).objects} for i in range(200))


# --- dense predict functions -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    cfg = CLIPConfig.from_dict(tiny_config("clip").model.to_dict())
    model = CLIP(cfg)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    # Compiled here and in the tests below: one program each instead of the op-by-op dispatch of every primitive.
    params = jax.jit(model.init)(jax.random.PRNGKey(1), images, np.zeros((2, 24), np.int32))["params"]
    return model, nn.meta.unbox(params), images


def test_the_training_free_dense_scores_are_patch_tokens_through_the_class_tokens_head(tiny_clip):
    model, params, images = tiny_clip
    labels = l2_normalize(jax.random.normal(jax.random.PRNGKey(2), (5, model.config.embed_dim)))
    got = compiled(model, CLIP.dense_logits)({"params": params}, images, labels)
    tokens = compiled(model, CLIP.image_features)({"params": params}, images).tokens[:, 1:]
    v = params["visual"]
    features = l2_normalize(layer_norm(tokens, v["ln_post"]) @ v["proj"])
    want = np.exp(params["logit_scale"]) * features @ labels.T
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 2, 2, 5)  # 32 px / 16 px patches


def test_encoder_segment_upsamples_the_scores_and_takes_the_most_probable_label(tiny_clip):
    model, params, images = tiny_clip
    labels = np.asarray(l2_normalize(jax.random.normal(jax.random.PRNGKey(3), (4, model.config.embed_dim))))
    encoder = Encoder(model, params, make_mesh({"data": 2}, jax.devices()[:2]), 4)
    label, probability = encoder.segment(images[:1], labels)  # a partial batch: padded, then dropped
    logits = compiled(model, CLIP.dense_logits)({"params": params}, images[:1], labels)
    probs = jax.nn.softmax(jax.image.resize(logits, (1, 32, 32, 4), "bilinear"), axis=-1)
    np.testing.assert_array_equal(label, np.argmax(probs, -1))
    np.testing.assert_allclose(probability, np.max(probs, -1), rtol=1e-5)


def test_lseg_scores_are_its_decoders_pixels_against_the_labels_at_the_fixed_temperature():
    cfg = CLIPConfig.from_dict(tiny_config("clip").model.to_dict())
    model = LSegCLIP(cfg, decoder_width=8)
    images = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, np.zeros((2, 24), np.int32))["params"])
    labels = l2_normalize(jax.random.normal(jax.random.PRNGKey(4), (3, cfg.embed_dim)))
    # the scores and the decoder's pixels, compiled as one program
    both = lambda m, x, labels: (m.dense_logits(x, labels),
                                 l2_normalize(m.decoder(m.visual.token_grid(normalize_images(x)))))
    got, pixels = compiled(model, both)({"params": params}, images, labels)
    assert got.shape == (2, 16, 16, 3)  # half the image size
    np.testing.assert_allclose(got, (1 / 0.07) * pixels @ labels.T, rtol=1e-5, atol=1e-5)
    assert "lseg_logit_scale" not in params  # fixed, as the reference's (a plain tensor, never trained)


def test_lseg_labels_the_seen_pairs_and_ignores_the_held_out_ones():
    config = tiny_config("lseg")
    method = get_method(config)
    names = method.label_names()
    assert names[0] == "background" and len(names) == 41 and "red star" not in names
    hook = PixelLabels(64, method.lookup())
    scene = Scene("grey", (ShapeObject("red", "star", "large", 0), ShapeObject("blue", "circle", "medium", 8)))
    seg = hook({"scene": scene}, np.random.default_rng(0))["seg"]
    classes, _ = scene_masks(scene, 64)
    assert set(np.unique(seg[classes == 0])) == {0}
    assert set(np.unique(seg[classes == 1 + class_index("red", "star")])) == {255}  # held out: no training label
    assert set(np.unique(seg[classes == 1 + class_index("blue", "circle")])) == {names.index("blue circle")}


@pytest.mark.parametrize("change, words", [
    ({"data.source": "captions"}, "method lseg trains on masks: data.source 'shapes' or 'segmentation_folder'"),
    ({"data.augment": True}, "needs data.augment False"),
    ({"optimizer.frozen": ()}, "add '^text/' to optimizer.frozen"),
])
def test_lseg_refuses_a_config_it_cannot_train_in_one_line(change, words):
    config = tiny_config("lseg")
    for key, value in change.items():
        group, field = key.split(".")
        config[group][field] = value
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("^", r"\^")):
        get_method(config)


def test_groupvit_pixels_take_their_segments_class_probabilities_among_the_images_top_k():
    cfg = CLIPConfig.from_dict(tiny_config("clip").model.to_dict())
    hparams = GroupViTConfig(stage_depths=(1, 0), num_group_tokens=(4, 0), num_output_groups=(3,), top_k_classes=2)
    model = GroupViTCLIP(cfg, hparams)
    images = np.random.default_rng(5).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, np.zeros((2, 24), np.int32))["params"])
    labels = l2_normalize(jax.random.normal(jax.random.PRNGKey(6), (5, cfg.embed_dim)))
    probs = np.exp(np.asarray(compiled(model, GroupViTCLIP.dense_logits)({"params": params}, images, labels)))
    assert probs.shape == (2, 32, 32, 5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    image, segments, _ = compiled(model, GroupViTCLIP.segments)({"params": params}, images)
    for b in range(2):
        top = set(np.argsort(-np.asarray(image[b] @ labels.T))[:2].tolist())
        assert set(np.flatnonzero(probs[b].reshape(-1, 5).max(0) > 1e-20)) <= top  # the others: log(1e-30)
        # every pixel's distribution is one of its segments'
        scale = np.exp(params["logit_scale"])
        logits = np.where(np.isin(np.arange(5), list(top)), scale * np.asarray(segments[b] @ labels.T), -np.inf)
        segment_probs = np.asarray(jax.nn.softmax(logits, axis=-1))
        distance = np.abs(probs[b].reshape(-1, 1, 5) - segment_probs[None]).max(-1).min(-1)
        assert distance.max() < 1e-5


def test_groupvit_phrases_name_the_scenes_objects_and_pad_with_the_caption():
    scene = Scene("grey", (ShapeObject("red", "star", "large", 4), ShapeObject("blue", "circle", "small", 0)))
    phrases = ObjectPhrases(3, ("a {}.", "the {}!"))({"scene": scene, "long_caption": "two shapes."})
    assert phrases == {"prompt_0": "a red star.", "prompt_1": "a blue circle.", "prompt_2": "two shapes."}


def test_groupvit_refuses_stages_that_do_not_fit_the_tower_in_one_line():
    config = tiny_config("groupvit")
    config.method.stage_depths = (2, 1)
    with pytest.raises(ConfigError, match=r"method groupvit: stage_depths \(2, 1\) must be >= 0 and sum to"):
        get_method(config)


# --- end to end: a CLIP, LSeg and GroupViT from it, the segment command, the folder evaluation ---------------------
def succeeds(*args) -> subprocess.CompletedProcess:
    """`clip-jax ARGS`, in this process, which must succeed: what it printed."""
    result = clip_jax(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def tiny_overrides(steps: int) -> list[str]:
    return ["--config.model.vision.width=32", "--config.model.vision.layers=2", "--config.model.vision.heads=2",
            "--config.model.vision.head_dim=16", "--config.model.vision.mlp_dim=64",
            "--config.model.vision.image_size=32", "--config.model.text.width=32", "--config.model.text.layers=1",
            "--config.model.text.heads=2", "--config.model.text.head_dim=16", "--config.model.text.mlp_dim=64",
            "--config.model.embed_dim=16", "--config.data.tokenizer_vocab_size=600", f"--config.total_steps={steps}",
            "--config.batch_size=8", "--config.eval.num_examples=8", "--config.eval.batch_size=8",
            f"--config.checkpoint.every_steps={steps}", "--config.log.every_steps=1", "--config.data.workers=0"]


@pytest.fixture(scope="module")
def clip_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clip")
    succeeds("train", "--config", "configs/demo.py", "--workdir", workdir, *tiny_overrides(2))
    return workdir


LSEG_TEMPLATES = ("a photo of a {}.",)  # not the default (the shapes prompts): `segment` must use the run's own


@pytest.fixture(scope="module")
def lseg_workdir(clip_workdir, tmp_path_factory):
    lseg = tmp_path_factory.mktemp("lseg") / "run"
    succeeds("train", "--config", "configs/lseg_shapes.py", "--workdir", lseg, *tiny_overrides(2),
             f"--config.init_from={clip_workdir}", "--config.method.decoder_width=8",
             f"--config.method.templates={LSEG_TEMPLATES!r}")
    return lseg


def test_lseg_and_groupvit_start_from_a_clip_and_segment_through_the_command(clip_workdir, lseg_workdir, tmp_path):
    from clip_jax.train.loop import load_trained

    lseg = lseg_workdir
    results = json.loads((lseg / "results.json").read_text())
    assert 0 <= results["seg_novel_miou"] <= 1 and 0 <= results["seg_seen_miou"] <= 1
    clip = load_trained(clip_workdir).params
    # LSeg: the text tower is the CLIP's, untouched (frozen); the decoder is new.
    lseg_params = load_trained(lseg).params
    for a, b in zip(jax.tree.leaves(clip["text"]), jax.tree.leaves(lseg_params["text"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # GroupViT's warm start (what `train` does with init_from; its training runs in tests/test_methods.py): stage 1's
    # first block is the CLIP's first block, the text tower the CLIP's.
    config = load_config("configs/groupvit_shapes.py", [*tiny_overrides(2), f"--config.init_from={clip_workdir}",
                                                        "--config.method.stage_depths=(1, 1, 0)",
                                                        "--config.method.num_group_tokens=(4, 2, 0)",
                                                        "--config.method.num_output_groups=(4, 2)"])
    method = get_method(config)
    initial = nn.meta.unbox(jax.jit(method.model().init)(jax.random.PRNGKey(0), *method.init_inputs())["params"])
    started = method.warm_start({k: clip[k] for k in ("text", "logit_scale", "visual")}, initial)
    block = ("transformer", "resblocks_0", "mlp", "c_fc", "kernel")
    want, got = clip["visual"], started["visual"]
    for key in block:
        want, got = want[key], got[key]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(started["text"]["ln_final"]["scale"]),
                                  np.asarray(clip["text"]["ln_final"]["scale"]))

    images = tmp_path / "images"
    images.mkdir()
    source = ShapesDataset(ShapesConfig(image_size=32, min_objects=3, max_objects=6), "test_novel")
    for i in range(3):
        Image.fromarray(source[i]["image"]).save(images / f"scene{i}.png")
    (images / "broken.png").write_text("not an image")
    out = tmp_path / "masks"
    result = succeeds("segment", "--workdir", lseg, "--images", images, "--labels", "red star, blue circle",
                      "--out", out)
    assert "segmented 3 images into 2 labels" in result.stdout and "1 undecodable" in result.stdout
    assert (out / "labels.txt").read_text().splitlines() == ["background", "red star", "blue circle"]
    mask = Image.open(out / "masks" / "scene0.png")
    assert mask.mode == "P" and mask.size == (32, 32) and set(np.unique(np.asarray(mask))) <= {0, 1, 2}
    # From Python: the command's masks
    model = clip_jax_api.load(lseg)
    names, masks = model.segment([images / f"scene{i}.png" for i in range(3)], ["red star", "blue circle"])
    assert names == ["background", "red star", "blue circle"] and masks.dtype == np.uint8
    for i in range(3):
        np.testing.assert_array_equal(masks[i], np.asarray(Image.open(out / "masks" / f"scene{i}.png")))
    # its mistakes named as its arguments, not the command's flags
    with pytest.raises(ConfigError, match=r"^labels= 'red star' alone: this run finds the background by a threshold"):
        model.segment([images / "scene0.png"], ["red star"], background="threshold")
    with pytest.raises(ConfigError, match=r"^threshold= must be in \(0, 1\), got 1.5"):
        model.segment([images / "scene0.png"], ["red star", "blue circle"], background="threshold", threshold=1.5)
    assert Image.open(out / "overlays" / "scene0.png").size == (32, 32)
    # Read and segmented two images at a time (any folder fits in memory): the same files.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("clip_jax.data.images.image_chunk_size", lambda batch_size: 2)
        main(["segment", "--workdir", str(lseg), "--images", str(images), "--labels", "red star, blue circle",
              "--out", str(tmp_path / "chunked"), "--batch-size", "1"])
    assert folder_bytes(tmp_path / "chunked") == folder_bytes(out)
    # A run stopped midway (here its second chunk fails) leaves nothing behind: the rerun is not refused.
    from clip_jax.evaluate.encoder import Encoder as RealEncoder

    calls = []

    def segment_once(self, *args):
        calls.append(1)
        if len(calls) > 1:
            raise FloatingPointError("the model gives NaN/inf image embeddings")
        return RealEncoder.segment(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("clip_jax.data.images.image_chunk_size", lambda batch_size: 2)
        patch.setattr(RealEncoder, "segment", segment_once)
        with pytest.raises(SystemExit):
            main(["segment", "--workdir", str(lseg), "--images", str(images), "--labels", "red star, blue circle",
                  "--out", str(tmp_path / "stopped")])
    assert len(calls) == 2 and not (tmp_path / "stopped").exists()

    # export: LSeg's towers with a note on its decoder; a GroupViT tower has no PyTorch layout, refused in one line
    result = succeeds("export", "--workdir", lseg, "--format", "openai", "--out", tmp_path / "lseg.safetensors")
    assert (tmp_path / "lseg.safetensors").exists() and "LSeg's decoder" in result.stderr
    # A GroupViT run is refused from its config.json alone, before any checkpoint is read.
    groupvit = tmp_path / "groupvit"
    groupvit.mkdir()
    (groupvit / "config.json").write_text(config.to_json())
    refused = clip_jax("export", "--workdir", groupvit, "--format", "openai", "--out", tmp_path / "g.safetensors")
    assert refused.returncode == 2 and not (tmp_path / "g.safetensors").exists()
    assert refused.stderr.strip().splitlines()[-1].startswith("clip-jax export: error: ")
    assert "is a groupvit run: its image tower has no OpenAI or Hugging Face layout" in refused.stderr
    assert "--format hf-text" in refused.stderr
    # Its text tower alone exports: transformers' CLIPTextModelWithProjection gives the run's text embeddings.
    import types

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch
    import transformers

    from clip_jax.interop.workdir import write_workdir

    tokenizer = load_trained(clip_workdir).tokenizer
    write_workdir(config, started, tokenizer, tmp_path / "groupvit_run", method)
    result = succeeds("export", "--workdir", tmp_path / "groupvit_run", "--format", "hf-text", "--out",
                      tmp_path / "groupvit_text")
    assert "GroupViT's image tower has no OpenAI or Hugging Face layout" in result.stderr
    tokens = tokenizer(["a red star.", "a blue circle on a green square."], config.model.text.context_length)
    ours = compiled(method.model(), type(method.model()).encode_text)({"params": started}, tokens)
    hf = transformers.CLIPTextModelWithProjection.from_pretrained(tmp_path / "groupvit_text").eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(np.asarray(tokens, np.int64))).text_embeds.numpy()
    np.testing.assert_allclose(theirs / np.linalg.norm(theirs, axis=-1, keepdims=True), ours, atol=3e-6)


def test_lseg_trains_on_a_voc_folder_leaving_its_unseen_classes_out(clip_workdir, tmp_path):
    """A folder written from shapes' train scenes; two of its classes unseen: their pixels are ignored in training
    (label 255 in the batch) and they are not in the training label set."""
    root = write_shapes_segmentation_set(tmp_path / "voc", 16, split="train", image_size=32)
    unseen = ("red circle", "blue square")
    workdir = tmp_path / "lseg"
    overrides = [*tiny_overrides(2), f"--config.init_from={clip_workdir}", "--config.method.decoder_width=8",
                 "--config.data.source=segmentation_folder", f"--config.data.path={root}",
                 f"--config.method.unseen={unseen}", "--config.evals.seg=None"]
    config = load_config("configs/lseg_shapes.py", overrides)
    method = get_method(config)
    assert not set(unseen) & set(method.label_names()) and len(method.label_names()) == 49 - 2
    batch = next(method.train_data(config, None, list(range(8))))
    source = SegmentationFolder(root, "train", 32)
    masks = np.stack([source[i]["seg"] for i in range(len(source))])
    lookup = np.asarray(method.lookup())
    # every batch row is one of the folder's masks through the lookup, the unseen classes' pixels ignored
    for seg in batch["seg"]:
        assert any(np.array_equal(seg, lookup[m]) for m in masks)
    names = source.class_names()
    unseen_pixels = np.isin(masks, [names.index(c) for c in unseen])
    assert unseen_pixels.any() and (lookup[masks][unseen_pixels] == 255).all()
    succeeds("train", "--config", "configs/lseg_shapes.py", "--workdir", workdir, *overrides)
    with pytest.raises(ConfigError, match=r"method.unseen names \['pink circle'\]"):
        bad = load_config("configs/lseg_shapes.py", [*overrides[:-2], "--config.method.unseen=('pink circle',)"])
        get_method(bad).check(None)


def test_the_folder_evaluation_scores_a_voc_layout_written_from_shapes(clip_workdir, tmp_path):
    root = write_shapes_segmentation_set(tmp_path / "voc", 6, image_size=32)
    novel = ",".join(f"'{c} {s}'" for c, s in DEFAULT_HELD_OUT)
    overlays = tmp_path / "overlays"
    succeeds("eval", "--workdir", clip_workdir, f"--config.evals.voc={{'type': 'segmentation_folder', "
             f"'path': '{root}', 'split': 'test_novel', 'novel': ({novel},), 'background': 'threshold', "
             f"'overlay_dir': '{overlays}', 'overlays': 2}}")
    text = next(clip_workdir.glob("eval_*.json")).read_text()
    results = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the results: not strict JSON"))
    assert {"voc_miou", "voc_seen_miou", "voc_novel_miou", "voc_iou/background"} <= set(results)
    ious = [results[k] for k in results if k.startswith("voc_")]
    # 6 images leave most of the 49 classes out: their IoU has no value, written as null
    assert None in ious and all(0 <= v <= 1 for v in ious if v is not None)
    assert len(list(overlays.glob("*.png"))) == 2


def test_segment_refuses_bad_labels_before_loading_a_model(tmp_path):
    result = clip_jax("segment", "--workdir", tmp_path, "--images", tmp_path, "--labels", "cat,cat", "--out",
                      tmp_path / "o")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("clip-jax segment: error: --labels needs distinct")

def test_segment_prompts_the_labels_as_the_run_did_unless_told_and_names_every_output_apart(lseg_workdir, tmp_path,
                                                                                              monkeypatch, capsys):
    """segment always used the shapes prompts: a run trained and evaluated with others (configs/lseg_voc.py's "a
    photo of a {}.") got masks other than its evaluation's. And a-1.png's mask was overwritten by a.jpg's, both
    named a-1.png."""
    from clip_jax import cli
    from clip_jax.evaluate import segmentation

    used, real = [], segmentation.label_embeddings

    def spy(texts, names, background, templates):
        used.append(tuple(templates))
        return real(texts, names, background, templates)

    monkeypatch.setattr(segmentation, "label_embeddings", spy)
    images = tmp_path / "coll"
    images.mkdir()
    source = ShapesDataset(ShapesConfig(image_size=32, min_objects=3, max_objects=6), "test_novel")
    for i, name in enumerate(("a-1.png", "a.jpg", "a.png")):
        Image.fromarray(source[i]["image"]).save(images / name)
    base = ["segment", "--workdir", str(lseg_workdir), "--images", str(images), "--labels", "red star,blue circle"]
    cli.main([*base, "--out", str(tmp_path / "run")])
    cli.main([*base, "--out", str(tmp_path / "given"), "--templates", "{}", "a {} shape"])
    assert used == [LSEG_TEMPLATES, ("{}", "a {} shape")]
    printed = capsys.readouterr().out
    assert "with the run's method.templates (1)" in printed and "with --templates (2)" in printed, printed
    # The folder evaluation without templates of its own prompts as the run did too (it said "a photo of a {}.": an
    # LSeg run of the shapes prompts scored 0.51 mIoU there where segment's masks of the same images gave 0.82).
    root = write_shapes_segmentation_set(tmp_path / "voc", 2, image_size=32)
    used.clear()
    cli.main(["eval", "--workdir", str(lseg_workdir), "--config.evals={'voc': {'type': 'segmentation_folder', "
              f"'path': '{root}', 'split': 'test_novel'}}}}"])
    assert used == [LSEG_TEMPLATES]
    out = tmp_path / "run"
    pairs = [line.split("\t") for line in (out / "images.txt").read_text().splitlines()]
    assert [(name, pathlib.Path(f).name) for name, f in pairs] == [
        ("a-1.png", "a-1.png"), ("a.jpg.png", "a.jpg"), ("a.png.png", "a.png")]
    for name, _ in pairs:
        assert (out / "masks" / name).is_file() and (out / "overlays" / name).is_file()


def test_segment_refuses_labels_that_are_one_text_to_the_model(clip_workdir, tmp_path, capsys):
    """The tokenizer lower-cases and the text tower reads its context: "Red square,red square", or two labels that
    differ only past the context, got one embedding, and the second label was never chosen."""
    from tests.test_end_to_end import exit_message

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(ShapesDataset(ShapesConfig(image_size=32), "test_novel")[0]["image"]).save(images / "s.png")
    long = "red square " * 30
    # (the reason given is the one that holds: the cleaning, or the cut)
    cleaning = "(its tokenizer lower-cases and undoes HTML entities, character widths and ligatures)"
    cut = "(its text tower reads 22 tokens, and they differ only after them)"
    for labels, first, second, why in (("Red square,red square,blue star", "'Red square'", "'red square'", cleaning),
                                       (f"{long}a,{long}b", repr(long[:60]), repr(long[:60]), cut)):
        message = exit_message(["segment", "--workdir", str(clip_workdir), "--images", str(images), "--labels",
                                labels, "--out", str(tmp_path / "o")], capsys)
        assert message.startswith(f"clip-jax segment: error: --labels: {first}") and f" and {second}" in message
        assert f"are one text to this model {why}: they would get one embedding" in message, message
        assert len(message) < 400, message  # the labels cut short
    # One label, the background by threshold: a softmax over one label is 1 everywhere, every pixel was that label
    message = exit_message(["segment", "--workdir", str(clip_workdir), "--images", str(images), "--labels",
                            "red square", "--out", str(tmp_path / "o")], capsys)
    assert "--labels 'red square' alone: this run finds the background by a threshold on the softmax" in message
    # The background's own name in another case: it said "'background' and 'Background' are one text"
    message = exit_message(["segment", "--workdir", str(clip_workdir), "--images", str(images), "--labels",
                            "Background,red square", "--out", str(tmp_path / "o")], capsys)
    assert message.endswith("--labels: 'Background' is the background, label 0, which segment adds itself: leave it "
                            "out"), message
    assert not (tmp_path / "o").exists()
    # A CLIP run segments with its patch features, which is said; ". " between names is one label here
    main(["segment", "--workdir", str(clip_workdir), "--images", str(images), "--labels", "red square. blue star,x",
          "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "is a clip run, not a segmenter: segment uses its CLIP's patch features" in err, err
    assert "note: --labels separates names with commas: 'red square. blue star', 'x' are the labels" in err, err


def test_a_resnets_dense_features_are_its_attention_pool_at_each_position():
    """MaskCLIP's reading of a ResNet: each position through the pool's value and output projections. With one grid
    position and the mean token's position embedding equal to the position's, the pool attends over two identical
    keys and values: its output is then exactly that position's dense feature."""
    from clip_jax.models.resnet import ResNetConfig
    from clip_jax.models.towers import TextConfig

    cfg = CLIPConfig(vision=ResNetConfig(layers=(1, 1, 1, 1), width=8, heads=2, image_size=32),
                     text=TextConfig(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64, context_length=8,
                                     vocab_size=100), embed_dim=16)
    model = CLIP(cfg)
    images = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), images, np.zeros((2, 8), np.int32))["params"])
    table = params["visual"]["attnpool"]["positional_embedding"]
    params["visual"]["attnpool"]["positional_embedding"] = table.at[0].set(table[1])
    dense = compiled(model, lambda m, x: m.visual.dense_features(x))({"params": params}, normalize_images(images))
    assert dense.shape == (2, 1, 1, 16)
    pooled = compiled(model, CLIP.image_features)({"params": params}, images).pooled
    np.testing.assert_allclose(np.asarray(dense)[:, 0, 0], pooled, rtol=1e-4, atol=1e-5)


def test_vild_trains_on_a_coco_folder_without_its_novel_boxes_and_detects_through_the_command(clip_workdir, tmp_path,
                                                                                          caplog):
    from clip_jax.data.coco import write_detection_folder
    from clip_jax.data.shapes import scene_boxes

    # shapes scenes at 40 px written as a COCO folder: the model (32 px) reads them resized
    source = ShapesDataset(ShapesConfig(image_size=40, min_objects=3, max_objects=6), "train")
    images = [source[i]["image"] for i in range(12)]
    boxes, classes = zip(*(scene_boxes(source.scene(i), 40) for i in range(12)), strict=True)
    names = source.class_names()
    annotations = write_detection_folder(tmp_path / "coco", "train", images, list(boxes), list(classes), names)
    image_root = tmp_path / "coco" / "images" / "train"
    present = sorted({names[c] for cs in classes for c in cs})
    novel = tuple(present[:2])
    coco_eval = {"type": "coco_detection", "annotations": str(annotations), "image_root": str(image_root),
                 "novel": novel, "results_file": str(tmp_path / "results.json")}
    overrides = [*tiny_overrides(2), f"--config.init_from={clip_workdir}", f"--config.method.annotations={annotations}",
                 f"--config.method.image_root={image_root}", f"--config.method.novel={novel}",
                 "--config.method.train_examples=12", "--config.method.regions=4", "--config.method.region_width=16",
                 "--config.method.box_width=16", "--config.evals.det=None", f"--config.evals.coco={coco_eval!r}"]
    method = get_method(load_config("configs/vild_shapes.py", overrides))
    train = method.train_set()
    novel_index = [names.index(n) for n in novel]
    assert sum(len(c) for c in train.classes) > 0 and not np.isin(np.concatenate(train.classes), novel_index).any()
    workdir = tmp_path / "vild"
    succeeds("train", "--config", "configs/vild_shapes.py", "--workdir", workdir, *overrides)
    results = json.loads((workdir / "results.json").read_text())
    assert all(0 <= results[f"coco{s}_ap50"] <= 1 for s in ("", "_base", "_novel"))
    written = json.loads((tmp_path / "results.json").read_text())
    assert written and all(0 <= r["bbox"][0] and r["bbox"][0] + r["bbox"][2] <= 40 + 1e-3 for r in written)
    assert {r["category_id"] for r in written} <= set(range(1, len(names) + 1))

    scenes = tmp_path / "images"
    scenes.mkdir()
    for i in range(2):
        Image.fromarray(images[i]).save(scenes / f"scene{i}.png")
    (scenes / "broken.png").write_text("not an image")
    out = tmp_path / "boxes"
    result = succeeds("detect", "--workdir", workdir, "--images", scenes, "--queries", "red star. blue circle",
                      "--out", out, "--min-score", "0")
    assert "in 2 images" in result.stdout and "1 undecodable" in result.stdout
    report = json.loads((out / "detections.json").read_text())
    assert [pathlib.Path(r["image"]).name for r in report] == ["scene0.png", "scene1.png"]
    for entry in report:
        assert entry["detections"] and all(d["label"] in ("red star", "blue circle") for d in entry["detections"])
        for d in entry["detections"]:
            x0, y0, x1, y1 = d["box_xyxy"]
            assert -0.1 <= x0 <= x1 <= 40.1 and -0.1 <= y0 <= y1 <= 40.1
    assert Image.open(out / "boxes" / "scene0.png").size == (40, 40)
    # A wide image: the whole of it is searched (letterboxed, as ViLD and GLIP do), not its centre square alone
    wide = tmp_path / "wide"
    wide.mkdir()
    Image.fromarray(np.concatenate([images[0], images[1], images[2]], axis=1)).save(wide / "wide.png")  # 120 x 40
    main(["detect", "--workdir", str(workdir), "--images", str(wide), "--queries", "red star. blue circle", "--out",
          str(tmp_path / "wide_boxes"), "--min-score", "0", "--max-detections", "100"])
    (entry,) = json.loads((tmp_path / "wide_boxes" / "detections.json").read_text())
    xs = [x for d in entry["detections"] for x in d["box_xyxy"][::2]]
    assert (entry["width"], entry["height"]) == (120, 40) and min(xs) < 40 and max(xs) > 80, xs  # (centre: 40-80)
    assert all(0 <= v <= 120 for v in xs) and all(0 <= d["box_xyxy"][3] <= 40 for d in entry["detections"])
    # none in the padding below the image (they came back as boxes of no height on its lower edge)
    assert all(x1 > x0 and y1 > y0 for x0, y0, x1, y1 in (d["box_xyxy"] for d in entry["detections"]))
    # From Python: the command's boxes, whatever the kind of image given
    model = clip_jax_api.load(workdir)
    wide_image = Image.open(wide / "wide.png")
    found = model.detect([wide / "wide.png", wide_image, np.asarray(wide_image)], ["red star", "blue circle"],
                         min_score=0, max_detections=100)
    assert found == [entry["detections"]] * 3
    with pytest.raises(ConfigError, match="is a clip run, not a detector"):
        clip_jax_api.load(clip_workdir).detect([wide / "wide.png"], ["red star"])
    with caplog.at_level("WARNING"):  # a query longer than the context was cut in its prompts without a word
        model.detect([wide / "wide.png"], ["red star", " ".join(["blue circle"] * 40)], min_score=0)
    assert "queries=: 1 of the 2 are longer in their prompts than the" in caplog.text and "'blue circle blue" in \
        caplog.text
    with pytest.MonkeyPatch.context() as patch:  # two images at a time: the same files
        patch.setattr("clip_jax.data.images.image_chunk_size", lambda batch_size: 2)
        main(["detect", "--workdir", str(workdir), "--images", str(scenes), "--queries", "red star. blue circle",
              "--out", str(tmp_path / "chunked"), "--min-score", "0", "--batch-size", "1"])
    assert folder_bytes(tmp_path / "chunked") == folder_bytes(out)
    refused = clip_jax("detect", "--workdir", workdir, "--images", scenes, "--queries", " . ", "--out", out)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("clip-jax detect: error: ")
    # one text to the model (the tokenizer lower-cases): every box was drawn twice, once per spelling
    refused = clip_jax("detect", "--workdir", workdir, "--images", scenes, "--queries", "Red square. red square",
                       "--out", tmp_path / "twice")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        "clip-jax detect: error: --queries: 'Red square' and 'red square' are one text to this model"), refused.stderr
    assert not (tmp_path / "twice").exists()


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_overlays_never_write_over_a_file_that_no_overlay_wrote(tmp_path):
    """An overlay_dir pointed at a VOC folder's SegmentationClass/ replaced its masks named as the overlays are
    (val_000.png) with overlays, silently: the next evaluation failed on them. Earlier overlays are written over."""
    from clip_jax.evaluate.segmentation import check_overlay_dir, write_overlays

    folder, classes = tmp_path / "o", np.ones((2, 8, 8), np.int64)
    write_overlays(folder, np.zeros((2, 8, 8, 3), np.uint8), classes, classes, "val")
    check_overlay_dir("val", str(folder))  # an earlier evaluation's overlays: to be written over
    mask = folder / "val_001.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(mask)  # a mask of the user's under an overlay's name
    before = mask.read_bytes()
    with pytest.raises(ConfigError, match=r"evals.val.overlay_dir: .*o holds val_001.png, which no overlay wrote, "
                                          r"under the names this entry's overlays take \(val_\*.png\)"):
        check_overlay_dir("val", str(folder))
    assert mask.read_bytes() == before
    check_overlay_dir("test", str(folder))  # another entry's overlays take other names


def test_an_overlay_dir_where_a_run_keeps_its_files_is_refused_when_the_config_is_checked(tmp_path):
    """Overlays written into a workdir's own places would mix with the run's files (a prefix could name one of
    them); a folder of their own inside the run (W/overlays) is fine."""
    from clip_jax.config import check_input_paths
    from clip_jax.evaluate.segmentation import check_overlay_dir

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {}}))
    for entry in ({"type": "shapes_segmentation"}, {"type": "segmentation_folder", "path": str(tmp_path)}):
        config = load_config("configs/demo.py", [f"--config.evals.seg={ {**entry, 'overlay_dir': str(tmp_path)}!r}"])
        check_input_paths(config, training=False)  # a folder of the user's: fine
        config = load_config("configs/demo.py", [f"--config.evals.seg={ {**entry, 'overlay_dir': str(workdir)}!r}"])
        with pytest.raises(ConfigError, match=f"evals.seg.overlay_dir {workdir} is where the clip_jax run in"):
            check_input_paths(config, training=False)
        # the run's own workdir at a first launch, before it holds a config.json
        fresh = tmp_path / "fresh"
        inside = {**entry, 'overlay_dir': str(fresh / 'checkpoints' / 'o')}
        config = load_config("configs/demo.py", [f"--config.evals.seg={inside!r}"])
        with pytest.raises(ConfigError, match="keeps its own files; name a folder of its own inside the run"):
            check_input_paths(config, training=False, workdir=fresh)
        config = load_config("configs/demo.py", [f"--config.evals.seg={ {**entry, 'overlay_dir': str(fresh / 'o')}!r}"])
        check_input_paths(config, training=False, workdir=fresh)  # a folder of its own in the run: fine
    check_overlay_dir("seg", str(workdir / "overlays"))  # what the evaluations call to write
    with pytest.raises(ConfigError, match="keeps its own files"):
        check_overlay_dir("seg", str(workdir / "tensorboard"))
