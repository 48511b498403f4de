"""The OpenAI / open_clip state-dict layout <-> our params tree, and the architecture read off tensor shapes.

The layout (REFERENCE.md section 2) is one table, `layout(model)`: for each torch key, the path of our
parameter, its torch shape and how it is transformed. Import and export both walk that table, so they cannot
drift apart, and the shape check names the torch key. Transforms are exact (transpose / reshape / split), so a
round trip is bit-exact in float32.

Long-CLIP checkpoints keep two text position tables (a frozen `positional_embedding` for the first 20 positions
and a trainable `positional_embedding_res` for the rest). They import as they are, into a model with
`text.keep_positions = 20` (so a round trip is bit-exact and fine-tuning can keep the first table frozen);
`single_position_table` merges them for layouts with one table (Hugging Face).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from clip_jax.interop import ConversionError
from clip_jax.interop.openai_resnet import (
    check_exportable,
    fold_batch_norms,
    infer_resnet,
    is_resnet,
    open_clip_vision_config,
    resnet_rows,
    unfold_batch_norms,
)
from clip_jax.models.clip import CLIP_MEAN, CLIP_STD
from clip_jax.models.layers import relayout_blocks
from clip_jax.models.positions import merge_position_tables
from clip_jax.models.presets import model_preset

# Long-CLIP: positions below this come from the frozen table (REFERENCE.md section 5). Their checkpoints do not
# record it; every released one uses 20.
LONGCLIP_KEEP = 20
# Entries of the raw OpenAI (TorchScript) state dicts that are metadata, not weights; `attn_mask`, the text tower's
# causal mask (-inf above the diagonal), is a buffer that an open_clip model's TorchScript export keeps among them.
_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
ACTIVATIONS = ("quick_gelu", "gelu")

# (torch suffix, our suffix, transform) of one residual block.
_BLOCK = (
    ("ln_1.weight", "ln_1/scale", "same"),
    ("ln_1.bias", "ln_1/bias", "same"),
    ("attn.in_proj_weight", "attn/in_proj/kernel", "in_proj_w"),
    ("attn.in_proj_bias", "attn/in_proj/bias", "in_proj_b"),
    ("attn.out_proj.weight", "attn/out_proj/kernel", "out_proj_w"),
    ("attn.out_proj.bias", "attn/out_proj/bias", "same"),
    ("ln_2.weight", "ln_2/scale", "same"),
    ("ln_2.bias", "ln_2/bias", "same"),
    ("mlp.c_fc.weight", "mlp/c_fc/kernel", "linear"),
    ("mlp.c_fc.bias", "mlp/c_fc/bias", "same"),
    ("mlp.c_proj.weight", "mlp/c_proj/kernel", "linear"),
    ("mlp.c_proj.bias", "mlp/c_proj/bias", "same"),
)


def _block_shapes(t: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    w, m, hd = t["width"], t["mlp_dim"], t["heads"] * t["head_dim"]
    return {
        "ln_1.weight": (w,), "ln_1.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
        "attn.in_proj_weight": (3 * hd, w), "attn.in_proj_bias": (3 * hd,),
        "attn.out_proj.weight": (w, hd), "attn.out_proj.bias": (w,),
        "mlp.c_fc.weight": (m, w), "mlp.c_fc.bias": (m,), "mlp.c_proj.weight": (w, m), "mlp.c_proj.bias": (w,),
    }  # fmt: skip


TOWERS = ("visual", "text", "logit")  # "logit": the temperature (and bias) of the full two-tower model


def layout(model: Mapping[str, Any], towers: tuple[str, ...] = TOWERS) -> list[tuple]:
    """[(torch key, our path, torch shape, transform, tower config)] of a model config dict."""
    v, t, e = model["vision"], model["text"], model["embed_dim"]
    rows = []
    if "logit" in towers:
        rows.append(("logit_scale", "logit_scale", (), "same", None))
        if model.get("logit_bias_init") is not None:
            rows.append(("logit_bias", "logit_bias", (), "same", None))
    if "visual" in towers and v.get("type") == "resnet":
        rows += resnet_rows(v, e)
    elif "visual" in towers:
        n = (v["image_size"] // v["patch_size"]) ** 2 + 1
        w = v["width"]
        rows += [
            ("visual.class_embedding", "visual/class_embedding", (w,), "same", v),
            ("visual.positional_embedding", "visual/positional_embedding", (n, w), "same", v),
            ("visual.conv1.weight", "visual/conv1/kernel", (w, 3, v["patch_size"], v["patch_size"]), "conv", v),
            ("visual.ln_pre.weight", "visual/ln_pre/scale", (w,), "same", v),
            ("visual.ln_pre.bias", "visual/ln_pre/bias", (w,), "same", v),
        ]
        rows += _blocks("visual.transformer.resblocks", "visual/transformer", v)
        rows += [
            ("visual.ln_post.weight", "visual/ln_post/scale", (w,), "same", v),
            ("visual.ln_post.bias", "visual/ln_post/bias", (w,), "same", v),
            ("visual.proj", "visual/proj", (w, e), "same", v),
        ]
    if "text" in towers:
        w = t["width"]
        rows += [
            ("token_embedding.weight", "text/token_embedding/embedding", (t["vocab_size"], w), "same", t),
            ("positional_embedding", "text/positional_embedding", (t["context_length"], w), "same", t),
        ]
        if t.get("keep_positions", 0):
            rows.append(("positional_embedding_res", "text/positional_embedding_res", (t["context_length"], w),
                         "same", t))
        rows += _blocks("transformer.resblocks", "text/transformer", t)
        rows += [
            ("ln_final.weight", "text/ln_final/scale", (w,), "same", t),
            ("ln_final.bias", "text/ln_final/bias", (w,), "same", t),
            ("text_projection", "text/text_projection", (w, e), "same", t),
        ]
    return rows


def _blocks(torch_prefix: str, our_prefix: str, t: Mapping[str, Any]) -> list[tuple]:
    shapes = _block_shapes(t)
    return [
        (f"{torch_prefix}.{i}.{tk}", f"{our_prefix}/resblocks_{i}/{ok}", shapes[tk], kind, t)
        for i in range(t["layers"])
        for tk, ok, kind in _BLOCK
    ]


# ---- transforms: torch array <-> our array ----------------------------------------------------------------------
def _to_ours(x: np.ndarray, kind: str, t: Mapping[str, Any] | None) -> np.ndarray:
    if kind == "same":
        return x
    if kind == "linear":  # torch Linear [out, in] -> Dense kernel [in, out]
        return x.T
    if kind == "conv":  # OIHW -> HWIO
        return x.transpose(2, 3, 1, 0)
    h, d = t["heads"], t["head_dim"]
    if kind == "in_proj_w":  # rows q;k;v, each head-major -> [width, 3, heads, head_dim]
        return x.reshape(3, h, d, -1).transpose(3, 0, 1, 2)
    if kind == "in_proj_b":
        return x.reshape(3, h, d)
    if kind == "out_proj_w":  # [width, heads * head_dim] -> [heads, head_dim, width]
        return x.T.reshape(h, d, -1)
    raise AssertionError(kind)


def _to_torch(x: np.ndarray, kind: str, t: Mapping[str, Any] | None) -> np.ndarray:
    if kind == "same":
        return x
    if kind == "linear":
        return x.T
    if kind == "conv":  # HWIO -> OIHW
        return x.transpose(3, 2, 0, 1)
    if kind == "in_proj_w":
        return x.transpose(1, 2, 3, 0).reshape(-1, x.shape[0])
    if kind == "in_proj_b":
        return x.reshape(-1)
    if kind == "out_proj_w":
        return x.reshape(-1, x.shape[-1]).T
    raise AssertionError(kind)


# ---- checks ------------------------------------------------------------------------------------------------------
def check_tensors(found: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """One ConversionError listing every missing key, unexpected key and wrong shape (expected vs found)."""
    problems = []
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"missing key {key!r} (expected shape {tuple(shape)})")
        elif tuple(found[key].shape) != tuple(shape):
            problems.append(f"key {key!r}: expected shape {tuple(shape)}, found {tuple(found[key].shape)}")
    problems += [f"unexpected key {k!r} (shape {tuple(found[k].shape)})" for k in found if k not in expected]
    if problems:
        more = f"; ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ConversionError(f"{what} does not match the expected architecture: " + "; ".join(problems[:8]) + more)


def check_finite(found: Mapping[str, np.ndarray], what: str) -> None:
    """Refuses NaN / inf weights (a diverged or damaged checkpoint), naming the first tensors that hold them:
    imported, they would only surface later, when `eval` or `train` fails on them."""
    bad = [k for k, v in found.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ConversionError(f"{what} holds NaN or infinite values in {', '.join(map(repr, bad[:5]))}{more}; the "
                              "checkpoint is damaged or its training diverged: convert another one")


def check_representable(model: Mapping[str, Any], towers: tuple[str, ...] = TOWERS) -> None:
    """PyTorch's attention (open_clip, HF) has heads * head_dim == width; ours need not (ViT-bigG style). A ResNet
    tower exports with BatchNorm only."""
    for name in [n for n, tower in (("vision", "visual"), ("text", "text")) if tower in towers]:
        t = model[name]
        if t.get("type") == "resnet":
            check_exportable(t)
            continue
        if t["heads"] * t["head_dim"] != t["width"]:
            raise ConversionError(
                f"model.{name}: heads {t['heads']} x head_dim {t['head_dim']} != width {t['width']}; the PyTorch "
                "layouts (OpenAI, open_clip, HF) cannot hold this attention"
            )


def check_class_token_pooled(model: Mapping[str, Any], where: str) -> None:
    """`where` (a bare state dict, HF's CLIPModel) is read with the class token as the image's feature: a mean-pooled
    ViT would compute another function there. Only an open_clip folder says how its image tower pools."""
    pool = model["vision"].get("pool", "token")
    if pool != "token":
        raise ConversionError(
            f"model.vision.pool is {pool!r}: {where} is read with the class token as the image's feature, so this "
            "model would compute another function there; export --format openai to a folder (its "
            "open_clip_config.json says pool_type 'avg', as open_clip reads it)"
        )


def check_one_activation(model: Mapping[str, Any], where: str) -> None:
    """open_clip (and `convert --activation`) build both towers with one activation: `where`, without a config of its
    own, would be rebuilt with the text tower's in the image tower too."""
    vision, text = model["vision"].get("activation", model["text"]["activation"]), model["text"]["activation"]
    if vision != text:
        raise ConversionError(f"the image tower's activation is {vision} and the text tower's {text}: {where} is "
                              "rebuilt with one activation for both (open_clip's, convert's --activation), so this "
                              "model would compute another function there; export --format hf (its config.json holds "
                              "each tower's)")


def normalisation(model: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """The image mean and std a model config dict normalises with (OpenAI's where it says none), as lists."""
    return (list(model.get("image_mean", CLIP_MEAN)), list(model.get("image_std", CLIP_STD)))


# ---- state dict <-> params -----------------------------------------------------------------------------------------
def normalize_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drops OpenAI's metadata entries; folds a ResNet image tower's BatchNorms (openai_resnet.py)."""
    sd = {k: v for k, v in sd.items() if k not in _METADATA_KEYS}
    return fold_batch_norms(sd) if is_resnet(sd) else sd


def single_position_table(sd: Mapping[str, np.ndarray], model: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The state dict with a Long-CLIP model's two text position tables merged into the one table the text tower
    uses (as `positional_embedding`), for layouts that hold one table."""
    sd = dict(sd)
    keep = model["text"].get("keep_positions", 0)
    if keep:
        rest = sd.pop("positional_embedding_res")
        sd["positional_embedding"] = np.asarray(merge_position_tables(sd["positional_embedding"], rest, keep))
    return sd


def params_from_state_dict(sd: Mapping[str, np.ndarray], model: Mapping[str, Any],
                           towers: tuple[str, ...] = TOWERS) -> dict[str, Any]:
    """Our (unstacked) params tree, float32 numpy, from an OpenAI-layout state dict; checked key by key."""
    rows = layout(model, towers)
    check_tensors(sd, {key: shape for key, _, shape, _, _ in rows}, "checkpoint")
    params: dict[str, Any] = {}
    for key, path, _, kind, t in rows:
        *parents, leaf = path.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(_to_ours(np.asarray(sd[key], np.float32), kind, t), order="C")
    return params


def state_dict_from_params(params: Mapping[str, Any], model: Mapping[str, Any],
                           towers: tuple[str, ...] = TOWERS) -> dict[str, np.ndarray]:
    """The OpenAI / open_clip state dict (float32 numpy, contiguous) of our params (stacked or not)."""
    check_representable(model, towers)
    params = unstack_layers(params)
    out = {}
    rows = layout(model, towers)
    for key, path, shape, kind, t in rows:
        node = params
        for p in path.split("/"):
            node = node[p]
        x = np.asarray(_to_torch(np.asarray(node, np.float32), kind, t), order="C")
        if x.shape != shape:
            raise ConversionError(f"parameter {path} has shape {np.shape(node)}: {key} would be {x.shape}, not {shape}")
        out[key] = x
    return unfold_batch_norms(out, rows) if model["vision"].get("type") == "resnet" and "visual" in towers else out


# ---- scanned (stacked) <-> unrolled blocks ---------------------------------------------------------------------
# Layouts of the image and text towers' blocks, for `layers.relayout_blocks`, which converts between them.
_STACKED = {tower: {"transformer": {"resblocks": {}}} for tower in ("visual", "text")}
_UNROLLED = {tower: {"transformer": {"resblocks_0": {}}} for tower in ("visual", "text")}


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """`transformer/resblocks/...` with a leading layer axis (scan_layers=True) -> `resblocks_{i}/...`."""
    return relayout_blocks(params, _UNROLLED, np.stack, lambda leaf, i: np.asarray(leaf)[i])


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """`resblocks_{i}/...` -> `resblocks/...` with a leading layer axis, for models with scan_layers=True."""
    return relayout_blocks(params, _STACKED, np.stack, lambda leaf, i: np.asarray(leaf)[i])


# ---- architecture ------------------------------------------------------------------------------------------------
def _require(sd: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in sd:
        raise ConversionError(
            f"cannot infer the architecture: key {key!r} is missing (an OpenAI / open_clip ViT CLIP state dict has "
            "'visual.conv1.weight', 'token_embedding.weight', 'transformer.resblocks.0....')"
        )
    return sd[key]


def _num_layers(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def check_heads_flag(heads: int | None, tower: str) -> None:
    """A --heads-vision / --heads-text value: None (not given) or a positive count."""
    if heads is not None and heads < 1:
        raise ConversionError(f"--heads-{tower} {heads}: a tower has at least 1 attention head; pass a positive "
                              "number that divides its width, or leave the flag out")


def split_heads(width: int, heads: int | None, default: int, tower: str) -> tuple[int, int]:
    """(heads, head_dim) of a tower: the --heads-{tower} flag when given, else `default`."""
    check_heads_flag(heads, tower)
    n = heads or default
    if width % n:
        given = f"--heads-{tower} {n}: " if heads else ""
        raise ConversionError(f"{given}the {tower} width {width} is not divisible by {n} heads; pass --heads-{tower} "
                              "N with N dividing the width")
    return n, width // n


def infer_model(sd: Mapping[str, np.ndarray], *, heads_vision: int | None = None, heads_text: int | None = None,
                activation: str = "quick_gelu", pool: str = "token") -> dict[str, Any]:
    """A model config dict (as `model_preset` returns) read off the shapes of an OpenAI-layout state dict.

    Heads are not in the shapes: `width // 64` unless given. The activation is not in the weights either:
    OpenAI's checkpoints use QuickGELU, open_clip's own models (names without `-quickgelu`) exact GELU."""
    if activation not in ACTIVATIONS:
        raise ConversionError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
    model = model_preset("tiny", activation=activation)
    if is_resnet(sd):
        model["vision"], model["embed_dim"] = infer_resnet(sd, heads_vision)
    else:
        model["vision"].update(_infer_vit(sd, heads_vision), pool=pool)  # not in the weights: an open_clip config
        model["embed_dim"] = int(_require(sd, "visual.proj").shape[1])
    vocab, tw = _require(sd, "token_embedding.weight").shape
    th, td = split_heads(tw, heads_text, max(tw // 64, 1), "text")
    model["text"].update(
        width=int(tw), layers=_num_layers(sd, "transformer.resblocks"), heads=th, head_dim=td, vocab_size=int(vocab),
        context_length=int(_require(sd, "positional_embedding").shape[0]),
        mlp_dim=int(_require(sd, "transformer.resblocks.0.mlp.c_fc.weight").shape[0]),
    )
    if "positional_embedding_res" in sd:
        model["text"]["keep_positions"] = LONGCLIP_KEEP
    if "logit_bias" in sd:
        model["logit_bias_init"] = float(np.asarray(sd["logit_bias"]))
    return model


def _infer_vit(sd: Mapping[str, np.ndarray], heads: int | None) -> dict[str, Any]:
    vw, _, patch, _ = _require(sd, "visual.conv1.weight").shape
    n = _require(sd, "visual.positional_embedding").shape[0]
    grid = math.isqrt(n - 1)
    if grid * grid != n - 1:
        raise ConversionError(f"visual.positional_embedding has {n} rows: not 1 + a square number of patches")
    vh, vd = split_heads(vw, heads, max(vw // 64, 1), "vision")  # OpenAI's convention: 64-wide heads
    return dict(
        width=int(vw), layers=_num_layers(sd, "visual.transformer.resblocks"), heads=vh, head_dim=vd,
        patch_size=int(patch), image_size=int(grid * patch),
        mlp_dim=int(_require(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0]),
    )


# open_clip config options that change the computation away from the OpenAI architecture, with their defaults.
_OPEN_CLIP_UNSUPPORTED = {
    "vision_cfg": {"attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
                   "timm_model_name": None, "ls_init_value": None, "act_kwargs": None, "norm_kwargs": None},
    "text_cfg": {"embed_cls": False, "no_causal_mask": False, "pool_type": "argmax", "proj_bias": False,
                 "proj_type": "linear", "hf_model_name": None, "ls_init_value": None, "act_kwargs": None,
                 "norm_kwargs": None},
}
# open_clip's ViT pooling -> ours (towers.VISION_POOLS): both apply ln_post to the tokens first (open_clip's default
# final_ln_after_pool False); "avg" is the mean of the patch tokens, without the class token.
OPEN_CLIP_POOLS = {"tok": "token", "avg": "mean"}
_POOL_TYPES = {ours: theirs for theirs, ours in OPEN_CLIP_POOLS.items()}
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def open_clip_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """heads_vision / heads_text / activation from an `open_clip_config.json` (the hub format); refuses options
    our model does not implement."""
    mc = config.get("model_cfg", config)
    for section, defaults in _OPEN_CLIP_UNSUPPORTED.items():
        cfg = mc.get(section, {})
        for key, default in [*defaults.items(), *((k, False) for k in _CUSTOM_BLOCK)]:
            value = cfg.get(key, default)
            if value != default and not (value is None and default is False):
                raise ConversionError(f"open_clip option {section}.{key}={cfg[key]!r} is not supported by clip_jax")
    vision, text = mc.get("vision_cfg", {}), mc.get("text_cfg", {})
    resnet = isinstance(vision.get("layers"), list | tuple)  # open_clip's ModifiedResNet: 32 * width wide pool
    pool_type = vision.get("pool_type", "tok")
    if pool_type not in OPEN_CLIP_POOLS or (pool_type != "tok" and vision.get("final_ln_after_pool", False)):
        raise ConversionError(f"open_clip option vision_cfg.pool_type={pool_type!r}"
                              f"{' with final_ln_after_pool' if pool_type in OPEN_CLIP_POOLS else ''} is not "
                              "supported by clip_jax (it pools as pool_type 'tok' or 'avg' does, ln_post first)")
    return {
        "heads_vision": vision.get("width", 768) * (32 if resnet else 1) // vision.get("head_width", 64),
        "heads_text": text.get("heads", 8),
        "activation": "quick_gelu" if mc.get("quick_gelu", False) else "gelu",
        "pool": OPEN_CLIP_POOLS[pool_type],
    }


def open_clip_config(model: Mapping[str, Any], tokenizer_files: bool = False) -> dict[str, Any]:
    """The `open_clip_config.json` of a model, so that `open_clip.create_model("local-dir:DIR")` rebuilds it.
    `tokenizer_files`: the folder holds Hugging Face tokenizer files of the model's own vocabulary, which
    `open_clip.get_tokenizer("local-dir:DIR")` then reads (an HFTokenizer of the folder), lower-casing in Python as
    clip_jax's tokenizer does (HF's own lower-casing spells a word-final Greek sigma differently)."""
    v, t = model["vision"], model["text"]

    def mlp_ratio(tower):  # open_clip builds int(width * mlp_ratio): pick a ratio that gives mlp_dim back
        ratio = tower["mlp_dim"] / tower["width"]
        return ratio if int(tower["width"] * ratio) == tower["mlp_dim"] else (tower["mlp_dim"] + 0.5) / tower["width"]

    check_one_activation(model, "open_clip's model config")
    if v.get("type") == "resnet":
        vision_cfg = open_clip_vision_config(v)
    else:
        vision_cfg = {"image_size": v["image_size"], "layers": v["layers"], "width": v["width"],
                      "patch_size": v["patch_size"], "head_width": v["head_dim"], "mlp_ratio": mlp_ratio(v)}
        if v.get("pool", "token") != "token":
            vision_cfg["pool_type"] = _POOL_TYPES[v["pool"]]
    cfg = {
        "embed_dim": model["embed_dim"],
        "quick_gelu": t["activation"] == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": {"context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["width"],
                     "heads": t["heads"], "layers": t["layers"], "mlp_ratio": mlp_ratio(t)},
    }  # fmt: skip
    if tokenizer_files:
        cfg["text_cfg"] |= {"hf_tokenizer_name": ".", "tokenizer_kwargs": {"clean": "lower"}}
    if model.get("logit_bias_init") is not None:
        cfg["init_logit_bias"] = model["logit_bias_init"]
    mean, std = normalisation(model)
    return {"model_cfg": cfg, "preprocess_cfg": {"mean": mean, "std": std}}
