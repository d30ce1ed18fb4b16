"""Label embeddings for scene-graph nodes and edges.

Open vocabulary (the default): an object is its attributes and name ("red circle"), a predicate its
phrase ("left of"); each string is embedded once with the base model's *frozen* CLIP text encoder
(the pooled, final-LayerNorm EOS state) and cached, so no closed vocabulary is needed.
``LearnedVocabulary`` is the sg2im-style alternative: one trainable vector per known string.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class LabelEmbedder:
    """Frozen CLIP text embeddings of strings, cached per string (on CPU, float32).

    Not an ``nn.Module`` on purpose: it holds a reference to the frozen text encoder, which must never
    be trained or saved with the adapter.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, max_cache: int = 200_000):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_cache = max_cache
        self.cache: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0

    @property
    def dim(self) -> int:
        return self.text_encoder.config.hidden_size

    @torch.no_grad()
    def _encode(self, strings: list[str]) -> torch.Tensor:
        device = next(self.text_encoder.parameters()).device
        ids = self.tokenizer(
            strings,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(device)
        self.encoder_calls += 1
        return self.text_encoder(input_ids=ids).pooler_output.float().cpu()  # (n, hidden)

    def __call__(self, strings: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """(len(strings), dim); unique uncached strings are embedded in batches, each once."""
        if not strings:
            return torch.zeros(0, self.dim)
        missing = list(dict.fromkeys(s for s in strings if s not in self.cache))
        new: dict[str, torch.Tensor] = {}
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            new.update(zip(chunk, self._encode(chunk)))
        out = torch.stack([new[s] if s in new else self.cache[s] for s in strings])
        for s, e in new.items():
            if len(self.cache) >= self.max_cache:
                self.cache.pop(next(iter(self.cache)))  # oldest first
            self.cache[s] = e
        return out


class LearnedVocabulary(nn.Module):
    """A closed vocabulary with one trainable vector per string (index 0 is ``<unk>``), as in sg2im."""

    def __init__(self, vocabulary: Sequence[str], dim: int):
        super().__init__()
        self.vocabulary = list(dict.fromkeys(vocabulary))
        self.index = {s: i + 1 for i, s in enumerate(self.vocabulary)}
        self.embedding = nn.Embedding(len(self.vocabulary) + 1, dim)
        self.dim = dim

    def forward(self, strings: Sequence[str]) -> torch.Tensor:
        ids = torch.tensor(
            [self.index.get(s, 0) for s in strings], dtype=torch.long, device=self.embedding.weight.device
        )
        return self.embedding(ids)

    def unknown(self, strings: Sequence[str]) -> list[str]:
        return sorted({s for s in strings if s not in self.index})
