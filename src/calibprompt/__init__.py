"""calibprompt: calibration-aware prompt tuning for medical vision-language models."""

__version__ = "0.1.0"
