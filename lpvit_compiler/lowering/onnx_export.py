"""Lowering a compiled model to ONNX, and onnxruntime sessions that can run it.

``target="lpvit"``: every BlockSparseLinear becomes one ``ai.lpvit::BlockSparseLinear`` node (opset
``ai.lpvit`` 1) whose ``row_ptr``/``col_idx``/``values``/``bias`` are initializers — the custom-op library's
contract (kernels/ort_op.cc); an int8 layer (BlockSparseLinearInt8) becomes ``ai.lpvit::BlockSparseLinearInt8``
with int8 ``values`` and float ``scales``; a GELU left outside the kernel (a layer kept dense, or epilogue fusion
off) becomes onnxruntime's ``com.microsoft::Gelu`` (``FastGelu`` for the tanh form), which onnxruntime fuses
with the bias add before it into one pass (``BiasGelu``) where the standard lowering runs five elementwise ops
plus the add. ``target="portable"``: standard ONNX ops only, each block-sparse layer as a dense MatMul on its
masked (and, for int8 layers, dequantised) weight, zeros included. Dense-with-zeros rather than a gather
formulation because every runtime's GEMM is its fastest path and a gather of blocks would cost more than it
saves without a sparse kernel; the file runs on stock onnxruntime or any other ONNX runtime.

The graph comes from ``torch.onnx.export(dynamo=True)`` with translations of ``torch.ops.lpvit.bsr_linear`` (and,
for the lpvit target, ``aten.gelu``), is cleaned with onnx-graphsurgeon (constants folded, dead nodes dropped)
and checked with ``onnx.checker``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch
from torch import fx

from ..errors import LpvitError
from ..runtime.modules import BlockSparseLinear, DenseEpilogueLinear, linear_from
from .attention_layout import head_major_attention as head_major_layout
from .layer_models import DOMAIN, OPSET

ORT_CONTRIB_DOMAIN = "com.microsoft"  # onnxruntime's own contrib ops, which the lpvit target may use too
DATA_CONFIG_KEY = "lpvit.data_config"  # ONNX metadata: the preprocessing the model expects (timm data config)
TARGETS = ("lpvit", "portable")


def _register_schema() -> None:
    """Declare the ai.lpvit ops to onnx, so onnxscript can emit them and onnx.checker knows them."""
    schema = onnx.defs.OpSchema
    parameter = schema.FormalParameter
    optional = schema.FormalParameterOption.Optional
    attributes = [schema.Attribute("block_shape", schema.AttrType.INTS, "[bh, bw]"),
                  schema.Attribute("N", schema.AttrType.INT, "out features"),
                  schema.Attribute("K", schema.AttrType.INT, "in features"),
                  schema.Attribute("activation", onnx.helper.make_attribute("activation", "none"),
                                   "fused epilogue applied before the residual add: none | relu | gelu (erf form) | "
                                   "gelu_tanh; absent means none")]
    heads = [schema.Attribute(name, onnx.helper.make_attribute(name, 0), doc) for name, doc in (
        ("input_heads", "H > 0: X is head-major [B, H, T, K/H] (an attention's output); 0 or absent: [..., K]"),
        ("output_heads", "H > 0: Y is head-major [B, H, T, N/H] (q, k or v), X [B, T, K]; 0 or absent: [..., N]"))]
    index = [parameter("X", "T"), parameter("row_ptr", "tensor(int64)"), parameter("col_idx", "tensor(int64)")]
    epilogue = [parameter("bias", "T", param_option=optional), parameter("residual", "T", param_option=optional)]
    ops = {
        "BlockSparseLinear": ("Y[..., N] = activation(X[..., K] * W^T + bias) + residual, W [N, K] in BSR (row_ptr, "
                              "col_idx, values [nnz, bh, bw]); bias and residual optional",
                              [parameter("values", "T")]),
        "BlockSparseLinearInt8": ("As BlockSparseLinear with W = scales[n] * values (values int8 [nnz, bh, bw], "
                                  "scales [N]); each row of X is quantized to int8 with scale max|x|/127 at run "
                                  "time and the products are summed exactly in int32",
                                  [parameter("values", "tensor(int8)"), parameter("scales", "T")]),
    }
    for name, (doc, weights) in ops.items():
        if not onnx.defs.has(name, DOMAIN):
            onnx.defs.register_schema(schema(name, DOMAIN, 1, doc=doc, inputs=index + weights + epilogue,
                                             outputs=[parameter("Y", "T")],
                                             type_constraints=[("T", ["tensor(float)"], "fp32")],
                                             attributes=attributes + heads))


def _bsr_linear_to_onnx(x, row_ptr, col_idx, values, bias=None, out_features: int = 0, in_features: int = 0,
                        activation: str = "none", residual=None, input_heads: int = 0, output_heads: int = 0):
    return _lpvit_node("BlockSparseLinear", (x, row_ptr, col_idx, values, bias), values, out_features, in_features,
                       activation, residual, input_heads, output_heads)


def _bsr_linear_int8_to_onnx(x, row_ptr, col_idx, values, scales, bias=None, out_features: int = 0,
                             in_features: int = 0, activation: str = "none", residual=None, input_heads: int = 0,
                             output_heads: int = 0):
    return _lpvit_node("BlockSparseLinearInt8", (x, row_ptr, col_idx, values, scales, bias), values, out_features,
                       in_features, activation, residual, input_heads, output_heads)


def _lpvit_node(op: str, inputs: tuple, values, out_features: int, in_features: int, activation: str, residual,
                input_heads: int, output_heads: int):
    import onnxscript

    lpvit_opset = onnxscript.values.Opset(DOMAIN, 1)
    attributes = {"activation": activation} if activation != "none" else {}  # unfused nodes stay as before
    attributes |= {name: value for name, value in (("input_heads", input_heads), ("output_heads", output_heads))
                   if value}
    inputs = inputs + ((residual,) if residual is not None else ())
    return getattr(lpvit_opset, op)(*inputs, block_shape=[int(values.shape[1]), int(values.shape[2])],
                                    N=out_features, K=in_features, **attributes)


def _gelu_to_ort(x, approximate: str = "none"):
    """GELU as onnxruntime's contrib op (erf form ``Gelu``, tanh form ``FastGelu``): one pass over the tensor
    instead of the five elementwise ops of the standard lowering, and onnxruntime fuses the linear's bias add
    before it (``BiasGelu``)."""
    from onnxscript import values

    name = "FastGelu" if approximate == "tanh" else "Gelu"
    # a schema for onnxscript only, not registered: onnx's reference evaluator wants op names unique across
    # domains, and ONNX itself has a Gelu
    schema = onnx.defs.OpSchema(name, ORT_CONTRIB_DOMAIN, 1, inputs=[onnx.defs.OpSchema.FormalParameter("X", "T")],
                                outputs=[onnx.defs.OpSchema.FormalParameter("Y", "T")],
                                type_constraints=[("T", ["tensor(float)"], "fp32")])
    return values.Op(values.Opset(ORT_CONTRIB_DOMAIN, 1), name, schema)(x)


def _densified(gm: torch.nn.Module) -> torch.nn.Module:
    """A copy with every BlockSparseLinear replaced by the nn.Linear of its masked dense weight (and its fused
    epilogue written out in standard ops); a model without one (an uncompiled model) as it is."""
    if not any(isinstance(module, BlockSparseLinear) for module in gm.modules()):
        return gm
    dense = copy.deepcopy(gm)
    for name, module in list(dense.named_modules()):
        if isinstance(module, BlockSparseLinear):
            dense.set_submodule(name, DenseEpilogueLinear(linear_from(module.to_dense(), module.bias),
                                                          module.activation))
    dense.recompile()
    return dense


def export_onnx(gm: fx.GraphModule, example: torch.Tensor, path, target: str = "lpvit",
                metadata: dict[str, str] | None = None, head_major_attention: bool = True) -> Path:
    """Write ``gm`` as ONNX to ``path`` (``metadata`` into the model's metadata_props); returns the path. For the
    lpvit target, ``head_major_attention`` lowers each attention's layers to read and write head-major tensors
    (attention_layout.py: no Transposes or Split around the attention)."""
    if target not in TARGETS:
        raise LpvitError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
    _register_schema()
    if target == "portable":
        model = _densified(gm)
    else:
        rewrite = head_major_attention and isinstance(gm, fx.GraphModule)  # a plain nn.Module: nothing compiled
        model = head_major_layout(gm, example)[0] if rewrite else gm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter narrates each of its steps as warnings
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=OPSET, input_names=["pixel_values"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            custom_translation_table=_translations(target),
            verbose=False,
        )
    proto = _clean(program.model_proto)
    if metadata:
        onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=False)
    path = Path(path)
    onnx.save(proto, path)
    return path


def _translations(target: str) -> dict:
    """The exporter's overrides: our ops (folded away by ``_densified`` for the portable target) and, for the
    onnxruntime target, GELU as onnxruntime's fused op."""
    table = {torch.ops.lpvit.bsr_linear.default: _bsr_linear_to_onnx,
             torch.ops.lpvit.bsr_linear_int8.default: _bsr_linear_int8_to_onnx}
    if target == "lpvit":
        table[torch.ops.aten.gelu.default] = _gelu_to_ort
    return table


def _clean(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    graph.fold_constants().cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    cleaned.ir_version = proto.ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(proto.opset_import)
    return cleaned
