"""Images sorted into class folders (`root/<class>/<image>`, torchvision's ImageFolder layout) as a zero-shot
classification set: the label is the class folder's index in sorted order, the class name its folder name with "_"
as spaces. Images are found by suffix (`images.IMAGE_SUFFIXES`, in sub-folders too) and read like every other
image (`images.load_image`: regular files only, size-capped)."""

from __future__ import annotations

import itertools
import logging
import pathlib

import numpy as np

from clip_jax.data.images import DEFAULT_MAX_IMAGE_BYTES, IMAGE_SUFFIXES, image_files, load_images

log = logging.getLogger(__name__)


def classes_in_turn(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of `n` examples taken from the classes in turn (each class's first example, in order, then each one's
    second...): a subset of a set listed class by class that covers the classes evenly, the same every time."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        by_class.setdefault(label, []).append(i)
    turns = itertools.zip_longest(*by_class.values())
    return np.asarray([i for turn in turns for i in turn if i is not None][:n], np.int64)


def class_folders(root: pathlib.Path) -> list[pathlib.Path]:
    """The class folders of `root`, sorted: its sub-folders but hidden ones (.ipynb_checkpoints, .git)."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def loose_images(root: pathlib.Path) -> int:
    """How many image files lie at the top of `root`, in no class folder: left out of a class-folder set."""
    return sum(f.suffix.lower() in IMAGE_SUFFIXES for f in root.iterdir() if f.is_file())


_WARNED: set[str] = set()


def _warn_once(message: str, *args) -> None:
    """A folder's warning, once per process: the launch's check and the evaluation both open the folder (it was
    printed twice)."""
    if (text := message % args) not in _WARNED:
        _WARNED.add(text)
        log.warning(text)


class ImageFolderSource:
    def __init__(self, root: str | pathlib.Path, image_size: int, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        root = pathlib.Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder of class folders (root/<class>/<image>)")
        classes = class_folders(root)
        loose = loose_images(root)
        in_no_class = f"; its {loose} images at the top are in no class folder" if loose else ""
        if len(classes) < 2:  # one class: every image is "right", whatever the model
            held = f"one class folder, {classes[0].name}/" if classes else "no class folder"
            raise ValueError(f"{root} holds {held}{in_no_class}: zero-shot classification needs two or more "
                             "(root/<class>/<image>)")
        if loose:
            _warn_once("%s: %d images at the top are in no class folder and are not scored (root/<class>/<image>)",
                       root, loose)
        self.root, self.image_size, self.max_image_bytes = root, image_size, max_image_bytes
        self._folders = [d.name for d in classes]
        self._names = [folder.replace("_", " ") for folder in self._folders]
        self.files = [(f, label) for label, d in enumerate(classes) for f in image_files(d)]
        if not self.files:
            raise ValueError(f"{root}: its class folders hold no image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if empty := sorted(set(self._folders) - {self._folders[label] for _, label in self.files}):
            _warn_once("%s: the class folders %s hold no image: they stay classes to choose from, which no image "
                       "belongs to (remove them to leave them out)", root, empty[:5])

    def class_names(self) -> list[str]:
        return list(self._names)

    def folder_names(self) -> list[str]:
        """The class folders' names, in the labels' order."""
        return list(self._folders)

    def __len__(self) -> int:
        return len(self.files)

    def arrays(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(images uint8 [N, S, S, 3], labels int64 [N], images skipped) of all the files, or of n taken from the
        classes in turn (each class's first file, then each one's second...), so that a subset covers the classes
        evenly; an unreadable or undecodable file is skipped and counted, not fatal."""
        files = self.files
        if n and n < len(files):
            files = [files[i] for i in classes_in_turn(np.asarray([label for _, label in files]), n)]
        images, kept, skipped = load_images([path for path, _ in files], self.image_size, self.max_image_bytes)
        for message in skipped:
            log.warning("skipping %s", message)
        if not images:
            raise ValueError(f"{self.root}: no readable image")
        return np.stack(images), np.asarray([files[i][1] for i in kept], np.int64), len(skipped)
