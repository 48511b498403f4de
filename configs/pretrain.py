"""CLIP pretraining recipe for any preset (OpenAI/open_clip-style hyper-parameters).

  clip-jax train --config configs/pretrain.py:B/16 --workdir gs://bucket/runs/b16 --config.mesh.fsdp=-1

The argument is the model preset (tiny, B/32, B/16, L/14, L/14-336, RN50, RN101, RN50x4, RN50x16, RN50x64). The
data source defaults to the procedural `shapes` set, rendered at the model's resolution; web-scale record sources
plug in through `data.source`.
"""

from clip_jax.config import default_config
from clip_jax.models.presets import model_preset


def get_config(preset: str = "B/16"):
    config = default_config()
    config.model = model_preset(preset)
    if config.model.vision.type == "resnet":
        # From scratch: GroupNorm, normalisation without batch statistics (models/resnet.py). Such a model does not
        # export to open_clip's BatchNorm layout.
        config.model.vision.norm = "group"
    config.model.dtype = "bfloat16"  # bf16 compute, fp32 parameters and optimizer state
    config.model.remat_policy = "dots_no_batch"  # keep projections, recompute attention: fits large batches
    config.model.scan_layers = True  # one compiled block per tower: fast compiles on pods
    # FLIP (Li et al. 2023): --config.model.vision.patch_dropout=0.5 trains each image on half its patch tokens (the
    # demo's step on a CPU: 29-35% less time, docs/benchmarks.md); end with a short run at 0 (a resume may change it).
    config.batch_size = 32768
    config.total_steps = 100_000
    config.mesh = {"data": 1, "fsdp": -1, "tensor": 1}  # FSDP over all devices
    config.data.tokenizer = "openai"
    config.optimizer.lr = 5e-4
    config.optimizer.warmup_steps = 2000
    config.optimizer.weight_decay = 0.2
    config.optimizer.b2 = 0.98
    config.optimizer.eps = 1e-6
    config.data.workers = 8
    config.checkpoint.every_steps = 1000
    config.checkpoint.keep_period = 10_000
    config.eval.every_steps = 5000
    config.log.every_steps = 50
    return config
