"""Exporters: ONNX, Core ML and TensorRT artefacts written into one bundle."""
