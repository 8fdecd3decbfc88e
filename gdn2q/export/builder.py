"""A small helper over ``onnx.helper`` for building graphs node by node with readable names.

Written by hand because the graph is built directly from weights (no tracing): torch 2.13's exporter needs
onnxscript and traces the Python control flow of the decode state, while a hand-built graph keeps to a short
list of standard ONNX ops whose semantics are easy to check against the spec.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gdn2q.export.spec import OPSET

END = 2**62          # Slice end meaning "to the end of the axis"


class GraphBuilder:
    """Collects nodes and initializers; every op returns the name of its (first) output."""

    def __init__(self, const_prefix: str = "const") -> None:
        self.const_prefix = const_prefix          # subgraphs need their own prefix: names must not shadow
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.scope = ""
        self._counts: Counter[str] = Counter()
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        base = f"/{self.scope}/{hint}" if self.scope else f"/{hint}"
        self._counts[base] += 1
        n = self._counts[base]
        return base if n == 1 else f"{base}_{n}"

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer (weights keep their checkpoint-derived names so quantizers can select them)."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small constant, shared between uses of the same value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"{self.const_prefix}_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, *inputs: str, n_out: int = 1, hint: str | None = None, **attrs):
        name = self.fresh(hint or op_type)
        outs = [f"{name}_out{j}" if n_out > 1 else f"{name}_out" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def output(self, src: str, name: str) -> str:
        """Route ``src`` to a graph-level name (Identity keeps graph names independent of node names)."""
        self.nodes.append(helper.make_node("Identity", [src], [name], name=self.fresh(f"{name}_identity")))
        return name

    # ---- composite helpers used by the GDN-2 graph ----
    def linear(self, x: str, weight_name: str, weight: np.ndarray, hint: str) -> str:
        """x @ weight.T for a torch-layout [out, in] weight (stored transposed, as MatMul wants)."""
        w = self.weight(weight_name, np.ascontiguousarray(weight.T.astype(np.float32)))
        return self.op("MatMul", x, w, hint=f"{hint}/MatMul")

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def rms_norm(self, x: str, weight: np.ndarray | None, eps: float, weight_name: str | None = None) -> str:
        """x / sqrt(mean(x^2, last axis) + eps) * weight."""
        ms = self.op("ReduceMean", self.op("Mul", x, x), self.ints(-1), keepdims=1)
        y = self.op("Div", x, self.op("Sqrt", self.op("Add", ms, self.const(eps))))
        if weight is None:
            return y
        w = self.weight(weight_name, weight.astype(np.float32)) if weight_name else self.const(weight)
        return self.op("Mul", y, w)

    def reshape(self, x: str, *shape: int) -> str:
        return self.op("Reshape", x, self.ints(*shape))

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.ints(*axes))

    def split(self, x: str, sizes: list[int], axis: int = -1) -> list[str]:
        return self.op("Split", x, self.ints(*sizes), n_out=len(sizes), axis=axis)

    def slice(self, x: str, start: int, end: int | None, axis: int) -> str:
        """x[start:end] along ``axis`` (end None: to the end; negative start counts from the end)."""
        return self.op("Slice", x, self.ints(start), self.ints(END if end is None else end), self.ints(axis))

    def transpose(self, x: str, *perm: int) -> str:
        return self.op("Transpose", x, perm=list(perm))

    def graph(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
              name: str) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str,
              doc: str = "") -> onnx.ModelProto:
        graph = self.graph(inputs, outputs, name)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gdn2q",
                                  doc_string=doc)
        model.ir_version = 10
        return model


def value_info(name: str, elem_type: int, shape: list[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


ELEM_TYPES = {"float32": TensorProto.FLOAT, "int8": TensorProto.INT8, "int64": TensorProto.INT64}
