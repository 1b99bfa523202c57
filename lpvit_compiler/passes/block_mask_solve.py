"""Block-mask solve: how many blocks each layer keeps, under one hardware-aware budget (LPViT's equal slope).

Input: per-layer curves over k = blocks pruned — distortion d_l(k) (importance), flops/latency/power
(hardware). Output: the graph unchanged; ``pruned_blocks`` and a ``block_mask`` (True = kept) per layer, the
first k blocks of its importance order removed, and ``state.solve`` (budget achieved, predicted speedup).

Each layer's cost is C_l(k) = d_l(k) + beta * P_l(k), with P_l the power the *kept* layer draws (so beta > 0
favours removing power-hungry blocks; a negative beta reproduces the official LPViT code's direction).
``beta="auto"`` is LPViT's scaling, beta = mean_l max_a d_l'(a) / mean_l max_a |P_l'(a)| over ratios a.

The budget limits one resource R (``flops_keep``: FLOPs of the prunable linears; ``target_speedup``: the
predicted model latency; ``power_keep``: P). Minimising sum_l C_l(k_l) s.t. sum_l R_l(k_l) <= target is solved
by its Lagrangian: for a common slope lambda every layer independently takes

    k_l(lambda) = argmin_{0 <= k <= k_max,l} C_l(k) + lambda * R_l(k)

which is the point where the slope -dC_l/dR_l equals lambda in every layer (LPViT's equal-slope condition,
taken over each curve's convex hull, and per unit of resource rather than per pruning ratio, so layers of
different cost compare fairly). lambda is found by bisection (over lambda = s*sinh(u), so it may turn negative
when a power term alone would prune past the budget); the discrete gap between the two
bracketing allocations is closed by single-block steps of least dC/dR until the budget is met, so the
achieved budget ends within one step of the target. k_max,l keeps at least ``min_density`` of every layer.
Curves are evaluated at every block count (a superset of LPViT's 101-ratio grid). Under sequential allocation
reconstruct re-solves what the layers it has refitted leave of the budget (``solve_unfixed``), one layer at a time.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch
from torch import fx

from ..errors import ConfigError
from ..pass_manager import PassResult, compiler_pass
from ..state import CompileState, LayerState, SolveOutcome
from .importance import RATIO_GRID, sample_at_ratios

BUDGET_TOLERANCE = 0.01  # relative: the achieved budget must be within 1% of the target


def _allocate(costs, resources, max_pruned, slope: float) -> np.ndarray:
    return np.array([int(np.argmin(c[: m + 1] + slope * r[: m + 1])) for c, r, m in zip(costs, resources, max_pruned)])


def _total(resources, ks) -> float:
    return float(sum(r[k] for r, k in zip(resources, ks)))


def equal_slope_solve(costs: list[np.ndarray], resources: list[np.ndarray], max_pruned: list[int], target: float
                      ) -> tuple[np.ndarray, float]:
    """Pruned-block counts k_l minimising sum C_l(k_l) with sum R_l(k_l) <= target (as close as the blocks allow);
    returns (k, lambda).

    The used resource falls as lambda grows. lambda may be negative: when the costs themselves reward pruning
    (a power term), lambda < 0 holds pruning back so that the budget is met, not undercut. The caller
    guarantees feasibility: sum_l R_l(max_pruned_l) <= target.
    """
    if _total(resources, np.zeros(len(costs), int)) <= target:
        return np.zeros(len(costs), int), 0.0
    scale = sum(float(np.ptp(c)) for c in costs) / max(sum(float(np.ptp(r)) for r in resources), 1e-300)
    scale = scale if scale > 0 else 1.0

    def slope(u: float) -> float:  # sinh spans +-1e26 * scale and is linear around 0
        return scale * math.sinh(u)

    lo, hi = -60.0, 60.0  # invariant: allocation at slope(lo) exceeds the target, at slope(hi) meets it
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _total(resources, _allocate(costs, resources, max_pruned, slope(mid))) > target:
            lo = mid
        else:
            hi = mid
    ks = _allocate(costs, resources, max_pruned, slope(lo))
    while _total(resources, ks) > target:
        best, best_k, best_rate = -1, 0, math.inf
        for layer, (c, r, m) in enumerate(zip(costs, resources, max_pruned)):
            k = ks[layer]
            cheaper = np.nonzero(r[k + 1: m + 1] < r[k])[0]  # next count that saves resource (skips flat runs)
            if cheaper.size:
                k_next = k + 1 + int(cheaper[0])
                rate = (c[k_next] - c[k]) / (r[k] - r[k_next])
                if rate < best_rate:
                    best, best_k, best_rate = layer, k_next, rate
        if best < 0:
            break
        ks[best] = best_k
    return ks, slope(hi)


def lpvit_beta(distortions: list[np.ndarray], powers: list[np.ndarray]) -> float:
    """LPViT's automatic power weight: mean of max distortion slopes over mean of max power slopes."""
    def max_slope(curve):
        return float(np.max(np.abs(np.gradient(sample_at_ratios(curve), RATIO_GRID))))
    power_slope = np.mean([max_slope(p) for p in powers])
    return float(np.mean([max_slope(d) for d in distortions]) / power_slope) if power_slope > 0 else 0.0


def _marginal_rates(cost: np.ndarray, resource: np.ndarray, k: int, k_max: int) -> tuple[float | None, float | None]:
    """dC/dR for pruning one more block (forward) and for the last block pruned (backward)."""
    forward = (cost[k + 1] - cost[k]) / (resource[k] - resource[k + 1]) \
        if k < k_max and resource[k] > resource[k + 1] else None
    backward = (cost[k] - cost[k - 1]) / (resource[k - 1] - resource[k]) \
        if k > 0 and resource[k - 1] > resource[k] else None
    return forward, backward


@dataclasses.dataclass
class BudgetProblem:
    """The solve's inputs: per layer C_l(k), R_l(k) and k_max,l; the resource's dense total; what the layers
    outside the solve use of it (``offset``); and target = budget_target * dense_total."""

    beta: float
    costs: list[np.ndarray]
    resources: list[np.ndarray]
    max_pruned: list[int]
    dense_total: float
    offset: float
    target: float

    @property
    def reachable(self) -> float:
        """The least resource the solve can reach (every layer at k_max)."""
        return self.offset + sum(r[m] for r, m in zip(self.resources, self.max_pruned))

    def solve(self) -> tuple[np.ndarray, float]:
        """(k per layer, lambda): :func:`equal_slope_solve` of this problem (call when reachable <= target)."""
        return equal_slope_solve(self.costs, self.resources, self.max_pruned, self.target - self.offset)

    def achieved(self, ks) -> float:
        """The resource used at k_l pruned blocks per layer, as a fraction of the dense total."""
        return (self.offset + _total(self.resources, ks)) / self.dense_total

    def objective(self, ks) -> float:
        return float(sum(c[k] for c, k in zip(self.costs, ks)))


def budget_problem(state: CompileState, beta: float | None = None) -> BudgetProblem:
    """The budget problem of the layers' current distortion and cost curves (module docstring); ``beta`` given
    keeps an earlier solve's power weight."""
    opts = state.options
    layers = list(state.layers.values())
    curves = [l.curves for l in layers]
    if beta is None:
        beta = (lpvit_beta([l.distortion for l in layers], [c.power for c in curves]) if opts.power_weight == "auto"
                else float(opts.power_weight))
    costs = [l.distortion + beta * c.power for l, c in zip(layers, curves)]
    max_pruned = [l.num_blocks - max(1, math.ceil(opts.min_density * l.num_blocks)) for l in layers]
    if opts.budget == "flops":
        resources, offset = [c.flops for c in curves], 0.0
        dense_total = sum(c.flops[0] for c in curves)
    elif opts.budget == "latency":
        resources, offset = [c.latency for c in curves], state.model_costs.other_latency_s
        dense_total = state.model_costs.dense_latency_s
    else:  # the power of the prunable linears, against the model before token and head pruning
        resources, offset = [c.power for c in curves], 0.0
        dense_total = (state.model_costs.dense_linear_energy_j if opts.power_model == "energy"
                       else sum(c.power[0] for c in curves))
    return BudgetProblem(beta, costs, resources, max_pruned, dense_total, offset, opts.budget_target * dense_total)


@compiler_pass(requires=("importance", "curves", "model_costs"), provides=("masks", "solve"), changes_costs=True)
def block_mask_solve(gm: fx.GraphModule, state: CompileState) -> PassResult:
    opts = state.options
    layers = list(state.layers.values())
    problem = budget_problem(state)
    if problem.reachable > problem.target:
        raise ConfigError(infeasible_message(opts, problem.reachable / problem.dense_total))
    beta, costs, resources, max_pruned = problem.beta, problem.costs, problem.resources, problem.max_pruned
    ks, slope = problem.solve()
    achieved = problem.achieved(ks)
    met_without_blocks = achieved < opts.budget_target and not ks.any()  # token or head pruning went further
    if abs(achieved - opts.budget_target) > BUDGET_TOLERANCE * opts.budget_target and not met_without_blocks:
        warnings.warn(f"the {opts.budget} budget reached {achieved:.4f} of dense for a target of "
                      f"{opts.budget_target:.4f}: blocks are too coarse for this model; use a smaller block_shape")

    per_layer, masks = {}, {}
    for layer, k, cost, resource, k_max in zip(layers, ks, costs, resources, max_pruned):
        masks[layer.name] = prune_first_blocks(layer, int(k))
        forward, backward = _marginal_rates(cost, resource, int(k), k_max)
        per_layer[layer.name] = {
            "blocks": layer.num_blocks,
            "pruned_blocks": int(k),
            "keep_ratio": 1 - k / layer.num_blocks,
            "flops_keep": layer.curves.flops[k] / layer.curves.flops[0],
            "distortion": layer.distortion[k],
            "power_term": beta * layer.curves.power[k],
            "cost_per_resource_next_block": forward,
            "cost_per_resource_last_block": backward,
            "at_min_density": bool(k == k_max),
            "why": _why(int(k), k_max, forward, backward, slope),
        }
    state.solve = solve_outcome(state, problem, ks, slope)
    decisions = {
        "budget": opts.budget,
        "budget_target": opts.budget_target,
        "budget_achieved": achieved,
        "beta": beta,
        "equal_slope_lambda": slope,
        "min_density": opts.min_density,
        "outcome": dataclasses.asdict(state.solve),
        "how_to_read": "A layer keeps blocks while removing the next one costs more distortion per unit of "
                       "budget resource (cost_per_resource_next_block) than the common slope lambda; it is "
                       "pruned further when that rate is below lambda, down to min_density.",
        "layers": per_layer,
    }
    return PassResult(gm, True, decisions, masks=masks,
                      figures={"distortion_curves": lambda: _curves_figure(layers, ks)})


def _why(k: int, k_max: int, forward, backward, slope: float) -> str:
    if k == k_max:
        return "pruned down to min_density: every block removed cost less than lambda per unit of budget"
    if k == 0 and forward is None:
        return "kept whole: removing one block saves none of the budget resource here (dense GEMM still faster)"
    if k == 0:
        return f"kept whole: even its cheapest block costs {forward:.3g} per unit of budget, above lambda={slope:.3g}"
    return (f"stopped where the next block would cost {forward:.3g} per unit of budget (> lambda={slope:.3g})"
            if forward is not None else "stopped at the last block")


def prune_first_blocks(layer: LayerState, k: int) -> torch.Tensor:
    """Set the layer's ``block_mask`` to all blocks but the first k of its ``prune_order``; returns the mask."""
    layer.pruned_blocks = k
    flat = torch.ones(layer.num_blocks, dtype=torch.bool)
    flat[torch.from_numpy(layer.prune_order[:k])] = False
    layer.block_mask = flat.reshape(layer.grid.block_rows, layer.grid.block_cols)
    return layer.block_mask


def solve_unfixed(state: CompileState, fixed: dict[str, int]) -> dict[str, int]:
    """Pruned-block counts of the layers not in ``fixed`` (name -> its k): the equal-slope solve of the budget
    the fixed layers leave, on every layer's current curves, with the first solve's beta."""
    problem = budget_problem(state, beta=state.solve.beta)
    names = list(state.layers)
    free = [i for i, name in enumerate(names) if name not in fixed]
    used = sum(problem.resources[i][fixed[name]] for i, name in enumerate(names) if name in fixed)
    ks, _ = BudgetProblem(problem.beta, [problem.costs[i] for i in free], [problem.resources[i] for i in free],
                          [problem.max_pruned[i] for i in free], problem.dense_total, problem.offset + used,
                          problem.target).solve()
    return {names[i]: int(k) for i, k in zip(free, ks)}


def solve_outcome(state: CompileState, problem: BudgetProblem, ks, slope: float) -> SolveOutcome:
    """The budget reached and the predicted FLOPs, latency and energy of pruning ks[l] blocks of each layer."""
    layers = list(state.layers.values())
    model = state.model_costs
    flops_kept = sum(l.curves.flops[k] for l, k in zip(layers, ks))
    flops_dense = sum(l.curves.flops[0] for l in layers)
    latency = model.other_latency_s + sum(l.curves.latency[k] for l, k in zip(layers, ks))
    energy = model.other_energy_j + sum(l.curves.energy[k] for l, k in zip(layers, ks))
    return SolveOutcome(
        beta=float(problem.beta), slope=float(slope), budget_achieved=float(problem.achieved(ks)),
        flops_keep_achieved=float(flops_kept / flops_dense),
        model_flops_keep=float((model.other_flops + flops_kept) / model.model_flops) if model.model_flops else None,
        predicted_latency_s=float(latency), predicted_speedup=float(model.dense_latency_s / latency),
        predicted_energy_j=float(energy), predicted_energy_ratio=float(energy / model.dense_energy_j))


def infeasible_message(opts, reachable: float) -> str:
    what = {"flops": f"flops_keep={opts.budget_target:g}",
            "latency": f"target_speedup={1 / opts.budget_target:g}",
            "power": f"power_keep={opts.budget_target:g}"}[opts.budget]
    limit = {"flops": f"{reachable:.3f} of the FLOPs", "latency": f"a speedup of {1 / reachable:.2f}x",
             "power": f"{reachable:.3f} of the power"}[opts.budget]
    return (f"{what} cannot be met: with min_density={opts.min_density:g} (every layer keeps that share of its "
            f"blocks) the most pruning reaches {limit}; relax the budget or lower min_density")


def _curves_figure(layers, ks):
    import matplotlib.pyplot as plt

    cols = min(6, len(layers))
    rows = math.ceil(len(layers) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    for ax, layer, k in zip(axes.flat, layers, ks):
        ax.plot(RATIO_GRID, sample_at_ratios(layer.distortion), lw=1)
        ax.plot([k / layer.num_blocks], [layer.distortion[k]], "o", color="C3")
        ax.set_title(layer.name, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    figure.supxlabel("pruning ratio (fraction of blocks removed)")
    figure.supylabel("distortion")
    figure.tight_layout()
    return figure
