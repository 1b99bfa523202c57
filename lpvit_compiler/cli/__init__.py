"""The ``lpvit`` command: compile, bench, eval, inspect, export.

    lpvit compile deit_small_patch16_224 --hw cpu --flops-keep 0.5 --out deit_s.onnx --report report.html --bench
    lpvit bench deit_s.onnx --dense deit_s-dense.onnx --batch 1,8
    lpvit eval deit_s.onnx --data imagenet/val
    lpvit inspect dumps/
    lpvit export model.pt2 --out model.onnx --triton-repo triton/

One module per command (``*_cmd.py``); ``loading.py`` reads models and data, ``output.py`` writes files. User
mistakes print one line (``lpvit <command>: error: ...``) and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..costmodel import known_profiles
from ..errors import LpvitError
from ..options import (ALLOCATIONS, DEFAULT_FLOPS_KEEP, DEFAULT_HW, DEFAULT_PATCH_KEEP, HEAD_CRITERIA,
                       IMPORTANCE_CRITERIA, PRESETS, CompileOptions)
from .bench_cmd import cmd_bench
from .compile_cmd import cmd_compile
from .eval_cmd import cmd_eval
from .export_cmd import cmd_export
from .inspect_cmd import cmd_inspect
from .ui import Ui


def _add_triton(parser) -> None:
    parser.add_argument("--triton-repo", metavar="DIR", help="also write a Triton Inference Server model repository")
    parser.add_argument("--triton-name", default="lpvit_model", help="model name in the Triton repository")
    parser.add_argument("--triton-mount", metavar="PATH",
                        help="where DIR is mounted in the server's container (default: DIR's path here)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpvit", description="Compile ViTs into faster block-sparse models.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="print nothing but errors")
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    common.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: this machine's cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", parents=[common], help="compile a model and export it to ONNX")
    c.add_argument("model", metavar="MODEL", help="timm model name, package.module:factory, or a .pt2 file")
    c.add_argument("--out", required=True, help="ONNX file to write")
    c.add_argument("--hw", default=DEFAULT_HW, help=f"hardware profile: {', '.join(known_profiles())} "
                   f"(default {DEFAULT_HW})")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--flops-keep", type=float, help="fraction of the prunable linears' FLOPs to keep "
                        f"(default {DEFAULT_FLOPS_KEEP})")
    budget.add_argument("--target-speedup", type=float, help="predicted speedup of the whole model on --hw")
    budget.add_argument("--power-keep", type=float, help="fraction of the prunable linears' predicted power to keep")
    c.add_argument("--block", help="block shape RxC (default: the hardware profile's)")
    c.add_argument("--preset", choices=tuple(PRESETS), help="a named set of defaults: fast (about half a minute "
                   "for DeiT-S: Hessian criterion, fewer statistics and refit images, no block recovery); the "
                   "flags below override it")
    c.add_argument("--importance", choices=IMPORTANCE_CRITERIA,
                   help=f"block criterion (default {CompileOptions.default('importance')}): obs, taylor (LPViT's), "
                   "hessian or magnitude")
    c.add_argument("--allocation", choices=ALLOCATIONS,
                   help="sequential: re-score each layer on the pruned model's inputs at its refit and re-solve the "
                        "budget left; dense: the dense model's curves; auto (default): sequential with the obs "
                        "criterion and reconstruction, else dense")
    c.add_argument("--prune-heads", action="store_true", help="also prune classifier heads")
    c.add_argument("--verify", action="store_true", help="check every pass's invariant while compiling (slower)")
    c.add_argument("--no-reconstruct", dest="reconstruct", action="store_false", default=None,
                   help="keep the surviving weights as trained (default: refit them to the dense outputs)")
    c.add_argument("--no-block-recovery", dest="block_recovery", action="store_false", default=None,
                   help="skip fitting each transformer block to the dense block's output (faster compile)")
    c.add_argument("--recovery-tflops", type=float,
                   help="compute budget of block recovery in 10^12 FLOPs (default "
                        f"{CompileOptions.default('recovery_tflops'):g}; counted, so a compile is reproducible)")
    c.add_argument("--model-recovery-tflops", type=float,
                   help="compute budget (10^12 FLOPs) of a last recovery step fitting the whole model's outputs to "
                        f"the dense model's (default {CompileOptions.default('model_recovery_tflops'):g}; 0: off)")
    c.add_argument("--recovery-seconds", type=float,
                   help="wall-clock cap of block recovery and the end-to-end step (default none; when it binds, "
                        "the result depends on the machine's load)")
    c.add_argument("--quantize", choices=("int8",), help="int8 weights and per-token int8 activations on the int8 "
                                                         "block-sparse kernel (default: float32)")
    c.add_argument("--token-pruning", choices=("cascade", "merge", "auto"),
                   help="also drop (cascade, CP-ViT) or merge (ToMe) patch tokens block by block; auto: cascade "
                        "only where the model allows it")
    c.add_argument("--patch-keep", type=float, help="with --token-pruning: share of patch tokens left after the "
                                                    f"last stage (default {DEFAULT_PATCH_KEEP:g}; with "
                                                    "--target-speedup or --power-keep chosen with the blocks)")
    c.add_argument("--head-keep", type=float, help="share of the attention heads kept (default 1.0: all); the "
                                                   "others leave qkv and proj, and proj is refitted")
    c.add_argument("--head-criterion", choices=HEAD_CRITERIA,
                   help="with --head-keep: which heads go — refit (default: those proj's refit makes good best, "
                        "allocated across blocks) or score (CP-ViT's attention score, the lowest in every block)")
    c.add_argument("--no-gptq", dest="gptq", action="store_false", default=None,
                   help="with --quantize: round weights to nearest instead of GPTQ's error compensation")
    c.add_argument("--calib", default="random:32", metavar="SPEC",
                   help="calibration images: an ImageFolder DIR, fashion-mnist[:N] or random:N (default random:32)")
    c.add_argument("--calib-images", type=int, default=256, help="images to take from a DIR or fashion-mnist")
    c.add_argument("--checkpoint", help="weights to load into the model (.pth, .pt, .safetensors state dict)")
    c.add_argument("--pretrained", action="store_true", help="load the model's published weights (needs network)")
    c.add_argument("--target", default="lpvit", choices=("lpvit", "portable"),
                   help="lpvit: our block-sparse op; portable: standard ONNX ops only")
    c.add_argument("--dump-dir", help="write a numbered dump after every pass (read it with `lpvit inspect`)")
    c.add_argument("--report", metavar="HTML", help="write the compile report as one HTML file")
    c.add_argument("--save", metavar="PT2", help="also save the compiled torch model (.pt2)")
    c.add_argument("--bench", action="store_true", help="time the exported model against the dense one, end to end "
                   "and per layer; the report shows measured next to predicted")
    c.add_argument("--batch", default="1,8", help="batch sizes for --bench (default 1,8)")
    c.add_argument("--repeats", type=int, default=5, help="timed runs per batch for --bench (median)")
    c.add_argument("--eval", metavar="DATA", help="top-1 of dense and compiled on an ImageFolder DIR or fashion-mnist")
    c.add_argument("--eval-images", type=int, default=1000, help="images to evaluate (default 1000)")
    _add_triton(c)
    c.set_defaults(handler=cmd_compile)

    b = sub.add_parser("bench", parents=[common], help="time an ONNX model, side by side with a dense one")
    b.add_argument("model", metavar="MODEL.onnx")
    b.add_argument("--dense", metavar="DENSE.onnx", help="the model to compare with (ratios dense / MODEL)")
    b.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default 1,8)")
    b.add_argument("--repeats", type=int, default=7, help="timed runs per batch (median)")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.set_defaults(handler=cmd_bench)

    e = sub.add_parser("eval", parents=[common], help="top-1 accuracy of an ONNX model")
    e.add_argument("model", metavar="MODEL.onnx")
    e.add_argument("--data", required=True, help="an ImageFolder DIR or fashion-mnist (its test split)")
    e.add_argument("--limit", type=int, help="evaluate the first N images")
    e.add_argument("--preprocess-as", metavar="TIMM_NAME",
                   help="preprocess as this timm model does (default: the config stored in the ONNX file)")
    e.set_defaults(handler=cmd_eval)

    i = sub.add_parser("inspect", parents=[common], help="summarise a compile's dump directory")
    i.add_argument("dump_dir", metavar="DUMP_DIR")
    i.set_defaults(handler=cmd_inspect)

    x = sub.add_parser("export", parents=[common], help="export a saved compiled model (.pt2) or package an ONNX one")
    x.add_argument("model", metavar="MODEL", help="a .pt2 written by `lpvit compile --save`, or an .onnx file")
    x.add_argument("--out", help="ONNX file to write (for a .pt2)")
    x.add_argument("--target", default="lpvit", choices=("lpvit", "portable"))
    _add_triton(x)
    x.set_defaults(handler=cmd_export)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    ui = Ui(args.quiet)
    try:
        return args.handler(args, ui)
    except LpvitError as e:
        if args.debug:
            raise
        print(f"lpvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lpvit {args.command}: interrupted", file=sys.stderr)
        return 130
