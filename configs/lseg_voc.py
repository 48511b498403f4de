"""LSeg on PASCAL VOC 2012 with a converted OpenAI ViT-B/16 (not run on this machine: no VOC, no weights here).

  clip-jax convert ViT-B-16.safetensors --to-workdir runs/b16
  clip-jax train --config configs/lseg_voc.py:0 --workdir runs/lseg_voc_fold0 --config.data.path=VOC2012

The argument is a PASCAL-5i fold (0-3): its five classes (fold i: VOC labels 5i+1 to 5i+5) are `unseen`, their
pixels ignored in training, and the `voc` evaluation reports them apart (`voc_novel_miou`) among all 21 labels on
the `val` split, the ZS3-style generalised setting rather than HSNet's fold-only test (docs/segmentation.md). The
folder is VOC2012's own layout (JPEGImages, SegmentationClass, ImageSets/Segmentation/{train,val}.txt), or any
folder in it with a class_names.txt. AdamW at 1e-4 for 20 epochs of VOC's 1,464 training images, the image tower
fine-tuned and the text tower frozen, are our choice: the reference's PASCAL recipe (SGD, early stopping on the
test fold, lang-seg#19) is not reproduced.
"""

from clip_jax.config import default_config, method_config
from clip_jax.data.segmentation import VOC_CLASSES
from clip_jax.evaluate.suite import eval_defaults
from clip_jax.methods.lseg import FROZEN
from clip_jax.models.presets import model_preset


def get_config(fold: str = "0"):
    if fold not in ("0", "1", "2", "3"):
        raise ValueError(f"unknown fold {fold!r}; choose 0, 1, 2 or 3 (PASCAL-5i)")
    unseen = VOC_CLASSES[1 + 5 * int(fold): 6 + 5 * int(fold)]
    config = default_config()
    config.model = model_preset("B/16")  # OpenAI sizes, QuickGELU, OpenAI's vocabulary
    config.model.dtype = "bfloat16"
    config.data.tokenizer = "openai"
    config.init_from = "runs/b16"
    config.method = method_config("lseg", decoder_width=256, unseen=unseen, templates=("a photo of a {}.",))
    config.optimizer.frozen = FROZEN
    config.data.source = "segmentation_folder"
    config.data.path = "VOC2012"
    config.data.augment = False  # the crop would not move the masks
    config.batch_size = 16
    config.total_steps = 20 * 1464 // 16
    config.optimizer.lr = 1e-4
    config.optimizer.warmup_steps = 200
    config.optimizer.weight_decay = 1e-4
    config.checkpoint.every_steps = 500
    config.log.every_steps = 50
    config.eval.every_steps = 0
    config.evals = {"voc": {**eval_defaults("segmentation_folder"), "path": "VOC2012", "split": "val",
                            "novel": unseen, "background": "label", "templates": ("a photo of a {}.",)}}
    return config
