"""Qwen3-VL vision tower: patch embedding, learned + rotary 2D positions,
pre-norm ViT blocks with per-frame attention, and the 2x2 patch mergers
(the final one and the DeepStack ones taken after selected blocks).

Rows of `pixel_values` arrive in merge-block order: for every frame, the
patches of each `merge x merge` block are consecutive, blocks in raster order.
"""

from typing import List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import VisionConfig
from . import decoder_ops
from .decoder_ops import LayerNorm, gelu, gelu_approx
from .layers import Linear, dense_product, is_loadable_weight, native_attention_kernel
from .parallel import split_axis, worker_count

WEIGHT_PREFIX = "vision_tower."

ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_approx,
    "gelu_new": gelu_approx,
    "gelu": nn.gelu,
}


def parse_grid(grid_thw, merge_size: int) -> List[Tuple[int, int, int]]:
    """(t, h, w) per image/video as Python ints, validated."""
    rows = grid_thw.tolist() if hasattr(grid_thw, "tolist") else list(grid_thw)
    if len(rows) == 0 or any(not hasattr(r, "__len__") or len(r) != 3 for r in rows):
        raise ValueError(
            f"grid_thw must have shape [n_images, 3] holding (t, h, w) in patches "
            f"with n_images >= 1; got {grid_thw!r}"
        )
    grid = []
    for row in rows:
        t, h, w = (r.item() if hasattr(r, "item") else r for r in row)
        if int(t) != t or int(h) != h or int(w) != w or min(t, h, w) < 1:
            raise ValueError(
                f"grid_thw entries must be positive integers; got (t, h, w) = {(t, h, w)}"
            )
        t, h, w = int(t), int(h), int(w)
        if h % merge_size or w % merge_size:
            raise ValueError(
                f"grid (h, w) = {(h, w)} must be divisible by spatial_merge_size "
                f"{merge_size}; resize the image to a multiple of "
                f"patch_size * spatial_merge_size pixels"
            )
        grid.append((t, h, w))
    return grid


def to_merge_order(x: mx.array, merge_size: int) -> mx.array:
    """[h, w, ...] in raster order -> [h * w, ...] in merge-block order."""
    h, w, *rest = x.shape
    m = merge_size
    x = x.reshape(h // m, m, w // m, m, *rest)
    x = x.transpose(0, 2, 1, 3, *range(4, x.ndim))
    return x.reshape(h * w, *rest)


def repeat_frames(x: mx.array, t: int) -> mx.array:
    if t == 1:
        return x
    return mx.broadcast_to(x[None], (t, *x.shape)).reshape(-1, *x.shape[1:])


def interpolation_matrix(size: int, side: int) -> mx.array:
    """[size, side] bilinear weights resampling `side` points to `size`,
    align_corners=True with border clamping (as F.interpolate)."""
    src = mx.arange(size, dtype=mx.float32) * (side - 1) / max(size - 1, 1)
    floor = mx.floor(src)
    frac = src - floor
    lower = floor.astype(mx.int32)
    upper = mx.minimum(lower + 1, side - 1)
    columns = mx.arange(side)[None]
    # At the last row frac is 0, so a clamped duplicate tap adds nothing.
    return (1 - frac)[:, None] * (columns == lower[:, None]) + frac[:, None] * (
        columns == upper[:, None]
    )


class PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel: one matmul per patch. The
    weight keeps the MLX conv layout [out, T, P, P, C] of converted checkpoints."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.in_channels = config.in_channels
        self.kernel = (
            config.temporal_patch_size,
            config.patch_size,
            config.patch_size,
        )
        self.proj = nn.Conv3d(
            config.in_channels,
            config.hidden_size,
            kernel_size=self.kernel,
            stride=self.kernel,
            bias=True,
        )

    def __call__(self, pixel_values: mx.array) -> mx.array:
        weight = self.proj.weight
        # Rows are flattened (C, T, P, P); the weight is (T, P, P, C).
        x = pixel_values.reshape(-1, self.in_channels, *self.kernel)
        x = x.transpose(0, 2, 3, 4, 1).reshape(x.shape[0], -1)
        # Computed in the input's dtype (the model picks it; see layers.py).
        weight = weight.reshape(weight.shape[0], -1).astype(x.dtype)
        return dense_product(x, weight, self.proj.bias.astype(x.dtype)).astype(x.dtype)


def rotate_half(x: mx.array) -> mx.array:
    x1, x2 = mx.split(x, 2, axis=-1)
    return mx.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [n, H, D] rotated in float32 by cos, sin [n, 1, D]; one native op on the CPU."""
    kernel = decoder_ops.rotary_kernel(x)
    if kernel is not None:
        return kernel.rotary(x, cos, sin, threads=worker_count())
    y = x.astype(mx.float32)
    return (y * cos + rotate_half(y) * sin).astype(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = Linear(config.hidden_size, config.hidden_size, bias=True)

    def __call__(
        self,
        x: mx.array,
        rotary: Tuple[mx.array, mx.array],
        segments: Sequence[Tuple[int, int]],
    ) -> mx.array:
        """`segments` lists (count, length) runs covering the rows in order:
        `count` consecutive attention segments of `length` rows each."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        cos, sin = rotary
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)

        outputs = []
        start = 0
        for count, length in segments:
            end = start + count * length

            def batched(a):
                a = a[start:end].reshape(count, length, self.num_heads, self.head_dim)
                return a.transpose(0, 2, 1, 3)

            q_seg, k_seg, v_seg = batched(q), batched(k), batched(v)
            kernel = native_attention_kernel(q_seg)
            if kernel is not None:
                out = kernel.attention_bf16(q_seg, k_seg, v_seg, self.scale, threads=worker_count())
                outputs.append(out.reshape(end - start, -1))
                start = end
                continue

            def heads(part, stream):
                return mx.fast.scaled_dot_product_attention(
                    q_seg[:, part], k_seg[:, part], v_seg[:, part], scale=self.scale, stream=stream
                )

            out = split_axis(heads, self.num_heads, axis=1, min_slice=1)
            outputs.append(out.transpose(0, 2, 1, 3).reshape(end - start, -1))
            start = end
        out = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported vision hidden_act {config.hidden_act!r}; "
                f"expected one of {sorted(ACTIVATIONS)}"
            )
        self.act = ACTIVATIONS[config.hidden_act]
        self.linear_fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.linear_fc2 = Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x, rotary, segments) -> mx.array:
        x = x + self.attn(self.norm1(x), rotary, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each merge block's patches and projects them to the text
    width. The final merger normalizes each patch before the concatenation;
    the DeepStack mergers normalize the concatenation."""

    def __init__(self, config: VisionConfig, postshuffle_norm: bool):
        super().__init__()
        self.merged_size = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        norm_size = self.merged_size if postshuffle_norm else config.hidden_size
        self.norm = LayerNorm(norm_size, eps=config.layer_norm_eps)
        self.linear_fc1 = Linear(self.merged_size, self.merged_size)
        self.linear_fc2 = Linear(self.merged_size, config.out_hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_size))
        else:
            x = self.norm(x).reshape(-1, self.merged_size)
        # Exact (erf) GELU here, unlike the blocks' tanh approximation.
        return self.linear_fc2(gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.merge_size = config.spatial_merge_size
        self.grid_side = int(config.num_position_embeddings**0.5)
        if config.hidden_size % config.num_heads or config.head_dim % 4:
            raise ValueError(
                f"vision hidden_size {config.hidden_size} must split into "
                f"num_heads {config.num_heads} heads whose size is a multiple of 4 "
                f"(2D rotary); check vision_config"
            )
        indexes = list(config.deepstack_visual_indexes)
        if len(set(indexes)) != len(indexes) or any(
            not 0 <= i < config.depth for i in indexes
        ):
            raise ValueError(
                f"deepstack_visual_indexes {indexes} must be distinct block "
                f"indexes in [0, depth={config.depth})"
            )
        self.deepstack_visual_indexes = indexes

        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_merger_list = [
            PatchMerger(config, postshuffle_norm=True) for _ in indexes
        ]

    @property
    def patch_dim(self) -> int:
        c = self.config
        return c.in_channels * c.temporal_patch_size * c.patch_size**2

    def _position_table(self) -> mx.array:
        # Calling the embedding (rather than reading .weight) also works when
        # it has been quantized.
        side = self.grid_side
        table = self.pos_embed(mx.arange(side * side)).astype(mx.float32)
        return table.reshape(side, side * self.config.hidden_size)

    def _frame_positions(self, table: mx.array, h: int, w: int) -> mx.array:
        """Learned embeddings bilinearly resampled to an h x w frame, [h*w, D]."""
        side = self.grid_side
        rows = (interpolation_matrix(h, side) @ table).reshape(h, side, -1)
        grid = interpolation_matrix(w, side) @ rows  # [h, w, D]
        return to_merge_order(grid, self.merge_size)

    def _frame_rotary(self, h: int, w: int) -> mx.array:
        """Rotary angles for an h x w frame, [h*w, head_dim]: the first half
        rotates by row, then column; the second half repeats it."""
        half = self.config.head_dim // 2
        exponents = mx.arange(0, half, 2, dtype=mx.float32) / half
        inv_freq = 1.0 / (self.config.rope_theta**exponents)
        rows = mx.broadcast_to(mx.arange(h, dtype=mx.float32)[:, None], (h, w))
        cols = mx.broadcast_to(mx.arange(w, dtype=mx.float32)[None, :], (h, w))
        coords = to_merge_order(mx.stack([rows, cols], axis=-1), self.merge_size)
        angles = (coords[..., None] * inv_freq).reshape(h * w, -1)
        return mx.concatenate([angles, angles], axis=-1)

    def _validate(self, pixel_values: mx.array, grid) -> None:
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.patch_dim:
            c = self.config
            raise ValueError(
                f"pixel_values must be [n_patches, {self.patch_dim}] (in_channels "
                f"{c.in_channels} x temporal_patch_size {c.temporal_patch_size} x "
                f"patch_size {c.patch_size}^2); got shape {tuple(pixel_values.shape)}"
            )
        expected = sum(t * h * w for t, h, w in grid)
        if pixel_values.shape[0] != expected:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} rows but grid_thw "
                f"{grid} needs sum(t*h*w) = {expected}; pass the grid_thw produced "
                f"together with these pixel_values"
            )

    def __call__(
        self, pixel_values: mx.array, grid_thw, compute_dtype=None
    ) -> Tuple[mx.array, List[mx.array]]:
        """`compute_dtype` defaults to the weights' dtype."""
        grid = parse_grid(grid_thw, self.merge_size)
        self._validate(pixel_values, grid)

        # Order images by frame size (stably) so that equal-length attention
        # segments are adjacent and each length is one batched attention call.
        order = sorted(range(len(grid)), key=lambda i: grid[i][1] * grid[i][2])
        starts = [0]
        for t, h, w in grid:
            starts.append(starts[-1] + t * h * w)
        reordered = order != sorted(order)

        table = self._position_table()
        positions, angles, segments, frames = [], [], [], {}
        for i in order:
            t, h, w = grid[i]
            if (h, w) not in frames:
                frames[h, w] = (
                    self._frame_positions(table, h, w),
                    self._frame_rotary(h, w),
                )
            frame_positions, frame_angles = frames[h, w]
            positions.append(repeat_frames(frame_positions, t))
            angles.append(repeat_frames(frame_angles, t))
            if segments and segments[-1][1] == h * w:
                segments[-1] = (segments[-1][0] + t, h * w)
            else:
                segments.append((t, h * w))

        dtype = compute_dtype or self.patch_embed.proj.weight.dtype
        x = self.patch_embed(pixel_values.astype(dtype))
        if reordered:
            x = mx.take(
                x,
                mx.concatenate([mx.arange(starts[i], starts[i + 1]) for i in order]),
                axis=0,
            )
        x = x + mx.concatenate(positions).astype(x.dtype)
        angles = mx.concatenate(angles)[:, None, :]
        rotary = (mx.cos(angles), mx.sin(angles))

        deepstack = []
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, segments)
            if layer in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[
                    self.deepstack_visual_indexes.index(layer)
                ]
                deepstack.append(merger(x))
        merged = self.merger(x)

        if reordered:
            unit = self.merge_size**2
            restore = mx.argsort(
                mx.concatenate(
                    [mx.arange(starts[i] // unit, starts[i + 1] // unit) for i in order]
                )
            )
            merged = mx.take(merged, restore, axis=0)
            deepstack = [mx.take(d, restore, axis=0) for d in deepstack]
        return merged, deepstack

    def sanitize(self, weights: dict) -> dict:
        """Converts a PyTorch-layout patch embedding to the MLX conv layout and
        drops vision-tower keys the model has no parameter for (for example
        `position_ids`). Keys outside `vision_tower.` pass through unchanged."""
        names = {name for name, _ in tree_flatten(self.parameters())}
        sanitized = {}
        for key, value in weights.items():
            _, found, name = key.partition(WEIGHT_PREFIX)
            if found:
                if name == "patch_embed.proj.weight":
                    value = self._conv_weight_to_mlx(value)
                elif not is_loadable_weight(name, names):
                    continue
            sanitized[key] = value
        return sanitized

    def _conv_weight_to_mlx(self, weight: mx.array) -> mx.array:
        c = self.config
        t, p, channels = c.temporal_patch_size, c.patch_size, c.in_channels
        mlx_shape = (c.hidden_size, t, p, p, channels)
        torch_shape = (c.hidden_size, channels, t, p, p)
        if tuple(weight.shape) == mlx_shape:
            return weight
        if tuple(weight.shape) == torch_shape:
            return weight.transpose(0, 2, 3, 4, 1)
        raise ValueError(
            f"vision_tower.patch_embed.proj.weight has shape {tuple(weight.shape)}; "
            f"expected {torch_shape} (PyTorch) or {mlx_shape} (MLX) for this "
            f"vision_config — the checkpoint and config.json do not match"
        )
