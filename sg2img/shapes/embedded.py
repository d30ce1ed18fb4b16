"""The embedded default model: what ``sg2img generate`` and ``sg2img evaluate shapes`` use when no
``--model`` / ``--adapter`` is given, and what ``--model embedded`` names.

It is the shapes world's model (``sg2img.shapes.world``), trained with this package's own commands and
shipped in ``sg2img/assets/``: a pixel-space base at 32 px (``configs/experiments/shapes/base.yaml``) and
its decoupled graph adapter (``configs/experiments/shapes/graph_decoupled.yaml``). It needs no download
and draws in seconds on a CPU. How it was trained and how it scores: ``experiments/results/shapes.md``.
"""

from __future__ import annotations

from sg2img.base.components import ASSETS, EMBEDDED, EMBEDDED_BASE_FILE, Components, read_base_file

EMBEDDED_ADAPTER_FILE = ASSETS / "shapes-adapter.safetensors"
DESCRIPTION = (
    "embedded default: the shapes-world base (pixel space, 32 px) and its decoupled graph adapter "
    "(sg2img/assets)"
)


def embedded_base() -> Components:
    """The shipped base, float32, frozen."""
    return read_base_file(EMBEDDED_BASE_FILE)


__all__ = [
    "DESCRIPTION",
    "EMBEDDED",
    "EMBEDDED_ADAPTER_FILE",
    "EMBEDDED_BASE_FILE",
    "embedded_base",
]
