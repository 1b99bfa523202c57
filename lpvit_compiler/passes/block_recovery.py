"""Block-level recovery: after the per-layer refit of a transformer block, fit the block as a whole.

The reconstruction pass (reconstruct.py) calls this at the end of every block, between the per-layer refit of
that block and the next block's, so each later layer is refitted on inputs that already went through recovered
blocks (EBFT, arXiv 2402.12419; BRECQ-style block reconstruction).

Input: a :class:`BlockRegion` — the graph nodes fx recorded under one numbered module (``blocks.3``,
``encoder.layer.3``: ``node.meta["nn_module_stack"]``) — with its inputs in the pruned model X_p (the blocks
before it pruned and recovered) and its outputs in the dense model Y_d (dense inputs, dense weights).
Output: the region's parameters — the kept weights of its pruned linears (masks frozen: gradients outside a
layer's mask are zeroed, so Adam never moves a pruned weight off 0), every bias, LayerNorm affine and LayerScale
in it — after Adam steps on

    L = sum_o || block_o(X_p) - Y_d,o ||^2 / sum_o || Y_d,o ||^2         (o: the region's outputs, less the
                                                                         token-pruning scores it passes on)

summed over the live token positions (``state.live_tokens``: padding that nothing reads is left out), over
mini-batches of ``STEP_IMAGES`` calibration images (whole calibration chunks where the graph has the
batch size baked in, as torch.export graphs can). No labels.

A block runs min(``steps``, floor(F / f)) steps, at least one when F > 0: f is the FLOPs of one step's forward
and backward, counted on the first step by ``torch.utils.flop_counter``, and F the block's share of the compute
budget. The count depends only on the model and the calibration data, so a compile gives the same model on a
fast machine and on a loaded one (a wall-clock budget would not); the optional ``seconds`` cap gives that up
for a bounded time.

Each linear's Adam steps are scaled per weight by its row's and column's magnitude (``_step_scales``), so rows
and columns that scale folding multiplied by a LayerScale or LayerNorm gamma move at the same relative rate as
the rest. The new parameters are kept only if L over all calibration images went down; otherwise the
per-layer refit's are restored, so recovery is never worse on the calibration data. Where the pruned part is
redundant (X_p = X_d and the block already reproduces Y_d), L is 0, every gradient is 0 and nothing moves.

With ``quantize="int8"`` the block runs as it will be executed: each pruned linear's input quantized per token
(``ops.fake_quantize_rows``) and its weight on the int8 grid of its fixed per-channel scales, both with
straight-through gradients; the weights are rounded back onto the grid at the end.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
from torch import fx, nn

from ..costmodel.flops import flop_counter
from ..frontend.regions import BlockRegion, last_readers
from ..quantization import codes
from ..runtime.ops import fake_quantize_rows
from ..state import LayerState
from .importance import live_rows

STEP_IMAGES = 8  # images per Adam step: small batches give many steps for the budget


class _RegionRunner:
    """Evaluates a region's nodes on given inputs with autograd (parameters are the graph module's own)."""

    def __init__(self, gm: fx.GraphModule, region: BlockRegion, layers: dict[str, LayerState], int8: bool):
        self.interpreter = fx.Interpreter(gm)
        self.gm, self.region, self.int8 = gm, region, int8
        self.scales = {name: layers[name].weight_scales for name in region.layers} if int8 else {}
        # Values dropped once their last reader in the region ran: without autograd holding them, a whole-model
        # region on a 32-image chunk would otherwise keep every intermediate alive (~2 GB for DeiT-S).
        returned = set(region.outputs)
        self.dropped_after: dict[fx.Node, list[fx.Node]] = {}
        for used, reader in last_readers(region.nodes).items():
            if used not in returned:
                self.dropped_after.setdefault(reader, []).append(used)

    def parameters(self, linears_only: bool = False) -> list[nn.Parameter]:
        """The region's parameters, or only its nn.Linear modules' weights and biases."""
        found = {}
        for node in self.region.nodes:
            if node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                if not linears_only or type(module) is nn.Linear:
                    found.update({id(p): p for p in module.parameters()})
            if not linears_only:  # parameters the graph reads directly: tokens, position embeddings
                for used in node.all_input_nodes:
                    if used.op == "get_attr":
                        value = self.interpreter.fetch_attr(used.target)
                        if isinstance(value, nn.Parameter):
                            found[id(value)] = value
        return list(found.values())

    def __call__(self, inputs: dict[fx.Node, object]) -> list[torch.Tensor]:
        env = dict(inputs)

        def value(n: fx.Node):
            return env[n] if n in env else self.interpreter.fetch_attr(n.target)

        for node in self.region.nodes:
            args = fx.node.map_arg(node.args, value)
            kwargs = fx.node.map_arg(node.kwargs, value)
            if node.op == "call_module" and node.target in self.scales:
                env[node] = self._int8_linear(node.target, args[0])
            else:
                env[node] = getattr(self.interpreter, node.op)(node.target, args, kwargs)
            for used in self.dropped_after.get(node, ()):
                env.pop(used, None)
        return [env[n] for n in self.region.outputs]

    def _int8_linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        linear = self.gm.get_submodule(name)
        scales = self.scales[name].to(linear.weight.dtype)[:, None]
        on_grid = codes(linear.weight, scales[:, 0]) * scales
        weight = linear.weight + (on_grid - linear.weight).detach()  # straight-through
        xq = x + (fake_quantize_rows(x.detach()) - x).detach()
        return nn.functional.linear(xq, weight, linear.bias)


def _step_batches(inputs: dict[fx.Node, list], targets: list[list[torch.Tensor]], live: list,
                  generator: torch.Generator, step_images: int | None):
    """Endless (inputs, targets, live token positions) mini-batches of ``step_images`` images (None: whole chunks),
    drawn from the calibration chunks in a random order. A value whose first dimension is not the chunk's image
    count (a broadcast mask) is passed whole."""
    chunks = len(targets[0])
    while True:
        for c in torch.randperm(chunks, generator=generator).tolist():
            images = targets[0][c].shape[0]
            for start in range(0, images, step_images or images):
                part = slice(start, start + (step_images or images))

                def cut(v):
                    if not isinstance(v, torch.Tensor):
                        return v
                    return v[part].detach() if v.dim() and v.shape[0] == images else v.detach()
                yield ({n: cut(vs[c]) for n, vs in inputs.items()}, [cut(t[c]) for t in targets], cut(live[c]))


def _runs_on_part_of_a_chunk(runner: _RegionRunner, inputs: dict[fx.Node, list],
                             targets: list[list[torch.Tensor]]) -> bool:
    """Whether the region runs on fewer images than a calibration chunk holds: a graph captured by torch.export
    can bake the batch size into its reshapes, and then every step must take whole chunks."""
    if all(t[0].shape[0] <= STEP_IMAGES for t in targets):
        return True
    batch_inputs, _, _ = next(_step_batches(inputs, targets, [None] * len(targets[0]),
                                            torch.Generator().manual_seed(0), STEP_IMAGES))
    try:
        with torch.no_grad():
            runner(batch_inputs)
    except RuntimeError:
        return False
    return True


def _loss(outputs: list[torch.Tensor], targets: list[torch.Tensor],
          live: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared errors, sum of squared targets) over the region's outputs, at the live token positions."""
    outputs, targets = [live_rows(o, live) for o in outputs], [live_rows(t, live) for t in targets]
    num = sum((o - t).pow(2).sum() for o, t in zip(outputs, targets))
    return num, sum(t.pow(2).sum() for t in targets)


def _relative_loss(outputs: list[list[torch.Tensor]], targets: list[list[torch.Tensor]], live: list) -> float:
    """L over every calibration chunk: outputs and targets per region output, per chunk."""
    num = den = 0.0
    for chunk in range(len(targets[0])):
        n, d = _loss([o[chunk] for o in outputs], [t[chunk] for t in targets], live[chunk])
        num, den = num + float(n), den + float(d)
    return num / max(den, 1e-30)


def _step_scales(gm: fx.GraphModule, region: BlockRegion, layers: dict[str, LayerState]) -> dict[int, torch.Tensor]:
    """Per-element factors of Adam's steps for the region's linears: c = r k^T / rms(W)^2 for the weight (r, k its
    row and column RMS over kept entries), r / rms(W) for the bias; both average about 1, so ``recovery_lr``
    keeps its meaning.

    Adam's step has the same size for every weight, so it is not invariant to rescaling rows or columns; scale
    folding (fold_scales.py) puts LayerScale into rows and LayerNorm affines into columns, and DINOv2's spread
    over 1e-3 .. 10. For W = diag(a) U diag(b) with U of even magnitude, c = a b^T / (rms(a) rms(b)): each
    weight moves in proportion to its own scale, as if Adam ran on U."""
    scales = {}
    for node in region.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if type(module) is not nn.Linear:
            continue
        w = module.weight.detach()
        kept = (layers[node.target].element_mask() if node.target in layers else torch.ones_like(w)).to(w.dtype)
        square = w.square() * kept
        rms = (square.sum() / kept.sum().clamp_min(1)).sqrt().clamp_min(1e-30)
        rows = (square.sum(1) / kept.sum(1).clamp_min(1)).sqrt()
        cols = (square.sum(0) / kept.sum(0).clamp_min(1)).sqrt()
        scales[id(module.weight)] = rows[:, None] * cols[None, :] / rms.square()
        if module.bias is not None:
            scales[id(module.bias)] = rows / rms
    return scales


def recover_block(gm: fx.GraphModule, region: BlockRegion, layers: dict[str, LayerState],
                  inputs: dict[fx.Node, list], targets: list[list[torch.Tensor]], *, steps: int, flops: float,
                  lr: float, int8: bool, seconds: float = math.inf, seed: int = 0,
                  outputs: list[list] | None = None, live: list | None = None,
                  linears_only: bool = False) -> tuple[dict, list]:
    """Adam on the region's parameters (module docstring); ``inputs`` maps each region input to its pruned-model
    values per calibration chunk, ``targets`` holds the dense model's value of each region output per chunk;
    at most ``steps`` steps, ``flops`` FLOPs of them and ``seconds`` of wall time. ``outputs``: the region's
    outputs per chunk as the model computes them before recovery, where the caller has them (the reconstruction's
    pruned stream does); None runs the region for them. ``live``: per chunk, the token positions that reach the
    model's output ([images, T] bool, importance.live_positions) or None; L counts those only. ``linears_only``:
    Adam moves the region's nn.Linear weights and biases only (the whole-model step of reconstruct.py).
    Returns what it did (steps run, their FLOPs, relative loss before and after, whether the result was kept)
    and the region's outputs per chunk as the model now computes them (what the pruned stream continues from)."""
    before_outputs = outputs if outputs is not None else run_region(gm, region, layers, inputs, int8)
    live = live if live is not None else [None] * len(targets[0])
    fit = region.fitted()

    def fitted(outputs: list) -> list:
        return [outputs[i] for i in fit]

    targets = fitted(targets)
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for values in targets for t in values):
        return {"steps": 0, "kept": False, "skipped": "an output of the block is not a float tensor"}, before_outputs
    runner = _RegionRunner(gm, region, layers, int8)
    params = runner.parameters(linears_only)
    masks = {id(gm.get_submodule(name).weight): layers[name].element_mask() for name in region.layers}
    before = _relative_loss(fitted(before_outputs), targets, live)
    start = [p.detach().clone() for p in params]
    step_scales = _step_scales(gm, region, layers)
    optimizer = torch.optim.Adam(params, lr=lr)
    step_images = STEP_IMAGES if _runs_on_part_of_a_chunk(runner, inputs, targets) else None
    batches = _step_batches(inputs, targets, live, torch.Generator().manual_seed(seed), step_images)
    deadline = time.perf_counter() + seconds
    done, step_flops = 0, 0
    allowed = steps if flops > 0 else 0
    with torch.enable_grad():
        while done < allowed and time.perf_counter() < deadline:
            batch_inputs, batch_targets, batch_live = next(batches)
            with flop_counter() if done == 0 else nullcontext() as counter:
                num, den = _loss(fitted(runner(batch_inputs)), batch_targets, batch_live)
                optimizer.zero_grad(set_to_none=False)
                (num / den.clamp_min(1e-30)).backward()
            if done == 0:  # steps cost alike: the first one's count says how many fit
                step_flops = counter.get_total_flops()
                affordable = flops / max(step_flops, 1)
                allowed = steps if affordable >= steps else max(1, math.floor(affordable))
            for p in params:
                if id(p) in masks:
                    p.grad.mul_(masks[id(p)])
            previous = {id(p): p.detach().clone() for p in params if id(p) in step_scales}
            optimizer.step()
            with torch.no_grad():
                for p in params:
                    if id(p) in step_scales:
                        p.sub_(previous[id(p)]).mul_(step_scales[id(p)]).add_(previous[id(p)])
            done += 1
    with torch.no_grad():
        if int8:  # back onto the int8 grid the layout will store
            for name in region.layers:
                weight = gm.get_submodule(name).weight
                scales = layers[name].weight_scales.to(weight.dtype)
                weight.copy_(codes(weight * masks[id(weight)], scales) * scales[:, None])
        after_outputs = run_region(gm, region, layers, inputs, int8)
        after = _relative_loss(fitted(after_outputs), targets, live)
        kept = after < before
        if not kept:
            for p, original in zip(params, start):
                p.copy_(original)
    decisions = {"steps": done, "images_per_step": step_images or "chunk", "flops": done * step_flops,
                 "loss_before": before, "loss_after": after, "kept": kept}
    return decisions, after_outputs if kept else before_outputs


def run_region(gm: fx.GraphModule, region: BlockRegion, layers: dict[str, LayerState], inputs: dict[fx.Node, list],
               int8: bool) -> list[list[torch.Tensor]]:
    """The region's outputs per calibration chunk (no gradients), as the model now computes them."""
    runner = _RegionRunner(gm, region, layers, int8)
    chunks = len(next(iter(inputs.values())))
    with torch.no_grad():
        per_chunk = [runner({k: v[c] for k, v in inputs.items()}) for c in range(chunks)]
    return [[outs[i] for outs in per_chunk] for i in range(len(region.outputs))]
