"""The train-step benchmark's own pieces (benchmarks/train_step.py): what it times and how it reads a profile."""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from clip_jax.config import load_config
from clip_jax.errors import ConfigError
from clip_jax.methods import get_method

ROOT = pathlib.Path(__file__).parents[1]


def load_script(name: str, module_name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("train_step", "train_step_benchmark")


def _event(name, start, end, **stats):
    return SimpleNamespace(name=name, start_ns=start * 1e9, end_ns=end * 1e9, stats=list(stats.items()))


def test_op_events_reads_cpu_threads_and_gpu_streams(bench):
    # A CPU trace: ops on the host's XLA threads name their instruction; the executor's own spans do not.
    cpu = SimpleNamespace(name="/host:CPU", lines=[
        SimpleNamespace(name="XLAEigen/1", events=[_event("fusion.1", 0.0, 2.0, hlo_op="fusion.1"),
                                                   _event("ThunkExecutor::Execute", 0.0, 4.0)]),
        SimpleNamespace(name="python", events=[_event("not an op", 0.0, 5.0)]),
    ])
    # A raw GPU trace: kernels on streams, each naming its HLO instruction; two kernels can make one op.
    gpu = SimpleNamespace(name="/device:GPU:0", lines=[
        SimpleNamespace(name="Stream #13(Compute)", events=[
            _event("sm90_xmma_gemm", 1.0, 2.0, hlo_op="%custom-call.3", hlo_module="jit_train_step"),
            _event("splitK_reduce", 2.0, 2.5, hlo_op="custom-call.3"),
            _event("memcpy", 0.0, 9.0),  # no instruction: not an op of the step
        ]),
    ])
    assert bench.op_events(SimpleNamespace(planes=[cpu, gpu])) == [
        ("/host:CPU", "fusion.1", "fusion.1", 0.0, 2.0),
        ("/device:GPU:0", "custom-call.3", "sm90_xmma_gemm", 1.0, 2.0),
        ("/device:GPU:0", "custom-call.3", "splitK_reduce", 2.0, 2.5)]
    # A post-processed trace's derived line is read alone (its ops are the streams' kernels over again).
    derived = SimpleNamespace(name="/device:GPU:0", lines=[
        SimpleNamespace(name="XLA Ops", events=[_event("fusion.2", 1.0, 4.0)]),
        SimpleNamespace(name="Stream #13(Compute)", events=[_event("kernel", 1.0, 4.0, hlo_op="fusion.2")]),
    ])
    assert bench.op_events(SimpleNamespace(planes=[derived])) == [("/device:GPU:0", "fusion.2", "fusion.2", 1.0, 4.0)]


# A piece of optimised GPU HLO: a multi-output fusion (a tuple type, with spaces), a cuBLAS and a cuDNN call.
HLO = """
%fused_add_reduce (p0: bf16[8,4]) -> (bf16[4], bf16[8,4]) {
  %p0 = bf16[8,4]{1,0} parameter(0)
  %r = bf16[4]{0} reduce(%p0, %c), dimensions={0}, to_apply=%add
  ROOT %t = (bf16[4]{0}, bf16[8,4]{1,0}) tuple(%r, %p0), metadata={op_name="jit(step)/ln_2/add_any"}
}

ENTRY %main (x: bf16[8,4]) -> bf16[8,4] {
  %input_add_reduce_fusion.1 = (bf16[4]{0}, bf16[8,4]{1,0}) fusion(%x), kind=kInput, calls=%fused_add_reduce
  %custom-call.3 = (bf16[8,4]{1,0}, s8[64]{0}) custom-call(%x, %x), custom_call_target="__cublas$lt$matmul", \
metadata={op_name="jit(step)/mlp/c_fc/dot_general"}
  %custom-call.4 = (bf16[8,4]{1,0}, u8[0]{0}) custom-call(%x, %x, %x), custom_call_target="__cudnn$fmhaSoftmax", \
metadata={op_name="jit(step)/attn/dot_product_attention"}
}
"""


def test_ops_are_found_by_instruction_or_kernel_name(bench):
    kinds = bench.op_kinds(HLO)
    assert kinds["input_add_reduce_fusion.1"] == ("reduction", "jit(step)/ln_2/add_any")
    assert kinds["custom-call.3"] == ("matmul", "jit(step)/mlp/c_fc/dot_general")
    assert kinds["custom-call.4"] == ("attention", "jit(step)/attn/dot_product_attention")
    kinds.update({name.replace(".", "_").replace("-", "_"): kind for name, kind in kinds.items()})
    # Outside a CUDA graph the event names its instruction; inside one only the graph, and the kernel is named
    # after its fusion; a library's kernels are known by their names.
    assert bench.event_kind("custom-call.3", "sm90_xmma_gemm", kinds)[0] == "matmul"
    assert bench.event_kind("command_buffer_7", "input_add_reduce_fusion_1", kinds)[0] == "reduction"
    assert bench.event_kind("command_buffer_7", "nvjet_sm90_tst_128x160", kinds)[0] == "matmul"
    assert bench.event_kind("command_buffer_7", "cudnn_generated_sdpa_flash_fprop", kinds)[0] == "attention"
    assert bench.event_kind("command_buffer_7", "memcpy128", kinds)[0] == "layout"
    assert bench.event_kind("command_buffer_7", "layer_norm_backward__3", kinds)[0] == "reduction"
    assert bench.event_kind("fusion.99", "another_programs_kernel", kinds) is None


def test_busy_seconds_counts_overlapping_ops_once(bench):
    # Two streams overlap on [1, 2]; a gap [3, 5] is idle; an op inside another adds nothing.
    assert bench.busy_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (5.2, 5.8)]) == pytest.approx(4.0)
    assert bench.busy_seconds([]) == 0.0


def test_synthetic_batch_follows_the_methods_fields(bench):
    from clip_jax.methods.base import Field

    fields = {"image": Field((4, 4, 3), np.uint8), "text": Field((6,), np.int32),
              "short_text": Field((3,), np.int32), "audio": Field((10,), np.float32), "label": Field((), np.int32)}
    batch = bench.synthetic_batch(fields, 5, vocab_size=50)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((5, *f.shape), np.dtype(f.dtype)) for k, f in fields.items()}
    for name in ("text", "short_text"):
        assert (batch[name][:, -1] == 49).all() and (batch[name][:, :-1] < 49).all() and (batch[name] > 0).all()
    assert np.abs(batch["audio"]).max() <= 1 and (batch["label"] == 0).all()


def test_a_recipe_is_timed_as_it_is_with_the_command_lines_overrides(bench, monkeypatch):
    # (the batch a PCA of 16 components needs per shard of 8 fake devices, as the trainer checks)
    monkeypatch.setattr("sys.argv", ["train_step.py", "--config", str(ROOT / "configs" / "longclip_shapes.py"),
                                     "--batch", "256", "--scan", "--attention", "cudnn", "--dtype", "bfloat16"])
    config = bench.benchmark_config(bench.parse_args())
    assert (config.method.name, config.batch_size, config.model.scan_layers) == ("longclip", 256, True)
    assert config.model.attention == "cudnn"
    assert config.model.dtype == "bfloat16" and config.optimizer.frozen == ("^text/positional_embedding$",)
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "tiny", "--attention", "cudnn"])
    with pytest.raises(ConfigError, match="model.attention 'cudnn' needs model.dtype bfloat16"):
        bench.benchmark_config(bench.parse_args())
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "tiny"])
    config = bench.benchmark_config(bench.parse_args())
    assert (config.method.name, config.batch_size, config.model.remat_policy) == ("clip", 32, "none")
    assert config.model.attention == "auto" and config.model.vision.patch_dropout == 0
    for recipe in ("--preset", "tiny"), ("--config", str(ROOT / "configs" / "demo.py")):
        monkeypatch.setattr("sys.argv", ["train_step.py", *recipe, "--patch-dropout", "0.5"])
        assert bench.benchmark_config(bench.parse_args()).model.vision.patch_dropout == 0.5


def test_a_recipe_keeps_its_mesh_and_accumulation_and_a_mesh_it_cannot_use_is_one_line(bench, monkeypatch, capsys):
    """--mesh and --accum defaulted to pure data parallelism and 1, replacing a recipe's own FSDP mesh without a word
    (a compile-only plan measured another sharding); a mesh the devices or the batch do not fit compiled, or failed
    in a traceback, where the trainer refuses it in one line."""
    pretrain = str(ROOT / "configs" / "pretrain.py") + ":tiny"
    monkeypatch.setattr("sys.argv", ["train_step.py", "--config", pretrain, "--batch", "64"])
    config = bench.benchmark_config(bench.parse_args())
    assert config.mesh.to_dict() == load_config(pretrain).mesh.to_dict() and config.accum_steps == 1
    monkeypatch.setattr("sys.argv", ["train_step.py", "--config", pretrain, "--batch", "64", "--mesh", "2,4,1",
                                     "--accum", "2", "--no-scan"])
    config = bench.benchmark_config(bench.parse_args())
    assert (config.mesh.to_dict(), config.accum_steps, config.model.scan_layers) == (
        {"data": 2, "fsdp": 4, "tensor": 1}, 2, False)
    for argv, words in ((["--batch", "12", "--mesh", "8,1,1"], "batch_size 12 must be a multiple of 8"),
                        (["--mesh", "3,-1,1"], "config.mesh:")):
        monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "tiny", *argv])
        with pytest.raises(ConfigError, match=words):
            bench.benchmark_config(bench.parse_args())
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "tiny", "--mesh", "2,4"])
    with pytest.raises(SystemExit):
        bench.parse_args()
    assert "expected data,fsdp,tensor: three integers (-1 for the rest), not '2,4'" in capsys.readouterr().err


def test_a_resnet_preset_is_timed_without_a_vits_settings(bench, monkeypatch, capsys):
    # --preset RN50 failed: the preset's tower was given patch_dropout, which a ResNet tower does not have
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "RN50", "--batch", "8"])
    config = bench.benchmark_config(bench.parse_args())
    assert config.model.vision.type == "resnet" and "patch_dropout" not in config.model.vision
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "RN50", "--open-clip"])
    with pytest.raises(SystemExit):
        bench.parse_args()
    assert "--open-clip builds open_clip's ViT CLIPs only" in capsys.readouterr().err


def test_compile_only_reports_the_collectives_of_a_data_parallel_step(bench, monkeypatch, tmp_path):
    """On a mesh of data parallelism alone (this process's 8 fake devices) a step's collectives are known by hand:
    the loss gathers both towers' features (batch x embed_dim each), and the gradients are summed over the devices,
    every parameter once, in float32."""
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "tiny", "--vocab-size", "64", "--image-size", "32",
                                     "--context-length", "8", "--batch", "16", "--mesh", "8,1,1", "--compile-only",
                                     "--out", str(tmp_path)])
    create_state = bench.create_state

    def shapes_only(*args):  # the state is traced for its shapes, never made (a pod's model would not fit here)
        init_fn, shardings, tx = create_state(*args)

        def init(key):
            assert isinstance(key, jax.core.Tracer), "--compile-only initialised the train state"
            return init_fn(key)
        return init, shardings, tx

    monkeypatch.setattr(bench, "create_state", shapes_only)
    bench.main()
    (path,) = tmp_path.glob("*.json")
    assert path.name == "train_step_tiny_px32_ctx8_float32_b16_mesh8-1-1_compiled_cpu.json"
    ours = json.loads(path.read_text())["clip_jax"]
    assert "step_time_s" not in ours and ours["temp_memory_gib_per_device"] > 0
    assert ours["argument_memory_gib_per_device"] > 0  # the state and the batch: the trainer's four figures
    config = bench.benchmark_config(bench.parse_args())
    method = get_method(config)
    params = jax.eval_shape(lambda: method.model().init(jax.random.key(0), *method.init_inputs()[:2]))
    mib = 2**20
    traffic = ours["collectives_per_device"]
    assert traffic["all-gather"]["mib"] == pytest.approx(2 * 16 * config.model.embed_dim * 4 / mib, abs=1e-3)
    assert traffic["all-reduce"]["mib"] == pytest.approx(sum(x.size for x in jax.tree.leaves(params)) * 4 / mib,
                                                         abs=1e-3)


def test_a_recipe_that_prepares_arrays_is_timed_on_its_own_data(bench, monkeypatch, tmp_path):
    # LSeg's step needs the label embeddings its `prepare` makes (the script stopped with a RuntimeError there), and
    # its label maps are not random bytes (a detector's loss on random boxes is not finite): a batch of its own data
    monkeypatch.setattr("sys.argv", ["train_step.py", "--config", str(ROOT / "configs" / "lseg_shapes.py"),
                                     "--batch", "8", "--steps", "1", "--out", str(tmp_path)])
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype: {"peak_tflops_per_s": 1.0})  # (not what this checks)
    monkeypatch.setattr(bench, "synthetic_batch", None)  # a recipe on generated data is timed on that data
    bench.main()
    (path,) = tmp_path.glob("*.json")
    ours = json.loads(path.read_text())["clip_jax"]
    assert ours["method"] == "lseg" and ours["nonfinite_steps"] == 0 and np.isfinite(ours["losses"]).all()


@pytest.mark.parametrize("profile", ["train_step_B16_bfloat16_b512_remat-dots_scan_cudnn_gpu",  # H200, 2026-12-04
                                     "train_step_B16_bfloat16_b512_remat-dots_cudnn_ln-pallas_gpu_H100_2026-12-06"])
def test_the_kept_gpu_traces_are_read_whole(bench, profile):
    # B/16 steps profiled on an H200 (scanned towers) and an H100 (unrolled, the Pallas LayerNorm kernels), with
    # cuDNN's attention and CUDA graphs: every kernel is matched to its HLO instruction or known as a library's or
    # a Pallas kernel's (but for a few microseconds of small kernels of other programs), and the ops fill the GPU's
    # busy time without gaps or overlaps.
    summary = bench.read_kept_profile(str(ROOT / "benchmarks/results/profiles" / profile))
    assert summary["unmatched_op_seconds"] < 1e-4 * summary["op_seconds"]
    assert summary["device_busy_s"] == pytest.approx(summary["op_seconds"], rel=0.01)
    assert set(summary["seconds_by_kind"]) == {"matmul", "attention", "reduction", "elementwise", "layout"}
    assert sum(summary["share_by_kind"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("depth", [2, 0])
def test_pipelined_time_runs_ahead_as_the_trainer_does(bench, monkeypatch, depth):
    # Fake steps on a fake clock: `count` steps timed after one untimed step, the host waiting for the step `depth`
    # back (two on an accelerator, none on the CPU: host_memory.dispatch_depth), then for the rest at the end.
    events = []

    class Clock:
        now = 0.0

        @staticmethod
        def perf_counter():
            return Clock.now

    class Outputs:
        def __init__(self, k):
            self.k = k

        def block_until_ready(self):
            events.append(f"wait {self.k}")
            Clock.now += 0.4  # the device's time
            return self

    def step(wait=True):
        k = sum(e.startswith("step") for e in events)
        events.append(f"step {k}" + (" waited" if wait else ""))
        Clock.now += 0.1  # the host's launch
        return Outputs(k)

    monkeypatch.setattr(bench, "time", Clock)
    monkeypatch.setattr(bench, "dispatch_depth", lambda: depth)
    seconds = bench.pipelined_times(step, 4)
    if depth == 2:
        assert events == ["step 0 waited", "step 1", "step 2", "step 3", "wait 1", "step 4", "wait 2", "wait 3",
                          "wait 4"]
    else:
        assert events == ["step 0 waited", "step 1", "wait 1", "step 2", "wait 2", "step 3", "wait 3", "step 4",
                          "wait 4"]
    # Between completions: with two ahead, three launches before the first wait, then one launch per wait, then
    # the waits alone; with none, a launch and a wait each.
    assert seconds == pytest.approx([0.3 + 0.4, 0.1 + 0.4, 0.4, 0.4] if depth == 2 else [0.1 + 0.4] * 4)


def test_result_name_says_what_ran(bench):
    args = SimpleNamespace(config=None, preset="B/16", image_size=None, context_length=None, mesh=None,
                           compile_only=False)
    facts = {"batch": 512, "mesh": {"data": 8, "fsdp": 1, "tensor": 1}, "accum_steps": 1,
             "model": {"dtype": "bfloat16", "remat_policy": "dots", "scan_layers": True, "layer_norm": "xla",
                       "attention": {"vision": "cudnn", "text": "xla"}}}
    assert bench.result_name(args, facts, "gpu") == "train_step_B16_bfloat16_b512_remat-dots_scan_cudnn_gpu.json"
    facts["model"]["attention"] = {"vision": "xla", "text": "xla"}
    assert bench.result_name(args, facts, "cpu") == "train_step_B16_bfloat16_b512_remat-dots_scan_cpu.json"
    facts["model"]["layer_norm"] = "pallas"
    assert bench.result_name(args, facts, "gpu") == "train_step_B16_bfloat16_b512_remat-dots_scan_ln-pallas_gpu.json"
    facts["model"].update(layer_norm="xla", patch_dropout=0.5)
    assert bench.result_name(args, facts, "cpu") == "train_step_B16_bfloat16_b512_remat-dots_scan_patchdrop0.5_cpu.json"
    args.mesh, args.compile_only = (2, 4, 1), True
    facts.update(mesh={"data": 2, "fsdp": 4, "tensor": 1}, accum_steps=4)
    assert bench.result_name(args, facts, "cpu") == (
        "train_step_B16_bfloat16_b512_remat-dots_scan_patchdrop0.5_mesh2-4-1_accum4_compiled_cpu.json")
    args.mesh, facts["mesh"] = None, {"data": 1, "fsdp": 8, "tensor": 1}  # a recipe's own mesh is named too
    assert "_mesh1-8-1_accum4_compiled" in bench.result_name(args, facts, "cpu")


def test_cpu_facts_tell_apart_cpus_of_one_model_name(bench):
    # Two VMs that both call themselves "AMD EPYC": the family, model and SIMD extensions say which is which.
    # `bench` puts benchmarks/ on the path, where machine.py lives.
    from machine import cpu_facts

    def cpuinfo(family, model, flags):
        processor = (f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
                     f"model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu sse2 {flags}\n")
        return "\n".join(processor.format(i) for i in range(2))

    zen4 = cpu_facts(cpuinfo(25, 17, "avx2 fma avx512f avx512_bf16 avx512_vnni"))
    older = cpu_facts(cpuinfo(23, 49, "avx2 fma"))
    assert zen4 | {"cpu_count": None} == {"model_name": "AMD EPYC", "cpu_count": None, "family": 25, "model": 17,
                                          "stepping": 1, "simd": ["avx2", "fma", "avx512f", "avx512_bf16",
                                                                  "avx512_vnni"]}
    assert (older["family"], older["model"], older["simd"]) == (23, 49, ["avx2", "fma"])


def test_demo_validation_stops_a_challenger_only_once_it_cannot_win(bench, monkeypatch):
    # benchmarks/demo_validation.py's futility stop; `bench` puts benchmarks/ on the path for its `machine` import.
    spec = importlib.util.spec_from_file_location("demo_validation", ROOT / "benchmarks" / "demo_validation.py")
    validation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validation)
    monkeypatch.setattr(validation, "ROUNDS", (("old", ("new", "other"), 0.01),))
    runs = {f"{name} seed {seed}": {"zero_shot_top1_val": top1}
            for name, seed, top1 in [("old", 0, 0.8), ("old", 1, 0.9), ("new", 0, 0.6)]}
    seeds = [0, 1]
    assert validation.mean_top1("old", runs, seeds) == pytest.approx(0.85)
    assert validation.mean_top1("new", runs, seeds) is None
    # the bar is 0.86; 1.0 on its second seed would give `new` 0.8 at best: lost already
    assert "0.800, short of old's 0.860" in validation.lost_already("new", runs, seeds)
    assert validation.lost_already("other", runs, seeds) == ""  # no seed run yet: it may still win
    runs["new seed 0"]["zero_shot_top1_val"] = 0.75  # (0.75 + 1.0) / 2 = 0.875 >= 0.86: may still win
    assert validation.lost_already("new", runs, seeds) == ""
    del runs["old seed 1"]  # no bar without the incumbent's mean
    runs["new seed 0"]["zero_shot_top1_val"] = 0.1
    assert validation.lost_already("new", runs, seeds) == ""
    assert validation.lost_already("old", runs, seeds) == ""  # not a challenger in any round


def test_a_result_never_replaces_an_earlier_one(tmp_path):
    """The figures the docs cite are files under benchmarks/results: a repeated command wrote over them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from result_files import new_result_path

    path = tmp_path / "train_step_tiny_cpu.json"
    assert new_result_path(path) == path
    path.write_text("{}")
    assert new_result_path(path) == tmp_path / "train_step_tiny_cpu_2.json"
    (tmp_path / "train_step_tiny_cpu_2.json").write_text("{}")
    assert new_result_path(path) == tmp_path / "train_step_tiny_cpu_3.json"


# Stand-ins for open_clip's process (module level: a spawned process imports them by name).
def _open_clip_fails_at_once(args, conn):
    conn.send(("failed", "ModuleNotFoundError: No module named 'open_clip'"))
    sys.exit(1)


def _open_clip_dies_without_a_word(args, conn):
    import os

    os._exit(3)  # as the OOM killer leaves it: no answer, no traceback


@pytest.mark.parametrize("serve, message", [
    (_open_clip_fails_at_once, r"\(exit code 1\): ModuleNotFoundError: No module named 'open_clip'"),
    (_open_clip_dies_without_a_word, r"\(exit code 3\): it died without a word"),
])
def test_open_clip_process_that_fails_ends_the_run_in_one_line(bench, monkeypatch, serve, message):
    # It waited forever for the answer of a process that had died.
    monkeypatch.setattr(bench, "CHILD_POLL_S", 0.1)
    with pytest.raises(SystemExit, match="open_clip's step failed in its process " + message):
        bench.open_clip_in_process(SimpleNamespace(), serve=serve)


@pytest.mark.parametrize("option", ["--steps", "--accum", "--batch"])
def test_counts_below_one_are_refused(bench, monkeypatch, capsys, option):
    monkeypatch.setattr("sys.argv", ["train_step.py", option, "0"])  # --steps 0 wrote a NaN median into the JSON
    with pytest.raises(SystemExit):
        bench.parse_args()
    assert f"argument {option}: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("script, option", [("chaos_resume", "--max-kills"), ("gpu_suite", "--steps"),
                                            ("tokenizer", "--cold-passes"), ("image_decoders", "--passes"),
                                            ("binding_shapes", "--num-examples"), ("demo_loop", "--rounds")])
def test_every_scripts_counts_are_checked_alike(monkeypatch, capsys, script, option):
    # one argparse type (result_files.count) where each script had a loop of its own
    module = load_script(script, f"{script}_counts")
    monkeypatch.setattr("sys.argv", [f"{script}.py", option, "-2"])
    with pytest.raises(SystemExit):
        (module.parse_args if hasattr(module, "parse_args") else module.main)()
    assert f"argument {option}: must be at least 1, got -2" in capsys.readouterr().err


def test_unsteady_step_times_are_flagged(bench, capsys):
    steady, unsteady = bench.spread([0.30, 0.31, 0.29]), bench.spread([0.1, 4.0, 0.2])
    assert steady == {"min_s": 0.29, "median_s": 0.30, "max_s": 0.31, "max_over_min": pytest.approx(0.31 / 0.29)}
    assert bench.spread_warning({"clip_jax": steady, "open_clip": steady}) == ""
    warning = bench.spread_warning({"clip_jax": steady, "open_clip": unsteady})
    assert "open_clip's from 0.100 to 4.000 s (40.0x)" in warning and "clip_jax" not in warning
    assert "rerun on a quiet machine" in warning


def test_interleaved_steps_alternate_which_goes_first(bench):
    calls = []
    bench.interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, warmup=0)
    assert calls == ["a", "b", "b", "a", "a", "b"]


def test_read_profile_of_a_missing_trace_is_one_line(bench, monkeypatch):
    monkeypatch.setattr("sys.argv", ["train_step.py", "--read-profile", "/nonexistent/trace"])
    with pytest.raises(SystemExit, match="--read-profile /nonexistent/trace: no kept trace there"):
        bench.main()


def test_out_is_checked_before_anything_is_measured(tmp_path):
    """Every script's --out, through benchmarks/result_files.py: a file path, or an existing folder meaning the
    default name inside it (tokenizer.py given a folder `outdir` wrote a file `outdir_2`); one line where it cannot
    be written."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from result_files import checked_out_file, checked_out_folder, new_result_stem

    default = ROOT / "benchmarks" / "results" / "tokenizer_host.json"
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert checked_out_file(folder, default) == folder / "tokenizer_host.json"
    (folder / "tokenizer_host.json").write_text("{}")
    assert checked_out_file(str(folder), default) == folder / "tokenizer_host_2.json"
    assert checked_out_file(tmp_path / "new" / "run.json", default) == tmp_path / "new" / "run.json"
    assert (tmp_path / "new").is_dir()  # made at start-up
    assert checked_out_file(f"{tmp_path}/made/", default) == tmp_path / "made" / "tokenizer_host.json"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit, match=f"--out {a_file}: a file is there, and this needs a folder"):
        checked_out_file(a_file / "run.json", default)
    with pytest.raises(SystemExit, match=f"--out {a_file}: a file is there, and this needs a folder"):
        checked_out_folder(a_file)
    assert checked_out_folder(tmp_path / "x" / "y") == tmp_path / "x" / "y"
    # a set of files saved together (a kept profile's trace and HLO) takes a stem none of them has
    (folder / "step.xplane.pb.gz").write_text("")
    assert new_result_stem(folder, "step", (".xplane.pb.gz", ".hlo.txt.gz")) == "step_2"
    assert new_result_stem(folder, "other", (".xplane.pb.gz", ".hlo.txt.gz")) == "other"


def test_environment_facts_name_the_code_that_ran(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import environment_facts, source_facts

    facts = environment_facts()
    assert {"host", "cpu", "load_average", "time_utc", "python", "git"} <= set(facts)
    assert source_facts(tmp_path) == {"commit": None, "dirty": None}  # no checkout: said, not guessed
    if (ROOT / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        git = source_facts()
        assert git["commit"] == head and isinstance(git["dirty"], bool)


@pytest.fixture(scope="module")
def suite():
    return load_script("gpu_suite", "gpu_suite")


def test_gpu_suite_refuses_unknown_only_names(suite, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["gpu_suite.py", "--only", "layer_norm", "b16_b512_dotz"])
    with pytest.raises(SystemExit):  # a misspelt name silently ran nothing
        suite.parse_args()
    err = capsys.readouterr().err
    assert "--only: unknown b16_b512_dotz; known: layer_norm, attention_parity, b16_b512_dots," in err


def test_gpu_suite_summary_of_a_run_without_memory_analysis(suite):
    ours = {"step_time_s": 0.2, "samples_per_s": 2560.0, "tflops_per_s": 300.0, "mfu": 0.3, "pipelined": {},
            "fraction_of_matmul_peak": 0.5, "temp_memory_gib_per_device": None, "compile_s": 30.0, "losses": [2.0]}
    line = suite.summary_line("run", {"clip_jax": ours, "wall_s": 60.0})
    assert "temp -," in line and "30.0% MFU" in line



@pytest.mark.parametrize("options, said", [
    (["--layer-norm", "pallas"], "model.layer_norm 'pallas' runs Triton kernels on NVIDIA GPUs (this run's devices"),
    (["--attention", "cudnn"], "model.attention 'cudnn' needs model.dtype bfloat16 or float16"),
])
def test_a_config_that_cannot_run_here_is_one_line_before_measuring(bench, monkeypatch, tmp_path, options, said):
    # --layer-norm pallas on a CPU was a traceback from inside the traced step
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "tiny", "--out", str(tmp_path / "out"), *options])
    with pytest.raises(SystemExit) as info:
        bench.main()
    assert str(info.value.code).startswith(f"train_step: {said}") and not (tmp_path / "out").exists()


def test_suite_cpu_records_each_tests_cpu_and_that_of_the_processes_it_started(tmp_path):
    """benchmarks/suite_cpu.py runs pytest with itself as a plugin: a test that makes a child process busy for a
    while shows that CPU as its children's, a test that does nothing shows next to none, and the files' sums are
    their tests'."""
    suite_cpu = load_script("suite_cpu", "suite_cpu_script")
    (tmp_path / "test_two.py").write_text(
        "import subprocess, sys\n\n"
        "import pytest\n\n"
        "def test_idle():\n    pass\n\n"
        "def test_skipped():\n    pytest.skip('not here')\n\n"
        "def test_busy_child():\n"
        "    subprocess.run([sys.executable, '-c', 'sum(i * i for i in range(3_000_000))'], check=True)\n")
    # Its own root and no ini file: none of this project's options (xdist) or conftest.
    _, exit_code, _, cpu, records, outcomes = suite_cpu.run_pytest(
        ["-q", "-p", "no:xdist", "--rootdir", str(tmp_path), "-c", "/dev/null", str(tmp_path / "test_two.py")])
    assert exit_code == 0 and outcomes == {"passed": 2, "skipped": 1}  # (the docs quote passed and skipped apart)
    records = [r for r in records if not r["test"].endswith("test_skipped")]
    by_name = {r["test"].split("::")[-1]: r for r in records}
    assert set(by_name) == {"test_idle", "test_busy_child"}
    assert by_name["test_busy_child"]["children_cpu_s"] > 0.1 > by_name["test_idle"]["children_cpu_s"]
    assert cpu["user_s"] + cpu["system_s"] >= by_name["test_busy_child"]["children_cpu_s"]
    [row] = suite_cpu.per_file(records)
    own = sum(r["cpu_s"] for r in records)
    children = sum(r["children_cpu_s"] for r in records)
    assert row["tests"] == 2 and row["file"].endswith("test_two.py")
    assert abs(row["total_cpu_s"] - (own + children)) <= 0.1 and abs(row["children_cpu_s"] - children) <= 0.05


def test_demo_pipeline_runs_from_any_folder_and_saves_strict_json(tmp_path):
    """The documented command failed at the tokenizer ("has checkpoints and no tokenizer.json" of an empty folder)
    once make_tokenizer stopped fitting one for a run it took as trained, and its --config default was a path
    relative to the checkout. Run from another folder, one batch."""
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "demo_pipeline.py"), "--batches", "1",
                           "--rounds", "1", "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (saved,) = out.glob("demo_pipeline_*.json")
    result = json.loads(saved.read_text(), parse_constant=lambda name: pytest.fail(f"not strict JSON: {name}"))
    assert result["batch_size"] == 256
