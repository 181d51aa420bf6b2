"""`qat monitor FILE DATA`: run a batch of production inputs through a qat file, estimate its accuracy without
labels (ATC, when the file's calibration profile holds the fit) and test its drift against the profile
(qat.monitor.reference_free), without the float model.

DATA is a tensor file of model inputs (.pt / .pth holding a tensor, a tuple whose first item is one, or a dict
with `inputs` / `input_ids` / `x`; .npy; .npz with one array) or a recipe YAML, whose data module's evaluation
split is read (the test split when it has one, else validation). Prints each alert's onset (sample index, the
estimated accuracy, the layers that moved) and the last window's status; exit status 0 without an alert, 1 with
one (by default an estimated accuracy drop when the profile has the estimate, else drift; `--alert-on`), 2 on an
error.

Example:
    $ qat monitor runs/digits/model.safetensors traffic.pt --window 500
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from qat.monitor.profile import ProfileMissingError, model_inputs
from qat.monitor.reference_free import ReferenceFreeMonitor, ReferenceFreeStatus

TENSOR_SUFFIXES = (".pt", ".pth", ".npy", ".npz")


def read_tensor_file(path: Path) -> torch.Tensor:
    """The inputs tensor of a .pt / .pth / .npy / .npz file."""
    if path.suffix in (".npy", ".npz"):
        import numpy as np

        data = np.load(path)
        if path.suffix == ".npz":
            if len(data.files) != 1:
                raise ValueError(f"{path}: an .npz file of inputs must hold one array, it holds {data.files}")
            data = data[data.files[0]]
        return torch.from_numpy(np.ascontiguousarray(data))
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict):
        data = next((data[key] for key in ("inputs", "input_ids", "x") if key in data), None)
    elif isinstance(data, (tuple, list)) and data:
        data = data[0]
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor of inputs (or a tuple / dict holding one)")
    return data


def batches(data: str, batch_size: int) -> Iterator[Any]:
    """Batches of DATA: slices of a tensor file, or the evaluation loader of a recipe's data module."""
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix in TENSOR_SUFFIXES:
        inputs = read_tensor_file(path)
        return iter(inputs.split(batch_size))
    if path.suffix in (".yaml", ".yml"):
        from qat.data.loading import report_loader
        from qat.recipe import load_recipe
        from qat.run.models import instantiate

        datamodule = instantiate(load_recipe(path, [f"data.args.batch_size={batch_size}"]).data, "data")
        datamodule.setup("validate")
        return iter(report_loader(datamodule)[1])
    raise ValueError(f"{path}: DATA must be a tensor file ({', '.join(TENSOR_SUFFIXES)}) or a recipe .yaml")


def monitor_file(file: str, data: str, clean: str | None = None, batch_size: int = 64,
                 **options: Any) -> tuple[ReferenceFreeStatus, list[tuple[int, ReferenceFreeStatus]]]:
    """(the last status, [(samples seen, status) at each alert onset]) of DATA through FILE."""
    path = Path(file)
    if path.is_dir():
        path = path / "model.safetensors"
    onsets: list[tuple[int, ReferenceFreeStatus]] = []
    seen = 0
    clean_batches = list(batches(clean, batch_size)) if clean else None
    with ReferenceFreeMonitor.from_file(path, clean=clean_batches, on_alert=lambda s: onsets.append((seen, s))
                                        if s.alerting else None, **options) as monitor:
        status = monitor.status
        for batch in batches(data, batch_size):
            inputs = model_inputs(batch)
            seen += inputs[0].shape[0]
            with torch.no_grad():
                status = monitor.update(monitor.model(*inputs))
        status = monitor.flush()  # the samples after the last check
    return status, onsets


def run_monitor(args: argparse.Namespace) -> int:
    """Handler of `qat monitor`: 0 without drift, 1 with drift, 2 on an error."""
    options = {"window": args.window, "min_samples": min(args.min_samples, args.window),
               "false_alarm": args.false_alarm, "min_shift": args.min_shift, "alert_on_input": args.alert_on_input,
               "check_every": args.check_every, "sample_every": args.sample_every,
               "alert_on": None if args.alert_on == "auto" else args.alert_on,
               "min_accuracy_drop": args.min_accuracy_drop, "estimator": args.estimator}
    try:
        status, onsets = monitor_file(args.file, args.data, args.clean, args.batch_size, **options)
    except (ProfileMissingError, ValueError, FileNotFoundError) as err:
        print(f"qat monitor: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"alerts": [{"samples": n, **_accuracy_json(s), "layers": s.layers, "status": str(s)}
                                     for n, s in onsets],
                          "last": {"samples": status.samples, "alerting": status.alerting, **_accuracy_json(status),
                                   "drifting": status.drifting, "layers": status.layers,
                                   "input_drift": status.input_drift, "status": str(status)}}, indent=2))
    else:
        for seen, alert in onsets:
            what = [f"accuracy falling ({alert.accuracy_text()})"] if alert.accuracy_alert else []
            drifted = [line.split(" (")[0] for line in alert.alerts if line in alert.drift]
            what += [f"drift: {', '.join(drifted)}"] if drifted else []
            print(f"alert after {seen} samples: {'; '.join(what)}")
        print(status)
    return 1 if onsets else 0


def _accuracy_json(status: ReferenceFreeStatus) -> dict:
    return {"accuracy_alert": status.accuracy_alert, "estimated_accuracy": status.estimated_accuracy,
            "accuracy_interval": status.accuracy_interval, "validation_accuracy": status.validation_accuracy,
            "accuracy_drop": status.accuracy_drop}
