"""The train-step benchmark's own pieces (benchmarks/train_step.py): what it times and how it reads a profile."""

import importlib.util
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest

from clip_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event(name, seconds, **stats):
    return SimpleNamespace(name=name, duration_ns=seconds * 1e9, stats=list(stats.items()))


def test_op_events_reads_cpu_threads_and_gpu_streams(bench):
    # A CPU trace: ops on the host's XLA threads name their instruction; the executor's own spans do not.
    cpu = SimpleNamespace(name="/host:CPU", lines=[
        SimpleNamespace(name="XLAEigen/1", events=[_event("fusion.1", 2.0, hlo_op="fusion.1"),
                                                   _event("ThunkExecutor::Execute", 4.0)]),
        SimpleNamespace(name="python", events=[_event("not an op", 5.0)]),
    ])
    # A raw GPU trace: kernels on streams, each naming its HLO instruction; two kernels can make one op.
    gpu = SimpleNamespace(name="/device:GPU:0", lines=[
        SimpleNamespace(name="Stream #13(Compute)", events=[
            _event("sm90_xmma_gemm", 1.0, hlo_op="%custom-call.3", hlo_module="jit_train_step"),
            _event("splitK_reduce", 0.5, hlo_op="custom-call.3"),
            _event("memcpy", 9.0),  # no instruction: not an op of the step
        ]),
    ])
    assert bench.op_events(SimpleNamespace(planes=[cpu, gpu])) == [
        ("fusion.1", 2.0), ("custom-call.3", 1.0), ("custom-call.3", 0.5)]
    # A post-processed trace's derived line is read alone (its ops are the streams' kernels over again).
    derived = SimpleNamespace(name="/device:GPU:0", lines=[
        SimpleNamespace(name="XLA Ops", events=[_event("fusion.2", 3.0)]),
        SimpleNamespace(name="Stream #13(Compute)", events=[_event("kernel", 3.0, hlo_op="fusion.2")]),
    ])
    assert bench.op_events(SimpleNamespace(planes=[derived])) == [("fusion.2", 3.0)]


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
    monkeypatch.setattr("sys.argv", ["train_step.py", "--config", str(ROOT / "configs" / "longclip_shapes.py"),
                                     "--batch", "32", "--scan", "--attention", "cudnn", "--dtype", "bfloat16"])
    config = bench.benchmark_config(bench.parse_args())
    assert (config.method.name, config.batch_size, config.model.scan_layers) == ("longclip", 32, True)
    assert config.model.attention == "cudnn"
    assert config.model.dtype == "bfloat16" and config.optimizer.frozen == ("^text/positional_embedding$",)
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "tiny", "--attention", "cudnn"])
    with pytest.raises(ConfigError, match="model.attention 'cudnn' needs model.dtype bfloat16"):
        bench.benchmark_config(bench.parse_args())
    monkeypatch.setattr("sys.argv", ["train_step.py", "--preset", "tiny"])
    config = bench.benchmark_config(bench.parse_args())
    assert (config.method.name, config.batch_size, config.model.remat_policy) == ("clip", 32, "none")
    assert config.model.attention == "xla"
