"""ONNX Runtime's own 4-bit weight quantizer as a peer of qat, on a Hugging Face causal LM or encoder.

The path a user takes without qat: trace the float model to ONNX, run
`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` on the file (post-training,
no calibration data) and serve the result with ONNX Runtime. Its data-free 4-bit methods:

    rtn       DefaultWeightOnlyQuantConfig: the quantizer's default method, a C++ per-block min / max
              round to nearest; asymmetric (uint4 codes, a uint4 zero point per block)
    hqq       HQQWeightOnlyQuantConfig: Half-Quadratic Quantization, proximal steps that move each
              block's zero point (kept in float) to lower the weight error; asymmetric only
    rtn_inc   RTNWeightOnlyQuantConfig: the Intel Neural Compressor port of the same rounding. ORT
              1.31.1 packs its zero points across rows and fails ("cannot reshape array ...") on any
              weight with an odd number of blocks along K: SmolLM2's K=576 at blocks 64 and 128

Every MatMul with a constant 2-D weight becomes a com.microsoft MatMulNBits node: the seven
projections of each layer and, because `export_float` unties it, the output head. The token
embedding stays a float32 Gather unless `quantize_embedding` (rtn only: GatherBlockQuantized).
That is the layout of qat's own ONNX export (`export_qat`): int4 MatMulNBits everywhere, the
embedding table as float32, so both sides are measured by one engine on the same graph shape.

Example:
    >>> float_onnx = export_float(model, Path("/tmp/float.onnx"))
    >>> settings = quantize(float_onnx, Path("/tmp/rtn64.onnx"), block_size=64, algorithm="rtn")
    >>> logits = session_logits(Path("/tmp/rtn64.onnx"), threads=2)(ids)   # (T, vocab) float32

An encoder (all-MiniLM-L6-v2) the same way, through `export_encoder` ((input_ids, attention_mask) ->
last_hidden_state) and `session_function`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

ALGORITHMS = ("rtn", "hqq", "rtn_inc")
BITS = 4


class _Logits(nn.Module):
    """input_ids (batch, length) -> logits (batch, length, vocab), without a key-value cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_float(model: nn.Module, out: Path) -> Path:
    """Write the float model (a Hugging Face causal LM) as ONNX at `out`: input_ids -> logits.

    Traced as qat's exporter traces (torch.onnx.export with dynamo, graph optimized), on a (2, 16)
    batch so that batch and length both stay dynamic (torch.export fixes a size of 1). A tied
    output head is untied in a copy first: traced tied, the head reads Transpose(embedding table),
    a computed tensor the quantizer skips, and would stay float. Untied, it is a constant MatMul
    weight of its own (the float file then holds the table twice; the quantized one once).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is model.get_input_embeddings().weight:
        model = copy.deepcopy(model)
        head = model.get_output_embeddings()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    ids = torch.zeros(2, 16, dtype=torch.long)
    return _trace(_Logits(model), (ids,), ["input_ids"], "logits", out)


def export_encoder(model: nn.Module, out: Path) -> Path:
    """Write a float Hugging Face encoder (e.g. BertModel) as ONNX at `out`:
    (input_ids, attention_mask) -> last_hidden_state, traced as `export_float` traces (token type ids left
    to the model's default, all zeros, as a one-segment sentence batch has them)."""
    ids = torch.zeros(2, 16, dtype=torch.long)
    return _trace(_LastHidden(model), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"],
                  "last_hidden_state", out)


class _LastHidden(nn.Module):
    """(input_ids, attention_mask) -> the encoder's last hidden states (batch, length, hidden)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _trace(module: nn.Module, inputs: tuple[Tensor, ...], input_names: list[str], output_name: str,
           out: Path) -> Path:
    """torch.onnx.export (dynamo, optimized) of `module` with every input's batch and length dynamic."""
    out = Path(out)
    dims = tuple({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} for _ in inputs)
    with torch.no_grad():
        program = torch.onnx.export(module.eval(), inputs, dynamo=True, optimize=True, input_names=input_names,
                                    output_names=[output_name], dynamic_shapes=dims, verbose=False)
    program.save(os.fspath(out))
    return out


def quantize(float_onnx: Path, out: Path, block_size: int, algorithm: str,
             accuracy_level: Optional[int] = None, quantize_embedding: bool = False) -> str:
    """Quantize the constant MatMul weights of `float_onnx` to 4 bits with ONNX Runtime; write `out`.

    Returns the settings used, as one line (classes, arguments, onnxruntime version).
    `accuracy_level` None leaves the attribute off the nodes (float32 compute on CPU, as qat's
    export); 4 would let the CPU kernels quantize activations to int8. ORT's HQQ path never writes
    it. `quantize_embedding` also turns the embedding Gather into a 4-bit GatherBlockQuantized
    (rtn only: ORT's HQQ raises on Gather, its INC RTN skips it).
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}; allowed: {ALGORITHMS}")
    if quantize_embedding and algorithm != "rtn":
        raise ValueError(f"quantize_embedding: ORT quantizes a Gather with algorithm 'rtn' only, not {algorithm!r}")
    ops = ("MatMul", "Gather") if quantize_embedding else ("MatMul",)
    if algorithm == "rtn":
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False,
                                                  accuracy_level=accuracy_level, bits=BITS,
                                                  op_types_to_quantize=ops)
        described = (f"DefaultWeightOnlyQuantConfig(block_size={block_size}, is_symmetric=False, "
                     f"accuracy_level={accuracy_level}, bits={BITS}, op_types_to_quantize={ops})")
    elif algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block_size, bits=BITS, op_types_to_quantize=ops)
        described = f"HQQWeightOnlyQuantConfig(block_size={block_size}, bits={BITS}, op_types_to_quantize={ops})"
    else:
        config = mnq.RTNWeightOnlyQuantConfig(op_types_to_quantize=ops)
        described = f"RTNWeightOnlyQuantConfig(op_types_to_quantize={ops})"
    quantizer = mnq.MatMulNBitsQuantizer(onnx.load(os.fspath(float_onnx)), bits=BITS, block_size=block_size,
                                         is_symmetric=False, accuracy_level=accuracy_level, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(os.fspath(out), False)
    return (f"onnxruntime {onnxruntime.__version__}: MatMulNBitsQuantizer(bits={BITS}, block_size={block_size}, "
            f"is_symmetric=False, accuracy_level={accuracy_level}, algo_config={described}).process()")


def session_logits(onnx_path: Path, threads: Optional[int] = None) -> Callable[[Sequence[int]], Tensor]:
    """A function from one block of token ids to its float32 logits (T, vocab), by ONNX Runtime on CPU.

    The session is built once (`threads` intra-op threads; None: ORT's own choice) and reused.
    """
    run = session_function(onnx_path, threads)
    return lambda ids: run([torch.tensor([list(ids)])])[0].float()


def session_function(onnx_path: Path, threads: Optional[int] = None) -> Callable[[Sequence[Tensor]], Tensor]:
    """A function from the graph's inputs (torch tensors, in its input order) to its first output, by ONNX
    Runtime on CPU; one session (`threads` intra-op threads; None: ORT's own choice), built once."""
    from qat.export.targets.onnx import onnx_session, run_onnx

    session = onnx_session(onnx_path, threads)
    return lambda inputs: run_onnx(session, inputs)


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of all initializers as stored (external data included), each named tensor counted once.

    Subgraph initializers count too. Constants held in Constant nodes do not: the exporters used
    here write weights as initializers.
    """
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    total = 0
    for tensor in _initializers(model.graph).values():
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int({entry.key: entry.value for entry in tensor.external_data}["length"])
        elif tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:  # typed fields (int32_data, float_data, ...): count at the element size
            total += int(onnx.numpy_helper.to_array(tensor).nbytes)
    return total


def _initializers(graph) -> dict:
    """Initializers of `graph` and of the subgraphs of its nodes (If / Loop bodies), by name."""
    import onnx

    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                found.update(_initializers(sub))
    return found


def export_qat(qat_file: Path, out: Path, example_inputs: Optional[Sequence[Tensor]] = None) -> Path:
    """qat's own int4 ONNX graph of `qat_file`: MatMulNBits holding qat's codes, embedding as float32 Gather.

    Traced on `example_inputs` (the model's positional inputs); default: one (1, 16) block of token ids
    (a causal LM). An encoder takes (input_ids, attention_mask).
    """
    from qat.export.targets.onnx import export_onnx

    inputs = example_inputs if example_inputs is not None else (torch.zeros(1, 16, dtype=torch.long),)
    export_onnx(qat_file, out, example_inputs=tuple(inputs))
    return Path(out)
