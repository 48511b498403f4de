"""Every registered method against the method contract (clip_jax/methods/base.py), on a tiny model and the shapes
data: the pipeline's first batch matches the method's fields; steps on a 2x2x2 mesh with gradient accumulation
equal one device in one shot; the train state round-trips through a checkpoint; the evaluation suite runs on the
trained parameters. Also the method's part of the configuration, old workdirs' migration and FLOPs."""

import json
import logging

import flax.linen as nn
import jax
import numpy as np
import pytest

from clip_jax.config import ConfigError, default_config, load_config, method_config, read_config
from clip_jax.data.pipeline import tokenizer_corpus
from clip_jax.data.tokenizer import ClipTokenizer
from clip_jax.evaluate.encoder import Encoder
from clip_jax.evaluate.suite import eval_defaults, evaluate
from clip_jax.methods import METHODS, get_method
from clip_jax.methods.base import Preparation, abstract_batch
from clip_jax.methods.few_shot import FROZEN, FewShotMethod
from clip_jax.methods.lseg import FROZEN as LSEG_FROZEN
from clip_jax.methods.wise_ft import FROZEN as WISE_FT_FROZEN
from clip_jax.models import flops
from clip_jax.models.clip import CLIP
from clip_jax.sharding import batch_sharding, global_batch, make_mesh
from clip_jax.train import state as state_lib
from clip_jax.train import step as step_lib
from clip_jax.train.checkpoint import Checkpointer, abstract_like
from clip_jax.train.loop import create_state

from .test_train_step import assert_trees_close

BATCH, IMAGE, CONTEXT, VOCAB = 16, 32, 24, 600
# Per method: the fields that fit the tiny batch (Long-CLIP's PCA must keep fewer components than rows).
SMALL = {"longclip": {"pca_components": 4, "pca_scope": "global", "short_context_length": 12}, "coop": {"n_ctx": 4},
         "maple": {"prompt_depth": 1},  # the tiny towers have one block
         "slip": {"ssl_hidden": 32, "ssl_dim": 8}, "lseg": {"decoder_width": 16},
         "groupvit": {"stage_depths": (1, 0), "num_group_tokens": (4, 0), "num_output_groups": (2,)},
         "vild": {"train_examples": 16, "regions": 4, "region_width": 16, "box_width": 16},
         "glip": {"train_examples": 16, "box_width": 16, "prompt_classes": 2, "fusion_heads": 2}}
# Per method: the towers it adds to the tiny model (AudioCLIP's audio tower: 15 frames x 32 mel bands, 12 patches).
EXTRA_TOWERS = {"audioclip": {"audio": dict(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64, num_samples=2048,
                                            n_mels=32, patch_time=5, patch_freq=8)}}


# The methods whose dense predict functions the evaluation test runs, with their background rule (CLIP's is the
# training-free baseline).
DENSE = {"clip": "threshold", "lseg": "label", "groupvit": "threshold"}


# Variants of a method run through the same contract: name -> (method, model.vision overrides).
VARIANTS = {"clip+patch_dropout": ("clip", {"patch_dropout": 0.5}),  # 2 of the 4 patches kept, by each example's key
            # 2 blocks, so that one can drop (the first never does): each branch of the second with p = 0.5
            "clip+stochastic_depth": ("clip", {"stochastic_depth": 0.5, "layers": 2})}


def tiny_config(name: str):
    name, vision = VARIANTS.get(name, (name, {}))
    config = default_config()
    tower = dict(width=32, layers=1, heads=2, head_dim=16, mlp_dim=64)
    config.model.vision.update(tower, image_size=IMAGE, patch_size=16, **vision)
    config.model.text.update(tower, context_length=CONTEXT, vocab_size=VOCAB)
    config.model.embed_dim = 16
    config.model.update(EXTRA_TOWERS.get(name, {}))
    positives = {"multi_positive": True} if "multi_positive" in METHODS[name].defaults() else {}
    config.method = method_config(name, **positives, **SMALL.get(name, {}))
    config.batch_size = BATCH
    config.data.long_caption_prob = 0.5
    config.optimizer.warmup_steps = 1
    config.optimizer.lr = 1e-2
    config.eval.num_examples = 16
    config.eval.batch_size = 16
    if name == "negclip":  # its hard negatives come from the shapes source
        config.data.negative_captions = True
    if name in ("lseg", "vild", "glip"):  # masks and boxes move with the image only without crops; the labels come
        config.data.augment = False     # from a frozen text tower
        config.optimizer.frozen = LSEG_FROZEN
    return config


def compiled(model: nn.Module, method):
    """`model.apply(variables, *inputs, method=method)`, compiled: one program instead of the op-by-op dispatch of
    every primitive (the tests that call a model's methods directly)."""
    return jax.jit(lambda variables, *inputs: model.apply(variables, *inputs, method=method))


@pytest.fixture(scope="module")
def tokenizer():
    return ClipTokenizer.train(tokenizer_corpus(tiny_config("clip"), 500), VOCAB)


def tiny_few_shot(config):
    """A few-shot task the tiny batch fits: 2 shots of the 20 base shapes classes, drawn from 300 scenes."""
    config.few_shot.update(shots=2, shapes_pool=300, eval_examples=48, shapes_domain="clean")
    config.optimizer.frozen = FROZEN + (("^learner/",) if config.method.name == "tip_adapter" else ())
    if config.method.name == "wise_ft":  # the image tower trains
        config.optimizer.frozen = WISE_FT_FROZEN
    config.evals = {"few_shot": eval_defaults("few_shot")}
    return config


def prepared(config, tokenizer, workdir=None, training=True, resumed=False):
    """The method after `prepare`, from a randomly initialised CLIP (what the loop gives it without a checkpoint);
    its cached arrays in `workdir` if one is given (written there by a `training` launch, not by a reader's)."""
    method = get_method(config)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    clip = CLIP(method.model_config())
    params = clip.init(jax.random.PRNGKey(0), *method.init_inputs()[:2])  # images and texts
    encoder = Encoder(clip, params["params"], mesh, 64)
    method.prepare(Preparation(workdir, tokenizer, True, encoder.images, encoder.texts, training, resumed))
    return method


@pytest.fixture(scope="module", params=[*sorted(METHODS), *VARIANTS])
def method_setup(request, tokenizer):
    config = tiny_config(request.param)
    if isinstance(get_method(config), FewShotMethod):
        config = tiny_few_shot(config)
    method = prepared(config, tokenizer)
    batches = method.train_data(config, tokenizer, list(range(BATCH)))
    host_batches = [{k: v for k, v in next(batches).items() if k != "stats"} for _ in range(2)]
    return config, method, host_batches


def run(config, method, batches, mesh, accum_steps=1, initial=None):
    """Two steps from `initial` (a state on the host), placed in the mesh's shardings, or else from the state
    `create_state` initialises there: (state, metrics, the initial state on the host)."""
    model = method.model()
    init_fn, shardings, tx = create_state(config, method, model, mesh)
    if initial is None:
        initial = jax.device_get(init_fn(jax.random.PRNGKey(0)))  # a host copy: the step donates its input
    state = jax.device_put(initial, shardings)
    trainable = state_lib.trainable_mask(state.params, ())
    train_step = step_lib.make_train_step(method.step_fns(model), tx, trainable,
                                          state_lib.learning_rate_schedule(config.optimizer, 10), mesh, accum_steps)
    step = step_lib.compile_train_step(train_step, shardings, abstract_like(state),
                                       abstract_batch(method.fields(), BATCH, batch_sharding(mesh)), mesh)
    metrics = []
    for batch in batches:
        state, m = step(state, global_batch(batch, mesh))
        metrics.append(jax.device_get(m))
    return state, metrics, initial


def test_the_first_batch_holds_the_methods_fields(method_setup):
    _, method, batches = method_setup
    want = {name: ((BATCH, *f.shape), np.dtype(f.dtype)) for name, f in method.fields().items()}
    assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == want


@pytest.fixture(scope="module")
def runs(method_setup):
    """Two steps on one device in one shot, and on a 2x2x2 mesh in two micro-batches, from the same initial state:
    ((state, metrics), mesh). (One comparison for both properties: each compile costs seconds, and
    tests/test_train_step.py checks sharding and accumulation apart for CLIP. That create_state initialises that
    same state in the mesh's shardings is checked once, below.)"""
    config, method, batches = method_setup
    one, sharded = make_mesh({"data": 1}, jax.devices()[:1]), make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    *want, initial = run(config, method, batches, one)
    *got, _ = run(config, method, batches, sharded, accum_steps=2, initial=initial)
    return {"one": (tuple(want), one), "sharded": (tuple(got), sharded)}


def test_a_sharded_accumulated_step_equals_one_device_in_one_shot(runs):
    (want, want_metrics), _ = runs["one"]
    (got, got_metrics), _ = runs["sharded"]
    for w, g in zip(want_metrics, got_metrics, strict=True):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=1e-5)
        np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-4)
    # Adam divides by sqrt(v): rounding of near-zero gradients moves a parameter by up to ~1e-5 at lr 1e-2 (~1e-4 in
    # the detectors, whose focal losses leave many gradients near zero).
    atol = 1e-4 if "box_head" in runs["one"][0][0].params else 2e-5
    assert_trees_close(jax.device_get(got.params), jax.device_get(want.params), rtol=1e-4, atol=atol)
    assert set(want_metrics[0]) >= {"loss", "grad_norm", "lr", "nonfinite"}


def test_a_state_initialised_in_its_shardings_is_the_one_initialised_on_one_device():
    # `runs` starts both of its runs from one copy of the initial state; here a method with parameters of its own
    # (SLIP's head) is initialised by create_state on each mesh.
    config = tiny_config("slip")
    method = get_method(config)
    states = []
    for mesh in (make_mesh({"data": 1}, jax.devices()[:1]), make_mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        init_fn, _, _ = create_state(config, method, method.model(), mesh)
        states.append(jax.device_get(init_fn(jax.random.PRNGKey(0))))
    assert_trees_close(states[1], states[0], rtol=0, atol=0)


def test_the_train_state_round_trips_through_a_checkpoint(method_setup, runs, tmp_path):
    config, _, _ = method_setup
    (state, _), _ = runs["sharded"]
    checkpointer = Checkpointer(tmp_path, config.checkpoint, owner=True)
    checkpointer.save(1, state, force=True)
    checkpointer.wait()
    restored = checkpointer.restore(abstract_like(state), step=1)
    checkpointer.close()
    assert_trees_close(jax.device_get(restored), jax.device_get(state), rtol=0, atol=0)


def test_the_evaluation_suite_runs_on_the_methods_model(method_setup, runs, tokenizer):
    config, method, _ = method_setup
    (state, _), mesh = runs["sharded"]
    results = evaluate(config, method.model(), state.params, mesh, tokenizer, method=method)
    if isinstance(method, FewShotMethod):
        want = {"few_shot_base"} | (set() if method.name == "linear_probe" else {"few_shot_new", "few_shot_hm"})
    else:
        want = {"zero_shot_top1", "zero_shot_top1_seen", "i2t_r1", "t2i_r1"}
    if "audio" in config.model:
        config.evals["shapes_audio"] = eval_defaults("shapes_audio")
        results |= evaluate(config, method.model(), state.params, mesh, tokenizer, ["shapes_audio"], method)
        want |= {"audio_zero_shot_top1", "audio_zero_shot_top1_seen", "a2i_r1", "i2a_r1"}
    if method.name in DENSE:  # the method's dense predict function, through the segmentation evaluation
        config.evals["seg"] = {**eval_defaults("shapes_segmentation"), "background": DENSE[method.name]}
        results |= evaluate(config, method.model(), state.params, mesh, tokenizer, ["seg"], method)
        want |= {"seg_seen_miou", "seg_novel_miou", "seg_novel_scenes_miou"}
    if method.name in ("vild", "glip"):  # the detector's predict function, through the detection evaluation
        config.evals["det"] = {**eval_defaults("shapes_detection"), "num_examples": 8}
        results |= evaluate(config, method.model(), state.params, mesh, tokenizer, ["det"], method)
        want |= {f"det{s}_ap{t}" for s in ("", "_base", "_novel") for t in ("", "50")}
    assert want <= set(results)
    assert all(0.0 <= results[k] <= 1.0 for k in want)
    if method.name == "clip":  # a validation run is scored on the validation pairs, never on the test pairs
        config.data.shapes_validation_pairs = True
        results = evaluate(config, method.model(), state.params, mesh, tokenizer, ["shapes"], method)
        assert {"zero_shot_top1_val", "zero_shot_top1_seen"} <= set(results) and "zero_shot_top1" not in results


@pytest.mark.parametrize("bias_init", [None, -10.0])
def test_a_learnt_bias_is_logged_beside_the_temperature(bias_init):
    """SigLIP's bias (`model.logit_bias_init`) is logged with each step, at its value; a model without one logs the
    temperature alone."""
    config = tiny_config("siglip")
    if bias_init is not None:
        config.model.logit_bias_init = bias_init
    method = get_method(config)
    model = method.model()
    params = nn.unbox(model.init(jax.random.PRNGKey(0), *method.init_inputs())["params"])
    fns = method.step_fns(model)
    logged = jax.device_get(fns.log(fns.shared(params)))
    assert set(logged) == ({"logit_scale"} if bias_init is None else {"logit_scale", "logit_bias"})
    np.testing.assert_allclose(logged["logit_scale"], 1 / 0.07, rtol=1e-6)  # exp of the default ln(1 / 0.07)
    if bias_init is not None:
        assert float(logged["logit_bias"]) == bias_init


@pytest.mark.parametrize("bias_init", [None, -10.0])
def test_siglip_without_a_bias_says_so_at_launch(bias_init, caplog):
    config = tiny_config("siglip")
    if bias_init is not None:
        config.model.logit_bias_init = bias_init
    with caplog.at_level(logging.WARNING, logger="clip_jax.methods.clip"):
        get_method(config).check(make_mesh({"data": 1}, jax.devices()[:1]))
    warned = [r.getMessage() for r in caplog.records if "logit_bias_init" in r.getMessage()]
    assert len(warned) == (1 if bias_init is None else 0)


# --- FLOPs ----------------------------------------------------------------------------------------------------------
def test_a_frozen_tower_counts_one_forward_and_a_trained_one_three():
    config = tiny_config("longclip")
    method = get_method(config)
    model = method.model()
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *method.init_inputs())["params"])
    cfg = method.model_config()
    image, text = flops.image_forward_flops(cfg), flops.text_forward_flops(cfg)
    short = flops.text_forward_flops(cfg, SMALL["longclip"]["short_context_length"])
    all_trained = state_lib.trainable_mask(params, ())
    assert method.flops_per_example(all_trained) == pytest.approx(3 * (image + text + short))
    lit = state_lib.trainable_mask(params, (r"^visual/",))  # LiT: a frozen image tower
    assert method.flops_per_example(lit) == pytest.approx(image + 3 * (text + short))
    # freezing part of a tower (the kept positions) still trains it
    kept = state_lib.trainable_mask(params, (r"^text/positional_embedding$",))
    assert method.flops_per_example(kept) == pytest.approx(3 * (image + text + short))


# --- the method's configuration -------------------------------------------------------------------------------------
DEMO = "configs/demo.py"


def test_a_method_that_forgets_its_name_is_refused_at_registration():
    from clip_jax.methods import registry
    from clip_jax.methods.clip import ClipMethod

    class Forgot(ClipMethod):  # no `name` of its own: it would replace CLIP itself in METHODS
        pass

    with pytest.raises(RuntimeError, match="registered methods share the name clip: give each its own `name`"):
        registry((ClipMethod, Forgot))
    assert registry(tuple(METHODS.values())) == METHODS


def test_switching_the_method_keeps_what_was_set_and_takes_the_new_defaults():
    config = load_config(DEMO, ["--config.method.pca_components=8", "--config.method.name=longclip"])
    assert config.method.pca_components == 8  # given after the name on the command line, applied after it
    assert config.method.multi_positive is True  # set by configs/demo.py for clip, kept
    assert config.method.label_smoothing == 0.1  # clip's default was not changed: longclip's default
    assert config.method.to_dict() == {**METHODS["longclip"].defaults(), "pca_components": 8, "multi_positive": True}


@pytest.mark.parametrize("overrides, words", [
    (["--config.method.name=clipp"], f"unknown method.name 'clipp'; choose one of {', '.join(sorted(METHODS))}"),
    (["--config.method.pca_components=4"], "a field of method longclip: also set --config.method.name=longclip"),
    (["--config.loss.name=siglip_ring"], "use --config.method.name=siglip --config.method.ring=True"),
    (["--config.loss.label_smoothing=0.1"], "'loss.label_smoothing' is now 'method.label_smoothing'"),
    (["--config.reset_logit_scale=True"], "'reset_logit_scale' is now 'method.reset_logit_scale'"),
    (["--config.method.name=longclip", "--config.method.pca_scope=both"], "method.pca_scope must be 'local' or"),
    (["--config.method.name=siglip", "--config.method.ring=1"], "'method.ring' must be bool"),
    (["--config.method.name=groupvit", "--config.model.vision.pool=mean"],
     "method groupvit pools its own segment tokens, so model.vision.pool 'mean' would do nothing"),
    (["--config.method.name=negclip"], "method negclip trains on negative captions, the shapes source's, a caption"),
    (["--config.data.negative_captions=True"], "method 'clip' does not train on data.negative_captions"),
])
def test_method_mistakes_are_one_line(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    assert words in str(e.value)


def test_a_config_json_of_the_versions_before_methods_reads_as_its_method(tmp_path):
    """The keys the method layer moved: loss.* (with siglip_ring), reset_logit_scale, data.short_context_length."""
    new = load_config("configs/longclip_shapes.py").to_dict()
    old = json.loads(json.dumps(new, default=list))
    method = old.pop("method")
    old["loss"] = {"name": "longclip", "label_smoothing": 0.1, "multi_positive": True, "long_weight": 1.0,
                   "short_weight": 1.0, "pca_components": 16, "pca_scope": "local"}
    old["reset_logit_scale"] = True
    old["data"]["short_context_length"] = 50
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert read_config(tmp_path / "config.json").method.to_dict() == {**method, "short_context_length": 50}
    old["loss"] = {"name": "siglip_ring", "label_smoothing": 0.0, "multi_positive": False, "long_weight": 1.0,
                   "short_weight": 1.0, "pca_components": 32, "pca_scope": "local"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    got = read_config(tmp_path / "config.json").method.to_dict()
    assert got == {"name": "siglip", "ring": True, "multi_positive": False, "reset_logit_scale": True}


def test_a_method_without_a_required_hook_is_told_which():
    """A new method that left out flops_per_example stopped at the first step with a bare NotImplementedError."""
    from clip_jax.methods.base import Method

    class Partial(Method):
        name = "partial"

    config = default_config()
    config.method = {"name": "partial"}
    method = Partial(config)
    for hook, call in (("flops_per_example", lambda: method.flops_per_example({})), ("fields", method.fields),
                       ("model_config", method.model_config)):
        with pytest.raises(NotImplementedError, match=f"Partial must define {hook}, a hook every method has"):
            call()
