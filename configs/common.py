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
