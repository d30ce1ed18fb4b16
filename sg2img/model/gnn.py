"""Scene graph -> tokens: a torch-geometric GNN over label embeddings, then padded token sequences.

The encoder reads a torch-geometric ``Batch`` of graphs (``sg2img.graph_batch``) and outputs, per graph, one global token, one token per object and one per triple, each projected
to ``cross_attention_dim`` with LayerNorm and padded with a key-padding mask -- or, optionally, K tokens
from a masked Perceiver resampler. An empty graph yields an all-False mask, so it contributes nothing.

The layout: with ``GNNConfig.layout_head`` the GNN predicts a box per object from the relations (sg2im's
box net: an MLP on each object's vector, trained with an L1 loss against the true boxes). The layout of a
graph is its given boxes where it has them and the prediction elsewhere. It can be embedded into the object
vectors after the GNN (``boxes_after_gnn``), and it confines each object token to its box
(``TokenConfig.confine_objects``: the token's region; global and triple tokens are seen everywhere).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import GATv2Conv, GINEConv, TransformerConv
from torch_geometric.utils import scatter, to_dense_batch

from ip_adapter.attention import Stream
from ip_adapter.projection import Resampler, ResamplerConfig
from sg2img.graph import SceneGraph

LayerKind = Literal["triplet", "gine", "transformer", "gatv2"]


# --- layers ----------------------------------------------------------------------------------------
def _mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear + ReLU after every layer, the final one included (sg2im's build_mlp default)."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers)


class GraphTripleConv(nn.Module):
    """sg2im's graph convolution (Johnson et al. 2018, Sec. 3).

    Each triple (s, p, o) goes through net1: [x_s, e_p, x_o] -> [s', p', o']; the edge vector becomes p',
    each object averages its candidates s'/o' over every triple it takes part in (0 if none), and net2
    maps the average to the new object vector.
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or dim
        self.hidden_dim, self.out_dim = hidden_dim, out_dim
        self.net1 = _mlp([3 * dim, hidden_dim, 2 * hidden_dim + out_dim])
        self.net2 = _mlp([hidden_dim, hidden_dim, out_dim])

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s, o = edge_index  # (T,), (T,)
        h, d = self.hidden_dim, self.out_dim
        t = self.net1(torch.cat([x[s], edge_attr, x[o]], dim=-1))  # (T, 2H + D)
        new_s, new_p, new_o = t[:, :h], t[:, h : h + d], t[:, h + d :]
        # mean over every candidate of an object, as subject and as object; objects in no triple get 0
        pooled = scatter(torch.cat([new_s, new_o]), torch.cat([s, o]), 0, x.shape[0], reduce="mean")  # (O, H)
        return self.net2(pooled), new_p


@dataclass(frozen=True)
class GNNConfig:
    layer: LayerKind = "triplet"
    num_layers: int = 5
    hidden_dim: int = 128  # node and edge width (sg2im: 128)
    mlp_dim: int = 512  # triplet MLP width (sg2im: 512); the GINE MLP width
    heads: int = 4  # transformer / gatv2
    use_boxes: bool = True  # given boxes enter the GNN's input
    layout_head: bool = False  # predict a box per object from the relations (sg2im's box net)
    boxes_after_gnn: bool = (
        False  # the layout (given, else predicted) is added to the object vectors after it
    )
    image_node: bool = False  # sg2im's __image__ node with __in_image__ edges from every object
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.layer not in ("triplet", "gine", "transformer", "gatv2"):
            raise ValueError(
                f"gnn.layer must be one of triplet, gine, transformer, gatv2; got {self.layer!r}"
            )
        if self.layer in ("transformer", "gatv2") and self.hidden_dim % self.heads:
            raise ValueError(f"gnn.hidden_dim {self.hidden_dim} must be divisible by gnn.heads {self.heads}")
        if self.num_layers < 1:
            raise ValueError(f"gnn.num_layers must be >= 1, got {self.num_layers}")


GNN_PRESETS: dict[str, GNNConfig] = {
    "sg2im": GNNConfig("triplet", num_layers=5, hidden_dim=128, mlp_dim=512),
    "gine": GNNConfig("gine", num_layers=4, hidden_dim=256, mlp_dim=512),
    "transformer": GNNConfig("transformer", num_layers=4, hidden_dim=256, heads=4),
    "gatv2": GNNConfig("gatv2", num_layers=4, hidden_dim=256, heads=4),
    "tiny": GNNConfig("triplet", num_layers=2, hidden_dim=16, mlp_dim=32),
}


def gnn_preset(name: str, **overrides) -> GNNConfig:
    if name not in GNN_PRESETS:
        raise ValueError(f"unknown GNN preset {name!r}; choose one of {sorted(GNN_PRESETS)}")
    return replace(GNN_PRESETS[name], **overrides)


class _ResidualConv(nn.Module):
    """A torch-geometric conv with static edge features, wrapped as x + conv(LN(x))."""

    def __init__(self, config: GNNConfig):
        super().__init__()
        d = config.hidden_dim
        self.norm = nn.LayerNorm(d)
        if config.layer == "gine":
            self.conv = GINEConv(
                nn.Sequential(nn.Linear(d, config.mlp_dim), nn.ReLU(), nn.Linear(config.mlp_dim, d)),
                edge_dim=d,
            )
        elif config.layer == "transformer":
            self.conv = TransformerConv(d, d // config.heads, heads=config.heads, edge_dim=d)
        else:
            self.conv = GATv2Conv(d, d // config.heads, heads=config.heads, edge_dim=d, add_self_loops=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, edge_index, edge_attr):
        return x + self.dropout(self.conv(self.norm(x), edge_index, edge_attr)), edge_attr


@dataclass(frozen=True)
class TokenConfig:
    """Which tokens a graph becomes. ``resample_to``: K fixed tokens from a masked Perceiver instead."""

    object_tokens: bool = True
    triple_tokens: bool = True
    global_token: bool = True
    resample_to: int | None = None
    resampler_depth: int = 2
    resampler_heads: int = 4
    confine_objects: bool = False  # an object token is seen only by queries inside its box (the layout)
    # how, when confine_objects is on: "hard", a mask at the box's edge; "soft", a score penalty -(d / w)^2
    # at distance d from the box with a width w learned per layer, starting at ``region_width`` (a fraction
    # of the image); "learned", the soft penalty plus a learned spatial bias, a small MLP per layer of the
    # query's offset from the box centre (zero at the start); an ablation file can then switch the kind alone
    confinement: Literal["hard", "soft", "learned"] = "hard"
    region_width: float = 0.1
    # an object token adds its label's own embedding (the text encoder's pooled state of "red circle", a
    # token of the base's text space when the widths match, else through a linear map): which object a
    # token stands for is then readable by the branch's text-initialised K/V from the first step
    object_identity: bool = False

    def __post_init__(self) -> None:
        if self.confine_objects and self.resample_to:
            raise ValueError(
                "tokens.confine_objects needs one token per object: it cannot go with resample_to"
            )
        if self.confinement not in ("hard", "soft", "learned"):
            raise ValueError(
                f"tokens.confinement must be 'hard', 'soft' or 'learned', got {self.confinement!r}"
            )
        if not self.region_width > 0:
            raise ValueError(f"tokens.region_width must be positive, got {self.region_width}")
        if self.confine_objects and not self.object_tokens:
            raise ValueError("tokens.confine_objects needs object_tokens: true")
        if self.object_identity and not self.object_tokens:
            raise ValueError("tokens.object_identity needs object_tokens: true")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The token order of a graph, the one place it is decided: ``"global"`` (one token), then
        ``"object"`` (one per object), then ``"triple"`` (one per relationship), each padded to the batch's
        largest graph; the kinds that are off are left out (resampled tokens replace them all)."""
        on = {"global": self.global_token, "object": self.object_tokens, "triple": self.triple_tokens}
        return tuple(k for k in ("global", "object", "triple") if on[k])


FULL_IMAGE = (0.0, 0.0, 1.0, 1.0)  # the region of a token that is seen everywhere


@dataclass
class GraphTokens:
    """What ``SceneGraphEncoder`` makes of a batch of graphs.

    tokens:  (B, L, C) in token order (``token_labels``); mask: (B, L) True where a token is real.
    regions: (B, L, 4) each token's box (x0, y0, x1, y1) in [0, 1] when object tokens are confined, else None.
    layout:  (O, 4) the box of every object of the batch (given, else predicted), None without boxes.
    predicted: (O, 4) the layout head's boxes (None without a layout head): what its loss reads.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    regions: torch.Tensor | None = None
    layout: torch.Tensor | None = None
    predicted: torch.Tensor | None = None

    def stream(self) -> Stream:
        """The graph branch's stream: the tokens, their padding mask and their regions."""
        return Stream(self.tokens, self.mask, self.regions)

    def rows(self, index: slice | torch.Tensor) -> GraphTokens:
        """The per-graph fields of some graphs (``layout`` and ``predicted`` are per object: dropped)."""
        return GraphTokens(
            self.tokens[index], self.mask[index], None if self.regions is None else self.regions[index]
        )


def token_labels(graphs: Sequence[SceneGraph], tokens: TokenConfig) -> list[list[str | None]]:
    """What each token ``SceneGraphEncoder`` makes for this batch of graphs stands for, per graph, in
    token order: ``"<graph>"``, ``"i: label"`` for object i, ``"subject predicate object"`` for a
    triple, ``None`` for padding. Resampled tokens stand for no single node: ``"query k"``."""
    if tokens.resample_to:
        return [[f"query {k}" for k in range(tokens.resample_to)] for _ in graphs]
    omax = max((len(g.objects) for g in graphs), default=0)
    tmax = max((len(g.relationships) for g in graphs), default=0)
    out = []
    for g in graphs:
        names: list[str | None] = []
        for kind in tokens.kinds:
            if kind == "global":
                names.append("<graph>" if g.objects else None)
            elif kind == "object":
                names += [f"{i}: {o.label}" for i, o in enumerate(g.objects)]
                names += [None] * (omax - len(g.objects))
            else:
                names += [
                    f"{g.objects[r.subject].label} {r.predicate} {g.objects[r.object].label}"
                    for r in g.relationships
                ]
                names += [None] * (tmax - len(g.relationships))
        out.append(names)
    return out


class SceneGraphEncoder(nn.Module):
    """Batch of graphs -> (tokens (B, L, cross_attention_dim), key-padding mask (B, L))."""

    def __init__(
        self,
        label_dim: int,
        cross_attention_dim: int,
        gnn: GNNConfig | None = None,
        tokens: TokenConfig | None = None,
    ):
        super().__init__()
        self.gnn_config = gnn = gnn or GNNConfig()
        self.token_config = tok = tokens or TokenConfig()
        if not (tok.object_tokens or tok.triple_tokens or tok.global_token):
            raise ValueError("tokens: at least one of object_tokens, triple_tokens, global_token must be on")
        self.label_dim, self.cross_attention_dim = label_dim, cross_attention_dim
        d = gnn.hidden_dim
        self.node_in = nn.Linear(label_dim, d)
        self.edge_in = nn.Linear(label_dim, d)
        if gnn.use_boxes:
            self.box_embed = nn.Sequential(nn.Linear(4, d), nn.ReLU(), nn.Linear(d, d))
            self.no_box = nn.Parameter(torch.zeros(d))
        if gnn.image_node:
            self.image_node = nn.Parameter(torch.randn(d) * 0.02)
            self.in_image = nn.Parameter(torch.randn(d) * 0.02)
        if gnn.layer == "triplet":
            self.layers = nn.ModuleList(GraphTripleConv(d, gnn.mlp_dim) for _ in range(gnn.num_layers))
        else:
            self.layers = nn.ModuleList(_ResidualConv(gnn) for _ in range(gnn.num_layers))
        if gnn.layout_head:  # sg2im's box net: object vector -> (cx, cy, w, h) through a sigmoid
            self.box_head = nn.Sequential(nn.Linear(d, gnn.mlp_dim), nn.ReLU(), nn.Linear(gnn.mlp_dim, 4))
        if gnn.boxes_after_gnn:
            self.box_after = nn.Sequential(nn.Linear(4, d), nn.ReLU(), nn.Linear(d, d))
        self.object_out = nn.Sequential(nn.Linear(d, cross_attention_dim), nn.LayerNorm(cross_attention_dim))
        self.triple_out = nn.Sequential(
            nn.Linear(3 * d, cross_attention_dim), nn.LayerNorm(cross_attention_dim)
        )
        self.global_out = nn.Sequential(nn.Linear(d, cross_attention_dim), nn.LayerNorm(cross_attention_dim))
        if tok.object_identity:  # the label embedding as it is when it already has the tokens' width
            same = label_dim == cross_attention_dim
            self.identity = nn.Identity() if same else nn.Linear(label_dim, cross_attention_dim)
        if tok.resample_to:  # IP-Adapter Plus's Perceiver resampler, masked over the padded graph tokens
            c = cross_attention_dim
            self.resampler = Resampler(
                ResamplerConfig(dim=c, depth=tok.resampler_depth, dim_head=c // tok.resampler_heads,
                                heads=tok.resampler_heads, num_queries=tok.resample_to, embedding_dim=c, output_dim=c)
            )  # fmt: skip

    def predict_boxes(self, obj: torch.Tensor) -> torch.Tensor:
        """(O, 4) boxes (x0, y0, x1, y1) in [0, 1] from the object vectors after the GNN."""
        cx, cy, w, h = self.box_head(obj).float().sigmoid().unbind(-1)
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).clamp(0.0, 1.0)

    def forward(self, batch: Batch) -> GraphTokens:
        num_graphs = batch.num_graphs
        dtype = self.node_in.weight.dtype
        x = self.node_in(batch.x.to(dtype))  # (O, d)
        e = self.edge_in(batch.edge_attr.to(dtype))  # (T, d)
        edge_index, node_batch = batch.edge_index, batch.batch
        num_obj = x.shape[0]
        if self.gnn_config.use_boxes:
            has = batch.has_box[:, None]
            x = x + torch.where(has, self.box_embed(batch.box.to(dtype)), self.no_box)
        if self.gnn_config.image_node:
            # one image node per graph, after the objects; an __in_image__ edge from every object to it
            img = torch.arange(num_graphs, device=x.device) + num_obj
            x = torch.cat([x, self.image_node.expand(num_graphs, -1)])
            edge_index = torch.cat(
                [edge_index, torch.stack([torch.arange(num_obj, device=x.device), img[node_batch]])], 1
            )
            e = torch.cat([e, self.in_image.expand(num_obj, -1)])
        for layer in self.layers:
            x, e = layer(x, edge_index, e)

        num_triples = batch.edge_index.shape[1]
        obj, e = x[:num_obj], e[:num_triples]
        predicted = self.predict_boxes(obj) if self.gnn_config.layout_head else None
        layout = None
        if predicted is not None or self.gnn_config.boxes_after_gnn or self.token_config.confine_objects:
            # given boxes override the prediction; without either, an object's region is the whole image
            fallback = predicted.detach() if predicted is not None else batch.box.new_tensor(FULL_IMAGE)
            layout = torch.where(batch.has_box[:, None], batch.box.float(), fallback)
        if self.gnn_config.boxes_after_gnn:
            obj = obj + self.box_after(layout.to(dtype))
        seqs, masks, regions = [], [], []  # per kind of token, in TokenConfig.kinds order
        has_objects = torch.bincount(node_batch, minlength=num_graphs) > 0  # (B,)
        everywhere = batch.box.new_tensor(FULL_IMAGE).float()
        for kind in self.token_config.kinds:
            if kind == "global":
                if self.gnn_config.image_node:
                    pooled = x[num_obj:]
                else:
                    pooled = torch.zeros(num_graphs, x.shape[1], dtype=x.dtype, device=x.device)
                    pooled = pooled.index_add_(0, node_batch, obj)
                    pooled = pooled / torch.bincount(node_batch, minlength=num_graphs).clamp(min=1)[:, None]
                t, m = self.global_out(pooled)[:, None], has_objects[:, None]  # (B, 1, C), (B, 1)
                r = everywhere.expand(num_graphs, 1, 4)
            elif kind == "object":
                obj_tokens = self.object_out(obj)
                if self.token_config.object_identity:
                    obj_tokens = obj_tokens + self.identity(batch.x[:num_obj].to(dtype))
                t, m = to_dense_batch(obj_tokens, node_batch, batch_size=num_graphs)  # (B, Omax, C)
                r = everywhere.expand(num_graphs, t.shape[1], 4)
                if self.token_config.confine_objects:
                    r = to_dense_batch(layout, node_batch, batch_size=num_graphs, fill_value=1.0)[0].float()
            else:
                s, o = batch.edge_index
                triples = self.triple_out(torch.cat([obj[s], e, obj[o]], dim=-1))  # (T, C)
                t, m = to_dense_batch(triples, node_batch[s], batch_size=num_graphs)  # (B, Tmax, C)
                r = everywhere.expand(num_graphs, t.shape[1], 4)
            seqs.append(t)
            masks.append(m)
            regions.append(r)
        tokens, mask = torch.cat(seqs, dim=1), torch.cat(masks, dim=1)
        if self.token_config.resample_to:
            resampled = self.resampler(tokens, mask)
            keep = has_objects[:, None].expand(-1, self.token_config.resample_to).contiguous()
            return GraphTokens(resampled, keep, None, layout, predicted)
        confined = torch.cat(regions, dim=1) if self.token_config.confine_objects else None
        return GraphTokens(tokens, mask, confined, layout, predicted)
