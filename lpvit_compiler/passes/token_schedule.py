"""Joint token schedule (pass 06): under a latency or power budget with token pruning but no ``patch_keep``,
choose how many patches the token stages keep together with the block masks — one cost model, one budget.

Input: the graph with its token stages keeping every patch (token_pruning leaves them so in this mode), layers
with distortion curves (importance, measured on every patch) and cost curves (hardware). Output: every stage's
reducer set to the chosen schedule, and ``state.token_stages``, the layers' ``tokens`` and ``curves`` and
``state.model_costs`` for it; block_mask_solve then solves the masks at those costs. Without the mode: nothing.

For every candidate p in PATCH_KEEP_GRID (the share of patches left after the last stage; schedules merge
cannot run — more than half of a stage's patches merged — are skipped):

    n(p)          the token pass's locality-weighted keep counts (token_pruning.keep_counts)
    D_tokens(p)   the damage of the token stages alone, in the obs criterion's units: the first-order change of
                  its loss L = mean(z^2) over a calibration batch's outputs z, squared and summed over output
                  elements (the diagonal Fisher by which obs weighs every layer's error):
                      D_tokens = sum_batches sum_{i in batch, e} (2 z_ie / (B K))^2 (z'_ie - z_ie)^2
                  z' the outputs with the stages at n(p), B images per batch, K output elements per image; the
                  mean over SCHEDULE_IMAGES images, scaled to the batches importance ran
    D_blocks(p)   sum_l C_l(k_l) of the block solve (block_mask_solve.BudgetProblem) with the layers' costs at
                  the tokens n(p) leaves them: the blocks pay for the part of the budget the tokens do not
    p* = argmin_p D_tokens(p) + D_blocks(p)        (over the candidates where the budget is reachable;
                                                    the larger p within a relative TIE of the least)

Approximations: the distortion curves come from statistics over every patch (a block's error is weighed as if no
token were pruned); D_tokens is the damage before reconstruction, D_blocks the error left after each layer's
refit, so the reconstruction's help to dropped tokens is not counted.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from ..costmodel.flops import tokens_and_work
from ..errors import ConfigError
from ..frontend.calibration import logits_of
from ..pass_manager import PassResult, compiler_pass
from ..state import CompileState, TokenStage
from .block_mask_solve import budget_problem, infeasible_message
from .hardware import cost_curves, whole_model_costs
from .importance import statistics_batches
from .token_pruning import MAP_IMAGES, apply_counts, keep_counts, kept_maps

PATCH_KEEP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(16))  # 1.0, 0.95, ..., 0.25
SCHEDULE_IMAGES = 32
TIE = 1e-3  # relative: damages this close are equal (float rounding when tokens merge exactly)


def _output_damage_factor(state: CompileState, elements: int) -> float:
    """sum over importance's batches of B * (2 / (B K))^2: D_tokens per unit of mean_i sum_e z^2 (z' - z)^2."""
    return sum(4.0 / (len(batch) * elements ** 2) for batch in statistics_batches(state))


def _set_schedule(gm: fx.GraphModule, state: CompileState, stages: list[TokenStage], counts: list[int]
                  ) -> list[TokenStage]:
    """Set the stages to ``counts`` and bring the layers' tokens, curves and the model's costs up to date."""
    stages = apply_counts(gm, stages, counts)
    tokens, work = tokens_and_work(gm, state.layers, state.calibration[0][:1])
    for name, layer in state.layers.items():
        layer.tokens = tokens[name]
        layer.curves = cost_curves(state, layer)
    state.model_costs = whole_model_costs(state, work)
    return stages


@compiler_pass(requires=("token_schedule", "curves", "model_costs"), provides=("token_counts",), changes_costs=True)
def token_schedule(gm: fx.GraphModule, state: CompileState) -> PassResult:
    opts = state.options
    if not (opts.joint_token_schedule and state.token_stages):
        return PassResult(gm, False, {"enabled": False})
    provisional = state.token_stages
    prefix = gm.get_submodule(provisional[0].module).prefix
    patches = provisional[0].tokens_in - prefix
    weights = np.array([s.locality for s in provisional])
    images = torch.cat(statistics_batches(state))[:SCHEDULE_IMAGES]
    with torch.no_grad():
        reference = logits_of(gm(images)).double()  # every patch kept: the model before token pruning
    weight = reference.square().reshape(len(images), -1)
    factor = _output_damage_factor(state, weight.shape[1])

    candidates, best, least_reachable = [], None, math.inf
    for patch_keep in PATCH_KEEP_GRID:
        counts = keep_counts(patches, patch_keep, weights)
        row = {"patch_keep": patch_keep, "patches_kept": counts[-1]}
        try:
            _set_schedule(gm, state, provisional, counts)
        except ValueError as e:  # merge cannot remove that many
            candidates.append({**row, "skipped": str(e)})
            continue
        problem = budget_problem(state)
        least_reachable = min(least_reachable, problem.reachable / problem.dense_total)
        with torch.no_grad():
            change = (logits_of(gm(images)).double() - reference).square().reshape(len(images), -1)
        row["token_damage"] = factor * float((weight * change).sum(1).mean())
        if problem.reachable > problem.target:
            reach = problem.reachable / problem.dense_total
            candidates.append({**row, "skipped": f"budget out of reach (best {reach:.3f} of dense)"})
            continue
        ks, _ = problem.solve()
        row["block_damage"] = problem.objective(ks)
        row["total"] = row["token_damage"] + row["block_damage"]
        row["blocks_pruned"] = int(np.sum(ks))
        candidates.append({**row, "counts": counts})
    feasible = [c for c in candidates if "total" in c]
    if feasible:  # within TIE of the least damage counts as a tie: then the most patches (the grid descends)
        least = min(c["total"] for c in feasible)
        best = next(c for c in feasible if c["total"] <= least + TIE * max(least, 1e-300))
    if best is None:
        raise ConfigError(infeasible_message(opts, least_reachable) + f" (token pruning tried down to patch_keep="
                          f"{PATCH_KEEP_GRID[-1]:g})")
    state.token_stages = _set_schedule(gm, state, provisional, best["counts"])
    decisions = {"enabled": True, "rule": "patch_keep minimising token_damage + block_damage (module docstring)",
                 "patch_keep": best["patch_keep"], "stages": [vars(s) for s in state.token_stages],
                 "calibration_images": len(images),
                 "candidates": [{k: v for k, v in c.items() if k != "counts"} for c in candidates]}
    figures = {"candidates": lambda: _candidates_figure(candidates, best["patch_keep"])}
    if opts.token_pruning != "merge":
        figures["kept_patches"] = kept_maps(gm, state.token_stages, torch.cat(state.calibration)[:MAP_IMAGES], prefix)
    return PassResult(gm, True, decisions, figures=figures)


def _candidates_figure(candidates: list[dict], chosen: float):
    import matplotlib.pyplot as plt

    rows = [r for r in candidates if "total" in r]
    figure, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("token_damage", "tokens"), ("block_damage", "blocks"), ("total", "total")):
        ax.plot([r["patch_keep"] for r in rows], [r[key] for r in rows], "o-", ms=3, label=label)
    ax.axvline(chosen, color="C3", lw=1, ls="--")
    ax.set_xlabel("patch_keep")
    ax.set_ylabel("damage (obs units)")
    ax.set_yscale("symlog", linthresh=max(1e-12, min((r["total"] for r in rows if r["total"] > 0), default=1e-12)))
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure
