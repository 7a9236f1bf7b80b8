"""Runtime backends. Each imports its runtime library lazily, inside its own module, so that
``import runtimes`` never requires onnxruntime, TensorRT or Core ML."""
