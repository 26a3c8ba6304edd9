"""Inference pipelines: one per method, each in its own sub-package (``pipeline_<method>.py``)."""
