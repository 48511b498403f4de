"""Behavioural tests for `clip_jax.data.segmentation`: the palette against VOC's published colours, the reader
against folders built here file by file with PIL (expected crops cut by hand), every refusal against its message,
and the shapes writer against `ShapesDataset`'s own masks and background colours."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from clip_jax.data.segmentation import (
    IGNORE,
    VOC_CLASSES,
    SegmentationError,
    SegmentationFolder,
    voc_palette,
    write_segmentation_folder,
    write_shapes_segmentation_set,
)
from clip_jax.data.shapes import BACKGROUND_RGB, ShapesConfig, ShapesDataset, class_names

GREY, RED = (110, 110, 110), (220, 30, 30)


def save_image(root: pathlib.Path, image_id: str, image: np.ndarray) -> None:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    # Full-resolution chroma: 4:2:0 would smear the red over a 2-px block of grey, beyond `assert_jpeg_close`'s band.
    Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95, subsampling=0)


def save_mask(root: pathlib.Path, image_id: str, mask: Image.Image) -> None:
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    mask.save(root / "SegmentationClass" / f"{image_id}.png")


def palette_mask(labels: np.ndarray) -> Image.Image:
    """A 'P' image built from raw bytes (PIL's own conversions not involved), in a palette unlike VOC's."""
    img = Image.frombytes("P", labels.shape[::-1], labels.astype(np.uint8).tobytes())
    img.putpalette(bytes(range(256)) * 3)
    return img


def save_split(root: pathlib.Path, split: str, text: str) -> None:
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(text)


def rectangle_scene(w: int, h: int, box: tuple[int, int, int, int], label: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey image with a red box (x0, y0, x1, y1) and its label map: `label` in the box, 0 elsewhere."""
    x0, y0, x1, y1 = box
    image = np.empty((h, w, 3), np.uint8)
    image[:] = GREY
    image[y0:y1, x0:x1] = RED
    labels = np.zeros((h, w), np.uint8)
    labels[y0:y1, x0:x1] = label
    return image, labels


@pytest.fixture
def two_images(tmp_path):
    """Folder "a": 40x30 with a palette mask of labels 0, 1 and void; "b": 30x30 with an 'L' mask of labels 0, 2."""
    image_a, labels_a = rectangle_scene(40, 30, (8, 6, 30, 20), 1)
    labels_a[6, 8:30] = IGNORE  # a void border, as VOC draws round objects
    image_b, labels_b = rectangle_scene(30, 30, (3, 12, 25, 27), 2)
    save_image(tmp_path, "a", image_a)
    save_mask(tmp_path, "a", palette_mask(labels_a))
    save_image(tmp_path, "b", image_b)
    save_mask(tmp_path, "b", Image.fromarray(labels_b))
    save_split(tmp_path, "val", "a\n\n  b  \n\n")
    return tmp_path, {"a": (image_a, labels_a), "b": (image_b, labels_b)}


# ------------------------------------------------------------------------------------------------------- palette


def test_palette_matches_voc_colours_by_hand():
    palette = voc_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 15: (192, 128, 128),
                255: (224, 224, 192)}
    for label, colour in expected.items():
        assert tuple(palette[label]) == colour, label
    assert len({tuple(c) for c in palette}) == 256  # the bit interleaving is a bijection


def test_voc_classes():
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"
    assert VOC_CLASSES[11] == "dining table" and VOC_CLASSES[20] == "tv monitor"


# ------------------------------------------------------------------------------------------------------- reading


def test_hand_made_folder_reads_back(two_images, caplog):
    root, source = two_images
    with caplog.at_level("WARNING"):
        folder = SegmentationFolder(root, "val", 30)
        SegmentationFolder(root, "val", 30)
    assert len(folder) == 2 and folder.class_names() == list(VOC_CLASSES)  # no class_names.txt
    # said once: a folder of other classes would silently train under VOC's names
    told = [r.getMessage() for r in caplog.records if "has no class_names.txt" in r.getMessage()]
    assert len(told) == 1 and "read as PASCAL VOC's classes (background, aeroplane, bicycle, bird, ...)" in told[0]
    a, b = folder[0], folder[1]
    assert (a["id"], b["id"]) == ("a", "b")
    assert a["image"].shape == (30, 30, 3) and a["seg"].shape == (30, 30) and a["seg"].dtype == np.uint8
    # 40x30 at size 30: the shorter side is already 30, so the result is the centre 30 columns (5 to 35).
    image_a, labels_a = source["a"]
    np.testing.assert_array_equal(a["seg"], labels_a[:, 5:35])
    assert_jpeg_close(a["image"], image_a[:, 5:35])
    image_b, labels_b = source["b"]
    np.testing.assert_array_equal(b["seg"], labels_b)
    assert_jpeg_close(b["image"], image_b)
    images, segs = folder.arrays()
    assert images.shape == (2, 30, 30, 3) and segs.shape == (2, 30, 30)
    np.testing.assert_array_equal(segs[1], labels_b)
    assert folder.arrays(1)[1].shape == (1, 30, 30)


@pytest.mark.parametrize("size", [7, 17, 45])
def test_nearest_resize_invents_no_label(two_images, size):
    root, source = two_images
    seg = SegmentationFolder(root, "val", size)[0]["seg"]
    assert set(np.unique(seg)) <= set(np.unique(source["a"][1]))
    assert seg.shape == (size, size)


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4- or 8-neighbour on the other side of the mask's edge: the 1-px border where the bicubic
    image and the nearest mask may disagree."""
    padded = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    shifts = [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return np.any([s != mask for s in shifts], axis=0)


def assert_jpeg_close(decoded: np.ndarray, source: np.ndarray) -> None:
    """Quality 95 JPEG of flat colours: about a level off on average, up to ~25 right at a colour edge and half that
    a pixel further (ringing of the cut-off DCT coefficients). A crop off by even one column is off by ~200 along
    the red box's sides."""
    error = np.abs(decoded.astype(int) - source).max(-1)
    edges = boundary_band(np.all(source == RED, -1))
    assert error[~edges].max() <= 16 and error.max() <= 40 and error.mean() < 2, (error.max(), error.mean())


@pytest.mark.parametrize("w, h, box, size", [(64, 48, (20, 10, 44, 30), 32), (48, 70, (5, 30, 40, 60), 29),
                                             (50, 50, (0, 0, 17, 33), 23)])
def test_mask_has_the_image_geometry(tmp_path, w, h, box, size):
    image, labels = rectangle_scene(w, h, box, 1)
    save_image(tmp_path, "x", image)
    save_mask(tmp_path, "x", palette_mask(labels))
    save_split(tmp_path, "val", "x\n")
    example = SegmentationFolder(tmp_path, "val", size)[0]
    pixels = example["image"].astype(int)
    is_red = np.abs(pixels - RED).sum(-1) < np.abs(pixels - GREY).sum(-1)
    in_mask = example["seg"] == 1
    assert in_mask.sum() > size  # the box survives the resize: the comparison is not vacuous
    assert not np.any((is_red != in_mask) & ~boundary_band(in_mask))


def test_class_names_file(two_images):
    root, _ = two_images
    (root / "class_names.txt").write_text("background\nred box\nsecond box\n\n")
    folder = SegmentationFolder(root, "val", 30)
    assert folder.class_names() == ["background", "red box", "second box"]
    assert folder[1]["id"] == "b"  # label 2 is in range with three names
    (root / "class_names.txt").write_text("background\nred box\n")
    with pytest.raises(SegmentationError, match="label 2, beyond the 2 classes"):
        SegmentationFolder(root, "val", 30)[1]


# ------------------------------------------------------------------------------------------------------ refusals


def _remove(path: pathlib.Path) -> pathlib.Path:
    path.unlink()
    return path


def _replace_mask(root: pathlib.Path, mask: Image.Image) -> pathlib.Path:
    save_mask(root, "b", mask)
    return root / "SegmentationClass" / "b.png"


def _text_as_jpg(root: pathlib.Path) -> pathlib.Path:
    path = root / "JPEGImages" / "b.jpg"
    path.write_text("not an image, just notes someone saved with the wrong name\n")
    return path


def _png_instead(root: pathlib.Path) -> pathlib.Path:
    jpeg = root / "JPEGImages" / "b.jpg"
    Image.open(jpeg).save(jpeg.with_suffix(".png"))
    jpeg.unlink()
    return jpeg


BREAKAGES = {
    "missing split file": (lambda root: root / "ImageSets" / "Segmentation" / "nosuch.txt", "does not exist"),
    "missing image": (lambda root: _remove(root / "JPEGImages" / "b.jpg"), "does not exist"),
    "missing mask": (lambda root: _remove(root / "SegmentationClass" / "a.png"), "does not exist"),
    "RGB mask": (lambda root: _replace_mask(root, Image.new("RGB", (30, 30), (128, 0, 0))),
                 "convert to palette indices"),
    "out-of-range label": (lambda root: _replace_mask(root, Image.fromarray(np.full((30, 30), 30, np.uint8))),
                           "label 30, beyond the 21 classes"),
    "size mismatch": (lambda root: _replace_mask(root, Image.fromarray(np.zeros((30, 20), np.uint8))),
                      "is 20x30 but its image"),
    "text file named .jpg": (_text_as_jpg, "cannot decode image"),
    "empty split file": (lambda root: (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n \n") and
                         root / "ImageSets" / "Segmentation" / "val.txt", "lists no id"),
    "blank class name": (lambda root: (root / "class_names.txt").write_text("background\n\ncat\n") and
                         root / "class_names.txt", "line 2 is blank"),
    # one prompt for two labels: the second was never predicted (its IoU 0), without a word
    # a folder of PNG images: the layout's JPEGImages/<id>.jpg is missing, and the message says what is there
    "image saved as PNG": (lambda root: _png_instead(root), "has b.png: the layout names it b.jpg"),
    "one text to CLIP": (lambda root: (root / "class_names.txt").write_text("background\nRed Square\nred  square\n")
                         and root / "class_names.txt", "lines 2 and 3: 'Red Square' and 'red  square' are one text to "
                                                       "CLIP"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_refusals_are_one_line_naming_the_file(two_images, case):
    root, _ = two_images
    breakage, expected = BREAKAGES[case]
    path = breakage(root)
    split = "nosuch" if case == "missing split file" else "val"
    with pytest.raises(SegmentationError) as info:
        folder = SegmentationFolder(root, split, 16)
        for i in range(len(folder)):
            folder[i]
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message, message


# ------------------------------------------------------------------------------------------------------- writing


def test_written_masks_are_voc_palette_pngs(tmp_path):
    image, labels = rectangle_scene(20, 10, (2, 2, 9, 8), 15)
    labels[0, 0] = IGNORE
    root = write_segmentation_folder(tmp_path / "set", [image], [labels], ["p1"], VOC_CLASSES, "train")
    with Image.open(root / "SegmentationClass" / "p1.png") as mask:
        assert mask.mode == "P"
        np.testing.assert_array_equal(np.asarray(mask), labels)
        rgb = np.asarray(mask.convert("RGB"))
    assert tuple(rgb[4, 4]) == (192, 128, 128) and tuple(rgb[0, 0]) == (224, 224, 192)  # person, void
    assert (root / "ImageSets" / "Segmentation" / "train.txt").read_text() == "p1\n"
    with pytest.raises(ValueError, match="beyond the 21 classes"):
        write_segmentation_folder(tmp_path / "bad", [image], [labels + 30], ["p1"], VOC_CLASSES, "train")


def test_shapes_set_round_trip(tmp_path):
    root = write_shapes_segmentation_set(tmp_path / "shapes", 4, image_size=64)
    folder = SegmentationFolder(root, "test_novel", 64)
    assert len(folder) == 4 and folder.class_names() == ["background", *class_names()]
    dataset = ShapesDataset(ShapesConfig(image_size=64, min_objects=3, max_objects=6), "test_novel")
    for i in range(len(folder)):
        example = folder[i]
        np.testing.assert_array_equal(example["seg"], dataset.masks(i)[0])
        background = example["seg"] == 0
        # Away from the objects' edges, the clean background is one flat colour, which JPEG at quality 100 keeps.
        inner = background & ~boundary_band(background)
        error = np.abs(example["image"][inner].astype(int) - BACKGROUND_RGB[dataset.scene(i).background])
        assert error.max() <= 3 and error.mean() < 1, (i, error.max(), error.mean())
