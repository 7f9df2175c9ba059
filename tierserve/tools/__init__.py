"""Offline model tools: quantize a checkpoint, MoEfication, REAP pruning, calibration data."""
