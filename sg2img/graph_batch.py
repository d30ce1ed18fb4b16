"""Scene graphs -> torch-geometric batches: the form a data loader produces and the GNN reads.

A batch of scene graphs is a torch-geometric ``Batch`` (sg2im's packed ``objs``/``triples``/``obj_to_img``
is exactly this):

    x          (O, D_label)  object label embeddings          edge_index (2, T)  [subject; object]
    edge_attr  (T, D_label)  predicate embeddings             batch      (O,)    graph of each object
    box        (O, 4)        normalised boxes (0 if unknown)  has_box    (O,)    bool

A loader packs label *indices* (``graphs_to_label_batch``, no model needed); the model embeds the batch's
label strings once each (``embed_label_batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch_geometric.data import Batch, Data

from sg2img.graph import SceneGraph


def graphs_to_label_batch(graphs: Sequence[SceneGraph]) -> tuple[Batch, list[str]]:
    """Pack graphs into one ``Batch`` of label *indices*, plus the batch's unique label strings.

    ``obj_label`` (O,) and ``pred_label`` (T,) index into the returned list. This is the form a data
    loader produces (no model needed); ``embed_label_batch`` turns it into model input.
    """
    labels = list(
        dict.fromkeys(
            [o.label for g in graphs for o in g.objects]
            + [r.predicate for g in graphs for r in g.relationships]
        )
    )
    row = {s: i for i, s in enumerate(labels)}
    data = []
    for g in graphs:
        edge_index = (
            torch.tensor([[r.subject, r.object] for r in g.relationships], dtype=torch.long)
            .reshape(-1, 2)
            .t()
        )
        box = torch.tensor(
            [o.box if o.box else (0.0, 0.0, 0.0, 0.0) for o in g.objects], dtype=torch.float32
        ).reshape(-1, 4)
        data.append(
            Data(
                obj_label=torch.tensor([row[o.label] for o in g.objects], dtype=torch.long),
                pred_label=torch.tensor([row[r.predicate] for r in g.relationships], dtype=torch.long),
                edge_index=edge_index,
                box=box,
                has_box=torch.tensor([o.box is not None for o in g.objects], dtype=torch.bool),
                num_nodes=len(g.objects),
            )
        )
    return Batch.from_data_list(data), labels


def empty_graph_data() -> Data:
    """The empty graph in the label-batch form (what a dropped graph becomes)."""
    return Data(
        obj_label=torch.zeros(0, dtype=torch.long),
        pred_label=torch.zeros(0, dtype=torch.long),
        edge_index=torch.zeros(2, 0, dtype=torch.long),
        box=torch.zeros(0, 4),
        has_box=torch.zeros(0, dtype=torch.bool),
        num_nodes=0,
    )


def drop_graphs(batch: Batch, drop: torch.Tensor) -> Batch:
    """The same batch with the graphs where ``drop`` is True replaced by the empty graph."""
    if not bool(drop.any()):
        return batch
    device = batch.obj_label.device
    data = [empty_graph_data().to(device) if d else g for g, d in zip(batch.to_data_list(), drop.tolist())]
    return Batch.from_data_list(data)


def embed_label_batch(
    batch: Batch, labels: Sequence[str], embed: Callable[[Sequence[str]], torch.Tensor]
) -> Batch:
    """Fill ``x``/``edge_attr`` of a label batch with the embeddings of its strings (each embedded once)."""
    device = batch.obj_label.device
    table = embed(list(labels)).to(device) if labels else torch.zeros(0, _embed_dim(embed), device=device)
    out = batch.clone()
    out.x, out.edge_attr = table[batch.obj_label], table[batch.pred_label]  # empty indices give (0, D)
    return out


def graphs_to_batch(graphs: Sequence[SceneGraph], embed: Callable[[Sequence[str]], torch.Tensor]) -> Batch:
    """Pack graphs into one model-ready ``Batch``; every unique label string in the batch is embedded once."""
    batch, labels = graphs_to_label_batch(graphs)
    return embed_label_batch(batch, labels, embed)


def _embed_dim(embed) -> int:
    return int(getattr(embed, "dim", 0)) or embed(["object"]).shape[1]
