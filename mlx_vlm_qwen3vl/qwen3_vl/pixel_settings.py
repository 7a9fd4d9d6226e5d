"""What the image and video processors share: patch geometry, pixel bounds and
value scaling read from a preprocessor config, and the steps that depend only
on them (pixel budget, normalization, patchify)."""

import json
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

MAX_ASPECT_RATIO = 200
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def fit_pixel_budget(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    num_frames: int = 1,
    rounded_frames: int = 1,
) -> Tuple[int, int]:
    """Per-frame (height, width) as multiples of `factor` whose area over all
    frames is within [min_pixels, max_pixels], aspect ratio kept as well as
    possible. As in the reference, the bounds are tested with the frame count
    rounded to whole temporal patches and the scale uses the real count."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if rounded_frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif rounded_frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalization_table(
    rescale_factor: float,
    mean: Sequence[float],
    std: Sequence[float],
    do_rescale: bool = True,
    do_normalize: bool = True,
) -> np.ndarray:
    """[3, 256] float32: every uint8 value per channel after rescale and normalize,
    computed with the reference's arithmetic (rescale in float64, then float32)."""
    values = np.arange(256, dtype=np.float64)
    if do_rescale:
        values = values * rescale_factor
    values = np.broadcast_to(values.astype(np.float32), (3, 256))
    if do_normalize:
        mean = np.asarray(mean, dtype=np.float32)[:, None]
        std = np.asarray(std, dtype=np.float32)[:, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values, dtype=np.float32)


def normalize(pixels: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 [..., C] to float32 through the per-channel `normalization_table`."""
    values = np.empty(pixels.shape, dtype=np.float32)
    for channel in range(pixels.shape[-1]):
        values[..., channel] = table[channel].take(pixels[..., channel])
    return values


def patchify(
    frames: np.ndarray,
    patch_size: int,
    temporal_patch_size: int,
    merge_size: int,
) -> np.ndarray:
    """Frames [T, H, W, C] (T a multiple of temporal_patch_size) to rows
    [T/tp * H/p * W/p, C * tp * p * p], ordered by temporal group, then merge
    block (row-major), then position inside the block; each row is (C, t, y, x)."""
    t, height, width, channels = frames.shape
    grid_t, grid_h, grid_w = t // temporal_patch_size, height // patch_size, width // patch_size
    blocks = frames.reshape(
        grid_t,
        temporal_patch_size,
        grid_h // merge_size,
        merge_size,
        patch_size,
        grid_w // merge_size,
        merge_size,
        patch_size,
        channels,
    )
    # -> (grid_t, bh, bw, mh, mw, C, tp, py, px)
    blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return blocks.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size**2)


class PixelSettings:
    """The settings both processors take from their config; a subclass names
    its config file and its default pixel bounds."""

    model_input_names: List[str]  # [pixel rows, grid_thw]
    config_file: str
    default_min_pixels: int
    default_max_pixels: int

    def __init__(
        self,
        size: Optional[dict] = None,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        patch_size: int = 16,
        temporal_patch_size: int = 2,
        merge_size: int = 2,
        image_mean: Sequence[float] = DEFAULT_MEAN,
        image_std: Sequence[float] = DEFAULT_STD,
        rescale_factor: float = 1 / 255,
        do_rescale: bool = True,
        do_normalize: bool = True,
        **unused,
    ):
        size = dict(size or {})
        self.min_pixels = int(min_pixels or size.get("shortest_edge") or self.default_min_pixels)
        self.max_pixels = int(max_pixels or size.get("longest_edge") or self.default_max_pixels)
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.rescale_factor = rescale_factor
        self.do_rescale = do_rescale
        self.do_normalize = do_normalize
        self.resample = Image.Resampling.BICUBIC
        self._table = normalization_table(
            rescale_factor, self.image_mean, self.image_std, do_rescale, do_normalize
        )

    @classmethod
    def from_dict(cls, config: dict, **overrides):
        return cls(**{**config, **overrides})

    @classmethod
    def from_pretrained(cls, path, **overrides):
        config_file = Path(path) / cls.config_file
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls.from_dict(config, **overrides)

    @property
    def size(self) -> dict:
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict:
        return {
            "processor_class": "Qwen3VLProcessor",
            "size": self.size,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "rescale_factor": self.rescale_factor,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
        }

    def grid_thw(self, num_frames: int, height: int, width: int) -> Tuple[int, int, int]:
        """(temporal groups, patch rows, patch columns) of `num_frames` resized
        frames; a last partial group counts, as it is padded to a whole one."""
        grid_t = -(-num_frames // self.temporal_patch_size)
        return grid_t, height // self.patch_size, width // self.patch_size

    def resize_to(self, image: Image.Image, height: int, width: int) -> Image.Image:
        if image.size == (width, height):
            return image
        return image.resize((width, height), resample=self.resample)

    def to_patches(self, values: np.ndarray) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """Normalized frames [T, H, W, C], T a multiple of temporal_patch_size,
        to (pixel rows, grid_thw)."""
        rows = patchify(values, self.patch_size, self.temporal_patch_size, self.merge_size)
        return rows, self.grid_thw(*values.shape[:3])

    def pack(self, rows: list, grids: list) -> dict:
        """Per-item pixel rows and grids, joined under `model_input_names`."""
        pixels_name, grid_name = self.model_input_names
        return {
            pixels_name: np.concatenate(rows, axis=0),
            grid_name: np.array(grids, dtype=np.int64),
        }
