"""Qwen3-VL image preprocessing with numpy and PIL only.

Matches transformers' `Qwen2VLImageProcessorPil` (the class Qwen3-VL checkpoints
resolve to without torchvision): PIL bicubic resize to a size from
`smart_resize`, rescale and normalize in float32, then patchify into
`[n_patches, C * temporal_patch_size * patch_size**2]` rows in the order the
vision tower's merger expects.
"""

import base64
import io
import math
import urllib.request
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from .pixel_settings import MAX_ASPECT_RATIO, PixelSettings, fit_pixel_budget, normalize

# Above this many source pixels a JPEG is decoded at a reduced scale (never
# below the target size) instead of at full size.
DEFAULT_MAX_DECODE_PIXELS = 64_000_000
_ORIENTATION = 0x0112
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> Tuple[int, int]:
    """The (height, width) the reference resizes to: multiples of `factor`,
    area within [min_pixels, max_pixels], aspect ratio kept as well as possible."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of a "
            f"{width}x{height} image is above the limit of {MAX_ASPECT_RATIO}; "
            "crop or pad it first"
        )
    return fit_pixel_budget(height, width, factor, min_pixels, max_pixels)


def describe(source) -> str:
    """A short name for an input, for error messages."""
    if isinstance(source, (str, Path)):
        text = str(source)
        return text if len(text) < 120 else text[:60] + "..." + text[-40:]
    if isinstance(source, Image.Image):
        return f"PIL image {source.width}x{source.height} mode {source.mode}"
    if isinstance(source, np.ndarray):
        return f"array of shape {source.shape}"
    return type(source).__name__


def _open_source(source):
    if isinstance(source, Path):
        source = str(source)
    if isinstance(source, bytes):
        return io.BytesIO(source)
    if not isinstance(source, str):
        return source
    if source.startswith("data:image/"):
        if "," not in source:
            raise ValueError("image data URI has no ',' before its payload")
        try:
            return io.BytesIO(base64.b64decode(source.split(",", 1)[1]))
        except ValueError as error:
            raise ValueError(f"image data URI is not valid base64: {error}") from None
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=30) as response:
                return io.BytesIO(response.read())
        except Exception as error:
            raise ValueError(f"cannot fetch image {source}: {error}") from error
    if source.startswith("file://"):
        source = source[len("file://") :]
    if not Path(source).is_file():
        raise ValueError(f"image file not found: {source}")
    return source


def bomb_limit(max_image_pixels: Optional[int]) -> Optional[int]:
    """Pixels above which an image is refused: PIL's own error threshold unless set."""
    if max_image_pixels is not None:
        return max_image_pixels
    if Image.MAX_IMAGE_PIXELS is None:
        return None
    return 2 * Image.MAX_IMAGE_PIXELS


def open_image(
    source,
    target_size_for=None,
    max_image_pixels: Optional[int] = None,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
) -> Tuple[Image.Image, Tuple[int, int]]:
    """Open and fully decode a path, URL, data URI, bytes or PIL image, EXIF
    orientation applied; returns it with the (height, width) of the upright
    full-size image.

    `target_size_for(height, width) -> (h, w)` gives the size the image will be
    resized to; above `max_decode_pixels` a JPEG is decoded at the smallest DCT
    scale still at least that size, and other formats are box-reduced to it.
    """
    name = describe(source)
    limit = bomb_limit(max_image_pixels)
    if not isinstance(source, Image.Image):
        source = _open_source(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = source if isinstance(source, Image.Image) else Image.open(source)
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"image {name} is too large to decode safely ({error}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        ) from error
    except Exception as error:
        raise ValueError(f"cannot read image {name}: {error}") from error
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ValueError(
            f"image {name} is {width}x{height} = {width * height} pixels, above the "
            f"decompression-bomb limit of {limit}; pass a larger max_image_pixels "
            "if the file is trusted"
        )
    if image.getexif().get(_ORIENTATION, 1) in _QUARTER_TURNS:
        width, height = height, width
    huge = target_size_for is not None and width * height > max_decode_pixels
    if huge and image.format == "JPEG":
        target_h, target_w = target_size_for(height, width)
        # draft works in stored orientation; never below the target size
        stored = (target_w, target_h) if image.size == (width, height) else (target_h, target_w)
        image.draft(image.mode, stored)
    try:
        image.load()
    except Exception as error:
        raise ValueError(f"cannot decode image {name} (truncated or corrupt?): {error}") from error
    image = ImageOps.exif_transpose(image)
    if huge:
        image = _reduce_towards(image, *target_size_for(height, width))
    return image, (height, width)


def _reduce_towards(image: Image.Image, target_h: int, target_w: int) -> Image.Image:
    """A huge decoded image box-reduced by the largest integer factor that keeps
    it at least the target size, so later conversions copy less."""
    factor = min(image.width // target_w, image.height // target_h)
    if factor < 2 or image.mode not in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return image
    return image.reduce(factor)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB the way the reference converts: transparency composited on white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def array_to_rgb(array: np.ndarray, name: str) -> Image.Image:
    """An (H, W), (H, W, C) or (C, H, W) array with 1, 3 or 4 channels as an RGB image."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"image {name}: expected (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels"
        )
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = np.round(array * 255.0)
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 4:
        # the reference blends arrays onto white in float, then rounds
        alpha = array[..., 3:] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return to_rgb(Image.fromarray(array))


def convert_tensors(data: dict, return_tensors) -> dict:
    """numpy values as the caller asked: numpy (None/"np"), mx.array ("mlx") or torch ("pt")."""
    if return_tensors in (None, "np", "numpy"):
        return data
    if return_tensors == "mlx":
        import mlx.core as mx

        convert = mx.array
    elif return_tensors == "pt":
        import torch

        convert = torch.from_numpy
    else:
        raise ValueError(
            f"return_tensors must be None, 'np', 'mlx' or 'pt', got {return_tensors!r}"
        )
    return {k: convert(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}


class Qwen3VLImageProcessor(PixelSettings):
    """Images to `pixel_values` and `image_grid_thw`, as transformers' PIL backend does."""

    model_input_names = ["pixel_values", "image_grid_thw"]
    config_file = "preprocessor_config.json"
    default_min_pixels = 56 * 56
    default_max_pixels = 28 * 28 * 1280

    def __init__(
        self,
        *args,
        do_resize: bool = True,
        max_image_pixels: Optional[int] = None,
        max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
        **settings,
    ):
        """Positional arguments and `settings` are `PixelSettings`' (size,
        min_pixels, ..., do_normalize)."""
        super().__init__(*args, **settings)
        self.do_resize = do_resize
        self.max_image_pixels = max_image_pixels
        self.max_decode_pixels = max_decode_pixels

    def to_dict(self) -> dict:
        return {
            "image_processor_type": "Qwen2VLImageProcessor",
            **super().to_dict(),
            "do_resize": self.do_resize,
        }

    def target_size(
        self,
        height: int,
        width: int,
        min_pixels: Optional[int] = None,
        max_pixels: Optional[int] = None,
        resized_height: Optional[int] = None,
        resized_width: Optional[int] = None,
    ) -> Tuple[int, int]:
        """The resized (height, width) for a source of this size and these overrides."""
        if (resized_height is None) != (resized_width is None):
            raise ValueError("resized_height and resized_width must be given together")
        if resized_height is not None:
            height, width = resized_height, resized_width
        elif not self.do_resize:
            return height, width
        return smart_resize(
            height,
            width,
            self.factor,
            self.min_pixels if min_pixels is None else min_pixels,
            self.max_pixels if max_pixels is None else max_pixels,
        )

    def num_image_tokens(self, height: int, width: int, **overrides) -> int:
        resized = self.target_size(height, width, **overrides)
        return math.prod(self.grid_thw(1, *resized)) // self.merge_size**2

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs=None) -> int:
        resized = self.target_size(height, width, **_size_overrides(images_kwargs or {}))
        return math.prod(self.grid_thw(1, *resized))

    def load(self, source, **overrides) -> Image.Image:
        """Any supported input as an RGB PIL image, EXIF orientation applied
        (huge files come back already reduced towards their target size)."""
        return self._load(source, **overrides)[0]

    def _load(self, source, **overrides) -> Tuple[Image.Image, Tuple[int, int]]:
        if isinstance(source, np.ndarray) or (
            hasattr(source, "__array__") and not isinstance(source, Image.Image)
        ):
            image = array_to_rgb(np.asarray(source), describe(source))
            return image, (image.height, image.width)
        image, source_size = open_image(
            source,
            target_size_for=lambda h, w: self.target_size(h, w, **overrides),
            max_image_pixels=self.max_image_pixels,
            max_decode_pixels=self.max_decode_pixels,
        )
        return to_rgb(image), source_size

    def fetch_images(self, images) -> List[Image.Image]:
        return [self.load(image) for image in flatten_images(images)]

    def resize(self, image: Image.Image, source_size, name: str, **overrides) -> Image.Image:
        """`image` resized to the target size of a source of `source_size` (h, w)."""
        try:
            resized_h, resized_w = self.target_size(*source_size, **overrides)
        except ValueError as error:
            raise ValueError(f"image {name}: {error}") from None
        return self.resize_to(image, resized_h, resized_w)

    def _check_divisible(self, image: Image.Image, name: str):
        if image.height % self.factor or image.width % self.factor:
            raise ValueError(
                f"image {name} is {image.width}x{image.height} with do_resize=False; "
                f"both sides must be multiples of {self.factor}"
            )

    def process_one(self, source, **overrides) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        """One image to (pixel rows, (1, grid_h, grid_w))."""
        name = describe(source)
        image, source_size = self._load(source, **overrides)
        image = self.resize(image, source_size, name, **overrides)
        self._check_divisible(image, name)
        values = normalize(np.asarray(image, dtype=np.uint8), self._table)
        # a still image fills every temporal slot: a zero-copy repeat
        frames = np.broadcast_to(values, (self.temporal_patch_size, *values.shape))
        return self.to_patches(frames)

    def __call__(self, images, return_tensors=None, **kwargs) -> dict:
        overrides = _size_overrides(kwargs)
        rows, grids = [], []
        for image in flatten_images(images):
            image_rows, grid = self.process_one(image, **overrides)
            rows.append(image_rows)
            grids.append(grid)
        if not rows:
            raise ValueError("no images were given")
        return convert_tensors(self.pack(rows, grids), return_tensors)

    preprocess = __call__


def _size_overrides(kwargs: dict) -> dict:
    """Per-call sizing options, in either spelling (min/max_pixels or size={...})."""
    overrides = {}
    size = kwargs.get("size") or {}
    if size.get("shortest_edge") is not None:
        overrides["min_pixels"] = size["shortest_edge"]
    if size.get("longest_edge") is not None:
        overrides["max_pixels"] = size["longest_edge"]
    for key in ("min_pixels", "max_pixels", "resized_height", "resized_width"):
        if kwargs.get(key) is not None:
            overrides[key] = int(kwargs[key])
    return overrides


def flatten_images(images) -> list:
    """A flat list from one image, a list, or a list of per-prompt lists."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in flatten_images(item)]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    return [images]
