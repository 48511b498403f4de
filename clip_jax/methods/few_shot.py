"""Few-shot transfer on a frozen CLIP (docs/few_shot.md): CoOp, CLIP-Adapter, Tip-Adapter(-F) and the linear probe.

Each trains a small `learner` beside CLIP's frozen towers (`FewShotCLIP`) on the K-shot sample of
`config.few_shot` (clip_jax/data/classification.py) with cross-entropy over the training classes. The run starts
from a CLIP workdir (`config.init_from`): its towers and temperature are read from there (`base_params`), the
learner is initialised, partly from that CLIP (`init_learner`). The image tower is frozen and the examples are not
augmented, so their image embeddings are computed once before training (`prepare`, kept in the workdir) and the
batch holds them (`features`): a step costs what the learner costs. A learner that enters the image tower (MaPLe,
prompt_learning.py) or trains it (WiSE-FT, wise_ft.py) gets the images instead (`inputs`). What differs between the
methods is the learner, how the classes enter it (`class_inputs`, host arrays for a list of classes) and the logits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.data.classification import (
    FewShotTask,
    class_change,
    class_embeddings,
    few_shot_task,
    recorded_task,
)
from clip_jax.data.pipeline import array_iterator
from clip_jax.errors import ConfigError, UnscorableClasses
from clip_jax.losses import classification_loss
from clip_jax.methods.base import Field, Method, Preparation, StepFns, cached_arrays
from clip_jax.models import flops
from clip_jax.models.clip import CLIP, CLIPConfig, l2_normalize
from clip_jax.sharding import match_any

log = logging.getLogger(__name__)

# The parameters a few-shot run reads from the CLIP it starts from, and keeps frozen (the optimizer.frozen rule).
CLIP_PARAMS = ("visual", "text", "logit_scale", "logit_bias")
FROZEN = (rf"^({'|'.join(CLIP_PARAMS)})/?",)


class FewShotCLIP(CLIP):
    """CLIP with the method's trainable part beside the towers: parameters `visual`, `text`, `logit_scale` as in CLIP,
    and `learner/...`."""

    learner: nn.Module | None = None

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        out = super().__call__(images, tokens)
        self.learner(out["image"])  # every learner takes the image embeddings (and may ignore them): its init
        return out


class FewShotMethod(Method):
    """The shared part of the few-shot methods (module docstring). Subclasses give `learner`, `class_inputs`,
    `logits` and, if the learner starts from data, `init_learner`."""

    fine_tunes = needs_pretrained = True
    reads_data = False  # the K-shot sets of `few_shot`
    fixed_groups = ("model", "few_shot")  # the K-shot embeddings are cached in the workdir
    # What the batch and `logits` get of an example: "features", its normalised image embedding by the frozen image
    # tower (computed once), or "images", the uint8 image itself, for a learner that enters the image tower (MaPLe's
    # vision prompts) or trains it (WiSE-FT).
    inputs: ClassVar[str] = "features"
    # (an export is the run's CLIP: without its learner it classifies zero-shot, not as the run does)
    export_leaves = ("this few-shot run's learner (its classes' prompts, adapter, cache or head) has",
                     "clip-jax classify --workdir and eval use it")

    def __init__(self, config):
        super().__init__(config)
        self.prep: Preparation | None = None
        self.train_arrays: dict[str, np.ndarray] = {}
        self._class_embeddings: dict[tuple[int, ...], np.ndarray] = {}

    @functools.cached_property
    def task(self) -> FewShotTask:
        try:
            return few_shot_task(self.config)
        except ConfigError as e:
            recorded, problem = self._recorded_classes(), str(e)
            if recorded is None:
                raise
        # A reader (classify) of a trained run whose sets have moved: the classes it recorded are all it needs.
        log.warning("%s; its classes are read from the run's record instead, which is all that classifying needs "
                    "(an evaluation needs the sets)", problem)
        return recorded_task(self.config, recorded, problem.removeprefix("few_shot: "))

    def _recorded_classes(self) -> list[str] | None:
        """The class names a trained run recorded (`prepare`), for a reader; None for a training launch, which
        reads the sets, or a run without a record (trained by an earlier version)."""
        prep = self.prep
        if prep is None or prep.training or prep.workdir is None:
            return None
        for name in ("few_shot_train.npz", "few_shot_classes.npz"):
            if (record := prep.workdir / name).exists():
                with record.open("rb") as f:
                    stored = np.load(f)
                    return stored["class_names"].tolist() if "class_names" in stored else None
        return None

    # --- the pieces a few-shot method gives ----------------------------------------------------------------------
    def learner(self) -> nn.Module:
        raise NotImplementedError

    def class_inputs(self, classes: Sequence[int]) -> dict[str, np.ndarray]:
        """Host arrays describing the classes `classes` (indices into the task's class names) to `logits`."""
        raise NotImplementedError

    def logits(self, model: FewShotCLIP, classes: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
               ) -> jax.Array:
        """[B, C] scores of the batch's examples (`features`: normalised image embeddings, or `images`: uint8, see
        `inputs`) for the classes; runs inside `model.apply`, so it reaches `model.learner`, `model.encode_text`,
        `model.encode_image`, `model.temperature`."""
        raise NotImplementedError

    def init_learner(self, learner: Any, clip: Mapping[str, Any]) -> Any:
        """The learner's initial parameters, given its random ones and the CLIP parameters the run starts from."""
        return learner

    def check_prompts(self) -> None:
        """A ConfigError, before any work, for a class the run will score that its prompts cannot hold (a learned
        prompt's class name that does not fit the context: found at the end of training, the run's steps were
        lost). Nothing to check for methods whose prompts are the templates' (CLIP's own truncation)."""

    # --- the method contract -------------------------------------------------------------------------------------
    def model_config(self) -> CLIPConfig:
        return CLIPConfig.from_dict(self.config.model.to_dict())

    def model(self) -> FewShotCLIP:
        return FewShotCLIP(self.model_config(), self.learner())

    def fields(self) -> dict[str, Field]:
        if self.inputs == "images":
            size = self.config.model.vision.image_size
            return {"images": Field((size, size, 3), np.uint8), "label": Field((), np.int32)}
        return {"features": Field((self.config.model.embed_dim,), np.float32), "label": Field((), np.int32)}

    def init_inputs(self) -> tuple[np.ndarray, ...]:
        size = self.config.model.vision.image_size
        return (np.zeros((1, size, size, 3), np.uint8), np.zeros((1, self.config.model.text.context_length), np.int32))

    def check(self, mesh) -> None:
        frozen = tuple(self.config.optimizer.frozen)
        if not all(any(p == f for f in frozen) for p in FROZEN):
            raise ConfigError(f"method {self.name} trains its learner on a frozen CLIP: set "
                              f"--config.optimizer.frozen=\"{FROZEN}\" (the image embeddings are computed once)")

    def prepare(self, prep: Preparation) -> None:
        self.prep = prep
        if prep.training:  # a reader of a run trained before this check may still classify its base classes
            self.check_prompts()
        train = self.task.train
        settings = json.dumps(self.config.few_shot.to_dict(), sort_keys=True, default=list)

        def embed() -> dict[str, np.ndarray]:
            features = prep.encode_images(train.read(range(len(train))))
            return {"features": features.astype(np.float32), "label": train.labels.astype(np.int32)}

        def classes_changed(stored: dict[str, np.ndarray]) -> str:
            # The same settings, other files: a class folder added or removed, a names file edited. The labels of
            # the run's learner would name other classes.
            return (f"{prep.workdir} was trained on other classes than few_shot's sets now hold "
                    f"({class_change(stored['class_names'].tolist(), self.task.class_names)}): restore the sets "
                    "(folders, names file) it was trained on, or train a new run")

        classes = {"class_names": np.asarray(self.task.class_names, dtype=str)}
        if self.inputs == "images":
            # The K x C images are read (or rendered) by train_data, on every launch, as data would be; `eval` and
            # `classify` read none. The classes are recorded all the same, when the run starts: a resumed run
            # without a record (trained by an earlier version) would record the folders as they are now.
            if prep.resumed and prep.workdir is not None and not (prep.workdir / "few_shot_classes.npz").exists():
                return
            cached_arrays(prep, "few_shot_classes.npz", settings, dict, "the classes of few_shot settings", classes,
                          classes_changed)
            return
        self.train_arrays = cached_arrays(prep, "few_shot_train.npz", settings, embed,
                                          "the K-shot embeddings of few_shot settings", classes, classes_changed)

    def train_data(self, config, tokenizer, rows) -> Iterator[dict]:
        if self.inputs == "images" and not self.train_arrays:
            train = self.task.train
            self.train_arrays = {"images": train.read(range(len(train))), "label": train.labels.astype(np.int32)}
        # The labels become column indices of the logits: the position of the class among the (sorted) base classes.
        labels = np.searchsorted(self.task.base, self.train_arrays["label"]).astype(np.int32)
        return array_iterator({**self.train_arrays, "label": labels}, config.batch_size, rows, config.seed)

    def base_params(self, params):
        return {k: v for k, v in params.items() if k in CLIP_PARAMS}

    def warm_start(self, restored, initial):
        return {**restored, "learner": self.init_learner(initial["learner"], restored)}

    def step_fns(self, model: FewShotCLIP) -> StepFns:
        classes = jax.tree.map(jnp.asarray, self.class_inputs(self.task.base))

        def embed(params, batch, rng):
            del rng
            logits = model.apply({"params": params}, classes, batch, method=self.logits)
            return {"logits": logits}

        return StepFns(embed=embed, shared=lambda params: {}, loss=classification_loss,
                       targets=lambda batch: {"label": batch["label"]})

    @functools.cached_property
    def _jit_logits(self):
        """`logits` compiled once per shape of its inputs (the class count, the chunk), the class arrays as
        arguments."""
        model = self.model()
        return jax.jit(lambda params, classes, batch: model.apply({"params": params}, classes, batch,
                                                                 method=self.logits))

    def score_chunk(self, n_classes: int) -> int | None:
        """How many examples `scores` computes at once (None: all): images in batches of eval.batch_size."""
        return self.config.eval.batch_size if self.inputs == "images" else None

    def scores(self, params, examples: Mapping[str, np.ndarray], classes: Sequence[int]) -> np.ndarray:
        """[N, C] scores of examples for the task's classes `classes` (the evaluation's predict function).
        `examples` holds `features` (normalised image embeddings [N, D]) and, for a method whose `inputs` are
        images, `images` (uint8 [N, H, W, 3]); scored in chunks of `score_chunk` (the last one padded)."""
        class_inputs = self.class_inputs(classes)
        x = examples[self.inputs]
        chunk = max(1, self.score_chunk(len(classes)) or len(x))
        padded = np.concatenate([x, np.zeros((-len(x) % chunk, *x.shape[1:]), x.dtype)])
        out = [np.asarray(self._jit_logits(params, class_inputs, {self.inputs: padded[i:i + chunk]}))
               for i in range(0, len(padded), chunk)]
        return np.concatenate(out)[:len(x)] if out else np.zeros((0, len(classes)), np.float32)

    def flops_per_example(self, trainable) -> float:
        # The scores of the C training classes, forward and back (3 passes of a [D] x [D, C] product); the
        # learners' own layers (an adapter, a cache of K x C keys) are of the same order.
        return 3 * 2.0 * self.config.model.embed_dim * len(self.task.base)

    def _zero_shot(self, classes: tuple[int, ...]) -> np.ndarray:
        """[C, D] prompt-ensemble embeddings of the task's classes `classes` by the frozen text tower, computed once
        per class list (training and every evaluation ask for the same ones)."""
        if classes not in self._class_embeddings:
            length = self.config.model.text.context_length
            encode = lambda prompts: self.prep.encode_texts(self.prep.tokenizer(prompts, length))
            names = [self.task.class_names[c] for c in classes]
            self._class_embeddings[classes] = class_embeddings(encode, names, self.task.templates)
        return self._class_embeddings[classes]


# --- CoOp ------------------------------------------------------------------------------------------------------------
def check_n_ctx(n_ctx: int) -> None:
    """The learned context of the prompt learners (CoOp, CoCoOp, MaPLe) holds at least one vector."""
    if n_ctx < 1:
        raise ConfigError(f"method.n_ctx must be >= 1, got {n_ctx}")


@dataclasses.dataclass(frozen=True)
class CoOpConfig:
    n_ctx: int = 16  # learned context tokens M (with ctx_init: the phrase's token count instead)
    ctx_init: str = ""  # a phrase whose token embeddings start the context ("a photo of a"); "": N(0, 0.02)
    class_position: str = "end"  # where the class name goes: end | middle | front
    csc: bool = False  # class-specific contexts: one [M, width] per class (cannot score new classes)

    def __post_init__(self):
        if self.class_position not in ("end", "middle", "front"):
            raise ConfigError(f"method.class_position must be end, middle or front, got {self.class_position!r}")
        check_n_ctx(self.n_ctx)


class PromptContext(nn.Module):
    n_ctx: int
    width: int
    n_classes: int | None  # class-specific contexts, else one shared

    @nn.compact
    def __call__(self, features=None):
        shape = (self.n_ctx, self.width) if self.n_classes is None else (self.n_classes, self.n_ctx, self.width)
        return self.param("ctx", nn.initializers.normal(0.02), shape, jnp.float32)


def prompt_layout(tokenizer, name: str, n_ctx: int, position: str, context_length: int, class_name: str = "",
                  fix: str = "lower method.n_ctx") -> tuple[np.ndarray, np.ndarray]:
    """(ids [T], slots [T]) of one class's prompt: slot m >= 0 where context vector m goes, -1 where the token id's
    embedding goes. [SOT] ctx... name "." [EOT] (end), [SOT] ctx[:M/2] name ctx[M/2:] "." [EOT] (middle), or
    [SOT] name ctx... "." [EOT] (front, the reference's layout). A prompt longer than the context is a ConfigError
    naming `class_name` (where `name` holds fixed words before it, MaPLe's) and what to do, `fix`."""
    name_ids, dot = tokenizer.encode(name), tokenizer.encode(".")
    ctx = list(range(n_ctx))
    half = n_ctx // 2
    parts = {"end": [ctx, name_ids], "middle": [ctx[:half], name_ids, ctx[half:]], "front": [name_ids, ctx]}[position]
    ids, slots = [tokenizer.sot_id], [-1]
    for part, is_ctx in zip(parts, [p is not name_ids for p in parts], strict=True):
        ids += [0] * len(part) if is_ctx else part
        slots += part if is_ctx else [-1] * len(part)
    ids += [*dot, tokenizer.eot_id]
    slots += [-1] * (len(dot) + 1)
    if len(ids) > context_length:
        raise ConfigError(f"the prompt of class {class_name or name!r} needs {len(ids)} tokens (with its {n_ctx} "
                          f"learned context tokens) but the model's context length is {context_length}: {fix}")
    pad = context_length - len(ids)
    return np.asarray(ids + [0] * pad, np.int32), np.asarray(slots + [-1] * pad, np.int32)


class CoOpMethod(FewShotMethod):
    """CoOp (Zhou et al., IJCV 2022): M learned context vectors in place of a prompt's words, through the frozen
    text tower."""

    name = "coop"
    Config = CoOpConfig

    def _n_ctx(self) -> int:
        h = self.hparams
        return len(self.prep.tokenizer.encode(h.ctx_init)) if h.ctx_init else h.n_ctx

    def learner(self) -> nn.Module:
        h = self.hparams
        n_ctx = self._n_ctx()
        classes = len(self.task.base) if h.csc else None
        return PromptContext(n_ctx, self.config.model.text.width, classes)

    def check_prompts(self) -> None:
        h = self.hparams
        if h.ctx_init and (length := self._n_ctx()) != h.n_ctx:  # config.json keeps n_ctx, which reads as the length
            log.info("method.ctx_init %r gives the learned context its %d tokens (method.n_ctx %d is not used)",
                     h.ctx_init, length, h.n_ctx)
        self.class_inputs(self.task.base if h.csc else [*self.task.base, *self.task.new])

    def class_inputs(self, classes):
        if self.hparams.csc and list(classes) != list(self.task.base):
            raise UnscorableClasses("method.csc: class-specific contexts score only the classes they were trained on")
        # With ctx_init the context is as long as that phrase: n_ctx does not set it.
        fix = "shorten method.ctx_init or the class name" if self.hparams.ctx_init else "lower method.n_ctx"
        layouts = [prompt_layout(self.prep.tokenizer, self.task.class_names[c], self._n_ctx(),
                                 self.hparams.class_position, self.config.model.text.context_length, fix=fix)
                   for c in classes]
        return {"ids": np.stack([ids for ids, _ in layouts]), "slots": np.stack([s for _, s in layouts])}

    def init_learner(self, learner, clip):
        if not self.hparams.ctx_init:
            return learner
        ids = np.asarray(self.prep.tokenizer.encode(self.hparams.ctx_init))
        phrase = jnp.asarray(clip["text"]["token_embedding"]["embedding"])[ids]
        ctx = learner["ctx"]
        return {"ctx": jnp.broadcast_to(phrase, ctx.shape).astype(ctx.dtype)}

    def logits(self, model, classes, batch):
        ctx = model.learner()
        words = model.text.embed_tokens(classes["ids"])  # [C, T, W]
        slots = classes["slots"]
        if ctx.ndim == 2:
            ctx = jnp.broadcast_to(ctx, (words.shape[0], *ctx.shape))
        vectors = jnp.take_along_axis(ctx, jnp.maximum(slots, 0)[..., None], axis=1)  # [C, T, W]
        prompts = jnp.where((slots >= 0)[..., None], vectors.astype(words.dtype), words)
        text = model.encode_text(token_embeddings=prompts, pool_index=jnp.argmax(classes["ids"], axis=-1))
        scale, _ = model.temperature()
        return scale * batch["features"] @ text.T

    def flops_per_example(self, trainable):
        # The C class prompts go through the text tower forward and back (to the context) once per step.
        cfg = self.model_config()
        return 2.0 * len(self.task.base) * flops.text_forward_flops(cfg) / self.config.batch_size


# --- CLIP-Adapter ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    alpha: float = 0.2  # residual ratio in [0, 1]: the adapted feature's share (0: zero-shot CLIP)
    reduction: int = 4  # bottleneck width = embed_dim // reduction (1 to embed_dim)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"method.alpha must be in [0, 1] (the residual ratio: the adapted feature's share, 0 "
                              f"is zero-shot CLIP), got {self.alpha}")


class Adapter(nn.Module):
    """CLIP-Adapter's bottleneck: two bias-free linear maps, each followed by ReLU (the released code)."""

    dim: int
    reduction: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.dim // self.reduction, use_bias=False, name="down")(x))
        return nn.relu(nn.Dense(self.dim, use_bias=False, name="up")(x))


class ClipAdapterMethod(FewShotMethod):
    """CLIP-Adapter (Gao et al., IJCV 2023), its visual adapter: f' = alpha A(f) + (1 - alpha) f against the
    zero-shot class embeddings."""

    name = "clip_adapter"
    Config = AdapterConfig

    def __init__(self, config):
        super().__init__(config)
        dim, reduction = config.model.embed_dim, self.hparams.reduction
        if not 1 <= reduction <= dim:  # 0: no bottleneck at all; above embed_dim: one of no width
            raise ConfigError(f"method.reduction must be between 1 and model.embed_dim ({dim}), got {reduction}: the "
                              f"adapter's bottleneck is embed_dim // reduction wide (the reference's 4: {dim // 4})")

    def learner(self):
        return Adapter(self.config.model.embed_dim, self.hparams.reduction)

    def class_inputs(self, classes):
        return {"embeds": self._zero_shot(tuple(classes))}

    def logits(self, model, classes, batch):
        f, alpha = batch["features"], self.hparams.alpha
        adapted = l2_normalize(alpha * model.learner(f) + (1 - alpha) * f)
        scale, _ = model.temperature()
        return scale * adapted @ classes["embeds"].T


# --- Tip-Adapter -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TipConfig:
    fine_tune: bool = False  # Tip-Adapter-F: the cache keys train; else nothing trains (Tip-Adapter)
    # alpha (the cache's weight) and beta (its sharpness) are chosen on few_shot.val over these grids
    alphas: tuple = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
    betas: tuple = (1.0, 2.0, 3.0, 5.0, 7.0, 10.0)


class TipCache(nn.Module):
    """The cache of the K-shot examples: keys [N, D] (their normalised image embeddings, set by `init_learner`),
    and the alpha and beta chosen on the validation set."""

    n: int
    dim: int

    @nn.compact
    def __call__(self, features=None):
        keys = self.param("keys", nn.initializers.zeros, (self.n, self.dim), jnp.float32)
        return keys, self.param("alpha", nn.initializers.ones, (), jnp.float32), self.param(
            "beta", nn.initializers.ones, (), jnp.float32)


def tip_logits(features, keys, values, class_embeds, scale, alpha, beta):
    """Tip-Adapter's logits: scale f W^T + alpha exp(-beta (1 - f K^T)) L."""
    affinity = jnp.exp(-beta * (1.0 - features @ keys.T))
    return scale * features @ class_embeds.T + alpha * affinity @ values


class TipAdapterMethod(FewShotMethod):
    """Tip-Adapter (Zhang et al., ECCV 2022): zero-shot CLIP plus a kernel over a cache of the K-shot embeddings.
    Training-free, or with the keys fine-tuned (Tip-Adapter-F, `method.fine_tune`)."""

    name = "tip_adapter"
    Config = TipConfig

    def check(self, mesh):
        super().check(mesh)
        frozen = tuple(self.config.optimizer.frozen)
        if not self.hparams.fine_tune and "^learner/" not in frozen:
            raise ConfigError("method tip_adapter without fine_tune trains nothing: add '^learner/' to "
                              "optimizer.frozen (or set method.fine_tune=True for Tip-Adapter-F)")
        rule = next((f for f in frozen if match_any((f,), "learner/keys")), None)
        if self.hparams.fine_tune and rule is not None:  # the training-free recipe with fine_tune=True
            kept = tuple(f for f in frozen if not match_any((f,), "learner/keys"))
            raise ConfigError(f"method tip_adapter with fine_tune trains nothing: optimizer.frozen rule {rule!r} "
                              "freezes the cache keys (learner/keys); use the recipe's Tip-Adapter-F variant, with "
                              "its optimizer settings (configs/tip_adapter/shapes.py:f, configs/tip_adapter/b16.py:"
                              f"<set>,f), or set --config.optimizer.frozen=\"{kept}\" (or method.fine_tune=False "
                              "for the training-free Tip-Adapter)")

    def learner(self):
        return TipCache(len(self.task.train), self.config.model.embed_dim)

    def class_inputs(self, classes):
        labels = self.task.train.labels
        values = (labels[:, None] == np.asarray(classes)[None, :]).astype(np.float32)  # new classes: empty columns
        return {"embeds": self._zero_shot(tuple(classes)), "values": values}

    def logits(self, model, classes, batch):
        keys, alpha, beta = model.learner()
        scale, _ = model.temperature()
        return tip_logits(batch["features"], keys, classes["values"], classes["embeds"], scale, alpha, beta)

    def init_learner(self, learner, clip):
        keys = jnp.asarray(self.train_arrays["features"])
        alpha, beta = self.select_alpha_beta(keys, float(jnp.exp(clip["logit_scale"])))
        return {"keys": keys, "alpha": jnp.float32(alpha), "beta": jnp.float32(beta)}

    def select_alpha_beta(self, keys, scale: float) -> tuple[float, float]:
        """The grid point of best top-1 on the validation set, among the training classes."""
        val, classes = self.task.val, self.task.base
        rows = np.flatnonzero(np.isin(val.labels, classes))
        features = self.prep.encode_images(val.read(rows))
        targets = np.searchsorted(classes, val.labels[rows])
        inputs = self.class_inputs(classes)
        best = (-1.0, 1.0, 1.0)
        for alpha in self.hparams.alphas:
            for beta in self.hparams.betas:
                scores = tip_logits(features, keys, inputs["values"], inputs["embeds"], scale, alpha, beta)
                accuracy = float(np.mean(np.argmax(np.asarray(scores), axis=1) == targets))
                best = max(best, (accuracy, -alpha, -beta))  # ties: the smaller alpha, then beta
        if jax.process_index() == 0:  # shown, as the compiled step's figures are: the run's choice, not a detail
            print(f"tip_adapter: alpha {-best[1]:g} and beta {-best[2]:g} chosen on few_shot.val (top-1 "
                  f"{best[0]:.4f} on {len(rows)} images; kept in the checkpoint as learner/alpha and learner/beta)",
                  flush=True)
        return -best[1], -best[2]


# --- the linear probe ------------------------------------------------------------------------------------------------
class LinearProbeMethod(FewShotMethod):
    """The linear probe on frozen image embeddings (CoOp's baseline): logistic regression over the training classes,
    trained with the run's optimizer (its weight decay is the regulariser). It has no scores for new classes."""

    name = "linear_probe"

    def learner(self):
        return nn.Dense(len(self.task.base), kernel_init=nn.initializers.zeros)

    def class_inputs(self, classes):
        if list(classes) != list(self.task.base):
            raise UnscorableClasses("a linear probe scores only its training classes")
        return {}

    def logits(self, model, classes, batch):
        return model.learner(batch["features"])


FEW_SHOT_METHODS = (CoOpMethod, ClipAdapterMethod, TipAdapterMethod, LinearProbeMethod)
