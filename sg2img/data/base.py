"""The source interface: a map-style dataset of ``Example`` rows that never raises on a bad row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from sg2img.data.rows import Example, Skipped, skipped


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB, so a truncated file fails here, inside the row; the error
    names the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except OSError as e:
        if str(path) in str(e):
            raise
        raise OSError(f"{path}: {e}") from e


class RowSource(Dataset):
    """Rows of one dataset. Subclasses index lazily (``_index``) and decode one row (``example``).

    ``__getitem__`` returns the transformed row, or a ``Skipped`` marker when the row cannot be read: an
    unreadable image or a malformed annotation is counted by the trainer, never fatal.
    """

    transform: Callable[[Example], Any] | None = None

    def __len__(self) -> int:
        return len(self._rows())

    def _rows(self) -> list[Any]:
        if getattr(self, "_cache", None) is None:
            self._cache = self._index()
        return self._cache

    def _index(self) -> list[Any]:
        raise NotImplementedError

    def key(self, i: int) -> str:
        return f"{type(self).__name__}[{i}]"

    def example(self, i: int) -> Example:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):  # out of range is an error (and ends plain iteration), never a skip
            raise IndexError(f"{type(self).__name__}: row {i} out of range ({len(self)} rows)")
        try:
            ex = self.example(i)
            return self.transform(ex) if self.transform is not None else ex
        except Exception as e:  # a bad row is data, not a crash: counted and logged by the trainer
            return skipped(self.key(i), e)


__all__ = ["RowSource", "Skipped", "open_image"]
