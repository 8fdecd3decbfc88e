"""ONNX export of the GDN-2 decode step, its onnxruntime quantization, a torch-free runner and a verifier.

Import the submodules directly: :mod:`gdn2q.export.runner` needs only numpy, onnxruntime and tokenizers;
:mod:`gdn2q.export.exporter` and :mod:`gdn2q.export.verify` need torch and the PyTorch model.
"""
