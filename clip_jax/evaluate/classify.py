"""Classes for new images from a trained workdir (`clip-jax classify`): a few-shot method's own scores over the
classes of its task, or zero-shot CLIP's over class names the user gives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from clip_jax.data.classification import name_templates, prompt_ensemble
from clip_jax.data.tokenizer import READS_ALIKE, clean_text
from clip_jax.errors import ConfigError, UnscorableClasses, quoted
from clip_jax.evaluate import tell_once
from clip_jax.evaluate.encoder import Encoder

CLASS_GROUPS = ("all", "base", "new")


def temperature(trained: Any) -> float:
    """The scale zero-shot logits are the cosine similarities times: exp of the learned log-scale, clamped at
    model.max_logit_scale as in training (open_clip's `logit_scale.exp()`)."""
    scale, _ = trained.model.apply({"params": trained.params}, method="temperature")
    return float(jax.device_get(scale))



def check_templates(templates: Sequence[str], what: str = "--templates") -> None:
    """Each template holds one "{}" where the name goes (`class_embeddings` formats it so), or ConfigError naming it:
    "{0}", or a "{}" of a doubled brace, is not one."""
    for template in templates:
        try:
            fits = "{}" in template and template.format("x") != template.format("y")
        except (IndexError, KeyError, ValueError):
            fits = False
        if not fits:
            raise ConfigError(f"{what} {quoted(template)}: a template needs one {{}} where the name goes (a literal "
                              "brace doubled, {{ or }}), e.g. \"a photo of a {}.\"")


def refuse_same_tokens(what: str, names: Sequence[str], tokenizer: Any, context_length: int,
                       templates: Sequence[str], fix: str = "keep one, or make them differ early on",
                       tell_cut: bool = True) -> np.ndarray:
    """The token ids [len(names) x len(templates), context_length] of every name in every template, name-major.
    Two names whose prompts are the same token ids to the run's tokenizer (`READS_ALIKE`, and the text tower
    reads context_length - 2 tokens) get one embedding: a class's probability was split between them, a mask's
    second label was never chosen, a detector drew each box twice. Refused, naming the two (`what`: the flag or
    argument that gave them). With `tell_cut`, names longer in a prompt than the tower reads are said once
    (`tell_once`): cut there, as open_clip cuts them, but not silently (`encode` counts its cut texts likewise)."""
    prompts = [template.format(name) for name in names for template in templates]
    tokens, lengths = tokenizer.tokenize_with_lengths(prompts, context_length)
    first: dict[bytes, int] = {}
    for i, row in enumerate(tokens.reshape(len(names), -1)):
        j = first.setdefault(row.tobytes(), i)
        if j != i:
            why = (READS_ALIKE if clean_text(names[j]) == clean_text(names[i]) else
                   f"its text tower reads {context_length - 2} tokens, and they differ only after them")
            raise ConfigError(f"{what}: {quoted(names[j])} and {quoted(names[i])} are one text to this model ({why}): "
                              f"they would get one embedding; {fix}")
    cut = [n for n, m in zip(names, lengths.reshape(len(names), -1).max(axis=1), strict=True) if m > context_length - 2]
    if cut and tell_cut:
        tell_once(f"{what}: {len(cut)} of the {len(names)} are longer in their prompts than the {context_length - 2} "
                  f"tokens the text tower reads, and are cut there (the first: {quoted(cut[0])}): shorten them")
    return tokens


@dataclass(frozen=True, eq=False)  # (an array field: compared by identity)
class ClassRequest:
    """The classes `class_scores` scores, checked: zero-shot over `names` (`tokens`: their prompts' token ids,
    name-major, one row per template) or a few-shot method's own classes (`few_shot`: their indices, the run's
    `group` of them: all, base or new)."""

    names: tuple[str, ...]
    group: str = "all"
    few_shot: tuple[int, ...] | None = None
    tokens: np.ndarray | None = None
    templates: tuple[str, ...] = ()  # the names' prompts


def refuse_group_with_names(group: str, flag: str, names: str) -> None:
    """A group of a few-shot run's own classes ("base", "new") asked for beside class names, which are scored
    instead: the group would be ignored (`flag`, `names`: how the caller's user gives them)."""
    if group != "all":
        raise ConfigError(f"{flag} {group} picks among a few-shot run's own classes; with {names} the classes are "
                          "those: drop one of the two")


def requested_classes(trained: Any, group: str = "all", names: Sequence[str] | None = None,
                      what: str = "class names", templates: Sequence[str] | None = None) -> ClassRequest:
    """The classes that `class_scores` will score. Refuses, before any image is read, a request it cannot serve:
    names that are not distinct texts to the model (`what` gave them), no names for a method without classes of its
    own, an unknown `group`, a group the run has no classes in. Names are prompted in `templates` (default
    `name_templates`: on a shapes run, the prompts of its evaluations), which a few-shot method's own classes do not
    take."""
    config, method = trained.config, trained.method
    if names is not None:
        refuse_group_with_names(group, "classes", "class names")
        _check_names(names)
        if templates is not None:
            if not templates:
                raise ConfigError("templates: give at least one (or None for the run's own)")
            check_templates(templates, "templates")
        templates = tuple(templates or name_templates(config, method.reads_data))
        tokens = refuse_same_tokens(what, names, trained.tokenizer, config.model.text.context_length, templates)
        return ClassRequest(tuple(names), tokens=tokens, templates=templates)
    if templates:
        raise ConfigError("templates prompt the class names given for zero-shot classification (--names FILE); a "
                          "few-shot run's own classes are scored by its method")
    if getattr(method, "scores", None) is None:
        raise ConfigError(f"the workdir's method {config.method.name!r} has no classes of its own: give class names "
                          "for zero-shot classification (--names FILE, one a line; in Python, class_names)")
    if group not in CLASS_GROUPS:
        raise ConfigError(f"--classes (in Python, classes=) must be one of {', '.join(CLASS_GROUPS)}, got {group!r}")
    task = method.task
    classes = {"all": sorted(task.base + task.new), "base": task.base, "new": task.new}[group]
    if not classes:
        raise ConfigError(f"the run trained on all its classes (few_shot.classes 'all'): it has no {group!r} classes; "
                          "use --classes all")
    try:
        method.class_inputs(classes)  # (a linear probe's new classes: said before any image is read)
    except UnscorableClasses as e:
        raise _unscorable(config, group, e) from None
    return ClassRequest(tuple(task.class_names[c] for c in classes), group, few_shot=tuple(classes))


def _check_names(names: Sequence[str]) -> None:
    """Class names are non-empty texts, each once (a blank line's "" became a class that won images; a name given
    twice split its probability in half)."""
    if len(names) < 2:  # one class wins every image with probability 1
        given = "no class name" if not names else "1 class name"
        raise ConfigError(f"{given} given: zero-shot classification chooses among two or more")
    seen = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"class name {i} is {name!r}: class names are non-empty texts")
        if name.strip() in seen:
            raise ConfigError(f"class name {name.strip()!r} is given twice: each class once (its probability would "
                              "be split between the copies)")
        seen.add(name.strip())


def class_scores(trained: Any, encoder: Encoder, images: np.ndarray, request: ClassRequest,
                 class_embeds: np.ndarray | None = None) -> np.ndarray:
    """Logits [N, C] of uint8 images [N, H, W, 3] over the classes of `request` (`requested_classes`).

    `trained` is a workdir read back (train/loop.py::Trained: config, method, model, params, tokenizer). Zero-shot
    CLIP for a request of names: the prompt ensemble of the request's templates (`zero_shot_embeddings`, or
    `class_embeds` computed by it before) times the model's temperature. Otherwise the method's scores over its
    few-shot classes."""
    config, method = trained.config, trained.method
    examples = {"images": images}
    if request.few_shot is None or method.inputs == "features":  # MaPLe and WiSE-FT score the images themselves
        examples["features"] = encoder.images(images)
    if request.few_shot is None:
        if class_embeds is None:
            class_embeds = zero_shot_embeddings(trained, encoder, request)
        return temperature(trained) * examples["features"] @ class_embeds.T
    try:
        return method.scores(trained.params, examples, list(request.few_shot))
    except UnscorableClasses as e:  # a linear probe or class-specific contexts: only the training classes
        raise _unscorable(config, request.group, e) from None


def _unscorable(config: Any, group: str, error: UnscorableClasses) -> ConfigError:
    return ConfigError(f"method {config.method.name} cannot score --classes {group} ({error}): use --classes base (in "
                       "Python, classes='base')")


def zero_shot_embeddings(trained: Any, encoder: Encoder, request: ClassRequest) -> np.ndarray:
    """[C, D] prompt-ensemble embeddings of a zero-shot request's class names, from its token ids."""
    return prompt_ensemble(encoder.texts(request.tokens), len(request.names))
