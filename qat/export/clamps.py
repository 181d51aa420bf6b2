"""Activation clamps a loaded model's next quantizer performs anyway, dropped at load (exact).

A ReLU6 feeding an 8-bit point of fixed range [0, 6] (EfficientNet-Lite's conv -> BN -> ReLU6 -> point) is the
quantizer's own clamp twice: quantize(x) clamps its codes to [qmin, qmax], which for zero point qmin and
scale 6 / 255 is exactly [0, 6]. `qat.load` drops such clamps: one elementwise pass fewer per point (33 of
them in EfficientNet-Lite0, 0.92x -> faster than float PyTorch; benchmarks/models/effnet_fmnist.md).

The rule, proven per layer rather than assumed: a ReLU / ReLU6 / Hardtanh module (clamp to [low, high]) is
dropped when its output's only use is the first input of a module whose per-tensor input quantizer q gives
q(low) == q(-max float) and q(high) == q(+max float). q is monotone, so then q(clamp(x)) == q(x) for every x
(below `low` both are q(low); above `high` both are q(high)); NaN stays NaN either way. Who uses what comes from
a torch.fx trace of the model with the packed layers and points as leaves; a model fx cannot trace (dynamic
control flow, most Hugging Face models) keeps all its clamps.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn

from qat.export.runtime import InputQuantizer

CLAMPS = (nn.ReLU, nn.ReLU6, nn.Hardtanh)  # nn.ReLU6 is a Hardtanh
FLOAT32_MAX = torch.finfo(torch.float32).max


def clamp_range(module: nn.Module) -> tuple[float, float]:
    """[low, high] of a clamp module (ReLU: [0, inf])."""
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    return 0.0, math.inf


def absorbs(quantizer: InputQuantizer, low: float, high: float) -> bool:
    """Whether quantizer(clamp(x, low, high)) == quantizer(x) for every x (checked at the ends; see above)."""
    if quantizer.spec.granularity != "tensor" or quantizer.scale.is_meta:
        return False
    probes = [-FLOAT32_MAX, low] + ([high, FLOAT32_MAX] if math.isfinite(high) else [])
    device = quantizer.scale.device
    with torch.no_grad():
        q = quantizer(torch.tensor(probes, dtype=torch.float32, device=device)).tolist()
    return q[0] == q[1] and (len(q) == 2 or q[2] == q[3])


class _LeafTracer(fx.Tracer):
    """Traces through containers and model code; every module without children is a leaf (kept whole)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return next(module.children(), None) is None or hasattr(module, "input_quantizer")


def _consumer_quantizer(graph_module: fx.GraphModule, node: fx.Node) -> InputQuantizer | None:
    """The input quantizer that takes `node`'s output as its only use, or None."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    uses = [arg for arg in (*user.args, *user.kwargs.values()) if arg is node]
    if user.op != "call_module" or not user.args or user.args[0] is not node or len(uses) != 1:
        return None
    quantizer = getattr(graph_module.get_submodule(user.target), "input_quantizer", None)
    return quantizer if isinstance(quantizer, InputQuantizer) else None


def elide_clamps(model: nn.Module) -> list[str]:
    """Replace by nn.Identity every clamp module of `model` that its consumer's quantizer absorbs (in place).

    Returns the replaced modules' names. A model without clamps or quantizers returns at once; one that fx
    cannot trace keeps everything.
    """
    if not any(isinstance(m, CLAMPS) for m in model.modules()) or \
            not any(isinstance(m, InputQuantizer) for m in model.modules()):
        return []
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # fx refuses many models (data-dependent control flow): keep the clamps
        return []
    graph_module = fx.GraphModule(model, graph)
    verdicts: dict[str, bool] = {}  # a module called at several places is dropped only if every call allows it
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(graph_module.get_submodule(node.target), CLAMPS):
            continue
        quantizer = _consumer_quantizer(graph_module, node)
        fits = quantizer is not None and absorbs(quantizer, *clamp_range(graph_module.get_submodule(node.target)))
        verdicts[node.target] = verdicts.get(node.target, True) and fits
    registrations: dict[int, int] = {}  # a module registered under two names is kept (one swap would not do)
    for _, module in model.named_modules(remove_duplicate=False):
        registrations[id(module)] = registrations.get(id(module), 0) + 1
    dropped = []
    for target, fits in verdicts.items():
        if fits and registrations[id(model.get_submodule(target))] == 1:
            parent, _, child = target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
            dropped.append(target)
    return dropped
