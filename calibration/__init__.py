"""INT8 for cmdeploy: real-slice calibration data, QDQ quantization (CPU / TensorRT) and the accuracy gate."""

from cmdeploy.calibration.gate import CalibrationResult, GateReport, calibrate_model, evaluate_dice
from cmdeploy.calibration.quantize import (
    METHODS,
    TARGETS,
    RangeCache,
    Recipe,
    calibrate_ranges,
    prepare,
    quantize,
    trt_calibration_cache,
    write_trt_calibration_cache,
)
from cmdeploy.calibration.reader import SliceCalibrationReader
from cmdeploy.calibration.slices import DataSplit, SliceObject, load_split, sample_objects

__all__ = [
    "METHODS",
    "TARGETS",
    "CalibrationResult",
    "DataSplit",
    "GateReport",
    "RangeCache",
    "Recipe",
    "SliceCalibrationReader",
    "SliceObject",
    "calibrate_model",
    "calibrate_ranges",
    "evaluate_dice",
    "load_split",
    "prepare",
    "quantize",
    "sample_objects",
    "trt_calibration_cache",
    "write_trt_calibration_cache",
]
