"""The ``lpvit`` command: compile, bench, eval, inspect, export.

    lpvit compile deit_small_patch16_224 --hw cpu --flops-keep 0.5 --out deit_s.onnx --report report.html --bench
    lpvit bench deit_s.onnx --dense deit_s-dense.onnx --batch 1,8
    lpvit eval deit_s.onnx --data imagenet/val
    lpvit inspect dumps/
    lpvit export model.pt2 --out model.onnx --triton-repo triton/

User mistakes print one line (``lpvit <command>: error: ...``) and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import CalibrationError, ConfigError, LpvitError, ModelFileError, first_line

DEFAULT_MODEL = "deit_small_patch16_224"


class Ui:
    """Where output goes: results to stdout, progress and notes to stderr, nothing but errors with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.out = Console(quiet=quiet, width=200)
        self.err = Console(stderr=True, quiet=quiet)

    def note(self, text: str) -> None:
        self.err.print(text, highlight=False)

    @contextmanager
    def bar(self, description: str, total: int):
        """A progress bar; yields a callable that advances it (by 1 or by n)."""
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.err, disable=self.quiet, transient=False) as progress:
            task = progress.add_task(description, total=total)
            yield lambda n=1: progress.advance(task, n)

    @contextmanager
    def status(self, text: str):
        if self.quiet:
            yield
        else:
            with self.err.status(text):
                yield
            self.note(f"{text} done")


# --- models -------------------------------------------------------------------------------------------------

def load_model(spec: str, checkpoint: str | None = None, pretrained: bool = False):
    """(model, compiled) from MODEL: a saved .pt2 (compiled → (None, CompiledModel); plain torch.export →
    its module), ``package.module:factory`` (called with no arguments), or a timm model name."""
    import torch

    from ..compiled import load

    path = Path(spec)
    if path.suffix == ".onnx":
        raise ConfigError(f"{spec} is an ONNX file; compile takes a torch model (a timm name, "
                          "package.module:factory or a .pt2 file). Time an ONNX file with `lpvit bench`")
    if path.suffix in (".pt2", ".pt", ".pth") or os.sep in spec:
        if not path.is_file():
            raise ModelFileError(f"no model file at {spec}")
        if path.suffix != ".pt2":
            raise ConfigError(f"{spec}: a weights file is not a model; pass the model (timm name or "
                              f"package.module:factory) and give the weights with --checkpoint {spec}")
        try:
            return None, load(path)
        except ModelFileError as e:
            if "not an lpvit-compiler model" not in str(e):
                raise
        model = torch.export.load(path).module()
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        model = _from_timm(spec, pretrained)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, spec)
    return model.eval(), None


def _from_factory(spec: str):
    from torch import nn

    module_name, _, factory_name = spec.partition(":")
    if str(Path.cwd()) not in sys.path:  # like `python -m`, so project-local modules resolve
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"cannot import {module_name!r} for model {spec!r}: {e}") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"module {module_name!r} has no callable {factory_name!r} (model {spec!r})")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def _from_timm(name: str, pretrained: bool):
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}: give a timm model name (timm.list_models('*vit*')), "
                          "package.module:factory, or a .pt2 file")
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as e:  # hub errors come in many types (HTTP, offline mode, OS)
        if not pretrained:
            raise
        raise ConfigError(f"could not fetch the pretrained weights of {name!r} ({first_line(e)}); without network "
                          "access, download them elsewhere and pass --checkpoint PATH instead of --pretrained") from None


def _load_checkpoint(model, checkpoint: str, spec: str) -> None:
    from timm.models import load_checkpoint

    if not Path(checkpoint).is_file():
        raise ModelFileError(f"checkpoint not found: {checkpoint}")
    try:
        load_checkpoint(model, checkpoint, strict=True, weights_only=True)
    except Exception as e:  # unpickling, safetensors and key-mismatch errors have no common type
        raise ModelFileError(f"checkpoint {checkpoint} does not load into {spec}: {first_line(e)[:300]}") from None


# --- data ---------------------------------------------------------------------------------------------------

def _input_shape(model, data_config: dict | None) -> tuple[int, ...]:
    if data_config is not None:
        return tuple(data_config["input_size"])
    from ..frontend.calibration import expected_input_shape

    shape = expected_input_shape(model)
    try:
        return tuple(int(v) for v in shape.strip("[]").split(", ")[1:])
    except ValueError:
        raise ConfigError(f"cannot tell the input size of this model ({shape}); use --calib DIR or fashion-mnist "
                          "rather than random images") from None


def calibration_images(spec: str, count: int, model, data_config: dict | None, ui: Ui):
    """Calibration images [N, C, H, W] from ``random:N``, ``fashion-mnist[:N]`` or an ImageFolder DIR."""
    import torch

    from ..tools.data import fashion_mnist, image_folder

    name, _, n = spec.partition(":")
    if name in ("random", "fashion-mnist") and n:
        if not n.isdigit() or int(n) < 1:
            raise CalibrationError(f"--calib {spec}: the count after ':' must be a positive integer")
        count = int(n)
    if name == "random":
        generator = torch.Generator().manual_seed(0)
        return torch.randn(count, *_input_shape(model, data_config), generator=generator)
    if name == "fashion-mnist":
        return fashion_mnist("train").tensors[0][:count]
    if data_config is None:
        raise CalibrationError("this model has no timm data config to preprocess images with; use --calib "
                               "random:N or fashion-mnist, or pass preprocessed tensors through the Python API")
    loader = image_folder(spec, data_config, limit=count)
    images = []
    with ui.bar("reading calibration images", len(loader.dataset)) as advance:
        for batch, _ in loader:
            images.append(batch)
            advance(len(batch))
    if not images:
        raise CalibrationError(f"{spec} holds no images")
    return torch.cat(images)


def evaluation_loader(spec: str, data_config: dict | None, limit: int | None, batch_size: int = 64):
    from torch.utils.data import DataLoader, Subset

    from ..tools.data import fashion_mnist, image_folder

    if spec == "fashion-mnist":
        dataset = fashion_mnist("test")
        return DataLoader(Subset(dataset, range(min(limit or len(dataset), len(dataset)))), batch_size=batch_size)
    if data_config is None:
        raise ConfigError("the model does not say how to preprocess images (no timm data config in the ONNX "
                          "metadata); pass --model NAME to take the preprocessing of that timm model")
    return image_folder(spec, data_config, batch_size=batch_size, limit=limit)


# --- subcommands --------------------------------------------------------------------------------------------

def _batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        raise ConfigError(f"--batch must be comma-separated positive integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batch must be comma-separated positive integers, got {text!r}")
    return batches


def _write_onnx(compiled, path: Path, target: str, ui: Ui) -> Path:
    """Export atomically (temp file, then rename), so a failed export never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with ui.status(f"exporting ONNX ({target}) to {path}"):
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            os.replace(compiled.export(Path(tmp) / path.name, target=target), path)
    return path


def _bench_table(title: str, results: dict, threads: int) -> Table:
    table = Table(title=f"{title} — onnxruntime, {threads} threads, median of {results['repeats']} interleaved runs")
    for column in ("batch", "dense ms", "compiled ms", "compiled images/s", "speedup"):
        table.add_column(column, justify="right")
    for batch, r in results["batches"].items():
        table.add_row(batch, f"{r['dense_ms']:.2f}", f"{r['compiled_ms']:.2f}",
                      f"{int(batch) / r['compiled_ms'] * 1e3:.1f}", f"{r['speedup']:.2f}x")
    return table


def cmd_compile(args, ui: Ui) -> int:
    import torch

    from .. import api
    from ..runtime.sessions import default_threads, ort_session
    from ..tools.bench import compare_sessions, measure_layers
    from ..tools.data import data_config_of
    from ..tools.evaluate import evaluate
    from ..lowering.onnx_export import export_onnx

    out = Path(args.out)
    if args.model and Path(args.model).resolve() == out.resolve():
        raise ConfigError(f"--out {out} is the input model; choose another output path")
    api.make_options(args.hw, args.flops_keep, args.target_speedup, args.power_keep, args.block, args.importance,
                     0.05, 0.0, "energy", 1e-7, args.prune_heads, None, 32)  # fail fast, before loading the model
    model, compiled = load_model(args.model, args.checkpoint, args.pretrained)
    data_config = compiled.plan.data_config if compiled is not None else (
        data_config_of(model) if hasattr(model, "pretrained_cfg") else None)
    if compiled is None:
        calib = calibration_images(args.calib, args.calib_images, model, data_config, ui)
        ui.note(f"compiling {args.model}: {len(calib)} calibration images, hw={args.hw}")
        compiled = api.compile(model, args.hw, calib=calib, flops_keep=args.flops_keep,
                               target_speedup=args.target_speedup, power_keep=args.power_keep, block_shape=args.block,
                               importance=args.importance, prune_heads=args.prune_heads, dump_dir=args.dump_dir,
                               reconstruct=args.reconstruct,
                               progress=not ui.quiet, data_config=data_config)
    else:
        ui.note(f"{args.model} is already compiled: exporting it")
    _write_onnx(compiled, out, args.target, ui)
    threads = args.threads or default_threads()
    if args.bench:
        if model is None:
            raise ConfigError("--bench needs the dense model to compare with; pass the original model, not a "
                              "compiled .pt2 (or time two ONNX files with `lpvit bench`)")
        dense_path = out.with_name(out.stem + "-dense.onnx")
        with ui.status(f"exporting the dense model to {dense_path}"):
            export_onnx(model, torch.zeros(2, *compiled.plan.input_shape), dense_path)
        dense, ours = ort_session(dense_path, threads, False), ort_session(out, threads, True)
        batches = _batches(args.batch)
        with ui.bar("bench: end to end", len(batches) * args.repeats) as advance:
            compiled.report.measured = {**compare_sessions(dense, ours, batches, args.repeats, advance),
                                        "threads": threads}
        with ui.bar("bench: per layer", len(compiled.report.layers)) as advance:
            measure_layers(compiled, threads, progress=advance)
        ui.out.print(_bench_table(f"{args.model}: compiled vs dense", compiled.report.measured, threads))
    if args.eval:
        loader = evaluation_loader(args.eval, data_config, args.eval_images)
        session = ort_session(out, threads, True)
        with ui.bar("eval: dense", len(loader.dataset)) as advance:
            dense_top1 = evaluate(model, loader, progress=advance) if model is not None else float("nan")
        with ui.bar("eval: compiled (onnxruntime)", len(loader.dataset)) as advance:
            compiled_top1 = evaluate(session, loader, progress=advance)
        compiled.report.accuracy = {"data": args.eval, "images": len(loader.dataset), "dense": dense_top1,
                                    "compiled": compiled_top1}
    ui.out.print(compiled.report)
    if args.save:
        compiled.save(args.save)
    if args.dump_dir:
        compiled.report.to_json(Path(args.dump_dir) / "report.json")
    if args.report:
        ui.note(f"report: {compiled.report.to_html(args.report)}")
    if args.triton_repo:
        _triton(out, args, ui)
    ui.note(f"wrote {out}")
    return 0


def _triton(onnx_path: Path, args, ui: Ui) -> None:
    from ..lowering.triton import write_triton_repo

    config = write_triton_repo(onnx_path, args.triton_repo, args.triton_name, mount=args.triton_mount)
    ui.note(f"Triton model repository: {config.parent} (config {config})")


def cmd_bench(args, ui: Ui) -> int:
    from ..runtime.sessions import default_threads, ort_session
    from ..tools.bench import compare_sessions, image_feed, interleaved

    threads = args.threads or default_threads()
    batches = _batches(args.batch)
    session = ort_session(args.model, threads, True)
    if args.dense:
        dense = ort_session(args.dense, threads, True)
        with ui.bar("bench", len(batches) * args.repeats) as advance:
            results = {**compare_sessions(dense, session, batches, args.repeats, advance), "threads": threads}
        ui.out.print(_bench_table(f"{args.model} vs {args.dense}", results, threads))
    else:
        results = {"batches": {}, "repeats": args.repeats, "threads": threads}
        with ui.bar("bench", len(batches) * args.repeats) as advance:
            for batch in batches:
                feed = image_feed(session, batch)
                seconds = interleaved({"model": lambda: session.run(None, feed)}, args.repeats, progress=advance)
                results["batches"][str(batch)] = {"ms": seconds["model"] * 1e3}
        table = Table(title=f"{args.model} — onnxruntime, {threads} threads, median of {args.repeats} runs")
        for column in ("batch", "ms", "images/s"):
            table.add_column(column, justify="right")
        for batch, r in results["batches"].items():
            table.add_row(batch, f"{r['ms']:.2f}", f"{int(batch) / r['ms'] * 1e3:.1f}")
        ui.out.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cmd_eval(args, ui: Ui) -> int:
    import onnx

    from ..runtime.sessions import default_threads, ort_session
    from ..tools.data import data_config_of
    from ..tools.evaluate import evaluate
    from ..lowering.onnx_export import DATA_CONFIG_KEY

    session = ort_session(args.model, args.threads or default_threads(), True)
    if args.preprocess_as:
        data_config = data_config_of(_from_timm(args.preprocess_as, pretrained=False))
    else:
        props = {p.key: p.value for p in onnx.load(args.model, load_external_data=False).metadata_props}
        data_config = json.loads(props[DATA_CONFIG_KEY]) if DATA_CONFIG_KEY in props else None
    loader = evaluation_loader(args.data, data_config, args.limit)
    with ui.bar("eval", len(loader.dataset)) as advance:
        top1 = evaluate(session, loader, progress=advance)
    ui.out.print(f"top-1 {top1:.4f} on {len(loader.dataset)} images of {args.data}")
    return 0


def cmd_inspect(args, ui: Ui) -> int:
    from ..report import Report

    folder = Path(args.dump_dir)
    passes_file = folder / "passes.json"
    if not passes_file.is_file():
        raise ConfigError(f"{folder} is not a compile dump (no passes.json): pass the --dump-dir of a compile")
    try:
        passes = json.loads(passes_file.read_text())
        report = Report.from_dict(json.loads((folder / "report.json").read_text())) \
            if (folder / "report.json").is_file() else None
    except (ValueError, TypeError, KeyError) as e:
        raise ModelFileError(f"{folder}: passes.json or report.json is corrupt ({e})") from None
    table = Table(title=f"passes of the compile dumped in {folder}")
    for column in ("#", "pass", "seconds", "modified", "dump"):
        table.add_column(column, justify="left" if column in ("pass", "dump") else "right")
    for index, p in enumerate(passes):
        table.add_row(str(index), p["pass"], f"{p['seconds']:.2f}", str(p["modified"]), str(p.get("dump")))
    ui.out.print(table)
    if report is None:
        ui.out.print(f"no report.json in {folder}: the compile stopped after pass '{passes[-1]['pass']}'")
        return 0
    ui.out.print(report)
    return 0


def cmd_export(args, ui: Ui) -> int:
    path = Path(args.model)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ModelFileError(f"no ONNX model at {path}")
        onnx_path = path
    else:
        from ..compiled import load

        compiled = load(path)
        if not args.out:
            raise ConfigError("--out model.onnx is required to export a .pt2 model")
        onnx_path = _write_onnx(compiled, Path(args.out), args.target, ui)
    if args.triton_repo:
        _triton(onnx_path, args, ui)
    elif onnx_path == path:
        raise ConfigError(f"{path} is already ONNX: give --triton-repo DIR to make a Triton repository of it")
    return 0


# --- parser -------------------------------------------------------------------------------------------------

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
    c.add_argument("--hw", default="cpu", help="hardware profile: cpu, native, cpu-avx2, cpu-avx512, a100, h100")
    budget = c.add_mutually_exclusive_group()
    budget.add_argument("--flops-keep", type=float, help="fraction of the prunable linears' FLOPs to keep "
                        "(default 0.5)")
    budget.add_argument("--target-speedup", type=float, help="predicted speedup of the whole model on --hw")
    budget.add_argument("--power-keep", type=float, help="fraction of the prunable linears' predicted power to keep")
    c.add_argument("--block", help="block shape RxC (default: the hardware profile's)")
    c.add_argument("--importance", default="obs", help="obs (default), taylor (LPViT), hessian or magnitude")
    c.add_argument("--prune-heads", action="store_true", help="also prune classifier heads")
    c.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                   help="keep the surviving weights as trained (default: refit them to the dense outputs)")
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


if __name__ == "__main__":
    sys.exit(main())
