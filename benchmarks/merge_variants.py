"""Which ToMe choices matter on real weights: DINOv2-S + frozen probe (``real_vit.py``'s protocol), tokens merged
in plain torch on timm's modules, no weight pruning and no refit, over merge metrics, placements and schedules.

    python benchmarks/merge_variants.py [--test-images 5000] [--out benchmarks/results/merge_variants]

lpvit's ``token_pruning="merge"`` merges at the input of every block from block 1 (the locality schedule, taken
from a compile at ``--patch-keep``), on the cosine of the tokens themselves. The variants change one thing each:

    keys               the similarity on the block's attention keys, mean over heads (ToMe's metric)
    after attention    merge inside the block, between attention and MLP (ToMe's placement), on the keys; the
                       same counts one block earlier, so slightly fewer FLOPs
    protect isolated   PiToMe-style: only the 2r patches of highest "energy" (mean clipped similarity to the
                       other patches, margin 0.9 - 0.9 l / L) are candidates; they alternate into A and B by energy
    front / late       about the locality schedule's FLOPs at 0.25, spent on merging early (block 1 down to 36 of
                       the 64 patches) or late (nothing before block 4, then down to 7)

Every variant uses lpvit's TokenMerge (decide on the metric, reduce on the tokens) and proportional attention,
except "protect isolated", whose sets differ. Top-1 on the Fashion-MNIST test images; FLOPs kept is the linears'
(``linear_flops_keep``), which dominate at 65 tokens.
Writes <out>.md and <out>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import real_vit  # noqa: E402

import lpvit_compiler as lpvit  # noqa: E402
from lpvit_compiler.tokens import TokenMerge  # noqa: E402

PREFIX = 1  # DINOv2-S: a class token, no registers


def _qkv(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, N, D] of a timm attention on x [B, N, C]."""
    b, n, c = x.shape
    heads = block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _attention(block, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the block's attention branch with proportional attention, its keys' mean over heads [B, N, D])."""
    q, k, v = _qkv(block, x)
    logits = (q * block.attn.scale) @ k.transpose(-2, -1) + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
    return block.ls1(block.attn.proj(out)), k.mean(1)


def _protect_isolated(x: torch.Tensor, size: torch.Tensor, remove: int, margin: float):
    """PiToMe-style merge of ``remove`` patches: energy E_i = mean_j f(cos(x_i, x_j)), f(s) = s above the margin,
    exp(s - margin) - 1 below; the 2 * remove most energetic patches alternate into A and B by energy, each A
    patch joins its most similar B patch (size-weighted), the other patches are kept as they are."""
    patches = x[:, PREFIX:]
    unit = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = unit @ unit.transpose(-1, -2)
    energy = torch.where(similarity > margin, similarity, torch.exp(similarity - margin) - 1).mean(-1)
    ranked = energy.argsort(-1, descending=True)
    a, b, kept = ranked[:, :2 * remove:2], ranked[:, 1:2 * remove:2], ranked[:, 2 * remove:]

    def rows(t, index):
        return t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))

    partner = (rows(unit, a) @ rows(unit, b).transpose(-1, -2)).argmax(-1)
    weighted = torch.cat([patches * size[:, PREFIX:, None], size[:, PREFIX:, None]], -1)
    merged = rows(weighted, b).scatter_reduce(1, partner[..., None].expand(-1, -1, weighted.shape[-1]),
                                              rows(weighted, a), reduce="sum")
    head = torch.cat([x[:, :PREFIX] * size[:, :PREFIX, None], size[:, :PREFIX, None]], -1)
    out = torch.cat([head, rows(weighted, kept), merged], 1)
    return out[..., :-1] / out[..., -1:], out[..., -1]


def _merge_at_input(block, x: torch.Tensor, size: torch.Tensor, remove: int, variant: str, depth: float):
    """Merge ``remove`` patches of the block's input x [B, N, C]; ``depth`` = block index / blocks."""
    if variant == "protect isolated":
        return _protect_isolated(x, size, remove, margin=0.9 - 0.9 * depth)
    merge = TokenMerge(PREFIX, remove)
    metric = _qkv(block, x)[1].mean(1) if variant == "keys" else x
    return merge.reduce(x, size, merge.decide(metric))


def forward(model, images: torch.Tensor, removes: list[int], variant: str) -> torch.Tensor:
    """Logits of ``model`` with ``removes[l]`` patches merged in block l: at its input, or between its attention
    and its MLP for "after attention"."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    size = torch.ones_like(x[..., 0])
    for index, block in enumerate(model.blocks):
        remove = removes[index]
        if remove and variant != "after attention":
            x, size = _merge_at_input(block, x, size, remove, variant, index / len(model.blocks))
        branch, keys = _attention(block, x, size)
        x = x + branch
        if remove and variant == "after attention":
            merge = TokenMerge(PREFIX, remove)
            x, size = merge.reduce(x, size, merge.decide(keys))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.head(model.norm(x)[:, 0])


def linear_flops_keep(attention_tokens: list[int], mlp_tokens: list[int], tokens: int) -> float:
    """The linears' FLOPs kept: qkv and proj cost 4 C^2 per token, the MLP 8 C^2 (attention's own products, at 65
    tokens a few percent, are left out)."""
    return sum(4 * a + 8 * m for a, m in zip(attention_tokens, mlp_tokens)) / (12 * tokens * len(mlp_tokens))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch-keep", type=float, default=0.25)
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=real_vit.RESULTS / "merge_variants")
    args = parser.parse_args(argv)

    model = real_vit.dinov2_small()
    images, labels = real_vit.fashion_mnist(args.test_images)
    train, test = torch.arange(4000), torch.arange(len(images) - args.test_images, len(images))
    model = real_vit.with_probe(model, images[train], labels[train])
    compiled = lpvit.compile(model, flops_keep=1.0, calib=images[train[: args.calib_images]], reconstruct=False,
                             importance="magnitude", token_pruning="merge", patch_keep=args.patch_keep, progress=False)
    patches = compiled.report.token_stages[0]["tokens_in"] - PREFIX
    locality = [patches] + [s["patches_kept"] for s in compiled.report.token_stages]
    counts = {"—": [patches] * len(locality), "locality (lpvit)": locality, "front": [patches] + [36] * 11,
              "late": [patches] * 4 + [50, 40, 32, 24, 18, 14, 10, 7]}
    runs = [("dense", "—", "tokens"), ("tokens (lpvit)", "locality (lpvit)", "tokens"),
            ("keys", "locality (lpvit)", "keys"), ("after attention", "locality (lpvit)", "after attention"),
            ("protect isolated", "locality (lpvit)", "protect isolated"), ("front", "front", "tokens"),
            ("late", "late", "tokens")]
    rows = []
    for name, schedule, variant in runs:
        kept = counts[schedule]
        removes = [0] + [kept[i - 1] - kept[i] for i in range(1, len(kept))]
        tokens = [k + PREFIX for k in kept]  # at each block's input
        attention_tokens, mlp_tokens = tokens, tokens
        if variant == "after attention":  # block l's merge happens inside block l - 1, before its MLP
            removes = removes[1:] + [0]
            mlp_tokens = tokens[1:] + tokens[-1:]
        with torch.no_grad():
            logits = torch.cat([forward(model, images[test[i:i + 100]], removes, variant)
                                for i in range(0, len(test), 100)])
        rows.append({"variant": name, "schedule": schedule, "patches_per_block": kept,
                     "flops_keep": linear_flops_keep(attention_tokens, mlp_tokens, patches + PREFIX),
                     "top1": real_vit.top1(logits, labels[test])})
        print(json.dumps(rows[-1]), flush=True)
    with torch.no_grad():
        compiled_top1 = real_vit.top1(torch.cat([compiled(images[test[i:i + 100]])
                                                 for i in range(0, len(test), 100)]), labels[test])
    meta = {"patch_keep": args.patch_keep, "test_images": len(test), "image": real_vit.IMAGE,
            "compiled_top1_torch": compiled_top1}
    intro = (f"DINOv2-S/14 + frozen probe, Fashion-MNIST at {meta['image']} px, {meta['test_images']} test images; "
             f"tokens merged in plain torch, no refit; lpvit's own compile of the same schedule: top-1 "
             f"{compiled_top1:.4f}.")
    real_vit.write_results(args.out, meta, rows, intro, {
        "variant": lambda r: r["variant"], "schedule": lambda r: r["schedule"],
        "linear FLOPs kept": lambda r: f"{r['flops_keep']:.3f}", "top-1": lambda r: f"{r['top1']:.4f}",
        "vs dense": lambda r: f"{100 * (r['top1'] - rows[0]['top1']):+.1f}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
