"""Cost of the reference-free drift monitor: a loaded qat file's forward alone vs the forward with the monitor's
hooks and its `update` (the window test), interleaved in one process (the machine is shared: read the ratios).

    .venv/bin/python -m benchmarks.monitor.overhead RUN_DIR [RUN_DIR ...] [--batch 1 64] [--repeats 200]
        [--threads 1] [--sample-every 1 4] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import qat
from benchmarks import record
from benchmarks.monitor.validate import evaluation_images
from qat.monitor.profile import build_profile
from qat.monitor.reference_free import ReferenceFreeMonitor
from qat.recipe import load_recipe


def interleaved_ms(plain, monitored, repeats: int) -> tuple[float, float]:
    """Median ms of each, alternating calls (after one warm-up call of each)."""
    plain(), monitored()
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, out in ((plain, times[0]), (monitored, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample-every", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["| model | batch | sample_every | forward (ms) | forward + monitor (ms) | overhead |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for run_dir in args.run_dirs:
        name = load_recipe(run_dir / "recipe.yaml").name
        model = qat.load(run_dir / "model.safetensors").eval()  # without hooks
        watched = qat.load(run_dir / "model.safetensors").eval()  # the same file, with the monitor's hooks
        images, _ = evaluation_images(run_dir / "recipe.yaml", limit=max(args.batch) + 256)
        profile = build_profile(model, [images[:256]])
        for every, batch in ((every, batch) for every in args.sample_every for batch in args.batch):
            monitor = ReferenceFreeMonitor(watched, profile, sample_every=every, on_alert=lambda status: None)
            x = images[256: 256 + batch]

            def plain(x: torch.Tensor = x, model: torch.nn.Module = model) -> None:
                with torch.no_grad():
                    model(x)

            def monitored(x: torch.Tensor = x, monitor: ReferenceFreeMonitor = monitor) -> None:
                monitor(x)  # forward with hooks, then update (the window test)

            repeats = args.repeats if batch < 16 else max(20, args.repeats // 4)
            base, with_monitor = interleaved_ms(plain, monitored, repeats)
            monitor.close()
            lines.append(f"| {name} | {batch} | {every} | {base:.3f} | {with_monitor:.3f} | "
                         f"{100 * (with_monitor / base - 1):+.1f} % |")
            print(lines[-1], flush=True)
    text = "\n".join([*lines, "", f"{record.cpu_line()}; torch {torch.__version__}, {args.threads} threads"])
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
