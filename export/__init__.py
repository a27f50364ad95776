"""cmdeploy.export: checkpoint -> ONNX (plain, fused preprocessing, FP16), TensorRT engines, Triton repos, parity and verify."""
