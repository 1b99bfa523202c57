"""``lpvit compile``: compile a model, export it, and optionally bench, evaluate and report it."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..options import CompileOptions
from .loading import calibration_images, evaluation_loader, load_model
from .output import bench_table, check_writable, parse_batches, write_onnx, write_triton
from .ui import Ui


def compile_options(args) -> dict:
    """The keyword options of ``lpvit.compile`` the flags set (the rest keep the preset's or CompileOptions'
    defaults)."""
    tuning = dict(importance=args.importance, allocation=args.allocation, reconstruct=args.reconstruct,
                  gptq=args.gptq, block_recovery=args.block_recovery, recovery_tflops=args.recovery_tflops,
                  recovery_seconds=args.recovery_seconds, model_recovery_tflops=args.model_recovery_tflops,
                  token_pruning=args.token_pruning, patch_keep=args.patch_keep, head_keep=args.head_keep,
                  head_criterion=args.head_criterion)
    return dict(flops_keep=args.flops_keep, target_speedup=args.target_speedup, power_keep=args.power_keep,
                block_shape=args.block, preset=args.preset, prune_heads=args.prune_heads, verify=args.verify,
                quantize=args.quantize, **{name: value for name, value in tuning.items() if value is not None})


def cmd_compile(args, ui: Ui) -> int:
    import torch

    from .. import api
    from ..frontend.capture import capture
    from ..lowering.onnx_export import export_onnx
    from ..runtime.sessions import default_threads, ort_session
    from ..tools.bench import compare_sessions, measure_layers
    from ..tools.data import data_config_of
    from ..tools.evaluate import evaluate

    out = Path(args.out)
    if args.model and Path(args.model).resolve() == out.resolve():
        raise ConfigError(f"--out {out} is the input model; choose another output path")
    for path in (out, args.report, args.save, args.dump_dir and Path(args.dump_dir) / "report.json"):
        if path:
            check_writable(Path(path))  # before minutes of compiling, not after
    CompileOptions.build(args.hw, **compile_options(args))  # fail fast, before loading the model
    model, compiled = load_model(args.model, args.checkpoint, args.pretrained)
    data_config = compiled.plan.data_config if compiled is not None else (
        data_config_of(model) if hasattr(model, "pretrained_cfg") else None)
    if compiled is None:
        calib = calibration_images(args.calib, args.calib_images, model, data_config, ui)
        ui.note(f"compiling {args.model}: {len(calib)} calibration images, hw={args.hw}")
        compiled = api.compile(model, args.hw, calib=calib, dump_dir=args.dump_dir, progress=not ui.quiet,
                               data_config=data_config, **compile_options(args))
    else:
        ui.note(f"{args.model} is already compiled: exporting it")
    write_onnx(compiled, out, args.target, ui)
    threads = args.threads or default_threads()
    if args.bench:
        if model is None:
            raise ConfigError("--bench needs the dense model to compare with; pass the original model, not a "
                              "compiled .pt2 (or time two ONNX files with `lpvit bench`)")
        dense_path = out.with_name(out.stem + "-dense.onnx")
        with ui.status(f"exporting the dense model to {dense_path}"):
            # through the same lowering as the compiled model (captured: its attentions head-major too), so the
            # speedup is what pruning buys, not what the lowering does
            example = torch.zeros(2, *compiled.plan.input_shape)
            export_onnx(capture(model, example)[0], example, dense_path, args.target)
        dense = ort_session(dense_path, threads, args.target == "lpvit")
        ours = ort_session(out, threads, True)
        batches = parse_batches(args.batch)
        with ui.bar("bench: end to end", len(batches) * args.repeats) as advance:
            end_to_end = {**compare_sessions(dense, ours, batches, args.repeats, advance), "threads": threads}
        with ui.bar("bench: per layer", len(compiled.report.layers)) as advance:
            layers = measure_layers(compiled, threads, progress=advance)
        compiled.report = compiled.report.with_measurements(end_to_end=end_to_end, layers=layers)
        ui.out.print(bench_table(f"{args.model}: compiled vs dense", end_to_end, threads))
    if args.eval:
        loader = evaluation_loader(args.eval, data_config, compiled.plan.input_shape, args.eval_images)
        session = ort_session(out, threads, True)
        with ui.bar("eval: dense", len(loader.dataset)) as advance:
            dense_top1 = evaluate(model, loader, progress=advance) if model is not None else float("nan")
        with ui.bar("eval: compiled (onnxruntime)", len(loader.dataset)) as advance:
            compiled_top1 = evaluate(session, loader, progress=advance)
        compiled.report = compiled.report.with_measurements(accuracy={
            "data": args.eval, "images": len(loader.dataset), "dense": dense_top1, "compiled": compiled_top1})
    ui.out.print(compiled.report)
    if args.save:
        compiled.save(args.save)
    if args.dump_dir and (args.bench or args.eval):  # the compile wrote report.json; measurements go beside it
        (Path(args.dump_dir) / "measurements.json").write_text(
            json.dumps(compiled.report.to_dict()["measurements"], indent=2) + "\n")
    if args.report:
        ui.note(f"report: {compiled.report.to_html(args.report)}")
    if args.triton_repo:
        write_triton(out, args, ui)
    ui.note(f"wrote {out}")
    return 0
