"""Methods on the backbone interface and cached features: zero-shot, CoOp-style prompt tuning."""
