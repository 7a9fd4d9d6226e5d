"""Parity of the MLX vision tower with transformers' Qwen3VLVisionModel on a
tiny random float32 model whose every parameter (biases and LayerNorms
included) is perturbed away from its initial value."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import load_file
from transformers.models.qwen3_vl.configuration_qwen3_vl import (
    Qwen3VLConfig,
    Qwen3VLVisionConfig,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from mlx_vlm_qwen3vl.qwen3_vl.config import VisionConfig
from mlx_vlm_qwen3vl.qwen3_vl.vision import VisionModel

TINY = dict(
    depth=4,
    hidden_size=64,
    hidden_act="gelu_pytorch_tanh",
    intermediate_size=128,
    num_heads=4,
    in_channels=3,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=48,
    # A 12 x 12 learned grid: every test grid below needs real resampling.
    num_position_embeddings=144,
    deepstack_visual_indexes=[0, 2, 3],
)
PATCH_DIM = 3 * 2 * 16 * 16
TOLERANCE = 1e-4

IMAGE = (1, 8, 12)
SMALL_IMAGE = (1, 6, 10)
VIDEO = (3, 4, 8)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = Qwen3VLVisionModel(Qwen3VLVisionConfig(**TINY)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def torch_weights(reference):
    return {
        f"vision_tower.{k}": mx.array(v.numpy())
        for k, v in reference.state_dict().items()
    }


def load(weights: dict, config: dict = TINY) -> VisionModel:
    model = VisionModel(VisionConfig.from_dict(config))
    weights = model.sanitize(weights)
    prefix = "vision_tower."
    model.load_weights(
        [(k[len(prefix) :], v) for k, v in weights.items() if k.startswith(prefix)],
        strict=True,
    )
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def model(torch_weights):
    return load(torch_weights)


def pixels(grid, seed=0):
    rows = sum(t * h * w for t, h, w in grid)
    values = np.random.default_rng(seed).standard_normal((rows, PATCH_DIM))
    return values.astype(np.float32)


def run_reference(reference, values, grid):
    with torch.no_grad():
        out = reference(torch.from_numpy(values), torch.tensor(grid))
    return out.pooler_output.numpy(), [d.numpy() for d in out.deepstack_features]


def run_mlx(model, values, grid):
    merged, deepstack = model(mx.array(values), mx.array(grid))
    mx.eval(merged, deepstack)
    return np.array(merged), [np.array(d) for d in deepstack]


def assert_parity(model, reference, grid):
    values = pixels(grid)
    expected, expected_deepstack = run_reference(reference, values, grid)
    merged, deepstack = run_mlx(model, values, grid)
    n_merged = sum(t * h * w for t, h, w in grid) // 4
    assert merged.shape == expected.shape == (n_merged, TINY["out_hidden_size"])
    assert np.abs(merged - expected).max() <= TOLERANCE
    assert len(deepstack) == len(expected_deepstack) == 3
    for ours, theirs in zip(deepstack, expected_deepstack):
        assert ours.shape == theirs.shape
        assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize(
    "grid",
    [
        [IMAGE],
        [IMAGE, SMALL_IMAGE],
        [VIDEO],
        # Out of size order, with two same-size images apart from each other.
        [IMAGE, SMALL_IMAGE, VIDEO, IMAGE],
    ],
    ids=["one_image", "two_sizes", "video", "mix"],
)
def test_matches_reference(model, reference, grid, code_path):
    assert_parity(model, reference, grid)


def test_mlx_layout_checkpoint_loads_identically(torch_weights, model, reference):
    key = "vision_tower.patch_embed.proj.weight"
    converted = dict(torch_weights)
    converted[key] = mx.array(np.array(torch_weights[key]).transpose(0, 2, 3, 4, 1))
    from_mlx_layout = load(converted)
    ours = dict(tree_flatten(model.parameters()))
    theirs = dict(tree_flatten(from_mlx_layout.parameters()))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert mx.array_equal(ours[name], theirs[name]), name
    assert_parity(from_mlx_layout, reference, [IMAGE, VIDEO])


def test_sanitize_drops_unknown_vision_keys_only(model, torch_weights):
    weights = dict(torch_weights)
    weights["vision_tower.position_ids"] = mx.arange(4)
    weights["vision_tower.blocks.0.attn.qkv.scales"] = mx.zeros((1,))
    weights["language_model.model.embed_tokens.weight"] = mx.zeros((2, 3))
    weights["lm_head.weight"] = mx.ones((2, 3))
    sanitized = model.sanitize(weights)
    assert "vision_tower.position_ids" not in sanitized
    # Quantization companions must survive until nn.quantize creates them.
    assert "vision_tower.blocks.0.attn.qkv.scales" in sanitized
    assert sanitized["language_model.model.embed_tokens.weight"] is (
        weights["language_model.model.embed_tokens.weight"]
    )
    assert sanitized["lm_head.weight"] is weights["lm_head.weight"]
    assert sanitized["vision_tower.patch_embed.proj.weight"].shape == (64, 2, 16, 16, 3)
    # mlx-vlm sanitizes again through VisionModel after the model's sanitize.
    again = model.sanitize(sanitized)
    assert again.keys() == sanitized.keys()
    assert all(again[k] is sanitized[k] for k in again)


def test_sanitize_rejects_mismatched_patch_embedding(model):
    bad = {"vision_tower.patch_embed.proj.weight": mx.zeros((64, 3, 2, 14, 14))}
    with pytest.raises(ValueError, match="patch_embed.proj.weight has shape"):
        model.sanitize(bad)


def test_attention_stays_within_each_image(model):
    grid = [IMAGE, SMALL_IMAGE]
    values = pixels(grid)
    n_image = IMAGE[0] * IMAGE[1] * IMAGE[2]
    together, deep_together = run_mlx(model, values, grid)

    alone, deep_alone = run_mlx(model, values[:n_image], [IMAGE])
    assert np.abs(together[: n_image // 4] - alone).max() <= 1e-5
    for joint, single in zip(deep_together, deep_alone):
        assert np.abs(joint[: n_image // 4] - single).max() <= 1e-5

    # Same shapes, different neighbour: the first image's rows must not move.
    changed = values.copy()
    changed[n_image:] = pixels([SMALL_IMAGE], seed=1)
    other, _ = run_mlx(model, changed, grid)
    assert np.array_equal(other[: n_image // 4], together[: n_image // 4])
    assert not np.allclose(other[n_image // 4 :], together[n_image // 4 :])


def test_video_frames_attend_separately(model):
    values = pixels([VIDEO])
    frame = VIDEO[1] * VIDEO[2]
    video, _ = run_mlx(model, values, [VIDEO])
    for i in range(VIDEO[0]):
        single, _ = run_mlx(model, values[i * frame : (i + 1) * frame], [(1, *VIDEO[1:])])
        rows = slice(i * frame // 4, (i + 1) * frame // 4)
        assert np.abs(video[rows] - single).max() <= 1e-5


def test_grid_accepts_tuples_and_numpy(model):
    values = pixels([IMAGE, VIDEO])
    from_list, _ = run_mlx(model, values, [IMAGE, VIDEO])
    for grid in ([tuple(IMAGE), tuple(VIDEO)], np.array([IMAGE, VIDEO])):
        merged, _ = model(mx.array(values), grid)
        assert np.array_equal(from_list, np.array(merged))


def test_bfloat16_weights_compute_in_bfloat16(torch_weights, reference):
    bf16 = load({k: v.astype(mx.bfloat16) for k, v in torch_weights.items()})
    values = pixels([IMAGE])
    merged, deepstack = bf16(mx.array(values), [IMAGE])
    assert merged.dtype == mx.bfloat16
    assert all(d.dtype == mx.bfloat16 for d in deepstack)
    expected, _ = run_reference(reference, values, [IMAGE])
    error = np.abs(np.array(merged.astype(mx.float32)) - expected).max()
    assert error <= 0.05 * np.abs(expected).max()


def test_bfloat16_tower_takes_the_native_attention_rotary_gelus_and_norms_and_matches_mlx_ops(
    torch_weights, monkeypatch
):
    from mlx_vlm_qwen3vl import cpu_kernel
    from mlx_vlm_qwen3vl.qwen3_vl import decoder_ops, vision

    kernel = cpu_kernel.load()
    bf16 = load({k: v.astype(mx.bfloat16) for k, v in torch_weights.items()})
    assert bf16.blocks[0].mlp.act is decoder_ops.gelu_approx
    grid = [IMAGE, (2, 4, 6)]  # an image and a two-frame video: several windows
    values = mx.array(pixels(grid, seed=3))
    attention_calls, small_op_calls = [], []
    real_attention, real_kernel = vision.native_attention_kernel, decoder_ops._kernel
    monkeypatch.setattr(vision, "native_attention_kernel",
                        lambda q: attention_calls.append(q.shape) or real_attention(q))
    monkeypatch.setattr(decoder_ops, "_kernel",
                        lambda x, *others: small_op_calls.append(len(others)) or real_kernel(x, *others))
    native, native_deepstack = bf16(values, grid)
    assert (real_attention(mx.ones((1, 1, 1, 64), mx.bfloat16)) is not None) == kernel.has_dense_bf16()
    assert attention_calls
    # x alone: GELU and the rotary embedding of q and k in every block, GELU in every
    # merger; LayerNorm (x, weight, bias) twice a block and once a merger.
    mergers = 1 + len(bf16.deepstack_merger_list)
    assert small_op_calls.count(0) == 3 * len(bf16.blocks) + mergers
    assert small_op_calls.count(2) == 2 * len(bf16.blocks) + mergers
    monkeypatch.setattr(vision, "native_attention_kernel", lambda q: None)
    monkeypatch.setattr(decoder_ops, "_kernel", lambda x, *others: None)
    composed, composed_deepstack = bf16(values, grid)
    for a, b in zip([native, *native_deepstack], [composed, *composed_deepstack]):
        a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        # bfloat16 through the 4 blocks: a rounding step here and there
        assert np.abs(a - b).max() <= 0.02 * np.abs(b).max()


@pytest.mark.parametrize(
    "rows, width, grid, message",
    [
        (95, PATCH_DIM, [IMAGE], r"96"),
        (96, PATCH_DIM - 1, [IMAGE], r"pixel_values must be \[n_patches, 1536\]"),
        (90, PATCH_DIM, [(1, 9, 10)], r"divisible by spatial_merge_size"),
        (96, PATCH_DIM, [(1, 0, 12)], r"positive integers"),
        (96, PATCH_DIM, [[1, 8]], r"\[n_images, 3\]"),
        (96, PATCH_DIM, [], r"\[n_images, 3\]"),
    ],
    ids=["rows", "width", "merge", "zero", "grid_columns", "empty_grid"],
)
def test_bad_input_is_a_clear_error(model, rows, width, grid, message):
    with pytest.raises(ValueError, match=message):
        model(mx.zeros((rows, width)), grid)


def test_shared_checkpoint_vision_tower_matches_reference(tiny_checkpoint):
    path = tiny_checkpoint
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    visual = {
        k[len("model.visual.") :]: v
        for k, v in state.items()
        if k.startswith("model.visual.")
    }
    reference = Qwen3VLVisionModel(Qwen3VLConfig.from_pretrained(path).vision_config)
    reference.load_state_dict(visual, strict=True)
    reference.eval()

    config = json.loads((path / "config.json").read_text())["vision_config"]
    model = load(
        {f"vision_tower.{k}": mx.array(v.numpy()) for k, v in visual.items()},
        config,
    )
    grid = [IMAGE, VIDEO, SMALL_IMAGE]
    values = pixels(grid)
    expected, expected_deepstack = run_reference(reference, values, grid)
    merged, deepstack = run_mlx(model, values, grid)
    assert np.abs(merged - expected).max() <= TOLERANCE
    assert len(deepstack) == len(expected_deepstack) == len(
        config["deepstack_visual_indexes"]
    )
    for ours, theirs in zip(deepstack, expected_deepstack):
        assert np.abs(ours - theirs).max() <= TOLERANCE
