"""Built-in procedural image-caption dataset ``shapes``.

Every example is generated on the fly from ``(seed, split, index)``: a background colour and 1-9 coloured
shapes placed in distinct cells of a 3x3 grid. Exactly one object is "large" (the salient object); its
colour-shape pair is the class label and the subject of the short caption, while the long caption describes
the background and every object with all of its attributes. A fixed set of colour-shape pairs is held out of
training so zero-shot generalisation to unseen attribute combinations can be measured.

Rendering uses numpy masks on coordinate grids (one small bounding box per object), so it is cheap enough to
feed training from a couple of CPU cores without any files on disk.

A rendering domain (``ShapesDomain``, registered in ``DOMAINS`` and chosen by ``ShapesConfig.domain``) changes
only the pixels: pixel noise, low-resolution rendering, lower contrast, unseen background colours. The scene and
captions at a given (seed, split, index) are the same in every domain, so a shifted domain is a downstream task
for few-shot adaptation whose labels match the clean one's.
"""

import dataclasses
import functools
import math
import operator

import numpy as np

from clip_jax.data.images import resize_center_crop

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
# Saturated, well separated RGB values so colour identity survives textures and small sizes.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30), "green": (40, 180, 50), "blue": (40, 80, 235), "yellow": (245, 230, 40),
    "purple": (155, 50, 205), "orange": (250, 125, 15), "white": (245, 245, 245), "cyan": (40, 225, 235),
}  # fmt: skip
_COLOUR_RGB = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=np.uint8)
# Texture "ink" is a darker shade of the object's own colour, never another palette colour.
_SHADE_RGB = (_COLOUR_RGB.astype(np.float64) * 0.62).astype(np.uint8)
_OUTLINE_RGB = np.array((15, 15, 15), dtype=np.uint8)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Radius as a fraction of the cell side. Shape areas (in radius units) span 1.6 (star) to 2.5 (circle, square),
# so a large/medium radius ratio of ~1.5 keeps even a large star >= 25% bigger in pixels than any medium
# object: the salient object is unambiguous. Small is as big as legibility at 64 px allows.
_SIZE_RADIUS = {"small": 0.24, "medium": 0.31, "large": 0.46}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right",
)  # fmt: skip
# Muted, mid-luminance backgrounds: far from every object colour, and light enough that the near-black
# outline stays visible on all of them.
BACKGROUNDS: tuple[str, ...] = ("grey", "beige", "slate", "brown")
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grey": (105, 105, 110), "beige": (175, 160, 130), "slate": (75, 95, 115), "brown": (110, 80, 60),
}  # fmt: skip
_BACKGROUND_RGB = np.array([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=np.uint8)
# Backgrounds never drawn in the clean domain: muted hues the training backgrounds lack (olive, mauve, teal, rose),
# as mid-luminance and as far (L1 >= 120) from every object colour as BACKGROUND_RGB.
UNSEEN_BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "olive": (100, 110, 50), "mauve": (135, 85, 120), "teal grey": (50, 110, 100), "dusty rose": (160, 100, 95),
}  # fmt: skip

# New splits go at the end: each split's stream is seeded with its position here. "val" (salient objects from
# the seen pairs, like "test") is an independent stream for choosing hyper-parameters without touching a test set.
# "test_novel" puts a held-out pair as any object of the scene, salient or not, with the others from all pairs: the
# dense and region methods' novel classes, which elsewhere appear only as the salient object of "test_held_out".
# "val_held_out" is "test_held_out" for the validation pairs (ShapesConfig.validation_held_out).
SPLITS: tuple[str, ...] = ("train", "test", "test_seen", "test_held_out", "val", "test_novel", "val_held_out")
# One pair per colour, no shape used more than twice: every colour keeps 5 seen shapes and every shape keeps
# at least 6 seen colours, so each attribute on its own is well covered during training.
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("green", "cross"), ("blue", "triangle"), ("yellow", "diamond"),
    ("purple", "circle"), ("orange", "square"), ("white", "circle"), ("cyan", "star"),
)  # fmt: skip
# Pairs for choosing a recipe by held-out accuracy without the test pairs: a run that also holds these out of
# training is scored on them ("val_held_out"). Drawn once with numpy's default_rng(0), one shape per colour in
# COLOURS' order, redrawn until no pair is a test pair, no shape is used more than twice, and every shape keeps at
# least 4 seen colours with the test pairs out too (the 4th draw).
VALIDATION_HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "diamond"), ("blue", "star"), ("yellow", "circle"),
    ("purple", "cross"), ("orange", "cross"), ("white", "diamond"), ("cyan", "square"),
)  # fmt: skip
# No template puts "a" directly before the class name, so "orange ..." classes read grammatically.
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of the {}.",
    "a picture of one {}.",
    "there is one {} in the image.",
    "the {}.",
    "an image of the {}.",
    "a drawing of one {}.",
)
_SHORT_TEMPLATES = ("{a_obj}.", "a picture of {a_obj}.", "there is {a_obj} in the image.",
                    "a photo of the {obj}.", "an image of one {obj}.")  # fmt: skip
_OBJECT_TEMPLATES = (
    "{a_size} {tex} {col} {shp} {pos}, {outl}",
    "{pos} there is {a_size} {col} {shp} with {tex_noun} and {outl_noun}",
    "the {col} {shp} {pos} is {size} and {tex}, {outl}",
    "{pos} you can see {a_tex} {col} {shp} of {size} size, {outl}",
    "{a_size} {shp} {pos} is coloured {col} and has {tex_noun} and {outl_noun}",
    "there is {a_col} {shp} {pos}; it is {size} and {tex}, {outl}",
)
_POSITION_PHRASES = (
    "in the top left corner", "at the top", "in the top right corner", "on the left side", "in the centre",
    "on the right side", "in the bottom left corner", "at the bottom", "in the bottom right corner",
)  # fmt: skip
_TEXTURE_NOUNS = {"solid": "a solid fill", "striped": "a striped pattern", "dotted": "a dotted pattern",
                  "checkered": "a checkered pattern"}  # fmt: skip
_OUTLINE_CLAUSES = {True: ("with a dark outline", "with a black outline", "outlined in black"),
                    False: ("with no outline", "without an outline")}  # fmt: skip
_OUTLINE_NOUNS = {True: ("a dark outline", "a black outline"), False: ("no outline",)}
_BACKGROUND_TEMPLATES = ("the background is {bg}", "the background colour is {bg}",
                         "all shapes sit on a plain {bg} background", "the picture has {a_bg} background")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_COUNT_TEMPLATES = ("there are {n} objects in total", "the image contains {n} shapes",
                    "{n} shapes are drawn in this picture")  # fmt: skip
_SINGLE_COUNT = ("there is only one object in the picture", "the image contains a single shape")


@dataclasses.dataclass(frozen=True)
class ShapesDomain:
    """How a scene's pixels are rendered. The default changes nothing (the ``clean`` domain). Every change keeps
    colour and shape identity: no hue shift towards another palette colour, no change of which object is salient.
    """

    # Standard deviation of i.i.d. Gaussian noise added to every pixel channel, in 0-255 units.
    noise_std: float = 0.0
    # Render at this fraction of the image size, then upsample (bicubic) to full size: blur and lost detail
    # (textures and outlines wash out first, shapes last).
    render_scale: float = 1.0
    # Contrast towards the background: every pixel moves to background + contrast * (pixel - background), so an
    # object's colour fades along the line to the (muted) background, never towards another object colour.
    contrast: float = 1.0
    # RGB background colours drawn from (uniformly, per image) instead of the scene's own; empty keeps the scene's.
    # Captions still name the scene's background: the shift is in the pixels only.
    backgrounds: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"noise_std must be finite and >= 0, got {self.noise_std}")
        if not 0 < self.render_scale <= 1:
            raise ValueError(f"render_scale must be in (0, 1], got {self.render_scale}")
        if not 0 < self.contrast <= 1:
            raise ValueError(f"contrast must be in (0, 1], got {self.contrast}")
        for rgb in self.backgrounds:
            if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
                raise ValueError(f"background {rgb!r} is not an RGB triple in 0-255")
            # The margin the built-in palettes keep (L1 >= 120): a background near an object colour would make
            # that object hard to see and, with reduced contrast, pull it towards the wrong colour name.
            if np.abs(_COLOUR_RGB.astype(int) - np.array(rgb)).sum(axis=1).min() < 120:
                raise ValueError(f"background {rgb!r} is too close to an object colour (L1 distance < 120)")

    @property
    def is_clean(self) -> bool:
        return self == ShapesDomain()


DOMAINS: dict[str, ShapesDomain] = {
    "clean": ShapesDomain(),
    # Calibrated with benchmarks/shapes_domain.py (benchmarks/results/shapes_domain.json): the demo model's
    # zero-shot top-1 falls from 1.00 to 0.73 on seen pairs (0.99 to 0.72 on held-out ones), while every salient
    # object stays nameable by eye. No single change does it: alone, each costs the model at most 0.05.
    "shifted": ShapesDomain(noise_std=30.0, render_scale=0.5, contrast=0.6,
                            backgrounds=tuple(UNSEEN_BACKGROUND_RGB.values())),
}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. ``jitter`` is the offset from the cell centre as a fraction (-1..1, per axis)
    of the free room left in the cell, so the object always stays inside its cell at any image size."""

    colour: str
    shape: str
    size: str
    cell: int
    texture: str = "solid"
    outline: bool = False
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclasses.dataclass(frozen=True)
class Scene:
    """Explicit scene description; ``render_example`` turns it into an image and captions."""

    background: str
    objects: tuple[ShapeObject, ...]

    @property
    def salient(self) -> ShapeObject:
        """The single large object (``validate_scene`` guarantees there is exactly one)."""
        return next(o for o in self.objects if o.size == "large")


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    seed: int = 0
    held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT  # (colour, shape) pairs
    validation_held_out: tuple[tuple[str, str], ...] = ()  # further pairs kept out of training, scored apart
    domain: str = "clean"  # a key of DOMAINS: how the pixels are rendered
    # Each example also carries captions that do not match it (`negative_captions`), from a generator of its own:
    # the rest of the example is what it is without them.
    negative_captions: bool = False

    def __post_init__(self) -> None:
        # Fail at construction so a bad experiment config is reported before any data is generated.
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (shapes are unreadable below), got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > len(POSITIONS):
            raise ValueError(f"max_objects must be <= {len(POSITIONS)} (one per grid cell), got {self.max_objects}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; expected one of {tuple(DOMAINS)}")
        for pair in self.held_out + self.validation_held_out:
            if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in SHAPES:
                raise ValueError(f"held_out pair {pair!r} is not (colour, shape) with colour in {COLOURS} "
                                 f"and shape in {SHAPES}")
        test, validation = {tuple(p) for p in self.held_out}, {tuple(p) for p in self.validation_held_out}
        if both := test & validation:
            raise ValueError(f"pairs {sorted(both)} are in both held_out and validation_held_out; a pair is one or "
                             "the other")
        if len(test | validation) == len(COLOURS) * len(SHAPES):
            raise ValueError("held_out covers every colour-shape pair; nothing is left to train on")


def class_names() -> list[str]:
    """All colour-shape classes, index = colour_index * len(SHAPES) + shape_index."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def class_index(colour: str, shape: str) -> int:
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


def validate_scene(scene: Scene) -> None:
    """Raise ValueError unless the scene is drawable and has exactly one large (salient) object."""
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; expected one of {BACKGROUNDS}")
    if not 1 <= len(scene.objects) <= len(POSITIONS):
        raise ValueError(f"a scene needs 1 to {len(POSITIONS)} objects, got {len(scene.objects)}")
    attributes = (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("texture", TEXTURES))
    for obj in scene.objects:
        for name, allowed in attributes:
            if getattr(obj, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(obj, name)!r}; expected one of {allowed}")
    cells = [o.cell for o in scene.objects]
    if any(not 0 <= c < len(POSITIONS) for c in cells) or len(set(cells)) != len(cells):
        raise ValueError(f"object cells must be distinct integers in [0, 8], got {cells}")
    # Only large-vs-medium has a pixel-area margin that holds for every shape pair (medium vs small does not).
    if [o.size for o in scene.objects].count("large") != 1:
        raise ValueError("a scene needs exactly one 'large' object so that the salient object is unambiguous")


def object_geometry(obj: ShapeObject, image_size: int) -> tuple[float, float, float]:
    """Return the object's centre (x, y) and radius in pixels."""
    cell = image_size / 3.0
    row, col = divmod(obj.cell, 3)
    radius = _SIZE_RADIUS[obj.size] * cell
    # Keep half a pixel of margin so neighbouring objects never touch.
    slack = max(0.0, cell / 2.0 - radius - 0.5)
    return (col + 0.5) * cell + obj.jitter[0] * slack, (row + 0.5) * cell + obj.jitter[1] * slack, radius


# Shape masks on coordinates (u, v) measured in object radii from the centre (v points down). Every shape
# fits inside the unit square so the radius bounds the object in both axes.
def _star(u: np.ndarray, v: np.ndarray, inner: float = 0.55) -> np.ndarray:
    # Fold the angle into one half-spike (0 = tip, pi/5 = notch) and compare the distance from the centre
    # with the distance to the straight edge from tip (1, 0) to notch along the same ray.
    sector = 2.0 * math.pi / 5.0
    a = np.mod(np.arctan2(v, u) + math.pi / 2.0, sector)
    a = np.minimum(a, sector - a)
    ex, ey = inner * math.cos(sector / 2) - 1.0, inner * math.sin(sector / 2)
    return np.hypot(u, v) * (ey * np.cos(a) - ex * np.sin(a)) <= ey


_SHAPE_MASKS = {
    "circle": lambda u, v: u * u + v * v <= 0.81,  # radius 0.9: area close to the square's
    "square": lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.77,
    "triangle": lambda u, v: (v <= 0.75) & (np.abs(u) * 1.75 <= (v + 1.0) * 0.98),
    "star": _star,
    "cross": lambda u, v: ((np.abs(u) <= 0.33) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.33) & (np.abs(u) <= 0.95)),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1.0,
}


def _texture_mask(texture: str, ix: np.ndarray, iy: np.ndarray, image_size: int) -> np.ndarray:
    """Pixels (integer offsets from the object centre) painted in the darker shade. Feature sizes scale with
    the image and are 1-3 px at 64 px, the smallest that still reads on a small object."""
    unit = max(1, round(image_size / 64))
    if texture == "striped":
        return ((ix + iy) // (2 * unit)) % 2 == 1
    if texture == "dotted":
        # Isolated single-unit dots on a 3-unit lattice: sparse enough not to look like the checkerboard.
        return ((ix // unit) % 3 == 1) & ((iy // unit) % 3 == 1)
    return ((ix // (3 * unit)) + (iy // (3 * unit))) % 2 == 1  # checkered


def _object_pixels(obj: ShapeObject, image_size: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """The object's bounding box (rows, columns) and its pixel centres (u right, v down) in object radii from the
    object's centre: `_SHAPE_MASKS[obj.shape](u, v)` is the object's mask in that box."""
    cx, cy, r = object_geometry(obj, image_size)
    x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, image_size)
    y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, image_size)
    # Pixel centres sit at +0.5; row/column vectors broadcast to the bounding box without a meshgrid.
    u = ((np.arange(x0, x1) + 0.5 - cx) / r)[None, :]
    v = ((np.arange(y0, y1) + 0.5 - cy) / r)[:, None]
    return slice(y0, y1), slice(x0, x1), u, v


def _draw_object(image: np.ndarray, obj: ShapeObject) -> None:
    size = image.shape[0]
    rows, cols, u, v = _object_pixels(obj, size)
    cx, cy, r = object_geometry(obj, size)
    fn = _SHAPE_MASKS[obj.shape]
    mask = fn(u, v)
    region = image[rows, cols]
    colour = COLOURS.index(obj.colour)
    region[mask] = _COLOUR_RGB[colour]
    if obj.texture == "solid" and not obj.outline:
        return
    # A shrunken copy of the shape: the band between it and the full mask is the outline, or, without an
    # outline, a rim of plain colour that keeps the silhouette crisp when a texture darkens edge pixels.
    scale = r / (r - max(1.2, 0.13 * r))
    inner = fn(u * scale, v * scale)
    if obj.texture != "solid":
        ix = np.arange(cols.start, cols.stop)[None, :] - round(cx)
        iy = np.arange(rows.start, rows.stop)[:, None] - round(cy)
        region[inner & _texture_mask(obj.texture, ix, iy, size)] = _SHADE_RGB[colour]
    if obj.outline:
        region[mask & ~inner] = _OUTLINE_RGB


@functools.lru_cache(maxsize=64)
def _blank_image(image_size: int, rgb: tuple[int, int, int]) -> np.ndarray:
    # Filling an image from a 3-vector broadcasts along its shortest axis, ~40 us at 96 px; copying this is ~1 us.
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = rgb
    image.flags.writeable = False
    return image


def _draw_scene(scene: Scene, image_size: int, background: np.ndarray) -> np.ndarray:
    image = _blank_image(image_size, tuple(int(c) for c in background)).copy()
    for obj in scene.objects:
        _draw_object(image, obj)
    return image


def scene_masks(scene: Scene, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The scene's per-pixel class map (0 background, else 1 + `class_index` of the object's colour-shape pair) and
    instance map (0 background, else 1 + the object's index in `scene.objects`), uint8 [image_size, image_size]. An
    object's pixels are those `render_scene` paints in the clean domain, outline included; objects never overlap."""
    validate_scene(scene)
    classes = np.zeros((image_size, image_size), np.uint8)
    instances = np.zeros((image_size, image_size), np.uint8)
    for i, obj in enumerate(scene.objects):
        rows, cols, u, v = _object_pixels(obj, image_size)
        mask = _SHAPE_MASKS[obj.shape](u, v)
        classes[rows, cols][mask] = 1 + class_index(obj.colour, obj.shape)
        instances[rows, cols][mask] = 1 + i
    return classes, instances


def scene_boxes(scene: Scene, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The tight boxes of the scene's objects, float32 [n, 4] pixel (x0, y0, x1, y1) with x1, y1 one past the last
    painted column and row (the extent of `scene_masks`' instance), and their class indices int32 [n], in the scene's
    order (the salient object is not necessarily first)."""
    _, instances = scene_masks(scene, image_size)
    boxes = np.zeros((len(scene.objects), 4), np.float32)
    for i in range(len(scene.objects)):
        rows, cols = np.nonzero(instances == i + 1)
        boxes[i] = cols.min(), rows.min(), cols.max() + 1, rows.max() + 1
    classes = np.asarray([class_index(o.colour, o.shape) for o in scene.objects], np.int32)
    return boxes, classes


def render_scene(
    scene: Scene, image_size: int = 64, domain: ShapesDomain = DOMAINS["clean"],
    domain_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Draw a scene as a uint8 [image_size, image_size, 3] array in a rendering domain. ``domain_rng`` draws
    the domain's randomness (background choice, noise); a non-clean domain needs one."""
    validate_scene(scene)
    background = _BACKGROUND_RGB[BACKGROUNDS.index(scene.background)]
    if domain.is_clean:
        return _draw_scene(scene, image_size, background)
    if domain_rng is None:
        raise ValueError("a non-clean domain needs domain_rng for its noise and background choice")
    if domain.backgrounds:
        background = np.array(domain.backgrounds[int(domain_rng.integers(len(domain.backgrounds)))], np.uint8)
    low = max(1, round(image_size * domain.render_scale))
    image = _draw_scene(scene, low, background).astype(np.float64)
    bg = background.astype(np.float64)
    image = bg + domain.contrast * (image - bg)
    if low != image_size:  # upsampled as every image of the pipeline is resized (bicubic)
        image = resize_center_crop(np.rint(image).astype(np.uint8), image_size).astype(np.float64)
    if domain.noise_std:
        image += domain_rng.normal(0.0, domain.noise_std, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def with_article(word: str) -> str:
    """"a circle", "an orange"."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _describe_object(obj: ShapeObject, rng: np.random.Generator) -> str:
    pos = _POSITION_PHRASES[obj.cell] + _pick(rng, (" of the image", " of the picture"))
    return _pick(rng, _OBJECT_TEMPLATES).format(
        a_size=with_article(obj.size), size=obj.size, tex=obj.texture, a_tex=with_article(obj.texture),
        tex_noun=_TEXTURE_NOUNS[obj.texture], col=obj.colour, a_col=with_article(obj.colour), shp=obj.shape, pos=pos,
        outl=_pick(rng, _OUTLINE_CLAUSES[obj.outline]), outl_noun=_pick(rng, _OUTLINE_NOUNS[obj.outline]),
    )  # fmt: skip


def describe_scene(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """Return (short_caption, long_caption) for a scene, with phrasing drawn from ``rng``."""
    salient = scene.salient
    name = f"{salient.colour} {salient.shape}"
    short = _pick(rng, _SHORT_TEMPLATES).format(obj=name, a_obj=with_article(name))
    n = len(scene.objects)
    count = _pick(rng, _SINGLE_COUNT) if n == 1 else _pick(rng, _COUNT_TEMPLATES).format(n=_NUMBER_WORDS[n])
    rest = [_describe_object(o, rng) for o in scene.objects if o is not salient]
    rest.append(_pick(rng, _BACKGROUND_TEMPLATES).format(bg=scene.background, a_bg=with_article(scene.background)))
    rest.append(count)
    # The salient object always leads: Long-CLIP-style training uses the first sentence as a short caption.
    sentences = [_describe_object(salient, rng)] + [rest[i] for i in rng.permutation(len(rest))]
    return short, ". ".join(sentences) + "."


_PARTIAL_TEMPLATES = (("a {col} shape.", "a {col} object.", "something {col}."),
                      ("{a_shp}.", "a picture of {a_shp}.", "the shape is {a_shp}."))  # fmt: skip


def partial_caption(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """(caption, kind): a caption naming only the salient object's colour (kind "colour") or only its shape
    ("shape"). Training on some of these teaches colour and shape as separate attributes, which is what zero-shot
    recognition of unseen pairs relies on."""
    salient = scene.salient
    kind = int(rng.integers(2))
    caption = _pick(rng, _PARTIAL_TEMPLATES[kind]).format(col=salient.colour, a_shp=with_article(salient.shape))
    return caption, ("colour", "shape")[kind]


def replaced_captions(scene: Scene, caption_state: dict, rng: np.random.Generator,
                      allowed: frozenset[tuple[str, str]]) -> dict[str, dict[str, str]]:
    """`scene_captions` of `scene` with its salient object's colour replaced ("colour") and, apart, with its shape
    replaced ("shape"), each by another that keeps the object's pair in `allowed` (the training pairs: never a
    held-out pair), drawn from `rng`. Phrased from `caption_state`, the state of the generator the true captions were
    drawn from, so that only the replaced word and its article differ."""
    salient = scene.salient
    colours = [c for c in COLOURS if c != salient.colour and (c, salient.shape) in allowed]
    shapes = [s for s in SHAPES if s != salient.shape and (salient.colour, s) in allowed]
    if not colours or not shapes:
        raise ValueError(f"{salient.colour} {salient.shape}: no other colour or no other shape makes a training "
                         "pair with it, so it has no hard negative")

    def captions_with(**replacement: str) -> dict[str, str]:
        changed = dataclasses.replace(salient, **replacement)
        objects = tuple(changed if o is salient else o for o in scene.objects)
        generator = np.random.Generator(np.random.PCG64())
        generator.bit_generator.state = caption_state
        return scene_captions(dataclasses.replace(scene, objects=objects), generator)

    return {"colour": captions_with(colour=_pick(rng, tuple(colours))),
            "shape": captions_with(shape=_pick(rng, tuple(shapes)))}


def negative_captions(scene: Scene, caption_state: dict, rng: np.random.Generator,
                      allowed: frozenset[tuple[str, str]]) -> dict[str, str]:
    """Captions that do not match `scene` (method negclip's hard negatives), keyed by the caption each stands against:
    `short_caption_negative`, `long_caption_negative`, `partial_caption_negative`. Each is that caption with the
    salient object's colour or its shape replaced (`replaced_captions`; which one drawn from `rng`, the partial
    caption's: the attribute it names)."""
    replaced = replaced_captions(scene, caption_state, rng, allowed)
    full = replaced["shape" if rng.random() < 0.5 else "colour"]
    partial = replaced[replaced["colour"]["partial_caption_kind"]]
    return {"short_caption_negative": full["short_caption"], "long_caption_negative": full["long_caption"],
            "partial_caption_negative": partial["partial_caption"]}


def render_example(
    scene: Scene, image_size: int, rng: np.random.Generator, domain: ShapesDomain = DOMAINS["clean"],
    domain_rng: np.random.Generator | None = None,
) -> dict:
    """Image, captions, label and the scene itself (what a method may render besides the image, e.g. AudioCLIP's
    sound) for an explicit scene (e.g. hand-built hard pairs). Captions are drawn from
    ``rng``; the domain's pixel randomness from ``domain_rng``, so the captions do not depend on the domain."""
    image = render_scene(scene, image_size, domain, domain_rng)
    label = np.int32(class_index(scene.salient.colour, scene.salient.shape))
    return {"image": image, **scene_captions(scene, rng), "label": label, "scene": scene}


def scene_captions(scene: Scene, rng: np.random.Generator) -> dict[str, str]:
    """A scene's captions (`render_example`'s), drawn from `rng` alone: the image takes nothing from it."""
    short, long = describe_scene(scene, rng)
    partial, kind = partial_caption(scene, rng)  # drawn last: the other captions do not depend on it
    return {"short_caption": short, "long_caption": long, "partial_caption": partial, "partial_caption_kind": kind}


class ShapesDataset:
    """Random-access source (usable with ``grain.MapDataset.source``) of procedural shape scenes."""

    def __init__(self, config: ShapesConfig, split: str, num_examples: int = 2**31 - 1):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        self.config = config
        self.split = split
        self.num_examples = num_examples
        held = {class_index(c, s) for c, s in config.held_out}
        validation = {class_index(c, s) for c, s in config.validation_held_out}
        self._held_out = np.array(sorted(held), dtype=np.int64)
        self._validation = np.array(sorted(validation), dtype=np.int64)
        self._seen = np.array([i for i in range(len(COLOURS) * len(SHAPES)) if i not in held | validation],
                              dtype=np.int64)
        if split in ("test_held_out", "test_novel") and not len(self._held_out):
            raise ValueError(f"split {split!r} needs a non-empty config.held_out")
        if split == "val_held_out" and not len(self._validation):
            raise ValueError("split 'val_held_out' needs a non-empty config.validation_held_out")
        self._seen_pairs = frozenset((COLOURS[i // len(SHAPES)], SHAPES[i % len(SHAPES)]) for i in self._seen)
        pools = {"test_held_out": self._held_out, "val_held_out": self._validation}
        self._salient_pool = pools.get(split, self._seen)
        self.domain = DOMAINS[config.domain]

    def __len__(self) -> int:
        return self.num_examples

    def captions(self, index: int) -> dict[str, str]:
        """Item `index`'s captions without its image: a tokenizer's corpus reads thousands (0.2 ms an item less)."""
        rng = self._rng(index)
        return scene_captions(self._sample_scene(rng), rng)

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        # The clean domain draws nothing from the domain's generator: not seeding one saves ~25 us an example.
        domain_rng = None if self.domain.is_clean else self._domain_rng(index)
        scene = self._sample_scene(rng)
        negatives = self.config.negative_captions
        # the image draws nothing from `rng`: this is the captions' state (read only where negatives need it)
        caption_state = rng.bit_generator.state if negatives else None
        example = render_example(scene, self.config.image_size, rng, self.domain, domain_rng)
        if negatives:
            example.update(negative_captions(scene, caption_state, self._rng(index, 2), self._seen_pairs))
        return example

    def replaced_captions(self, index: int) -> dict[str, dict[str, str]]:
        """Item `index`'s captions with its salient object's colour, and apart its shape, replaced: the two its
        negative captions (`data.negative_captions`) are drawn from."""
        rng = self._rng(index)
        scene = self._sample_scene(rng)
        return replaced_captions(scene, rng.bit_generator.state, self._rng(index, 2), self._seen_pairs)

    def scene(self, index: int) -> Scene:
        """The scene description that ``self[index]`` renders."""
        return self._sample_scene(self._rng(index))

    def image(self, index: int, domain: ShapesDomain | None = None) -> np.ndarray:
        """``self[index]``'s image rendered in ``domain`` (default: this dataset's) with the same scene and pixel
        randomness: compares candidate domains on identical examples without registering them in DOMAINS."""
        domain = self.domain if domain is None else domain
        return render_scene(self.scene(index), self.config.image_size, domain, self._domain_rng(index))

    def masks(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The class and instance maps of ``self[index]`` (``scene_masks``) at this dataset's image size."""
        return scene_masks(self.scene(index), self.config.image_size)

    def render(self, scene: Scene, caption_seed: int = 0) -> dict:
        """Render an explicit scene at this dataset's image size and domain; captions (and the domain's pixel
        randomness, from a separate stream) are drawn from ``caption_seed``."""
        return render_example(scene, self.config.image_size, np.random.default_rng(caption_seed), self.domain,
                              np.random.default_rng([caption_seed, 1]))

    def class_names(self) -> list[str]:
        return class_names()

    def held_out_classes(self) -> list[int]:
        return [int(i) for i in self._held_out]

    def seen_classes(self) -> list[int]:
        return [int(i) for i in self._seen]

    def _rng(self, index: int, *stream: int) -> np.random.Generator:
        index = operator.index(index)
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        # Seeding with the split id gives every split its own independent stream for the same index. A trailing
        # stream id gives a separate generator per purpose (1: the domain's pixel randomness, 2: the negative
        # captions' replacements), so the scene and captions, drawn from the plain stream, are the same in every domain.
        return np.random.default_rng([self.config.seed, SPLITS.index(self.split), index, *stream])

    def _domain_rng(self, index: int) -> np.random.Generator:
        return self._rng(index, 1)

    def _sample_scene(self, rng: np.random.Generator) -> Scene:
        cfg = self.config
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        cells = rng.permutation(len(POSITIONS))[:n]
        if self.split == "test_novel":
            pairs = rng.integers(len(COLOURS) * len(SHAPES), size=n)
            pairs[rng.integers(n)] = self._held_out[rng.integers(len(self._held_out))]
        else:
            # Non-salient objects always come from seen pairs: held-out pairs only ever appear as the salient
            # object of the test_held_out and val_held_out splits (and as any object of test_novel).
            pairs = np.concatenate([self._salient_pool[rng.integers(len(self._salient_pool), size=1)],
                                    self._seen[rng.integers(len(self._seen), size=n - 1)]])
        sizes = np.concatenate([[2], rng.integers(0, 2, size=n - 1)])  # only the salient one is large
        textures = rng.integers(len(TEXTURES), size=n)
        outlines = rng.random(n) < 0.5
        jitter = rng.uniform(-1.0, 1.0, size=(n, 2))
        objects = tuple(
            ShapeObject(colour=COLOURS[p // len(SHAPES)], shape=SHAPES[p % len(SHAPES)], size=SIZES[s],
                        cell=int(c), texture=TEXTURES[t], outline=bool(o), jitter=(float(j[0]), float(j[1])))
            for p, s, c, t, o, j in zip(pairs, sizes, cells, textures, outlines, jitter, strict=True)
        )  # fmt: skip
        return Scene(background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], objects=objects)
