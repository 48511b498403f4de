"""TFDS evaluation sources (tfds.data_source, no TensorFlow) on tfds.testing.mock_data: items in our eval format,
class names from the dataset's features, captions from a Sequence of Text. Skipped without tensorflow-datasets."""

import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from clip_jax.data.tfds_source import TfdsEvalSource, classification_arrays, retrieval_arrays  # noqa: E402

SIZE = 24


class CaptionedToy(tfds.core.GeneratorBasedBuilder):
    """A captioned set laid out like coco_captions (captions/text), defined here: mock_data generates its data."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
        }))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {}


def mock(n):
    return tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE)


def test_classification_items_and_class_names():
    with mock(5):
        source = TfdsEvalSource("oxford_iiit_pet", "test", SIZE)
        raw = source.source[0]
        item = source[0]
    assert source.kind == "classification" and len(source) == 5
    assert item["image"].shape == (SIZE, SIZE, 3) and item["image"].dtype == np.uint8
    assert item["label"] == int(raw["label"])  # the breed label, not the species one
    names = source.class_names()
    assert len(names) == 37 and "american bulldog" in [n.lower() for n in names]  # "_" -> " "
    assert "tensorflow" not in sys.modules


def test_grayscale_images_become_rgb_and_arrays_stack():
    with mock(4):
        source = TfdsEvalSource("mnist", "test", SIZE)
        images, labels = classification_arrays(source)
        first = source.source[0]["image"]
    assert images.shape == (4, SIZE, SIZE, 3) and labels.shape == (4,) and labels.dtype == np.int64
    assert first.shape[-1] == 1
    np.testing.assert_array_equal(images[0][..., 0], images[0][..., 1])  # channels are the gray copy
    assert source.class_names() == [str(i) for i in range(10)]


def test_class_name_override_and_wordnet_ids():
    with mock(2):
        with pytest.raises(ValueError, match="WordNet"):
            TfdsEvalSource("imagenet2012", "validation", SIZE).class_names()
        names = [f"class {i}" for i in range(1000)]
        assert TfdsEvalSource("imagenet2012", "validation", SIZE, class_names=names).class_names() == names
        with pytest.raises(ValueError, match="3 class names for 1000"):
            TfdsEvalSource("imagenet2012", "validation", SIZE, class_names=["a", "b", "c"])


def test_captioned_set():
    with mock(3):
        source = TfdsEvalSource("captioned_toy", "test", SIZE)
        raw = [source.source[i] for i in range(3)]
        images, captions, owner = retrieval_arrays(source)
    assert source.kind == "captions"
    expected = [(i, t if isinstance(t, str) else t.decode()) for i, r in enumerate(raw) for t in r["captions"]["text"]]
    expected = [(i, t) for i, t in expected if t.strip()]
    assert captions == [t for _, t in expected]
    np.testing.assert_array_equal(owner, [i for i, _ in expected])
    assert images.shape == (3, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="no class names"):
        source.class_names()


def test_a_misspelt_or_unprepared_dataset_is_named(tmp_path):
    """TFDS's own errors named neither mistake: a misspelt name listed every builder, and a dataset never prepared
    in data_dir said that "FileFormat.TFRECORD is not supported"."""
    with pytest.raises(ValueError, match=r"^TFDS has no dataset named 'mnistt' \(tfds.list_builders"):
        TfdsEvalSource("mnistt", "test", SIZE, data_dir=str(tmp_path))
    with pytest.raises(ValueError) as error:
        TfdsEvalSource("mnist", "test", SIZE, data_dir=str(tmp_path))
    assert str(error.value).startswith(f"TFDS mnist is not prepared in {tmp_path}/mnist/")
    assert f"tfds build mnist --file_format=array_record --data_dir {tmp_path}" in str(error.value)
