"""Lowering: the compiled graph to ONNX (``onnx_export.py``) and to a Triton model repository (``triton.py``)."""
