"""Weight formats of the exported graph: fp16 storage, or int8 / int4 through onnxruntime's quantizer.

int8 and int4 MatMul weights become ``MatMulNBits`` (onnxruntime.quantization.MatMulNBitsQuantizer, symmetric
blocks along the input axis, accuracy_level 4 = int8 activations on CPU). The embedding table: int4 goes through
the same quantizer (``GatherBlockQuantized``); onnxruntime's quantizer has no 8-bit Gather, so int8 stores the
table by hand as int8 codes with one fp32 scale per row, gathered and rescaled with standard ops.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gdn2q.errors import UnsupportedError
from gdn2q.export.spec import WEIGHT_FORMATS

BLOCK_SIZE = {"int8": 128, "int4": 32}
ACCURACY_LEVEL = 4          # MatMulNBits: int8 activations, int32 accumulation (the fast CPU path)
EMBEDDING = "model.embeddings.weight"


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def _weight_consumers(model: onnx.ModelProto, op_type: str, input_index: int) -> list[onnx.NodeProto]:
    inits = _initializers(model)
    return [n for n in model.graph.node if n.op_type == op_type and n.input[input_index] in inits]


def to_fp16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store MatMul and embedding weights in fp16, cast back to fp32 inside the graph (CPU kernels run fp32).

    onnxruntime folds the Casts when the session starts, so the file halves and the arithmetic stays fp32.
    """
    inits = _initializers(model)
    targets = {(n.input[1], "w") for n in _weight_consumers(model, "MatMul", 1)}
    targets |= {(n.input[0], "e") for n in _weight_consumers(model, "Gather", 0)}
    casts = []
    for name, _ in sorted(targets):
        arr = numpy_helper.to_array(inits[name]).astype(np.float16)
        inits[name].CopyFrom(numpy_helper.from_array(arr, f"{name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"/cast_fp16/{name}",
                                      to=TensorProto.FLOAT))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(casts + nodes)
    return model


def quantize_embedding_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Embedding Gather -> Gather(int8 codes) * Gather(per-row scale): symmetric, nearest rounding."""
    inits = _initializers(model)
    if EMBEDDING not in inits:
        return model
    table = numpy_helper.to_array(inits[EMBEDDING]).astype(np.float32)
    scale = np.maximum(np.abs(table).max(axis=1), 1e-30) / 127.0
    codes = np.clip(np.round(table / scale[:, None]), -127, 127).astype(np.int8)
    inits[EMBEDDING].CopyFrom(numpy_helper.from_array(codes, f"{EMBEDDING}.int8"))
    model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32)[:, None], f"{EMBEDDING}.scale"))
    new_nodes = []
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] == EMBEDDING:
            ids, out = node.input[1], node.output[0]
            new_nodes += [
                helper.make_node("Gather", [f"{EMBEDDING}.int8", ids], [f"{out}.codes"], name=f"{node.name}_codes",
                                 axis=0),
                helper.make_node("Gather", [f"{EMBEDDING}.scale", ids], [f"{out}.scale"], name=f"{node.name}_scale",
                                 axis=0),
                helper.make_node("Cast", [f"{out}.codes"], [f"{out}.float"], name=f"{node.name}_cast",
                                 to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{out}.float", f"{out}.scale"], [out], name=f"{node.name}_dequant"),
            ]
        else:
            new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model


def quantize_nbits(model: onnx.ModelProto, bits: int, block_size: int, exclude: list[str],
                   gather: bool) -> onnx.ModelProto:
    """MatMul (and, for 4 bits, the embedding Gather) weights through onnxruntime's MatMulNBitsQuantizer."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # the quantizer imports onnx_ir, an optional dependency of onnxruntime
        raise UnsupportedError(f"--weights int{bits} needs onnxruntime's MatMulNBits quantizer, which failed to "
                               f"import ({e}); pip install onnx-ir") from e

    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    quiet = logging.getLogger("onnxruntime.quantization")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                 accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=exclude, op_types_to_quantize=ops,
                                 quant_axes=(("MatMul", 0), ("Gather", 1)))
        q.process()
    finally:
        quiet.level = level
    return q.model.model


def apply_weight_format(model: onnx.ModelProto, weights: str, block_size: int | None = None,
                        quantize_lm_head: bool = True) -> onnx.ModelProto:
    """Convert an fp32 step graph to ``weights`` (fp32 | fp16 | int8 | int4)."""
    if weights not in WEIGHT_FORMATS:
        raise UnsupportedError(f"--weights {weights}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if weights == "fp32":
        return model
    if weights == "fp16":
        return to_fp16_storage(model)
    bits = 8 if weights == "int8" else 4
    block = block_size or BLOCK_SIZE[weights]
    if block < 16 or block & (block - 1):
        raise UnsupportedError(f"--block-size {block}: MatMulNBits needs a power of two >= 16")
    exclude = [] if quantize_lm_head else [n.name for n in model.graph.node
                                           if n.op_type == "MatMul" and n.input[1] == "lm_head.weight"]
    if bits == 8:
        model = quantize_embedding_int8(model)
    return quantize_nbits(model, bits, block, exclude, gather=bits == 4)
