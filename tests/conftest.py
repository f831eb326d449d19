"""Shared fixtures: tiny random LLaVA-1.5 and LLaVA-NeXT model directories, built offline."""

import numpy as np
import pytest

import llava_lens as ll
from llava_lens.toy.build import build_llava


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llava"
    build_llava(path, "llava", seed=0)
    return path


@pytest.fixture(scope="session")
def next_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-llava-next"
    build_llava(path, "llava_next", seed=1)
    return path


@pytest.fixture(scope="session")
def lens(llava_dir):
    return ll.load(str(llava_dir), device="cpu")


@pytest.fixture(scope="session")
def next_lens(next_dir):
    return ll.load(str(next_dir), device="cpu")


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return (rng.random((40, 56, 3)) * 255).astype("uint8")


@pytest.fixture(scope="session")
def prefill_trace(lens):
    """A 4-step trace of the tiny LLaVA-1.5 with the prefill cache (what the views read)."""
    rng = np.random.default_rng(0)
    image = (rng.random((40, 56, 3)) * 255).astype("uint8")
    return lens.trace(image, "what color is the circle ?", max_new_tokens=4, prefill_cache=True)
