"""The precisions a base runs in, by the names settings use (``--dtype``, ``model.base.dtype``)."""

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
