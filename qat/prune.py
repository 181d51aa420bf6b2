"""Weight pruning: masks kept as buffers, magnitude and N:M patterns, the cubic schedule.

A pruned layer holds a bool buffer `weight_mask` of its weight's shape (True: kept). It
is part of the layer's `state_dict`, so checkpoints carry it. `QuantModule.quantized_weight`
multiplies the weight by it before fake-quant, and `apply_masks` also zeroes the stored
weight, so pruned weights are exactly 0 in training, after fake-quant (zero points are
integers, so 0 is representable) and in an export.

Masks only shrink: already-pruned weights are always pruned first, so raising the
sparsity keeps every earlier zero. Counts are exact: a layer of `numel` weights at
sparsity s has `round(s * numel)` zeros in its mask (ties broken by position).

Patterns:
    magnitude         the smallest |w| of each layer
    global_magnitude  the smallest |w| over all pruned layers together (per-layer sparsity varies)
    nm                N:M along the input dimension: in every run of M consecutive inputs
                      (the flattened I*kh*kw for convolutions, the layout export packs), at most
                      N weights are kept. Below the final sparsity (M-N)/M, only part of the
                      groups are pruned: the smallest of each group's M-N smallest weights go first.

Example:
    >>> attach_masks(model, ["fc1", "fc2"])
    >>> update_masks(model, ["fc1", "fc2"], sparsity=cubic_sparsity(step, 0.5, start_step=100, end_step=500))
    >>> print(sparsity_report(model))
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

MASK = "weight_mask"
METHODS = ("magnitude", "global_magnitude", "nm")
PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)  # quantized Linear / Conv2d are subclasses


def cubic_sparsity(step: int, final: float, initial: float = 0.0, start_step: int = 0, end_step: int = 0,
                   frequency: int = 1) -> float:
    """The sparsity of Zhu & Gupta (2017), "To prune, or not to prune", at optimizer step `step`:

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3

    evaluated at the last update point t = t0 + k * frequency <= step (and at t1 from t1 on);
    0 before `start_step` (t0). `end_step` (t1) <= `start_step` prunes to `final` at once.
    """
    if step < start_step:
        return 0.0
    if end_step <= start_step or step >= end_step:
        return float(final)
    point = start_step + (step - start_step) // frequency * frequency
    remaining = 1.0 - (point - start_step) / (end_step - start_step)
    return float(final + (initial - final) * remaining**3)


# ---- masks of one tensor ----------------------------------------------------------------------
def _prune_count(numel: int, sparsity: float) -> int:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must be in [0, 1)")
    return round(sparsity * numel)


def _scores(weight: Tensor, mask: Optional[Tensor]) -> Tensor:
    """|w| in float32; already-pruned entries score -1, below every kept weight."""
    score = weight.detach().abs().float()
    return score if mask is None else score.masked_fill(~mask, -1.0)


def _mask_pruning(numel: int, flat_order: Tensor, count: int, device: torch.device) -> Tensor:
    keep = torch.ones(numel, dtype=torch.bool, device=device)
    keep[flat_order[:count]] = False
    return keep


def magnitude_mask(weight: Tensor, sparsity: float, mask: Optional[Tensor] = None) -> Tensor:
    """Bool mask (weight's shape) keeping all but the round(sparsity * numel) smallest |w|."""
    count = _prune_count(weight.numel(), sparsity)
    order = torch.argsort(_scores(weight, mask).flatten(), stable=True)
    return _mask_pruning(weight.numel(), order, count, weight.device).view_as(weight)


def nm_mask(weight: Tensor, n: int, m: int, sparsity: Optional[float] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Bool mask with at most `n` kept weights in every group of `m` consecutive inputs.

    `sparsity` None (or (m - n) / m) gives the full N:M pattern; a smaller value prunes
    round(sparsity * numel) weights, chosen among each group's m - n smallest.
    """
    check_nm(n, m)
    columns = weight[0].numel()
    if columns % m:
        raise ValueError(f"N:M pruning needs the input dimension ({columns}) to be a multiple of m={m}")
    limit = (m - n) / m
    sparsity = limit if sparsity is None else sparsity
    if sparsity > limit + 1e-12:
        raise ValueError(f"sparsity={sparsity} is above the most a {n}:{m} pattern prunes ({limit})")
    groups = _scores(weight, mask).reshape(-1, m)  # (N * K / m, m)
    in_group = torch.argsort(groups, dim=1, stable=True)[:, : m - n]  # each group's m-n smallest: (G, m-n)
    candidate_scores = torch.gather(groups, 1, in_group).flatten()
    candidate_flat = (in_group + torch.arange(groups.shape[0], device=weight.device).unsqueeze(1) * m).flatten()
    count = min(_prune_count(weight.numel(), sparsity), candidate_flat.numel())
    order = candidate_flat[torch.argsort(candidate_scores, stable=True)]
    return _mask_pruning(weight.numel(), order, count, weight.device).view_as(weight)


def global_magnitude_masks(weights: dict[str, Tensor], sparsity: float,
                           masks: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """Masks pruning the round(sparsity * total) smallest |w| over all `weights` together."""
    masks = masks or {}
    names = list(weights)
    scores = torch.cat([_scores(weights[k], masks.get(k)).flatten() for k in names])
    total = scores.numel()
    keep = _mask_pruning(total, torch.argsort(scores, stable=True), _prune_count(total, sparsity), scores.device)
    out, start = {}, 0
    for name in names:
        size = weights[name].numel()
        out[name] = keep[start : start + size].view_as(weights[name]).to(weights[name].device)
        start += size
    return out


def check_nm(n: int, m: int) -> None:
    """Raise ValueError unless 1 <= n < m."""
    if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
        raise ValueError(f"N:M pruning needs integers 1 <= n < m, got n={n!r}, m={m!r}")


def satisfies_nm(weight: Tensor, n: int, m: int) -> bool:
    """True if every group of `m` consecutive inputs of every output row has at most `n` non-zeros."""
    columns = weight[0].numel()
    if columns % m:
        return False
    return bool(((weight.reshape(-1, m) != 0).sum(dim=1) <= n).all())


# ---- masks on a model --------------------------------------------------------------------------
def select_layers(model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = (),
                  nm_group: Optional[int] = None) -> tuple[list[str], dict[str, str]]:
    """(names of the Linear / Conv2d layers to prune, {skipped layer: reason}).

    `include` / `exclude` are regular expressions matched against whole layer names
    (no `include`: every Linear and Conv2d). With `nm_group` = m, layers whose input
    dimension is not a multiple of m are skipped; so are layers whose weight is tied to
    another layer's (an output head sharing the embedding table).
    """
    include, exclude = [re.compile(p) for p in include], [re.compile(p) for p in exclude]
    chosen, skipped = [], {}
    owners = weight_owners(model)
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES) or not name:
            continue
        if include and not any(p.fullmatch(name) for p in include):
            continue
        shared = [other for other in owners[id(module.weight)] if other != name]
        if any(p.fullmatch(name) for p in exclude):
            skipped[name] = "excluded by prune.exclude"
        elif shared:
            skipped[name] = f"weight tied to {', '.join(shared)} (pruning would zero the shared table)"
        elif nm_group and module.weight[0].numel() % nm_group:
            skipped[name] = f"input dimension {module.weight[0].numel()} is not a multiple of m={nm_group}"
        else:
            chosen.append(name)
    if include and not chosen and not skipped:
        raise ValueError(f"prune.layers {[p.pattern for p in include]} match no Linear or Conv2d layer")
    return chosen, skipped


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """{id(weight): names of the layers holding it}: tied weights have more than one owner."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if name else None
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return owners


def attach_masks(model: nn.Module, names: Iterable[str]) -> None:
    """Give each named layer an all-ones `weight_mask` buffer (kept if it already has one)."""
    for name in names:
        module = model.get_submodule(name)
        if getattr(module, MASK, None) is None:
            module.register_buffer(MASK, torch.ones_like(module.weight, dtype=torch.bool))


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} for every layer of `model` holding a `weight_mask` buffer."""
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, MASK, None), Tensor)}


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero the stored weights that the masks prune (after an optimizer step, before export)."""
    for module in masked_layers(model).values():
        module.weight.mul_(getattr(module, MASK))


@torch.no_grad()
def update_masks(model: nn.Module, names: list[str], sparsity: float, method: str = "magnitude",
                 n: int = 2, m: int = 4) -> None:
    """Recompute the masks of `names` for `sparsity` with `method` (see METHODS), then zero the pruned weights."""
    if method not in METHODS:
        raise ValueError(f"pruning method {method!r} is not valid; allowed: {', '.join(METHODS)}")
    modules = {name: model.get_submodule(name) for name in names}
    attach_masks(model, names)
    if method == "global_magnitude":
        weights = {k: mod.weight for k, mod in modules.items()}
        new = global_magnitude_masks(weights, sparsity, {k: getattr(mod, MASK) for k, mod in modules.items()})
    elif method == "nm":
        new = {k: nm_mask(mod.weight, n, m, sparsity, getattr(mod, MASK)) for k, mod in modules.items()}
    else:
        new = {k: magnitude_mask(mod.weight, sparsity, getattr(mod, MASK)) for k, mod in modules.items()}
    for name, module in modules.items():
        getattr(module, MASK).copy_(new[name])
        module.weight.mul_(new[name])


@torch.no_grad()
def remove_masks(model: nn.Module) -> SparsityReport:
    """Bake every mask into its weight and delete the buffer (before export); returns the final report."""
    report = sparsity_report(model)
    apply_masks(model)
    for module in masked_layers(model).values():
        del module._buffers[MASK]
    return report


# ---- report ------------------------------------------------------------------------------------
@dataclass
class LayerSparsity:
    """Pruned count of one layer (from its mask) and whether its weight holds an N:M pattern."""

    name: str
    numel: int
    pruned: int
    pattern_2_4: bool

    @property
    def sparsity(self) -> float:
        return self.pruned / max(self.numel, 1)


@dataclass
class SparsityReport:
    """Per-layer sparsity of a model's masked layers; `print(report)` shows a table."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def total(self) -> float:
        numel = sum(layer.numel for layer in self.layers)
        return sum(layer.pruned for layer in self.layers) / max(numel, 1)

    def as_dict(self) -> dict:
        """JSON-ready: {"total": s, "layers": {name: {"sparsity", "pruned", "numel", "2:4"}}}."""
        layers = {x.name: {"sparsity": x.sparsity, "pruned": x.pruned, "numel": x.numel, "2:4": x.pattern_2_4}
                  for x in self.layers}
        return {"total": self.total, "layers": layers}

    def __str__(self) -> str:
        lines = [f"sparsity: {self.total:.4f} over {len(self.layers)} layer(s)"]
        lines += [f"{x.name:<32} {x.pruned:>9}/{x.numel:<9} {x.sparsity:.4f}{'  2:4' if x.pattern_2_4 else ''}"
                  for x in self.layers]
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """The sparsity of every layer of `model` that holds a mask."""
    layers = []
    for name, module in masked_layers(model).items():
        mask = getattr(module, MASK)
        effective = module.weight * mask
        layers.append(LayerSparsity(name, mask.numel(), int((~mask).sum()), satisfies_nm(effective, 2, 4)))
    return SparsityReport(layers)
