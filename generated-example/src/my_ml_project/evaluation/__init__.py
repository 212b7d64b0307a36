"""The ``evaluate`` stage (``evaluation.evaluate``, run by DVC): test metrics, plots, and the
promotion gate that moves ``champion``.
"""
