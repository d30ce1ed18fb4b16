"""Adapter folders and hub repositories, in the conventions of diffusers' ``load_ip_adapter(repo, subfolder,
weight_name)``: ``save_pretrained(folder)`` writes the adapter file, a ``config.json`` and a model card
(``README.md``: what it was trained on, the base it expects, its scores); ``from_pretrained(source)`` takes
a file, a folder or a hub repo id (through ``huggingface_hub``, which honours ``HF_HUB_OFFLINE`` and the
cache)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic_files import atomic_write
from .checkpoint import CheckpointError, read_adapter_file

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"


def resolve_adapter_file(
    source: str | Path, weight_name: str = WEIGHTS_NAME, subfolder: str | None = None, **hub_kwargs: Any
) -> Path:
    """The adapter file ``source`` names: a file, a folder holding ``weight_name`` (under ``subfolder``),
    or a hub repo id (downloaded, or read from the cache, by ``huggingface_hub.hf_hub_download``)."""
    path = Path(source)
    if path.is_file():
        return path
    folder = path / subfolder if subfolder else path
    if folder.is_dir():
        found = folder / weight_name
        if not found.is_file():
            files = sorted(p.name for p in folder.iterdir())[:8]
            raise CheckpointError(
                f"{folder}: no {weight_name} in this folder (it holds {files}); pass weight_name"
            )
        return found
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(source), weight_name, subfolder=subfolder, **hub_kwargs))
    except Exception as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{source}: not a file or folder here, and the hub did not give {subfolder + '/' if subfolder else ''}"
            f"{weight_name} ({type(e).__name__}: {cause})"
        ) from None


def model_card(config: Mapping[str, Any], card: Mapping[str, Any]) -> str:
    """A model card in the hub's format: YAML front matter, then what the adapter is and how to load it."""
    base = card.get("base") or "not recorded"
    lines = [
        "---",
        "library_name: sg2img",
        "tags: [ip-adapter, scene-graph, stable-diffusion, adapter]",
        *([f"base_model: {card['base']}"] if card.get("base") and "/" in str(card["base"]) else []),
        "---",
        "",
        f"# {card.get('name') or 'Adapter'}",
        "",
        f"- **Base it expects**: `{base}`",
        f"- **Trained on**: {card.get('trained_on') or 'not recorded'}",
    ]
    if card.get("steps") is not None:
        lines.append(f"- **Training steps**: {card['steps']}")
    branches = [b for b in ("image", "graph") if config.get("sg", {}).get(f"{b}_branch", b == "image")]
    lines.append(f"- **Branches**: {', '.join(branches) or 'none'}")
    scores = card.get("scores") or {}
    if scores:
        lines += ["", "| score | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in scores.items())]
    lines += [
        "",
        "Load it with `from_pretrained(folder or repo id, unet)` (`sg2img.SceneGraphAdapter` or",
        "`ip_adapter.IPAdapter`), or `SG2ImgPipeline.load_sg_adapter(folder/adapter.safetensors)`.",
        "",
    ]
    return "\n".join(lines)


def write_card(folder: str | Path, weights: str | Path, card: Mapping[str, Any]) -> Path:
    """``config.json`` (the adapter file's config and the card's facts) and ``README.md`` beside an
    adapter file already in ``folder``."""
    folder = Path(folder)
    config = read_adapter_file(weights).config or {}
    record = {"weights": Path(weights).name, **config, **{k: v for k, v in card.items() if v is not None}}
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    atomic_write(folder / CARD_NAME, lambda tmp: Path(tmp).write_text(model_card(config, card)))
    return folder


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an adapter class with ``save(path)`` and
    ``from_file(path, unet, ...)``."""

    def save_pretrained(self, folder: str | Path, weight_name: str = WEIGHTS_NAME, **card: Any) -> Path:
        """Write ``folder/weight_name``, ``config.json`` and a model card. ``card``: ``base`` (the model it
        expects), ``trained_on``, ``steps``, ``scores`` (a mapping), ``name``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        weights = self.save(folder / weight_name)  # type: ignore[attr-defined]
        write_card(folder, weights, card)
        return folder

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        unet: Any,
        weight_name: str = WEIGHTS_NAME,
        subfolder: str | None = None,
        hub_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        """From a file, a folder (``save_pretrained``'s, or any holding ``weight_name``) or a hub repo id;
        ``kwargs`` go to ``from_file``."""
        path = resolve_adapter_file(source, weight_name, subfolder, **dict(hub_kwargs or {}))
        return cls.from_file(path, unet, **kwargs)  # type: ignore[attr-defined]
