"""Errors a run reports in one message, without a traceback (``sg2img`` prints them and exits with 2)."""

from __future__ import annotations


class ConfigurationError(ValueError):
    """Settings that cannot work together (the graph branch on data without graphs, token widths that do not
    match the UNet, an image branch without an image encoder), found at start-up, before any training."""


class NonFiniteLossError(FloatingPointError):
    """A NaN or inf loss under ``model.nonfinite_loss: stop``: the run ends before the batch changes a weight,
    so the checkpoints and the exported file on disk are the last good ones."""
