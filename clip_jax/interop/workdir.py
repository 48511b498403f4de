"""`clip-jax convert` (a PyTorch checkpoint -> a workdir) and `clip-jax export` (a workdir -> PyTorch files), and
`clip-jax stretch` (a workdir -> a workdir with longer text positions), and `write_workdir`, which `convert` and
`stretch` write their workdirs with.

A converted workdir is an ordinary one: config.json (`default_config()` with the model read from the source),
tokenizer.json, and an Orbax checkpoint at step 0 holding a full TrainState (the source's params, a fresh
optimizer state, the data iterator) written by the trainer's own `Checkpointer`. So `train` on it fine-tunes from
the source, and `eval` / `encode` / `export` read it like any trained run.

Sources: a state-dict file (OpenAI / open_clip / Long-CLIP layout, or HF keys), an open_clip hub directory
(`open_clip_config.json` + weights), or an HF `CLIPModel` directory (config.json + model.safetensors).

Nothing is overwritten: convert and stretch write new (or empty) folders only, and remove what they wrote when they
fail midway; export never writes into a workdir and replaces a previous export only with --force (the files its
EXPORT_RECORD names; a folder of model files that no export wrote is refused). Arguments and destinations are checked
before a checkpoint is read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import pathlib
import shlex
import shutil
import tempfile
from typing import Any

import numpy as np
from etils import epath

from clip_jax.errors import one_line
from clip_jax.files import is_workdir, refuse_inside_workdir
from clip_jax.interop import ConversionError
from clip_jax.interop import hf as hf_lib
from clip_jax.interop import openai as oa
from clip_jax.interop.safe_load import TORCH_SUFFIXES, damaged, read_tensors, torch_missing, write_tensors
from clip_jax.models.clip import normalisation_problem
from clip_jax.models.positions import resize_image_positions

log = logging.getLogger(__name__)

FORMATS = ("openai", "hf", "hf-text")
_OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                      "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclasses.dataclass
class Imported:
    model: dict[str, Any]  # a model config dict, as `model_preset` returns
    params: dict[str, Any]  # our params tree (unstacked), float32 numpy
    towers: tuple[str, ...]  # what the source holds: openai.TOWERS, or ("text",) for a text encoder
    source: str  # "openai" | "longclip" | "open_clip" | "hf"
    tokenizer_dir: pathlib.Path | None = None  # a directory with HF tokenizer files


def load_source(src: str | pathlib.Path, *, heads_vision: int | None = None, heads_text: int | None = None,
                activation: str | None = None) -> Imported:
    """Reads any supported PyTorch checkpoint into our params. Architecture: the source's config when it has
    one, else tensor shapes; heads and activation flags, when given, win over both."""
    src = pathlib.Path(src)
    oa.check_heads_flag(heads_vision, "vision")  # before reading a file of gigabytes
    oa.check_heads_flag(heads_text, "text")
    flags = {"heads_vision": heads_vision, "heads_text": heads_text, "activation": activation}
    if src.is_dir():
        if is_workdir(src):
            raise ConversionError(f"{src} is a clip_jax workdir already: train, eval, encode or export it directly")
        if (src / "open_clip_config.json").is_file():
            weights = _first_file(src, _OPEN_CLIP_WEIGHTS)
            config_json = _read_json(src / "open_clip_config.json")
            from_config = oa.open_clip_overrides(config_json)
            _warn_overridden(from_config, flags, src / "open_clip_config.json")
            imported = _from_openai(read_tensors(weights), {**from_config, **_given(flags)}, "open_clip", str(weights))
            _check_open_clip_sizes(config_json, imported.model, src / "open_clip_config.json")
            preprocess = config_json.get("preprocess_cfg", {})
            _set_normalisation(imported.model, preprocess.get("mean"), preprocess.get("std"),
                               f"{src / 'open_clip_config.json'}: preprocess_cfg")
            other = [f"{key} {preprocess[key]!r}" for key, ours in (("resize_mode", "shortest"),
                                                                   ("interpolation", "bicubic"))
                     if preprocess.get(key, ours) != ours]
            _warn_other_image_preparation(other, f"{src / 'open_clip_config.json'}: preprocess_cfg",
                                          imported.model["vision"]["image_size"])
            if (src / "vocab.json").is_file():  # an export of a model with its own vocabulary (export_params)
                imported = dataclasses.replace(imported, tokenizer_dir=src)
            return imported
        if (src / "config.json").is_file():
            return _from_hf_dir(src, flags)
        raise ConversionError(f"{src}: a directory needs config.json (Hugging Face) or open_clip_config.json")
    folder_config = {**dict.fromkeys(_OPEN_CLIP_WEIGHTS, "open_clip_config.json"),
                     **dict.fromkeys(_HF_WEIGHTS, "config.json")}.get(src.name)
    if folder_config and (src.parent / folder_config).is_file():
        raise ConversionError(f"{src} is the weights file of the folder beside its {folder_config}: convert the folder "
                              f"{src.parent}, whose config gives what the file lacks (heads, activations, the image "
                              "normalisation)")
    return load_source_state_dict(read_tensors(src), **flags, where=str(src))


def load_source_state_dict(sd: dict[str, np.ndarray], *, heads_vision: int | None = None,
                           heads_text: int | None = None, activation: str | None = None,
                           where: str = "the state dict") -> Imported:
    """`load_source` of a state dict already in memory (OpenAI / open_clip / Long-CLIP layout, or HF keys);
    `where` names it in errors (the file it was read from)."""
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):  # HF keys without their config.json
        sd = hf_lib.openai_from_hf(sd)
    flags = {"heads_vision": heads_vision, "heads_text": heads_text, "activation": activation}
    imported = _from_openai(sd, flags, "openai", where)
    vision = imported.model["vision"]
    wider = _OPEN_CLIP_WIDE_HEADS.get(vision["width"])
    if heads_vision is None and vision.get("type") != "resnet" and wider and wider[1] != vision["heads"]:
        log.warning("%s holds no config, so its image tower's heads are assumed to be %d (width // 64, as OpenAI's); "
                    "open_clip's %s, %d wide too, has %d: if that is this model, convert again with --heads-vision %d "
                    "(wrong heads convert without error into another model)", where, vision["heads"], wider[0],
                    vision["width"], wider[1], wider[1])
    return imported


# Image tower widths whose open_clip models have heads wider than OpenAI's 64 (their configs' head_width): a bare
# weights file of one converts with width // 64 heads unless told. (width: (model, heads))
_OPEN_CLIP_WIDE_HEADS = {1280: ("ViT-H-14", 16), 1408: ("ViT-g-14", 16), 1664: ("ViT-bigG-14", 16)}


def _set_normalisation(model: dict[str, Any], mean: Any, std: Any, where: str) -> None:
    """The image normalisation a source's preprocessing config gives (open_clip's preprocess_cfg, HF's
    preprocessor_config.json), into `model`; where it gives none, OpenAI's (the model's default) stays. The model was
    trained on images normalised so: another normalisation feeds its first layer other numbers (open_clip's ViT-L-14
    laion2b_s32b_b82k has mean and std 0.5)."""
    for key, rgb in (("image_mean", mean), ("image_std", std)):
        if rgb is None:
            continue
        if problem := normalisation_problem(key, rgb):
            raise ConversionError(f"{where}: its {key.split('_')[1]} {rgb!r} {problem}")
        model[key] = tuple(float(x) for x in rgb)


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flags.items() if v is not None}


def _warn_overridden(stated: dict[str, Any], flags: dict[str, Any], where: pathlib.Path) -> None:
    """Says where a --heads-* or --activation flag contradicts the source's own config: the flag wins (it may mend a
    wrong config), but a flag copied from another model's command silently makes other embeddings."""
    for key, value in _given(flags).items():
        if stated.get(key, value) != value:
            log.warning("--%s %s overrides %s, which says %s: the weights are read as the flag says (leave it out to "
                        "read them as their config says)", key.replace("_", "-"), value, where, stated[key])


def _check_open_clip_sizes(config_json: dict[str, Any], model: dict[str, Any], where: pathlib.Path) -> None:
    """Refuses an open_clip_config.json whose sizes are not its weights': the heads come from its widths, so a config
    of another model would read the weights with the wrong heads (open_clip itself refuses such a folder)."""
    mc = config_json.get("model_cfg", config_json)
    stated = [("embed_dim", mc.get("embed_dim"), model["embed_dim"])]
    text = mc.get("text_cfg", {})
    stated += [(f"text_cfg.{key}", text.get(key), model["text"][ours])
               for key, ours in (("width", "width"), ("layers", "layers"), ("context_length", "context_length"),
                                 ("vocab_size", "vocab_size"))]
    vision = mc.get("vision_cfg", {})
    resnet = model["vision"].get("type") == "resnet"
    if "layers" in vision and isinstance(vision["layers"], list | tuple) != resnet:  # open_clip: a list for a ResNet
        said, found = ("a ResNet", "a ViT's") if not resnet else ("a ViT", "a ResNet's")
        raise ConversionError(f"{where} says {said} image tower but its weights are {found}: the config is not this "
                              "model's; put the model's own config beside its weights")
    for key in ("width", "layers", "image_size", *(() if resnet else ("patch_size",))):
        said, found = vision.get(key), model["vision"][key]
        if key == "layers" and resnet:  # its blocks per stage, a list in the JSON (its width is the stem's)
            said, found = tuple(said) if said else None, tuple(found)
        stated.append((f"vision_cfg.{key}", said, found))
    for key, said, found in stated:
        if key.endswith("image_size") and isinstance(said, list | tuple) and len(set(said)) == 1:
            said = said[0]  # open_clip also writes a size as [224, 224]
        if said is not None and said != found:
            raise ConversionError(f"{where} says {key} {said!r} but its weights have {found!r}: the config is not "
                                  "this model's; put the model's own config beside its weights")


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise damaged(path, f"not valid JSON ({e})") from None


def _first_file(directory: pathlib.Path, names: tuple[str, ...]) -> pathlib.Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ConversionError(f"{directory}: no weights file (looked for {', '.join(names)})")


def _from_openai(sd: dict[str, np.ndarray], flags: dict[str, Any], source: str, where: str) -> Imported:
    source = "longclip" if "positional_embedding_res" in sd else source
    sd = oa.normalize_state_dict(sd)  # metadata and buffers out first: a causal mask holds -inf by design
    oa.check_finite(sd, where)
    flags = {"activation": "quick_gelu", **_given(flags)}  # OpenAI's weights were trained with QuickGELU
    model = oa.infer_model(sd, **flags)
    params = oa.params_from_state_dict(sd, model)
    _keep_the_temperature(model, params)
    return Imported(model, params, oa.TOWERS, source)


def _keep_the_temperature(model: dict[str, Any], params: dict[str, Any]) -> None:
    """A source's temperature above the model's clamp (CLIP's 100) is kept: open_clip and transformers apply
    exp(logit_scale) as it is (an HF fine-tune may pass 100), where the clamp would give other probabilities. The clamp
    is raised to it, so that fine-tuning the converted model keeps a bound."""
    if "logit_scale" in params and (bound := model.get("max_logit_scale", 0)) > 0:
        scale = float(np.exp(np.float64(np.asarray(params["logit_scale"]))))
        if scale > bound:
            model["max_logit_scale"] = math.ceil(scale * 100) / 100  # above float32's rounding of exp


def _hf_image_processor(src: pathlib.Path) -> tuple[dict[str, Any], pathlib.Path] | None:
    """(the image processor's settings, their file) of an HF folder: preprocessor_config.json, or transformers 5's
    processor_config.json, which nests them under "image_processor" (a saved CLIPProcessor)."""
    if (path := src / hf_lib.PREPROCESSOR_CONFIG).is_file():
        return _read_json(path), path
    if (path := src / "processor_config.json").is_file():
        settings = _read_json(path).get("image_processor")
        return (settings, path) if isinstance(settings, dict) else None
    return None


def _hf_preparation_differences(settings: dict[str, Any], image_size: int) -> list[str]:
    """How an HF image processor's settings prepare images otherwise than clip_jax: the shorter side resized to the
    image size, bicubic (PIL's resample 3), and a centre crop of that size."""
    size, crop = settings.get("size") or {}, settings.get("crop_size") or {}
    size = {"shortest_edge": size} if isinstance(size, int) else size
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    differences = [f"{key} {settings[key]!r}" for key in ("do_resize", "do_center_crop") if settings.get(key) is False]
    if size.get("shortest_edge", image_size) != image_size or set(size) - {"shortest_edge"}:
        differences.append(f"size {size!r}")
    if {crop.get("height", image_size), crop.get("width", image_size)} != {image_size}:
        differences.append(f"crop_size {crop!r}")
    if settings.get("resample", 3) != 3:
        differences.append(f"resample {settings['resample']!r}")
    return differences


def _warn_other_image_preparation(differences: list[str], where: Any, image_size: int) -> None:
    """Said where a source prepares its images otherwise than clip_jax does (the shorter side to the image size,
    bicubic, centre crop): the converted model sees other pixels of an image of another size (open_clip's "squash"
    resize, a resize larger than the crop), and its embeddings differ from the source's there."""
    if differences:
        log.warning("%s: the source prepares images with %s, where clip_jax resizes the shorter side to %d (bicubic) "
                    "and centre-crops %d: the converted model's embeddings of images of another size differ from "
                    "the source's; give it images prepared the source's way to compare", where,
                    ", ".join(differences), image_size, image_size)


def _from_hf_dir(src: pathlib.Path, flags: dict[str, Any]) -> Imported:
    cfg = _read_json(src / "config.json")
    towers = oa.TOWERS
    if cfg.get("model_type") == "clip_text_model":  # a text encoder (e.g. diffusers' text_encoder/)
        cfg, towers = {"text_config": cfg, "projection_dim": cfg.get("projection_dim", 512)}, ("text",)
    model = hf_lib.model_from_hf_config(cfg, **flags)
    try:  # what the file says, for the warning; a flag may be there to mend a value the file cannot be read with
        stated = hf_lib.model_from_hf_config(cfg)
    except ConversionError:
        stated = None
    if stated is not None:
        _warn_overridden({"heads_vision": stated["vision"]["heads"], "heads_text": stated["text"]["heads"],
                          "activation": stated["text"]["activation"]}, flags, src / "config.json")
    if (src / "model.safetensors.index.json").is_file():  # sharded (large models)
        shards = sorted(set(_read_json(src / "model.safetensors.index.json")["weight_map"].values()))
        sd = {k: v for shard in shards for k, v in read_tensors(src / shard).items()}
        where = f"{src} (sharded)"
    else:
        weights = _first_file(src, _HF_WEIGHTS)
        sd, where = read_tensors(weights), str(weights)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    oa.check_finite(sd, where)
    if towers == ("text",):
        sd.pop("logit_scale", None)
        if "text_projection.weight" not in sd:  # a plain CLIPTextModel has no projection
            raise ConversionError(f"{where}: a text encoder without text_projection cannot be imported")
    oa.check_tensors(sd, hf_lib.expected_hf_shapes(model, towers), where)
    params = oa.params_from_state_dict(hf_lib.openai_from_hf(sd), model, towers)
    if found := _hf_image_processor(src):
        settings, processor = found
        _set_normalisation(model, settings.get("image_mean"), settings.get("image_std"), str(processor))
        _warn_other_image_preparation(_hf_preparation_differences(settings, model["vision"]["image_size"]),
                                      processor, model["vision"]["image_size"])
    _keep_the_temperature(model, params)
    has_tokenizer = hf_lib.read_hf_tokenizer(src) is not None
    return Imported(model, params, towers, "hf", src if has_tokenizer else None)


# ---- tokenizer ---------------------------------------------------------------------------------------------------
def _tokenizer_state(tokenizer) -> dict[str, Any]:
    """The tokenizer's own JSON (vocab in id order, merges, special tokens): the public way to see its tables."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(pathlib.Path(tmp) / "tokenizer.json")
        return json.loads((pathlib.Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))


def _tokenizer_from_hf(directory: pathlib.Path):
    from clip_jax.data.tokenizer import ClipTokenizer

    vocab, merges = hf_lib.read_hf_tokenizer(directory)
    with tempfile.TemporaryDirectory() as tmp:  # HF's merges.txt is OpenAI's format: header line, then merges
        path = pathlib.Path(tmp) / "merges.txt"
        path.write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
        tokenizer = ClipTokenizer.from_openai_vocab(path)
    state = _tokenizer_state(tokenizer)
    hf_spelling = [hf_lib.HF_SOT if t == state["sot_token"] else hf_lib.HF_EOT if t == state["eot_token"] else t
                   for t in state["vocab"]]
    if vocab not in (hf_spelling, state["vocab"]):  # an HF folder's, or an open_clip export's (our spelling)
        raise ConversionError(
            f"{directory}: the tokenizer's vocabulary is not laid out as CLIP BPE (byte symbols, merges, SOT, EOT); "
            "pass --vocab with the model's BPE merges file"
        )
    return tokenizer


def resolve_tokenizer(imported: Imported, vocab: str | pathlib.Path | None = None):
    """--vocab PATH, else the source's HF tokenizer files, else OpenAI's vocabulary from open-clip-torch."""
    from clip_jax.data.tokenizer import ClipTokenizer

    if vocab is not None:
        path = pathlib.Path(vocab)
        if not path.is_file():
            raise ConversionError(f"--vocab {vocab} " + ("is a folder" if path.is_dir() else "does not exist") +
                                  ": give a tokenizer.json of a clip_jax workdir or a BPE merges file")
        try:
            return ClipTokenizer.load(path) if path.suffix == ".json" else ClipTokenizer.from_openai_vocab(path)
        except (ValueError, KeyError, UnicodeDecodeError, OSError, EOFError) as e:  # json, gzip and BPE errors
            raise ConversionError(f"--vocab {vocab} is not a tokenizer: {one_line(e)} (give a tokenizer.json of a "
                                  "clip_jax workdir, or a BPE merges file such as bpe_simple_vocab_16e6.txt.gz)"
                                  ) from None
    if imported.tokenizer_dir is not None:
        return _tokenizer_from_hf(imported.tokenizer_dir)
    path = ClipTokenizer.find_openai_vocab()
    if path is None:
        raise ConversionError(
            "no tokenizer vocabulary: pass --vocab PATH to bpe_simple_vocab_16e6.txt.gz (in the open-clip-torch wheel "
            "and in github.com/openai/CLIP under clip/), or pip install open-clip-torch so it is found"
        )
    return ClipTokenizer.from_openai_vocab(path)


# ---- convert -----------------------------------------------------------------------------------------------------
def convert_to_workdir(src: str | pathlib.Path, workdir: str | pathlib.Path, *, vocab: str | None = None,
                       activation: str | None = None, heads_vision: int | None = None, heads_text: int | None = None,
                       scan_layers: bool = False, image_size: int | None = None,
                       image_mean: tuple[float, ...] | None = None, image_std: tuple[float, ...] | None = None
                       ) -> dict[str, Any]:
    """Makes a workdir from a PyTorch checkpoint (see the module docstring), at another image resolution when
    `image_size` is given (the image position table interpolated), normalising images with `image_mean` and
    `image_std` where given (else as the source's config says, else OpenAI's). Returns a summary."""
    import ml_collections

    from clip_jax.config import default_config
    from clip_jax.data.classification import DEFAULT_TEMPLATES
    from clip_jax.data.tokenizer import OPENAI_VOCAB_NAME

    workdir = check_new_workdir(workdir, "--to-workdir")  # before reading a file of gigabytes
    imported = load_source(src, heads_vision=heads_vision, heads_text=heads_text, activation=activation)
    if imported.towers != oa.TOWERS:
        raise ConversionError(f"{src} holds only the {'/'.join(imported.towers)} tower; a workdir needs a full CLIP")
    tokenizer = resolve_tokenizer(imported, vocab)
    model, params = dict(imported.model, scan_layers=scan_layers), imported.params
    stated = oa.normalisation(model)
    _set_normalisation(model, image_mean, image_std, "--image-mean / --image-std")
    if stated != oa.normalisation({}) and oa.normalisation(model) != stated:
        log.warning("--image-mean / --image-std override %s's normalisation (mean %s, std %s): the images are "
                    "normalised as the flags say", src, *stated)
    if image_size is not None and image_size != model["vision"]["image_size"]:
        params, model["vision"] = resize_image_positions(params, model["vision"], image_size)
    if tokenizer.vocab_size > model["text"]["vocab_size"]:
        raise ConversionError(
            f"the tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} tokens but the model's token_embedding has "
            f"{model['text']['vocab_size']} rows; pass --vocab with the vocabulary the model was trained with"
        )
    config = default_config()
    config.model = ml_collections.ConfigDict(model)
    # Class names are prompted as CLIP's are: the defaults' data and few-shot set are the shapes, whose prompts
    # (`classification.name_templates`) a converted model never learnt (classify prompted it "a drawing of one {}.").
    config.few_shot.templates = DEFAULT_TEMPLATES
    config.data.tokenizer = (
        "openai" if tokenizer.name == OPENAI_VOCAB_NAME else str((workdir / "tokenizer.json").absolute())
    )
    write_workdir(config, oa.stack_layers(params) if scan_layers else params, tokenizer, workdir)
    log.info("converted %s (%s layout) into %s", src, imported.source, workdir)
    return {"source": imported.source, "workdir": str(workdir), "tokenizer": tokenizer.name, "model": model}


def write_workdir(config, params: dict[str, Any], tokenizer, workdir: str | pathlib.Path, method: Any = None
                  ) -> None:
    """A new workdir (config.json, tokenizer.json) whose step-0 checkpoint holds `params` (host arrays, in the
    model's tree): a full TrainState (fresh optimizer state, the data iterator) written by the trainer's own
    `Checkpointer`, which `train` takes as a warm start. The common end of `convert`, `stretch` and `wise-ft
    --save-workdir`; the last gives its prepared `method` (a few-shot method's data is its task's K-shot set)."""
    import jax

    from clip_jax.config import validate

    validate(config)
    workdir = check_new_workdir(workdir, "workdir")
    existed = workdir.exists()
    try:
        _write_workdir_files(config, params, tokenizer, workdir, method)
    except BaseException:
        # A half-written workdir (config.json, no checkpoint) would be refused by the next attempt as "already a
        # workdir": remove what this call wrote. The folder was new or empty (check_new_workdir), so that is all of it.
        if jax.process_index() == 0:
            _remove_contents(workdir, keep_folder=existed)
        raise


def _write_workdir_files(config, params: dict[str, Any], tokenizer, workdir: pathlib.Path, method: Any) -> None:
    import jax

    from clip_jax.data.pipeline import train_iterator
    from clip_jax.distributed import batch_rows
    from clip_jax.methods import get_method
    from clip_jax.sharding import batch_sharding, reader_mesh
    from clip_jax.train import state as state_lib
    from clip_jax.train.checkpoint import Checkpointer
    from clip_jax.train.loop import create_state, prepare_workdir

    prepare_workdir(config, workdir)
    if jax.process_index() == 0:
        tokenizer.save(workdir / "tokenizer.json")

    mesh = reader_mesh(config.mesh.to_dict())  # a stretch may read a run of another machine
    if method is None:
        method = get_method(config)
        data_iterator = train_iterator(config, tokenizer, captions=method.captions())
    else:  # as the trainer makes it: this host's rows of every batch
        data_iterator = method.train_data(config, tokenizer, batch_rows(config.batch_size, batch_sharding(mesh)))
    init_fn, shardings, tx = create_state(config, method, method.model(), mesh)
    _check_tree(params, jax.eval_shape(init_fn, jax.random.PRNGKey(0)).params)
    params = jax.device_put(params, shardings.params)
    state_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]  # as create_state's init would
    with jax.set_mesh(mesh):
        state = jax.jit(lambda p, r: state_lib.init_state(p, tx, r), out_shardings=shardings)(params, state_rng)
    # With the data iterator's state too: `train` restores both items, so a checkpoint without it would not load.
    checkpointer = Checkpointer(workdir, config.checkpoint)
    checkpointer.save(0, state, data_iterator, force=True)
    checkpointer.wait()
    checkpointer.close()


def check_new_workdir(path: str | pathlib.Path, flag: str) -> pathlib.Path:
    """The folder a new workdir goes to (new, or empty), or a ConversionError naming `flag`: a file, a workdir, a
    folder inside one or a folder holding anything would be overwritten or mixed in with."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{flag} {path} is a file; pass a new folder for the workdir")
    if is_workdir(path):
        raise ConversionError(f"{flag} {path} is already a clip_jax workdir; write into a new folder")
    refuse_inside_workdir(path, flag)
    if path.is_dir() and any(path.iterdir()):
        raise ConversionError(f"{flag} {path} is not empty; pass a new (or empty) folder for the workdir")
    return path


def _remove_contents(folder: pathlib.Path, *, keep_folder: bool) -> None:
    if not folder.is_dir():
        return
    if not keep_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _check_tree(params: dict, abstract: Any) -> None:
    """Our tree against the model's: a mismatch here is a bug in the key table, said plainly."""
    import jax

    ours = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    theirs = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:6]
        raise ConversionError(f"the params do not match the model's parameters: {diff}")


# ---- stretch -----------------------------------------------------------------------------------------------------
def stretch_workdir(src: str | pathlib.Path, out: str | pathlib.Path, *, method: str = "keep", keep: int | None = None,
                    ratio: int | None = None, length: int | None = None) -> dict[str, Any]:
    """`clip-jax stretch`: a new workdir `out` whose step-0 checkpoint (a warm start for `train`) is the latest
    checkpoint of `src` with its text positions stretched, config.json the source's with the new context length
    and keep_positions, and the same tokenizer. Returns the new {"context_length", "keep_positions", "model"} (the
    model's whole config) and the source's "source_context_length". `keep` and `ratio` (method "keep"; Long-CLIP's
    20 and 4 when None) are refused with method "interpolate"."""
    if method == "keep":
        keep, ratio = 20 if keep is None else keep, 4 if ratio is None else ratio
    import jax
    import ml_collections

    from clip_jax.config import ConfigError
    from clip_jax.methods import get_method
    from clip_jax.models.positions import check_stretch, stretch_text_positions
    from clip_jax.train.loop import load_trained

    # The arguments are checked against the source's config.json before its checkpoint is read.
    source = _source_config(src)
    try:
        get_method(source).captions()  # the step-0 checkpoint holds a caption pipeline's position
    except NotImplementedError:
        raise ConfigError(f"--workdir {src} is a {source.method.name} run, which trains on no captions: stretch the "
                          "CLIP it started from (its config.init_from), then train the method from the stretched "
                          "one") from None
    check_stretch(source.model.text.context_length, method=method, keep=keep, ratio=ratio, length=length)
    check_new_workdir(out, "--out-workdir")
    trained = load_trained(src)
    config, tokenizer, step = trained.config, trained.tokenizer, trained.step
    params = jax.tree.map(np.asarray, jax.device_get(trained.params))
    params, text = stretch_text_positions(params, config.model.text.to_dict(), method=method, keep=keep,
                                          ratio=ratio, length=length)
    config.model.text = ml_collections.ConfigDict(text)
    write_workdir(config, params, tokenizer, out)
    log.info("stretched %s (step %d) to %d text positions (keep %d) into %s", src, step, text["context_length"],
             text["keep_positions"], out)
    return {"context_length": text["context_length"], "keep_positions": text["keep_positions"],
            "source_context_length": source.model.text.context_length, "model": config.model.to_dict()}


def _source_config(src: str | pathlib.Path):
    """The config of the workdir `clip-jax stretch --workdir` names, or a ConfigError naming the flag."""
    from clip_jax.config import ConfigError, read_config

    if not is_workdir(src):  # e.g. an exported Hugging Face folder, whose config.json is not ours
        raise ConfigError(f"--workdir {src} is not a clip_jax workdir (no config.json of one); train or convert "
                          "into it first")
    return read_config(epath.Path(src) / "config.json")


# ---- export ------------------------------------------------------------------------------------------------------
def export_workdir(workdir: str | pathlib.Path, fmt: str, out: str | pathlib.Path, *, pt: bool = False,
                   force: bool = False, step: int | None = None) -> list[pathlib.Path]:
    """Writes a workdir's latest (or given) checkpoint as PyTorch files (see `export_params`)."""
    import jax

    from clip_jax.train.loop import load_trained

    check_export_out(out, fmt, pt=pt, force=force, source=workdir)  # before the checkpoint is read
    trained = load_trained(workdir, step)
    config, params = trained.config, trained.params
    tokenizer = json.loads((pathlib.Path(workdir) / "tokenizer.json").read_text(encoding="utf-8"))
    params = jax.tree.map(np.asarray, jax.device_get(params))
    return export_params(params, config.model.to_dict(), fmt, out, tokenizer=tokenizer, pt=pt, force=force)


# Every file an export writes, in any format: --force removes them all, so that a re-export in another format or
# weight format leaves no stale weights beside the new ones (transformers loads model.safetensors before
# pytorch_model.bin, open_clip's local-dir its first weights name).
_EXPORT_FILES = ("config.json", "open_clip_config.json", *_HF_WEIGHTS, *_OPEN_CLIP_WEIGHTS, *hf_lib.HF_TOKENIZER_FILES,
                 hf_lib.PREPROCESSOR_CONFIG)
# A folder export lists the files it wrote here, last: --force replaces only what an export wrote, never a folder of
# weights from elsewhere (the checkpoint that was converted, say) whose files merely have the same names.
EXPORT_RECORD = "clip_jax_export.json"
_FILE_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)  # an openai --out with one of these is a file, else a folder


def check_export_out(out: str | pathlib.Path, fmt: str, *, pt: bool = False, force: bool = False,
                     source: str | pathlib.Path | None = None) -> None:
    """Refuses, in one line, an export --out that would destroy something or that cannot be written: a clip_jax
    workdir, a folder inside one or the `source` workdir (even with --force: its config.json would be
    overwritten), an existing file or non-empty folder (unless --force), and a file where the format writes a
    folder or the reverse. Cheap: run before the checkpoint is read."""
    if fmt not in FORMATS:
        raise ConversionError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = pathlib.Path(out)
    refuse_inside_workdir(out, "--out", source)  # even with --force: its config.json would be overwritten
    blocking = next((p for p in out.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise ConversionError(f"--out {out}: {blocking} is a file, so nothing can be written under it; name a path in "
                              "a folder")
    if (pt or out.suffix.lower() in (".pt", ".bin")) and importlib.util.find_spec("torch") is None:
        raise ConversionError(f"{torch_missing('writing a .pt state dict')}; or write .safetensors (drop --pt)")
    if fmt == "openai" and out.suffix.lower() in _FILE_SUFFIXES:
        if pt and out.suffix.lower() == ".safetensors":
            raise ConversionError(f"--pt writes a torch pickle; name it .pt or .bin, not {out.name}")
        if out.is_dir():
            raise ConversionError(f"--out {out} is a folder; a {out.suffix} name writes one file: name a file, or "
                                  "drop the suffix to write an open_clip folder")
        if out.exists() and not force:
            raise ConversionError(f"--out {out} exists; pass --force to overwrite it")
        return
    if out.suffix.lower() in _FILE_SUFFIXES:
        raise ConversionError(f"--out {out}: --format {fmt} writes a folder, not a {out.suffix} file; name a folder")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is a file; --format {fmt} writes a folder: name a new folder")
    if out.is_dir() and any(out.iterdir()):
        recorded = _recorded_files(out)
        if not force:
            earlier = "the clip_jax export there (only the files it wrote are removed)" if recorded is not None else (
                "it (the files there are kept)")
            raise ConversionError(f"--out {out} is not empty; pass --force to export into {earlier}, or name a new "
                                  "folder")
        foreign = [name for name in _EXPORT_FILES if (out / name).exists() and name not in (recorded or ())]
        if foreign:
            raise ConversionError(f"--out {out} holds {', '.join(foreign)}, which no clip_jax export recorded writing "
                                  f"(in {EXPORT_RECORD}; exports of versions before 2026-12-06 kept none); --force "
                                  "replaces only a recorded export: name a new folder, or remove those files yourself")


def _recorded_files(out: pathlib.Path) -> list[str] | None:
    """The file names an earlier export in `out` recorded writing, or None where it holds no record."""
    record = out / EXPORT_RECORD
    if not record.is_file():
        return None
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{record} is not readable ({e}); remove the earlier export in {out} yourself, or name a "
                              "new folder") from None
    return [name for name in files if name in _EXPORT_FILES]  # a record edited by hand names nothing else


def _start_export(out: pathlib.Path, fmt: str) -> None:
    """Removes the files an earlier export recorded writing (check_export_out refused any other export file there),
    and records, before any is written, every name this export may write: an export that fails midway leaves its
    files recorded, so that a later --force replaces them."""
    for name in _recorded_files(out) or ():
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_record(out, fmt, list(_EXPORT_FILES))


def _write_record(out: pathlib.Path, fmt: str, names: list[str]) -> None:
    (out / EXPORT_RECORD).write_text(json.dumps({"format": fmt, "files": names}, indent=2) + "\n")


def _record_export(out: pathlib.Path, fmt: str, written: list[pathlib.Path]) -> list[pathlib.Path]:
    """The record of the files the export wrote, in place of the names it might have written."""
    _write_record(out, fmt, [p.name for p in written])
    return [*written, out / EXPORT_RECORD]


def export_params(params: dict[str, Any], model: dict[str, Any], fmt: str, out: str | pathlib.Path, *,
                  tokenizer: dict[str, Any] | None = None, pt: bool = False, force: bool = False
                  ) -> list[pathlib.Path]:
    """Writes params (stacked or not) of a model config dict; returns the paths written.

    openai: an OpenAI / open_clip state dict (with keep_positions > 0, Long-CLIP's: both position tables).
      `--out x.safetensors` (or .pt/.bin, or --pt) writes that one file; any other --out is a directory with
      open_clip_config.json + weights (`open_clip.create_model("local-dir:D")`; one merged position table).
    hf: a `CLIPModel` directory; hf-text: a `CLIPTextModelWithProjection` directory (for diffusers; it loads as
      `CLIPTextModel` too, which ignores text_projection). Long-CLIP's two position tables become the one merged
      table the model uses. Both get HF tokenizer files when `tokenizer` (the JSON state of our ClipTokenizer, as
      in a workdir's tokenizer.json) is given.
    An existing `out` is refused (`check_export_out`) unless `force`, which replaces a previous export there. A folder
    export ends with EXPORT_RECORD, the names of the files it wrote: what a later --force removes.
    """
    if fmt == "hf" and model["vision"].get("type") == "resnet":
        # (a GroupNorm tower has no --format openai either: it was suggested, then refused)
        openai = ("export --format openai (open_clip loads it), or " if model["vision"].get("norm") == "frozen_bn"
                  else "nor does any PyTorch format hold a GroupNorm ResNet (OpenAI's use BatchNorm): ")
        raise ConversionError(f"Hugging Face's CLIPModel has no ResNet image tower: {openai}--format hf-text for the "
                              "text tower alone")
    check_export_out(out, fmt, pt=pt, force=force)
    out = pathlib.Path(out)
    folder, existed = not (fmt == "openai" and out.suffix.lower() in _FILE_SUFFIXES), out.exists()
    if folder:
        _start_export(out, fmt)  # (into a non-empty folder with force only: check_export_out refuses it without)
    try:
        return _write_export(params, model, fmt, out, tokenizer, pt)
    except BaseException:
        if folder and not existed:  # a folder this export made: what it wrote goes, so that a retry needs no --force
            for name in (*_EXPORT_FILES, EXPORT_RECORD):
                (out / name).unlink(missing_ok=True)
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        elif folder and not any((out / name).exists() for name in _EXPORT_FILES):  # refused before writing a file:
            (out / EXPORT_RECORD).unlink(missing_ok=True)  # no record of an export that is not there
        raise


def _flags_a_weights_file_needs(model: dict[str, Any], sd: dict[str, np.ndarray]) -> dict[str, str]:
    """{`convert` flag: what it restores} for what a weights file of `model` (its state dict `sd`) cannot say and
    `convert` would read otherwise (heads of 64 wide, QuickGELU): read back without them, it is another model."""
    read = oa.infer_model(oa.normalize_state_dict(dict(sd)))
    flags = {f"--heads-{tower} {model[tower]['heads']}": f"{model[tower]['heads']} {tower} heads"
             for tower in ("vision", "text") if read[tower]["heads"] != model[tower]["heads"]}
    if (activation := model["text"]["activation"]) != read["text"]["activation"]:
        flags[f"--activation {activation}"] = f"activation {activation}"
    return flags


def _write_export(params: dict[str, Any], model: dict[str, Any], fmt: str, out: pathlib.Path,
                  tokenizer: dict[str, Any] | None, pt: bool) -> list[pathlib.Path]:
    """`export_params`'s files, into `out` that it checked (and, for a folder, recorded)."""
    if fmt == "openai":
        from clip_jax.data.tokenizer import OPENAI_VOCAB_NAME

        # A vocabulary of the run's own (data.tokenizer "train") goes with the weights, as files open_clip's
        # get_tokenizer("local-dir:DIR") reads; OpenAI's is open_clip's default tokenizer already.
        own_vocab = tokenizer is not None and tokenizer.get("name") != OPENAI_VOCAB_NAME
        sd = oa.state_dict_from_params(params, model)
        if out.suffix.lower() in _FILE_SUFFIXES:
            if model["text"].get("keep_positions", 0) not in (0, oa.LONGCLIP_KEEP):
                # Long-CLIP's layout says its 20 kept positions by convention only (its code, and `convert`, assume
                # 20): another count is written as the one table it amounts to, which reads back as the same model.
                sd = oa.single_position_table(sd, model)
            oa.check_class_token_pooled(model, f"{out.name} (a state dict without a config)")
            oa.check_one_activation(model, f"{out.name} (a state dict without a config)")
            if flags := _flags_a_weights_file_needs(model, sd):
                log.warning("%s holds the weights only, and this model's %s are not what a weights file is read with "
                            "(heads of 64 wide, QuickGELU): `clip-jax convert %s %s` reads it back as this model, "
                            "open_clip needs a model config of them, or export to a folder (its open_clip_config.json "
                            "says them)", out.name, " and ".join(flags.values()), shlex.quote(str(out)),
                            " ".join(flags))
            if oa.normalisation(model) != oa.normalisation({}):
                log.warning("%s holds the weights only, and this model normalises its images with mean %s and std %s, "
                            "not OpenAI's, which open_clip's transforms assume for a weights file: give open_clip "
                            "image_mean and image_std, or export to a folder (its open_clip_config.json says them)",
                            out.name, *oa.normalisation(model))
            if own_vocab:
                log.warning("%s holds the weights only, and this run has a vocabulary of its own (its workdir's "
                            "tokenizer.json): export to a folder to have it beside them (open_clip's local-dir "
                            "tokenizer reads it), or give it to `clip-jax convert --vocab`", out.name)
            return [write_tensors(out, sd, torch_format=pt or out.suffix.lower() != ".safetensors")]
        out.mkdir(parents=True, exist_ok=True)
        config_json = oa.open_clip_config(model, tokenizer_files=own_vocab)
        (out / "open_clip_config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        name = "open_clip_pytorch_model.bin" if pt else "open_clip_model.safetensors"
        # open_clip's CLIP has one position table: the folder is for open_clip.create_model, so merge Long-CLIP's.
        sd = oa.single_position_table(sd, model)
        written = [out / "open_clip_config.json", write_tensors(out / name, sd, torch_format=pt)]
        if own_vocab:
            hf_lib.write_hf_tokenizer(out, tokenizer["vocab"], tokenizer["merges"], tokenizer["sot_token"],
                                      tokenizer["eot_token"], model["text"]["context_length"], hf_names=False)
            written += [out / name for name in hf_lib.HF_TOKENIZER_FILES]
        return _record_export(out, fmt, written)

    towers = ("text",) if fmt == "hf-text" else oa.TOWERS
    if "visual" in towers:
        oa.check_class_token_pooled(model, "Hugging Face's CLIPModel")
    sd = hf_lib.hf_from_openai(oa.single_position_table(oa.state_dict_from_params(params, model, towers), model))
    vocab_size = tokenizer["vocab_size"] if tokenizer else model["text"]["vocab_size"]
    config_json = hf_lib.hf_config(model, sot_id=vocab_size - 2, eot_id=vocab_size - 1, text_only=fmt == "hf-text")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    # HF's safetensors loader wants metadata format=pt.
    weights = write_tensors(out / ("pytorch_model.bin" if pt else "model.safetensors"), sd, torch_format=pt,
                            metadata=None if pt else {"format": "pt"})
    written = [out / "config.json", weights]
    if fmt == "hf":  # the image processor's settings, so that CLIPProcessor.from_pretrained(out) loads
        (out / hf_lib.PREPROCESSOR_CONFIG).write_text(
            json.dumps(hf_lib.hf_preprocessor_config(model["vision"]["image_size"], *oa.normalisation(model)),
                       indent=2) + "\n")
        written.append(out / hf_lib.PREPROCESSOR_CONFIG)
    if tokenizer:
        hf_lib.write_hf_tokenizer(out, tokenizer["vocab"], tokenizer["merges"], tokenizer["sot_token"],
                                  tokenizer["eot_token"], model["text"]["context_length"])
        written += [out / name for name in hf_lib.HF_TOKENIZER_FILES]
    return _record_export(out, fmt, written)
