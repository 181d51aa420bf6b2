"""The calibration profile: what each activation quantizer and the output saw on validation data.

A reference-free drift monitor (qat.monitor.reference_free) compares production traffic with this
profile. Per activation quantizer (a layer's `input_quantizer`: qat.fake_quant.FakeQuantizer in a
fake-quant model, qat.export.runtime.InputQuantizer in a `qat.load` model; QuantPoints included) the
values x entering it are taken in code units u = x / scale + zero_point and counted per sample in
`bins` equal bins over [qmin - 0.5, qmax + 0.5] plus an underflow and an overflow bin: exactly the
values the quantizer clips (their rounded code falls outside [qmin, qmax]). The clip rate is the
underflow + overflow share. The output (logits, last dimension = classes) gives two more channels:
the confidence (max softmax) and the entropy / ln(classes), each in `bins` bins over [0, 1]. A
quantizer that takes the model's own input tensor is of kind "input" (it measures data drift, which
need not cost accuracy; the monitor reports it without alerting by default), the others "activation".

A sample is one entry of the batch dimension (dim 0); its histogram is the share of its values per
bin (at most `max_values` values per sample per layer, evenly strided: the hooks stay cheap). The
profile stores, per channel, the mean and the standard deviation over samples of each bin share and
of the clip rate (the monitor's test needs the sample-to-sample spread: the values inside one input
are correlated, the samples are not), and the mean / std of the codes.

Stored in the int4 file under the metadata key `qat.calibration_profile` (docs/FORMAT.md), JSON:

    {"version": 1, "samples": m, "bins": 16, "max_values": 256, "channels": {name: {"kind": "activation" | "input" |
     "confidence" | "entropy", "low": lo, "high": hi, "values_per_sample": L, "hist": [bins + 2], "hist_sd": [bins + 2],
     "clip_rate": c, "clip_sd": s, "mean": mu, "std": sigma}}}

With labelled validation batches `(inputs, class targets)` and logits of one row per sample (classification),
the profile also stores the fit of the label-free accuracy estimators (qat.monitor.accuracy: the validation
accuracy, the confidence's mean and sd for DoC, each ATC score's threshold) under the optional key `accuracy`:

    "accuracy": {"version": 1, "samples": m, "validation_accuracy": a, "confidence": {"mean": c, "sd": s},
                 "thresholds": {"confidence": {"threshold": t, "share": q}, "negative_entropy": {...}}}

A profile without it (older files, unlabelled data) still reads; the monitor then reports the estimate as
unavailable. The profile's own `version` stays 1: the key is optional and older readers ignore it.

The profile is taken on the loaded int4 model (`write_profile`, which `qat train` / `qat export` call after
writing the file): `qat.load` drops the ReLUs its quantizers absorb (qat.export.clamps), so a fake-quant model's
statistics differ there (its ReLU zeroes what the loaded model's quantizer clips).

Example:
    >>> write_profile("model.safetensors", [x for x, _ in val_loader], max_samples=1024)
    >>> read_profile("model.safetensors").channels["conv2"].clip_rate
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from qat.export.reader import read_header
from qat.export.runtime import InputQuantizer
from qat.export.save import KEY_PROFILE, add_metadata
from qat.fake_quant import FakeQuantizer
from qat.functional import expand_qparam
from qat.monitor.accuracy import AccuracyEstimate, classification_targets

PROFILE_VERSION = 1
DEFAULT_BINS = 16
MAX_VALUES = 256  # values per sample and layer the hooks look at (evenly strided beyond): the hooks' cost
OUTPUT_CHANNELS = ("output.confidence", "output.entropy")


class ProfileMissingError(ValueError):
    """A file has no calibration profile (exported before qat stored one, or without validation data)."""


def _shares(shifted: Tensor, bins: int) -> Tensor:
    """Per-row shares (rows, bins + 2) of bin positions `shifted` (rows, L) = (value - low) / bin width + 1,
    overwritten: [0, 1) underflow, [k + 1, k + 2) bin k, >= bins + 1 overflow (NaN too)."""
    rows, length = shifted.shape
    index = shifted.nan_to_num_(nan=bins + 1, posinf=bins + 1, neginf=0.0).clamp_(0, bins + 1).long()  # trunc = floor
    index += torch.arange(0, rows * (bins + 2), bins + 2, device=index.device).unsqueeze(1)
    counts = torch.bincount(index.reshape(-1), minlength=rows * (bins + 2)).reshape(rows, bins + 2)
    return counts.float() / max(1, length)


def histogram_rows(values: Tensor, low: float, high: float, bins: int) -> Tensor:
    """Per-row shares (rows, bins + 2) of `values` (rows, L): underflow (< low), `bins` equal bins over
    [low, high), overflow (>= high). NaN counts as overflow."""
    width = bins / (high - low)
    return _shares((values.float() - low) * width + 1, bins)


def _features(hist: Tensor, codes: Optional[Tensor], low: float, high: float) -> Tensor:
    """[shares, clip rate] or, with `codes`, [shares, clip rate, mean, mean square] per row."""
    parts = [hist, hist[:, :1] + hist[:, -1:]]
    if codes is not None:
        finite = codes.float().nan_to_num(nan=high, posinf=high, neginf=low)
        parts.append(torch.stack([finite.mean(1), finite.square().mean(1)], 1))
    return torch.cat(parts, 1)


def feature_rows(values: Tensor, low: float, high: float, bins: int, moments: bool = True) -> Tensor:
    """Per-sample features of `values` (rows, L): bin shares (bins + 2), clip rate (under + over) and, with
    `moments`, the mean and mean square of the values: (rows, bins + 3 [+ 2])."""
    return _features(histogram_rows(values, low, high, bins), values if moments else None, low, high)


@dataclass(frozen=True)
class QuantizerTap:
    """How to read one activation quantizer's input in code units."""

    scale: Tensor
    zero: Tensor
    qmin: int
    qmax: int
    granularity: str
    axis: int

    @classmethod
    def of(cls, module: nn.Module) -> Optional[QuantizerTap]:
        if isinstance(module, FakeQuantizer):
            if not (module.enabled and module.initialized):
                return None
            scale, zero = module.qparams()
            c = module.config
            return cls(scale.float(), zero.float(), c.qmin, c.qmax, module.granularity, module.axis)
        if isinstance(module, InputQuantizer):
            qmin, qmax = module.spec.qrange
            return cls(module.scale.detach().float(), module.zero_point.detach().float(), qmin, qmax,
                       module.spec.granularity, module.spec.axis)
        return None

    @property
    def bounds(self) -> tuple[float, float]:
        return self.qmin - 0.5, self.qmax + 0.5

    def codes(self, x: Tensor, max_values: int) -> Tensor:
        """x (B, ...) -> (B, L) values in code units, L <= max_values (evenly strided)."""
        flat_length = x[:1].numel()
        stride = max(1, math.ceil(flat_length / max_values))
        if self.granularity == "tensor":
            flat = x.detach().reshape(x.shape[0], -1)[:, ::stride]
            return flat.float() / float(self.scale.reshape(-1)[0]) + float(self.zero.reshape(-1)[0])
        scale = expand_qparam(self.scale, self.granularity, x.dim(), self.axis)
        zero = expand_qparam(self.zero, self.granularity, x.dim(), self.axis)
        return (x.detach().float() / scale + zero).reshape(x.shape[0], -1)[:, ::stride]

    def sample(self, x: Tensor, max_values: int) -> Tensor:
        """What a hook keeps of x (B, ...): (B, L) values, L <= max_values (evenly strided); raw values per
        tensor (one copy: the cheap part runs at each forward), codes per channel."""
        if self.granularity == "tensor":
            stride = max(1, math.ceil(x[:1].numel() / max_values))
            return x.detach().reshape(x.shape[0], -1)[:, ::stride].float().clone()
        return self.codes(x, max_values)

    def features(self, kept: Tensor, bins: int, moments: bool) -> Tensor:
        """`feature_rows` of the codes of `sample(...)` rows; per tensor in one multiply-add to bin positions."""
        low, high = self.bounds
        width = bins / (high - low)
        if self.granularity != "tensor":
            return _features(_shares((kept - low) * width + 1, bins), kept if moments else None, low, high)
        scale, zero = float(self.scale.reshape(-1)[0]), float(self.zero.reshape(-1)[0])
        shifted = kept.mul(width / scale).add_((zero - low) * width + 1)  # bin positions
        codes = kept / scale + zero if moments else None
        return _features(_shares(shifted, bins), codes, low, high)


def activation_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """{layer name: its input quantizer} of the activation quantizers in `model` (fake-quant or loaded)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (FakeQuantizer, InputQuantizer)) and name.split(".")[-1] == "input_quantizer":
            found[name.rpartition(".")[0] or "input"] = module
    return found


MAX_OUTPUT_ROWS = 64  # output rows (token positions) per sample looked at, evenly strided beyond


def output_values(outputs: Any) -> Tensor:
    """A model's logits as (B, rows, classes) float32, at most MAX_OUTPUT_ROWS rows per sample: the first output
    of a tuple / ModelOutput."""
    logits = outputs if isinstance(outputs, Tensor) else outputs[0]
    logits = logits.detach().reshape(logits.shape[0], -1, logits.shape[-1])
    stride = max(1, math.ceil(logits.shape[1] / MAX_OUTPUT_ROWS))
    return logits[:, ::stride].float()


def output_rows(outputs: Any, bins: int, moments: bool = True) -> dict[str, Tensor]:
    """Per-sample features of the output's confidence (max softmax) and normalized entropy."""
    logits = output_values(outputs)  # (B, R, C)
    log_p = torch.log_softmax(logits, -1)
    confidence = log_p.max(-1).values.exp()  # (B, R)
    entropy = -(log_p.exp() * log_p).sum(-1) / math.log(max(2, logits.shape[-1]))
    high = 1.0 + 1e-6  # a value of exactly 1 falls in the last bin
    return {OUTPUT_CHANNELS[0]: feature_rows(confidence, 0.0, high, bins, moments),
            OUTPUT_CHANNELS[1]: feature_rows(entropy, 0.0, high, bins, moments)}


class ActivationTaps:
    """Forward pre-hooks on every activation quantizer of `model`, collecting per-sample features.

    `take(samples)` returns what the forwards since the last call saw, {channel: (samples, features)}
    (`feature_rows`: with `moments` bins + 5 columns, else bins + 3); `close()` removes the hooks. With
    `sample_every` k, only every k-th sample the model is called on (counted along dim 0 across batches) is
    looked at; `start` is the first one of the last batch.
    """

    def __init__(self, model: nn.Module, bins: int = DEFAULT_BINS, max_values: int = MAX_VALUES,
                 names: Optional[Iterable[str]] = None, moments: bool = True, sample_every: int = 1) -> None:
        self.bins, self.max_values, self.moments, self.sample_every = bins, max_values, moments, sample_every
        self.pending: dict[str, list[Tensor]] = {}  # what the hooks kept (QuantizerTap.sample), per channel
        self.taps: dict[str, QuantizerTap] = {}
        self.bounds: dict[str, tuple[float, float]] = {}
        self.lengths: dict[str, int] = {}  # values per sample each layer's hook looked at
        self.inputs: set[str] = set()  # channels whose quantizer takes the model's own input tensor
        self._model_inputs: set[int] = set()
        self._seen, self.start = 0, 0  # samples the model was called on; this batch's first one looked at
        self._handles = [model.register_forward_pre_hook(self._note_inputs)]
        wanted = None if names is None else set(names)
        for name, module in activation_quantizers(model).items():
            tap = QuantizerTap.of(module)
            if tap is None or (wanted is not None and name not in wanted):
                continue
            self.bounds[name], self.taps[name] = tap.bounds, tap
            self._handles.append(module.register_forward_pre_hook(self._hook(name, tap)))

    def _note_inputs(self, module: nn.Module, args: tuple) -> None:
        tensors = [arg for arg in args if isinstance(arg, Tensor)]
        self._model_inputs = {id(arg) for arg in tensors}
        batch = tensors[0].shape[0] if tensors and tensors[0].dim() else 1
        self.start = -self._seen % self.sample_every  # the first sample of this batch that is looked at
        self._seen += batch

    def _hook(self, name: str, tap: QuantizerTap):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if isinstance(x, Tensor) and x.dim() >= 1 and x.is_floating_point() and self.start < x.shape[0]:
                if id(x) in self._model_inputs:
                    self.inputs.add(name)
                kept = tap.sample(x[self.start:: self.sample_every], self.max_values)
                self.lengths[name] = kept.shape[1]
                self.pending.setdefault(name, []).append(kept)

        return hook

    def take(self, samples: int) -> dict[str, Tensor]:
        """{channel: (samples, features)} since the last call; a layer that saw k x samples rows (tokens
        flattened into the batch, a layer run k times) is averaged over each run of k consecutive rows."""
        taken, self.pending = self.pending, {}
        rows = {}
        for name, parts in taken.items():
            tap = self.taps[name]
            if all(part.shape[1] == parts[0].shape[1] for part in parts):  # one pass over all the batches
                block = tap.features(torch.cat(parts), self.bins, self.moments).cpu()
            else:  # inputs of several lengths (token sequences)
                block = torch.cat([tap.features(part, self.bins, self.moments) for part in parts]).cpu()
            if block.shape[0] == samples:
                rows[name] = block
            elif samples and block.shape[0] % samples == 0:
                rows[name] = block.reshape(samples, -1, block.shape[1]).mean(1)
        return rows

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class ChannelProfile:
    """One channel's profiled statistics (see the module docstring)."""

    kind: str
    low: float
    high: float
    values_per_sample: int
    hist: list[float]
    hist_sd: list[float]
    clip_rate: float
    clip_sd: float
    mean: float
    std: float

    @classmethod
    def from_rows(cls, kind: str, low: float, high: float, length: int, rows: Tensor) -> ChannelProfile:
        rows = rows.double()
        bins = rows.shape[1] - 3
        mean, sd = rows.mean(0), rows.std(0, unbiased=False)
        value_mean, value_square = float(mean[bins + 1]), float(mean[bins + 2])
        return cls(kind, low, high, length, _rounded(mean[:bins]), _rounded(sd[:bins]), _round(mean[bins]),
                   _round(sd[bins]), _round(value_mean), _round(math.sqrt(max(0.0, value_square - value_mean ** 2))))

    def expected(self) -> tuple[Tensor, Tensor]:
        """(mean, sd) of the tested features: bin shares then clip rate, float64."""
        return (torch.tensor([*self.hist, self.clip_rate], dtype=torch.float64),
                torch.tensor([*self.hist_sd, self.clip_sd], dtype=torch.float64))


def _round(value: Any) -> float:
    return float(f"{float(value):.6g}")


def _rounded(values: Tensor) -> list[float]:
    return [_round(v) for v in values.tolist()]


@dataclass
class CalibrationProfile:
    """Per-channel statistics of clean data; `to_json()` is what the file stores."""

    samples: int
    bins: int
    channels: dict[str, ChannelProfile] = field(default_factory=dict)
    version: int = PROFILE_VERSION
    max_values: int = MAX_VALUES  # values per sample and layer looked at: the monitor must use the same
    accuracy: Optional[AccuracyEstimate] = None  # the label-free accuracy estimators' fit (absent: unavailable)

    def to_json(self) -> dict:
        value = {"version": self.version, "samples": self.samples, "bins": self.bins, "max_values": self.max_values,
                 "channels": {name: asdict(channel) for name, channel in self.channels.items()}}
        if self.accuracy is not None:
            value["accuracy"] = self.accuracy.to_json()
        return value

    @classmethod
    def from_json(cls, value: Any, where: str = "profile") -> CalibrationProfile:
        if not isinstance(value, dict) or not isinstance(value.get("version"), int):
            raise ValueError(f"{where}: {KEY_PROFILE} must be a JSON object with an integer 'version'")
        if value["version"] > PROFILE_VERSION:
            raise ValueError(f"{where}: calibration profile version {value['version']} is newer than this qat "
                             f"reads (1..{PROFILE_VERSION}); upgrade qat")
        try:
            channels = {name: ChannelProfile(**entry) for name, entry in value["channels"].items()}
            profile = cls(int(value["samples"]), int(value["bins"]), channels, value["version"],
                          int(value["max_values"]), AccuracyEstimate.from_json(value.get("accuracy")))
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"{where}: malformed calibration profile ({err})") from None
        if any(len(c.hist) != profile.bins + 2 or len(c.hist_sd) != profile.bins + 2 for c in channels.values()):
            raise ValueError(f"{where}: calibration profile histograms must have bins + 2 entries")
        return profile


def read_profile(path: Union[str, os.PathLike]) -> Optional[CalibrationProfile]:
    """The calibration profile stored in a qat file, or None when it has none."""
    metadata = read_header(path).metadata
    if KEY_PROFILE not in metadata:
        return None
    try:
        value = json.loads(metadata[KEY_PROFILE])
    except ValueError as err:
        raise ValueError(f"{path}: {KEY_PROFILE} is not valid JSON ({err})") from None
    return CalibrationProfile.from_json(value, str(path))


def model_inputs(batch: Any) -> tuple[Tensor, ...]:
    """A data loader batch -> the model's positional inputs: `(inputs, targets)` -> (inputs,), a dict ->
    (input_ids[, attention_mask]), a tensor -> (tensor,)."""
    if isinstance(batch, dict):
        return tuple(batch[key] for key in ("input_ids", "attention_mask") if key in batch)
    if isinstance(batch, (tuple, list)):
        return (batch[0],)
    return (batch,)


@torch.no_grad()
def collect_rows(model: nn.Module, batches: Iterable[Any], bins: int = DEFAULT_BINS, max_samples: int = 1024,
                 max_values: int = MAX_VALUES,
                 ) -> tuple[dict[str, Tensor], dict[str, tuple], Optional[AccuracyEstimate]]:
    """Run `model` (eval mode) over `batches` (loader batches or input tensors) up to `max_samples`
    samples: ({channel: (samples, bins + 5) per-sample features}, {channel: (low, high, values per sample,
    kind)}, the accuracy estimators' fit (qat.monitor.accuracy) when every batch carried class targets for
    logits of one row per sample, else None)."""
    was_training = model.training
    model.eval()
    taps = ActivationTaps(model, bins, max_values)
    collected: dict[str, list[Tensor]] = {}
    seen, rows_per_sample = 0, 1
    labelled: Optional[list[tuple[Tensor, Tensor]]] = []  # (logits, targets) while every batch has them
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        for batch in batches:
            inputs = tuple(t[: max_samples - seen].to(device) for t in model_inputs(batch))
            outputs = model(*inputs)
            samples = inputs[0].shape[0]
            logits = output_values(outputs)
            rows_per_sample = logits.shape[1]
            targets = classification_targets(batch, samples)
            if labelled is not None and targets is not None and rows_per_sample == 1 and \
                    bool(((targets >= 0) & (targets < logits.shape[-1])).all()):
                labelled.append((logits[:, 0].cpu(), targets.cpu()))
            else:
                labelled = None
            for name, rows in {**taps.take(samples), **output_rows(outputs, bins)}.items():
                collected.setdefault(name, []).append(rows.cpu())
            seen += samples
            if seen >= max_samples:
                break
    finally:
        taps.close()
        model.train(was_training)
    bounds = {name: (*taps.bounds[name], taps.lengths.get(name, 0), "input" if name in taps.inputs else "activation")
              for name in taps.bounds}
    bounds.update({name: (0.0, 1.0, rows_per_sample, name.split(".")[-1]) for name in OUTPUT_CHANNELS})
    estimate = None
    if labelled:
        estimate = AccuracyEstimate.fit(torch.cat([lg for lg, _ in labelled]), torch.cat([t for _, t in labelled]))
    return {name: torch.cat(parts) for name, parts in collected.items()}, bounds, estimate


def build_profile(model: nn.Module, batches: Iterable[Any], bins: int = DEFAULT_BINS, max_samples: int = 1024,
                  max_values: int = MAX_VALUES) -> CalibrationProfile:
    """The calibration profile of `model` on clean `batches` (at most `max_samples` samples); with the accuracy
    estimators' fit (validation accuracy, mean confidence, ATC thresholds) when the batches are `(inputs, class
    targets)`."""
    rows, bounds, estimate = collect_rows(model, batches, bins, max_samples, max_values)
    return profile_from_rows(rows, bounds, bins, max_values, estimate)


def profile_from_rows(rows: dict[str, Tensor], bounds: dict[str, tuple], bins: int,
                      max_values: int = MAX_VALUES, accuracy: Optional[AccuracyEstimate] = None) -> CalibrationProfile:
    """A profile from per-sample feature rows (`collect_rows`) and, optionally, the accuracy estimate."""
    if not rows:
        raise ValueError("no samples to profile: the batches were empty")
    samples = min(block.shape[0] for block in rows.values())
    channels = {}
    for name, block in rows.items():
        low, high, length, kind = bounds[name]
        channels[name] = ChannelProfile.from_rows(kind, low, high, length, block)
    return CalibrationProfile(samples, bins, channels, max_values=max_values, accuracy=accuracy)


def write_profile(path: Union[str, os.PathLike], batches: Iterable[Any], bins: int = DEFAULT_BINS,
                  max_samples: int = 1024, kernel_backend: Optional[str] = None) -> CalibrationProfile:
    """Load the qat file at `path`, profile the loaded model on clean `batches` and store the profile in the
    file (`qat.calibration_profile`). Profiling the loaded model, not the fake-quant one, matters: the loader
    drops clamps (a ReLU before a quantizer whose own clamp does the same, qat.export.clamps), so there a
    quantizer sees the negative values the fake-quant model's ReLU had zeroed, counted as clipped."""
    from qat.export import load

    profile = build_profile(load(path, kernel_backend=kernel_backend), batches, bins, max_samples)
    add_metadata(path, {KEY_PROFILE: json.dumps(profile.to_json(), sort_keys=True, allow_nan=False)})
    return profile
