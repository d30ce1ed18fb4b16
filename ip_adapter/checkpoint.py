"""The adapter file format: one owner for reading and writing it.

On disk an adapter is a *flat* safetensors file, in the layout of the official
``ip-adapter_sd15.safetensors``::

    image_proj.proj.weight, image_proj.norm.weight, ...          (the projection)
    ip_adapter.1.to_k_ip.weight, ip_adapter.1.to_v_ip.weight, ... (odd indices over the processors)
    <stream>_adapter.{i}.to_{k,v}_<stream>.weight, <other>.*     (extra branches, ignored by diffusers)

with the model configuration as JSON in the safetensors metadata. The official nested ``.bin``
(``{"image_proj": {...}, "ip_adapter": {...}}``) is read too, with ``torch.load(weights_only=True)``,
so a pickle that would run code is refused. Writes are atomic (``atomic_files``).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_files import atomic_write

CONFIG_KEY = "config"
FORMAT_KEY = "format"
FORMAT = "ip_adapter.flat/1"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the reason and the file named."""


@dataclass
class AdapterFile:
    tensors: dict[str, torch.Tensor]  # flat, prefixed names
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = "<memory>"

    @property
    def config(self) -> dict | None:
        raw = self.metadata.get(CONFIG_KEY)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"{self.path}: metadata field {CONFIG_KEY!r} is not valid JSON ({e})"
            ) from e

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix.`` with the prefix removed."""
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}

    def prefixes(self) -> set[str]:
        return {k.split(".", 1)[0] for k in self.tensors}


def flatten(nested: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{"image_proj": {"proj.weight": t}} -> {"image_proj.proj.weight": t}."""
    return {f"{section}.{k}": v for section, sub in nested.items() for k, v in sub.items()}


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read an adapter: flat ``.safetensors`` or the official nested ``.bin``/``.pt``/``.pth``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such adapter file")
    if p.suffix == ".safetensors":
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file (truncated or corrupt?): {e}") from e
        return AdapterFile(tensors, metadata, str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{p}: refused to load: the pickle holds more than plain tensors and could run code "
            f"(weights_only=True): {first}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable torch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: expected a dict of tensors, found {type(obj).__name__}")
    if all(isinstance(v, Mapping) for v in obj.values()):
        tensors = flatten(obj)
    else:
        tensors = dict(obj)
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p}: entries that are not tensors: {bad[:10]}")
    return AdapterFile(tensors, {}, str(p))


def read_formatted_file(path: str | os.PathLike, fmt: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file whose metadata ``format`` must be ``fmt``; one
    ``CheckpointError`` naming the file when it cannot be read or is of another format."""
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if meta.get("format") != fmt:
        raise CheckpointError(f"{p}: metadata 'format' is {meta.get('format')!r}, not {fmt!r}")
    return meta, tensors


def write_adapter_file(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a flat safetensors file atomically: nobody ever sees a half-written file."""
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ValueError(f"{p}: adapter files are written as .safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {FORMAT_KEY: FORMAT, **(metadata or {})}
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(p, lambda tmp: save_file(data, str(tmp), metadata=meta))
    return p


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    found: Mapping[str, torch.Tensor],
    source: str,
    what: str = "adapter",
) -> None:
    """Raise one ``CheckpointError`` listing every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(found)
        if tuple(found[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source}: does not match this {what}"]
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {x}" for x in shown)
    raise CheckpointError("\n".join(lines))
