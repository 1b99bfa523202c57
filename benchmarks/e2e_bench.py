"""End to end: a compiled timm DeiT in onnxruntime with our op vs the same dense model in onnxruntime.

For each model and flops_keep: compile (random weights; importance "magnitude" — the criterion changes which
blocks go, not how many, so speed does not depend on it), export with ai.lpvit::BlockSparseLinear, export the
dense original, and time side by side (interleaved, median of --repeats) at each batch size: the dense model
in standard ONNX ops (``target="portable"``, torch's own lowering), the same after onnxruntime's transformer
optimizer (``--model_type vit``), the dense model through our lowering (``target="lpvit"`` of the captured
model: GELU as onnxruntime's fused op, head-major attention with q, k, v and proj on the lpvit kernel at full
density), the compiled model, and the compiled model without epilogue fusion
(``fuse_epilogues=False``: the same blocks, GELU and residual adds left to onnxruntime). The speedup is
against the fastest of the three dense models, so what the lowering alone gains is not counted as pruning's.
Next to the ratios, onnxruntime's own profiler gives the time per op type of the models at the largest batch, so
anyone can see where the time goes.

The compiled models are exported with head-major attention (the default of ``export``: q, k, v written and the
attention's output read by their layers in the layout the matmuls use, no Transposes or Split);
``--transposed-attention`` also times each one exported with ``head_major_attention=False`` in the same runs.

``--int8`` adds onnxruntime's own dynamic int8 of the dense model (``quantize_dynamic``, QInt8 weights: the
one-line alternative a user has) and lpvit with ``quantize="int8"`` (GPTQ int8 weights, per-token int8
activations, the int8 block-sparse kernel); ``--no-unfused`` leaves out the unfused model.

    python benchmarks/e2e_bench.py [--models deit_small_patch16_224 deit_base_patch16_224]
                                   [--flops-keep 0.5 0.3] [--patch-keep 1.0 0.5] [--token-mode cascade]
                                   [--head-keep 1.0] [--no-reconstruct]
                                   [--batches 1 8] [--threads 2] [--repeats 9]
                                   [--int8] [--no-unfused] [--transposed-attention]
                                   [--baseline-library OLD.so]
                                   [--out benchmarks/results/e2e_bench]

``--patch-keep`` below 1 adds token pruning (``--token-mode``; every (flops_keep, patch_keep) pair is
compiled); ``--head-keep`` below 1 removes attention heads. ``--baseline-library``: another build of
liblpvit_kernels.so (say, of the commit before a kernel change) runs each compiled model in the same
interleaved runs, so a kernel change's end-to-end effect is measured side by side, not across runs.

Writes <out>.md and <out>.json. No session spin-waits after its run (``ort_session``), nor do torch's OpenMP
threads (OMP_WAIT_POLICY=PASSIVE), so the candidates taking turns do not slow each other down.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP threads

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from lpvit_compiler.runtime.sessions import ort_session
from lpvit_compiler.tools.bench import op_type_profile, ort_dynamic_int8
from lpvit_compiler.tools.timing import interleaved

import lpvit_compiler as lpvit
from lpvit_compiler.frontend.capture import capture as capture_graph
from lpvit_compiler.lowering.onnx_export import export_onnx

RESULTS = Path(__file__).parent / "results"
DENSE = ("dense_standard", "dense_ort_opt", "dense")  # the dense float32 baselines; the speedup is over the fastest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    parser.add_argument("--flops-keep", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--patch-keep", nargs="+", type=float, default=[1.0],
                        help="with a value below 1: token_pruning='cascade' at that patch_keep (1: no token pruning)")
    parser.add_argument("--head-keep", type=float, default=1.0, help="fraction of attention heads kept (head_keep)")
    parser.add_argument("--token-mode", choices=("cascade", "merge"), default="cascade",
                        help="token_pruning mode where patch_keep < 1")
    parser.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                        help="skip the refit (the speed does not depend on the weights' values; compiles faster)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--block", type=int, default=None, help="block edge (default: the hw profile's)")
    parser.add_argument("--hw", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--int8", action="store_true", help="add onnxruntime's dynamic int8 and lpvit int8")
    parser.add_argument("--no-unfused", dest="unfused", action="store_false", help="skip the unfused model")
    parser.add_argument("--transposed-attention", action="store_true",
                        help="also time the compiled model exported with its attention transposes kept")
    parser.add_argument("--baseline-library", type=Path,
                        help="another build of the kernel library, running the compiled models beside ours")
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_bench", help="results stem (.md, .json)")
    args = parser.parse_args(argv)
    if args.baseline_library is not None and not args.baseline_library.is_file():
        parser.error(f"--baseline-library {args.baseline_library}: no such file (give a built liblpvit_kernels.so)")
    import timm

    rows = []
    work = Path(tempfile.mkdtemp(prefix="lpvit-e2e-"))
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        example = torch.zeros(2, 3, 224, 224)
        standard_path = export_onnx(model, example, work / f"{name}-dense-standard.onnx", target="portable")
        dense_path = export_onnx(capture_graph(model, example)[0], example, work / f"{name}-dense.onnx")
        paths = {"dense_standard": standard_path, "dense_ort_opt": ort_optimized(standard_path, model),
                 "dense": dense_path}
        if args.int8:
            # onnxruntime's own int8 of the dense model in standard ops and GELU as its op (it cannot quantize ours)
            float_source = export_onnx(model, example, work / f"{name}-dense-float.onnx", head_major_attention=False)
            paths["dense_ort_int8"] = work / f"{name}-dense-int8.onnx"
            paths["dense_ort_int8"].write_bytes(ort_dynamic_int8(float_source))
        calib = torch.randn(16, 3, 224, 224)
        variants = {"lpvit": {}, **({"lpvit_unfused": {"fuse_epilogues": False}} if args.unfused else {}),
                    **({"lpvit_int8": {"quantize": "int8"}} if args.int8 else {})}
        for flops_keep, patch_keep in [(f, p) for p in args.patch_keep for f in args.flops_keep]:
            compiled = {}
            tokens = {"token_pruning": args.token_mode, "patch_keep": patch_keep} if patch_keep < 1 else {}
            tokens.update(head_keep=args.head_keep, reconstruct=args.reconstruct)
            for label, options in variants.items():
                compiled[label] = lpvit.compile(model, hw=args.hw, flops_keep=flops_keep, calib=calib,
                                                importance="magnitude", block_shape=args.block, progress=False,
                                                **tokens, **options)
                paths[label] = compiled[label].export(work / f"{name}-{flops_keep}-{patch_keep}-{label}.onnx")
            for label in variants if args.transposed_attention else ():  # the same models, transposes kept
                paths[f"{label}_transposed"] = compiled[label].export(
                    work / f"{name}-{flops_keep}-{patch_keep}-{label}-transposed.onnx", head_major_attention=False)
            sessions = {label: ort_session(str(path), args.threads, custom_ops=_custom_ops(label))
                        for label, path in paths.items()}
            if args.baseline_library is not None:  # every compiled model through the other build as well
                sessions.update({f"{label}_baseline_library": ort_session(str(paths[label]), args.threads,
                                                                          custom_ops=str(args.baseline_library))
                                 for label in variants})
            for batch in args.batches:
                feed = {"pixel_values": np.random.default_rng(0).standard_normal((batch, 3, 224, 224),
                                                                                dtype=np.float32)}
                images_differing = {}
                for label in variants:  # the exported model computes what torch's does
                    with torch.no_grad():
                        expected = compiled[label](torch.from_numpy(feed["pixel_values"])).numpy()
                    got = sessions[label].run(None, feed)[0]
                    if tokens.get("token_pruning") == "merge":
                        # a merge decision between near-equal similarities (common on random weights) can fall
                        # differently under the two runtimes' rounding: count the images it changed
                        scale = np.abs(expected).max(axis=1)
                        images_differing[label] = int((np.abs(got - expected).max(axis=1) > 1e-4 * scale).sum())
                    elif label == "lpvit_int8":
                        # onnxruntime's float ops round differently from torch's, which moves some activations
                        # across an int8 rounding step; on random weights that alone changes the output by ~3%
                        # (as much as scaling the input by 1 + 1e-6 does in torch)
                        assert np.linalg.norm(got - expected) <= 0.1 * np.linalg.norm(expected), label
                    else:
                        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max(), label
                times = interleaved({label: (lambda s=s: s.run(None, feed)) for label, s in sessions.items()},
                                    args.repeats)
                best_dense = min(times[label] for label in DENSE)
                report = compiled["lpvit"].report
                row = {"model": name, "flops_keep": flops_keep, "patch_keep": patch_keep, "head_keep": args.head_keep,
                       "token_mode": args.token_mode if patch_keep < 1 else None,
                       "block": list(report.layers[0].block_shape),
                       "model_flops_keep": report.summary["model_flops_keep"], "batch": batch,
                       "threads": args.threads, **{f"ms_{label}": t * 1e3 for label, t in times.items()},
                       **({"images_differing_from_torch": images_differing} if images_differing else {}),
                       "speedup": best_dense / times["lpvit"], "predicted_speedup": report.summary["predicted_speedup"],
                       **{f"speedup_{label[6:]}": best_dense / times[label] for label in variants if label != "lpvit"}}
                if args.baseline_library is not None:
                    row.update({f"vs_baseline_library{label[5:]}": times[f"{label}_baseline_library"] / times[label]
                                for label in variants})
                for label in variants if args.transposed_attention else ():
                    row[f"speedup{label[5:]}_transposed"] = best_dense / times[f"{label}_transposed"]
                    row[f"head_major_gain{label[5:]}"] = times[f"{label}_transposed"] / times[label]
                if args.int8:
                    row["speedup_ort_int8"] = best_dense / times["dense_ort_int8"]
                    row["int8_vs_ort_int8"] = times["dense_ort_int8"] / times["lpvit_int8"]
                if batch == max(args.batches):
                    row["profile_ms"] = {label: op_type_profile(str(path), feed, args.threads, _custom_ops(label))
                                         for label, path in paths.items() if label != "dense_ort_opt"}
                rows.append(row)
                print({k: v for k, v in row.items() if k != "profile_ms"}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"isa": lpvit.kernel_isa(), "threads": args.threads, "repeats": args.repeats, "hw_profile": args.hw}
    meta["int8_isa"] = lpvit.kernel_int8_isa()
    meta["baseline_library"] = None if args.baseline_library is None else str(args.baseline_library)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"onnxruntime {__import__('onnxruntime').__version__}, kernel ISA {meta['isa']} (int8: "
             f"{meta['int8_isa']}), {args.threads} threads, median of {args.repeats} interleaved runs; random "
             "weights.", "",
             "Speedups are over the fastest dense float32 model (standard ONNX ops as torch lowers them, the same "
             "after onnxruntime's transformer optimizer, or through our lowering: GELU as onnxruntime's op, attention "
             "head-major). "
             "unfused: the compiled model without epilogue fusion; transposed: the compiled model exported "
             "with its attention transposes (head_major_attention=False); ORT int8: onnxruntime's "
             "quantize_dynamic of the dense model; lpvit int8: quantize='int8'.", ""]
    columns = [("dense standard ms", "ms_dense_standard", "{:.1f}"),
               ("dense ORT-opt ms", "ms_dense_ort_opt", "{:.1f}"), ("dense ms", "ms_dense", "{:.1f}"),
               ("lpvit unfused ms", "ms_lpvit_unfused", "{:.1f}"),
               ("lpvit transposed ms", "ms_lpvit_transposed", "{:.1f}"), ("lpvit ms", "ms_lpvit", "{:.1f}"),
               ("ORT int8 ms", "ms_dense_ort_int8", "{:.1f}"), ("lpvit int8 ms", "ms_lpvit_int8", "{:.1f}"),
               ("speedup unfused", "speedup_unfused", "{:.2f}x"), ("speedup transposed", "speedup_transposed",
                                                                   "{:.2f}x"),
               ("head-major / transposed", "head_major_gain", "{:.2f}x"), ("**speedup**", "speedup", "**{:.2f}x**"),
               ("ORT int8 speedup", "speedup_ort_int8", "{:.2f}x"), ("**lpvit int8 speedup**", "speedup_int8",
                                                                    "**{:.2f}x**"),
               ("lpvit int8 / ORT int8", "int8_vs_ort_int8", "{:.2f}x"),
               ("lpvit int8 transposed ms", "ms_lpvit_int8_transposed", "{:.1f}"),
               ("int8 head-major / transposed", "head_major_gain_int8", "{:.2f}x"),
               ("lpvit, baseline library ms", "ms_lpvit_baseline_library", "{:.1f}"),
               ("baseline library / ours", "vs_baseline_library", "{:.2f}x"),
               ("lpvit unfused, baseline library / ours", "vs_baseline_library_unfused", "{:.2f}x"),
               ("lpvit int8, baseline library ms", "ms_lpvit_int8_baseline_library", "{:.1f}"),
               ("lpvit int8, baseline library / ours", "vs_baseline_library_int8", "{:.2f}x")]
    columns = [c for c in columns if any(c[1] in r for r in rows)]
    lines += ["| model | flops_keep (linears) | patch_keep | model FLOPs kept | block | batch | " +
              " | ".join(c[0] for c in columns) + " |", "|---" * (6 + len(columns)) + "|"]
    for r in rows:
        tokens = f"{r['patch_keep']} ({r['token_mode']})" if r.get("token_mode") else r["patch_keep"]
        lines.append(f"| {r['model']} | {r['flops_keep']} | {tokens} | {r['model_flops_keep']:.3f} | "
                     f"{r['block'][0]}x{r['block'][1]} | {r['batch']} | " +
                     " | ".join(fmt.format(r[key]) for _, key, fmt in columns) + " |")
    if meta["baseline_library"]:
        lines += ["", f"baseline library: `{meta['baseline_library']}`, the same compiled models through another "
                  "build of the kernel library in the same interleaved runs (its time / ours)."]
    for r in rows:
        if "profile_ms" in r:
            lines += ["", *profile_table(r)]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _custom_ops(label: str) -> bool:
    """Whether the model runs lpvit's op: every compiled one, and the dense one through our lowering."""
    return label.startswith("lpvit") or label == "dense"


def profile_table(row: dict) -> list[str]:
    """Markdown: ms per run by op type, dense vs compiled (onnxruntime's profiler, summed kernel time)."""
    profiles = row["profile_ms"]
    lines = [f"Where the time goes: {row['model']}, flops_keep {row['flops_keep']}, batch {row['batch']} "
             "(onnxruntime profiler, ms per run, summed kernel time)", "",
             "| op type | " + " | ".join(f"{label} ms" for label in profiles) + " |",
             "|---" * (len(profiles) + 1) + "|"]
    for op in sorted(set().union(*profiles.values()), key=lambda o: -max(p.get(o, 0) for p in profiles.values())):
        if max(p.get(op, 0) for p in profiles.values()) >= 0.1:
            lines.append(f"| {op} | " + " | ".join(f"{p.get(op, 0):.1f}" for p in profiles.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"{sum(p.values()):.1f}" for p in profiles.values()) + " |")
    return lines


def ort_optimized(dense_path: Path, model) -> Path:
    """The dense model after onnxruntime's transformer optimizer for ViT (attention, GELU, LayerNorm fusions)."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(dense_path), model_type="vit", num_heads=model.blocks[0].attn.num_heads,
                               hidden_size=model.embed_dim, opt_level=0)
    path = dense_path.with_name(dense_path.stem + "-ort-opt.onnx")
    optimized.save_model_to_file(str(path))
    return path


if __name__ == "__main__":
    main()
