"""The combined Qwen3-VL model against transformers' Qwen3VLForConditionalGeneration
(float32, PyTorch CPU) on the tiny random checkpoints: logits at every position,
greedy generation, left-padded batches, and weight loading errors."""

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from tokenizers import Tokenizer
from transformers import Qwen3VLForConditionalGeneration

from mlx_vlm.generate.ar import BatchGenerator, _split_prompt_kwargs_per_row, generate_step
from mlx_vlm.models.cache import BatchKVCache, make_prompt_cache
from mlx_vlm.utils import StoppingCriteria, load_model
from mlx_vlm_qwen3vl.qwen3_vl import Model
from mlx_vlm_qwen3vl.qwen3_vl.rope import InterleavedMRoPE

from helpers import copy_checkpoint_with, drain, ours_kwargs, prompt_kwargs, single_run

TOL = 1e-4
VISION_START, VISION_END, IMAGE, VIDEO = 151652, 151653, 151655, 151656
PATCH_DIM = 3 * 2 * 16 * 16  # channels x temporal patch x patch^2
IMAGE_A, IMAGE_B = (1, 6, 8), (1, 4, 10)  # 12 and 10 merged tokens
VIDEO_GRID = (3, 4, 6)  # three temporal groups of 6 merged tokens


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=["tied", "untied"])
def pair(request, tiny_checkpoint, tiny_checkpoint_untied):
    path = tiny_checkpoint if request.param == "tied" else tiny_checkpoint_untied
    ours = load_model(Path(path))
    assert isinstance(ours, Model)
    reference = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return SimpleNamespace(ours=ours, reference=reference, path=Path(path), name=request.param)


@pytest.fixture(scope="module")
def model(tiny_checkpoint_untied):
    """Ours alone, for the tests whose reference is our own single-prompt run."""
    return load_model(Path(tiny_checkpoint_untied))


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_file(str(Path(tiny_checkpoint) / "tokenizer.json"))


def _pixels(n_patches, seed):
    return np.random.default_rng(seed).standard_normal((n_patches, PATCH_DIM)).astype(np.float32)


def _tokens(t, n):
    return [VISION_START] + [t] * n + [VISION_END]


def _prompts(tok):
    text = lambda s: tok.encode(s).ids  # noqa: E731
    image_a, image_b = _pixels(48, 1), _pixels(40, 2)
    video = _pixels(3 * 24, 3)
    frames = []
    for second in (0.5, 2.5, 4.5):
        frames += text(f"<{second} seconds>") + _tokens(VIDEO, 6)
    return {
        "text": (text("Write a short poem about the sea and the sky."), {}),
        "one image": (
            text("Look:") + _tokens(IMAGE, 12) + text("What is in this picture?"),
            {"pixel_values": image_a, "image_grid_thw": [IMAGE_A]},
        ),
        "two images": (
            text("First") + _tokens(IMAGE, 12) + text("then") + _tokens(IMAGE, 10) + text("Compare them."),
            {"pixel_values": np.concatenate([image_a, image_b]), "image_grid_thw": [IMAGE_A, IMAGE_B]},
        ),
        "video": (
            text("Watch:") + frames + text("What happens?"),
            {"pixel_values_videos": video, "video_grid_thw": [VIDEO_GRID]},
        ),
        "image and video": (
            text("An image") + _tokens(IMAGE, 10) + text("and a video") + frames + text("Same scene?"),
            {
                "pixel_values": image_b,
                "image_grid_thw": [IMAGE_B],
                "pixel_values_videos": video,
                "video_grid_thw": [VIDEO_GRID],
            },
        ),
    }


def _reference_logits(reference, ids, media):
    ids = np.array([ids])
    token_types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    kwargs = {k: torch.tensor(np.array(v)) for k, v in media.items()}
    with torch.no_grad():
        return reference(
            input_ids=torch.tensor(ids), mm_token_type_ids=torch.tensor(token_types), **kwargs
        ).logits[0].numpy()


# ------------------------------------------------------------------ logits
@pytest.mark.parametrize("case", ["text", "one image", "two images", "video", "image and video"])
def test_logits_match_transformers(pair, tokenizer, case, code_path):
    ids, media = _prompts(tokenizer)[case]
    expected = _reference_logits(pair.reference, ids, media)
    pixels, kwargs = ours_kwargs(media)
    got = np.array(pair.ours(mx.array([ids]), pixels, **kwargs).logits[0])
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL


def test_visual_inputs_and_3d_positions_change_the_logits(pair, tokenizer):
    """Guards the parity test against passing vacuously."""
    ids, media = _prompts(tokenizer)["two images"]
    pixels, kwargs = ours_kwargs(media)
    lm = pair.ours.language_model
    features = pair.ours.get_input_embeddings(mx.array([ids]), pixels, **kwargs)
    full = np.array(pair.ours(mx.array([ids]), pixels, **kwargs).logits[0])
    text_positions = lm(mx.array([ids]), inputs_embeds=features.inputs_embeds,
                        deepstack_visual_embeds=features.deepstack_visual_embeds).logits[0]
    no_deepstack = lm(mx.array([ids]), inputs_embeds=features.inputs_embeds,
                      position_ids=features.position_ids).logits[0]
    other_pixels = pair.ours(mx.array([ids]), pixels * 0.5, **kwargs).logits[0]
    for variant in (text_positions, no_deepstack, other_pixels):
        assert np.abs(np.array(variant) - full).max() > 100 * TOL


def test_rope_of_equal_axes_is_plain_rope():
    rope = InterleavedMRoPE(16, 5_000_000.0, [4, 2, 2])
    x = mx.random.normal((2, 3, 5, 16), key=mx.random.key(0))
    ids = mx.broadcast_to((mx.arange(5) + 7)[None, None], (3, 2, 5))
    general = rope.apply(x, rope.angles(ids))
    assert np.abs(np.array(general - rope.apply(x, 7))).max() < 1e-5
    per_row = rope.apply(x, mx.array([7, 2]))
    ids_rows = mx.broadcast_to((mx.arange(5)[None] + mx.array([[7], [2]]))[None], (3, 2, 5))
    assert np.abs(np.array(per_row - rope.apply(x, rope.angles(ids_rows)))).max() < 1e-5


@pytest.mark.parametrize("case", ["two images", "image and video"])
def test_rope_index_matches_transformers(pair, tokenizer, case):
    ids, media = _prompts(tokenizer)[case]
    arr = np.array([ids])
    token_types = np.where(arr == IMAGE, 1, np.where(arr == VIDEO, 2, 0))
    grids = {k: media.get(k) for k in ("image_grid_thw", "video_grid_thw")}
    expected, expected_deltas = pair.reference.model.get_rope_index(
        torch.tensor(arr),
        torch.tensor(token_types),
        **{k: None if v is None else torch.tensor(v) for k, v in grids.items()},
    )
    got, deltas = pair.ours.language_model.get_rope_index(
        mx.array(arr), *(None if v is None else mx.array(v) for v in grids.values())
    )
    np.testing.assert_array_equal(np.array(got), expected.numpy())
    np.testing.assert_array_equal(np.array(deltas), expected_deltas.numpy())


# ------------------------------------------------------------------ generation
def _reference_greedy(reference, ids, media, n):
    arr = np.array([ids])
    token_types = np.where(arr == IMAGE, 1, np.where(arr == VIDEO, 2, 0))
    kwargs = {k: torch.tensor(np.array(v)) for k, v in media.items()}
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor(arr), mm_token_type_ids=torch.tensor(token_types),
            do_sample=False, max_new_tokens=n, min_new_tokens=n, **kwargs,
        )
    tokens = out[0, arr.shape[1]:].tolist()
    # Teacher-forced logits of the whole sequence check every decode step.
    full = np.array(ids + tokens[:-1])
    types = np.concatenate([token_types[0], np.zeros(n - 1, dtype=token_types.dtype)])
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor(full[None]), mm_token_type_ids=torch.tensor(types[None]),
                           **kwargs).logits[0, len(ids) - 1:].numpy()
    return tokens, logits


def test_greedy_generation_matches_transformers(pair, tokenizer, code_path):
    """16 greedy tokens and the logits of every decode step; the tied model on
    two images, the untied one on a video."""
    n = 16
    case = "two images" if pair.name == "tied" else "video"
    ids, media = _prompts(tokenizer)[case]
    expected, expected_logits = _reference_greedy(pair.reference, ids, media, n)
    assert len(set(expected)) >= 3, "the reference output is degenerate; the test would be weak"

    pixels, kwargs = ours_kwargs(media)
    cache = make_prompt_cache(pair.ours.language_model)
    logits = pair.ours(mx.array([ids]), pixels, cache=cache, **kwargs).logits[:, -1]
    tokens, worst = [], 0.0
    for step in range(n):
        worst = max(worst, np.abs(np.array(logits[0]) - expected_logits[step]).max())
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        logits = pair.ours.language_model(mx.array([[tokens[-1]]]), cache=cache).logits[:, -1]
    assert tokens == expected
    assert worst <= TOL

    # mlx-vlm's own generation loop, with chunked prefill.
    steps = generate_step(mx.array([ids]), pair.ours, pixels, None, max_tokens=n,
                          temperature=0.0, prefill_step_size=7, **kwargs)
    assert [t for t, _ in steps] == expected


def test_prompt_cache_reuse_continues_an_image_conversation(model, tokenizer):
    """mlx-vlm's multi-turn prompt-cache reuse: the next turn prefills only the
    new text on top of the cached image prompt, with positions primed from the
    whole prompt (`_prime_cached_prefix_rope_state`)."""
    from mlx_vlm.generate.dispatch import _prime_cached_prefix_rope_state

    ids, media = _prompts(tokenizer)["two images"]
    pixels, kwargs = ours_kwargs(media)
    cache = make_prompt_cache(model.language_model)
    first = [t for t, _ in generate_step(mx.array([ids]), model, pixels, None, max_tokens=6,
                                         temperature=0.0, prompt_cache=cache, **kwargs)]
    follow_up = ids + first + tokenizer.encode("And the colours?").ids
    cold = [t for t, _ in generate_step(mx.array([follow_up]), model, pixels, None,
                                        max_tokens=6, temperature=0.0, **kwargs)]
    cached = len(ids) + len(first) - 1  # the last generated token was never fed
    for c in cache:
        c.trim(c.offset - cached)
    mask = mx.ones((1, len(follow_up)), dtype=mx.int32)
    assert _prime_cached_prefix_rope_state(model, mx.array([follow_up]), mask, kwargs)
    warm = generate_step(mx.array([follow_up[cached:]]), model, None, mask, max_tokens=6,
                         temperature=0.0, prompt_cache=cache, prefill_step_size=3, **kwargs)
    assert [t for t, _ in warm] == cold


# ------------------------------------------------------------------ batches
def _batch_rows(tok):
    prompts = _prompts(tok)
    return [prompts["text"], prompts["two images"], prompts["image and video"]]


@pytest.fixture(scope="module")
def single_runs(model, tokenizer):
    """Each batch row run alone: logits of the prompt and of 5 greedy steps."""
    return [single_run(model, ids, media, 5) for ids, media in _batch_rows(tokenizer)]


def _left_padded(rows):
    """Token ids and mask of the left-padded batch, and its media (images and
    videos of all rows, in row order) as our model's keyword arguments."""
    length = max(len(ids) for ids, _ in rows)
    pads = [length - len(ids) for ids, _ in rows]
    ids = mx.array([[0] * p + ids for p, (ids, _) in zip(pads, rows)])
    mask = mx.array([[0] * p + [1] * (length - p) for p in pads])
    media = {}
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        having = [m for _, m in rows if pixels in m]
        media[pixels] = mx.array(np.concatenate([m[pixels] for m in having]))
        media[grid] = mx.array([g for m in having for g in m[grid]])
    return ids, mask, pads, media


@pytest.mark.parametrize("cache_kind", ["plain", "batch"])
def test_left_padded_batch_matches_single_runs(model, tokenizer, single_runs, cache_kind, code_path):
    n = 4
    rows = _batch_rows(tokenizer)
    singles = single_runs
    ids, mask, pads, media = _left_padded(rows)
    lm = model.language_model
    if cache_kind == "plain":
        cache = make_prompt_cache(lm)
    else:
        cache = [BatchKVCache(pads) for _ in lm.layers]
    logits = model(ids, mask=mask, cache=cache, **media).logits
    for row, (steps, _) in enumerate(singles):
        assert np.abs(np.array(logits[row, pads[row]:]) - steps[0]).max() <= TOL
    for step in range(n):
        tokens = mx.array([[tokens[step]] for _, tokens in singles])
        logits = lm(tokens, cache=cache).logits
        for row, (steps, _) in enumerate(singles):
            assert np.abs(np.array(logits[row, -1]) - steps[step + 1]).max() <= TOL


@pytest.mark.parametrize("embedding", ["one padded batch", "one request per row"])
def test_host_batch_generator_matches_single_runs(model, tokenizer, single_runs, embedding):
    """mlx-vlm's BatchGenerator with chunked prefill, fed as batch_generate feeds
    it (one padded batch) and as the server does (rows embedded separately)."""
    n = 5
    rows = _batch_rows(tokenizer)
    expected = [tokens for _, tokens in single_runs]
    processor = SimpleNamespace(tokenizer=SimpleNamespace(stopping_criteria=StoppingCriteria([], None)))
    generator = BatchGenerator(model.language_model, processor, prefill_batch_size=3,
                               completion_batch_size=3, compute_logprobs=False, prefill_step_size=8)
    if embedding == "one padded batch":
        ids, mask, _, media = _left_padded(rows)
        pixels = media.pop("pixel_values")
        features = model.get_input_embeddings(ids, pixels, mask=mask, **media)
        kwargs = prompt_kwargs(features, **{k: v for k, v in media.items() if "grid" in k})
        uids = generator.insert(ids, n, prompt_kwargs=_split_prompt_kwargs_per_row(kwargs, 3),
                                attention_mask=mask)
    else:
        kwargs = []
        for ids, media in rows:
            pixels, extra = ours_kwargs(media)
            kwargs.append(prompt_kwargs(model.get_input_embeddings(mx.array([ids]), pixels, **extra), **extra))
        uids = generator.insert([ids for ids, _ in rows], n, prompt_kwargs=kwargs)
    assert drain(generator, uids) == expected


def test_text_only_prompt_takes_the_plain_path(model, tokenizer, monkeypatch):
    def no_vision(*args, **kwargs):
        raise AssertionError("the vision tower ran for a text-only prompt")

    monkeypatch.setattr(type(model.vision_tower), "__call__", no_vision)
    ids, _ = _prompts(tokenizer)["text"]
    features = model.get_input_embeddings(mx.array([ids]))
    positions = np.array(features.position_ids)
    assert (positions == np.arange(len(ids))).all() and positions.shape == (3, 1, len(ids))
    assert np.array(features.rope_deltas).tolist() == [[0]]
    assert not np.array(features.deepstack_visual_embeds).any()
    assert not np.array(features.visual_pos_masks).any()


def test_cached_image_features_are_used(model, tokenizer):
    """The host's vision-feature caches: `cached_image_features` (generate) and
    `vision_cache` + `_image_key` (server)."""
    ids, media = _prompts(tokenizer)["one image"]
    pixels, kwargs = ours_kwargs(media)
    expected = np.array(model(mx.array([ids]), pixels, **kwargs).logits)
    cached = model.encode_images(pixels, **kwargs)
    got = model(mx.array([ids]), pixels * 0, cached_image_features=cached, **kwargs).logits
    assert np.abs(np.array(got) - expected).max() == 0

    store = {}
    cache = SimpleNamespace(get=store.get, put=store.__setitem__)
    model.get_input_embeddings(mx.array([ids]), pixels, vision_cache=cache, _image_key="k", **kwargs)
    assert "k" in store
    got = model(mx.array([ids]), pixels * 0, vision_cache=cache, _image_key="k", **kwargs).logits
    assert np.abs(np.array(got) - expected).max() == 0


def test_placeholder_and_feature_count_mismatch_is_a_clear_error(model, tokenizer):
    ids, media = _prompts(tokenizer)["one image"]
    ids = [t for i, t in enumerate(ids) if not (t == IMAGE and i == ids.index(IMAGE))]
    pixels, kwargs = ours_kwargs(media)
    with pytest.raises(ValueError, match=r"11 image placeholder tokens.*12 image features"):
        model(mx.array([ids]), pixels, **kwargs)


# ------------------------------------------------------------------ weights


def test_missing_weight_is_named(tiny_checkpoint, tmp_path):
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    path = copy_checkpoint_with(Path(tiny_checkpoint), tmp_path / "missing", lambda w: w.pop(key))
    with pytest.raises(ValueError) as error:
        load_model(path)
    # as the file names it, and as a converted checkpoint would
    assert f"{key} (language_model.model.layers.1.mlp.up_proj.weight when converted)" in str(error.value)


@pytest.mark.parametrize(
    "key, loaded_name",
    [
        ("model.language_model.layers.0.mlp.extra_proj.weight", "language_model.model.layers.0.mlp.extra_proj.weight"),
        ("model.visual.blocks.0.extra_proj.weight", "vision_tower.blocks.0.extra_proj.weight"),
    ],
)
def test_unexpected_weight_is_named(tiny_checkpoint, tmp_path, key, loaded_name):
    path = copy_checkpoint_with(Path(tiny_checkpoint), tmp_path / "extra", lambda w: w.__setitem__(key, mx.zeros((2, 2))))
    with pytest.raises(ValueError, match=loaded_name.replace(".", r"\.")):
        load_model(path)


def test_untied_checkpoint_without_lm_head_is_a_clear_error(tiny_checkpoint_untied, tmp_path):
    path = copy_checkpoint_with(Path(tiny_checkpoint_untied), tmp_path / "headless", lambda w: w.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head"):
        load_model(path)


def test_tied_checkpoint_with_a_stray_lm_head_loads(tiny_checkpoint, tmp_path):
    def add_head(w):
        w["lm_head.weight"] = w["model.language_model.embed_tokens.weight"]

    model = load_model(copy_checkpoint_with(Path(tiny_checkpoint), tmp_path / "stray", add_head))
    assert "language_model.lm_head.weight" not in dict(tree_flatten(model.parameters()))


def test_converted_and_quantized_checkpoints_load(tiny_checkpoint_untied, tmp_path):
    """mlx-vlm's own conversion (already-converted names, 4-bit) loads strictly."""
    from mlx_vlm.convert import convert

    reference = load_model(Path(tiny_checkpoint_untied))
    ids = mx.array([[9707, 11, 1879, 0, 3555, 374, 419]])
    expected = np.array(reference(ids).logits)
    for name, quantize in (("converted", False), ("q4", True)):
        out = tmp_path / name
        convert(str(tiny_checkpoint_untied), mlx_path=str(out), quantize=quantize, q_bits=4, q_group_size=64)
        model = load_model(out)
        got = np.array(model(ids).logits)
        if quantize:
            assert type(model.language_model.lm_head).__name__ == "QuantizedLinear"
            assert np.isfinite(got).all() and got.shape == expected.shape
        else:
            assert np.abs(got - expected).max() <= TOL


# ------------------------------------------------------------------ end to end
def test_mlx_vlm_generate_and_batch_generate_match_transformers(tiny_checkpoint_untied):
    """The host's public API (load, generate, batch_generate) on real images,
    against transformers' greedy on the same processed inputs."""
    from PIL import Image

    from mlx_vlm import load
    from mlx_vlm.generate import batch_generate, generate
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs

    n = 8
    model, processor = load(str(tiny_checkpoint_untied))
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random(shape) * 255).astype(np.uint8)) for shape in [(64, 96, 3), (80, 48, 3)]]
    questions = ["Describe this image.", "What is this?", "Say hello."]

    def reference_greedy(question, image):
        prompt = apply_chat_template(processor, model.config, question, num_images=int(image is not None))
        inputs = prepare_inputs(processor, images=None if image is None else [image], prompts=prompt)
        ids = np.array(inputs["input_ids"])
        media = {k: torch.tensor(np.array(inputs[k])) for k in ("pixel_values", "image_grid_thw") if k in inputs}
        with torch.no_grad():
            out = reference.generate(input_ids=torch.tensor(ids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
                                     do_sample=False, max_new_tokens=n, min_new_tokens=n, **media)
        return prompt, out[0, ids.shape[1]:].tolist()

    reference = Qwen3VLForConditionalGeneration.from_pretrained(tiny_checkpoint_untied, dtype=torch.float32).eval()
    expected = [reference_greedy(q, image) for q, image in zip(questions, images + [None])]
    decode = processor.tokenizer.decode
    for (prompt, tokens), image in zip(expected, images + [None]):
        result = generate(model, processor, prompt, image=None if image is None else [image],
                          max_tokens=n, temperature=0.0)
        assert result.token_ids == tokens

    batch = batch_generate(model, processor, images=images, prompts=questions, max_tokens=n)
    assert batch.texts == [decode(tokens) for _, tokens in expected]
