"""Behavioural tests for the procedural ``shapes`` dataset."""

import dataclasses
import hashlib
import itertools
import re

import numpy as np
import pytest

from clip_jax.data import shapes
from clip_jax.data.shapes import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    COLOURS,
    DEFAULT_HELD_OUT,
    DOMAINS,
    POSITIONS,
    SHAPES,
    SPLITS,
    VALIDATION_HELD_OUT,
    ZERO_SHOT_TEMPLATES,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    ShapesDomain,
)

# Approximation of the CLIP BPE pre-tokeniser, as used to size long captions.
TOKEN_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
NEGATED_OUTLINE = re.compile(r"\bno outline\b|\bwithout an outline\b|\bnot outlined\b")


def position_regex(position: str) -> re.Pattern:
    """Match a grid position as words, so "top" does not match inside "top left" and vice versa."""
    if position in ("top", "bottom"):
        return re.compile(rf"\b{position}\b(?! (left|right)\b)")
    if position in ("left", "right"):
        return re.compile(rf"(?<!top )(?<!bottom )\b{position}\b")
    return re.compile(rf"\b{position}\b")


def has_word(word: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def many_objects(split: str = "train", **kwargs) -> ShapesDataset:
    return ShapesDataset(ShapesConfig(min_objects=1, max_objects=8, **kwargs), split)


def test_deterministic_by_index_and_seed():
    a, b = many_objects(), many_objects()
    for i in (0, 7, 12345):
        x, y = a[i], b[i]
        assert x["image"].tobytes() == y["image"].tobytes()
        assert (x["short_caption"], x["long_caption"], x["label"]) == (y["short_caption"], y["long_caption"],
                                                                       y["label"])
    assert a[3]["image"].tobytes() != a[4]["image"].tobytes()
    assert a[3]["long_caption"] != a[4]["long_caption"]
    assert many_objects(seed=1)[3]["image"].tobytes() != a[3]["image"].tobytes()


def test_splits_use_independent_streams():
    images = {s: [many_objects(s, validation_held_out=VALIDATION_HELD_OUT)[i]["image"].tobytes() for i in range(20)]
              for s in SPLITS}
    for s, t in itertools.combinations(SPLITS, 2):
        assert sum(x == y for x, y in zip(images[s], images[t], strict=True)) == 0, (s, t)


def test_output_format_and_grain_source():
    import grain

    ds = ShapesDataset(ShapesConfig(image_size=96), "train", num_examples=10)
    ex = ds[0]
    assert ex["image"].shape == (96, 96, 3) and ex["image"].dtype == np.uint8
    assert isinstance(ex["short_caption"], str) and isinstance(ex["long_caption"], str)
    assert ex["label"].dtype == np.int32
    assert len(ds) == 10
    with pytest.raises(IndexError):
        ds[10]
    assert ds[np.int64(-1)]["long_caption"] == ds[9]["long_caption"]
    source = grain.MapDataset.source(ds)
    assert source[4]["image"].tobytes() == ds[4]["image"].tobytes()


def test_classes_and_held_out_partition():
    ds = ShapesDataset(ShapesConfig(), "train")
    names = ds.class_names()
    assert len(names) == len(set(names)) == len(COLOURS) * len(SHAPES) >= 48
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8
    held, seen = ds.held_out_classes(), ds.seen_classes()
    assert sorted(held + seen) == list(range(len(names)))
    assert {names[i] for i in held} == {f"{c} {s}" for c, s in DEFAULT_HELD_OUT}
    assert len(names) // 8 <= len(held) <= len(names) // 5
    seen_names = [names[i].split() for i in seen]
    for colour in COLOURS:
        assert sum(c == colour for c, _ in seen_names) >= 4
    for shape in SHAPES:
        assert sum(s == shape for _, s in seen_names) >= 4
    assert 5 <= len(ZERO_SHOT_TEMPLATES) <= 8 and all(t.count("{}") == 1 for t in ZERO_SHOT_TEMPLATES)


@pytest.mark.parametrize("split", ["train", "test", "test_seen"])
def test_held_out_pairs_never_drawn_outside_held_out_split(split):
    ds = many_objects(split)
    held = set(DEFAULT_HELD_OUT)
    n = 2000 if split == "train" else 300
    for i in range(n):
        assert not {(o.colour, o.shape) for o in ds.scene(i).objects} & held
    for i in range(100):
        assert not any(f"{c} {s}" in ds[i]["short_caption"] for c, s in held)


def test_held_out_split_salient_is_held_out_and_rest_seen():
    ds = many_objects("test_held_out")
    held = set(DEFAULT_HELD_OUT)
    for i in range(200):
        scene = ds.scene(i)
        assert (scene.salient.colour, scene.salient.shape) in held
        assert all((o.colour, o.shape) not in held for o in scene.objects if o is not scene.salient)
        assert int(ds[i]["label"]) in ds.held_out_classes()


def test_salient_is_unique_largest_and_named_in_short_caption():
    ds = many_objects()
    for i in range(150):
        scene, ex = ds.scene(i), ds[i]
        assert [o.size for o in scene.objects].count("large") == 1
        assert scene.salient.size == "large"
        # Measured in pixels: objects never leave their grid cell, so the non-background pixels of a cell
        # are that object's area.
        foreground = np.any(ex["image"] != np.array(BACKGROUND_RGB[scene.background], dtype=np.uint8), axis=-1)
        cell_of_pixel = (np.arange(64) * 3 // 64)[:, None] * 3 + (np.arange(64) * 3 // 64)[None, :]
        areas = [int(foreground[cell_of_pixel == o.cell].sum()) for o in scene.objects]
        assert sum(areas) == foreground.sum()
        salient_area = areas.pop(scene.objects.index(scene.salient))
        # A clear margin, not just a strict maximum: "largest" must be obvious by eye.
        assert salient_area >= 1.2 * max(areas, default=0)
        name = f"{scene.salient.colour} {scene.salient.shape}"
        assert name in ex["short_caption"]
        assert ds.class_names()[int(ex["label"])] == name
        # Long-CLIP uses the first sentence as a short caption: it must be about the salient object.
        first = ex["long_caption"].split(". ")[0]
        assert has_word(scene.salient.colour, first) and has_word(scene.salient.shape, first)
        assert has_word("large", first)


def test_long_caption_describes_every_object_and_attribute():
    ds = ShapesDataset(ShapesConfig(min_objects=1, max_objects=9), "test")
    for i in range(300):
        scene, caption = ds.scene(i), ds[i]["long_caption"]
        assert caption.endswith(".")
        sentences = caption[:-1].split(". ")
        assert has_word(scene.background, caption)
        for obj in scene.objects:
            matching = [s for s in sentences if position_regex(obj.position).search(s)]
            assert len(matching) == 1, (obj, caption)
            sentence = matching[0]
            for word in (obj.colour, obj.shape, obj.size, obj.texture):
                assert has_word(word, sentence), (word, sentence)
            negated = NEGATED_OUTLINE.search(sentence) is not None
            assert "outline" in sentence and negated != obj.outline, sentence


def test_long_caption_phrasing_varies():
    ds = many_objects()
    first_words = {ds[i]["long_caption"].split()[0] for i in range(100)}
    short_templates = {re.sub(r"\b(" + "|".join(COLOURS + SHAPES) + r")\b", "", ds[i]["short_caption"])
                       for i in range(100)}
    assert len(first_words) >= 3 and len(short_templates) >= 3


def test_long_captions_are_long_with_many_objects():
    ds = ShapesDataset(ShapesConfig(min_objects=6, max_objects=8), "train")
    counts = [len(TOKEN_RE.findall(ds[i]["long_caption"].lower())) for i in range(300)]
    assert np.mean(counts) >= 120


def test_solid_centre_pixel_is_palette_colour():
    ds = many_objects()
    checked = 0
    for i in range(300):
        scene = ds.scene(i)
        if scene.salient.texture != "solid":
            continue
        cx, cy, _ = shapes.object_geometry(scene.salient, 64)
        assert tuple(ds[i]["image"][int(cy), int(cx)]) == COLOUR_RGB[scene.salient.colour]
        checked += 1
    assert checked > 30
    # A hand-placed object at the exact image centre, independent of the geometry helper.
    for colour, shape in itertools.product(COLOURS, SHAPES):
        scene = Scene("grey", (ShapeObject(colour, shape, "large", cell=4, outline=True),))
        image = shapes.render_scene(scene, 64)
        assert tuple(image[32, 32]) == COLOUR_RGB[colour]
        assert tuple(image[2, 2]) == BACKGROUND_RGB["grey"]


def test_palettes_are_clearly_distinct():
    objects = [np.array(v, dtype=int) for v in COLOUR_RGB.values()]
    backgrounds = [np.array(v, dtype=int) for v in BACKGROUND_RGB.values()]
    for a, b in itertools.combinations(objects, 2):
        assert np.abs(a - b).sum() >= 120
    for a, b in itertools.product(objects, backgrounds):
        assert np.abs(a - b).sum() >= 120


@pytest.mark.parametrize("texture", ["striped", "dotted", "checkered"])
def test_textures_only_use_shades_of_the_object_colour(texture):
    for colour in COLOURS:
        obj = ShapeObject(colour, "square", "large", cell=4, texture=texture)
        image = shapes.render_scene(Scene("beige", (obj,)), 64).reshape(-1, 3).astype(float)
        pixels = np.unique(image[np.any(image != BACKGROUND_RGB["beige"], axis=-1)], axis=0)
        assert len(pixels) == 2, (colour, texture, pixels)
        base = np.array(COLOUR_RGB[colour], dtype=float)
        for p in pixels:
            # Every pixel is the colour itself or a uniformly darker version of it (same hue), up to rounding.
            k = p @ base / (base @ base)
            assert np.abs(p - k * base).max() <= 1.5 and 0.4 <= k <= 1.0, (colour, p)


def test_render_explicit_scene_hard_pair():
    ds = ShapesDataset(ShapesConfig(), "train")
    objs = [ShapeObject("red", "circle", "large", cell=0, texture="striped", outline=True, jitter=(0.3, -0.2)),
            ShapeObject("blue", "square", "small", cell=8)]
    a = ds.render(Scene("slate", tuple(objs)), caption_seed=5)
    objs[1] = ShapeObject("yellow", "square", "small", cell=8)
    b = ds.render(Scene("slate", tuple(objs)), caption_seed=5)
    changed = np.argwhere(np.any(a["image"] != b["image"], axis=-1))
    assert len(changed) > 0 and changed.min() >= 2 * 64 // 3  # only the bottom-right cell differs
    assert a["label"] == b["label"] == ds.class_names().index("red circle")
    assert a["short_caption"] == b["short_caption"]
    assert a["long_caption"].replace("blue", "yellow") == b["long_caption"]


@pytest.mark.parametrize(
    "scene",
    [
        Scene("grey", (ShapeObject("red", "circle", "large", 0), ShapeObject("blue", "star", "large", 1))),
        Scene("grey", (ShapeObject("red", "circle", "large", 0), ShapeObject("blue", "star", "small", 0))),
        Scene("grey", (ShapeObject("red", "circle", "medium", 0), ShapeObject("blue", "star", "small", 1))),
        Scene("grey", (ShapeObject("magenta", "circle", "large", 0),)),
        Scene("black", (ShapeObject("red", "circle", "large", 0),)),
        Scene("grey", ()),
    ],
)
def test_invalid_scene_raises(scene):
    with pytest.raises(ValueError):
        shapes.render_scene(scene)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"held_out": (("magenta", "circle"),)},
        {"held_out": (("red", "hexagon"),)},
        {"min_objects": 4, "max_objects": 3},
        {"min_objects": 0},
        {"max_objects": 10},
        {"image_size": 31},
        {"seed": -1},
    ],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError):
        ShapesConfig(**kwargs)


def test_validation_pairs_are_kept_out_of_training_and_are_the_salient_objects_of_val_held_out():
    # The pairs themselves: the rule of their comment in shapes.py.
    assert len(VALIDATION_HELD_OUT) == len(COLOURS) and [c for c, _ in VALIDATION_HELD_OUT] == list(COLOURS)
    assert not set(VALIDATION_HELD_OUT) & set(DEFAULT_HELD_OUT)
    for shape in SHAPES:
        assert [s for _, s in VALIDATION_HELD_OUT].count(shape) <= 2
        assert sum(s == shape for _, s in DEFAULT_HELD_OUT + VALIDATION_HELD_OUT) <= len(COLOURS) - 4

    kwargs = {"validation_held_out": VALIDATION_HELD_OUT}
    out_of_training = set(DEFAULT_HELD_OUT) | set(VALIDATION_HELD_OUT)
    train, val = many_objects("train", **kwargs), many_objects("val_held_out", **kwargs)
    for i in range(1000):
        assert not {(o.colour, o.shape) for o in train.scene(i).objects} & out_of_training
    salient = set()
    for i in range(300):
        scene = val.scene(i)
        salient.add((scene.salient.colour, scene.salient.shape))
        assert all((o.colour, o.shape) not in out_of_training for o in scene.objects if o is not scene.salient)
        assert val.class_names()[int(val[i]["label"])] == f"{scene.salient.colour} {scene.salient.shape}"
    assert salient == set(VALIDATION_HELD_OUT)
    # The test split's salient objects stay the test pairs, and the test pairs stay what held_out_classes names.
    plain, with_val = many_objects("test_held_out"), many_objects("test_held_out", **kwargs)
    assert {(with_val.scene(i).salient.colour, with_val.scene(i).salient.shape) for i in range(200)} <= set(
        DEFAULT_HELD_OUT)
    assert plain.held_out_classes() == with_val.held_out_classes()
    with pytest.raises(ValueError, match="both held_out and validation_held_out"):
        ShapesConfig(validation_held_out=DEFAULT_HELD_OUT[:1])
    with pytest.raises(ValueError, match="validation_held_out"):
        ShapesDataset(ShapesConfig(), "val_held_out")


def test_bad_split_and_empty_held_out_raise():
    with pytest.raises(ValueError):
        ShapesDataset(ShapesConfig(), "validation")
    with pytest.raises(ValueError):
        ShapesDataset(ShapesConfig(held_out=()), "test_held_out")
    assert ShapesDataset(ShapesConfig(held_out=()), "train").held_out_classes() == []


def test_positions_cover_grid():
    assert len(POSITIONS) == 9 and "centre" in POSITIONS


def test_partial_caption_names_exactly_one_attribute_of_the_salient_object():
    ds = ShapesDataset(ShapesConfig(max_objects=4), "train")
    kinds = set()
    for i in range(200):
        item, salient = ds[i], ds.scene(i).salient
        words = set(item["partial_caption"].rstrip(".").split())
        has_colour, has_shape = salient.colour in words, salient.shape in words
        assert has_colour != has_shape, item["partial_caption"]
        assert item["partial_caption_kind"] == ("colour" if has_colour else "shape")
        assert not (words & (set(COLOURS) - {salient.colour})) and not (words & (set(SHAPES) - {salient.shape}))
        kinds.add(has_colour)
    assert kinds == {True, False}  # both kinds occur


def test_negative_captions_replace_one_attribute_of_the_salient_object_by_a_training_pairs():
    """`negative_captions` (method negclip's hard negatives): each caption's negative is the same sentence with the
    salient object's colour or shape (the partial caption: the attribute it names) replaced, its article following;
    the new pair is a training pair; and the rest of the example is what it is without negatives."""
    kwargs = {"validation_held_out": VALIDATION_HELD_OUT, "max_objects": 4}
    out_of_training = set(DEFAULT_HELD_OUT) | set(VALIDATION_HELD_OUT)
    with_negatives = ShapesDataset(ShapesConfig(negative_captions=True, **kwargs), "train")
    plain = ShapesDataset(ShapesConfig(**kwargs), "train")
    replaced = {"colour": 0, "shape": 0}
    for i in range(300):
        item, before, salient = with_negatives[i], plain[i], plain.scene(i).salient
        assert np.array_equal(item.pop("image"), before.pop("image"))
        negatives = {k: item.pop(f"{k}_negative") for k in ("short_caption", "long_caption", "partial_caption")}
        assert item == before
        for key, negative in negatives.items():
            words, negative_words = item[key].split(), negative.split()
            assert len(words) == len(negative_words), (item[key], negative)
            articles = {("a", "an"), ("an", "a")}
            changes = {(a, b) for a, b in zip(words, negative_words, strict=True) if a != b} - articles
            assert len(changes) == 1, (item[key], negative)
            (old, new), = changes
            attribute = "colour" if old.rstrip(".;,") in COLOURS else "shape"
            assert old.rstrip(".;,") == getattr(salient, attribute), (item[key], negative)
            assert new.rstrip(".;,") in (COLOURS if attribute == "colour" else SHAPES)
            if key == "partial_caption":
                assert attribute == item["partial_caption_kind"]
            else:
                pair = {"colour": salient.colour, "shape": salient.shape, attribute: new.rstrip(".;,")}
                assert (pair["colour"], pair["shape"]) not in out_of_training, negative
            if key == "short_caption":
                replaced[attribute] += 1
    assert min(replaced.values()) > 100  # half and half: mean 150 each, sd 8.7


# sha256 of the images and captions below, computed before rendering domains existed: the clean domain must keep
# rendering exactly what every earlier model was trained and evaluated on.
CLEAN_CHECKSUM = "530fdaf6008399fe4c9cf35de7ba3d4dfe44764f33ab4ac0fd25e7734714af3d"


def test_clean_domain_renders_exactly_as_before_domains():
    digest = hashlib.sha256()
    for split in ("train", "test", "test_seen", "test_held_out"):
        for size in (64, 96):
            ds = ShapesDataset(ShapesConfig(image_size=size, min_objects=1, max_objects=8), split)
            for i in range(4):
                ex = ds[i]
                digest.update(ex["image"].tobytes())
                digest.update((ex["short_caption"] + ex["long_caption"] + ex["partial_caption"]).encode())
                assert ex["image"].tobytes() == shapes.render_scene(ds.scene(i), size).tobytes()
    assert digest.hexdigest() == CLEAN_CHECKSUM
    assert ShapesConfig().domain == "clean" and DOMAINS["clean"] == ShapesDomain()


@pytest.mark.parametrize("split", ["train", "val", "test_held_out"])
def test_shifted_domain_changes_pixels_only(split):
    config = ShapesConfig(image_size=96)
    clean = ShapesDataset(config, split)
    shifted = ShapesDataset(dataclasses.replace(config, domain="shifted"), split)
    for i in range(6):
        a, b = clean[i], shifted[i]
        assert clean.scene(i) == shifted.scene(i)
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
        assert a["image"].shape == b["image"].shape and b["image"].dtype == np.uint8
        assert np.abs(a["image"].astype(int) - b["image"]).mean() > 5
        # The same pixels whether the domain comes from the config or is passed explicitly.
        assert clean.image(i, DOMAINS["shifted"]).tobytes() == b["image"].tobytes() == shifted.image(i).tobytes()


def test_shifted_domain_is_deterministic():
    a, b = (ShapesDataset(ShapesConfig(domain="shifted"), "train") for _ in range(2))
    for i in (0, 7, 12345):
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes()
    assert a[3]["image"].tobytes() != a[4]["image"].tobytes()
    scene = a.scene(0)
    assert a.render(scene, caption_seed=2)["image"].tobytes() == b.render(scene, caption_seed=2)["image"].tobytes()
    with pytest.raises(ValueError):
        shapes.render_scene(scene, 64, DOMAINS["shifted"])  # its noise needs a generator


def test_val_split_is_new_seen_only_and_independent():
    # Appended last: the earlier splits keep their seeds (SPLITS.index) and hence their streams.
    assert SPLITS[:4] == ("train", "test", "test_seen", "test_held_out") and SPLITS[4] == "val"
    val, test, train = (many_objects(s) for s in ("val", "test", "train"))
    held = set(DEFAULT_HELD_OUT)
    for i in range(100):
        assert not {(o.colour, o.shape) for o in val.scene(i).objects} & held
    for other in (test, train):
        assert all(val[i]["image"].tobytes() != other[i]["image"].tobytes() for i in range(20))
        assert [val[i]["long_caption"] for i in range(20)] != [other[i]["long_caption"] for i in range(20)]


def test_bad_domain_raises_naming_the_choices():
    with pytest.raises(ValueError, match="'clean', 'shifted'"):
        ShapesConfig(domain="noisy")


@pytest.mark.parametrize(
    "kwargs",
    [{"noise_std": -1.0}, {"render_scale": 0.0}, {"render_scale": 1.5}, {"contrast": 0.0}, {"contrast": 1.2},
     {"backgrounds": ((230, 40, 40),)}, {"backgrounds": ((300, 0, 0),)}],
)  # fmt: skip
def test_bad_domain_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        ShapesDomain(**kwargs)


def test_colour_identity_survives_the_shifted_domain():
    palette = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=float)
    for colour in COLOURS:
        means = []
        for k, (shape, background) in enumerate(itertools.product(SHAPES, shapes.BACKGROUNDS)):
            scene = Scene(background, (ShapeObject(colour, shape, "large", cell=4, outline=k % 2 == 1),))
            clean = shapes.render_scene(scene, 96)
            # The object's interior in the clean render (eroded by 3 px: blur legitimately mixes the edge with
            # the background), read in the shifted render.
            mask = np.all(clean == COLOUR_RGB[colour], axis=-1)
            for _ in range(3):
                mask[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
            shifted = shapes.render_scene(scene, 96, DOMAINS["shifted"], np.random.default_rng(k))
            means.append(shifted[mask].astype(float).mean(axis=0))
        # Averaged over shapes, backgrounds and noise draws, the object still reads as its own palette colour.
        mean = np.mean(means, axis=0)
        assert COLOURS[int(np.linalg.norm(palette - mean, axis=1).argmin())] == colour, (colour, mean)
        for m in means:  # and so does every single object
            assert COLOURS[int(np.linalg.norm(palette - m, axis=1).argmin())] == colour, (colour, m)


@pytest.mark.parametrize("domain", ["clean", "shifted"])
def test_captions_without_the_image_are_the_items_captions(domain):
    """`captions` (a tokenizer's corpus) draws the captions that `__getitem__` draws with the image."""
    source = ShapesDataset(ShapesConfig(domain=domain), "train")
    for i in range(20):
        item = source[i]
        assert source.captions(i) == {k: item[k] for k in ("short_caption", "long_caption", "partial_caption",
                                                            "partial_caption_kind")}
