"""A structured fuzzer over malformed ``ai.lpvit::BlockSparseLinear`` models.

Each case starts from a valid random layer — float (``BlockSparseLinear``) or int8 (``BlockSparseLinearInt8``:
int8 ``values`` and float ``scales``) — with or without a fused epilogue (``activation`` attribute,
``residual`` input, the bias slot left empty as ``""`` before a residual), some reading or writing a head-major
layout (``input_heads`` / ``output_heads``), applies a few mutations (lengths and
contents of ``row_ptr``, ``col_idx``, ``values``, ``bias`` and ``residual``, the attributes, dtypes) and feeds
the weights as initializers or as graph inputs. The oracle is an independent numpy statement of the op's
contract: where it says the inputs are malformed, onnxruntime must return an error; where it says they are
valid, the output must equal activation(X·Wᵀ + b) + residual.
Nothing else — a crash, a hang, a wrong number, or (under AddressSanitizer, as CI runs this file) any
out-of-bounds access — is acceptable.

``LPVIT_FUZZ_CASES`` sets the campaign's size (10,000 by default, in the normal and the AddressSanitizer run;
about 3 s and 30 s here); a failure names the case seed, and ``LPVIT_FUZZ_SEED`` replays one case.
"""

import math
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from scipy.special import erfc, expit

import lpvit_compiler as lpvit

CASES = int(os.environ.get("LPVIT_FUZZ_CASES", "10000"))
TIME_LIMIT_S = float(os.environ.get("LPVIT_FUZZ_SECONDS", "900"))
BLOCKS = [(16, 16), (8, 4), (1, 1), (20, 12), (32, 64), (3, 5)]


ACTIVATIONS = {  # float64 statements of the fused activations
    "none": lambda v: v, "relu": lambda v: np.where(v < 0, 0.0, v), "gelu": lambda v: v * 0.5 * erfc(-v / np.sqrt(2)),
    "gelu_tanh": lambda v: v * expit(2 * np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)),
}


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int8 op's per-row quantization of X (float32 arithmetic): (xq, scale)."""
    amax = np.abs(x).max(1)
    with np.errstate(all="ignore"):
        inv = (np.float32(127) / amax).astype(np.float32)
        xq = np.rint(np.clip(x * inv[:, None], -127, 127))
    usable = np.isfinite(x).all(1) & (amax >= 1e-30)
    return np.where(usable[:, None], xq, 0), np.where(usable, amax / np.float32(127), 0).astype(np.float32)


def expected_output(n, k, block_shape, row_ptr, col_idx, values, bias, x, activation=None, residual=None,
                    scales=None, input_heads=0, output_heads=0):
    """activation(X·Wᵀ + b) + residual if the inputs satisfy the op's contract, else None (the op must then
    return an error). ``activation`` None means the attribute is absent; ``scales`` given: the int8 op; head
    layouts as ``ops.bsr_linear`` states them."""
    int8 = scales is not None
    heads = _head_layouts(n, k, block_shape, x, activation, residual, input_heads, output_heads)
    if heads is None:
        return None
    rows, reshape_output = heads
    if int8 and not (scales.dtype == np.float32 and scales.ndim == 1 and scales.size == n and
                     np.isfinite(scales).all() and values.dtype == np.int8 and k <= 65536):
        return None
    if not (isinstance(block_shape, list) and len(block_shape) == 2):
        return None
    if activation is not None and activation not in ACTIVATIONS:
        return None
    if residual is not None and (residual.dtype != np.float32 or residual.shape != (*rows.shape[:-1], n)):
        return None
    bh, bw = block_shape
    if not (1 <= n < 2**31 and 1 <= k < 2**31 and 1 <= bh <= 4096 and 1 <= bw <= 4096):
        return None
    if row_ptr.dtype != np.int64 or col_idx.dtype != np.int64 or values.dtype != (np.int8 if int8 else np.float32) or \
            (bias is not None and bias.dtype != np.float32):
        return None
    if values.ndim != 3 or values.shape[1:] != (bh, bw) or rows.shape[-1] != k:
        return None
    block_rows, block_cols, nnz = math.ceil(n / bh), math.ceil(k / bw), values.shape[0]
    if row_ptr.ndim != 1 or row_ptr.size != block_rows + 1 or col_idx.ndim != 1 or col_idx.size != nnz:
        return None
    if nnz > block_rows * block_cols or row_ptr[0] != 0 or row_ptr[-1] != nnz or np.any(np.diff(row_ptr) < 0):
        return None
    if bias is not None and (bias.ndim != 1 or bias.size != n):
        return None
    dense = np.zeros((block_rows * bh, block_cols * bw), np.float64)
    for r in range(block_rows):
        cols = col_idx[row_ptr[r]:row_ptr[r + 1]]
        if np.any(cols < 0) or np.any(cols >= block_cols) or np.any(np.diff(cols) <= 0):
            return None
        for b, c in zip(range(row_ptr[r], row_ptr[r + 1]), cols):
            dense[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = values[b]
    with np.errstate(all="ignore"):  # NaN and inf entries are part of the campaign
        flat = rows.reshape(-1, k)
        if int8:  # exact integer sums, dequantised by both scales
            xq, sx = quantize_rows(flat)
            product = (xq @ dense[:n, :k].T) * sx[:, None].astype(np.float64) * scales[None, :]
        else:
            product = flat.astype(np.float64) @ dense[:n, :k].T
        product = product.reshape(*rows.shape[:-1], n)
        y = ACTIVATIONS[activation or "none"](product + (bias if bias is not None else 0))
        return reshape_output(y + residual if residual is not None else y)


def _head_layouts(n, k, block_shape, x, activation, residual, input_heads, output_heads):
    """(X as the rows the op multiplies, Y's row-major -> its layout), or None where the layouts break the op's
    contract: H >= 0; input_heads H: X [B, H, T, K/H], K/H a multiple of bw; output_heads H: N/H a multiple of bh,
    X [B, T, K] (or head-major), no activation, no residual."""
    if not (input_heads or output_heads):
        return x, lambda y: y
    if input_heads < 0 or output_heads < 0 or not (isinstance(block_shape, list) and len(block_shape) == 2):
        return None
    bh, bw = block_shape
    if bh < 1 or bw < 1:
        return None
    if input_heads:
        if not (k >= 1 and k % input_heads == 0 and k // input_heads % bw == 0 and x.ndim == 4 and
                x.shape[1] == input_heads and x.shape[3] * input_heads == k):
            return None
        x = x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], k)
    if not output_heads:
        return x, lambda y: y
    if not (n >= 1 and n % output_heads == 0 and n // output_heads % bh == 0 and activation in (None, "none") and
            residual is None and x.ndim == 3):
        return None
    return x, lambda y: y.reshape(y.shape[0], y.shape[1], output_heads, -1).transpose(0, 2, 1, 3)


def valid_layer(rng):
    bh, bw = BLOCKS[rng.integers(len(BLOCKS))]
    n, k = int(rng.integers(1, 70)), int(rng.integers(1, 70))
    block_rows, block_cols = math.ceil(n / bh), math.ceil(k / bw)
    keep = rng.random((block_rows, block_cols)) < rng.choice([0.0, 0.3, 0.7, 1.0])
    row_ptr = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
    col_idx = np.nonzero(keep)[1].astype(np.int64)
    int8 = rng.random() < 0.4
    values = rng.integers(-128, 128, (len(col_idx), bh, bw)).astype(np.int8) if int8 else \
        rng.standard_normal((len(col_idx), bh, bw)).astype(np.float32)
    scales = (rng.random(n) * 0.02).astype(np.float32) if int8 else None
    bias = rng.standard_normal(n).astype(np.float32) if rng.random() < 0.7 else None
    activation = [None, *ACTIVATIONS][int(rng.integers(len(ACTIVATIONS) + 1))]
    return dict(n=n, k=k, block_shape=[bh, bw], row_ptr=row_ptr, col_idx=col_idx, values=values, scales=scales,
                bias=bias, activation=activation, residual=rng.random() < 0.3, input_heads=0, output_heads=0)


def head_major_layer(rng):
    """A valid layer (float or int8) of an attention: q, k or v (output_heads) or proj (input_heads), or both."""
    bh, bw = BLOCKS[rng.integers(len(BLOCKS))]
    layouts = [(0, int(rng.integers(1, 4))), (int(rng.integers(1, 4)), 0), (int(rng.integers(1, 4)),) * 2]
    input_heads, output_heads = layouts[int(rng.integers(3))]
    n = (output_heads or 1) * bh * int(rng.integers(1, 3)) if output_heads else int(rng.integers(1, 70))
    k = input_heads * bw * int(rng.integers(1, 3)) if input_heads else int(rng.integers(1, 70))
    case = valid_layer(rng)
    block_rows, block_cols = math.ceil(n / bh), math.ceil(k / bw)
    keep = rng.random((block_rows, block_cols)) < rng.choice([0.0, 0.5, 1.0])
    shape, int8 = (int(keep.sum()), bh, bw), case["scales"] is not None
    case.update(n=n, k=k, block_shape=[bh, bw], row_ptr=np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64),
                col_idx=np.nonzero(keep)[1].astype(np.int64),
                values=rng.integers(-128, 128, shape).astype(np.int8) if int8 else
                rng.standard_normal(shape).astype(np.float32),
                scales=(rng.random(n) * 0.02).astype(np.float32) if int8 else None,
                bias=rng.standard_normal(n).astype(np.float32) if case["bias"] is not None else None,
                input_heads=input_heads, output_heads=output_heads)
    if output_heads:
        case.update(activation=None, residual=False)
    return case


def _poke(rng, array):
    """One entry set to a boundary or random value (int arrays) or the array resized."""
    array = array.copy()
    if array.size and rng.random() < 0.7:
        i = int(rng.integers(array.size))
        if array.dtype.kind == "i":
            limits = np.iinfo(array.dtype)
            value = int(rng.choice([-1, 0, 1, 2**31, -(2**62), int(array.flat[i]) + int(rng.integers(-3, 4))]))
            array.flat[i] = min(max(value, limits.min), limits.max)
        else:
            array.flat[i] = rng.choice([np.nan, np.inf, 0.0, 1e30])
        return array
    size = max(0, array.shape[0] + int(rng.choice([-2, -1, 1, 2])))
    return np.resize(array, (size, *array.shape[1:])) if array.ndim else array


MUTATIONS = [
    lambda rng, c: c.update(row_ptr=_poke(rng, c["row_ptr"])),
    lambda rng, c: c.update(col_idx=_poke(rng, c["col_idx"])),
    lambda rng, c: c.update(col_idx=np.sort(c["col_idx"])[::-1].copy()),  # order broken within rows
    lambda rng, c: c.update(values=_poke(rng, c["values"])),
    lambda rng, c: c.update(values=c["values"].reshape(c["values"].shape[0], c["values"][0].size if c["values"].size
                                                       else 0)),  # wrong rank
    lambda rng, c: c.update(values=np.zeros((len(c["values"]), c["values"].shape[-2] + 1, c["values"].shape[-1]),
                                            np.float32) if c["values"].ndim == 3 else c["values"]),
    lambda rng, c: c.update(bias=_poke(rng, c["bias"]) if c["bias"] is not None else
                            np.zeros(int(rng.integers(0, 80)), np.float32)),
    lambda rng, c: c.update(bias=c["bias"][None] if c["bias"] is not None else None),
    lambda rng, c: c.update(n=int(rng.choice([0, -64, c["n"] + 1, c["n"] - 1, 2**40]))),
    lambda rng, c: c.update(k=int(rng.choice([0, -1, c["k"] + 1, 2**40]))),
    lambda rng, c: c.update(block_shape=[[0, 16], [-16, 16], [16], [16, 16, 1], [5000, 1],
                                         c["block_shape"][::-1]][int(rng.integers(6))]),
    lambda rng, c: c.update(col_idx=c["col_idx"].astype(np.int32)),
    lambda rng, c: c.update(row_ptr=np.full_like(c["row_ptr"], c["values"].shape[0])),
    lambda rng, c: c.update(activation=["swish", "", "GELU", 2][int(rng.integers(4))]),
    lambda rng, c: c.update(residual=_poke(rng, c["residual"]) if c["residual"] is not None else
                            np.zeros((len(c["x"]), max(0, min(c["n"], 99)) + 1), np.float32)),
    lambda rng, c: c.update(residual=c["residual"].astype(np.float64) if c["residual"] is not None else None),
    # int8: scales poked (NaN, inf, length), of another dtype or rank; values of the other op's dtype
    lambda rng, c: c.update(scales=_poke(rng, c["scales"]) if c["scales"] is not None else None),
    lambda rng, c: c.update(scales=c["scales"].astype(np.float64) if c["scales"] is not None else None),
    lambda rng, c: c.update(scales=c["scales"][None] if c["scales"] is not None else None),
    lambda rng, c: c.update(values=np.clip(np.nan_to_num(c["values"], posinf=0, neginf=0), -128, 127)
                            .astype(np.float32 if c["scales"] is not None else np.int8)),
    # head layouts: counts that do not divide, negative or huge; X of another rank; an epilogue on q, k, v
    lambda rng, c: c.update(input_heads=int(rng.choice([-1, 0, 2, 3, 5, 2**40]))),
    lambda rng, c: c.update(output_heads=int(rng.choice([-1, 0, 2, 3, 5, 2**40]))),
    lambda rng, c: c.update(x=c["x"].reshape(-1, c["x"].shape[-1])),
    lambda rng, c: c.update(x=c["x"][None]),
    lambda rng, c: c.update(activation="relu"),
]


def _value_info(name: str, array: np.ndarray):
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape))


def build_model(case, as_inputs: bool) -> tuple[onnx.ModelProto, dict]:
    """The case as a one-node model: weights as initializers or graph inputs; the residual always an input."""
    int8 = case["scales"] is not None
    names = ["X", "row_ptr", "col_idx", "values", *(["scales"] if int8 else []),
             "bias" if case["bias"] is not None else ""]
    names += ["residual"] if case["residual"] is not None else []
    while not names[-1]:
        names.pop()
    tensors = {name: case[name] for name in names[1:] if name and name != "residual"}
    attributes = {"activation": case["activation"]} if case["activation"] is not None else {}
    attributes.update({name: case[name] for name in ("input_heads", "output_heads") if case[name]})
    node = helper.make_node("BlockSparseLinearInt8" if int8 else "BlockSparseLinear", names, ["Y"], domain="ai.lpvit",
                            block_shape=[int(v) for v in case["block_shape"]], N=case["n"], K=case["k"], **attributes)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)
    feeds = {"X": case["x"]}
    inputs = [x]
    if case["residual"] is not None:
        inputs.append(_value_info("residual", case["residual"]))
        feeds["residual"] = case["residual"]
    if as_inputs:
        inputs += [_value_info(name, t) for name, t in tensors.items()]
        graph, feeds = helper.make_graph([node], "fuzz", inputs, [y]), {**feeds, **tensors}
    else:
        initializers = [numpy_helper.from_array(t, name) for name, t in tensors.items()]
        graph = helper.make_graph([node], "fuzz", inputs, [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.lpvit", 1)])
    return model, feeds


def run_case(seed: int, options: ort.SessionOptions) -> str:
    """'rejected' or 'computed'; raises AssertionError when the op's behaviour breaks the contract."""
    rng = np.random.default_rng(seed)
    case = head_major_layer(rng) if rng.random() < 0.25 else valid_layer(rng)
    batch, tokens, heads = int(rng.integers(1, 4)), int(rng.integers(1, 6)), case["input_heads"]
    shape = (batch, heads, tokens, case["k"] // heads) if heads else (batch, tokens, case["k"]) \
        if case["output_heads"] else (int(rng.integers(1, 9)), case["k"])
    case["x"] = rng.standard_normal(shape).astype(np.float32)
    rows = (batch, tokens) if heads else shape[:-1]
    case["residual"] = rng.standard_normal((*rows, case["n"])).astype(np.float32) if case["residual"] else None
    for _ in range(int(rng.integers(0, 4))):
        MUTATIONS[int(rng.integers(len(MUTATIONS)))](rng, case)
    expected = expected_output(case["n"], case["k"], case["block_shape"], case["row_ptr"], case["col_idx"],
                               case["values"], case["bias"], case["x"], case["activation"], case["residual"],
                               case["scales"], case["input_heads"], case["output_heads"])
    model, feeds = build_model(case, as_inputs=bool(rng.integers(2)))
    try:
        got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]) \
            .run(None, feeds)[0]
    except Exception as error:  # onnxruntime reports every refusal as an exception
        assert expected is None, f"case {seed}: valid buffers rejected: {str(error)[:300]}"
        return "rejected"
    assert expected is not None, f"case {seed}: malformed buffers accepted (output shape {got.shape})"
    finite = np.isfinite(expected)  # where it is not (NaN/inf weights), inf and NaN are both right: -inf * 0
    assert got.shape == expected.shape and np.array_equal(np.isfinite(got), finite), f"case {seed}: non-finite mismatch"
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4, err_msg=f"case {seed}")
    return "computed"


def test_fuzz_campaign_every_case_is_rejected_or_computed_correctly():
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # the refusals are expected: keep onnxruntime from logging each one
    options.register_custom_ops_library(lpvit.kernels_library_path())
    if "LPVIT_FUZZ_SEED" in os.environ:
        run_case(int(os.environ["LPVIT_FUZZ_SEED"]), options)
        return
    outcomes = {"rejected": 0, "computed": 0}
    start = time.monotonic()
    for seed in range(CASES):
        outcomes[run_case(seed, options)] += 1
        assert time.monotonic() - start < TIME_LIMIT_S, f"fuzzing took over {TIME_LIMIT_S:.0f} s after {seed} cases"
    # the campaign must exercise both sides of the contract, not only refusals
    assert min(outcomes.values()) > CASES // 10, outcomes
