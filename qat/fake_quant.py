"""Fake-quantizer modules for weights and activations.

A `FakeQuantizer` owns its `scale` and `zero_point` as `nn.Parameter`s created in
`__init__` (their shape follows from the config and the tensor shape), a range
observer, and four switches kept in `state_dict`:

    enabled      fake-quantize (True) or pass values through unchanged
    calibrating  feed the observer and pass values through (range initialization)
    frozen       stop learning / observing: scale and zero point stay as they are
    initialized  qparams have been set from a range (calibration or the first batch)

Kinds (`config.quantizer`): 'lsq' learns the scale, 'lsq_plus' learns the scale and
the zero point, 'observer' sets both from the observer on every training step.

Example:
    >>> q = FakeQuantizer(QuantizerConfig(bits=4, group_size=32), shape=(64, 128))
    >>> q.init_from(weight)           # range initialization from the weight itself
    >>> w_hat = q(weight)             # differentiable in weight, q.scale
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from qat.config import ConfigError, QuantizerConfig
from qat.functional import effective_qparams, expand_qparam, grouped_view, qparam_shape
from qat.observers import make_observer, to_rows
from qat.ste import lsq_fake_quantize, lsq_grad_factor

_STATE_KEYS = ("enabled", "calibrating", "frozen", "initialized")


def whole_tensor(x: Tensor) -> Tensor:
    """`x` itself, or the whole tensor of a sharded (FSDP2 DTensor) one: a collective on its mesh."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _assign(param: Tensor, value: Tensor) -> None:
    """param.copy_(value); a sharded (DTensor) param takes its shard of rank 0's `value` (a collective),
    so every rank holds the same qparams even where ranks calibrated on different batches."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=0)
    param.copy_(value)


class FakeQuantizer(nn.Module):
    """Fake-quantizes one tensor role (a layer's weight, or its input activation).

    Args:
        config: the quantization setting.
        shape: the shape of the tensor (weights), or a template whose `axis` entry is
            the channel count (activations with granularity='channel').
        axis: the channel axis for granularity='channel'.
    """

    def __init__(self, config: QuantizerConfig, shape: tuple, axis: int = 0) -> None:
        super().__init__()
        self.config = config
        self.shape = tuple(shape)
        self.axis = axis
        self.granularity = config.granularity
        self.group_size = config.group_size if config.granularity == "group" else 0
        pshape = qparam_shape(self.shape, self.granularity, self.group_size, axis)
        learn_scale = config.quantizer in ("lsq", "lsq_plus")
        self.scale = nn.Parameter(torch.ones(pshape), requires_grad=learn_scale)
        self.zero_point = nn.Parameter(torch.zeros(pshape), requires_grad=config.quantizer == "lsq_plus")
        self.observer = make_observer(config, pshape)
        self.enabled, self.calibrating, self.frozen, self.initialized = True, False, False, False
        self._init_source: Optional[weakref.ref] = None  # the tensor of the last init_from, and the
        self._init_stamp: tuple[int, int, int] = (-1, -1, -1)  # version counters then (see init_from)

    # ---- switches ---------------------------------------------------------------------
    def enable(self, enabled: bool = True) -> FakeQuantizer:
        self.enabled = enabled
        return self

    def disable(self) -> FakeQuantizer:
        return self.enable(False)

    def freeze(self, frozen: bool = True) -> FakeQuantizer:
        """Stop learning (LSQ) or observing (observer kind); qparams stay as they are."""
        self.frozen = frozen
        self._sync_requires_grad()
        return self

    def _sync_requires_grad(self) -> None:
        kind = self.config.quantizer
        self.scale.requires_grad_(kind != "observer" and not self.frozen)
        self.zero_point.requires_grad_(kind == "lsq_plus" and not self.frozen)

    # ---- range initialization ---------------------------------------------------------
    def start_calibration(self) -> None:
        """Forget the observed range; forwards now feed the observer and pass values through."""
        self.observer.reset()
        self.calibrating = True

    def finish_calibration(self) -> None:
        """Set scale and zero point from the observed range and leave calibration mode."""
        self.calibrating = False
        if self.observer.ready:
            self._load_observed()

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Range initialization from one tensor (a weight, or a batch of activations).

        Skipped when `x` and the qparams are unchanged since the last initialization from it
        (same storage, same in-place version counters): the search (an MSE one over a large
        model takes minutes on a CPU) would give the same result, e.g. when a freshly
        prepared model is calibrated, or when tied layers share this quantizer."""
        if self.ranges_from(x):
            return
        self.observer.reset()
        self.observe(whole_tensor(x))
        self._load_observed()
        self._init_source, self._init_stamp = weakref.ref(x), self._stamp(x)

    def ranges_from(self, x: Tensor) -> bool:
        """Whether the qparams are `init_from(x)`'s and neither they nor `x` have changed since."""
        return self._init_source is not None and self._init_source() is x and self._init_stamp == self._stamp(x)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_init_source"] = None  # a weak reference does not pickle; the next init_from runs in full
        return state

    def _stamp(self, x: Tensor) -> tuple[int, int, int]:
        """In-place version counters of the source and of the qparams (any write changes one)."""
        return (x._version, self.scale._version, self.zero_point._version)

    def observe(self, x: Tensor) -> None:
        self.observer.update(to_rows(x.detach(), self.granularity, self.group_size, self.axis))

    @torch.no_grad()
    def _load_observed(self) -> None:
        self.set_qparams(*self.observer.qparams())

    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Set scale and zero point (qparam shape) from outside, e.g. from GPTQ rounding; marks them initialized."""
        _assign(self.scale, scale.reshape(self.scale.shape))
        _assign(self.zero_point, zero_point.reshape(self.zero_point.shape))
        self.initialized = True

    # ---- forward ----------------------------------------------------------------------
    def qparams(self) -> tuple[Tensor, Tensor]:
        """The (scale, zero_point) applied, detached, in the stored qparam shape (whole tensors, also
        when the model is sharded: then a collective)."""
        c = self.config
        s, z = effective_qparams(self.scale, self.zero_point, c.qmin, c.qmax, c.torch_scale_dtype)
        return whole_tensor(s.detach()), whole_tensor(z.detach())

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self.observe(x)
            return x
        if not self.enabled:
            return x
        if not self.initialized:
            self.init_from(x)  # LSQ's rule: the first batch sets the range
        elif self.config.quantizer == "observer" and self.training and not self.frozen:
            self.observe(x)
            self._load_observed()
        return self._fake_quantize(x)

    def _fake_quantize(self, x: Tensor) -> Tensor:
        view = grouped_view(x, self.granularity, self.group_size, self.axis)
        scale = expand_qparam(self.scale, self.granularity, view.dim(), self.axis)
        zero = None  # symmetric settings keep their zero point at 0: None skips its passes
        if not self.config.symmetric:
            zero = expand_qparam(self.zero_point, self.granularity, view.dim(), self.axis)
        per_scale = max(1, x.numel() // max(1, self.scale.numel()))
        c = self.config
        factor = lsq_grad_factor(per_scale, c.qmax)
        return lsq_fake_quantize(view, scale, zero, c.qmin, c.qmax, factor, c.torch_scale_dtype).view_as(x)

    # ---- state ------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {key: bool(getattr(self, key)) for key in _STATE_KEYS}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict):  # torch's placeholder when a sharded loader loads tensors one by one
            return
        for key in _STATE_KEYS:
            setattr(self, key, bool(state[key]))
        self._sync_requires_grad()

    def extra_repr(self) -> str:
        c = self.config
        detail = f", group_size={c.group_size}" if c.granularity == "group" else ""
        sym = "symmetric" if c.symmetric else "asymmetric"
        return f"{c.quantizer}, bits={c.bits}, {sym}, {c.granularity}{detail}, enabled={self.enabled}"


def weight_quantizer(config: QuantizerConfig, weight: Tensor) -> FakeQuantizer:
    """A quantizer for `weight` with its range initialized from the weight itself."""
    quantizer = FakeQuantizer(config, tuple(weight.shape), axis=0).to(weight.device)  # scales beside the weight
    quantizer.init_from(weight)
    return quantizer


def activation_quantizer(config: QuantizerConfig, channels: int, channel_axis: int) -> FakeQuantizer:
    """A quantizer for a layer's input: per tensor, or per channel along `channel_axis`."""
    if config.granularity == "group":
        raise ConfigError("activation granularity='group' is not supported; use 'tensor' or 'channel'")
    template = [1] * (channel_axis + 1 if channel_axis >= 0 else -channel_axis)
    template[channel_axis] = channels
    return FakeQuantizer(config, tuple(template), axis=channel_axis)

