"""A workdir's model from Python: load it once, then embed images and texts, or classify images zero-shot.

    import clip_jax

    model = clip_jax.load("workdirs/demo")               # the latest checkpoint; step=N for another
    image_emb = model.encode_images(["a.png", pil_image, uint8_array])   # float32 [3, D], unit rows
    text_emb = model.encode_texts(["a red circle.", "a blue star."])      # float32 [2, D], unit rows
    names, probs = model.classify(["a.png"], ["red circle", "blue star"])  # probs [1, 2], rows sum to 1
    labels, masks = model.segment(["a.png"], ["red circle", "blue star"])  # masks uint8 [1, S, S], 0 background
    boxes = model.detect(["a.png"], ["red circle", "blue star"])  # a ViLD or GLIP run: a list of boxes per image
    audio_emb = model.encode_audio(["a.wav", waveform])  # an AudioCLIP run: float32 [2, D], unit rows

A workdir is a `clip-jax train` run or one that `clip-jax convert` wrote from an OpenAI, open_clip or Hugging Face
checkpoint. These are the functions behind `clip-jax encode`, `classify`, `segment` and `detect`, with one
difference: an image that cannot be read is an error naming it (row i of a result is input i), where the commands
skip it with a warning.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from clip_jax.host_memory import keep_freed_memory

ImageInput = str | os.PathLike | Image.Image | np.ndarray


class Model:
    """A trained model read back from its workdir, with its tokenizer (`load`). `trained` holds the rest: its
    config, method, Flax module, parameters on their mesh, and step."""

    def __init__(self, trained: Any, batch_size: int = 256) -> None:
        from clip_jax.evaluate.encoder import Encoder

        self.trained = trained
        self.encoder = Encoder(trained.model, trained.params, trained.mesh, batch_size)
        # The last zero-shot class names' embeddings: a loop of classify calls over one class list (1,000 classes x
        # 80 templates are 80,000 prompts) encodes them once.
        self._class_embeds: tuple[tuple, np.ndarray] | None = None  # ((names, templates), embeddings)

    @property
    def image_size(self) -> int:
        return self.trained.config.model.vision.image_size

    @property
    def context_length(self) -> int:
        return self.trained.config.model.text.context_length

    @property
    def logit_scale(self) -> float:
        """The temperature that `classify` multiplies the cosine similarities by (`classify.temperature`)."""
        from clip_jax.evaluate.classify import temperature

        return temperature(self.trained)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [N, context_length] token ids of N texts as `encode_texts` reads them (cut to the context, EOT
        last)."""
        if isinstance(texts, str):
            raise TypeError("give a list of texts, not one string")
        texts = list(texts)  # a numpy array of strings too
        if not texts:
            raise ValueError("no texts given")
        wrong = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if wrong is not None:
            raise TypeError(f"text {wrong}: expected a str, got {type(texts[wrong]).__name__}")
        return self.trained.tokenizer([str(t) for t in texts], self.context_length)  # numpy's str_ to str

    def preprocess(self, images: Sequence[ImageInput] | np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] at the model's image size S, by CLIP's evaluation transform (shorter side resized to
        S, bicubic, then the centre square): from image files, PIL images of any mode, uint8 arrays (RGB [H, W, 3],
        grayscale [H, W] or RGBA [H, W, 4]), or one uint8 array [N, H, W, 3]. An image is made RGB first, then
        resized (open_clip resizes first and converts after: the same pixels for RGB and grayscale images, other
        ones for RGBA, palette and CMYK images, whose conversion does not commute with the resize)."""
        return np.concatenate(list(self._preprocessed(images)))

    def _preprocessed(self, images: Sequence[ImageInput] | np.ndarray) -> Iterator[np.ndarray]:
        """`preprocess` of a chunk of images at a time (`image_chunk_size`: about IMAGE_CHUNK, whole batches), each
        decoded on a thread per core: what the encode and classify calls hold at once, whatever the number of
        images."""
        from clip_jax.data.images import decode_threads

        with ThreadPoolExecutor(decode_threads()) as pool:
            for start, chunk in self._chunks(images):
                pixels = pool.map(lambda item: self._pixels(*item), enumerate(chunk, start))
                yield np.stack(list(pixels))  # the first error, in input order

    def _chunks(self, images: Sequence[ImageInput] | np.ndarray) -> Iterator[tuple[int, list[ImageInput]]]:
        """(the index of its first image, a chunk of the images) of about IMAGE_CHUNK images (`image_chunk_size`,
        whole batches) at a time; the PIL images among them read (one object may be given twice)."""
        from clip_jax.data.images import image_chunk_size

        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if isinstance(images, str | os.PathLike | Image.Image) or (isinstance(images, np.ndarray) and images.ndim < 4):
            raise TypeError("give a list of images (or a uint8 array [N, H, W, 3]), not one image")
        images = list(images)
        if not images:
            raise ValueError("no images given")
        chunk_size = image_chunk_size(self.encoder.batch_size)
        for start in range(0, len(images), chunk_size):
            chunk = images[start:start + chunk_size]
            for image in chunk:  # a PIL image opened lazily is read here
                if isinstance(image, Image.Image):
                    image.load()
            yield start, chunk

    def _pixels(self, i: int, image: ImageInput) -> np.ndarray:
        """uint8 [S, S, 3] of input `i`; ValueError naming it (its file, or its index) if it cannot be one."""
        from clip_jax.data.images import load_image, resize_center_crop

        if isinstance(image, str | os.PathLike):
            return load_image(image, self.image_size)  # a ValueError naming the file if unreadable
        return resize_center_crop(self._rgb(i, image), self.image_size)

    def _rgb(self, i: int, image: ImageInput) -> Image.Image:
        """Input `i` as an RGB PIL image; TypeError or ValueError naming it (its file, or its index)."""
        from clip_jax.data.images import load_rgb, rgb_image

        if isinstance(image, str | os.PathLike):
            return load_rgb(image)  # a ValueError naming the file if unreadable
        if not isinstance(image, Image.Image):
            if image is None or isinstance(image, bytes | dict):  # as an array: "object []"
                raise TypeError(f"image {i}: expected a file path, a PIL image or a uint8 array, got "
                                f"{type(image).__name__}" + (" (the file's bytes: give its path, or "
                                                              "PIL.Image.open(io.BytesIO(data)))"
                                                              if isinstance(image, bytes) else ""))
            array = np.asarray(image)
            if array.ndim == 3 and array.shape[-1] == 1:  # [H, W, 1]: grayscale, as [H, W] is
                array = array[..., 0]
            if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
                raise ValueError(f"image {i}: expected uint8 [H, W, 3] (RGB), [H, W] or [H, W, 4], got "
                                 f"{array.dtype} {list(array.shape)}{_array_hint(array)}")
            if 0 in array.shape:
                raise ValueError(f"image {i}: an empty array {list(array.shape)}")
            image = Image.fromarray(array)
        return rgb_image(image)

    def encode_images(self, images: Sequence[ImageInput] | np.ndarray) -> np.ndarray:
        """float32 [N, D] L2-normalised embeddings of N images (any of `images`' kinds)."""
        return np.concatenate([self.encoder.images(pixels) for pixels in self._preprocessed(images)])

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, D] L2-normalised embeddings of N texts; a text longer than the model's context is cut to it."""
        return self.encoder.texts(self.tokenize(texts))

    def encode_audio(self, sounds: Sequence[str | os.PathLike | np.ndarray] | np.ndarray) -> np.ndarray:
        """float32 [N, D] L2-normalised embeddings of N sounds, for a model with an audio tower (an AudioCLIP run):
        WAV files, read as `clip-jax encode --audio` reads them (mono, resampled to the model's rate), or float
        waveforms in [-1, 1] at the model's rate (a [N, T] array, or a list of 1-D arrays); each cut or zero-padded
        to the model's `num_samples`. An unreadable file is an error naming it."""
        if "audio" not in self.trained.config.model:
            raise ValueError("this model has no audio tower; encode_audio needs an AudioCLIP run's "
                             "(docs/audioclip.md)")
        from clip_jax.data.audio import fit_length, read_wav
        from clip_jax.evaluate.audio import audio_config

        audio = audio_config(self.trained.config)
        if isinstance(sounds, str | os.PathLike) or (isinstance(sounds, np.ndarray) and sounds.ndim < 2):
            raise TypeError("give a list of sounds (or a float array [N, T]), not one sound")
        sounds = list(sounds)
        if not sounds:
            raise ValueError("no sounds given")
        waveforms = np.zeros((len(sounds), audio.num_samples), np.float32)
        for i, sound in enumerate(sounds):
            if isinstance(sound, str | os.PathLike):
                waveforms[i] = read_wav(sound, audio.sample_rate, audio.num_samples)
                continue
            wave = np.asarray(sound)
            if wave.ndim != 1 or wave.dtype.kind != "f":
                raise ValueError(f"sound {i}: expected a WAV file's path or a 1-D float waveform, got {wave.dtype} "
                                 f"{list(wave.shape)}")
            waveforms[i] = fit_length(wave, audio.num_samples)
        return self.encoder.audio(waveforms)

    def classify(self, images: Sequence[ImageInput] | np.ndarray, class_names: Sequence[str] | None = None,
                 classes: str = "all", templates: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
        """(class names, probabilities float32 [N, C]) of N images. With `class_names`, zero-shot CLIP over them:
        each name in `templates` (default: `data.classification.name_templates`: the run's `few_shot.templates`,
        which a converted model's sets to "a photo of a {}.", else the shapes prompts for a run on shapes, else
        "a photo of a {}."), the templates' embeddings averaged,
        softmax of the model's temperature times the cosine similarities. Without, a few-shot method's own classes
        (`classes`: "all", "base" or "new"), as `clip-jax classify`."""
        from scipy.special import softmax

        from clip_jax.evaluate.classify import class_scores, requested_classes, zero_shot_embeddings

        if isinstance(class_names, str):
            raise TypeError("give a list of class names, not one string")
        class_names = None if class_names is None else list(class_names)
        if isinstance(templates, str):
            raise TypeError("give a list of templates, not one string")
        # refused before the images are read
        request = requested_classes(self.trained, classes, class_names, templates=templates)
        embeds = None
        if request.few_shot is None:
            key = (request.names, request.templates)
            if self._class_embeds is None or self._class_embeds[0] != key:
                self._class_embeds = key, zero_shot_embeddings(self.trained, self.encoder, request)
            embeds = self._class_embeds[1]
        logits = np.concatenate([np.asarray(class_scores(self.trained, self.encoder, pixels, request, embeds))
                                 for pixels in self._preprocessed(images)])
        return list(request.names), softmax(logits.astype(np.float32), axis=-1)


    def segment(self, images: Sequence[ImageInput] | np.ndarray, labels: Sequence[str], background: str | None = None,
                threshold: float | None = None, templates: Sequence[str] | None = None
                ) -> tuple[list[str], np.ndarray]:
        """(the names of the mask values, uint8 masks [N, S, S]) of N images, as `clip-jax segment`: each pixel of
        the centre square (`preprocess`'s) labelled 1..L by `labels`, 0 the background: LSeg's own label, or for
        the others (`background="threshold"`) the pixels whose best label is less probable than `threshold` (0.5).
        The labels are prompted as the run trained unless `templates` are given. A run that is neither LSeg nor
        GroupViT segments with its CLIP's patch features (the training-free baseline)."""
        from clip_jax.data.segmentation import BACKGROUND
        from clip_jax.evaluate.segmentation import label_request, predict_labels

        if isinstance(labels, str):
            raise TypeError("give a list of labels, not one string")
        if isinstance(templates, str):
            raise TypeError("give a list of templates, not one string")
        request = label_request(self.trained, lambda t: self.encoder.texts(self.tokenize(t)), list(labels),
                                background, threshold, templates, python=True)
        masks = [predict_labels(*self.encoder.segment(pixels, request.embeddings), request.threshold)
                 for pixels in self._preprocessed(images)]
        return [BACKGROUND, *request.labels], np.concatenate(masks).astype(np.uint8)

    def detect(self, images: Sequence[ImageInput] | np.ndarray, queries: Sequence[str], min_score: float = 0.3,
               max_detections: int = 100) -> list[list[dict]]:
        """The boxes of N images, as `clip-jax detect` (a ViLD or GLIP run): for each image a list of {"label",
        "score", "box_xyxy"}, best first, the box in the image's own pixels (x0, y0, x1, y1). The model sees each
        whole image, letterboxed (its longer side fitted, the rest padded in the model's mean colour)."""
        from clip_jax.data.images import letterbox
        from clip_jax.errors import ConfigError
        from clip_jax.evaluate.detection import (
            detect,
            in_original_pixels,
            letterbox_extent,
            letterbox_fill,
            prepared_queries,
        )

        if isinstance(queries, str):
            raise TypeError('give a list of queries, not one string (the command\'s ". "-separated form)')
        queries = list(queries)
        if not queries or len(set(queries)) != len(queries):
            raise ConfigError(f"queries= needs one name or more, each once, got {queries}")
        if not 0 <= min_score < 1 or max_detections < 1:
            raise ConfigError(f"min_score must be in [0, 1) and max_detections >= 1, got {min_score} and "
                              f"{max_detections}")
        prepared = prepared_queries(self.trained, lambda t: self.encoder.texts(self.tokenize(t)), queries, "queries=")
        fill, found = letterbox_fill(self.trained.config), []
        for start, chunk in self._chunks(images):
            pictures = [self._rgb(i, image) for i, image in enumerate(chunk, start)]
            pixels = np.stack([letterbox(p, self.image_size, fill) for p in pictures])
            extents = [letterbox_extent(p.width, p.height, self.image_size) for p in pictures]
            for det, picture in zip(detect(self.encoder, prepared, pixels, extents, max_detections=max_detections,
                                           min_score=min_score), pictures, strict=True):
                found.append(in_original_pixels(det, queries, picture.width, picture.height, self.image_size))
        return found


def _array_hint(array: np.ndarray) -> str:
    """How to make an array the image `preprocess` takes, where the usual mistakes show."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (3, 4):
        return " (channels first, as torch keeps them: give array.transpose(1, 2, 0))"
    if np.issubdtype(array.dtype, np.floating):
        return " (a float image in [0, 1]: give (array * 255).round().astype(np.uint8))"
    if np.issubdtype(array.dtype, np.integer) and array.dtype.itemsize > 1:
        return " (more than 8 bits: scale it to 0-255 and give .astype(np.uint8), or give a PIL image)"
    return ""


def load(workdir: str | os.PathLike, step: int | None = None, batch_size: int = 256, dtype: str | None = None
         ) -> Model:
    """The model of `workdir` at its latest checkpoint (or `step`), on every local device; `batch_size` examples
    per device call. `dtype`: the compute dtype, "float32", "bfloat16" or "float16" (the parameters stay float32),
    by default the run's: a bfloat16 run's embeddings differ from a float32 model's by bfloat16's rounding, so compare
    with PyTorch in "float32". FileNotFoundError if `workdir` is not a workdir or has no checkpoint."""
    from clip_jax.config import COMPUTE_DTYPES

    if step is not None and (isinstance(step, bool) or not isinstance(step, int | np.integer)):
        raise TypeError(f"step must be an int (a checkpoint's step), got {type(step).__name__} {step!r}")
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    keep_freed_memory()  # on the CPU, before JAX starts (it does nothing after): host_memory.py says why
    from clip_jax.train.loop import load_trained

    def compute_in(config) -> None:
        if dtype is not None:
            config.model.dtype = dtype

    return Model(load_trained(workdir, None if step is None else int(step), adjust=compute_in), batch_size)
