"""Bad input reaches the user as a clear error naming the problem and the fix."""


import mlx.core as mx
import pytest

from mlx_vlm.generate import generate
from mlx_vlm.utils import load
from mlx_vlm_qwen3vl.builder import build_checkpoint


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("short"), shape="tiny", seed=2, max_position_embeddings=48)
    return load(str(path))


def test_over_long_prompt_is_refused_before_the_model_runs(short_context):
    model, processor = short_context
    with pytest.raises(ValueError, match=r"the prompt has 60 tokens but this model handles at most 48.*shorten"):
        model.get_input_embeddings(mx.zeros((1, 60), dtype=mx.int32))
    with pytest.raises(ValueError, match=r"handles at most 48"):
        generate(model, processor, "word " * 60, max_tokens=2, temperature=0.0, verbose=False)


def test_prompt_within_the_limit_runs(short_context):
    model, processor = short_context
    result = generate(model, processor, "Hi", max_tokens=2, temperature=0.0, verbose=False)
    assert result.generation_tokens == 2 and 0 < result.prompt_tokens <= 48


def test_more_placeholders_than_images_names_both_counts(short_context):
    model, processor = short_context
    ids = mx.array([[151652, 151655, 151655, 151653, 100]], dtype=mx.int32)
    with pytest.raises(ValueError, match=r"2 image placeholder tokens but pixel_values gave 0"):
        model.get_input_embeddings(ids)
