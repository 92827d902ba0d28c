"""Export deployable engines: simplified ONNX, ONNX Runtime format and TensorRT engines, each verified against the
source model and measured on the device against its predicted latency."""

from .pipeline import ExportResult, export_model
from .verify import THRESHOLDS, Verification, compare

__all__ = ["export_model", "ExportResult", "compare", "Verification", "THRESHOLDS"]
