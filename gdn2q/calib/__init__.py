"""Calibration: run real text through the model (and its recurrence) and record what quantization needs."""

from gdn2q.calib.artifact import CalibrationData, load_calibration
from gdn2q.calib.run import CLIP_STATS, calibrate, calibrate_text

__all__ = ["CLIP_STATS", "CalibrationData", "calibrate", "calibrate_text", "load_calibration"]
