"""Knowledge-distillation losses on logits and intermediate features.

    kd_logit_loss     T^2 * KL(softmax(t / T) || softmax(s / T)), averaged over rows
                      (Hinton et al. 2015: the T^2 keeps gradient magnitudes independent of T)
    feature_mse       mean squared difference of two feature maps
    feature_cosine    1 - cosine similarity of each sample's flattened features, averaged
    FeatureTaps       forward hooks keeping the latest output of named layers, so features
                      of a student and a teacher can be compared by a student->teacher mapping

Every loss is computed in float32 whatever the input dtype (a bf16 teacher included).

Example:
    >>> taps_s, taps_t = FeatureTaps(student, ["features.3"]), FeatureTaps(teacher, ["features.3"])
    >>> s_logits, t_logits = student(x), teacher(x)
    >>> loss = kd_logit_loss(s_logits, t_logits, temperature=2.0)
    >>> loss = loss + feature_mse(taps_s.outputs["features.3"], taps_t.outputs["features.3"])
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")


def kd_logit_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T^2 * KL(p_teacher || p_student) with p = softmax(logits / T) over the last dim.

    Logits may be (B, C) or (B, T, C); the KL is summed over classes and averaged over
    every row (all leading dims). The teacher's logits get no gradient.
    """
    check_same_shape(student_logits, teacher_logits, "kd_logit_loss")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.float().reshape(-1, classes) / temperature, dim=-1)  # (R, C)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float().reshape(-1, classes) / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def feature_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over all elements of (student - teacher)^2 (teacher detached)."""
    check_same_shape(student, teacher, "feature_mse")
    return F.mse_loss(student.float(), teacher.detach().float())


def feature_cosine(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over samples of 1 - cos(student_i, teacher_i), each sample's features flattened."""
    check_same_shape(student, teacher, "feature_cosine")
    s, t = student.float().flatten(1), teacher.detach().float().flatten(1)  # (B, F)
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


FEATURE_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": feature_mse, "cosine": feature_cosine}


def _first_tensor(output: Any) -> Tensor:
    """A layer's output, or the first tensor of a tuple / list / dict output (e.g. Hugging Face blocks)."""
    if isinstance(output, Tensor):
        return output
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for item in items:
        if isinstance(item, Tensor):
            return item
    raise TypeError(f"cannot take a feature from a layer output of type {type(output).__name__}")


class FeatureTaps:
    """Forward hooks on named layers of `model`; `outputs[name]` is the latest output of each.

    Unknown names raise ValueError listing close matches. `remove()` takes the hooks off,
    `attach()` puts them back; `clear()` drops the stored outputs (and their graphs).
    """

    def __init__(self, model: nn.Module, names: Iterable[str], role: str = "model") -> None:
        self.model, self.names, self.role = model, list(names), role
        known = dict(model.named_modules())
        for name in self.names:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=3)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise ValueError(f"{role} has no layer named {name!r} for feature distillation{hint}")
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self.attach()

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            self.outputs[name] = _first_tensor(output)

        return keep

    def attach(self) -> None:
        """Register the hooks (no-op if they are on)."""
        if not self._handles:
            self._handles = [self.model.get_submodule(n).register_forward_hook(self._hook(n)) for n in self.names]

    def remove(self) -> None:
        """Take the hooks off and forget the stored outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        self.outputs = {}


def feature_loss(student_taps: FeatureTaps, teacher_taps: FeatureTaps, mapping: dict[str, str],
                 kind: str = "mse") -> Tensor:
    """Sum over `mapping` {student layer: teacher layer} of the `kind` loss between their latest outputs."""
    if kind not in FEATURE_LOSSES:
        raise ValueError(f"feature loss {kind!r} is not valid; allowed: {', '.join(FEATURE_LOSSES)}")
    terms = []
    for student_name, teacher_name in mapping.items():
        missing = [n for n, taps in ((student_name, student_taps), (teacher_name, teacher_taps))
                   if n not in taps.outputs]
        if missing:
            raise RuntimeError(f"no output recorded for layer(s) {missing}: they did not run in the last forward")
        student, teacher = student_taps.outputs[student_name], teacher_taps.outputs[teacher_name]
        try:
            terms.append(FEATURE_LOSSES[kind](student, teacher))
        except ValueError as err:
            raise ValueError(f"features {student_name!r} (student) -> {teacher_name!r} (teacher): {err}") from None
    return torch.stack(terms).sum()
