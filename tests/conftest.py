"""Shared fixtures: everything on the tiny preset, built from configs with random weights (no downloads)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from ip_adapter import ImageFeatures
from sg2img.base.components import Components, build_components, get_preset

# Property-based tests: `make test` and CI draw the same examples every run (profile "ci", derandomised);
# HYPOTHESIS_PROFILE=random draws new ones each run, to search further.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("random", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_session() -> Components:
    return build_components("tiny", seed=0)


@pytest.fixture
def tiny(tiny_session: Components) -> Components:
    """A private copy: tests may install processors or change weights."""
    return copy.deepcopy(tiny_session)


@pytest.fixture
def tiny_preset():
    return get_preset("tiny")


@pytest.fixture
def features(tiny_session: Components) -> ImageFeatures:
    g = torch.Generator().manual_seed(1)
    spec = tiny_session.image_encoder.spec
    pixels = torch.randn(2, 3, spec.image_size, spec.image_size, generator=g)
    with torch.no_grad():
        return tiny_session.image_encoder(pixels)


@pytest.fixture
def unet_inputs(tiny_session: Components):
    """(latents, timestep, text tokens) for a batch of 2."""
    g = torch.Generator().manual_seed(2)
    size = tiny_session.unet.config.sample_size
    latents = torch.randn(2, 4, size, size, generator=g)
    text = torch.randn(2, 77, tiny_session.unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor([10, 500]), text
