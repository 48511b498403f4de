"""Reading and writing tensor files without running code from them.

* `.safetensors`: read with safetensors' numpy API, no torch needed. bfloat16 tensors, which numpy cannot
  represent, are read from the raw bytes through `ml_dtypes` (a jax dependency).
* `.pt` / `.pth` / `.bin`: `torch.load(map_location="cpu", weights_only=True)`. torch's restricted unpickler
  then accepts tensors, containers and primitives only; a file that needs any other class (a pickled
  `nn.Module`, or a payload whose `__reduce__` would run a command) is refused before anything executes.
* TorchScript archives (the raw OpenAI releases such as `ViT-B-32.pt`) are refused with the recipe to convert
  them: `torch.jit.load` deserialises a program, which we do not do on the user's behalf.

Every reader returns a flat `{key: np.ndarray}`; floating tensors come back as float32 (fp16/bf16 widen exactly).
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from clip_jax.interop import ConversionError

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

_TORCHSCRIPT_HELP = (
    "{path} is a TorchScript archive (e.g. a raw OpenAI CLIP release); clip-jax does not load TorchScript, which "
    "deserialises a program. If you trust the file, extract its weights once with: python -c \"import torch; "
    "from safetensors.torch import save_file; m = torch.jit.load('{path}', map_location='cpu'); "
    "save_file({{k: v.float().contiguous() for k, v in m.state_dict().items()}}, 'weights.safetensors')\" "
    "and convert weights.safetensors (open_clip's own downloads are plain state dicts and convert directly)"
)


def torch_missing(what: str) -> str:
    """What to do without torch, which only the conversion of pickles needs: the extra that pins the tested version."""
    return (f"{what} needs torch, which is not installed: add clip_jax's [torch] extra (python3 -m pip install -e "
            "'.[torch]' in its folder)")

def is_safetensors(path: pathlib.Path) -> bool:
    """By content, not by name: an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + length <= path.stat().st_size


def read_tensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a weights file as numpy arrays (float32 for floating point), with open_clip training
    checkpoints unwrapped (`{"state_dict": ...}`) and a `module.` prefix (DistributedDataParallel) removed."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty (0 bytes); download (or copy) it again")
    if is_safetensors(path):
        tensors = _read_safetensors(path)
    elif path.suffix == ".safetensors":
        raise damaged(path, "its safetensors header is incomplete or not JSON")
    else:
        tensors = _read_torch(path)
    if not tensors:
        raise ConversionError(f"{path} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def damaged(path: str | pathlib.Path, what: str) -> ConversionError:
    """The error for a weights file that is not whole, which an interrupted download or copy leaves."""
    return ConversionError(f"{path}: {what}: the file is damaged or was cut short; download (or copy) it again")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:  # safe_open checks the header and that the data it lists is all there
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                try:
                    out[key] = _widen(f.get_tensor(key))
                except TypeError:  # a dtype numpy lacks (bfloat16)
                    out[key] = _read_raw(path, key)
    except SafetensorError as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise damaged(path, f"unreadable safetensors ({_first_line(reason)})") from None
    return out


def _first_line(text: str, limit: int = 200) -> str:
    """A library's error message as one short line (torch's run to several sentences of advice)."""
    return " ".join(text.split())[:limit]


def _read_raw(path: pathlib.Path, key: str) -> np.ndarray:
    """One tensor straight from the safetensors layout (header length, JSON header, raw little-endian bytes)."""
    import ml_dtypes

    dtypes = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(length))[key]
        if entry["dtype"] not in dtypes:
            raise ConversionError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which clip-jax cannot read")
        start, end = entry["data_offsets"]
        f.seek(8 + length + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype=dtypes[entry["dtype"]]).reshape(entry["shape"]).astype(np.float32)


def _widen(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if np.issubdtype(x.dtype, np.floating) else np.asarray(x)


def _is_torchscript(path: pathlib.Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def _is_cut_zip(path: pathlib.Path) -> bool:
    """A zip archive (torch.save's format) without its end: the central directory, which a zip is read from, is
    at the end of the file, so a cut-short download starts like a zip but does not open as one."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(path)


_OTHER_FORMATS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8", "a JPEG image"), (b"GIF8", "a GIF image"),
                  (b"\x1f\x8b", "a gzip file"), (b"<", "HTML or XML"), (b"{", "JSON"))


def _not_torch(path: pathlib.Path) -> str | None:
    """What the file looks like when it cannot be a torch.save file, which is a zip archive (PK) or, before torch
    1.6, a pickle of protocol 2 or more (0x80): torch.load's own message then speaks of unpickling, misleadingly."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith((b"PK", b"\x80")):
        return None
    kind = next((name for magic, name in _OTHER_FORMATS if head.startswith(magic)), None)
    if kind is None:
        kind = "text" if head.isascii() and head.decode("ascii").isprintable() else f"bytes {head[:4].hex(' ')}"
    return kind


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    if (kind := _not_torch(path)) is not None:
        raise ConversionError(f"{path} is not a PyTorch checkpoint (it starts like {kind}); give a state dict "
                              "(.safetensors, .pt, .bin) or an open_clip or Hugging Face model folder")
    if _is_cut_zip(path):
        raise damaged(path, "an incomplete zip archive (torch.save's format)")
    if _is_torchscript(path):
        raise ConversionError(_TORCHSCRIPT_HELP.format(path=path))
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path} is a PyTorch pickle: {torch_missing('reading it')}, or convert it to .safetensors elsewhere"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names what it refused ("Unsupported global: GLOBAL io.open ..."): show that part.
        text = str(e)
        reason = text[text.find("WeightsUnpickler error:") :].removeprefix("WeightsUnpickler error:").strip()
        reason = reason.split(" was not an allowed global")[0].split("\n")[0] or "not a torch.save file"
        raise ConversionError(
            f"refusing to load {path}: it needs arbitrary Python unpickling, which can execute code, or is not a "
            f"PyTorch file at all ({reason[:200]}). Only plain tensor state dicts are read; if you trust the file, "
            "re-save its state_dict() as .safetensors and convert that"
        ) from None
    except EOFError:  # a pickle (torch's format before zip archives) that ends early
        raise damaged(path, "the PyTorch pickle ends early") from None
    except Exception as e:  # torch raises RuntimeError, KeyError, ... for files that are not its format
        raise ConversionError(
            f"{path}: torch.load cannot read it ({type(e).__name__}: {_first_line(str(e))}): it is not a PyTorch "
            "checkpoint, or it is damaged or was cut short (download it again)"
        ) from None
    return _tensors_of(_unwrap(obj), path, torch)


def _unwrap(obj: Any) -> Any:
    # open_clip training checkpoints: {"epoch", "name", "state_dict", "optimizer", ...}
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    return obj


def _tensors_of(obj: Any, path: pathlib.Path, torch) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict (names -> tensors), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if torch.is_tensor(value):  # other entries (ints, strings) are metadata of a training checkpoint
            value = value.detach()
            out[str(key)] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def _umask() -> int:
    """The process's file-creation mask: from /proc on Linux, else read by setting it (and back at once)."""
    try:
        status = pathlib.Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_tensors(path: str | pathlib.Path, tensors: Mapping[str, np.ndarray], *, torch_format: bool = False,
                  metadata: dict[str, str] | None = None) -> pathlib.Path:
    """Writes `.safetensors` (default, no torch needed) or, with torch_format, a `torch.save` state dict."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # (ascontiguousarray makes 0-d 1-d)
    if torch_format:
        try:
            import torch
        except ImportError:
            raise ConversionError(f"{torch_missing('writing a .pt state dict')}; or drop --pt") from None
    # Written beside its place and renamed: a failure (a full disk, a path that takes no file) leaves no torn
    # weights under the name a loader reads, and says in one line where and why.
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if torch_format:
            torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, partial)
        else:
            from safetensors.numpy import save_file

            save_file(arrays, str(partial), metadata=metadata)
        os.chmod(partial, 0o666 & ~_umask())  # safetensors creates its files owner-only; a weight file is shared
        os.replace(partial, path)
    except BaseException as e:  # a Ctrl-C too leaves no partial file
        partial.unlink(missing_ok=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # safetensors' own error for an OS one
            raise OSError(f"cannot write {path}: {' '.join(str(e).split())}") from None
        raise
    return path
