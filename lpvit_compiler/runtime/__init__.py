"""Runtime: the native kernel library, the torch op on it, the modules of a compiled graph, onnxruntime sessions."""
