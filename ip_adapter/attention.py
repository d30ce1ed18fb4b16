"""Decoupled cross-attention (IP-Adapter, Ye et al. 2023, Eq. 5), generalised to named streams.

Every cross-attention layer keeps its frozen text attention and gains one branch per extra stream s:

    Z = Attn(Q, K, V) + sum_s  lambda_s * Attn(Q, K'_s, V'_s, mask_s)

with the same query Q, new ``to_k_{s}``/``to_v_{s}`` weights (initialised as copies of the layer's
``to_k``/``to_v``), and the sum taken before the shared ``to_out``.

A stream's tokens may be *confined to regions*: with ``Stream.regions`` each token has a box on the image,
and a query sees the token only if its cell of the layer's grid overlaps that box (a token whose box is the
whole image, (0, 0, 1, 1), is seen everywhere). A query that sees no token of the stream gets nothing from
it. This is how a scene graph's object tokens act where their object is. A stream may instead be confined
*softly*: each layer learns a width w_s, and a query at distance d from a token's box (0 inside it) adds
-(d / w_s)^2 to that token's score, so a token fades out around its box instead of vanishing at its edge (the
hard mask is the limit w_s -> 0). A softly confined stream may also learn a *spatial bias*: a small MLP per
layer of the query's place relative to each token's box (its offset from the box centre in half-widths and
half-heights) adds to that score, except for a token whose box is the whole image. Its last layer starts at zero, so training starts from the soft mask and
learns where, in and around a box, a token should act.

A stream may also be *positional*: its branch then adds a learned encoding of each query's place on the
latent grid to Q (``Q + P_s(x, y)``, Fourier features through a zero-initialised linear layer), so its
tokens can say *where* as well as *what*. The frozen UNet's queries carry little absolute position, so a
branch that is to place things (a scene graph's layout) needs it; the text path and the other branches
keep the plain Q, and at initialisation the branch equals the plain one.

Streams travel to the processors by name through ``cross_attention_kwargs={"streams": {...}}``; they are
never concatenated onto the text tokens and sliced back by position. Self-attention layers get a
processor that accepts the streams and ignores them, so diffusers logs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

PROCESSOR_SUFFIX = ".processor"

# A scale is a float, a list with one float per cross-attention layer, or a per-block dict in the form of
# diffusers' `set_ip_adapter_scale`: {"down": {"block_2": [0.0, 1.0]}, "mid": 0.5, "up": {"block_0": 1.0}}.
Scale = float | Sequence[float] | Mapping


@dataclass
class Stream:
    """One extra token stream for the decoupled branches.

    tokens:  (B, N, cross_attention_dim).
    mask:    (B, N) bool key-padding mask, True where a token is real; None means all real.
             A sample whose mask is all False contributes exactly zero.
    regions: (B, N, 4) boxes (x0, y0, x1, y1) in [0, 1] of the image: each token is seen only by the queries
             whose grid cell overlaps its box; (0, 0, 1, 1) is seen everywhere. None: no confinement.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    regions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"stream tokens must be (B, N, C), got shape {tuple(self.tokens.shape)}")
        if self.mask is not None:
            if self.mask.dtype != torch.bool:
                raise ValueError(f"stream mask must be a bool tensor, got {self.mask.dtype}")
            if tuple(self.mask.shape) != tuple(self.tokens.shape[:2]):
                raise ValueError(
                    f"stream mask shape {tuple(self.mask.shape)} does not match tokens (B, N) = "
                    f"{tuple(self.tokens.shape[:2])}"
                )
        if self.regions is not None and tuple(self.regions.shape) != (*self.tokens.shape[:2], 4):
            raise ValueError(
                f"stream regions shape {tuple(self.regions.shape)} is not (B, N, 4) = "
                f"{(*self.tokens.shape[:2], 4)}"
            )


def fourier_positions(height: int, width: int, frequencies: int) -> torch.Tensor:
    """(height * width, 4 * frequencies): sin/cos of the cell centres (in [0, 1]) at 2^k * pi, row-major."""
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    f = (2.0 ** torch.arange(frequencies, dtype=torch.float32)) * torch.pi
    ang = torch.cat([x.reshape(-1, 1) * f, y.reshape(-1, 1) * f], dim=1)  # (S, 2F)
    return torch.cat([ang.sin(), ang.cos()], dim=1)


def region_mask(regions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height * width, N) bool: which grid cells (row-major) overlap each token's box. ``regions`` is
    (B, N, 4) of (x0, y0, x1, y1) in [0, 1]; a cell [i/w, (i+1)/w) x [j/h, (j+1)/h) overlaps a box when the
    two intervals overlap on both axes, so every box of positive area reaches at least one cell."""
    xs = torch.arange(width, device=regions.device, dtype=regions.dtype)
    ys = torch.arange(height, device=regions.device, dtype=regions.dtype)
    x0, y0, x1, y1 = (regions[..., k, None] for k in range(4))  # (B, N, 1)
    in_x = ((xs + 1) / width > x0) & (xs / width < x1)  # (B, N, w)
    in_y = ((ys + 1) / height > y0) & (ys / height < y1)  # (B, N, h)
    cells = in_y[..., :, None] & in_x[..., None, :]  # (B, N, h, w)
    return cells.flatten(2).transpose(1, 2)


def region_distance(regions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, height * width, N): how far each grid cell (row-major) is from each token's box, in fractions of
    the image: 0 for the cells ``region_mask`` marks, else from the cell's centre to the box (at least half
    a cell), so a hard mask is the narrow limit of a soft one. ``regions`` as for ``region_mask``."""
    xs = (torch.arange(width, device=regions.device, dtype=regions.dtype) + 0.5) / width
    ys = (torch.arange(height, device=regions.device, dtype=regions.dtype) + 0.5) / height
    x0, y0, x1, y1 = (regions[..., k, None] for k in range(4))  # (B, N, 1)
    dx = torch.maximum(x0 - xs, xs - x1).clamp(min=0)  # (B, N, w)
    dy = torch.maximum(y0 - ys, ys - y1).clamp(min=0)  # (B, N, h)
    d = (dy[..., :, None] ** 2 + dx[..., None, :] ** 2).sqrt().flatten(2).transpose(1, 2)  # (B, S, N)
    return d.masked_fill(region_mask(regions, height, width), 0.0)


def region_offsets(regions: torch.Tensor, height: int, width: int, limit: float = 4.0) -> torch.Tensor:
    """(B, height * width, N, 2): where each grid cell's centre (row-major) lies relative to each token's box,
    as (x, y) offsets from the box centre in half-widths and half-heights (inside the box: both within
    [-1, 1]), clipped to [-limit, limit]. ``regions`` as for ``region_mask``."""
    xs = (torch.arange(width, device=regions.device, dtype=regions.dtype) + 0.5) / width
    ys = (torch.arange(height, device=regions.device, dtype=regions.dtype) + 0.5) / height
    x0, y0, x1, y1 = (regions[..., k, None] for k in range(4))  # (B, N, 1)
    half_w, half_h = ((x1 - x0) / 2).clamp(min=1e-3), ((y1 - y0) / 2).clamp(min=1e-3)
    u = ((xs - (x0 + x1) / 2) / half_w).clamp(-limit, limit)  # (B, N, w)
    v = ((ys - (y0 + y1) / 2) / half_h).clamp(-limit, limit)  # (B, N, h)
    grid = torch.stack(torch.broadcast_tensors(u[..., None, :], v[..., :, None]), dim=-1)  # (B, N, h, w, 2)
    return grid.flatten(2, 3).transpose(1, 2)  # (B, S, N, 2)


def layer_grid(latent: tuple[int, int], positions: int) -> tuple[int, int]:
    """The (h, w) of a layer with ``positions`` query positions in a UNet whose input is ``latent``: each
    level halves the grid, rounding up as a stride-2 convolution with padding 1 does."""
    h, w = latent
    for _ in range(16):
        if h * w == positions:
            return h, w
        if h * w < positions or (h == 1 and w == 1):
            break
        h, w = -(-h // 2), -(-w // 2)
    raise ValueError(
        f"cannot place {positions} query positions on a UNet input grid of {latent[0]}x{latent[1]}"
    )


def _identity(t: torch.Tensor) -> tuple:
    """What makes a tensor the same input again within one generation: its storage, view and version."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t._version, t.dtype, t.device)


def _heads(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    return x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (B, H, S, dh)


class KVCache:
    """K/V of the constant token sequences of one generation (the text, each stream), so each is projected
    once, not at every step (``DecoupledAttention.caching``). Entries are keyed by the tokens' storage, view
    and version; each keeps its source tensor alive, so no later tensor can take over its storage and key."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def key_value(
        self,
        tag: tuple,
        tokens: torch.Tensor,
        project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``project(tokens)``, or what it gave for this very tensor before."""
        key = (*tag, *_identity(tokens))
        if key not in self._entries:
            self._entries[key] = (tokens, *project(tokens))
        _, k, v = self._entries[key]
        return k, v


class DecoupledAttnProcessor(nn.Module):
    """SDPA attention processor with one decoupled branch per named stream.

    With no streams (self-attention layers) it is a plain ``AttnProcessor2_0`` that accepts and ignores
    ``streams``. The text path is computed exactly as ``AttnProcessor2_0`` does, and a branch whose scale
    is 0 is skipped, so scale 0 reproduces the plain UNet bit for bit.

    A branch is four steps, each its own method: the stream's rows (``_batch_rows``), its query
    (``_stream_query``: plus a learned position term for a positional stream), its K/V (``_key_value``:
    through the generation's ``KVCache`` when one is set) and what each query may see (``_visibility``:
    padding, and hard or soft confinement to the tokens' regions, with a learned spatial bias). A recorder, when set, observes the
    result; none of the optional features costs anything when it is off.
    """

    def __init__(
        self,
        hidden_size: int | None = None,
        cross_attention_dim: int | None = None,
        streams: Sequence[str] = (),
        layer_name: str = "",
        positional: Sequence[str] = (),
        frequencies: int = 8,
        soft_regions: Sequence[str] = (),
        region_width: float = 0.1,
        region_bias: Sequence[str] = (),
        bias_hidden: int = 16,
    ):
        super().__init__()
        if streams and (hidden_size is None or cross_attention_dim is None):
            raise ValueError("a processor with streams needs hidden_size and cross_attention_dim")
        if set(positional) - set(streams):
            raise ValueError(f"positional streams {sorted(set(positional) - set(streams))} are not streams")
        if set(soft_regions) - set(streams):
            raise ValueError(
                f"soft-region streams {sorted(set(soft_regions) - set(streams))} are not streams"
            )
        if set(region_bias) - set(soft_regions):
            raise ValueError(
                f"region-bias streams {sorted(set(region_bias) - set(soft_regions))} are not soft-region "
                "streams (a learned spatial bias adds to the soft mask)"
            )
        if not region_width > 0:
            raise ValueError(f"region_width must be positive, got {region_width}")
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.stream_names: tuple[str, ...] = tuple(streams)
        self.layer_name = layer_name
        self.scale: dict[str, float] = {}
        # the optional features, each off unless set: attention maps (DecoupledAttention.recording) and the
        # K/V cache of one generation (DecoupledAttention.caching)
        self.recorder: AttentionRecorder | None = None
        self.kv_cache: KVCache | None = None
        for s in self.stream_names:
            if not s.isidentifier():
                raise ValueError(f"stream name {s!r} must be a Python identifier")
            # Names match the official checkpoint: to_k_ip / to_v_ip (bias-free).
            setattr(self, f"to_k_{s}", nn.Linear(cross_attention_dim, hidden_size, bias=False))
            setattr(self, f"to_v_{s}", nn.Linear(cross_attention_dim, hidden_size, bias=False))
            self.scale[s] = 1.0
        self.positional = tuple(positional)
        self.frequencies = frequencies
        self.latent_grid: tuple[int, int] | None = None  # the UNet input's (h, w), set before each forward
        for s in self.positional:
            pos = nn.Linear(4 * frequencies, hidden_size)
            nn.init.zeros_(pos.weight)
            nn.init.zeros_(pos.bias)
            setattr(self, f"pos_{s}", pos)
        # soft confinement: the log of the learned width (a fraction of the image), one per stream and layer
        self.soft_regions = tuple(soft_regions)
        for s in self.soft_regions:
            setattr(self, f"region_width_{s}", nn.Parameter(torch.full((1,), float(region_width)).log()))
        # the learned spatial bias: (offset in the box) -> hidden -> one score term, the last layer zero
        self.region_bias = tuple(region_bias)
        for s in self.region_bias:
            setattr(self, f"region_bias_in_{s}", nn.Linear(2, bias_hidden))
            out = nn.Linear(bias_hidden, 1)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            setattr(self, f"region_bias_out_{s}", out)

    def branch(self, stream: str) -> tuple[nn.Linear, nn.Linear]:
        return getattr(self, f"to_k_{stream}"), getattr(self, f"to_v_{stream}")

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        streams: Mapping[str, Stream] | None = None,
    ) -> torch.Tensor:
        # --- the text path: exactly AttnProcessor2_0 ---
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, S, inner)
        query = _heads(query, batch_size, attn.heads)  # (B, H, S, dh)
        if attn.norm_q is not None:
            query = attn.norm_q(query)

        def project(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            key = _heads(attn.to_k(context), batch_size, attn.heads)
            value = _heads(attn.to_v(context), batch_size, attn.heads)
            return (attn.norm_k(key) if attn.norm_k is not None else key), value

        if encoder_hidden_states is None:  # self-attention: the keys change with every input
            key, value = project(hidden_states)
        else:  # the text: constant through a generation
            key, value = self._key_value(
                ("text",),
                encoder_hidden_states,
                lambda text: project(attn.norm_encoder_hidden_states(text) if attn.norm_cross else text),
            )
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(
            batch_size, -1, query.shape[1] * query.shape[-1]
        )
        hidden_states = hidden_states.to(query.dtype)  # (B, S, inner)

        # --- the decoupled branches (Eq. 5): same query, new K'/V', summed before to_out ---
        if streams and self.stream_names:
            unknown = sorted(set(streams) - set(self.stream_names))
            if unknown:
                raise ValueError(
                    f"{self.layer_name or 'attention layer'}: unknown stream(s) {unknown}; "
                    f"this adapter has {list(self.stream_names)}"
                )
            for name in self.stream_names:
                stream = streams.get(name)
                if stream is None or self.scale[name] == 0:
                    continue
                hidden_states = hidden_states + self.scale[name] * self._branch_attention(
                    name, stream, query, batch_size, attn.heads
                )

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _key_value(
        self,
        tag: tuple,
        tokens: torch.Tensor,
        project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of a token sequence: projected now, or once per generation while a cache is set. A compiled
        UNet projects inside its graph: the cache keys on storage addresses, which a trace cannot see."""
        if self.kv_cache is None or torch.compiler.is_compiling():
            return project(tokens)
        return self.kv_cache.key_value(tag, tokens, project)

    def _branch_attention(
        self, name: str, stream: Stream, query: torch.Tensor, batch_size: int, heads: int
    ) -> torch.Tensor:
        to_k, to_v = self.branch(name)
        tokens, mask, regions = self._batch_rows(name, stream, batch_size, to_k.in_features)
        query = self._stream_query(name, query, heads)

        def project(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t = t.to(query.dtype)
            return _heads(to_k(t), batch_size, heads), _heads(to_v(t), batch_size, heads)  # (B, H, N, dh)

        key, value = self._key_value((name, query.dtype), tokens, project)
        seen, empty = self._visibility(name, tokens, mask, regions, query)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None if seen is None else seen[:, None]
        )
        if empty is not None:
            out = out.masked_fill(empty[:, None], 0.0)
        if self.recorder is not None and self.recorder.stream == name:
            self.recorder.add(query, key, seen)
        return out.transpose(1, 2).reshape(batch_size, -1, out.shape[1] * out.shape[-1]).to(query.dtype)

    def _batch_rows(
        self, name: str, stream: Stream, batch_size: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The stream's tokens, mask and regions for this batch (a single row is shared by every row)."""
        tokens, mask, regions = stream.tokens, stream.mask, stream.regions
        if tokens.shape[-1] != width:
            raise ValueError(
                f"{self.layer_name}: stream {name!r} tokens have width {tokens.shape[-1]}, but this UNet's "
                f"cross_attention_dim is {width}"
            )
        if tokens.shape[0] != batch_size:
            if tokens.shape[0] != 1:
                raise ValueError(
                    f"{self.layer_name}: stream {name!r} has batch {tokens.shape[0]}, the UNet input has "
                    f"{batch_size}"
                )
            tokens = tokens.expand(batch_size, -1, -1)
            mask = None if mask is None else mask.expand(batch_size, -1)
        if regions is not None and regions.shape[0] != batch_size:
            regions = regions.expand(batch_size, -1, -1)
        return tokens, mask, regions

    def _stream_query(self, name: str, query: torch.Tensor, heads: int) -> torch.Tensor:
        """The query of stream ``name``: the text path's, plus the learned position term if positional."""
        if name not in self.positional:
            return query
        return query + self._position_query(name, query.shape[2], heads).to(query)

    def _visibility(
        self,
        name: str,
        tokens: torch.Tensor,
        mask: torch.Tensor | None,
        regions: torch.Tensor | None,
        query: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(what each query may see, which outputs are zeroed): the attention mask (B, S or 1, N), bool, or
        float for soft confinement (the bias, -inf for padding), or None when every token is seen; and the
        (B, S or 1, 1) rows that see no real token. Such a row would softmax over nothing (NaN): it attends
        to every token instead and its output is zeroed, so it contributes exactly 0."""
        if regions is not None:
            grid = self._grid(name, query.shape[2])
            if name in self.soft_regions:
                width = getattr(self, f"region_width_{name}").exp()
                bias = -((region_distance(regions.float(), *grid) / width) ** 2)  # (B, S, N)
                if name in self.region_bias:
                    bias = bias + self._spatial_bias(name, regions.float(), grid)
                real = (
                    mask[:, None, :] if mask is not None else torch.ones_like(bias[:, :1], dtype=torch.bool)
                )
                empty = ~real.any(dim=-1, keepdim=True)  # (B, 1, 1)
                return bias.masked_fill(~(real | empty), float("-inf")).to(query.dtype), empty
            visible = region_mask(regions.float(), *grid)  # (B, S, N)
            if mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            mask = mask[:, None, :] & visible
        if mask is None:
            return None, None
        mask = mask if mask.ndim == 3 else mask[:, None, :]  # (B, S or 1, N)
        empty = ~mask.any(dim=-1, keepdim=True)  # (B, S or 1, 1)
        return mask | empty, empty

    def _spatial_bias(self, name: str, regions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, S, N): stream ``name``'s learned score term for each query cell and token box; 0 for a token
        whose box is the whole image, which stays seen everywhere alike."""
        hidden = getattr(self, f"region_bias_in_{name}")
        out = getattr(self, f"region_bias_out_{name}")
        offsets = region_offsets(regions, *grid).to(hidden.weight)
        bias = out(F.gelu(hidden(offsets))).squeeze(-1).float()
        whole = (regions[..., :2] <= 0).all(-1) & (regions[..., 2:] >= 1).all(-1)  # (B, N)
        return bias.masked_fill(whole[:, None, :], 0.0)

    def _grid(self, name: str, positions: int) -> tuple[int, int]:
        """This layer's (h, w) query grid: from the UNet input's size, else a square."""
        if self.latent_grid is not None:
            return layer_grid(self.latent_grid, positions)
        side = round(positions**0.5)
        if side * side != positions:
            raise ValueError(
                f"{self.layer_name}: stream {name!r} needs the query grid, but this processor was not told the "
                f"UNet's input size (attach it with DecoupledAttention.attach) and {positions} positions "
                "are not a square"
            )
        return side, side

    def _position_query(self, name: str, positions: int, heads: int) -> torch.Tensor:
        """(1, heads, positions, dh): the learned position term of stream ``name``'s query."""
        h, w = self._grid(name, positions)
        pos = getattr(self, f"pos_{name}")
        feats = fourier_positions(h, w, self.frequencies).to(pos.weight)
        return _heads(pos(feats)[None], 1, heads)


class AttentionRecorder:
    """Collects where the image attends to each token of one stream, averaged over heads, layers and
    denoising steps: ``maps()`` is (B, N, h, w) at the latent resolution.

    Only the decoupled branch of ``stream`` is recorded, and only the batch rows in ``rows`` (with
    classifier-free guidance: the conditional half). The probabilities are recomputed explicitly beside
    the fused attention, so recording never changes the output, and it costs nothing when no recorder is
    installed (``DecoupledAttention.recording``).
    """

    def __init__(self, stream: str, latent_size: tuple[int, int], rows: slice = slice(None)):
        self.stream, self.latent_size, self.rows = stream, tuple(latent_size), rows
        self._sum: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def add(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``mask``: (B, 1 or S, N), bool (which tokens each query may see) or float (added to the scores)."""
        q, k = query[self.rows].float(), key[self.rows].float()  # (B, H, S, dh), (B, H, N, dh)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, S, N)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask[self.rows][:, None], float("-inf"))
        elif mask is not None:
            scores = scores + mask[self.rows][:, None].float()
        probs = scores.softmax(-1).mean(1)  # (B, S, N)
        h, w = self.latent_size
        factor = round((h * w / probs.shape[1]) ** 0.5)  # this layer's downsampling of the latent grid
        if factor < 1 or (h // factor) * (w // factor) != probs.shape[1]:
            raise ValueError(f"cannot place {probs.shape[1]} attention positions on a {h}x{w} latent grid")
        grid = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h // factor, w // factor)
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        self._sum = grid if self._sum is None else self._sum + grid
        self.count += 1

    def maps(self) -> torch.Tensor:
        """(B, N, h, w): the mean over every recorded layer call (layers x steps)."""
        if self._sum is None:
            raise ValueError(f"no attention was recorded for stream {self.stream!r}")
        return self._sum / self.count


def attention_module(unet: nn.Module, processor_name: str) -> Attention:
    return unet.get_submodule(processor_name.removesuffix(PROCESSOR_SUFFIX))


def cross_attention_layers(unet: nn.Module) -> list[tuple[int, str, Attention]]:
    """(index in ``unet.attn_processors`` order, processor name, module) for every cross-attention layer.

    The index is the one the official checkpoint uses ("1.to_k_ip.weight" ... "31.to_k_ip.weight" for
    SD1.5, where the mid block comes last).
    """
    layers = []
    for idx, name in enumerate(unet.attn_processors):
        module = attention_module(unet, name)
        if module.is_cross_attention:
            layers.append((idx, name, module))
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers to adapt")
    return layers


class DecoupledAttention(nn.Module):
    """The decoupled branches of every cross-attention layer of a UNet, keyed by the official index.

    It owns the new K'/V' weights; ``attach`` installs them as the UNet's processors and ``detach``
    restores the plain SDPA processors. Built from one UNet, it attaches to any UNet of the same
    architecture (any SD1.5 fine-tune).
    """

    def __init__(
        self,
        unet: nn.Module,
        streams: Sequence[str],
        init_from_base: bool = True,
        positional: Sequence[str] = (),
        soft_regions: Sequence[str] = (),
        region_width: float = 0.1,
        region_bias: Sequence[str] = (),
    ):
        super().__init__()
        if not streams:
            raise ValueError("DecoupledAttention needs at least one stream name")
        if len(set(streams)) != len(streams):
            raise ValueError(f"duplicate stream names in {list(streams)}")
        self.stream_names = tuple(streams)
        self.layer_names: dict[str, str] = {}
        self.layers = nn.ModuleDict()
        for idx, name, module in cross_attention_layers(unet):
            proc = DecoupledAttnProcessor(
                hidden_size=module.to_k.out_features,
                cross_attention_dim=module.to_k.in_features,
                streams=self.stream_names,
                layer_name=name.removesuffix(PROCESSOR_SUFFIX),
                positional=positional,
                soft_regions=soft_regions,
                region_width=region_width,
                region_bias=region_bias,
            )
            if init_from_base:
                with torch.no_grad():
                    for s in self.stream_names:
                        k, v = proc.branch(s)
                        k.weight.copy_(module.to_k.weight)
                        v.weight.copy_(module.to_v.weight)
            self.layers[str(idx)] = proc
        self._all_processor_names = list(unet.attn_processors)
        self.positional = tuple(positional)
        self.soft_regions = tuple(soft_regions)
        self.region_bias = tuple(region_bias)

    @property
    def cross_attention_dim(self) -> int:
        return next(iter(self.layers.values())).cross_attention_dim

    def processors(self) -> list[DecoupledAttnProcessor]:
        return list(self.layers.values())  # in processor order

    def check_compatible(self, unet: nn.Module) -> None:
        names = list(unet.attn_processors)
        if names != self._all_processor_names:
            raise ValueError(
                "this adapter was built for a UNet with different attention layers "
                f"({len(self._all_processor_names)} processors; this UNet has {len(names)})"
            )
        bad = []
        for idx, name, module in cross_attention_layers(unet):
            proc = self.layers[str(idx)]
            want = (module.to_k.out_features, module.to_k.in_features)
            have = (proc.hidden_size, proc.cross_attention_dim)
            if want != have:
                bad.append(f"{name}: adapter (hidden, cross) {have} vs UNet {want}")
        if bad:
            raise ValueError("adapter does not fit this UNet:\n  " + "\n  ".join(bad))

    def attach(self, unet: nn.Module) -> None:
        self.check_compatible(unet)
        passthrough = DecoupledAttnProcessor()  # stateless: accepts and ignores streams
        ours = dict(self.layers.items())
        procs = {name: ours.get(str(idx), passthrough) for idx, name in enumerate(self._all_processor_names)}
        unet.set_attn_processor(procs)
        DecoupledAttention._remove_grid_hook(unet)
        # positional branches and confined tokens need the input's (h, w) to place each layer's queries
        processors = self.processors()

        def tell_grid(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            for proc in processors:
                proc.latent_grid = tuple(sample.shape[-2:])

        unet._decoupled_grid_hook = unet.register_forward_pre_hook(tell_grid, with_kwargs=True)

    @staticmethod
    def _remove_grid_hook(unet: nn.Module) -> None:
        handle = unet.__dict__.pop("_decoupled_grid_hook", None)
        if handle is not None:
            handle.remove()

    @staticmethod
    def detach(unet: nn.Module) -> None:
        DecoupledAttention._remove_grid_hook(unet)
        unet.set_attn_processor(AttnProcessor2_0())

    def set_scale(self, scale: Scale, stream: str = "ip") -> None:
        if stream not in self.stream_names:
            raise ValueError(f"unknown stream {stream!r}; this adapter has {list(self.stream_names)}")
        for proc, value in zip(self.processors(), expand_scale(scale, list(self.layers_by_name()))):
            proc.scale[stream] = float(value)

    def get_scale(self, stream: str = "ip") -> list[float]:
        return [p.scale[stream] for p in self.processors()]

    @contextmanager
    def recording(self, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
        """Install ``recorder`` in every cross-attention layer for the duration of the block."""
        if recorder.stream not in self.stream_names:
            raise ValueError(
                f"unknown stream {recorder.stream!r}; this adapter has {list(self.stream_names)}"
            )
        for proc in self.processors():
            proc.recorder = recorder
        try:
            yield recorder
        finally:
            for proc in self.processors():
                proc.recorder = None

    @contextmanager
    def caching(self) -> Iterator[None]:
        """Within the block, each cross-attention layer projects a constant token sequence (the text, each
        stream) to K/V once and reuses it at every later step. For one generation under ``no_grad``: the
        cache holds the tensors it was given alive, and it is emptied when the block ends."""
        if torch.is_grad_enabled():
            raise RuntimeError("K/V caching is for inference: use it under torch.no_grad()")
        for proc in self.processors():
            proc.kv_cache = KVCache()
        try:
            yield
        finally:
            for proc in self.processors():
                proc.kv_cache = None

    def layers_by_name(self) -> dict[str, DecoupledAttnProcessor]:
        return {p.layer_name: p for p in self.processors()}


def expand_scale(scale: Scale, layer_names: Sequence[str]) -> list[float]:
    """One float per cross-attention layer (in processor order) from a float, list or per-block dict.

    The dict form follows diffusers' ``set_ip_adapter_scale``: keys "down", "mid", "up"; a value is a
    float for the whole part, or {"block_i": float | [one float per transformer in the block]}.
    Parts and blocks that are not named get scale 0, as in diffusers.
    """
    n = len(layer_names)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return [float(scale)] * n
    if isinstance(scale, Mapping):
        return _expand_block_dict(scale, layer_names)
    if isinstance(scale, Sequence) and not isinstance(scale, str):
        values = list(scale)
        if len(values) != n:
            raise ValueError(
                f"a scale list needs one value per cross-attention layer ({n}), got {len(values)}"
            )
        return [float(v) for v in values]
    raise TypeError(
        f"scale must be a float, a list of floats or a per-block dict, got {type(scale).__name__}"
    )


def _expand_block_dict(scale: Mapping, layer_names: Sequence[str]) -> list[float]:
    unknown = set(scale) - {"down", "mid", "up"}
    if unknown:
        raise ValueError(f"scale dict keys must be 'down', 'mid', 'up'; got {sorted(unknown)}")
    # Group layers: "down_blocks.2.attentions.1...." -> ("down", 2, 1); "mid_block.attentions.0" -> ("mid",)
    per_block: dict[tuple[str, int], list[int]] = {}
    parsed = []
    for name in layer_names:
        parts = name.split(".")
        if parts[0] == "mid_block":
            parsed.append(("mid", 0, 0))
            continue
        part = parts[0].removesuffix("_blocks")
        block, transformer = int(parts[1]), int(parts[3])
        parsed.append((part, block, transformer))
        per_block.setdefault((part, block), [])
        if transformer not in per_block[(part, block)]:
            per_block[(part, block)].append(transformer)

    values = []
    for part, block, transformer in parsed:
        spec = scale.get(part, 0.0)
        if part == "mid":
            if isinstance(spec, Sequence) and not isinstance(spec, str):
                if len(spec) != 1:
                    raise ValueError(f"expected 1 scale for mid, got {len(spec)}")
                spec = spec[0]
            values.append(float(spec))
            continue
        if isinstance(spec, Mapping):
            bad = [k for k in spec if k not in {f"block_{b}" for p, b in per_block if p == part}]
            if bad:
                raise ValueError(f"scale dict names {part} blocks {bad}, which have no cross-attention")
            spec = spec.get(f"block_{block}", 0.0)
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            count = len(per_block[(part, block)])
            if len(spec) == 1:
                spec = list(spec) * count
            if len(spec) != count:
                raise ValueError(f"expected {count} scales for {part}.block_{block}, got {len(spec)}")
            spec = spec[per_block[(part, block)].index(transformer)]
        values.append(float(spec))
    return values
