"""Why benchmark sessions do not spin-wait: two onnxruntime sessions of the same dense layer (DeiT-S qkv, 8 images)
timed taking turns, with onnxruntime's intra-op spinning on (its default) and off (what ``ort_session`` sets).

    python benchmarks/spinning.py [--threads 2] [--repeats 15]

With spinning on, the idle worker of the session that just ran keeps a core busy while the other one runs.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from lpvit_compiler.lowering.layer_models import dense_layer_model
from lpvit_compiler.runtime.sessions import open_session, session_options
from lpvit_compiler.tools.timing import interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    model = dense_layer_model(torch.randn(1152, 384)).SerializeToString()
    feed = {"X": np.random.default_rng(0).standard_normal((8 * 197, 384), dtype=np.float32)}
    for spin in ("1", "0"):
        sessions = []
        for _ in range(2):
            options = session_options(False, intra_op_num_threads=args.threads, inter_op_num_threads=1)
            options.add_session_config_entry("session.intra_op.allow_spinning", spin)
            sessions.append(open_session(model, options))
        times = interleaved({f"session {i}": (lambda s=s: s.run(None, feed)) for i, s in enumerate(sessions)},
                            args.repeats)
        print(f"spinning {'on ' if spin == '1' else 'off'}: " +
              ", ".join(f"{name} {t * 1e3:.2f} ms" for name, t in times.items()) + " (median, taking turns)")


if __name__ == "__main__":
    main()
