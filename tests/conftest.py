"""Shared fixtures. Keep each fixture top-level and self-contained: several suites add theirs here."""

import pytest

from mlx_vlm_qwen3vl.builder import build_checkpoint

from helpers import use_accelerator_ops


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny random Qwen3-VL: tied embeddings, float32, seed 0."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), shape="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_untied(tmp_path_factory):
    """The tiny random Qwen3-VL with a separate lm_head and q/k/v/o biases, float32, seed 1."""
    return build_checkpoint(
        tmp_path_factory.mktemp("tiny_checkpoint_untied"),
        shape="tiny",
        seed=1,
        tie_word_embeddings=False,
        attention_bias=True,
    )


@pytest.fixture(params=["cpu kernels", "accelerator ops"])
def code_path(request, monkeypatch):
    """The model's two code paths: on the CPU (native kernels, split
    products) and off it (helpers.use_accelerator_ops)."""
    if request.param == "accelerator ops":
        use_accelerator_ops(monkeypatch)
    return request.param
