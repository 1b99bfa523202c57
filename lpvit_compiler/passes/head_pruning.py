"""Head pruning: remove the attention heads the blocks miss least, structurally (pass 03, ``head_keep`` < 1).

Input: the GraphModule after token pruning; every numbered block holds timm's attention form — a prunable
``qkv`` linear [3 H D, C] reshaped to (3, H, D), one attention (SDPA or explicit softmax) and a reshape back to
H D channels feeding a prunable ``proj`` linear [C_out, H D]. Output: sum over blocks of keep = round(head_keep * H)
heads kept, at least one per block (``"score"``: keep in every block); the others' q, k and v rows leave ``qkv``
and their columns leave ``proj``, the reshapes take the new head count, and ``proj`` is refitted by ridge least
squares to the unpruned block's projection:

    score_h = mean over calibration images of sum_j max_i A_h[i, j]     (CP-ViT's cumulative score, per head)
    min_{W', b'} || X_K W'^T + b' - (X W^T + b) ||^2 + lambda ||W'||^2   (X: proj's input on calibration tokens,
                                                                          K: the kept heads' columns)

with lambda = ``hessian_damping`` * mean(diag(X_K^T X_K)), the reconstruction's damping. Which heads go:

    head_criterion="score": in every block, its H - keep lowest score_h
    head_criterion="refit": within a block, heads leave greedily, each time the one whose removal leaves the
        least error after that refit,
            e_l(k) = min_h  min_{W', b'} || X_{K minus h} W'^T + b' - (X W^T + b) ||^2 / || x_l ||^2
        (K: the heads kept after k - 1 removals; x_l: the residual stream entering block l on the same tokens,
        so errors compare across blocks); across blocks, the sum over blocks of (H - keep) removals go where
        they cost least: repeatedly the block whose next removal adds the least, e_l(k) - e_l(k - 1), while it
        keeps at least one head. Blocks then keep different head counts.

Without the refit (``proj_inputs=None`` in :func:`remove_heads`) the block computes exactly what it computed with
the removed heads' outputs set to zero. ``state.layers`` gets the smaller qkv and proj grids, so every later pass
sees the pruned shapes; the hardware pass compares with the unpruned model (``CompileState.unpruned``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from ..blocks import BlockGrid
from ..errors import ConfigError
from ..frontend.attention import UnsupportedModel, attention_site, expose_probabilities, record, tensor_shape
from ..frontend.patterns import is_inference_identity
from ..frontend.regions import BlockRegion, block_regions
from ..pass_manager import PassResult, compiler_pass
from ..runtime.modules import linear_from
from ..state import CompileState, LayerState

SCORE_IMAGES = 32
_RESHAPES = ("reshape", "view")


@dataclass
class HeadLayout:
    """Where one block's heads live in the graph."""

    block: str
    heads: int
    head_dim: int
    qkv: str  # module names
    proj: str
    split: fx.Node  # reshape(qkv(x), B, N, 3, H, D)
    merge: fx.Node  # reshape(attention output, B, N, H * D)
    probabilities: fx.Node  # A [B, H, N, N]


def _is_reshape(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in _RESHAPES) or (
        node.op == "call_function" and node.target is torch.reshape)


def _layout(gm: fx.GraphModule, region: BlockRegion, layers: dict[str, LayerState]) -> HeadLayout:
    site = attention_site(region)
    unsupported = UnsupportedModel(f"block {region.name}'s attention is not timm's qkv -> reshape(3, heads, dim) -> "
                                   "attention -> reshape -> proj form, so its heads cannot be located")
    split = next((n for n in region.nodes if _is_reshape(n) and n.args[0].op == "call_module"
                  and n.args[0].target in layers and len(n.args) >= 4
                  and all(isinstance(a, int) for a in n.args[-3:]) and n.args[-3] == 3), None)
    if split is None:
        raise unsupported
    heads, head_dim = split.args[-2], split.args[-1]
    if gm.get_submodule(split.args[0].target).out_features != 3 * heads * head_dim:
        raise unsupported
    after = region.nodes[region.nodes.index(site) + 1:]
    merge = next((n for n in after if _is_reshape(n) and n.args[-1] == heads * head_dim), None)
    proj = merge
    while proj is not None and not (proj.op == "call_module" and proj.target in layers):
        proj = next(iter(proj.users)) if len(proj.users) == 1 and (proj is merge or is_inference_identity(
            gm, proj)) else None
    if proj is None or gm.get_submodule(proj.target).in_features != heads * head_dim:
        raise unsupported
    return HeadLayout(region.name, heads, head_dim, split.args[0].target, proj.target, split, merge,
                      expose_probabilities(gm, site))


def head_scores(probabilities: torch.Tensor) -> torch.Tensor:
    """[B, H, N, N] -> [H]: mean over images of sum over keys j of max over queries i of A[b, h, i, j]."""
    return probabilities.amax(dim=-2).sum(dim=-1).mean(dim=0)


def remove_heads(gm: fx.GraphModule, layout: HeadLayout, kept: list[int], proj_inputs: torch.Tensor | None,
                 damping: float) -> None:
    """Rewrite one block to the ``kept`` heads; refit proj on ``proj_inputs`` [T, H D] (None: no refit)."""
    d, h = layout.head_dim, layout.heads
    columns = torch.cat([torch.arange(k * d, (k + 1) * d) for k in kept])
    rows = torch.cat([part * h * d + columns for part in range(3)])
    qkv, proj = gm.get_submodule(layout.qkv), gm.get_submodule(layout.proj)
    gm.set_submodule(layout.qkv, linear_from(qkv.weight.detach()[rows],
                                              None if qkv.bias is None else qkv.bias.detach()[rows], True))
    weight = proj.weight.detach()
    bias = None if proj.bias is None else proj.bias.detach()
    new_weight, new_bias = weight[:, columns], bias
    if proj_inputs is not None:
        new_weight, new_bias = _refit(proj_inputs.double(), columns, weight.double(),
                                      None if bias is None else bias.double(), damping)
        new_weight, new_bias = new_weight.to(weight.dtype), None if new_bias is None else new_bias.to(weight.dtype)
    gm.set_submodule(layout.proj, linear_from(new_weight, new_bias, True))
    layout.split.args = (*layout.split.args[:-2], len(kept), d)
    layout.merge.args = (*layout.merge.args[:-1], len(kept) * d)


def _refit(x: torch.Tensor, columns: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           damping: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge least squares of the module docstring, in float64; the bias (if any) is an undamped column."""
    target = x @ weight.T + (0 if bias is None else bias)
    a = x[:, columns]
    if bias is not None:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], dim=1)
    gram = a.T @ a
    ridge = damping * torch.diagonal(gram)[: len(columns)].mean()
    gram[range(len(columns)), range(len(columns))] += ridge
    solution = torch.linalg.solve(gram, a.T @ target)  # [K (+1), out]
    return solution[: len(columns)].T.contiguous(), None if bias is None else solution[len(columns)]


def refit_order(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, heads: int, remove: int,
                damping: float) -> tuple[list[int], list[float]]:
    """Heads removed greedily by the least refit error (module docstring) and that error after each removal:
    the sum over tokens of the squared error of proj's output; ``x`` [T, H D] in float64."""
    head_dim = x.shape[1] // heads
    target = x @ weight.T + (0 if bias is None else bias)
    removed, errors = [], []
    for _ in range(remove):
        best = None
        for h in (h for h in range(heads) if h not in removed):
            kept = [k for k in range(heads) if k not in removed and k != h]
            columns = torch.cat([torch.arange(k * head_dim, (k + 1) * head_dim) for k in kept])
            new_weight, new_bias = _refit(x, columns, weight, bias, damping)
            error = float(((x[:, columns] @ new_weight.T + (0 if new_bias is None else new_bias) - target) ** 2).sum())
            if best is None or error < best[1]:
                best = (h, error)
        removed.append(best[0])
        errors.append(best[1])
    return removed, errors


def _refit_order_of(gm: fx.GraphModule, layout: HeadLayout, x: torch.Tensor, stream: torch.Tensor | None,
                    damping: float) -> tuple[list[int], list[float]]:
    """refit_order of one block for up to H - 1 removals, errors relative to the energy of the residual stream
    entering it (of proj's output where the stream was not found)."""
    proj = gm.get_submodule(layout.proj)
    weight = proj.weight.detach().double()
    bias = None if proj.bias is None else proj.bias.detach().double()
    order, errors = refit_order(x.double(), weight, bias, layout.heads, layout.heads - 1, damping)
    reference = stream.double() if stream is not None else x.double() @ weight.T + (0 if bias is None else bias)
    energy = max(float((reference ** 2).sum()), 1e-30)
    return order, [e / energy for e in errors]


def allocate_removals(errors: list[list[float]], total: int) -> list[int]:
    """How many heads each block loses: ``total`` removals, each time in the block whose next removal (in its
    greedy order, cumulative ``errors[l]``) adds the least error; a block loses at most len(errors[l])."""
    counts = [0] * len(errors)
    for _ in range(min(total, sum(map(len, errors)))):
        open_blocks = [l for l in range(len(errors)) if counts[l] < len(errors[l])]
        step = {l: errors[l][counts[l]] - (errors[l][counts[l] - 1] if counts[l] else 0.0) for l in open_blocks}
        counts[min(open_blocks, key=step.__getitem__)] += 1
    return counts


def _stream(gm: fx.GraphModule, region: BlockRegion, layout: HeadLayout) -> fx.Node | None:
    """The residual stream entering ``region``: its token input [B, N, C] of proj's output width (ShapeProp)."""
    shape = (gm.get_submodule(layout.proj).out_features,)
    return next((n for n in region.inputs if len(tensor_shape(n) or ()) == 3 and tensor_shape(n)[-1:] == shape), None)


@compiler_pass(requires=("graph", "layers"), provides=("heads",))
def head_pruning(gm: fx.GraphModule, state: CompileState) -> PassResult:
    opts = state.options
    if opts.head_keep >= 1.0:
        return PassResult(gm, False, {"enabled": False})
    images = torch.cat(state.calibration)[:SCORE_IMAGES]
    ShapeProp(gm).propagate(images[:2])
    try:
        regions = block_regions(gm, state.layers)
        if not regions:
            raise UnsupportedModel("no numbered transformer blocks with prunable linears were found")
        layouts = [_layout(gm, region, state.layers) for region in regions]
    except UnsupportedModel as e:
        raise ConfigError(f"head_keep={opts.head_keep:g} cannot prune this model's heads: {e}. Use head_keep=1.0")
    state.remember_unpruned(gm)
    gm.recompile()
    inputs = [next(iter(gm.graph.find_nodes(op="call_module", target=layout.proj))).args[0] for layout in layouts]
    streams = [_stream(gm, region, layout) for region, layout in zip(regions, layouts)]
    wanted = [layout.probabilities for layout in layouts] + inputs + [n for n in streams if n is not None]
    values = dict(zip(wanted, record(gm, wanted, images)))
    keeps = [max(1, round(opts.head_keep * layout.heads)) for layout in layouts]
    proj_inputs = [values[node].reshape(-1, layout.heads * layout.head_dim) for node, layout in zip(inputs, layouts)]
    orders = errors = [None] * len(layouts)
    if opts.head_criterion == "refit":
        orders, errors = zip(*(_refit_order_of(gm, layout, x, values.get(stream), opts.hessian_damping)
                               for layout, x, stream in zip(layouts, proj_inputs, streams)))
        counts = allocate_removals(list(errors), sum(layout.heads - keep for layout, keep in zip(layouts, keeps)))
        keeps = [layout.heads - count for layout, count in zip(layouts, counts)]
    decisions = {}
    for layout, keep, x, order, error in zip(layouts, keeps, proj_inputs, orders, errors):
        scores = head_scores(values[layout.probabilities])
        if order is not None:
            kept = sorted(set(range(layout.heads)) - set(order[:layout.heads - keep]))
        else:
            kept = sorted(scores.argsort(descending=True)[:keep].tolist())
        remove_heads(gm, layout, kept, x, opts.hessian_damping)
        for name in (layout.qkv, layout.proj):
            linear = gm.get_submodule(name)
            state.layers[name] = LayerState(name, BlockGrid(linear.out_features, linear.in_features,
                                                            state.layers[name].grid.block_shape))
        state.heads_kept[layout.block] = kept
        decisions[layout.block] = {"heads": layout.heads, "kept": kept,
                                   "scores": [round(float(v), 4) for v in scores],
                                   "refit_order": order, "relative_refit_error_after_each_removal": error}
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, True, {"enabled": True, "head_keep": opts.head_keep, "blocks": decisions})

