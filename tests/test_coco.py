"""Tests of `clip_jax.data.coco`: a small set written by `write_detection_folder` read back with boxes transformed by
hand, COCOeval on predictions of known quality, and every refusal of a bad annotation file or image in one line."""

import json
import pathlib

import numpy as np
import pytest

from clip_jax.data.coco import (
    CocoDetection,
    DetectionError,
    coco_ap,
    detections_to_results,
    geometry,
    to_original_xywh,
    write_coco_results,
    write_detection_folder,
)

NAMES = ["cat", "dog", "bird", "fish"]  # COCO ids 1..4; no fish anywhere
SIZE = 32
# Three images of sizes (width x height) 40x30, 30x50 and 36x36, solid colours, with pixel xyxy boxes.
IMAGES = [np.full((30, 40, 3), (200, 20, 20), np.uint8), np.full((50, 30, 3), (20, 200, 20), np.uint8),
          np.full((36, 36, 3), (20, 20, 200), np.uint8)]
BOXES = [np.array([[10, 5, 30, 20], [0, 0, 4, 10]], np.float32),  # the second is cropped away entirely
         np.array([[5, 20, 25, 40], [0, 0, 10, 10]], np.float32),  # the second keeps 0.6 pixel of height
         np.array([[0, 0, 36, 36], [9, 18, 27, 36]], np.float32)]
CLASSES = [np.array([0, 1]), np.array([1, 0]), np.array([0, 2])]


def write_set(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The set above plus a crowd region of cats on image 1 (the 40x30 one); (annotation file, image root)."""
    path = pathlib.Path(write_detection_folder(root, "val", IMAGES, BOXES, CLASSES, NAMES))
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 100, "image_id": 1, "category_id": 1, "bbox": [20, 10, 10, 10],
                                "area": 100, "iscrowd": 1})
    path.write_text(json.dumps(data))
    return path, root / "images" / "val"


@pytest.fixture
def dataset(tmp_path: pathlib.Path) -> CocoDetection:
    return CocoDetection(*write_set(tmp_path), image_size=SIZE)


def test_reads_images_and_transforms_boxes(dataset: CocoDetection):
    assert dataset.category_ids == [1, 2, 3, 4] and dataset.category_names == NAMES
    assert dataset.image_ids == [1, 2, 3] and len(dataset) == 3
    first = dataset[0]
    assert first["image"].shape == (SIZE, SIZE, 3) and first["image"].dtype == np.uint8
    np.testing.assert_array_equal(first["image"][SIZE // 2, SIZE // 2], (200, 20, 20))
    # 40x30: the height 30 goes to 32, the width to int(40 * 32 / 30) = int(42.67) = 42 (torchvision truncates), so
    # x scales by 42/40 and y by 32/30; the crop starts at x (42 - 32) / 2 = 5. Box (10, 5, 30, 20) then spans
    # x 10 * 1.05 - 5 = 5.5 to 30 * 1.05 - 5 = 26.5 and y 5 * 32/30 = 5.33 to 20 * 32/30 = 21.33. Box (0, 0, 4, 10)
    # ends at x 4 * 1.05 - 5 < 0: dropped. The crowd region is not a box.
    assert geometry(40, 30, SIZE) == (42 / 40, 32 / 30, 5, 0)
    np.testing.assert_allclose(first["boxes"], [[5.5 / 32, (5 * 32 / 30) / 32, 26.5 / 32, (20 * 32 / 30) / 32]],
                               rtol=1e-6)
    np.testing.assert_array_equal(first["classes"], [0])
    assert first["boxes"].dtype == np.float32 and first["classes"].dtype == np.int32 and first["image_id"] == 1
    # 30x50: y scales by int(53.33) / 50 = 53/50 from top round((53 - 32) / 2) = round(10.5) = 10 (half to even).
    # Box (5, 20, 25, 40): x 5 * 32/30
    # to 25 * 32/30, y 20 * 1.06 - 10 = 11.2 to 40 * 1.06 - 10 = 32.4, clipped to 32. Box (0, 0, 10, 10) ends at
    # y 10 * 1.06 - 10 = 0.6: under a pixel high, dropped.
    second = dataset[1]
    np.testing.assert_allclose(second["boxes"], [[(5 * 32 / 30) / 32, 11.2 / 32, (25 * 32 / 30) / 32, 1.0]],
                               rtol=1e-6)
    np.testing.assert_array_equal(second["classes"], [1])
    # 36x36: scaled by 32/36, no crop.
    third = dataset[2]
    np.testing.assert_allclose(third["boxes"], [[0, 0, 1, 1], [0.25, 0.5, 0.75, 1]], rtol=1e-6)
    np.testing.assert_array_equal(third["classes"], [0, 2])


def test_to_original_inverts_the_transform(dataset: CocoDetection):
    for index, kept in ((0, [0]), (1, [0]), (2, [0, 1])):
        entry = dataset.ground_truth["images"][index]
        original = to_original_xywh(dataset[index]["boxes"], entry["width"], entry["height"], SIZE)
        expected = BOXES[index][kept].astype(np.float64)
        if index == 1:  # clipped at the crop's bottom: y 32 back to (32 + 10) / 1.06, not the original 40
            expected[0, 3] = 42 / 1.06
        expected[:, 2:] -= expected[:, :2]
        np.testing.assert_allclose(original, expected, rtol=1e-5)


def perfect_results(dataset: CocoDetection) -> list[dict]:
    annotations = [a for a in dataset.ground_truth["annotations"] if not a["iscrowd"]]
    return [r for a in annotations
            for r in detections_to_results(a["image_id"], np.array([a["bbox"]]), [1.0], [a["category_id"]])]


def test_coco_ap(dataset: CocoDetection):
    truth, perfect = dataset.ground_truth, perfect_results(dataset)
    assert coco_ap(truth, perfect) == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
    # Shifted right by a quarter of its width, a box keeps 3/4 of its area in common: IoU (3/4) / (5/4) = 0.6,
    # a match at IoU thresholds 0.5 and 0.55 only.
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2] / 4, *r["bbox"][1:]]} for r in perfect]
    scores = coco_ap(truth, shifted)
    assert scores["ap50"] == 1.0 and 0 < scores["ap"] < 1 and scores["ap75"] == 0.0
    # Perfect cats only: AP 1 on cats, 0 on dogs (boxes but no detection), NaN on fish (no box to find).
    cats = [r for r in perfect if r["category_id"] == 1]
    assert coco_ap(truth, cats, [1])["ap"] == 1.0 and coco_ap(truth, cats, [2])["ap"] == 0.0
    assert np.isnan(coco_ap(truth, cats, [4])["ap"])
    assert coco_ap(truth, []) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    assert all(json.dumps(r) for r in perfect) and "iscrowd" not in perfect[0]  # coco_ap left the results as given
    with pytest.raises(ValueError, match="category id 7"):
        coco_ap(truth, [{**perfect[0], "category_id": 7}])


def test_write_coco_results(tmp_path: pathlib.Path):
    results = detections_to_results(3, np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([0.5]), np.array([2]))
    assert results == [{"image_id": 3, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "score": 0.5}]
    write_coco_results(tmp_path / "results.json", results)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def edit(key: str, change):
    def apply(data: dict) -> None:
        change(data[key])
    return apply


BAD_JSON = {
    "missing key": (lambda data: data.pop("categories"), "no list 'categories'"),
    "unknown image": (edit("annotations", lambda a: a[0].update(image_id=9)), "image id 9"),
    "unknown category": (edit("annotations", lambda a: a[0].update(category_id=9)), "category id 9"),
    "3-number bbox": (edit("annotations", lambda a: a[0].update(bbox=[1, 2, 3])), "4 numbers"),
    "zero width": (edit("annotations", lambda a: a[0].update(bbox=[1, 2, 0, 3])), "width or height <= 0"),
    "duplicate image": (edit("images", lambda i: i[1].update(id=1)), "image id 1 twice"),
    "duplicate name": (edit("categories", lambda c: c[1].update(name="cat")), "1 and 2 both 'cat'"),
    "one text to CLIP": (edit("categories", lambda c: c[1].update(name="Cat")), "1 and 2 'cat' and 'Cat', one text to "
                                                                                "CLIP"),
    "blank name": (edit("categories", lambda c: c[1].update(name=" ")), "category 2 has the name ' '; give each"),
    # image 1 is 40x30: a box right of it, one above it; a box only reaching past an edge is clipped, not refused
    "box right of its image": (edit("annotations", lambda a: a[0].update(bbox=[40, 5, 10, 10])), "wholly outside"),
    "box above its image": (edit("annotations", lambda a: a[0].update(bbox=[5, -12, 10, 12])), "wholly outside"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_annotation_file_is_one_line(tmp_path: pathlib.Path, case: str):
    path, image_root = write_set(tmp_path)
    change, expected = BAD_JSON[case]
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DetectionError, match=expected) as error:
        CocoDetection(path, image_root, SIZE)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_bad_files_are_one_line(tmp_path: pathlib.Path):
    path, image_root = write_set(tmp_path)
    for problem, expected in ((None, "does not exist"), ("{not json", "is not JSON")):
        target = tmp_path / "other.json"
        if problem is not None:
            target.write_text(problem)
        with pytest.raises(DetectionError, match=expected) as error:
            CocoDetection(target, image_root, SIZE)
        assert "\n" not in str(error.value) and str(target) in str(error.value)
    image = image_root / "000001.png"
    image.write_bytes(b"not a png")  # found at construction, refused when decoded
    dataset = CocoDetection(path, image_root, SIZE)
    with pytest.raises(DetectionError, match="cannot decode") as error:
        dataset[1]
    assert "\n" not in str(error.value) and str(image) in str(error.value)
    image.unlink()  # checked before any decoding
    with pytest.raises(DetectionError, match="does not exist") as error:
        CocoDetection(path, image_root, SIZE)
    assert "\n" not in str(error.value) and str(image) in str(error.value)


def test_the_categories_and_boxes_of_an_unchanged_file_are_read_once(tmp_path: pathlib.Path, monkeypatch):
    """A launch asks a COCO file's categories and whether it has boxes several times: parsed and checked once, again
    after an edit; the parsed file itself is not kept (an LVIS-sized one is gigabytes)."""
    import os

    from clip_jax.data import coco
    from clip_jax.data.detection import category_names

    path, image_root = write_set(tmp_path)
    parsed, read = [], coco.read_annotation_json
    monkeypatch.setattr(coco, "read_annotation_json", lambda p: parsed.append(p) or read(p))
    assert category_names(str(path)) == category_names(str(path)) == NAMES
    summary = coco.annotation_summary(path)
    assert summary.boxed_category_ids == {1, 2, 3} and summary.annotations == 7 and len(parsed) == 1
    CocoDetection(path, image_root, SIZE)  # the boxes: parsed whole
    assert len(parsed) == 2 and category_names(str(path)) == NAMES and len(parsed) == 2
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "CAT"  # the same size
    path.write_text(json.dumps(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # whatever the file system's clock resolution
    assert category_names(str(path))[0] == "CAT" and len(parsed) == 3


def test_a_results_file_is_written_only_over_an_earlier_results_list(tmp_path: pathlib.Path):
    """The `coco_detection` evaluation's results_file is rewritten at every evaluation of a run: an earlier results
    list stays writable, anything else (the annotation file it scores, a workdir's config.json, a user's file) is
    refused in one line, when the config is checked and again before writing."""
    import types

    from clip_jax.config import check_input_paths, load_config
    from clip_jax.errors import ConfigError
    from clip_jax.evaluate.detection import CocoDetectionEval, check_coco_detection, run_coco_detection

    path, image_root = write_set(tmp_path)

    def entry(out, **more) -> CocoDetectionEval:
        return CocoDetectionEval(annotations=str(path), image_root=str(image_root), results_file=str(out), **more)

    earlier = tmp_path / "earlier.json"
    write_coco_results(earlier, detections_to_results(1, np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([0.5]),
                                                      np.array([2])))
    (tmp_path / "empty.json").write_text("[]")  # an evaluation that detected nothing
    for out in (tmp_path / "new.json", earlier, tmp_path / "empty.json"):
        check_coco_detection("coco", entry(out))
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"model": {}}))
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    own_files = "is where the clip_jax run in"
    refused = {path: "is one of the evaluation's inputs", tmp_path / "notes.json": "is not an earlier output",
               workdir / "config.json": own_files, workdir / "r.json": own_files,  # beside the run's files
               workdir / "checkpoints" / "r.json": own_files,
               tmp_path / "fresh" / "r.json": own_files}  # the run's own, at a first launch
    for out, expected in refused.items():
        with pytest.raises(ConfigError, match=expected) as error:
            check_coco_detection("coco", entry(out), workdir=tmp_path / "fresh")
        assert "\n" not in str(error.value) and str(error.value).startswith("evals.coco.results_file ")
    check_coco_detection("coco", entry(workdir / "coco" / "r.json"))  # a folder of its own inside the run: fine
    assert json.loads((workdir / "config.json").read_text()) == {"model": {}} and "images" in json.loads(
        path.read_text())
    with pytest.raises(ConfigError, match=r"evals.coco.novel names \['cow'\], which are not categories"):
        check_coco_detection("coco", entry(tmp_path / "new.json", novel=("cow", "cat")))
    # when the config is checked (before training), and at the evaluation itself
    config = load_config("configs/vild_shapes.py", [f"--config.evals.coco={{'type': 'coco_detection', "
                                                    f"'annotations': '{path}', 'results_file': '{path}'}}"])
    with pytest.raises(ConfigError, match="is one of the evaluation's inputs"):
        check_input_paths(config, training=False)
    method = types.SimpleNamespace(detection_queries=None, config=config)
    ctx = types.SimpleNamespace(config=config, method=method)
    with pytest.raises(ConfigError, match=own_files):
        run_coco_detection(ctx, "coco", entry(workdir / "config.json"))


def test_a_letterboxed_images_boxes_come_back_to_its_own_pixels():
    """detect's geometry: the whole image in the square (its longer side fits, the rest padded at the bottom or
    right), and a box of the square back in the original's pixels, clipped to it where it reaches the padding."""
    from PIL import Image

    from clip_jax.data.images import letterbox, letterbox_geometry
    from clip_jax.evaluate.detection import letterbox_to_original_xyxy

    assert letterbox_geometry(300, 100, 32) == (32, 11) and letterbox_geometry(100, 250, 32) == (13, 32)
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 270:] = 255  # a white band at the far right, which a centre crop leaves out
    square = letterbox(Image.fromarray(wide), 32, (1, 2, 3))
    assert square.shape == (32, 32, 3) and (square[:11, 30:] > 200).all() and (square[12:] == (1, 2, 3)).all()
    boxes = np.array([[0, 0, 1, 11 / 32], [0.5, 0, 1, 1]])  # the image's own square; a box into the padding
    np.testing.assert_allclose(letterbox_to_original_xyxy(boxes, 300, 100, 32), [[0, 0, 300, 100], [150, 0, 300, 100]])

