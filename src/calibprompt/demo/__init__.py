"""Demonstrations that run offline on generated data (``calibprompt demo``)."""
