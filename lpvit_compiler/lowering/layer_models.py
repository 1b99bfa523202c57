"""One layer as an ONNX model, for the kernel's tests and benchmarks and the ``native`` profile's timings: the
ai.lpvit op on a layer's BSR buffers, or MatMul + Add on its dense weight. Kept apart from the whole-model export
(onnx_export.py), which the cost model must not import.
"""

from __future__ import annotations

import onnx
import torch

from ..runtime.modules import BlockSparseLinear, BlockSparseLinearInt8

DOMAIN = "ai.lpvit"
OPSET = 18


def _layer_model(nodes, tensors: dict, in_features: int, out_features: int, custom_op: bool) -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", in_features])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", out_features])
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(DOMAIN, 1)] if custom_op else [])
    initializers = [numpy_helper.from_array(t.detach().numpy(), name) for name, t in tensors.items()]
    return helper.make_model(helper.make_graph(nodes, "layer", [x], [y], initializers), opset_imports=opsets)


def dense_layer_model(weight: torch.Tensor, bias: torch.Tensor | None = None) -> onnx.ModelProto:
    """``Y [M, N] = X [M, K] @ weight.T + bias`` as MatMul + Add, the way exported dense linears run."""
    from onnx import helper

    bias = bias if bias is not None else torch.zeros(weight.shape[0])
    nodes = [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "bias"], ["Y"])]
    return _layer_model(nodes, {"W": weight.T.contiguous(), "bias": bias}, weight.shape[1], weight.shape[0], False)


def single_layer_model(layer: BlockSparseLinear, dense: bool = False, residual: bool = False) -> onnx.ModelProto:
    """One layer as an ONNX model, input ``X`` [M, K] -> ``Y`` [M, N]: the ai.lpvit op on the layer's BSR
    buffers (BlockSparseLinearInt8 for an int8 layer; its ``activation`` attribute set unless "none";
    ``residual=True`` adds a graph input ``R`` [M, N] fed to the op's residual), or (``dense=True``) MatMul + Add
    on the same (dequantised) weights densified, without epilogue. For kernel tests and benchmarks."""
    from onnx import TensorProto, helper

    if dense:
        return dense_layer_model(layer.to_dense(), layer.bias)
    int8 = isinstance(layer, BlockSparseLinearInt8)
    names = ["X", "row_ptr", "col_idx", "values", *(["scales"] if int8 else []),
             "bias" if layer.bias is not None else "", "R" if residual else ""]
    while not names[-1]:  # absent optional inputs at the end are left out, in the middle named ""
        names.pop()
    attributes = {"activation": layer.activation} if layer.activation != "none" else {}
    nodes = [helper.make_node("BlockSparseLinearInt8" if int8 else "BlockSparseLinear", names, ["Y"], domain=DOMAIN,
                              block_shape=list(layer.block_shape), N=layer.out_features, K=layer.in_features,
                              **attributes)]
    tensors = {"row_ptr": layer.row_ptr, "col_idx": layer.col_idx, "values": layer.values,
               **({"scales": layer.scales} if int8 else {})}
    if layer.bias is not None:
        tensors["bias"] = layer.bias
    model = _layer_model(nodes, tensors, layer.in_features, layer.out_features, True)
    if residual:
        model.graph.input.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, ["M", layer.out_features]))
    return model
