"""Importance analysis: per-block saliency and a distortion curve for every prunable linear.

Input: the canonical GraphModule, ``state.layers`` (names, block grids) and ``state.calibration``.
Output: the graph unchanged; every layer gets ``tokens`` (per image), ``block_scores`` [block_rows,
block_cols] (higher = more important), ``prune_order`` (flat block indices, least important first) and
``distortion[k]``, the estimated damage of pruning the first k blocks of that order (k = 0 .. num_blocks).
Pruning a block means dW = -W on it. Criteria (``importance=``):

``taylor`` — LPViT (ECCV 2024). No labels: G = mean over batches of dL/dW with L = mean(logits^2).
    saliency  s_b = mean_{(i,j) in b} |W (.) G|_ij
    distortion  d(k) = sum (dW (.) G)^2 + 1/2 <G, dW>^2 + 1/2 lambda ||dW||^2        (lambda = ``damping``)
    i.e. a first-order term plus the second-order term of the rank-1 Fisher H ~ g g^T + lambda I, in closed
    form from per-block sums accumulated in pruning order: O(num_blocks) for the whole curve.

``hessian`` — layer Hessian H = E[x x^T] of the layer's input over all calibration tokens.
    s_b = sum_{r in rows(b)} W[r, C_b] H[C_b, C_b] W[r, C_b]^T       (expected squared output error from
                                                                         zeroing block b alone)
    d(k) = sum_{b pruned} s_b / tr(W H W^T)                            (relative output error; additive,
                                                                         ignoring cross-block terms of a row)
    Only the diagonal blocks H[C, C] are accumulated (K * block width products per token instead of K^2), and
    tr(W H W^T) = E ||W x||^2 comes from the layer's outputs.

``obs`` (default) — the damage left after reconstruction (passes/reconstruct.py), per unit of loss.
    Optimal Brain Surgeon for a group: zeroing block b (rows R, columns C) and refitting the rest of each row
    leaves output error  e_{b,r} = w_{r,C} [(H^-1)_{CC}]^-1 w_{r,C}^T  in row r per token (H = E[x x^T] over T
    tokens, damped by lambda = max(``hessian_damping``, ``obs_damping`` * K / T) * mean diag: more where few
    tokens describe wide inputs, ``obs_ridge``). The errors are weighted by the loss's
    sensitivity to the layer's outputs, from a_r = sum over calibration tokens of (dL/dy_r)^2 (L as for
    ``taylor``; the diagonal of the output Fisher), which puts layers on one scale:
    d(k) = sum_{b pruned} sum_{r in R_b} a e_{b,r}     a = sum_r a_r / out_features  (``sensitivity="layer"``)
    or with a_r per output channel in place of a (``sensitivity="channel"``: channels the rest of the network
    amplifies — LayerScale, massive activations — become costly). Both are additive over blocks; "layer" is
    the default because it measured better with block recovery on DINOv2 (README, scale folding).

``magnitude`` — baseline: s_b = mean_b |W|,  d(k) = sum_{b pruned} ||W_b||^2 / ||W||^2.

Live tokens (``obs``): a token position none of whose layer outputs has any gradient reaches nothing — the padding
of a sentence batch, masked out as a key and skipped by the pooling. H leaves those rows out, and
``state.live_tokens`` ([images, T] bool; None where every position is live) tells reconstruction and block
recovery to do the same (``live_positions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import track
from torch import fx

from ..frontend.calibration import logits_of
from ..linalg import cholesky, damped, gram, on_gemm_backend, unaliased_width
from ..options import CompileOptions
from ..state import CompileState, LayerState
from ..pass_manager import PassResult, compiler_pass

RATIO_GRID = np.linspace(0.0, 1.0, 101)  # LPViT's pruning ratios, used to sample curves for dumps
CHUNK_IMAGES = 8
SEQUENTIAL_OBS_BYTES = 64 * 2**20  # float64 inverse Hessians of the block rows processed together


@dataclass
class CalibrationStats:
    tokens: dict[str, int] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # mean dL/dW
    input_moments: dict[str, torch.Tensor] = field(default_factory=dict)  # E[x x^T], float64
    moment_tokens: dict[str, int] = field(default_factory=dict)  # tokens (rows) E[x x^T] averages over
    block_moments: dict[str, torch.Tensor] = field(default_factory=dict)  # [block cols, bw, bw]: E[x_C x_C^T]
    output_energy: dict[str, float] = field(default_factory=dict)  # E ||W x||^2 per token (bias left out)
    output_gradient_energy: dict[str, torch.Tensor] = field(default_factory=dict)  # [out]: sum_t (dL/dy_t)^2
    live_tokens: torch.Tensor | None = None  # [images, T] bool, where some token positions are dead (live_positions)
    images: int = 0


def live_positions(rows_live: dict[str, torch.Tensor], images: int, tokens: dict[str, int]) -> torch.Tensor | None:
    """[images, T] bool: the token positions whose value reaches the model's output, from one chunk's output
    gradients (``rows_live``: per layer, its output rows with a nonzero gradient). None where the layers do not
    all see T tokens (token pruning changed the count along the way) or where no gradient is nonzero (a head
    initialised to zero: the gradients then say nothing).

    A position is dead when no prunable layer's output there has any gradient: nothing downstream reads it — the
    padding of a batch of sentences, which attention masks out as a key and the pooling skips. Its values are then
    exactly irrelevant, so statistics, refits and block recovery leave it out (three quarters of MiniLM's
    calibration tokens). A position some layer reads counts wherever it is seen: at a CLS-readout model's last
    block only the CLS token's MLP output matters, but fitting that MLP on one token per image would starve it."""
    counts = {tokens[name] for name in rows_live}
    if len(counts) != 1:
        return None
    live = torch.stack([flags for flags in rows_live.values()]).any(0)
    return live.reshape(images, counts.pop()) if live.any() else None


def live_rows(value, live: torch.Tensor | None):
    """``value`` without its dead token positions: [live tokens, C] where it is [B, T, C] and ``live`` [B, T] says
    which positions reach the output (importance.live_positions); unchanged otherwise."""
    if live is None or not isinstance(value, torch.Tensor) or value.dim() != 3 or value.shape[:2] != live.shape:
        return value
    return value[live]


def statistics_batches(state: CompileState) -> list[torch.Tensor]:
    """The calibration batches the statistics run on (``importance_images`` of them, or all); each batch's loss
    is L = mean(logits^2) over its images."""
    if state.options.importance_images is None:
        return list(state.calibration)
    return list(torch.cat(state.calibration)[: state.options.importance_images].split(state.options.calib_batch_size))


def block_diagonal_moments(x: torch.Tensor, width: int) -> torch.Tensor:
    """[ceil(K / width), width, width] float64: sum over rows of x [T, K] of x_C x_C^T for each column block C
    (the last one zero-padded)."""
    blocks = -(-x.shape[1] // width)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * width - x.shape[1]))
    per_block = padded.reshape(x.shape[0], blocks, width).transpose(0, 1)  # [blocks, T, width]
    return (per_block.transpose(1, 2) @ per_block).double()


def collect_statistics(gm: fx.GraphModule, state: CompileState, weight_gradients: bool, output_gradients: bool,
                       moments: str | None) -> CalibrationStats:
    """Run the calibration batches once, recording per-layer tokens and what the criterion needs: with
    ``moments="full"`` each layer's E[x x^T]; with ``"block"`` its diagonal blocks and E ||W x||^2.

    Batches run in chunks of at most ``CHUNK_IMAGES`` images (autograd memory grows with the batch, and small
    chunks are faster on CPU); chunk losses are weighted so that gradients equal the whole batch's. Output
    gradients alone need no weight gradients: a float input then requires grad instead, and backward skips
    every dL/dW product. When the criterion needs neither gradients nor input moments, one image suffices to count
    tokens.
    """
    stats = CalibrationStats()
    modules = {name: gm.get_submodule(name) for name in state.layers}
    rows: dict[str, int] = dict.fromkeys(modules, 0)
    images_in_chunk = [0]
    backward = weight_gradients or output_gradients

    def accumulate_moments(name: str, flat: torch.Tensor) -> None:
        rows[name] += flat.shape[0]
        if moments == "full":
            stats.input_moments[name] = stats.input_moments.get(name, 0) + gram(flat).double()
        elif moments == "block":
            block = block_diagonal_moments(flat, state.layers[name].grid.block_shape[1])
            stats.block_moments[name] = stats.block_moments.get(name, 0) + block

    pending: list[tuple[str, torch.Tensor]] = []  # with output gradients: inputs held until the chunk's liveness
    rows_live: dict[str, torch.Tensor] = {}  # per layer: its output rows with a nonzero gradient, this chunk

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach()
            stats.tokens[name] = x.numel() // x.shape[-1] // images_in_chunk[0]
            if moments and output_gradients:
                pending.append((name, x.reshape(-1, x.shape[-1]).float()))
            elif moments:
                accumulate_moments(name, x.reshape(-1, x.shape[-1]).float())
        return hook

    batches = statistics_batches(state) if backward or moments else [state.calibration[0][:1]]
    through_input = output_gradients and not weight_gradients and batches[0].is_floating_point()

    def make_output_hook(name):
        def accumulate(grad):
            flat = grad.reshape(-1, grad.shape[-1])
            stats.output_gradient_energy[name] = (stats.output_gradient_energy.get(name, 0)
                                                  + flat.square().sum(0, dtype=torch.float64))
            rows_live[name] = flat.ne(0).any(1)

        def hook(module, args, output):
            if moments == "block":
                y = output.detach() if module.bias is None else output.detach() - module.bias.detach()
                energy = float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2
                stats.output_energy[name] = stats.output_energy.get(name, 0.0) + energy
            if output_gradients and output.requires_grad:
                output.register_hook(accumulate)
        return hook

    live_chunks: list[torch.Tensor | None] = []
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    handles += [m.register_forward_hook(make_output_hook(n)) for n, m in modules.items()]
    requires_grad = {p: p.requires_grad for p in gm.parameters()}
    try:
        for p in gm.parameters():
            p.requires_grad_(backward and not through_input and any(p is m.weight for m in modules.values()))
        for batch in track(batches, description="importance: calibration", disable=not state.progress,
                           transient=True):
            stats.images += batch.shape[0]
            for chunk in batch.split(CHUNK_IMAGES):
                images_in_chunk[0] = chunk.shape[0]
                if through_input:
                    chunk = chunk.detach().requires_grad_(True)
                with torch.set_grad_enabled(backward):
                    logits = logits_of(gm(chunk))
                if backward:
                    (logits.float().pow(2).mean() * (chunk.shape[0] / batch.shape[0])).backward()
                if output_gradients:
                    live = live_positions(rows_live, chunk.shape[0], stats.tokens)
                    live_chunks.append(live)
                    dead = live is not None and not bool(live.all())
                    for name, flat in pending:
                        accumulate_moments(name, flat[live.flatten()] if dead else flat)
                    pending.clear()
                    rows_live.clear()
            if backward and not through_input:
                for name, m in modules.items():
                    if weight_gradients:
                        stats.gradients[name] = stats.gradients.get(name, 0) + m.weight.grad
                    m.weight.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    for name in stats.gradients:
        stats.gradients[name] = stats.gradients[name] / len(batches)
    if live_chunks and all(live is not None for live in live_chunks) and not all(live.all() for live in live_chunks):
        stats.live_tokens = torch.cat(live_chunks)
    for name in stats.input_moments:
        stats.input_moments[name] = stats.input_moments[name] / rows[name]
        stats.moment_tokens[name] = rows[name]
    for name in stats.block_moments:
        stats.block_moments[name] = stats.block_moments[name] / rows[name]
        stats.output_energy[name] = stats.output_energy[name] / rows[name]
    return stats


def _taylor(layer: LayerState, weight: torch.Tensor, grad: torch.Tensor, damping: float):
    grid = layer.grid
    wg = weight.double() * grad.double()
    saliency = grid.block_mean(wg.abs())
    order = torch.argsort(saliency.flatten(), stable=True)
    first_order = grid.block_sum(wg.square()).flatten()[order]
    inner = grid.block_sum(wg).flatten()[order]
    norm = grid.block_sum(weight.double().square()).flatten()[order]
    zero = torch.zeros(1, dtype=torch.float64)
    distortion = (torch.cat([zero, first_order.cumsum(0)]) + 0.5 * torch.cat([zero, inner.cumsum(0)]).square()
                  + 0.5 * damping * torch.cat([zero, norm.cumsum(0)]))
    return saliency, order, distortion


def _quadratic_scores(layer: LayerState, weight: torch.Tensor, total: float, column_matrix):
    """Per-block sum over its rows of w_{r,C} M_C w_{r,C}^T (M_C = ``column_matrix(c, cols)`` for block column c,
    columns ``cols``), the prune order, and the additive distortion curve normalised by ``total``, the layer's
    output energy tr(W H W^T)."""
    grid = layer.grid
    bw, bh = grid.block_shape[1], grid.block_shape[0]
    w = weight.double()
    per_row = torch.zeros(grid.out_features, grid.block_cols, dtype=torch.float64)
    for c in range(grid.block_cols):
        cols = slice(c * bw, min((c + 1) * bw, grid.in_features))
        wc = w[:, cols]
        per_row[:, c] = ((wc @ column_matrix(c, cols)) * wc).sum(1)
    padded = torch.nn.functional.pad(per_row, (0, 0, 0, grid.block_rows * bh - grid.out_features))
    scores = padded.reshape(grid.block_rows, bh, grid.block_cols).sum(1)
    total = max(float(total), 1e-30)
    order = torch.argsort(scores.flatten(), stable=True)
    distortion = torch.cat([torch.zeros(1, dtype=torch.float64), scores.flatten()[order].cumsum(0)]) / total
    return scores, order, distortion


def _hessian(layer: LayerState, weight: torch.Tensor, block_moments: torch.Tensor, output_energy: float):
    """``block_moments`` [block cols, bw, bw] the diagonal blocks of H, ``output_energy`` tr(W H W^T)."""
    return _quadratic_scores(layer, weight, output_energy,
                             lambda c, cols: block_moments[c, : cols.stop - cols.start, : cols.stop - cols.start])


def obs_ridge(options: CompileOptions, width: int, tokens: int) -> float:
    """OBS's ridge lambda relative to mean diag H: max(``hessian_damping``, ``obs_damping`` * K / T) for inputs of
    width K whose H comes from T tokens; the scores' and the reconstruction's refit's (centred there on the dense
    weights, reconstruct.py).

    Why it grows with K / T: e_b rests on how well the kept columns stand in for the removed ones, and T samples of
    K correlated columns overstate that — a least-squares fit of p columns leaves about (T - p) / T of its
    population error on the tokens it was fitted on and (T + p) / T on new ones. The ridge pulls H toward its
    diagonal by about as much as the sample can mislead: on the MiniLM benchmark (256 sentences, 4,122 live
    tokens; fc2's K / T = 0.37) it raised the compiled model's mean cosine from 0.829 to 0.868; where tokens are
    ample (DINOv2-S, the Fashion-MNIST ViT) it stays at or near the floor and changes little there (README,
    MiniLM)."""
    return max(options.hessian_damping, options.obs_damping * width / max(tokens, 1))


def _obs(layer: LayerState, weight: torch.Tensor, moment: torch.Tensor, gradient_energy: torch.Tensor,
         damping: float):
    """Optimal Brain Surgeon over blocks. Order: by the single-block cost of zeroing block b and refitting the
    rest of its rows, e_b = sum_{r in R} a_r w_{r,C} [(H^-1)_{CC}]^-1 w_{r,C}^T (H damped by ``damping`` * mean
    diag). Curve: the exact weighted output error per token after pruning the first k blocks and refitting —
    within a block row, blocks are removed one after another (one Cholesky factor of the inverse Hessian in the
    row's removal order gives every step, ``_sequential_obs_errors``); block rows are independent, so their
    errors add. Row r's error is quadratic in w_r, so
    weighting it by a_r (``gradient_energy`` [out]) is computing on the rows w_r * sqrt(a_r)."""
    k = moment.shape[0]
    damped = moment + damping * moment.diagonal().mean().clamp_min(1e-30) * torch.eye(k, dtype=moment.dtype)
    return obs_curve(layer, weight, torch.cholesky_inverse(torch.linalg.cholesky(damped)), gradient_energy)


def obs_curve(layer: LayerState, weight: torch.Tensor, inverse: torch.Tensor, loss_weights: torch.Tensor):
    """(scores, order, distortion) of OBS over blocks for rows ``weight`` [N, K], the inverse of the (damped,
    per-token) input Hessian ``inverse`` [K, K] and the loss's weights a_r of the rows ``loss_weights`` [N]."""
    weighted = weight.double() * loss_weights.double().clamp_min(0).sqrt()[:, None]
    scores, order, _ = _quadratic_scores(layer, weighted, 1.0,  # its curve is not used: no total needed
                                         lambda c, cols: torch.linalg.inv(inverse[cols, cols]))
    errors = _sequential_obs_errors(layer.grid, weighted, inverse, order)
    distortion = torch.cat([torch.zeros(1, dtype=torch.float64), errors.flatten()[order].cumsum(0)])
    return scores, order, distortion


def refit_obs_curve(layer: LayerState, h: torch.Tensor, target: torch.Tensor, tokens: int, damping: float):
    """(scores, order, distortion) of OBS for the layer as reconstruction refits it (allocation="sequential").

    ``h`` = A^T A [K', K'] and ``target`` = A^T Y [N, K'] are reconstruct's normal equations over ``tokens``
    tokens of the inputs X_p the layer sees in the model pruned so far (A = [X_p, 1] when it has a bias), with
    dense targets Y, and lambda = ``damping`` * mean diag (``obs_ridge``'s). The refit with every weight kept is
    taken as U = (H + lambda I)^-1 A^T Y (the ridge toward 0, not centred on W as reconstruct's refit is);
    removing columns P of a row and refitting the rest (bias included) raises the row's error by
    u_P [((H + lambda I)^-1)_PP]^-1 u_P^T — the dense-model formula of ``_obs`` with U for W and the weight block
    of T (H + lambda I)^-1 for E[x x^T]^-1."""
    k = layer.in_features
    damped_h, lam = damped(h, k, damping)
    factor = cholesky(damped_h, lam)
    rows = torch.cholesky_solve(target.T, factor).T[:, :k]
    inverse = torch.cholesky_inverse(factor)[:k, :k] * tokens
    return obs_curve(layer, rows, inverse, layer.loss_weights)


def _sequential_obs_errors(grid, weight: torch.Tensor, inverse: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """[block_rows, block_cols]: the error each block adds when its block row's blocks are removed in ``order``.

    Removing a set P of a row's inputs and refitting the rest leaves error w_P [(H^-1)_PP]^-1 w_P^T. With
    A = H^-1 permuted into the block row's removal order and A = L L^T, the leading principal block of L is the
    Cholesky factor of A_PP for every prefix P, so with z = L^-1 w^T the error after the first p inputs is
    ||z[:p]||^2: one Cholesky of A per block row gives the exact increment of every block. Batched over block
    rows; padded rows and columns have zero weight (and identity in A)."""
    bh, bw = grid.block_shape
    rows, cols = grid.block_rows, grid.block_cols
    size = cols * bw
    width = unaliased_width(size)  # any columns past ``size`` are identity in A and zero in w: they change nothing
    padded_inverse = torch.eye(width, dtype=torch.float64)
    padded_inverse[: grid.in_features, : grid.in_features] = inverse
    blocks = torch.nn.functional.pad(grid.pad(weight), (0, width - size)).reshape(rows, bh, width)
    rank = torch.empty(rows * cols, dtype=torch.long)
    rank[order] = torch.arange(rows * cols)
    sequence = rank.reshape(rows, cols).argsort(dim=1)  # column blocks of each row, in removal order
    ordered = torch.empty(rows, cols, dtype=torch.float64)
    offsets, tail = torch.arange(bw), torch.arange(size, width)
    group = max(1, SEQUENTIAL_OBS_BYTES // (8 * width * width))
    for first in range(0, rows, group):
        part = slice(first, min(first + group, rows))
        count = part.stop - first
        in_order = (sequence[part, :, None] * bw + offsets).reshape(count, size)  # removal order
        columns = torch.cat([in_order, tail.expand(count, -1)], 1)
        factor, info = torch.linalg.cholesky_ex(padded_inverse[columns[:, :, None], columns[:, None, :]])
        if bool(info.any()):  # [R, width, width]; H^-1 of a damped H is positive definite up to rounding
            raise torch.linalg.LinAlgError("the inverse input Hessian is not positive definite")
        w = torch.gather(blocks[part], 2, columns[:, None, :].expand(-1, bh, -1)).transpose(1, 2)  # [R, width, bh]
        z = torch.linalg.solve_triangular(factor, w, upper=False)[:, :size]
        ordered[part] = z.square().reshape(count, cols, bw * bh).sum(2)
    errors = torch.zeros(rows, cols, dtype=torch.float64)
    errors.scatter_(1, sequence, ordered)
    return errors


def _magnitude(layer: LayerState, weight: torch.Tensor):
    grid = layer.grid
    w = weight.double()
    saliency = grid.block_mean(w.abs())
    order = torch.argsort(saliency.flatten(), stable=True)
    energy = grid.block_sum(w.square()).flatten()[order]
    distortion = torch.cat([torch.zeros(1, dtype=torch.float64), energy.cumsum(0)]) / w.square().sum().clamp_min(1e-30)
    return saliency, order, distortion


def sample_at_ratios(curve: np.ndarray) -> np.ndarray:
    """A per-k curve sampled at LPViT's pruning ratios 0, 0.01, ..., 1."""
    n = len(curve) - 1
    return curve[np.rint(RATIO_GRID * n).astype(int)]


@compiler_pass(requires=("graph", "layers"), provides=("importance",))
@on_gemm_backend
def importance(gm: fx.GraphModule, state: CompileState) -> PassResult:
    criterion = state.options.importance
    stats = collect_statistics(gm, state, weight_gradients=criterion == "taylor", output_gradients=criterion == "obs",
                               moments={"hessian": "block", "obs": "full"}.get(criterion))
    state.live_tokens = stats.live_tokens
    live_share = 1.0 if stats.live_tokens is None else float(stats.live_tokens.float().mean())
    if stats.live_tokens is not None:
        state.notes.append(f"{1 - live_share:.0%} of the calibration token positions reach no output (padding) and "
                           "were left out of the statistics and fits")
    per_layer = {}
    for name, layer in state.layers.items():
        weight = gm.get_submodule(name).weight.detach()
        layer.tokens = stats.tokens[name]
        if criterion == "taylor":
            scores, order, distortion = _taylor(layer, weight, stats.gradients[name], state.options.damping)
        elif criterion == "hessian":
            scores, order, distortion = _hessian(layer, weight, stats.block_moments[name], stats.output_energy[name])
        elif criterion == "obs":
            energy = stats.output_gradient_energy[name]
            if state.options.sensitivity == "layer":
                energy = energy.mean().expand_as(energy)
            layer.loss_weights = energy
            ridge = obs_ridge(state.options, layer.in_features, stats.moment_tokens[name])
            scores, order, distortion = _obs(layer, weight, stats.input_moments[name], energy, ridge)
        else:
            scores, order, distortion = _magnitude(layer, weight)
        layer.block_scores = scores.float()
        layer.prune_order = order.numpy()
        layer.distortion = distortion.numpy()
        per_layer[name] = {
            "tokens": layer.tokens,
            "weight_shape": [layer.out_features, layer.in_features],
            "blocks": layer.num_blocks,
            "block_score_min_median_max": [scores.min().item(), scores.median().item(), scores.max().item()],
            "distortion_at_ratio_0_to_1_step_0.01": sample_at_ratios(layer.distortion),
            **({"obs_ridge": ridge} if criterion == "obs" else {}),
        }
    decisions = {"criterion": criterion, "calibration_images": stats.images,
                 "live_token_share": live_share,
                 "calibration_batches": len(state.calibration), "layers": per_layer}
    return PassResult(gm, False, decisions)
