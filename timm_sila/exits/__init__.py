"""Sila branches as early exits: per-sample routing (`early_exit`), the exit test (`policy`), thresholds and
temperatures chosen on held-out logits (`calibration`), the measured sweep and its verdict (`curve`), and segment
MACs (`macs`)."""
