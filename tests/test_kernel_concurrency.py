"""One onnxruntime session run from many threads at once: each caller gets its own correct answer.

Regression test for a reproduced crash: the op cached packed weights keyed on the input buffers' addresses and
used them after releasing its lock, so with weights fed as graph inputs one ``Run`` freed the packed weights
another was reading (SIGSEGV), and a buffer reused at the same address with new contents reused stale weights.
Runs in a subprocess so a crash fails the test instead of killing the test run.
"""

import subprocess
import sys
import textwrap

CONCURRENT_RUNS = textwrap.dedent("""
    import threading
    import numpy as np, onnx, torch
    import lpvit_compiler as lpvit
    from lpvit_compiler.blocks import BlockGrid
    from lpvit_compiler.lowering.onnx_export import single_layer_model
    from lpvit_compiler.runtime.modules import BlockSparseLinear

    WEIGHTS_AS_INPUTS = {weights_as_inputs}
    N, K, BLOCK, THREADS, ROUNDS = 96, 80, (16, 16), 8, 60

    def layer(seed):
        g = torch.Generator().manual_seed(seed)
        grid = BlockGrid(N, K, BLOCK)
        mask = grid.expand(torch.rand(grid.block_rows, grid.block_cols, generator=g) < 0.3 + 0.1 * (seed % 5))
        return BlockSparseLinear.from_masked_weight(torch.randn(N, K, generator=g), torch.randn(N, generator=g),
                                                    mask, BLOCK)

    model = single_layer_model(layer(0))
    if WEIGHTS_AS_INPUTS:  # every BSR buffer becomes a graph input, fed per call
        for init in list(model.graph.initializer):
            shape = ["nnz" if d == 0 and init.name != "row_ptr" and init.name != "bias" else int(n)
                     for d, n in enumerate(init.dims)]
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, shape))
        del model.graph.initializer[:]
    session = lpvit.InferenceSession(model.SerializeToString(), intra_op_num_threads=2)

    failures = []
    def worker(thread):
        rng = np.random.default_rng(thread)
        mine = layer(thread if WEIGHTS_AS_INPUTS else 0)
        feeds = {{"row_ptr": mine.row_ptr.numpy(), "col_idx": mine.col_idx.numpy(), "values": mine.values.numpy(),
                 "bias": mine.bias.numpy()}} if WEIGHTS_AS_INPUTS else {{}}
        dense, bias = mine.to_dense().numpy(), mine.bias.numpy()
        for _ in range(ROUNDS):
            x = rng.standard_normal((int(rng.integers(1, 70)), K), dtype=np.float32)
            # fresh copies: buffers may be reused at the same address with other contents
            y = session.run(None, {{"X": x, **{{k: v.copy() for k, v in feeds.items()}}}})[0]
            if not np.allclose(y, x @ dense.T + bias, rtol=1e-4, atol=1e-4):
                failures.append(thread)
                return

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not failures, f"threads with wrong results: {{failures}}"
    print("ok")
""")


def _run(weights_as_inputs: bool) -> None:
    result = subprocess.run([sys.executable, "-c", CONCURRENT_RUNS.format(weights_as_inputs=weights_as_inputs)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", \
        f"exit code {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"


def test_eight_threads_on_one_session_with_weights_fed_as_inputs():
    _run(weights_as_inputs=True)


def test_eight_threads_on_one_session_with_constant_weights():
    _run(weights_as_inputs=False)
