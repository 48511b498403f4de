"""`convert`, `export` and `stretch` on bad input: each mistake is one line naming the file or flag (exit 2, no
traceback), stated before any work, and nothing that existed is changed: a workdir is never written into, a previous
export is replaced only with --force, and a failed convert leaves no half-written workdir behind.

The model is a tiny random OpenAI-layout state dict (numpy, no torch); the CLI runs in this process, its output
captured as a user would see it.
"""

import hashlib
import json
import pathlib
import struct

import numpy as np
import pytest

from clip_jax.errors import ConfigError
from clip_jax.interop import openai as oa
from clip_jax.interop import workdir as wd
from clip_jax.interop.safe_load import write_tensors
from clip_jax.models.presets import model_preset

from .conftest import clip_jax

CONTEXT = 16  # text positions of the tiny model (stretch bounds below follow from it)


def tiny_state_dict(image_size=32, seed=0):
    """A random OpenAI / open_clip state dict of a 1-layer, 32-wide model (vocabulary: OpenAI's, which convert
    finds in open-clip-torch)."""
    model = model_preset("tiny", context_length=CONTEXT)
    sizes = dict(width=32, layers=1, heads=1, head_dim=32, mlp_dim=64)
    model["vision"].update(sizes, patch_size=8, image_size=image_size)
    model["text"].update(sizes)
    model["embed_dim"] = 16
    rng = np.random.default_rng(seed)
    return {key: (0.02 * rng.standard_normal(shape)).astype(np.float32) for key, _, shape, _, _ in oa.layout(model)}


def assert_error(result, command, *needles):
    """Exit 2 and one `clip-jax CMD: error: ...` line holding every needle, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"clip-jax {command}: error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(folder):
    """Every file under `folder` (relative path -> content hash): equal snapshots mean nothing was added, removed
    or changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop_errors")
    write_tensors(root / "tiny.safetensors", tiny_state_dict())
    result = clip_jax("convert", root / "tiny.safetensors", "--to-workdir", root / "work")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "work"


@pytest.fixture
def unchanged(workdir):
    """The module's workdir, checked to be byte-for-byte the same after the test."""
    before = snapshot(workdir)
    yield workdir
    assert snapshot(workdir) == before


# ---- export ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,out,flags", [
    ("hf", ".", []),
    ("hf", ".", ["--force"]),
    ("hf-text", "exported", ["--force"]),  # a new folder inside the workdir
    ("openai", ".", ["--force"]),
    ("openai", "exported.safetensors", ["--force"]),
    ("openai", "checkpoints", ["--force"]),
])
def test_export_never_writes_into_a_workdir(unchanged, fmt, out, flags):
    result = clip_jax("export", "--workdir", unchanged, "--format", fmt, "--out", unchanged / out, *flags)
    assert_error(result, "export", "--out", "workdir")


def test_export_into_a_previous_export_needs_force(tmp_path, unchanged):
    pytest.importorskip("torch")  # --pt
    out = tmp_path / "hf"
    assert clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", out).returncode == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert_error(clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", out, "--pt"), "export",
                 str(out), "--force")
    assert snapshot(out) == before
    result = clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", out, "--pt", "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    # transformers prefers model.safetensors: the previous export's must not stay beside the new weights
    assert (out / "pytorch_model.bin").is_file() and not (out / "model.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not a file an export writes: kept


def test_force_never_replaces_model_files_that_no_export_wrote(tmp_path, unchanged):
    out = tmp_path / "hub"  # e.g. the open_clip folder that was converted, and a note beside it
    out.mkdir()
    for name in ("open_clip_config.json", "open_clip_model.safetensors", "notes.md"):
        (out / name).write_text(name)
    before = snapshot(out)
    assert_error(clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", out, "--force"), "export",
                 str(out), "open_clip_config.json, open_clip_model.safetensors", "no clip_jax export recorded writing")
    assert snapshot(out) == before
    (out / "open_clip_config.json").unlink()
    (out / "open_clip_model.safetensors").unlink()  # a folder of other files only: the export goes beside them
    result = clip_jax("export", "--workdir", unchanged, "--format", "openai", "--out", out, "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "notes.md").read_text() == "notes.md"
    record = json.loads((out / "clip_jax_export.json").read_text())
    assert record["format"] == "openai" and sorted(record["files"]) == ["open_clip_config.json",
                                                                        "open_clip_model.safetensors"]
    (out / "config.json").write_text("a user's, beside the recorded export")  # not in the record: kept, so refused
    assert_error(clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", out, "--force"), "export",
                 "holds config.json, which no clip_jax export recorded writing")
    (out / "config.json").unlink()
    assert clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", out, "--force").returncode == 0
    assert not (out / "open_clip_model.safetensors").exists() and (out / "model.safetensors").is_file()


def test_an_export_that_failed_midway_is_replaced_by_force(tmp_path, unchanged, monkeypatch):
    new, given = tmp_path / "hf", tmp_path / "given"
    given.mkdir()  # a folder the user made: what the failed export wrote there stays, recorded

    def disk_full(path, *args, **kwargs):
        raise OSError(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(wd, "write_tensors", disk_full)  # config.json written, the weights not
    for out in (new, given):
        assert_error(clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", out), "export",
                     "No space left on device")
    assert not new.exists()  # a folder the export made goes with what it wrote: the retry needs no --force
    assert (given / "config.json").is_file() and (given / "clip_jax_export.json").is_file()  # recorded before writing
    monkeypatch.undo()
    result = clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", new)
    assert result.returncode == 0, result.stderr[-3000:]
    result = clip_jax("export", "--workdir", unchanged, "--format", "hf", "--out", given, "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    # the weights are readable as any file the user writes (safetensors makes them owner-only)
    (tmp_path / "plain.txt").write_text("x")
    for out in (new, given):
        assert (out / "model.safetensors").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_export_over_an_existing_file_needs_force(tmp_path, unchanged):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"previous")
    assert_error(clip_jax("export", "--workdir", unchanged, "--format", "openai", "--out", out), "export",
                 str(out), "--force")
    assert out.read_bytes() == b"previous"
    result = clip_jax("export", "--workdir", unchanged, "--format", "openai", "--out", out, "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes() != b"previous"


def test_export_to_a_place_that_takes_no_file_is_one_line(tmp_path, unchanged):
    (tmp_path / "afile").write_text("mine")
    assert_error(clip_jax("export", "--workdir", unchanged, "--format", "openai", "--out",
                          tmp_path / "afile" / "x.safetensors"), "export", f"{tmp_path / 'afile'} is a file")
    assert (tmp_path / "afile").read_text() == "mine"
    if pathlib.Path("/proc/self").is_dir():  # a folder that takes no file, even from root: was SafetensorError, exit 1
        assert_error(clip_jax("export", "--workdir", unchanged, "--format", "openai", "--out",
                              "/proc/x.safetensors"), "export", "cannot write /proc/x.safetensors")


def test_export_out_of_the_wrong_kind_is_refused_before_reading_the_checkpoint(tmp_path):
    missing = tmp_path / "no-such-workdir"  # the --out checks come first: the workdir is not even looked at
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert_error(clip_jax("export", "--workdir", missing, "--format", "hf", "--out", a_file), "export",
                 str(a_file), "is a file")
    assert_error(clip_jax("export", "--workdir", missing, "--format", "hf", "--out", a_file, "--force"), "export",
                 str(a_file), "is a file")
    assert a_file.read_text() == "mine"
    a_folder = tmp_path / "weights.safetensors"
    a_folder.mkdir()
    assert_error(clip_jax("export", "--workdir", missing, "--format", "openai", "--out", a_folder), "export",
                 str(a_folder), "is a folder")
    assert list(a_folder.iterdir()) == []


def test_a_pickle_export_without_torch_is_refused_first_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else find_spec(name, *a))
    missing = tmp_path / "no-such-workdir"  # refused before the workdir is read (and before any vocabulary note)
    for out, flags in ((tmp_path / "w.pt", []), (tmp_path / "folder", ["--pt"])):
        result = clip_jax("export", "--workdir", missing, "--format", "openai", "--out", out, *flags)
        assert_error(result, "export", "needs torch, which is not installed", "[torch] extra")
        assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


# ---- convert -----------------------------------------------------------------------------------------------------
def test_convert_refuses_non_finite_weights(tmp_path):
    sd = tiny_state_dict()
    sd["visual.proj"][0, 0] = np.nan
    sd["ln_final.weight"][3] = np.inf
    write_tensors(tmp_path / "diverged.safetensors", sd)
    result = clip_jax("convert", tmp_path / "diverged.safetensors", "--to-workdir", tmp_path / "w")
    assert_error(result, "convert", str(tmp_path / "diverged.safetensors"), "'visual.proj'", "'ln_final.weight'")
    assert not (tmp_path / "w").exists()


def test_an_open_clip_config_of_another_model_is_refused_and_a_contradicting_flag_told(tmp_path, unchanged, caplog):
    hub = tmp_path / "hub"
    assert clip_jax("export", "--workdir", unchanged, "--format", "openai", "--out", hub).returncode == 0
    config_file = hub / "open_clip_config.json"
    config = json.loads(config_file.read_text())
    heads = config["model_cfg"]["vision_cfg"]["width"] // config["model_cfg"]["vision_cfg"]["head_width"]
    other = 2 if heads == 1 else 1
    with caplog.at_level("WARNING"):  # a flag that contradicts the folder's own config: read as the flag says, told
        assert clip_jax("convert", hub, "--to-workdir", tmp_path / "flagged", "--heads-vision", other).returncode == 0
    assert f"--heads-vision {other} overrides {config_file}, which says {heads}" in caplog.text
    config["model_cfg"]["vision_cfg"]["width"] *= 2  # another model's config: the heads would be read wrong
    config_file.write_text(json.dumps(config))
    assert_error(clip_jax("convert", hub, "--to-workdir", tmp_path / "w"), "convert",
                 f"says vision_cfg.width {config['model_cfg']['vision_cfg']['width']} but its weights have")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("flag,value", [("--heads-text", "0"), ("--heads-vision", "-2"), ("--heads-vision", "3")])
def test_convert_refuses_bad_heads(tmp_path, workdir, flag, value):
    result = clip_jax("convert", workdir.parent / "tiny.safetensors", "--to-workdir", tmp_path / "w", flag, value)
    assert_error(result, "convert", f"{flag} {value}")
    assert not (tmp_path / "w").exists()


def test_convert_refuses_a_vocab_that_is_not_a_tokenizer(tmp_path, workdir):
    (tmp_path / "captions.csv").write_text("image,caption\na.png,a red circle.\n")
    result = clip_jax("convert", workdir.parent / "tiny.safetensors", "--to-workdir", tmp_path / "w", "--vocab",
                      tmp_path / "captions.csv")
    assert_error(result, "convert", f"--vocab {tmp_path / 'captions.csv'} is not a tokenizer")
    assert not (tmp_path / "w").exists()


def _unreadable_source(tmp_path, workdir, name):
    """(path, what the error says) of a source that cannot be read, written under tmp_path."""
    good = (workdir.parent / "tiny.safetensors").read_bytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    files = {  # name: (content, what the error says)
        "cut.safetensors": (good[: len(good) // 2], "cut short"),
        "bad-json.safetensors": (struct.pack("<Q", 12) + b"{not json!!}", "cut short"),
        "cut-header.safetensors": (good[:20], "cut short"),
        "missing-data.safetensors": (struct.pack("<Q", len(header)) + header + b"\0" * 8, "cut short"),
        "empty.safetensors": (b"", "is empty"),
        "empty.pt": (b"", "is empty"),
        "text.pt": (b"hello, not a checkpoint", "not a PyTorch checkpoint (it starts like text)"),
        # was "refusing to load ...: it needs arbitrary Python unpickling ... (Unsupported operand 137)"
        "image.pt": (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a PyTorch checkpoint (it starts like a PNG image)"),
    }
    src = tmp_path / name
    if name in files:
        src.write_bytes(files[name][0])
        return src, files[name][1]
    if name == "cut.pt":  # torch.save's zip archive without its end (the central directory)
        torch = pytest.importorskip("torch")
        torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.pt")
        src.write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
        return src, "cut short"
    if name == "empty-folder":
        src.mkdir()
        return src, "config.json"
    if name == "bad-config":
        src.mkdir()
        (src / "config.json").write_text("{not json")
        return src, "config.json"
    assert name == "missing"
    return src, "not found"


SOURCES = ["image.pt", "cut.safetensors", "bad-json.safetensors", "cut-header.safetensors", "missing-data.safetensors",
           "empty.safetensors", "empty.pt", "text.pt", "cut.pt", "empty-folder", "bad-config", "missing"]


@pytest.mark.parametrize("name", SOURCES)
def test_convert_refuses_unreadable_sources(tmp_path, workdir, name):
    src, what = _unreadable_source(tmp_path, workdir, name)
    result = clip_jax("convert", src, "--to-workdir", tmp_path / "w")
    assert_error(result, "convert", str(src), what)
    assert not (tmp_path / "w").exists()


def test_convert_to_a_file_or_a_used_folder_is_refused(tmp_path, workdir):
    src = workdir.parent / "tiny.safetensors"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert_error(clip_jax("convert", src, "--to-workdir", a_file), "convert", f"--to-workdir {a_file}", "is a file")
    assert a_file.read_text() == "mine"
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert_error(clip_jax("convert", src, "--to-workdir", used), "convert", f"--to-workdir {used}", "not empty")
    assert snapshot(used) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_a_failed_convert_leaves_no_workdir(tmp_path, workdir, monkeypatch):
    """Writing fails midway (a full disk, here a checkpointer that raises): what this convert created is removed,
    so the next convert into the same place is not refused as "already a workdir"."""
    from clip_jax.interop.workdir import convert_to_workdir
    from clip_jax.train.checkpoint import Checkpointer

    src = workdir.parent / "tiny.safetensors"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    (tmp_path / "empty").mkdir()  # a folder that existed (empty) stays, emptied; a new one goes
    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "save", full_disk)
        for out in (tmp_path / "new", tmp_path / "empty"):
            with pytest.raises(OSError, match="No space left"):
                convert_to_workdir(src, out)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "empty").is_dir() and list((tmp_path / "empty").iterdir()) == []
    result = clip_jax("convert", src, "--to-workdir", tmp_path / "new")
    assert result.returncode == 0, result.stderr[-3000:]


# ---- stretch -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--keep", "-1"], "--keep -1"),
    (["--keep", str(CONTEXT - 1)], f"--keep {CONTEXT - 1}"),  # at least 2 positions past the kept ones
    (["--keep", "4", "--ratio", "0"], "--ratio 0"),
    (["--keep", "4", "--ratio", "1"], "--ratio 1: must be >= 2"),  # 1: a "stretched" workdir of the same length
    (["--method", "interpolate", "--length", "40", "--keep", "20"], "--keep and --ratio are for --method keep"),
    (["--method", "interpolate", "--length", str(CONTEXT)], f"--length {CONTEXT}"),
    (["--method", "interpolate", "--length", "1"], "--length 1"),
    (["--keep", "4", "--length", "40"], "--length"),  # a --length that --method keep would ignore
])
def test_stretch_refuses_bad_arguments(tmp_path, unchanged, flags, needle):
    result = clip_jax("stretch", "--workdir", unchanged, "--out-workdir", tmp_path / "long", *flags)
    assert_error(result, "stretch", needle)
    assert not (tmp_path / "long").exists()


def test_stretch_refuses_a_run_that_trains_on_no_captions(tmp_path, unchanged):
    """A few-shot run (CoOp's) has no caption pipeline to put in the stretched workdir: one line, not a
    NotImplementedError from deep inside."""
    config = json.loads((unchanged / "config.json").read_text())
    config["method"] = {"name": "coop"}
    coop = tmp_path / "coop"
    coop.mkdir()
    (coop / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="is a coop run, which trains on no captions"):
        wd.stretch_workdir(coop, tmp_path / "long", keep=4)
    assert not (tmp_path / "long").exists()


def test_stretch_refuses_a_used_out_workdir_and_a_source_that_is_not_a_workdir(tmp_path, unchanged):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for out, what in ((unchanged, "workdir"), (a_file, "is a file"), (unchanged / "long", "lies inside the clip_jax "
                                                                         "workdir")):
        result = clip_jax("stretch", "--workdir", unchanged, "--out-workdir", out, "--keep", "4")
        assert_error(result, "stretch", f"--out-workdir {out}", what)
    assert a_file.read_text() == "mine"
    hf = tmp_path / "hf"  # an exported Hugging Face folder: a config.json, not ours
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "clip"}))
    result = clip_jax("stretch", "--workdir", hf, "--out-workdir", tmp_path / "long", "--keep", "4")
    assert_error(result, "stretch", f"--workdir {hf}", "not a clip_jax workdir")
    assert not (tmp_path / "long").exists()
