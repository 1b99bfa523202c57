"""Cascade token pruning (CP-ViT, arXiv 2203.04570): drop the least informative patch tokens block by block
(pass 02, ``token_pruning="cascade"``), or merge them (ToMe, ``"merge"``).

Input: the canonical GraphModule of a plain ViT — numbered blocks (``blocks.3``), each one contiguous region
whose only input is the token stream x [B, N, C] (P prefix tokens — class, distillation, registers — then the
patches) and which holds one attention (``F.scaled_dot_product_attention``, or an explicit softmax over the
keys). Output: a graph in which

    every attention exposes its probabilities A [B, H, N, N]
        (SDPA becomes softmax(q k^T * scale) @ v: the same function, ONNX exports it the same way)
    S accumulates CP-ViT's cumulative patch score, per image b and token j, block by block:
        S_b(j) += sum_h max_i A_b,h[i, j]                                   (tokens.patch_scores)
    at the input of every stage block l >= ``first_token_stage``, tokens.TokenSelect keeps the P prefix tokens
        and the image's top-n_l patches by S (n_l static; which patches, per image at run time), and S with them

so every later op — linears, attention (quadratically), norms, GELU, residual adds — runs on fewer tokens.
With ``token_pruning="merge"`` the same stages run tokens.TokenMerge instead (ToMe's bipartite merge of the
most similar patches, size-weighted), no scores are computed, and every attention after the first merge adds
log(size) to its keys' logits (proportional attention).
``LayerState.tokens`` (measured later by the importance pass) then counts the pruned tokens, so the
cost model, the solve and the reconstruction all see the pruned model.

Schedule (layer-aware, after CP-ViT's attention range): on the calibration images, each block's locality is
the share of a patch query's attention mass over patch keys that falls on its 3x3 neighbourhood of the patch
grid (mean over images, heads and patch queries; the grid is sqrt(patches) square, else locality is uniform).
Local attention mixes what neighbours already carry, so a local block's input tolerates more pruning:
of the R = patches - round(patch_keep * patches) patches removed in all, stage l removes

    r_l = R * w_l / sum_stages w      with w_l = locality_l          (largest-remainder rounding)

With ``target_speedup`` or ``power_keep`` and no ``patch_keep``, R is not fixed here: the stages are left keeping
every patch (the graph computes the model before token pruning) and pass 06, token_schedule, chooses R with the
block masks once importance and hardware have run.

A model that averages its tokens after the last block (timm's ``global_pool="avg"``) keeps that average under
``"merge"``: the mean becomes tokens.weighted_token_mean, each token weighted by the patches it stands for,
    pooled = sum_j size_j x_j / sum_j size_j
which right after a merge is exactly the mean over the patches before it. Dropping tokens (``"cascade"``) would
change what is averaged, so such a model is unsupported there, as is any other reduction over the tokens (sum,
max) after the last block.

Unsupported models (windows, spatial stages, rotary or relative position tables, convolutions inside the
blocks, a block with another input, token pooling the mode cannot keep) raise a ConfigError naming the reason;
``token_pruning="auto"`` skips the pass with a report note instead.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from ..errors import ConfigError, first_line
from ..frontend.calibration import logits_of
from ..frontend.attention import (UnsupportedModel, attention_site, drop_constant_masks, expose_probabilities, record,
                                  tensor_shape)
from ..frontend.regions import BlockRegion, block_regions, place_in_block_of
from ..pass_manager import PassResult, compiler_pass
from ..state import CompileState, TokenStage
from ..tokens import (TokenMerge, TokenSelect, add_key_bias, attention_probabilities, patch_scores,
                      weighted_token_mean)

LOCALITY_IMAGES = 16
MAP_IMAGES = 4
_SHAPE_OPS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
              torch.ops.aten.expand.default)
_SPATIAL_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_MEANS = {"mean", torch.mean, torch.ops.aten.mean.dim}
_REDUCTIONS = _MEANS | {"sum", "amax", "amin", "max", "min", "logsumexp", "nansum", "nanmean", torch.sum, torch.amax,
                        torch.amin, torch.max, torch.min, torch.logsumexp, torch.ops.aten.sum.dim_IntList,
                        torch.ops.aten.amax.default, torch.ops.aten.amin.default, torch.ops.aten.max.dim}


def _prefix_tokens(state: CompileState) -> int:
    if state.options.prefix_tokens is not None:
        return state.options.prefix_tokens
    model = state.model
    if isinstance(getattr(model, "num_prefix_tokens", None), int):
        return model.num_prefix_tokens
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in ("vit", "deit", "dinov2", "dinov2_with_registers"):
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    raise UnsupportedModel("it cannot tell how many class/register tokens precede the patches (no "
                           "num_prefix_tokens attribute): pass prefix_tokens=<count>")


def _check_block(gm: fx.GraphModule, region: BlockRegion, tokens: int, prefix: int) -> fx.Node:
    """The block's token-stream input, after checking that dropping tokens keeps the block's meaning."""
    tensors = [n for n in region.inputs if tensor_shape(n) is not None]  # timm passes attn_mask=None along
    if len(tensors) != 1:
        names = ", ".join(n.name for n in tensors)
        raise UnsupportedModel(f"block {region.name} reads {len(tensors)} tensors besides its parameters "
                               f"({names}): per-position inputs such as rotary embeddings or masks would no "
                               "longer match the kept tokens")
    stream = tensors[0]
    shape = tensor_shape(stream)
    if shape is None or len(shape) != 3 or shape[1] != tokens:
        raise UnsupportedModel(f"block {region.name}'s input is {list(shape) if shape else 'not a tensor'}, not "
                               f"[batch, {tokens} tokens, channels]: a spatial layout (windows, pooling stages) "
                               "has no tokens to drop")
    for node in region.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _SPATIAL_MODULES):
            raise UnsupportedModel(f"block {region.name} runs a convolution or pooling over the token grid "
                                   f"({node.target}), which dropping tokens would break")
        for used in node.all_input_nodes:
            table = tensor_shape(used) if used.op == "get_attr" else None
            if table is not None and len(table) >= 2 and {tokens, tokens - prefix} & set(table[-2:]):
                raise UnsupportedModel(f"block {region.name} uses {used.target}, a table with one entry per "
                                       "token position (rotary embeddings or a relative position bias)")
    outside = [u for u in stream.users if u not in set(region.nodes)]
    if outside:
        raise UnsupportedModel(f"the input of block {region.name} is also read after it ({outside[0].name})")
    return stream


def _reduced_dims(node: fx.Node) -> list[int] | None:
    """The dims a reduction node reduces (None: all of them)."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return None if dim is None else [dim] if isinstance(dim, int) else list(dim)


def _token_pools(gm: fx.GraphModule, last: BlockRegion, tokens: int, prefix: int, merge: bool) -> list[fx.Node]:
    """The means over the token axis after the last block (the model's pooling), which ``merge`` keeps by
    weighting; raises UnsupportedModel for one that cannot be kept (any mean under cascade, any other
    reduction)."""
    after = False
    pools = []
    for node in gm.graph.nodes:
        if node is last.nodes[-1]:
            after = True
        if not after or node.op not in ("call_method", "call_function") or node.target not in _REDUCTIONS:
            continue
        shape = tensor_shape(node.args[0]) if node.args else None
        dims = _reduced_dims(node)
        if shape is None or len(shape) != 3 or shape[1] not in (tokens, tokens - prefix) or (
                dims is not None and not {1, -2} & set(dims)):
            continue
        name = node.target if isinstance(node.target, str) else node.target.__name__
        if node.target not in _MEANS or (dims is not None and len(dims) > 1):
            raise UnsupportedModel(f"it reduces its tokens with {name} after the last block ({node.name}), "
                                   "which would change on fewer tokens")
        if not merge:
            raise UnsupportedModel(f"it averages its tokens after the last block ({node.name}), and dropping tokens "
                                   "changes that average; token_pruning='merge' keeps it (a size-weighted mean)")
        pools.append(node)
    return pools


def _weight_pools_by_size(gm: fx.GraphModule, pools: list[fx.Node], size: fx.Node) -> None:
    """Each token mean after the last block becomes the size-weighted mean of the merged tokens."""
    for pool in pools:
        keepdim = pool.args[2] if len(pool.args) > 2 else pool.kwargs.get("keepdim", False)
        with gm.graph.inserting_before(pool):
            weighted = gm.graph.call_function(weighted_token_mean, (pool.args[0], size), {"keepdim": keepdim})
        weighted.meta = dict(pool.meta)
        pool.replace_all_uses_with(weighted)
        gm.graph.erase_node(pool)


def _locality(gm: fx.GraphModule, probabilities: list[fx.Node], images: torch.Tensor, prefix: int) -> np.ndarray:
    """Per attention: mean share of a patch query's patch-key mass on its 3x3 grid neighbourhood (docstring)."""
    found = record(gm, probabilities, images)
    patches = found[0].shape[-1] - prefix
    side = math.isqrt(patches)
    if side * side != patches:
        return np.ones(len(probabilities))
    rows, cols = np.divmod(np.arange(patches), side)
    near = torch.from_numpy((np.abs(rows[:, None] - rows[None]) <= 1) & (np.abs(cols[:, None] - cols[None]) <= 1))
    shares = []
    for values in found:
        a = values[:, :, prefix:, prefix:].double()
        shares.append(float(((a * near).sum(-1) / a.sum(-1).clamp_min(1e-30)).mean()))
    return np.array(shares)


def keep_counts(patches: int, patch_keep: float, weights: np.ndarray) -> list[int]:
    """Patches kept after each stage: R = patches - round(patch_keep * patches) removed in proportion to
    ``weights`` (largest-remainder rounding, so the last stage ends exactly at round(patch_keep * patches))."""
    removed_total = patches - max(1, round(patch_keep * patches))
    weights = np.maximum(np.asarray(weights, dtype=float), 1e-6)
    share = removed_total * weights / weights.sum()
    removed = np.floor(share).astype(int)
    for i in np.argsort(-(share - removed))[: removed_total - removed.sum()]:
        removed[i] += 1
    return [int(patches - r) for r in np.cumsum(removed)]


def apply_counts(gm: fx.GraphModule, stages: list[TokenStage], counts: list[int]) -> list[TokenStage]:
    """Set the stages' reducers to leave ``counts[i]`` patches after stage i (TokenSelect.keep,
    TokenMerge.remove); returns the stages as they now are. A merge stage can merge at most half of the patches
    it receives (each set-A patch joins one set-B patch): ValueError naming the stage otherwise."""
    updated, tokens_in = [], stages[0].tokens_in
    for stage, keep in zip(stages, counts):
        reducer = gm.get_submodule(stage.module)
        patches_in = tokens_in - reducer.prefix
        if isinstance(reducer, TokenMerge):
            if patches_in - keep > (patches_in + 1) // 2:
                raise ValueError(f"token_pruning='merge' can merge at most half of a block's patches, but "
                                 f"{stage.block} would have to merge {patches_in - keep} of {patches_in}")
            reducer.remove = patches_in - keep
        else:
            reducer.keep = keep
        updated.append(dataclasses.replace(stage, tokens_in=tokens_in, tokens_out=reducer.prefix + keep,
                                           patches_kept=keep))
        tokens_in = reducer.prefix + keep
    return updated


def _insert_scores(gm: fx.GraphModule, probabilities: fx.Node, previous: fx.Node | None) -> fx.Node:
    """S after this block: the previous S plus this attention's patch scores, inside the block (same module
    stack, so the block stays one region); marked so block recovery does not fit them."""
    with gm.graph.inserting_after(probabilities):
        score = gm.graph.call_function(patch_scores, (probabilities,))
    total = score
    if previous is not None:
        with gm.graph.inserting_after(score):
            total = gm.graph.call_function(operator.add, (previous, score))
    place_in_block_of({score, total}, probabilities)
    for node in {score, total}:
        node.meta["token_score"] = True
    return total


def _insert_reducer(gm: fx.GraphModule, region: BlockRegion, stream: fx.Node, carried: fx.Node | None,
                    reducer: nn.Module) -> tuple[fx.Node, str]:
    """Call ``reducer`` (stream, carried) before the block; the block reads its tokens. Returns the carried
    value it passes on (the score S for TokenSelect, the token sizes for TokenMerge) and its module name."""
    name = f"{region.name}.{'token_select' if isinstance(reducer, TokenSelect) else 'token_merge'}"
    gm.add_submodule(name, reducer)
    inside = set(region.nodes)
    with gm.graph.inserting_before(region.nodes[0]):
        call = gm.graph.call_module(name, (stream, carried))
        kept = gm.graph.call_function(operator.getitem, (call, 0))
        passed_on = gm.graph.call_function(operator.getitem, (call, 1))
    stream.replace_all_uses_with(kept, delete_user_cb=lambda user: user in inside)
    _read_token_count(gm, region, kept, tensor_shape(stream)[1])
    return passed_on, name


def _read_token_count(gm: fx.GraphModule, region: BlockRegion, kept: fx.Node, tokens: int) -> None:
    """torch.export bakes the token count into a block's view/reshape shapes ([B, N, H, D] with N a constant):
    read N from the kept stream there instead (shape lists that start with the batch size, a graph value)."""
    users = [n for n in region.nodes if n.op == "call_function" and n.target in _SHAPE_OPS
             and isinstance(n.args[1], (list, tuple)) and n.args[1] and isinstance(n.args[1][0], fx.Node)
             and any(not isinstance(d, fx.Node) and d == tokens for d in n.args[1])]
    if not users:
        return
    with gm.graph.inserting_after(kept):
        count = gm.graph.call_function(torch.ops.aten.sym_size.int, (kept, 1))
    for node in users:
        shape = [count if not isinstance(d, fx.Node) and d == tokens else d for d in node.args[1]]
        node.args = (node.args[0], shape, *node.args[2:])


def _proportional_attention(gm: fx.GraphModule, probabilities: fx.Node, size: fx.Node) -> None:
    """ToMe: add log(size) of every key to its logits, so a merged token counts as the patches it holds."""
    with gm.graph.inserting_before(probabilities):
        log_size = gm.graph.call_function(torch.log, (size,))
        biased = None
        if probabilities.target is attention_probabilities:
            probabilities.args = (*probabilities.args[:3], log_size)
        else:  # an explicit softmax over the keys: bias its input
            biased = gm.graph.call_function(add_key_bias, (probabilities.args[0], log_size))
            probabilities.replace_input_with(probabilities.args[0], biased)
    place_in_block_of((log_size, biased), probabilities)


def kept_maps(gm: fx.GraphModule, stages: list[TokenStage], images: torch.Tensor, prefix: int):
    """() -> Figure: for a few calibration images, the image and the patches kept after the first, middle and
    last stage (the rest darkened)."""
    shown = sorted({0, len(stages) // 2, len(stages) - 1})

    def figure():  # runs only when dumps are written, right after the pass (the graph is as it left it)
        import matplotlib.pyplot as plt

        indices = {}
        hooks = [gm.get_submodule(s.module).register_forward_hook(
            lambda m, a, out, name=s.module: indices.__setitem__(name, out[2])) for s in stages]
        try:
            with torch.no_grad():
                gm(images)
        finally:
            for hook in hooks:
                hook.remove()
        positions, kept = torch.arange(stages[0].tokens_in).expand(len(images), -1), []
        for s in stages:  # compose each stage's indices back to positions in the original token sequence
            positions = positions.gather(1, indices[s.module])
            kept.append(positions[:, prefix:] - prefix)

        patches = stages[0].tokens_in - prefix
        side = math.isqrt(patches)
        fig, axes = plt.subplots(len(images), 1 + len(shown), figsize=(2.2 * (1 + len(shown)), 2.2 * len(images)),
                                 squeeze=False)
        for row, image in enumerate(images):
            picture = image[:3].permute(1, 2, 0).float()
            picture = ((picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)).numpy()
            picture = np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture
            axes[row, 0].imshow(picture)
            axes[row, 0].set_title("input" if row == 0 else "")
            for col, stage in enumerate(shown, start=1):
                grid = torch.zeros(side * side)
                grid[kept[stage][row]] = 1.0
                mask = F.interpolate(grid.reshape(1, 1, side, side), size=picture.shape[:2])[0, 0].numpy()
                axes[row, col].imshow(picture * (0.2 + 0.8 * mask[..., None]))
                if row == 0:
                    axes[row, col].set_title(f"{stages[stage].block}: {stages[stage].patches_kept} kept")
        for ax in axes.flat:
            ax.set_axis_off()
        fig.tight_layout()
        return fig
    return figure


@compiler_pass(requires=("graph", "layers"), provides=("token_schedule",))
def token_pruning(gm: fx.GraphModule, state: CompileState) -> PassResult:
    opts = state.options
    if opts.token_pruning is None:
        return PassResult(gm, False, {"enabled": False})
    example = state.calibration[0][:2]
    reference = logits_of(ShapeProp(gm).propagate(example))
    state.remember_unpruned(gm)
    try:
        tables = [name for name, _ in [*state.model.named_parameters(), *state.model.named_buffers()]
                  if "relative_position" in name or "rel_pos" in name]
        if tables:
            raise UnsupportedModel(f"it indexes relative position tables by token position ({tables[0]})")
        masks_dropped = drop_constant_masks(gm, example)  # Hugging Face's all-true [B, 1, N, N] mask would not fit fewer tokens
        regions = block_regions(gm, state.layers)
        if not regions:
            raise UnsupportedModel("no numbered transformer blocks with prunable linears were found")
        first = [tensor_shape(n) for n in regions[0].inputs if tensor_shape(n) is not None]
        tokens = first[0][1] if first and len(first[0]) == 3 else -1
        prefix = _prefix_tokens(state)
        streams = [_check_block(gm, region, tokens, prefix) for region in regions]
        pools = _token_pools(gm, regions[-1], tokens, prefix, merge=opts.token_pruning == "merge")
        sites = [attention_site(region) for region in regions]
        if tokens - prefix < 2 or opts.first_token_stage >= len(regions):
            raise UnsupportedModel(f"{len(regions)} blocks of {tokens} tokens ({prefix} prefix) leave nothing to "
                                   f"prune from block {opts.first_token_stage} on")
        probabilities = [expose_probabilities(gm, site) for site in sites]
    except UnsupportedModel as e:
        gm.recompile()  # attentions already exposed compute what they computed before
        if opts.token_pruning == "auto":
            state.notes.append(f"token pruning skipped: {e}")
            return PassResult(gm, True, {"enabled": False, "skipped": str(e)})
        raise ConfigError(f"token_pruning={opts.token_pruning!r} cannot prune this model's tokens: {e}. Use "
                          "token_pruning=None (weight blocks only) or 'auto' (skips token pruning where the model "
                          "does not allow it)") from None
    gm.recompile()
    images = torch.cat(state.calibration)[:LOCALITY_IMAGES]
    locality = _locality(gm, probabilities, images, prefix)
    patches = tokens - prefix
    stage_blocks = list(range(opts.first_token_stage, len(regions)))
    merge = opts.token_pruning == "merge"
    carried, stages = None, []  # S (cascade) or token sizes (merge)
    for i, (region, stream) in enumerate(zip(regions, streams)):
        if i in stage_blocks:  # every patch kept for now: apply_counts sets the schedule
            reducer = TokenMerge(prefix, 0) if merge else TokenSelect(prefix, patches)
            carried, module = _insert_reducer(gm, region, stream, carried, reducer)
            stages.append(TokenStage(region.name, module, tokens, tokens, patches, float(locality[i])))
        if merge and carried is not None:
            _proportional_attention(gm, probabilities[i], carried)
        elif not merge:
            carried = _insert_scores(gm, probabilities[i], carried)
    _weight_pools_by_size(gm, pools, carried)
    try:  # the fixed schedule; with a joint schedule only to check below that the model runs on fewer tokens
        stages = apply_counts(gm, stages, keep_counts(patches, opts.fixed_patch_keep, locality[stage_blocks]))
    except ValueError as e:
        if not opts.joint_token_schedule:
            raise ConfigError(f"{e}: raise patch_keep or lower first_token_stage") from None
    gm.graph.lint()
    gm.recompile()
    try:
        output = logits_of(gm(example))
    except Exception as e:  # a shape the blocks bake in (a token-count constant) breaks on fewer tokens
        raise ConfigError(f"token_pruning={opts.token_pruning!r}: the model no longer runs on fewer tokens "
                          f"({first_line(e)}); use token_pruning=None or 'auto'") from None
    if output.shape != reference.shape:
        raise ConfigError(f"token_pruning={opts.token_pruning!r}: the model's output changes shape on fewer tokens "
                          "(it pools over token positions); use token_pruning=None")
    if opts.joint_token_schedule:  # importance and hardware see every patch; token_schedule sets the counts
        stages = apply_counts(gm, stages, [patches] * len(stages))
    state.token_stages = stages
    decisions = {"enabled": True, "prefix_tokens": prefix, "patches": patches,
                 "attention_masks_dropped_as_constant": masks_dropped,
                 "token_means_weighted_by_size": [pool.name for pool in pools],
                 "patch_keep": "chosen by token_schedule" if opts.joint_token_schedule else opts.fixed_patch_keep,
                 "locality_3x3": dict(zip((r.name for r in regions), locality.round(4).tolist())),
                 "stages": [vars(s) for s in stages],
                 "mean_token_fraction": float(np.mean([tokens] * stage_blocks[0] + [s.tokens_out for s in stages])
                                              / tokens)}
    figures = {} if merge or opts.joint_token_schedule else {
        "kept_patches": kept_maps(gm, stages, images[:MAP_IMAGES], prefix)}
    return PassResult(gm, True, decisions, figures=figures)
