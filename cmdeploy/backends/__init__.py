"""Inference back ends: one module per engine (onnxruntime, TensorRT), imported lazily."""
