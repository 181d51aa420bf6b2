"""What every benchmark record carries: the machine it ran on and the exact command that made it.

Every script under benchmarks/ takes its machine line, command line and date from here, so that
all records describe a run the same way:

    from benchmarks import record

    print(record.header())  # "Machine: AMD EPYC ... torch 2.13.0+cpu ..." and "Command: `.venv/bin/python -m ...`"
    record.write(Path(__file__).with_suffix(".md"), text)  # keeps the hand-written notes below NOTES_MARKER

`machine()` names the CPU model (and its L3 cache), physical cores and logical CPUs, the ATen CPU
capability, torch's intra-op threads, the torch and Python versions, the kernel, and the GPU if
there is one. `command()` is the command line as typed: the interpreter relative to the working
directory, `-m module` when run as a module, the arguments quoted as a shell would need them, and
the environment variables that change what a benchmark measures (thread counts, `QAT_*`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

# Everything below this line in an existing record is hand-written and survives `write` (the same
# marker as the int4 kernel harness's records, qat.kernels.bench).
NOTES_MARKER = "<!-- notes: everything below is kept when the benchmark rewrites this file -->"
# Environment variables that change what a run measures; `command()` writes the ones that are set.
ENV_PREFIXES = ("QAT_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TRITON_")
CPUINFO = Path("/proc/cpuinfo")
L3_SIZE = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows where there is none."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


INTEGER_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # what integer kernels depend on


def cpu_line() -> str:
    """The CPU's model name and which of INTEGER_FLAGS it has, e.g. 'AMD EPYC (avx2 yes, avx512f no, ...)'."""
    try:
        flags = next((set(line.split(":", 1)[1].split()) for line in CPUINFO.read_text().splitlines()
                      if line.startswith("flags")), set())
    except OSError:
        flags = set()
    present = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in INTEGER_FLAGS)
    return f"{cpu_model()} ({present})"


def physical_cores() -> int | None:
    """Distinct (socket, core) pairs in /proc/cpuinfo; None where it does not say."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return None
    cores, socket = set(), "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "physical id":
            socket = value
        elif key == "core id":
            cores.add((socket, value))
    return len(cores) or None


def gpu() -> str | None:
    """The first CUDA device: name, SMs, memory and L2 cache; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    l2 = getattr(properties, "L2_cache_size", 0)
    return (f"{torch.cuda.get_device_name(0)} ({properties.multi_processor_count} SMs, "
            f"{properties.total_memory / 2**30:.0f} GiB" + (f", L2 {l2 >> 20} MiB" if l2 else "") + ")")


def machine() -> str:
    """One line: CPU model and L3, cores / logical CPUs, ATen capability, torch threads, versions, GPU if any."""
    import torch

    model = cpu_model()
    if L3_SIZE.exists():
        model += f" ({L3_SIZE.read_text().strip()} L3)"
    cores, logical, threads = physical_cores(), os.cpu_count(), torch.get_num_threads()
    counts = f"{cores} cores / {logical} logical CPUs" if cores else f"{logical} logical CPUs"
    line = (f"{model}, {counts}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"torch {torch.__version__} with {threads} intra-op thread{'s' if threads != 1 else ''}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")
    device = gpu()
    return line + (f"; GPU: {device}" if device else "; no GPU")


def _interpreter() -> str:
    """sys.executable as typed from the working directory (`.venv/bin/python`), else its name."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(Path.cwd()))
    except ValueError:
        return executable.name


def command(argv: list[str] | None = None) -> str:
    """The exact command line of this process (`argv`: the arguments, default sys.argv[1:])."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name not in (None, "__main__"):
        words = [_interpreter(), "-m", spec.name.removesuffix(".__main__")]
    else:
        script = Path(sys.argv[0])
        with contextlib.suppress(ValueError):
            script = script.resolve().relative_to(Path.cwd())
        words = [_interpreter(), str(script)]
    env = [f"{key}={value}" for key, value in sorted(os.environ.items()) if key.startswith(ENV_PREFIXES)]
    return shlex.join([*env, *words, *(sys.argv[1:] if argv is None else argv)])


def now() -> str:
    """The date and time in UTC, as records give it (`2026-11-30 05:23 UTC`)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def header(seconds: float | None = None) -> str:
    """Two lines for the top of a record: `Machine: ...` and `Command: `...` (N s, date)`."""
    took = f"{seconds:.0f} s, " if seconds is not None else ""
    return f"Machine: {machine()}.\nCommand: `{command()}` ({took}{now()})."


def write(path: str | Path, text: str) -> Path:
    """Write a record's generated `text` to `path`, keeping what an existing file holds below NOTES_MARKER."""
    path = Path(path)
    previous = path.read_text() if path.exists() else ""
    if NOTES_MARKER in previous:
        text = text.rstrip("\n") + "\n\n" + NOTES_MARKER + previous.split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path
