"""llama.cpp as a peer: its own converter, its own quantizer (with and without an importance matrix), its
own runtime.

The path a llama.cpp user takes: the float Hugging Face folder is written as an F32 GGUF by llama.cpp's
`convert_hf_to_gguf.py` (from the llama-cpp-python source distribution, the same llama.cpp version as
the installed runtime), quantized to Q4_0 or Q4_K_M by `llama_model_quantize` (the library call behind
`llama-quantize`), optionally guided by an importance matrix that `llama-imatrix` computes on
calibration text. Logits come from llama-cpp-python on the same token ids as every other peer.

`llama-imatrix` and `llama-quantize --imatrix` are command-line tools that llama-cpp-python does not ship:
`build_tools()` compiles the two from that source distribution once (about 15 minutes on two cores) into
~/.cache/qat/llama-tools; without them the importance-matrix rows say so and the others still run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python pin of the Makefile
CACHE = Path(os.environ.get("QAT_LLAMA_TOOLS", Path.home() / ".cache" / "qat" / "llama-tools"))
SOURCE = CACHE / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
TOOLS = SOURCE / "build" / "bin"
# llama.cpp's own names for the file types this comparison uses (llama.h's llama_ftype)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q4_K_M": 15, "Q8_0": 7}


def source() -> Path:
    """The llama.cpp tree of the pinned llama-cpp-python source distribution, downloaded and unpacked once."""
    if not (SOURCE / "convert_hf_to_gguf.py").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(CACHE)], check=True)
        with tarfile.open(CACHE / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz") as archive:
            archive.extractall(CACHE, filter="data")
    return SOURCE


def build_tools() -> Path:
    """`llama-quantize` and `llama-imatrix` compiled for this CPU (static, release), once; their folder."""
    tree = source()
    if not tools_built():
        # ninja: the system's, else the one pip installed beside this interpreter (qat depends on it)
        ninja = shutil.which("ninja") or str(Path(sys.executable).parent / "ninja")
        subprocess.run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-G", "Ninja",
                        f"-DCMAKE_MAKE_PROGRAM={ninja}",
                        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
                        "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(tree / "build"), "--target", "llama-quantize", "llama-imatrix",
                        "-j", str(os.cpu_count() or 2)], check=True, capture_output=True)
    return TOOLS


def tools_built() -> bool:
    return (TOOLS / "llama-imatrix").is_file() and (TOOLS / "llama-quantize").is_file()


def convert_float(hf_folder: Path, out: Path) -> Path:
    """The float model as llama.cpp's converter writes it (F32: the weights exactly as in torch)."""
    if not out.is_file():
        subprocess.run([sys.executable, str(source() / "convert_hf_to_gguf.py"), str(hf_folder),
                        "--outfile", str(out), "--outtype", "f32"], check=True, capture_output=True)
    return out


def quantize(float_gguf: Path, out: Path, kind: str) -> str:
    """llama.cpp's quantizer (the library call `llama-quantize` makes, default parameters) to `kind`; the
    settings string for the table."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    code = llama_cpp.llama_model_quantize(os.fsencode(float_gguf), os.fsencode(out), params)
    if code != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) returned {code}")
    return f"llama_model_quantize ftype {kind}, default parameters, llama-cpp-python {llama_cpp.__version__}"


def importance_matrix(float_gguf: Path, text_file: Path, out: Path, context: int, threads: int) -> Path:
    """`llama-imatrix` on `text_file` (chunks of `context` tokens, all of them) -> an imatrix GGUF."""
    subprocess.run([str(TOOLS / "llama-imatrix"), "-m", str(float_gguf), "-f", str(text_file), "-o", str(out),
                    "-c", str(context), "-t", str(threads), "--no-ppl"], check=True, capture_output=True)
    return out


def quantize_with_imatrix(float_gguf: Path, imatrix: Path, out: Path, kind: str, threads: int) -> str:
    """`llama-quantize --imatrix` to `kind`; the settings string for the table."""
    subprocess.run([str(TOOLS / "llama-quantize"), "--imatrix", str(imatrix), str(float_gguf), str(out), kind,
                    str(threads)], check=True, capture_output=True)
    return f"llama-quantize --imatrix (llama-imatrix on the calibration text) {kind}, llama.cpp of " \
           f"llama-cpp-python {LLAMA_CPP_VERSION}"


def weight_bytes(gguf_file: Path) -> int:
    """Bytes of every tensor in a GGUF file (the tokenizer and other metadata not counted)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(gguf_file).tensors)


def logits_function(gguf_file: Path, context: int, threads: int | None = None):
    """Token ids of one block -> llama.cpp's logits (T, vocab), from an empty context each time."""
    from qat.export.targets.llama_cpp_run import llama_logits, open_llama

    llm = open_llama(gguf_file, n_ctx=context, threads=threads)
    return lambda ids: llama_logits(llm, ids)
