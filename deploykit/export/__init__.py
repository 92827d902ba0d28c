"""Export deployable engines: simplified ONNX, ONNX Runtime format and TensorRT engines, each verified against the
source model and measured on the device against its predicted latency."""
