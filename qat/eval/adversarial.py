"""White-box and transfer adversarial attacks (L-inf FGSM and PGD) for image classifiers, seeded.

    FGSM (Goodfellow et al. 2015)  x' = clip(x + eps * sign(grad_x loss(x, y)))
    PGD  (Madry et al. 2018)       x_0 = clip(x + U(-eps, eps)) (random start in the eps-ball), then `steps`
                                   times x_{t+1} = clip(project_eps(x_t + alpha * sign(grad_x loss(x_t, y))))
                                   with alpha = 2.5 * eps / steps by default

The loss is the cross-entropy of the model's logits; `clip` keeps the inputs in the valid range: an
explicit `input_range`, else the clean batch's own [min, max] (normalised images: the data module's
darkest and brightest values, as `qat.eval.robustness.photometric` does). `eps` is in the model's input
units: the digits data module (`qat.data.DigitsDataModule`) feeds pixel / 16 in [0, 1] (17 grey levels),
so eps 1/16 = 0.0625 is one grey level; the vision recipe feeds (pixel - 127) / 128, so eps 1/128 ~ 0.0078
is one of 256 grey levels (8/128 = 0.0625 is eight).

Attacks run the model in eval mode with gradients taken w.r.t. the input only: parameters are set to
`requires_grad=False` for the attack and restored after, with the training flag; nothing is stored in
the model. A `qat.load` model is attacked through its straight-through estimators (its activation
quantizers pass the gradient inside their range; int4 linear layers take the exact dequant path).
The accuracy under attack is measured with the model's ordinary forward (its fast kernels).

Example:
    >>> x_adv = pgd(model, images, labels, eps=4 / 128, steps=10, seed=0)
    >>> white_box({"float": fp, "int4": int4}, batches, [2 / 128, 4 / 128])["pgd"]["int4"]   # accuracy per eps
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qat.tasks.classification import logits_of

ATTACKS = ("fgsm", "pgd")
DEFAULT_STEPS = 10
DEFAULT_ALPHA_RATIO = 2.5  # PGD step = ratio * eps / steps (Madry et al.: enough to reach the ball's edge)
InputRange = Optional[tuple[float, float]]


@contextmanager
def attacking(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode with no parameter requiring grad; its training flag and every parameter's
    `requires_grad` are put back on exit."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _bounds(x: Tensor, input_range: InputRange) -> tuple[float, float]:
    return (float(x.min()), float(x.max())) if input_range is None else (float(input_range[0]), float(input_range[1]))


def input_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """d (summed cross-entropy of model(x) against y) / d x; `model` must already be `attacking`."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(logits_of(model(x)).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, input_range: InputRange = None) -> Tensor:
    """The FGSM adversarial batch of (x, y): x + eps * sign(grad), clipped to the input range.

    >>> x_adv = fgsm(model, images, labels, eps=0.1)    # |x_adv - x| <= 0.1 everywhere
    """
    low, high = _bounds(x, input_range)
    with attacking(model):
        grad = input_gradient(model, x, y)
    return (x.detach() + eps * grad.sign()).clamp(low, high)


def pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = DEFAULT_STEPS,
        alpha: Optional[float] = None, seed: int = 0, input_range: InputRange = None,
        random_start: bool = True) -> Tensor:
    """The L-inf PGD adversarial batch of (x, y): a random start in the eps-ball (seeded), then `steps`
    signed-gradient steps of `alpha` (default 2.5 * eps / steps), each projected onto the eps-ball around
    x and onto the input range.

    >>> x_adv = pgd(model, images, labels, eps=4 / 128, steps=10, seed=0)
    """
    low, high = _bounds(x, input_range)
    alpha = DEFAULT_ALPHA_RATIO * eps / steps if alpha is None else alpha
    clean = x.detach()
    adv = clean.clone()
    if random_start:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(clean.shape, generator=generator, dtype=torch.float32).to(clean)  # U(0, 1)
        adv = (clean + eps * (2 * noise - 1)).clamp(low, high)
    with attacking(model):
        for _ in range(steps):
            adv = adv + alpha * input_gradient(model, adv, y).sign()
            adv = torch.minimum(torch.maximum(adv, clean - eps), clean + eps).clamp(low, high)
    return adv


def craft(attack: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = DEFAULT_STEPS,
          seed: int = 0, input_range: InputRange = None) -> Tensor:
    """The adversarial batch of `attack` ('fgsm' or 'pgd'); eps 0 is the clean batch."""
    if attack not in ATTACKS:
        raise ValueError(f"attack {attack!r}; allowed: {', '.join(ATTACKS)}")
    if eps == 0:
        return x.detach()
    if attack == "fgsm":
        return fgsm(model, x, y, eps, input_range)
    return pgd(model, x, y, eps, steps, seed=seed, input_range=input_range)


@torch.no_grad()
def correct(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """How many rows of x the model classifies as y (its ordinary forward, in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return int((logits_of(model(x)).argmax(-1) == y).sum())
    finally:
        model.train(was_training)


def _empty(names: Sequence[str], eps_list: Sequence[float]) -> dict[str, Any]:
    return {attack: {name: [0] * len(eps_list) for name in names} for attack in ATTACKS}


def _rates(counts: dict[str, Any], clean: dict[str, int], examples: int, eps_list: Sequence[float],
           steps: int) -> dict[str, Any]:
    return {"eps": [float(e) for e in eps_list], "examples": examples, "steps": steps,
            "alpha": f"{DEFAULT_ALPHA_RATIO:g} * eps / steps",
            "clean": {name: c / examples for name, c in clean.items()},
            **{attack: {name: [c / examples for c in row] for name, row in counts[attack].items()}
               for attack in ATTACKS}}


def transfer(source_model: nn.Module, target_models: dict[str, nn.Module], batches: Sequence[tuple[Tensor, Tensor]],
             eps_list: Sequence[float], steps: int = DEFAULT_STEPS, seed: int = 0,
             input_range: InputRange = None) -> dict[str, Any]:
    """Accuracy of each target model on FGSM and PGD examples crafted on `source_model`, per eps:
    {'eps', 'examples', 'steps', 'alpha', 'clean': {name: acc}, 'fgsm': {name: [acc per eps]}, 'pgd': ...}.
    A target that is the source model itself gives its white-box figures. Batch i's PGD start uses seed + i."""
    names = list(target_models)
    counts, clean, examples = _empty(names, eps_list), dict.fromkeys(names, 0), 0
    for index, (x, y) in enumerate(batches):
        examples += len(y)
        for name, model in target_models.items():
            clean[name] += correct(model, x, y)
        for attack in ATTACKS:
            for i, eps in enumerate(eps_list):
                adv = craft(attack, source_model, x, y, eps, steps, seed + index, input_range)
                for name, model in target_models.items():
                    counts[attack][name][i] += correct(model, adv, y)
    return _rates(counts, clean, examples, eps_list, steps)


def white_box(models: dict[str, nn.Module], batches: Sequence[tuple[Tensor, Tensor]], eps_list: Sequence[float],
              steps: int = DEFAULT_STEPS, seed: int = 0, input_range: InputRange = None) -> dict[str, Any]:
    """Accuracy of each model on FGSM and PGD examples crafted on that model itself, per eps (the layout of
    `transfer`). The same seeds for every model: the same PGD random starts."""
    per_model = [transfer(model, {name: model}, batches, eps_list, steps, seed, input_range)
                 for name, model in models.items()]
    merged = per_model[0] if per_model else _rates(_empty([], eps_list), {}, 0, eps_list, steps)
    for result in per_model[1:]:
        merged["clean"].update(result["clean"])
        for attack in ATTACKS:
            merged[attack].update(result[attack])
    return merged


def first_examples(batches: Sequence[tuple[Tensor, Tensor]], examples: Optional[int]) -> list[tuple[Tensor, Tensor]]:
    """The leading (x, y) batches cut to hold exactly `examples` rows (all of them for None)."""
    taken, left = [], examples
    for x, y in batches:
        if left is not None and left <= 0:
            break
        rows = len(y) if left is None else min(left, len(y))
        taken.append((x[:rows], y[:rows]))
        left = None if left is None else left - rows
    return taken


def report_section(models: dict[str, nn.Module], batches: Sequence[tuple[Tensor, Tensor]],
                   eps_list: Sequence[float], examples: Optional[int] = 512, steps: int = DEFAULT_STEPS,
                   seed: int = 0, source: str = "float") -> dict[str, Any]:
    """The evaluation report's `adversarial` dict on the first `examples` rows of (x, y) `batches`: white-box
    FGSM and PGD accuracy of every model per eps, and the accuracy of the others on the examples crafted on
    `source`. The inputs are clipped to the range of those clean examples (`input_range` in the dict)."""
    taken = first_examples(batches, examples)
    input_range = (min(float(x.min()) for x, _ in taken), max(float(x.max()) for x, _ in taken))
    from_source = transfer(models[source], models, taken, eps_list, steps, seed, input_range)
    others = white_box({k: m for k, m in models.items() if k != source}, taken, eps_list, steps, seed, input_range)
    section = {key: from_source[key] for key in ("eps", "examples", "steps", "alpha", "clean")}
    section.update(input_range=list(input_range), source=source, white_box={}, transfer={})
    for attack in ATTACKS:
        section["white_box"][attack] = {name: from_source[attack][name] if name == source else others[attack][name]
                                        for name in models}
        section["transfer"][attack] = {name: v for name, v in from_source[attack].items() if name != source}
    return section
