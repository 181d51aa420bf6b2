"""The EfficientNet-Lite0 / Fashion-MNIST run deployed: integer ONNX Runtime against `qat.load`, on the test set.

Given a run directory of `recipes/effnet_lite0_fmnist_w4a8.yaml` (its model.safetensors, float.safetensors and
recipe.yaml), this
  - converts the int4 file to the integer QDQ graph (`qat export --to onnx --integer`) and the fine-tuned float
    model (float.safetensors) to an fp32 ONNX graph (torch.onnx.export),
  - runs ONNX Runtime's integer model and `qat.load` on every test image: top-1 of each, their agreement, and
    the accuracy of the fp32 ONNX model,
  - times, in one process and interleaved (the machine is shared: read the ratios), batch 1 and batch 32:
    ORT integer vs ORT fp32, and `qat.load` vs the float PyTorch model,
  - prints sizes: the int4 file, the integer ONNX file, the fp32 model.

    .venv/bin/python -m benchmarks.models.effnet_fmnist RUN_DIR [--threads 2] [--repeats 40] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import qat
from benchmarks import record
from qat.export.targets.onnx import onnx_session
from qat.export.targets.onnx_integer import export_onnx_integer
from qat.recipe import load_recipe
from qat.run.models import instantiate, load_float_model


def float_model(run_dir: Path) -> torch.nn.Module:
    """The recipe's float model holding the fine-tuned float weights (float.safetensors)."""
    import safetensors.torch

    recipe = load_recipe(run_dir / "recipe.yaml")
    model = load_float_model(recipe)
    model.load_state_dict(safetensors.torch.load_file(run_dir / "float.safetensors"))
    return model.eval()


def test_batches(run_dir: Path, batch_size: int = 256) -> list:
    recipe = load_recipe(run_dir / "recipe.yaml", [f"data.args.batch_size={batch_size}"])
    data = instantiate(recipe.data, "data")
    data.setup("test")
    return list(data.test_dataloader())


def onnx_logits(sess, x: torch.Tensor) -> torch.Tensor:
    name = sess.get_inputs()[0].name
    return torch.from_numpy(sess.run(None, {name: x.contiguous().numpy()})[0])


def median_ms(runs: dict, repeats: int) -> dict:
    """Median milliseconds of each function, interleaved (one call of each per round, so a busy spell of the
    shared machine hits all of them alike)."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    int4_path = args.run_dir / "model.safetensors"
    with tempfile.TemporaryDirectory() as tmp:
        integer_path, fp32_path = Path(tmp) / "int8.onnx", Path(tmp) / "fp32.onnx"
        report = export_onnx_integer(int4_path, integer_path)
        reference = float_model(args.run_dir)
        batches = test_batches(args.run_dir)
        example = batches[0][0][:1].contiguous()
        torch.onnx.export(reference, (example,), fp32_path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
        integer, fp32 = onnx_session(integer_path, args.threads), onnx_session(fp32_path, args.threads)
        loaded = qat.load(int4_path)
        labels, ort_pred, load_pred, fp32_pred = [], [], [], []
        with torch.inference_mode():
            for x, y in batches:
                labels.append(y)
                ort_pred.append(onnx_logits(integer, x).argmax(-1))
                load_pred.append(loaded(x).argmax(-1))
                fp32_pred.append(onnx_logits(fp32, x).argmax(-1))
        y, ort, ld, fp = (torch.cat(t) for t in (labels, ort_pred, load_pred, fp32_pred))
        rows = [f"Run: `{args.run_dir}`; {len(y)} test images; {record.cpu_line()}; {args.threads} threads; "
                f"ONNX Runtime {__import__('onnxruntime').__version__}.", "",
                f"Integer graph: {report.integer_convs} integer convs, {report.float_convs} float convs "
                f"(ORT's optimized graph).", "",
                "| model | test accuracy | top-1 agreement with qat.load |", "| --- | --- | --- |",
                f"| qat.load (int4 file, PyTorch) | {(ld == y).float().mean():.4f} | 1 |",
                f"| ONNX Runtime integer (QDQ) | {(ort == y).float().mean():.4f} | {(ort == ld).float().mean():.4f} "
                f"({int((ort != ld).sum())} of {len(y)} differ) |",
                f"| ONNX Runtime fp32 (fine-tuned float model) | {(fp == y).float().mean():.4f} | "
                f"{(fp == ld).float().mean():.4f} |", "",
                "| batch | ORT fp32 ms | ORT integer ms | speed-up | float PyTorch ms | qat.load ms | speed-up |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for size in (1, 32):
            x = batches[0][0][:size].contiguous()
            with torch.inference_mode():
                # interleaved within one runtime only: OpenMP's and ORT's thread pools both spin after work,
                # and alternating them calls starved ORT (0.6x instead of 1.3x at batch 1)
                times = median_ms({"fp32": (lambda x=x: onnx_logits(fp32, x)),
                                   "int": (lambda x=x: onnx_logits(integer, x))}, args.repeats)
                times.update(median_ms({"float": (lambda x=x: reference(x)), "load": (lambda x=x: loaded(x))},
                                       args.repeats))
            rows.append(f"| {size} | {times['fp32']:.2f} | {times['int']:.2f} | {times['fp32'] / times['int']:.2f}x | "
                        f"{times['float']:.2f} | {times['load']:.2f} | {times['float'] / times['load']:.2f}x |")
        float_bytes = (args.run_dir / "float.safetensors").stat().st_size
        rows += ["", "| file | bytes | vs fp32 |", "| --- | --- | --- |",
                 f"| fp32 model (float.safetensors) | {float_bytes:,} | 1 |",
                 f"| int4 file (model.safetensors) | {int4_path.stat().st_size:,} | "
                 f"1/{float_bytes / int4_path.stat().st_size:.2f} |",
                 f"| integer ONNX (int8 weights) | {integer_path.stat().st_size:,} | "
                 f"1/{float_bytes / integer_path.stat().st_size:.2f} |"]
    text = "\n".join(rows)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
