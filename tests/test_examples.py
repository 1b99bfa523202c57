"""The C++ deployment example compiles against onnxruntime's C++ API (syntax and types; no link here)."""

import os
import shutil
import subprocess
from pathlib import Path


from conftest import require_or_skip

EXAMPLE = Path(__file__).parent.parent / "examples" / "run_model.cc"


def _onnxruntime_headers():
    candidates = [os.environ.get("ONNXRUNTIME_INCLUDE_DIR"), "/usr/include/onnxruntime",
                  *sorted(str(p) for p in (Path.home() / ".cache" / "lpvit-compiler").glob(
                      "onnxruntime-*/usr/include/onnxruntime"))]
    return next((c for c in candidates if c and (Path(c) / "onnxruntime_cxx_api.h").is_file()), None)


def test_cpp_example_compiles():
    headers, compiler = _onnxruntime_headers(), shutil.which("g++")
    if headers is None or compiler is None:
        require_or_skip("g++ or onnxruntime's C++ headers are missing",
                        "apt-get install g++; the kernel build puts the headers in ~/.cache/lpvit-compiler")
    done = subprocess.run([compiler, "-std=c++17", "-fsyntax-only", f"-I{headers}", str(EXAMPLE)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
