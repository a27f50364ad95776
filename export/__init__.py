"""cmdeploy.export: checkpoint -> ONNX (plain, fused, FP16), TensorRT engines, Triton repos, parity checks."""
