"""AudioCLIP on `shapes` (docs/audioclip.md): an audio tower trained into the demo CLIP's space, Partial and Full.

    python benchmarks/audioclip_shapes.py [--steps 600] [--seeds 0 1] [--out-dir workdirs/audioclip_shapes]
        [--start-workdirs workdirs/demo workdirs/resnet_shapes/vit_seed1]

Per seed, from that seed's demo CLIP (configs/demo.py:b128, 1,500 steps; `--start-workdirs`, one per seed): "partial"
(configs/audioclip_shapes.py:partial: image and text towers frozen, the audio-text and audio-image pairs) and "full"
(all three towers, all three pairs), `--steps` steps each at the demo's batch of 128. A run whose workdir holds
results.json is read, not retrained.

Scores, from each run's final evaluation: zero-shot audio classification among the 48 colour-shape classes on seen
pairs and on held-out pairs (sounds whose pitch-timbre pair was never heard nor captioned in training), audio-to-image
and image-to-audio R@1 among 1,000 test scenes, and CLIP's own image zero-shot, against the start's (does Full training
damage it?). Baselines: chance (1/48), and a supervised audio classifier on seen pairs: a ridge classifier of the
class on each sound's log-mel spectrum (its mean and standard deviation over time), fitted on 4,000 `train` sounds;
it has no held-out classes to predict. Prints a table and saves benchmarks/results/audioclip_shapes.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from machine import environment_facts  # noqa: E402
from slip_shapes import ridge_accuracy, training_seconds  # noqa: E402

from clip_jax.config import load_config  # noqa: E402
from clip_jax.data.classification import class_embeddings  # noqa: E402
from clip_jax.data.shapes import SHAPES, ZERO_SHOT_TEMPLATES, class_names  # noqa: E402
from clip_jax.evaluate.audio import audio_config, shapes_sounds  # noqa: E402
from clip_jax.evaluate.encoder import Encoder  # noqa: E402
from clip_jax.files import results_json
from clip_jax.models.audio import log_mel_spectrogram  # noqa: E402
from clip_jax.train.loop import load_trained  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "audioclip_shapes.json"
ARMS = ("partial", "full")
KEYS = ("audio_zero_shot_top1_seen", "audio_zero_shot_top1", "a2i_r1", "i2a_r1", "zero_shot_top1_seen",
        "zero_shot_top1")
SUPERVISED_TRAIN, SUPERVISED_TEST = 4000, 1000


def train(arm: str, workdir: pathlib.Path, start: pathlib.Path, steps: int, seed: int) -> None:
    command = [sys.executable, "-m", "clip_jax", "train", "--config", f"configs/audioclip_shapes.py:{arm}",
               "--workdir", str(workdir), f"--config.init_from={start}", f"--config.seed={seed}",
               f"--config.total_steps={steps}", f"--config.eval.every_steps={steps}",
               f"--config.checkpoint.every_steps={steps}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def spectrum_features(config, split: str, n: int, snr_db) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over time of each sound's log-mel bands [n, 2 x n_mels], and its class."""
    sounds, labels = shapes_sounds(config, split, n, snr_db)
    features = np.concatenate([np.asarray(log_mel_spectrogram(jnp.asarray(sounds[i:i + 500]), audio_config(config)))
                               for i in range(0, n, 500)])
    return np.concatenate([features.mean(1), features.std(1)], axis=1), labels


def held_out_attributes(workdir: pathlib.Path, n: int = 1000) -> dict[str, float]:
    """On held-out sounds, how often the zero-shot top-1 class has the right colour (pitch) and the right shape
    (timbre): which half of a never-heard pair the audio tower gets wrong."""
    trained = load_trained(workdir)
    config = trained.config
    encoder = Encoder(trained.model, trained.params, trained.mesh, 250)
    snr = tuple(config.evals.shapes_audio.snr_db)
    sounds, labels = shapes_sounds(config, "test_held_out", n, snr)
    texts = lambda t: encoder.texts(trained.tokenizer(t, config.model.text.context_length))  # noqa: E731
    predicted = np.argmax(encoder.audio(sounds) @ class_embeddings(texts, class_names(), ZERO_SHOT_TEMPLATES).T, 1)
    shapes = len(SHAPES)
    return {"held_out_colour_right": float(np.mean(predicted // shapes == labels // shapes)),
            "held_out_shape_right": float(np.mean(predicted % shapes == labels % shapes))}


def supervised_baseline(seed: int) -> dict[str, float]:
    config = load_config("configs/audioclip_shapes.py:partial", [f"--config.seed={seed}"])
    snr = tuple(config.evals.shapes_audio.snr_db)
    train_x, train_y = spectrum_features(config, "train", SUPERVISED_TRAIN, snr)
    test_x, test_y = spectrum_features(config, "test_seen", SUPERVISED_TEST, snr)
    return {"audio_top1_seen": ridge_accuracy(train_x, train_y, test_x, test_y, len(class_names()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out-dir", default="workdirs/audioclip_shapes")
    parser.add_argument("--start-workdirs", nargs="+", default=["workdirs/demo", "workdirs/resnet_shapes/vit_seed1"],
                        help="the demo CLIP of each seed (configs/demo.py, --config.seed=S)")
    args = parser.parse_args()
    if len(args.start_workdirs) < len(args.seeds):
        parser.error("give one --start-workdirs entry per seed")
    out = REPO / args.out_dir
    runs: dict[str, dict] = {}
    for seed, start in zip(args.seeds, args.start_workdirs, strict=False):
        start = REPO / start
        runs[f"start_seed{seed}"] = {k: v for k, v in json.loads((start / "results.json").read_text()).items()
                                     if k in KEYS}
        for arm in ARMS:
            workdir = out / f"{arm}_seed{seed}"
            if not (workdir / "results.json").is_file():
                train(arm, workdir, start, args.steps, seed)
            results = json.loads((workdir / "results.json").read_text())
            runs[f"{arm}_seed{seed}"] = {**{k: results[k] for k in KEYS}, **held_out_attributes(workdir),
                                         "train_seconds": round(training_seconds(workdir), 1)}
        runs[f"supervised_seed{seed}"] = supervised_baseline(seed)
    summary = {}
    for arm in ("start", *ARMS, "supervised"):
        rows = [runs[f"{arm}_seed{s}"] for s in args.seeds]
        summary[arm] = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
    columns = (*KEYS, "held_out_colour_right", "held_out_shape_right", "audio_top1_seen")
    print(f"{'mean over seeds':<16}" + "".join(f"{k:>28}" for k in columns))
    for arm, row in summary.items():
        print(f"{arm:<16}" + "".join(f"{row[k]:>28.3f}" if k in row else f"{'':>28}" for k in columns))
    print(f"chance: {1 / len(class_names()):.3f}")
    RESULTS.write_text(results_json({
        "date": datetime.date.today().isoformat(),
        "machine": environment_facts(),
        "steps": args.steps, "seeds": args.seeds, "chance": 1 / len(class_names()),
        "mean_over_seeds": summary, "runs": runs,
    }))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
