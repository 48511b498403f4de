"""Snippets the recipes share."""

from clip_jax.models.presets import model_preset


def tiny_shapes(config, context_length: int):
    """The CPU-sized setting of the shapes recipes: the tiny model at 96 px (6x6 patches of 16 px: at 64 px an object
    covers about one patch), a BPE vocabulary of 1,024 fitted on the training captions (about 740 tokens used), and
    no crops (every procedural example is new: crops only shrink the objects)."""
    config.model = model_preset("tiny", vocab_size=1024, context_length=context_length)
    config.model.vision.image_size = 96
    config.data.tokenizer = "train"
    config.data.tokenizer_vocab_size = 1024
    config.data.augment = False
    return config


def small_resnet(norm: str = "group") -> dict:
    """The shapes recipes' ModifiedResNet image tower, about the tiny ViT's size (1.4M parameters against 0.9M): one
    bottleneck block per stage at stem width 16 (64 to 512 channels), 96 px images (a 3x3 grid under the attention
    pool), 8 heads of 64. "group" (GroupNorm) trains from scratch; "frozen_bn" is OpenAI's BatchNorm as an affine
    without statistics (models/resnet.py)."""
    return {"type": "resnet", "layers": (1, 1, 1, 1), "width": 16, "heads": 8, "image_size": 96, "norm": norm}


def few_shot_shapes(config, method: str, **fields):
    """The shapes recipes of the few-shot methods (docs/few_shot.md): a frozen demo CLIP (`clip-jax train --config
    configs/demo.py --workdir workdirs/demo` first), its towers and tokenizer read from there; 16 shots of the 20
    base classes (the first half of the 40 colour-shape pairs seen in pretraining) in the calibrated `shifted`
    rendering domain; scored on the base and the new classes by the `few_shot` evaluation."""
    from clip_jax.config import method_config
    from clip_jax.evaluate.suite import eval_defaults
    from clip_jax.methods.few_shot import FROZEN

    tiny_shapes(config, context_length=24)
    config.init_from = "workdirs/demo"
    config.method = method_config(method, **fields)
    config.optimizer.frozen = FROZEN
    config.optimizer.no_decay = ()
    config.optimizer.warmup_steps = 0
    config.evals = {"few_shot": eval_defaults("few_shot")}
    config.checkpoint.every_steps = 1000
    config.log.every_steps = 50
    return config


# TFDS sets of the CoOp/CoCoOp benchmark with a train, a validation and a test split: (those splits, classes).
FEW_SHOT_TFDS = {
    "oxford_flowers102": (("train", "validation", "test"), 102),
    "dtd": (("train", "validation", "test"), 47),
}


ALL_CLASSES = "all"  # the option of a few-shot recipe's argument that trains on every class (`few_shot_arg`)


def few_shot_arg(arg: str, variants: dict[str, str] | None = None) -> tuple[str, str, str]:
    """(first part, variant, few_shot.classes) of a few-shot recipe's argument `<first>[,<variant>][,all]`: the set
    (or shot count) first, then at most one of `variants` (name: what it is) and `all`, which trains on every class
    instead of the base half (`few_shot.classes`). The steps are counted from it: an override of few_shot.classes
    after the recipe keeps the base half's steps."""
    first, *options = arg.split(",")
    variants = variants or {}
    choices = ", ".join([*(f"{k!r} ({v})" for k, v in variants.items()), f"{ALL_CLASSES!r} (train on every class)"])
    variant, classes = "", "base"
    for option in options:
        if option == ALL_CLASSES and classes == "base":
            classes = ALL_CLASSES
        elif option in variants and not variant:
            variant = option
        else:
            what = "repeated option" if option == ALL_CLASSES or option in variants else "unknown option"
            raise ValueError(f"{what} {option!r} in {arg!r}: after the first part come, each at most once, {choices}")
    return first, variant, classes


def few_shot_b16(config, method: str, dataset: str, epochs: int, batch: int, classes: str = "base", **fields):
    """The ViT-B/16 recipes of the few-shot methods (configs/<method>/b16.py): a converted OpenAI ViT-B/16 workdir
    (`clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16`), frozen, and CoCoOp's base-to-new protocol on a
    TFDS set of `FEW_SHOT_TFDS` (16 shots of the first half of the classes; test on base and new), or with `classes`
    "all" (the recipes' `:<set>,all`) 16 shots of every class. `epochs` over the 16 x C shots at batch `batch`; the
    first epoch warms up (the references: one epoch at a constant 1e-5). A folder set instead:
    --config.few_shot.dataset=folder --config.few_shot.train=... (val, test) and --config.total_steps for its class
    count."""
    import math

    from clip_jax.config import method_config
    from clip_jax.evaluate.suite import eval_defaults
    from clip_jax.methods.few_shot import FROZEN

    if dataset not in FEW_SHOT_TFDS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(FEW_SHOT_TFDS)}")
    (train, val, test), n_classes = FEW_SHOT_TFDS[dataset]
    config.model = model_preset("B/16")  # OpenAI sizes, QuickGELU, OpenAI's vocabulary
    config.model.dtype = "bfloat16"  # bf16 compute on GPU/TPU (the references: fp16); fp32 parameters
    config.data.tokenizer = "openai"
    config.init_from = "runs/b16"
    config.method = method_config(method, **fields)
    config.few_shot.update(dataset="tfds", tfds_name=dataset, train=train, val=val, test=test, shots=16)
    config.few_shot.update(classes=classes, class_split="reference", eval_examples=1_000_000)
    trained = n_classes if classes == ALL_CLASSES else math.ceil(n_classes / 2)
    steps_per_epoch = math.ceil(config.few_shot.shots * trained / batch)
    config.batch_size = batch
    config.total_steps = epochs * steps_per_epoch
    config.optimizer.frozen = FROZEN
    config.optimizer.no_decay = ()
    config.optimizer.warmup_steps = steps_per_epoch
    config.evals = {"few_shot": eval_defaults("few_shot")}
    config.eval.every_steps = 0  # at the end (the references evaluate the last checkpoint)
    config.checkpoint.every_steps = max(1, config.total_steps // 4)
    config.log.every_steps = 20
    return config


def dense_shapes(config, background: str):
    """The shapes recipes of the dense methods (docs/segmentation.md): the tiny model and the demo CLIP as the start
    (`clip-jax train --config configs/demo.py --workdir workdirs/demo` first), cluttered scenes of 3 to 6 objects, and
    the `seg` evaluation (evaluate/segmentation.py) with the method's background rule on 200 scenes per split, at the
    end of training only."""
    from clip_jax.evaluate.suite import eval_defaults

    tiny_shapes(config, context_length=24)
    config.init_from = "workdirs/demo"
    config.data.min_objects = 3
    config.data.max_objects = 6
    config.log.every_steps = 25
    config.eval.every_steps = 0
    config.eval.num_examples = 200
    config.evals = {"seg": {**eval_defaults("shapes_segmentation"), "background": background}}
    return config


def detection_shapes(config, method: str, frozen: tuple[str, ...], **fields):
    """The shapes recipes of the detection methods (docs/detection.md): `dense_shapes`' model, start and scenes, the
    method with its frozen towers, and the `shapes_detection` evaluation at the end. 400 steps of 32 over 2,000
    training scenes; learning rate and steps set a priori, not tuned on any split."""
    from clip_jax.config import method_config
    from clip_jax.evaluate.suite import eval_defaults

    dense_shapes(config, background="label")
    config.method = method_config(method, **fields)
    config.evals = {"det": eval_defaults("shapes_detection")}
    config.optimizer.frozen = frozen
    config.total_steps = 400
    config.batch_size = 32
    config.optimizer.lr = 5e-4
    config.optimizer.warmup_steps = 40
    config.optimizer.weight_decay = 1e-4
    config.checkpoint.every_steps = 200
    return config
