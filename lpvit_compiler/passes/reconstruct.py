"""Weight reconstruction: refit each pruned layer's surviving weights so it reproduces the dense layer (and,
with ``quantize="int8"``, quantize them given the mask).

Input: the graph with nn.Linear modules and every layer's ``block_mask`` (from the solve).
Output: the same graph; with sequential allocation (below) new masks; every prunable layer's weight is zero
outside its mask (from here on the graph is the
masked model) and, with ``reconstruct=True``, its kept weights (and bias) refitted; ``decisions`` give each
layer's relative output error on the calibration tokens without and with reconstruction.

Layer y = x W^T + b, W [N, K], block mask M. Calibration tokens give X_p [T, K], the layer's input in the model
pruned and reconstructed so far, and X_d [T, K], its input in the dense model. Each output row n, with kept
columns S_n, solves the ridge least squares (OBS / SparseGPT's row-wise problem, with dense targets), the ridge
centred on the dense row

    min_{w, c}  || X_p[:, S_n] w + c - (X_d W_n^T + b_n) ||^2 + lambda || w - W_n[S_n] ||^2

With A = [X_p, 1] (the bias column only when the layer has a bias), H = A^T A + lambda I_K, G = A^T X_d:

    H[S, S] u = (G W_n^T + A^T 1 b_n + lambda [W_n, 0])[S]              (S = S_n plus the bias entry)

lambda = ``obs_ridge`` * mean(diag(X_p^T X_p)): max(``hessian_damping``, ``obs_damping`` * K / T), the ridge of the
OBS scores. T counts the live token positions only (``state.live_tokens``, from the importance pass: padding that
nothing reads is left out). Why centred on W_n and growing with K / T: a fit of |S| columns to T tokens fits those
tokens better than new ones by about 2 |S| / T of its error, so where T is small next to K the refit overfits the
calibration set; the ridge pulls it toward the plainly masked row (lambda -> inf) rather than toward 0, which
would shrink the layer's output (on the MiniLM benchmark, 256 sentences: mean cosine 0.868 -> 0.882; README).
The right-hand side A^T y_n (y_n the dense output n) comes from G as written or, where the layer has fewer
outputs than inputs, straight from the dense outputs (cheaper). Rows of one block row share S, so there is one
Cholesky factorisation of H[S, S] per block row, batched over block rows that keep equally many columns (weights
outside S are 0). A row whose refit would fit the calibration tokens worse than the plainly masked row (possible
only through the damping) keeps the masked row: reconstruction is never worse on the calibration data.

With ``quantize="int8"`` the layer is fitted as it will run: X_p is quantized per token the way the int8 kernel
quantizes it (``ops.fake_quantize_rows``), and after the refit the kept weights are quantized to int8 with one
scale per output channel — by GPTQ on the same damped H (``gptq=True``, see quantization.py) or by rounding to
nearest — and the dequantised weights stay in the graph (``LayerState.weight_scales`` keeps the scales for the
layout). Later layers then fit to the outputs of the quantized ones. Without reconstruction the masked weights
are rounded to nearest.

Layers are processed in graph order while two streams of activations (dense and pruned) run through the graph
node by node over the calibration images: each layer is fitted to the inputs it will really see (the error of
earlier layers does not pile up), and its targets are the dense model's outputs (the shift in activation
statistics that pruning causes is corrected, including through the bias).

With token pruning the dense stream keeps every token (it is the model before token pruning), the pruned stream
decides which tokens go as at run time, and each target row is what the dense model holds for that row's
token: with ``"cascade"`` the dense value of the token kept there; with ``"merge"`` the mean of the dense
values of the patches the merged token stands for, M @ Y_d (M [B, n, N]: 1/size_t at the N original positions
token t holds; a merge averages M's rows as it averages tokens, ``_merged_map``). So the refit and block
recovery also make up for the tokens dropped or merged — with ``flops_keep=1.0`` too, where every layer is
refitted without a mask (on DINOv2-S, merging to 25% of the patches: 0.807 -> 0.828 top-1, README).

Sequential allocation (``allocation="sequential"``, and the default ``"auto"`` with the obs criterion): the
solve's curves come from the dense model, which stops describing a layer once the layers before it are pruned.
So when the streams reach a layer, its OBS curve is measured again from these normal equations
(``importance.refit_obs_curve``: the error the refit leaves, on the inputs X_p it really sees) and the budget left
by the layers already refitted is re-solved over this layer's new curve and the later layers' first-solve curves
(``block_mask_solve.solve_unfixed``, same beta); the layer takes its new count of its new order's blocks, is
refitted with that mask, and stays fixed. The budget is met as in the first solve; ``decisions`` give each layer's
first-solve and final pruned blocks, and ``state.solve`` is recomputed for the final masks (K-prune's re-scoring
on the model as it is being pruned, per layer).

With ``block_recovery=True``, when the streams reach the end of a transformer block (a numbered module such as
``blocks.3``), the block as a whole is then fitted to the dense block's output by Adam steps, masks frozen
(block_recovery.py states the loss), before the pruned stream goes on into the next block. The compute budget
``recovery_tflops`` (and the optional wall-clock cap ``recovery_seconds``) is shared out evenly over the blocks
still to come, so what a block leaves unused goes to the later ones; ``recovery_steps`` caps each block.

With ``model_recovery_tflops`` > 0, after the last layer the whole graph is one region (``whole_model_region``:
the model's inputs to its outputs) and gets the same Adam steps on ||model(X) - model_dense(X)||^2 /
||model_dense(X)||^2 over its outputs (logits, or embeddings for a backbone), at its own ``model_recovery_lr``,
at most ``recovery_steps`` of them and within what block recovery left of ``recovery_seconds`` (none left: skipped),
kept only where that loss on the calibration images went down (EBFT's end-to-end step): block recovery fits each
block to its dense output, this fits the blocks together to what the user reads. Only the linears move (kept
weights, masks frozen, and biases, with block recovery's per-row and per-column step sizes); on DINOv2-S moving
the embeddings, norms and tokens too with the same unscaled Adam steps fitted the calibration logits worse
(README).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from rich.progress import Progress
from torch import fx
from torch.nn import functional as F

from ..frontend.regions import block_regions, last_readers, whole_model_region
from ..linalg import damped, gram, on_gemm_backend, solve_kept_columns
from ..pass_manager import PassResult, compiler_pass
from ..quantization import quantize_gptq, quantize_nearest
from ..runtime.ops import fake_quantize_rows
from ..state import CompileState
from ..tokens import TokenMerge, TokenSelect
from .block_mask_solve import budget_problem, prune_first_blocks, solve_outcome, solve_unfixed
from .block_recovery import recover_block
from .importance import live_rows, obs_ridge, refit_obs_curve

# The reconstruction's sample by default: DeiT-S's 128 images of 197 tokens, and never fewer than 128 images
RECONSTRUCT_TOKENS = 128 * 197
MIN_RECONSTRUCT_IMAGES = 128


def reconstruction_images(state: CompileState) -> int:
    """``reconstruct_images``, or by default as many calibration images as give ``RECONSTRUCT_TOKENS`` tokens at
    the layers' inputs, at least ``MIN_RECONSTRUCT_IMAGES``: a model with few tokens per image needs more images for
    its K x K normal equations and for block recovery's loss to describe it. Only live tokens count (padding that
    reaches no output is left out of the fit, ``state.live_tokens``)."""
    if state.options.reconstruct_images is not None:
        return state.options.reconstruct_images
    tokens = max(layer.tokens for layer in state.layers.values())
    if state.live_tokens is not None:
        tokens = tokens * float(state.live_tokens.float().mean())
    return max(MIN_RECONSTRUCT_IMAGES, int(RECONSTRUCT_TOKENS // max(tokens, 1)))


def _normal_equations(xp: list[torch.Tensor], rhs: list[torch.Tensor], with_bias: bool):
    """H = A^T A [K', K'], G = A^T R [K', M], s = A^T 1 [K'] (float64), over all chunks' tokens, for right-hand
    sides R [T, M]: the dense inputs X_d (then ``_targets`` gives A^T Y) or the dense outputs Y (then G^T is it).

    The bias column of A = [X_p, 1] is never materialised: its products are column sums and the token count."""
    k, m = xp[0].shape[-1], rhs[0].shape[-1]
    size = k + int(with_bias)
    h = torch.zeros(size, size, dtype=torch.float64)
    g = torch.zeros(size, m, dtype=torch.float64)
    s = torch.zeros(size, dtype=torch.float64)
    for p, d in zip(xp, rhs):
        p, d = p.reshape(-1, k), d.reshape(-1, m)
        h[:k, :k] += gram(p).double()
        g[:k] += (p.T @ d).double()
        s[:k] += p.sum(0).double()
        if with_bias:
            g[k] += d.sum(0).double()
            s[k] += p.shape[0]
    if with_bias:
        h[k, :k] = h[:k, k] = s[:k]
        h[k, k] = s[k]
    return h, g, s


def _targets(weight: torch.Tensor, bias: torch.Tensor | None, g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[N, K']: row n is A^T y_n = G W_n^T + s b_n, y_n the dense layer's output n."""
    target = weight.double() @ g.T
    return target + bias.double()[:, None] * s[None, :] if bias is not None else target


def _row_errors(u: torch.Tensor, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N]: ||A u_n - y_n||^2 - ||y_n||^2 for rows u [N, K'] = [W_n, b_n], from the (undamped) normal equations:
    u^T H u - 2 u . target — the error on every calibration token, up to a row constant, without running the
    layer."""
    return ((u @ h) * u).sum(1) - 2 * (u * target).sum(1)


def _relative(row_errors: float, dense_energy: float) -> float:
    """sum_n ||A u_n - y_n||^2 / ||Y||^2 from the sum of ``_row_errors``."""
    return max(row_errors + dense_energy, 0.0) / max(dense_energy, 1e-30)


def _relative_output_error(weight: torch.Tensor, bias: torch.Tensor | None, h: torch.Tensor, target: torch.Tensor,
                           dense_energy: float) -> float:
    """sum_n ||A u_n - y_n||^2 / ||Y||^2 for u_n = [W_n, b_n]."""
    u = torch.cat([weight, bias[:, None]], dim=1).double() if bias is not None else weight.double()
    return _relative(float(_row_errors(u, h, target).sum()), dense_energy)


def reconstruct_weight(weight: torch.Tensor, bias: torch.Tensor | None, element_mask: torch.Tensor, bh: int,
                       h: torch.Tensor, target: torch.Tensor, damping: float):
    """(weight, bias, masked error, refitted error): the refitted layer from its normal equations H (undamped)
    and ``target`` = _targets(...), ridge ``damping`` * mean diag centred on ``weight`` (see the module docstring),
    and the summed ``_row_errors`` of the masked and of the returned layer."""
    n, k = weight.shape
    with_bias = bias is not None
    w64 = weight.double()
    damped_h, lam = damped(h, k, damping)
    centred = target.clone()  # the ridge pulls toward the dense row W_n, not toward 0
    centred[:, :k] += lam * w64
    keep = element_mask.bool()
    if with_bias:
        keep = torch.cat([keep, keep.new_ones(n, 1)], dim=1)
    masked = torch.cat([w64, bias.double()[:, None]], dim=1) if with_bias else w64.clone()
    masked = masked * keep
    solved = solve_kept_columns(damped_h, centred, keep[::bh], bh, lam)
    # keep the masked row where the refit is worse on the calibration tokens
    masked_errors, solved_errors = _row_errors(masked, h, target), _row_errors(solved, h, target)
    better = solved_errors <= masked_errors
    result = torch.where(better[:, None], solved, masked).to(weight.dtype)
    errors = float(masked_errors.sum()), float(torch.where(better, solved_errors, masked_errors).sum())
    return (result[:, :k].contiguous(), result[:, k].contiguous(), *errors) if with_bias else (result, None, *errors)


def _at_pruned_tokens(dense: list, pruned: list, token_maps: list) -> list:
    """The dense stream's values (every token) at the pruned stream's tokens, per chunk: with cascade pruning the
    rows of the tokens it kept (map: their positions [B, n]), with merging the mean of the rows a merged token
    stands for (map: M [B, n, N], M @ value; see ``_merged_map``). Unchanged where the two have the same token
    count (no token pruning yet) or the value has no token axis."""
    def at(value, like, token_map):
        if token_map is None or not isinstance(value, torch.Tensor) or value.dim() != 3 \
                or value.shape[1] == like.shape[1]:
            return value
        if token_map.dim() == 3:
            return token_map.to(value.dtype) @ value
        return value.gather(1, token_map[..., None].expand(-1, -1, value.shape[-1]))
    return [at(v, p, m) for v, p, m in zip(dense, pruned, token_maps)]


def _merged_map(merge: TokenMerge, token_map: torch.Tensor | None, size: torch.Tensor | None,
                x: torch.Tensor, decision) -> torch.Tensor:
    """M [B, n, N] after this merge: row t holds 1/size_t at the N original positions token t stands for. A
    merge averages rows by size as it averages tokens, (size_t M_t + size_u M_u) / (size_t + size_u), which is
    again uniform over the union, so ``merge.reduce`` applied to M updates it. ``x`` [B, N, C] is the merge's
    input, whose token count starts M at the identity before the first merge."""
    if token_map is None:
        token_map = torch.eye(x.shape[1], dtype=x.dtype).expand(x.shape[0], -1, -1)
    return merge.reduce(token_map, size, decision)[0]


def _live_per_chunk(state: CompileState, images: int) -> list:
    """The importance pass's live token positions for the reconstruction's chunks (None: every position is live).
    Images the statistics did not run on count as live throughout."""
    known = state.live_tokens
    if known is None:
        return [None] * -(-images // state.options.calib_batch_size)
    known = known[:images]
    every = torch.cat([known, known.new_ones(images - len(known), known.shape[1])])
    return list(every.split(state.options.calib_batch_size))


def _chunk_args(node: fx.Node, values: dict, chunk: int) -> list:
    return [values[a][chunk] if isinstance(a, fx.Node) else a for a in node.args]


def _run_node(interpreter: fx.Interpreter, node: fx.Node, values: dict, chunk: int):
    args = fx.node.map_arg(node.args, lambda n: values[n][chunk])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n][chunk])
    return getattr(interpreter, node.op)(node.target, args, kwargs)


@compiler_pass(requires=("masks",), provides=("masked_weights",), changes_costs=True, invariant="zero_outside_masks")
@on_gemm_backend
def reconstruct(gm: fx.GraphModule, state: CompileState) -> PassResult:
    opts = state.options
    int8 = opts.quantize == "int8"
    if not opts.reconstruct:
        with torch.no_grad():
            for name, layer in state.layers.items():
                weight = gm.get_submodule(name).weight
                weight.mul_(layer.element_mask())
                if int8:
                    quantized, layer.weight_scales = quantize_nearest(weight, layer.element_mask())
                    weight.copy_(quantized)
        note = "weights masked" + (" and rounded to int8" if int8 else "") + ", not refitted"
        return PassResult(gm, True, {"enabled": False, "note": note})
    images = torch.cat(state.calibration)[: reconstruction_images(state)]
    chunks = list(torch.split(images, opts.calib_batch_size))
    live = _live_per_chunk(state, len(images))

    def live_only(values: list) -> list:  # the fit sees the live token positions only
        return [live_rows(v, m) for v, m in zip(values, live)]

    interpreter = fx.Interpreter(gm)
    regions = block_regions(gm, state.layers) if opts.block_recovery else []
    region_ending = {region.nodes[-1]: region for region in regions}
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    last_use = last_readers(gm.graph.nodes)
    for region in regions:  # a block's pruned inputs are needed again at its end, for recovery
        for used in region.inputs:
            if position[last_use[used]] < position[region.nodes[-1]]:
                last_use[used] = region.nodes[-1]
    dense, pruned, per_layer, per_block = {}, {}, {}, {}
    fixed, planned = {}, {}  # allocation="sequential": pruned blocks per layer refitted so far / first solve's
    token_maps = [None] * len(chunks)  # token pruning: the pruned stream's tokens in the dense one
    flops_left, seconds_left = opts.recovery_tflops * 1e12, opts.recovery_seconds
    placeholders, model_inputs = 0, {}
    with Progress(disable=not state.progress, transient=True) as progress:
        task = progress.add_task("reconstruct", total=len(state.layers))
        for node in gm.graph.nodes:
            if node.op == "output":
                break
            if node.op == "placeholder":
                if placeholders and not node.args:
                    raise NotImplementedError("reconstruction runs graphs with one tensor input")
                dense[node] = pruned[node] = chunks if not placeholders else [node.args[0]] * len(chunks)
                model_inputs[node] = dense[node]
                placeholders += 1
            elif node.op == "call_module" and node.target in state.layers and node.target not in per_layer:
                layer, linear = state.layers[node.target], gm.get_submodule(node.target)
                xd, xp = dense[node.args[0]], pruned[node.args[0]]
                if int8:  # the int8 kernel sees X quantized per token
                    xp = [fake_quantize_rows(x) for x in xp]
                weight = linear.weight.detach().clone()
                bias = None if linear.bias is None else linear.bias.detach().clone()
                with torch.no_grad():
                    dense[node] = [F.linear(x, weight, bias) for x in xd]
                    xp_fit = live_only(xp)
                    yd = live_only(_at_pruned_tokens(dense[node], xp, token_maps))
                    dense_energy = sum(float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2 for y in yd)
                    # A^T Y directly costs T K N; through A^T X_d and W, T K^2 + N K^2: the first where N < K (fc2)
                    if layer.out_features < layer.in_features:
                        h, g, _ = _normal_equations(xp_fit, yd, bias is not None)
                        target = g.T.contiguous()
                    else:
                        h, g, s = _normal_equations(xp_fit, live_only(_at_pruned_tokens(xd, xp, token_maps)),
                                                    bias is not None)
                        target = _targets(weight, bias, g, s)
                    tokens = sum(x.numel() // x.shape[-1] for x in xp_fit)
                    ridge = obs_ridge(opts, layer.in_features, tokens)
                    if opts.sequential_allocation:
                        planned[node.target] = layer.pruned_blocks
                        layer.block_scores, order, distortion = refit_obs_curve(layer, h, target, tokens, ridge)
                        layer.prune_order, layer.distortion = order.numpy(), distortion.numpy()
                        fixed[node.target] = solve_unfixed(state, fixed)[node.target]
                        prune_first_blocks(layer, fixed[node.target])
                    mask = layer.element_mask()
                    new_weight, new_bias, masked_error, refit_error = reconstruct_weight(
                        weight, bias, mask, layer.grid.block_shape[0], h, target, ridge)
                    if int8 and opts.gptq:
                        new_weight, new_bias, layer.weight_scales = quantize_gptq(
                            new_weight, new_bias, mask, layer.grid.block_shape[0], h, opts.hessian_damping)
                    elif int8:
                        new_weight, layer.weight_scales = quantize_nearest(new_weight, mask)
                    linear.weight.copy_(new_weight)
                    if bias is not None:
                        linear.bias.copy_(new_bias)
                    pruned[node] = [linear(x) for x in xp]
                    after = (_relative_output_error(linear.weight, linear.bias, h, target, dense_energy) if int8
                             else _relative(refit_error, dense_energy))
                per_layer[node.target] = {"relative_error_masked": _relative(masked_error, dense_energy),
                                          "relative_error_reconstructed": after, "obs_ridge": ridge,
                                          **({"pruned_blocks_first_solve": planned[node.target],
                                              "pruned_blocks": layer.pruned_blocks} if planned else {})}
                progress.advance(task)
            elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), TokenSelect):
                with torch.no_grad():  # the dense stream keeps every token; token_maps maps the pruned ones
                    pruned[node] = [_run_node(interpreter, node, pruned, i) for i in range(len(chunks))]
                    dense[node] = [(*_chunk_args(node, dense, i), None) for i in range(len(chunks))]
                    token_maps = [index if p is None else p.gather(1, index)
                                  for p, (_, _, index) in zip(token_maps, pruned[node])]
            elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), TokenMerge):
                merge = gm.get_submodule(node.target)
                with torch.no_grad():  # the dense stream keeps every token (size 1); token_maps averages its rows
                    args = [_chunk_args(node, pruned, i) for i in range(len(chunks))]
                    decisions = [merge.decide(*a) for a in args]
                    pruned[node] = [merge.reduce(*a, d) for a, d in zip(args, decisions)]
                    dense[node] = [(x, torch.ones_like(x[..., 0]) if size is None else size)
                                   for x, size in (_chunk_args(node, dense, i) for i in range(len(chunks)))]
                    token_maps = [_merged_map(merge, m, a[1], a[0], d)
                                  for m, a, d in zip(token_maps, args, decisions)]
            else:
                with torch.no_grad():
                    dense[node] = [_run_node(interpreter, node, dense, i) for i in range(len(chunks))]
                    shared = all(pruned[n] is dense[n] for n in node.all_input_nodes)
                    pruned[node] = dense[node] if shared else [_run_node(interpreter, node, pruned, i)
                                                               for i in range(len(chunks))]
            if node in region_ending:
                region = region_ending.pop(node)
                started = time.perf_counter()
                inputs = {n: pruned[n] for n in region.inputs}
                per_block[region.name], outputs = recover_block(
                    gm, region, state.layers, inputs,
                    [_at_pruned_tokens(dense[n], pruned[n], token_maps) for n in region.outputs],
                    steps=opts.recovery_steps, flops=flops_left / (len(region_ending) + 1),
                    seconds=seconds_left / (len(region_ending) + 1), lr=opts.recovery_lr, int8=int8,
                    outputs=[pruned[n] for n in region.outputs], live=live)
                pruned.update(zip(region.outputs, outputs))
                flops_left = max(0.0, flops_left - per_block[region.name].get("flops", 0))
                seconds_left = max(0.0, seconds_left - (time.perf_counter() - started))
            for used in node.all_input_nodes:
                if last_use.get(used) is node:
                    dense.pop(used, None)
                    pruned.pop(used, None)
    model_recovery = None
    if opts.model_recovery_tflops > 0 and seconds_left <= 0:
        model_recovery = {"steps": 0, "kept": False, "skipped": "no time left of recovery_seconds"}
    elif opts.model_recovery_tflops > 0:
        model = whole_model_region(gm, state.layers)
        model_recovery, _ = recover_block(
            gm, model, state.layers, model_inputs,
            [_at_pruned_tokens(dense[n], pruned[n], token_maps) for n in model.outputs],
            steps=opts.recovery_steps, flops=opts.model_recovery_tflops * 1e12, seconds=seconds_left,
            lr=opts.model_recovery_lr, int8=int8, outputs=[pruned[n] for n in model.outputs], live=live,
            linears_only=True)
    if fixed:
        state.solve = solve_outcome(state, budget_problem(state, beta=state.solve.beta),
                                    [layer.pruned_blocks for layer in state.layers.values()], state.solve.slope)
    decisions = {"enabled": True, "images": len(images), "damping": opts.hessian_damping,
                 "allocation": "sequential" if opts.sequential_allocation else "dense",
                 **({"solve_outcome": dataclasses.asdict(state.solve)} if fixed else {}),
                 "quantize": opts.quantize and f"{opts.quantize} ({'gptq' if opts.gptq else 'round to nearest'})",
                 "layers": per_layer,
                 "block_recovery": {"enabled": opts.block_recovery, "blocks": per_block,
                                    **({} if regions or not opts.block_recovery else
                                       {"note": "no numbered transformer blocks found in the graph"})},
                 **({"model_recovery": model_recovery} if model_recovery else {})}
    if opts.block_recovery and not regions:
        state.notes.append("block recovery found no numbered transformer blocks (nn_module_stack) and was skipped")
    elif per_block:
        kept = [b for b in per_block.values() if b["kept"]]
        state.notes.append(f"block recovery refitted {len(kept)} of {len(per_block)} blocks" + (
            f", mean block loss on calibration data {sum(b['loss_before'] for b in kept) / len(kept):.3g} -> "
            f"{sum(b['loss_after'] for b in kept) / len(kept):.3g}" if kept else ""))
    if model_recovery and "skipped" in model_recovery:
        state.notes.append(f"end-to-end recovery skipped: {model_recovery['skipped']}")
    elif model_recovery:
        state.notes.append(
            f"end-to-end recovery: {model_recovery['steps']} steps, relative output error on calibration data "
            f"{model_recovery['loss_before']:.3g} -> {model_recovery['loss_after']:.3g}, "
            + ("kept" if model_recovery["kept"] else "undone (it did not go down)"))
    return PassResult(gm, True, decisions)
