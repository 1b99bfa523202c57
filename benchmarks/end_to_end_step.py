"""Does an end-to-end step after block recovery help on real weights? (Issue 12, item 2's optional final step.)

    python benchmarks/end_to_end_step.py [--flops-keep 0.5] [--lr 1e-5 3e-5] [--epochs 8]

On ``real_vit.py``'s model and data (DINOv2-S/14 at 112 px with its frozen Fashion-MNIST probe, 256 unlabeled
calibration images, 5,000 test images) this compiles with the defaults (16x16 blocks), then trains the compiled
model's kept weights (masks frozen, as ``lpvit.finetune`` does), biases, norms and embeddings — the probe frozen —
with Adam on the distillation loss over the calibration images only, no labels:

    L = KL(softmax(t) || softmax(s))        t: the dense model's logits, s: the compiled model's (batches of 16)

and prints the test top-1 (torch) after 1, 2, 4 and 8 epochs of each learning rate. Prints JSON lines; writes
nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import onnx
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
import real_vit  # noqa: E402

import lpvit_compiler as lpvit  # noqa: E402
from lpvit_compiler.runtime.modules import BlockSparseLinear  # noqa: E402
from lpvit_compiler.tools.finetune import _MaskedLinear  # noqa: E402

BATCH = 16


def trainable_copy(compiled) -> torch.nn.Module:
    """The compiled graph with every block-sparse linear as a dense weight times its fixed mask; head frozen."""
    gm = copy.deepcopy(compiled.graph_module)
    for row in compiled.report.layers:
        module = gm.get_submodule(row.name)
        if isinstance(module, BlockSparseLinear):
            gm.set_submodule(row.name, _MaskedLinear(module.to_dense(), module.bias, module.element_mask(),
                                                     module.activation))
    for name, parameter in gm.named_parameters():
        parameter.requires_grad_(not name.startswith("head"))
    return gm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-keep", type=float, default=0.5)
    parser.add_argument("--lr", nargs="+", type=float, default=[1e-5, 3e-5])
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = real_vit.dinov2_small(onnx.load_from_string(real_vit.dinov2_onnx()))
    images, labels = real_vit.fashion_mnist(5000)  # the last 5,000 are the test split's, as in real_vit.py
    model = real_vit.with_probe(model, images[:4000], labels[:4000])
    calib, test_images, test_labels = images[:256], images[-5000:], labels[-5000:]
    started = time.perf_counter()
    compiled = lpvit.compile(model, calib=calib, block_shape=16, flops_keep=args.flops_keep, progress=False)
    print(json.dumps({"compile_s": round(time.perf_counter() - started, 1)}), flush=True)

    def top1(net) -> float:
        with torch.no_grad():
            return real_vit.top1(torch.cat([net(test_images[i:i + 64]) for i in range(0, len(test_images), 64)]),
                                 test_labels)

    with torch.no_grad():
        teacher = torch.cat([model(calib[i:i + 64]) for i in range(0, len(calib), 64)])
    print(json.dumps({"flops_keep": args.flops_keep, "epoch": 0, "top1": top1(compiled)}), flush=True)
    for lr in args.lr:
        gm = trainable_copy(compiled)
        optimizer = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=lr)
        order = torch.Generator().manual_seed(0)
        for epoch in range(1, args.epochs + 1):
            gm.train()
            permutation, total = torch.randperm(len(calib), generator=order), 0.0
            for start in range(0, len(calib), BATCH):
                batch = permutation[start:start + BATCH]
                loss = F.kl_div(F.log_softmax(gm(calib[batch]), -1), F.log_softmax(teacher[batch], -1),
                                log_target=True, reduction="batchmean")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            gm.eval()
            if epoch & (epoch - 1) == 0:  # 1, 2, 4, 8, ...
                print(json.dumps({"flops_keep": args.flops_keep, "lr": lr, "epoch": epoch,
                                  "train_kl": total / (len(calib) // BATCH), "top1": top1(gm)}), flush=True)


if __name__ == "__main__":
    main()
