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
