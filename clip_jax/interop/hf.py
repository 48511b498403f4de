"""Hugging Face `CLIPModel` / `CLIPTextModelWithProjection` layout: keys, config.json, tokenizer files.

HF keys are a rename of the OpenAI layout plus two changes (REFERENCE.md section 2): each block's fused
`in_proj` is split into `q_proj` / `k_proj` / `v_proj`, and the two projections are stored transposed as
Linear weights. So this module maps HF <-> OpenAI keys and `openai.py` does the rest.

Text pooling: HF pools at the first `eos_token_id` (or at argmax of the ids when a legacy config says
`eos_token_id == 2`), we pool at argmax of the ids. The two agree whenever the EOT id is the largest id in the
row and the first EOT is the end of the text, which holds for CLIP's tokenizers (EOT is the last id; HF pads
with EOT, open_clip and we pad with 0). Exported configs carry the tokenizer's real SOT/EOT ids.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clip_jax.interop import ConversionError
from clip_jax.interop.openai import ACTIVATIONS, TOWERS, layout, split_heads
from clip_jax.models.presets import model_preset

HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")  # we write
# HF configs written by older transformers omit fields equal to their defaults, so reading raw config.json
# needs the defaults of `CLIPTextConfig` / `CLIPVisionConfig` / `CLIPConfig`.
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                    "num_channels": 3}

# (OpenAI key, HF key, transposed)
_TOP = (
    ("logit_scale", "logit_scale", False),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", False),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", False),
    ("ln_final.weight", "text_model.final_layer_norm.weight", False),
    ("ln_final.bias", "text_model.final_layer_norm.bias", False),
    ("text_projection", "text_projection.weight", True),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding", False),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", False),
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", False),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight", False),  # sic: HF's spelling
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias", False),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight", False),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias", False),
    ("visual.proj", "visual_projection.weight", True),
)
_TOWERS = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
           ("transformer.resblocks.", "text_model.encoder.layers."))
_BLOCK = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
          ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))


def hf_from_openai(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF `CLIPModel` keys (or the text subset) of an OpenAI-layout state dict."""
    top = {o: (h, t) for o, h, t in _TOP}
    out = {}
    for key, x in sd.items():
        if key in top:
            name, transposed = top[key]
            out[name] = x.T if transposed else x
            continue
        for o_prefix, h_prefix in _TOWERS:
            if key.startswith(o_prefix):
                layer, rest = key[len(o_prefix):].split(".", 1)
                base = f"{h_prefix}{layer}."
                if rest.startswith("attn.in_proj_"):  # rows q;k;v
                    suffix = "weight" if rest.endswith("weight") else "bias"
                    for part, chunk in zip("qkv", np.split(x, 3, axis=0), strict=True):
                        out[f"{base}self_attn.{part}_proj.{suffix}"] = chunk
                else:
                    out[base + _rename(rest, _BLOCK)] = x
                break
        else:
            raise ConversionError(f"{key!r} has no counterpart in Hugging Face's CLIPModel (e.g. a SigLIP logit_bias): "
                                  "export --format openai (open_clip keeps it), or --format hf-text for the text tower")
    return out


def openai_from_hf(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The OpenAI layout of a (checked) HF state dict; unknown keys pass through unchanged."""
    top = {h: (o, t) for o, h, t in _TOP}
    block_re = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.*)")
    out, qkv = {}, {}
    for key, x in sd.items():
        if key.endswith("position_ids"):  # a buffer older transformers saved; not a weight
            continue
        if key in top:
            name, transposed = top[key]
            out[name] = x.T if transposed else x
        elif m := block_re.fullmatch(key):
            tower, layer, rest = m.groups()
            prefix = f"{_TOWERS[0][0] if tower == 'vision_model' else _TOWERS[1][0]}{layer}."
            if p := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((prefix, p.group(2)), {})[p.group(1)] = x
            else:
                out[prefix + _rename(rest, tuple((h, o) for o, h in _BLOCK))] = x
        else:
            out[key] = x
    for (prefix, suffix), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{suffix}"] = np.concatenate([parts[c] for c in "qkv"], axis=0)
    return out


def _rename(rest: str, table) -> str:
    for old, new in table:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def expected_hf_shapes(model: Mapping[str, Any], towers: tuple[str, ...] = TOWERS) -> dict[str, tuple]:
    """HF key -> shape for a model config, computed on zero-stride placeholders (no memory)."""
    placeholders = {k: np.broadcast_to(np.float32(0), shape) for k, _, shape, _, _ in layout(model, towers)}
    placeholders.pop("logit_bias", None)
    return {k: v.shape for k, v in hf_from_openai(placeholders).items()}


# ---- config.json -------------------------------------------------------------------------------------------------
def _activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise ConversionError(f"{where} hidden_act {name!r} is not supported; clip_jax has {', '.join(ACTIVATIONS)}")
    return name


def model_from_hf_config(cfg: Mapping[str, Any], *, heads_vision: int | None = None, heads_text: int | None = None,
                         activation: str | None = None) -> dict[str, Any]:
    """Our model config dict from an HF `CLIPModel` config.json (flags, when given, win over the file)."""
    if cfg.get("model_type", "clip") != "clip":
        raise ConversionError(f"config.json has model_type {cfg.get('model_type')!r}; expected 'clip' (CLIPModel)")
    text = {**_TEXT_DEFAULTS, **(cfg.get("text_config") or cfg.get("text_config_dict") or {})}
    vision = {**_VISION_DEFAULTS, **(cfg.get("vision_config") or cfg.get("vision_config_dict") or {})}
    for name, tower in (("text_config", text), ("vision_config", vision)):
        if abs(tower["layer_norm_eps"] - 1e-5) > 1e-12:
            raise ConversionError(f"{name}.layer_norm_eps {tower['layer_norm_eps']} is not supported (clip_jax: 1e-5)")
    if vision["num_channels"] != 3:
        raise ConversionError(f"vision_config.num_channels {vision['num_channels']} is not supported (RGB only)")
    model = model_preset("tiny")
    for ours, theirs, heads in (("vision", vision, heads_vision), ("text", text, heads_text)):
        width = theirs["hidden_size"]
        n_heads, head_dim = split_heads(width, heads, theirs["num_attention_heads"], ours)
        model[ours].update(
            width=width, layers=theirs["num_hidden_layers"], heads=n_heads, head_dim=head_dim,
            mlp_dim=theirs["intermediate_size"],
            activation=activation or _activation(theirs["hidden_act"], f"{ours}_config"),
        )
    model["vision"].update(patch_size=vision["patch_size"], image_size=vision["image_size"])
    model["text"].update(vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"])
    model["embed_dim"] = cfg.get("projection_dim", 512)
    return model


PREPROCESSOR_CONFIG = "preprocessor_config.json"


def hf_preprocessor_config(image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """preprocessor_config.json of a `CLIPImageProcessor` (what `CLIPProcessor.from_pretrained` needs beside the
    tokenizer): clip_jax's eval transform, the shorter side resized bicubic to the model's size, the centre crop,
    the model's RGB normalisation. transformers truncates the crop's offset where torchvision (and clip_jax) round it
    half to even: where the margin is odd, its crop is one pixel off ours."""
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
            "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(mean), "image_std": list(std)}


def hf_config(model: Mapping[str, Any], *, sot_id: int, eot_id: int, text_only: bool = False) -> dict[str, Any]:
    """config.json of a `CLIPModel` (or, text_only, a `CLIPTextModelWithProjection`)."""
    v, t = model["vision"], model["text"]
    common = {"layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
              "projection_dim": model["embed_dim"]}
    text = {"model_type": "clip_text_model", "vocab_size": t["vocab_size"], "hidden_size": t["width"],
            "intermediate_size": t["mlp_dim"], "num_hidden_layers": t["layers"], "num_attention_heads": t["heads"],
            "max_position_embeddings": t["context_length"], "hidden_act": t["activation"],
            # HF pads with EOT and pools at the first eos_token_id: the real EOT id keeps that at the text's end.
            "bos_token_id": sot_id, "eos_token_id": eot_id, "pad_token_id": eot_id, **common}
    if text_only:
        return {"architectures": ["CLIPTextModelWithProjection"], **text}
    vision = {"model_type": "clip_vision_model", "hidden_size": v["width"], "intermediate_size": v["mlp_dim"],
              "num_hidden_layers": v["layers"], "num_attention_heads": v["heads"], "num_channels": 3,
              "image_size": v["image_size"], "patch_size": v["patch_size"], "hidden_act": v["activation"], **common}
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": model["embed_dim"],
            "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "text_config": text, "vision_config": vision}


# ---- tokenizer files ---------------------------------------------------------------------------------------------
def write_hf_tokenizer(directory: str | pathlib.Path, vocab: list[str], merges: list[str], sot: str, eot: str,
                       context_length: int, *, hf_names: bool = True) -> None:
    """vocab.json + merges.txt (what HF's CLIPTokenizer reads) from a BPE vocabulary in id order, SOT and EOT
    renamed to HF's spelling (`hf_names`; else kept, as open_clip's tokenizer spells them: a caption holding the
    literal text of one then tokenizes as in clip_jax); the tokenizer pads with EOT and its model_max_length is the
    context length."""
    directory = pathlib.Path(directory)
    start, end = (HF_SOT, HF_EOT) if hf_names else (sot, eot)
    names = [start if tok == sot else end if tok == eot else tok for tok in vocab]
    if len(set(names)) != len(names):
        raise ConversionError("the vocabulary repeats a token string; vocab.json cannot represent it")
    (directory / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(names)}, ensure_ascii=False), encoding="utf-8"
    )
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    specials = {"bos_token": start, "eos_token": end, "unk_token": end, "pad_token": end}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False, **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def read_hf_tokenizer(directory: str | pathlib.Path) -> tuple[list[str], list[str]] | None:
    """(tokens in id order, HF's SOT/EOT spelling kept; merges as 'a b') of an HF tokenizer directory: from
    vocab.json + merges.txt, else from tokenizer.json (all transformers 5 writes). None if there is neither."""
    directory = pathlib.Path(directory)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        index = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        lines = (directory / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [m for m in lines if m.strip() and not m.startswith("#version")]
    elif (directory / "tokenizer.json").is_file():
        model = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
        if model.get("type") != "BPE":
            return None
        index = model["vocab"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    else:
        return None
    vocab = [tok for tok, _ in sorted(index.items(), key=lambda item: item[1])]
    if sorted(index.values()) != list(range(len(vocab))):
        raise ConversionError(f"{directory}: tokenizer ids are not 0..{len(vocab) - 1}")
    return vocab, merges
