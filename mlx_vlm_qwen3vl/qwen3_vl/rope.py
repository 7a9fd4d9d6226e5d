"""Qwen3-VL rotary positions: the interleaved 3-axis mRoPE and the 3D
position ids (the "rope index") of a prompt with images and videos.

Every token has a (temporal, height, width) position. Text tokens have three
equal coordinates, so for text the rotation is plain RoPE. Frequency `j` of
the head takes its angle from axis 1 (height) when `j % 3 == 1` and
`j < 3 * mrope_section[1]`, from axis 2 (width) when `j % 3 == 2` and
`j < 3 * mrope_section[2]`, and from axis 0 (time) otherwise. The rotation
pairs dimension `i` with `i + head_dim / 2` (not adjacent dimensions).
"""

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np


def axis_of_frequency(mrope_section: Sequence[int]) -> List[int]:
    """For each of the head_dim/2 frequencies, which position axis drives it."""
    half = sum(mrope_section)
    axes = [0] * half
    for axis in (1, 2):
        for j in range(axis, 3 * mrope_section[axis], 3):
            axes[j] = axis
    return axes


class InterleavedMRoPE:
    """Rotates queries and keys [B, heads, L, head_dim] by 3D positions.

    `positions` is either an offset (int, or an array of B per-row offsets)
    for tokens at `offset + arange(L)` on all three axes — the text and
    decode case, done by `mx.fast.rope` — or explicit ids [3, B, L].
    """

    def __init__(self, head_dim: int, base: float, mrope_section: Sequence[int]):
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(
                f"mrope_section {list(mrope_section)} must sum to head_dim/2 = {head_dim // 2}"
            )
        self.head_dim = head_dim
        self.base = float(base)
        exponents = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
        self._inv_freq = 1.0 / (self.base**exponents)
        self._axes = mx.array(axis_of_frequency(mrope_section), dtype=mx.int32)

    def angles(self, position_ids: mx.array) -> Tuple[mx.array, mx.array]:
        """cos and sin [B, 1, L, head_dim] for position ids [3, B, L]."""
        positions = position_ids.astype(mx.float32).transpose(1, 2, 0)  # [B, L, 3]
        per_frequency = mx.take(positions, self._axes, axis=-1)  # [B, L, half]
        theta = per_frequency * self._inv_freq
        theta = mx.concatenate([theta, theta], axis=-1)[:, None]
        return mx.cos(theta), mx.sin(theta)

    def apply(self, x: mx.array, positions) -> mx.array:
        if isinstance(positions, tuple):
            cos, sin = positions
            half = self.head_dim // 2
            rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
            return (x * cos + rotated * sin).astype(x.dtype)
        return mx.fast.rope(
            x,
            self.head_dim,
            traditional=False,
            base=self.base,
            scale=1.0,
            offset=positions,
        )


def plain_offset(position_ids: mx.array):
    """The per-row start when ids [3, B, L] are `start + arange(L)` on every
    axis (text), as an int or an array of B, else None."""
    ids = np.array(position_ids)
    start = ids[0, :, :1]
    if not (ids == start[None] + np.arange(ids.shape[-1])).all():
        return None
    if (start == start[0, 0]).all():
        return int(start[0, 0])
    return mx.array(start[:, 0].astype(np.int32))


# ---------------------------------------------------------------- rope index
def _grid_list(grid_thw) -> List[Tuple[int, int, int]]:
    if grid_thw is None:
        return []
    rows = grid_thw.tolist() if hasattr(grid_thw, "tolist") else list(grid_thw)
    return [tuple(int(v) for v in row) for row in rows]


def _vision_block(start: int, t: int, h: int, w: int) -> np.ndarray:
    """Positions [3, t*h*w] of one merged image/frame grid starting at `start`."""
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def _row_positions(tokens, token_type, grids, merge) -> np.ndarray:
    """3D positions of one row's real tokens. `grids` maps a modality to an
    iterator over its (t, h, w) grids, consumed in order."""
    n = len(tokens)
    positions = np.zeros((3, n), dtype=np.int64)
    current, i = 0, 0
    while i < n:
        kind = token_type[i]
        j = i
        while j < n and token_type[j] == kind:
            j += 1
        if kind == 0:
            positions[:, i:j] = np.arange(current, current + j - i)
            current += j - i
        else:
            # A run of placeholders may hold several adjacent grids.
            k = i
            while k < j:
                t, h, w = _next_grid(grids, kind)
                t, h, w = t, h // merge, w // merge
                size = t * h * w
                if k + size > j:
                    raise ValueError(_run_error(kind, j - i, size))
                positions[:, k : k + size] = _vision_block(current, t, h, w)
                current += max(h, w)
                k += size
        i = j
    return positions


_NAMES = {1: ("image", "image_grid_thw"), 2: ("video", "video_grid_thw")}


def _next_grid(grids, kind):
    try:
        return next(grids[kind])
    except StopIteration:
        name, key = _NAMES[kind]
        raise ValueError(
            f"the prompt has more {name} placeholder groups than {key} has entries; "
            f"pass one {key} row per {name} in the prompt"
        ) from None


def _run_error(kind, run, size):
    name, key = _NAMES[kind]
    return (
        f"a run of {run} {name} placeholder tokens does not match {key}: the next "
        f"grid needs {size} tokens (t*h*w / merge^2); the prompt and {key} disagree"
    )


def rope_index(
    input_ids: mx.array,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask: Optional[mx.array] = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
) -> Tuple[mx.array, mx.array]:
    """3D position ids [3, B, L] and per-row rope deltas [B, 1].

    Positions count only a row's real tokens (`attention_mask` == 1); padding
    columns get 0. Images and videos are consumed in prompt order across the
    batch. A video of t temporal groups is t grids of one group each (the
    processor puts a timestamp between groups). The delta is the row's next
    position minus its number of real tokens, so a decoded token at real
    offset `n` sits at `n + delta`.
    """
    ids = np.array(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length]; got shape {ids.shape}")
    mask = (
        np.ones_like(ids, dtype=bool)
        if attention_mask is None
        else np.array(attention_mask).astype(bool)
    )
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask shape {mask.shape} must match input_ids shape {ids.shape}"
        )
    videos = [(1, h, w) for t, h, w in _grid_list(video_grid_thw) for _ in range(t)]
    images = _grid_list(image_grid_thw)
    grids = {1: iter(images), 2: iter(videos)}

    token_type = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
    positions = np.zeros((3,) + ids.shape, dtype=np.int64)
    deltas = np.zeros((ids.shape[0], 1), dtype=np.int64)
    for b in range(ids.shape[0]):
        real = mask[b]
        row = _row_positions(ids[b][real], token_type[b][real], grids, spatial_merge_size)
        positions[:, b, real] = row
        deltas[b, 0] = (row.max() + 1 if row.size else 0) - row.shape[1]
    for kind, grid_iter in grids.items():
        left = sum(1 for _ in grid_iter)
        if left:
            name, key = _NAMES[kind]
            raise ValueError(
                f"{key} has {left} more entries than the prompt has {name} "
                f"placeholder groups; each {name} needs its placeholders in the prompt"
            )
    return mx.array(positions.astype(np.int32)), mx.array(deltas.astype(np.int32))
