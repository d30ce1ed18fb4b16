"""How the adapter's token streams reach the UNet: the injection strategies.

Each strategy takes the text embeddings and the named streams (``ip_adapter.Stream``: tokens, padding mask,
regions) of the same UNet rows and returns the conditioning keyword arguments of ``unet(x, t, **kwargs)``.
Training and the pipeline call it alike, so neither branches on the kind:

- ``Decoupled`` (IP-Adapter): each stream goes through its own K/V beside the text and has its own scale
  (``cross_attention_kwargs={"streams": ...}``, read by ``ip_adapter.attention``). A stream left out
  contributes nothing, so a branch that is not used is not given.
- ``Concat`` (the "simple adapter" ablation): the streams' tokens are appended to the text tokens and go
  through the UNet's frozen K/V, with the padding in ``encoder_attention_mask``. It was trained with every
  stream in the sequence, so a branch that is not used stands as its negative; a scale is 0 (the negative)
  or 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ip_adapter import Stream
from ip_adapter.attention import DecoupledAttention, Scale


class Injection(ABC):
    """One way of feeding streams to the UNet (see the module doc)."""

    name: ClassVar[str]
    every_stream: ClassVar[bool]  # True: every branch is always given (an unused one as its negative)
    has_attention: ClassVar[bool]  # True: the streams have their own attention processors (and scales)

    @abstractmethod
    def unet_kwargs(self, text: torch.Tensor, streams: Mapping[str, Stream]) -> dict[str, Any]:
        """The UNet's conditioning arguments for ``text`` (B, T, C) and ``streams`` of the same B rows."""

    @abstractmethod
    def set_scales(self, attention: DecoupledAttention | None, scales: Mapping[str, Scale]) -> None:
        """Apply the branch scales (per stream name) for the next calls."""


class Decoupled(Injection):
    name = "decoupled"
    every_stream = False
    has_attention = True

    def unet_kwargs(self, text: torch.Tensor, streams: Mapping[str, Stream]) -> dict[str, Any]:
        return {"encoder_hidden_states": text, "cross_attention_kwargs": {"streams": dict(streams)}}

    def set_scales(self, attention: DecoupledAttention | None, scales: Mapping[str, Scale]) -> None:
        for stream, scale in scales.items():
            attention.set_scale(scale, stream)


class Concat(Injection):
    name = "concat"
    every_stream = True
    has_attention = False

    def unet_kwargs(self, text: torch.Tensor, streams: Mapping[str, Stream]) -> dict[str, Any]:
        if not streams:
            return {"encoder_hidden_states": text}
        parts = [text]
        masks = [torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)]
        for stream in streams.values():
            parts.append(stream.tokens.to(text.dtype))
            masks.append(
                stream.mask
                if stream.mask is not None
                else torch.ones(stream.tokens.shape[:2], dtype=torch.bool, device=text.device)
            )
        return {"encoder_hidden_states": torch.cat(parts, 1), "encoder_attention_mask": torch.cat(masks, 1)}

    def set_scales(self, attention: DecoupledAttention | None, scales: Mapping[str, Scale]) -> None:
        for stream, scale in scales.items():
            if not (is_zero(scale) or scale == 1.0):
                raise ValueError(
                    f"the {stream!r} branch's scale must be 0 or 1 with the concat injection, got {scale!r}"
                )


INJECTIONS: dict[str, type[Injection]] = {cls.name: cls for cls in (Decoupled, Concat)}


def injection(name: str) -> Injection:
    """The strategy named by an adapter config's ``injection``."""
    if name not in INJECTIONS:
        raise ValueError(f"injection must be one of {sorted(INJECTIONS)}, got {name!r}")
    return INJECTIONS[name]()


def is_zero(scale: Scale) -> bool:
    """A scale that switches its branch off (a number 0; per-layer scales never do as a whole)."""
    return isinstance(scale, (int, float)) and float(scale) == 0.0
