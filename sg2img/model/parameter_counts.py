"""``sg2img info``: parameter counts per component, built on the meta device (nothing allocated)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ip_adapter import IPAdapter
from sg2img.base.components import Preset, build_on_meta, get_preset, read_preset_from_folder


@dataclass
class Row:
    name: str
    params: int
    indent: int = 0


def count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def adapter_rows(preset: Preset, unet: nn.Module, image_tokens: str) -> list[Row]:
    config = preset.adapter_config(image_tokens)
    with torch.device("meta"):
        adapter = IPAdapter(unet, config)
    kind = "Linear+LayerNorm" if image_tokens == "cls" else "Resampler"
    layers = len(adapter.attention.layers)
    proj, kv = count(adapter.image_proj), count(adapter.attention)
    return [
        Row(f"ip-adapter ({image_tokens}, {config.tokens} tokens)", proj + kv),
        Row(f"image_proj ({kind})", proj, 1),
        Row(f"ip_adapter to_k_ip/to_v_ip ({layers} layers)", kv, 1),
    ]


def graph_rows(preset: Preset, unet: nn.Module, gnn: str) -> list[Row]:
    from sg2img.model.adapter import SceneGraphAdapter, SGAdapterConfig
    from sg2img.model.gnn import gnn_preset

    config = SGAdapterConfig(
        label_dim=preset.text_encoder["hidden_size"], image_branch=False, image=preset.adapter_config("cls"),
        gnn=gnn_preset(gnn),
    )  # fmt: skip
    with torch.device("meta"):
        sg = SceneGraphAdapter(unet, config)
    enc = sg.sg_encoder
    parts = {
        "label/box input": [enc.node_in, enc.edge_in, getattr(enc, "box_embed", None)],
        f"GNN ({config.gnn.layer} x{config.gnn.num_layers}, width {config.gnn.hidden_dim})": [enc.layers],
        "token heads (object/triple/global)": [enc.object_out, enc.triple_out, enc.global_out],
    }
    rows = [Row(f"graph branch (gnn preset {gnn!r})", count(sg)), Row("sg_encoder", count(enc), 1)]
    rows += [Row(name, sum(count(m) for m in mods) + (enc.no_box.numel() if "box" in name else 0), 2)
             for name, mods in parts.items()]  # fmt: skip
    rows.append(
        Row(f"sg_adapter to_k_sg/to_v_sg ({len(sg.attention.layers)} layers)", count(sg.attention), 1)
    )
    return rows


def info_rows(model: str, gnn: str = "sg2im") -> list[Row]:
    preset = get_preset(model) if not Path(model).exists() else read_preset_from_folder(model)
    parts = build_on_meta(preset)
    rows = [Row(name, count(m)) for name, m in parts.items()]
    rows.append(Row("base total", sum(r.params for r in rows)))
    for image_tokens in ("cls", "patch"):
        rows.extend(adapter_rows(preset, parts["unet"], image_tokens))
    rows.extend(graph_rows(preset, parts["unet"], gnn))
    return rows


def format_rows(rows: list[Row]) -> str:
    width = max(len("  " * r.indent + r.name) for r in rows) + 2
    lines = [f"{'component':<{width}}{'parameters':>15}", "-" * (width + 15)]
    lines += [f"{'  ' * r.indent + r.name:<{width}}{r.params:>15,}" for r in rows]
    return "\n".join(lines)
