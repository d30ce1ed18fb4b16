"""Inference: the diffusers pipelines with the adapter, and the ``sg2img generate`` command."""
