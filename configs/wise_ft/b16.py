"""WiSE-FT's fine-tuning recipe (the reference README's end-to-end command) for a converted OpenAI ViT-B/16:
AdamW lr 3e-5, weight decay 0.1 on every parameter, betas (0.9, 0.999), eps 1e-8, batch 512, 10 epochs, linear
warm-up (500 steps) then cosine to 0, gradient norm clipped at 1.0, cross-entropy without label smoothing; the image
tower and the zero-shot head train, the text tower and the temperature stay frozen. Data: ImageNet through TFDS, the
few-shot sample of `few_shot.shots` images per base class (the argument, default 16), scored on the base and new
classes of the validation set.

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16              # OpenAI weights (QuickGELU)
  tfds build imagenet2012 --file_format=array_record                      # after the manual download
  clip-jax train --config configs/wise_ft/b16.py --workdir runs/wise_ft-b16 --config.init_from=runs/b16
  clip-jax wise-ft --workdir runs/wise_ft-b16                             # alpha 0, 0.1, ..., 1

The reference fine-tunes on all 1.28M ImageNet images (25k steps, warm-up 2% of them); an image-input few-shot run
holds its K x C training images in host memory, so here an epoch is K x C images (16 shots x 500 base classes: 156
steps for 10 epochs) and the warm-up is min(500, a tenth of the steps). The argument is the shot count per class,
then optionally `,all`: `configs/wise_ft/b16.py:128` takes 128 shots (1,250 steps, 125 warm-up), and
`configs/wise_ft/b16.py:128,all` trains a head over all 1,000 classes, the reference's classifier (2,500 steps, 250
warm-up, and 19 GB of uint8 images at 224 px). `--config.few_shot.classes=all` alone would train on all classes
with the steps of the base half (10 epochs of those: 5 of all), as the steps are counted before the overrides.
"""

from clip_jax.config import default_config, method_config
from clip_jax.evaluate.suite import eval_defaults
from clip_jax.methods.wise_ft import FROZEN
from clip_jax.models.presets import model_preset
from configs.common import few_shot_arg

EPOCHS, BATCH, WARMUP = 10, 512, 500
IMAGENET_CLASSES = 1000


def get_config(arg: str = "16"):
    first, _, classes = few_shot_arg(arg)
    if not first.isdigit() or int(first) < 1:
        raise ValueError(f"the argument is the shot count per class (an integer >= 1: 16, the default, or 128), then "
                         f"optionally ',all' (every class), not {first!r} (the set is ImageNet: few_shot.tfds_name)")
    shots = int(first)
    config = default_config()
    config.model = model_preset("B/16")  # OpenAI sizes, QuickGELU, OpenAI's vocabulary
    config.model.dtype = "bfloat16"  # bf16 compute on GPU/TPU; fp32 parameters
    config.model.remat_policy = "dots_no_batch"
    config.data.tokenizer = "openai"
    config.init_from = "runs/b16"  # the converted CLIP (clip-jax convert ... --to-workdir runs/b16)
    config.method = method_config("wise_ft", label_smoothing=0.0)
    config.few_shot.update(
        dataset="tfds",
        tfds_name="imagenet2012",
        train="train[:99%]",  # the shots are drawn from here ...
        val="train[99%:]",  # ... and alpha or hyperparameters chosen here, never on the test set
        test="validation",
        shots=shots,
        classes=classes,
        eval_examples=10_000,  # the first 10,000 validation images (of 50,000)
    )
    train_classes = IMAGENET_CLASSES // 2 if config.few_shot.classes == "base" else IMAGENET_CLASSES
    config.batch_size = BATCH
    config.total_steps = EPOCHS * shots * train_classes // BATCH
    config.optimizer.lr = 3e-5
    config.optimizer.warmup_steps = min(WARMUP, config.total_steps // 10)
    config.optimizer.weight_decay = 0.1
    config.optimizer.b1, config.optimizer.b2, config.optimizer.eps = 0.9, 0.999, 1e-8
    config.optimizer.grad_clip_norm = 1.0
    config.optimizer.no_decay = ()  # the reference's AdamW decays every parameter
    config.optimizer.frozen = FROZEN
    config.evals = {"few_shot": eval_defaults("few_shot")}
    config.eval.every_steps = 0
    config.eval.batch_size = 256
    config.checkpoint.every_steps = 500
    config.log.every_steps = 10
    return config
