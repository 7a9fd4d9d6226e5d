"""Qwen3-VL video preprocessing with numpy, PIL and PyAV.

Frame sampling, the video pixel budget and the patch layout follow
transformers' `Qwen3VLVideoProcessor`; frames are resized with PIL bicubic
(the same resize as the image processor) instead of torchvision. Files are
decoded with PyAV, and each sampled frame keeps its presentation time from the
container, so the prompt's `<t seconds>` markers are the real frame times.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .image_processing import array_to_rgb, convert_tensors, describe, to_rgb
from .pixel_settings import MAX_ASPECT_RATIO, PixelSettings, fit_pixel_budget, normalize


@dataclass
class VideoMetadata:
    """What is known about a clip and the frames taken from it.

    Field names follow `transformers.video_utils.VideoMetadata`; `timestamps`
    holds the seconds of each sampled frame (container times for files).
    """

    total_num_frames: int
    fps: Optional[float]
    frames_indices: List[int]
    timestamps: List[float] = field(default_factory=list)
    width: Optional[int] = None
    height: Optional[int] = None
    duration: Optional[float] = None


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
) -> Tuple[int, int]:
    """The reference's per-frame (height, width) for a clip of `num_frames`:
    the pixel bounds apply to all frames together."""
    # The reference refuses clips shorter than one temporal patch; they are
    # padded by repeating the last frame, so size them as one full patch.
    num_frames = max(num_frames, temporal_factor)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of "
            f"{width}x{height} frames is above the limit of {MAX_ASPECT_RATIO}"
        )
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    return fit_pixel_budget(height, width, factor, min_pixels, max_pixels, num_frames, t_bar)


def group_timestamps(timestamps: Sequence[float], temporal_patch_size: int) -> List[float]:
    """Seconds of each temporal group: the mean of its first and last frame, the
    last group padded with the last frame as the pixels are."""
    times = list(timestamps)
    times += times[-1:] * (-len(times) % temporal_patch_size)
    return [
        (times[i] + times[i + temporal_patch_size - 1]) / 2
        for i in range(0, len(times), temporal_patch_size)
    ]


def _metadata_value(metadata, name):
    if isinstance(metadata, dict):
        return metadata.get(name)
    return getattr(metadata, name, None)


def probe_video(path: str):
    """(frame count, average fps, width, height, duration) of a file's first video
    stream, counting packets rather than trusting the header."""
    import av

    try:
        with av.open(path) as container:
            streams = container.streams.video
            if streams:
                stream = streams[0]
                count = sum(
                    1
                    for packet in container.demux(stream)
                    if packet.pts is not None and packet.size
                )
                rate = stream.average_rate or stream.guessed_rate
                width, height = stream.codec_context.width, stream.codec_context.height
    except Exception as error:  # PyAV's errors include ValueError subclasses
        raise ValueError(f"cannot read video {path}: {error}") from error
    if not streams:
        raise ValueError(f"video {path} has no video stream")
    fps = float(rate) if rate else None
    if count == 0:
        raise ValueError(f"video {path} has no frames")
    duration = count / fps if fps else None
    return count, fps, width, height, duration


def decode_frames(path: str, indices: Sequence[int]) -> Iterator[Tuple[int, float, Image.Image]]:
    """(index, seconds, RGB image) for the frames at `indices` (sorted), in order.

    Seconds are presentation times from the stream's time base, counted from
    the first frame."""
    import av

    wanted = set(int(i) for i in indices)
    last = max(wanted)
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            start = None
            for position, frame in enumerate(container.decode(stream)):
                if frame.pts is not None:
                    seconds = float(frame.pts * stream.time_base)
                    start = seconds if start is None else start
                    seconds -= start
                else:
                    seconds = frame.time or 0.0
                if position in wanted:
                    yield position, seconds, frame.to_image()
                if position >= last:
                    return
    except Exception as error:
        raise ValueError(f"cannot decode video {path}: {error}") from error


class Qwen3VLVideoProcessor(PixelSettings):
    """Videos to `pixel_values_videos`, `video_grid_thw` and per-video metadata."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]
    # mlx-vlm's loader asks `sample_frames` which frames to decode.
    sample_frames_in_loader = True
    config_file = "video_preprocessor_config.json"
    default_min_pixels = 128 * 32 * 32
    default_max_pixels = 32 * 32 * 768

    def __init__(
        self,
        *args,
        fps: float = 2.0,
        min_frames: int = 4,
        max_frames: int = 768,
        num_frames: Optional[int] = None,
        cap_pixels_per_frame: bool = False,
        max_video_tokens: int = 768,
        **settings,
    ):
        """Positional arguments and `settings` are `PixelSettings`' (size,
        min_pixels, ..., do_normalize)."""
        super().__init__(*args, **settings)
        self.fps = fps
        self.min_frames = min_frames
        self.max_frames = max_frames
        self.num_frames = num_frames
        self.cap_pixels_per_frame = bool(cap_pixels_per_frame)
        self.max_video_tokens = max_video_tokens

    def to_dict(self) -> dict:
        return {
            "video_processor_type": "Qwen3VLVideoProcessor",
            **super().to_dict(),
            "fps": self.fps,
            "min_frames": self.min_frames,
            "max_frames": self.max_frames,
            "cap_pixels_per_frame": self.cap_pixels_per_frame,
            "max_video_tokens": self.max_video_tokens,
        }

    def video_sampling_defaults(self) -> dict:
        return {"fps": self.fps, "min_frames": self.min_frames, "max_frames": self.max_frames}

    def sample_frames(
        self,
        metadata,
        num_frames: Optional[int] = None,
        fps: Optional[float] = None,
        min_frames: Optional[int] = None,
        max_frames: Optional[int] = None,
        **unused,
    ) -> np.ndarray:
        """Indices of the frames to keep, as the reference picks them: `fps`
        frames a second (clamped to [min_frames, max_frames] and the clip
        length), spread evenly from the first frame to the last."""
        total = int(_metadata_value(metadata, "total_num_frames"))
        if total <= 0:
            raise ValueError("cannot sample frames from a video with no frames")
        num_frames = num_frames if num_frames is not None else self.num_frames
        min_frames = self.min_frames if min_frames is None else min_frames
        max_frames = self.max_frames if max_frames is None else max_frames
        if num_frames is None:
            fps = self.fps if fps is None else fps
            source_fps = _metadata_value(metadata, "fps") or 24.0
            num_frames = int(total / source_fps * fps)
            num_frames = min(max(num_frames, min_frames), max_frames, total)
        num_frames = max(1, min(int(num_frames), total))
        return np.linspace(0, total - 1, num_frames).round().astype(int)

    def frame_size(self, num_frames: int, height: int, width: int, **overrides) -> Tuple[int, int]:
        """Per-frame resized (height, width) for a clip of `num_frames` sampled frames."""
        factor = self.factor
        min_pixels = overrides.get("min_pixels") or self.min_pixels
        max_pixels = overrides.get("max_pixels") or self.max_pixels
        if overrides.get("cap_pixels_per_frame", self.cap_pixels_per_frame):
            frame_cap = self.max_video_tokens * factor * factor
            per_frame = max(min(frame_cap, max_pixels // num_frames), int(min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_video(
            num_frames, height, width, self.temporal_patch_size, factor, min_pixels, max_pixels
        )

    def get_num_of_video_patches(
        self, num_frames: int, height: int, width: int, videos_kwargs=None
    ) -> int:
        resized = self.frame_size(num_frames, height, width, **(videos_kwargs or {}))
        return math.prod(self.grid_thw(num_frames, *resized))

    def _read_file(self, path: str, fps, num_frames, sampling: dict, shrink=None):
        total, source_fps, width, height, duration = probe_video(path)
        metadata = VideoMetadata(total, source_fps, [], [], width, height, duration)
        indices = self.sample_frames(metadata, num_frames=num_frames, fps=fps, **sampling)
        frames, times, kept = [], [], []
        for index, seconds, image in decode_frames(path, indices):
            if not frames:
                metadata.width, metadata.height = image.size
            kept.append(index)
            times.append(seconds)
            # Resizing as frames arrive keeps only small frames in memory.
            frames.append(shrink(len(indices), image) if shrink else image)
        if not frames:
            raise ValueError(f"video {path}: no frames could be decoded")
        # A stream can decode to fewer frames than it has packets: the tail
        # repeats the last frame so the sampled count (and frame size) holds.
        missing = len(indices) - len(frames)
        frames += frames[-1:] * missing
        kept += kept[-1:] * missing
        times += times[-1:] * missing
        metadata.frames_indices, metadata.timestamps = kept, times
        return frames, metadata

    def _frames_from(self, video, name: str) -> list:
        if isinstance(video, np.ndarray) and video.ndim == 4:
            if video.shape[1] in (1, 3, 4) and video.shape[-1] not in (1, 3, 4):
                video = video.transpose(0, 2, 3, 1)
            return list(video)
        if isinstance(video, (list, tuple)):
            return list(video)
        raise ValueError(
            f"video {name}: expected a file path, a list of frames or a [T, H, W, C] array"
        )

    def load(
        self,
        video,
        metadata=None,
        fps=None,
        num_frames=None,
        do_sample_frames=None,
        shrink=None,
        **sampling,
    ):
        """A video as (RGB PIL frames, VideoMetadata), sampled where that is asked for.

        `shrink(num_frames, image)`, if given, is applied to each decoded file frame."""
        name = describe(video)
        if isinstance(video, (str, Path)):
            path = str(video)
            path = path[len("file://") :] if path.startswith("file://") else path
            if not Path(path).is_file():
                raise ValueError(f"video file not found: {path}")
            return self._read_file(path, fps, num_frames, sampling, shrink)
        frames = self._frames_from(video, name)
        if not frames:
            raise ValueError(f"video {name} has no frames")
        indices = _metadata_value(metadata, "frames_indices") if metadata is not None else None
        source_fps = _metadata_value(metadata, "fps") if metadata is not None else None
        if do_sample_frames is None:
            do_sample_frames = source_fps is not None and indices is None
        if do_sample_frames:
            clip = VideoMetadata(len(frames), source_fps, [])
            indices = self.sample_frames(clip, num_frames=num_frames, fps=fps, **sampling).tolist()
            frames = [frames[i] for i in indices]
        elif indices is None:
            indices = list(range(len(frames)))
            source_fps = source_fps or fps or self.fps
        indices = [int(i) for i in indices]
        if len(indices) != len(frames):
            raise ValueError(
                f"video {name}: metadata lists {len(indices)} frame indices for {len(frames)} frames"
            )
        if not source_fps or source_fps <= 0:
            raise ValueError(
                f"video {name}: metadata fps must be a positive number, got {source_fps}"
            )
        timestamps = _metadata_value(metadata, "timestamps") if metadata is not None else None
        if do_sample_frames or timestamps is None or len(timestamps) != len(indices):
            timestamps = [i / source_fps for i in indices]
        total = _metadata_value(metadata, "total_num_frames") if metadata is not None else None
        images = [self._frame_image(frame, f"{name} frame {i}") for i, frame in enumerate(frames)]
        result = VideoMetadata(
            total_num_frames=int(total or len(frames)),
            fps=float(source_fps),
            frames_indices=indices,
            timestamps=[float(t) for t in timestamps],
            width=images[0].width,
            height=images[0].height,
        )
        return images, result

    def _frame_image(self, frame, name: str) -> Image.Image:
        if isinstance(frame, Image.Image):
            return to_rgb(frame)
        return array_to_rgb(np.asarray(frame), name)

    def process_one(self, video, metadata=None, **options):
        """One video to (pixel rows, (grid_t, grid_h, grid_w), VideoMetadata)."""
        sizing = {
            k: options.pop(k)
            for k in ("min_pixels", "max_pixels", "cap_pixels_per_frame")
            if k in options
        }
        name = describe(video)

        def target(num_frames, height, width):
            try:
                return self.frame_size(num_frames, height, width, **sizing)
            except ValueError as error:
                raise ValueError(f"video {name}: {error}") from None

        def shrink(num_frames, image):
            return self.resize_to(image, *target(num_frames, image.height, image.width))

        frames, metadata = self.load(video, metadata, shrink=shrink, **options)
        width, height = metadata.width, metadata.height
        resized_h, resized_w = target(len(frames), height, width)
        pixels = np.empty((len(frames), resized_h, resized_w, 3), dtype=np.uint8)
        for i, frame in enumerate(frames):
            if frame.size not in ((width, height), (resized_w, resized_h)):
                raise ValueError(
                    f"video {name}: frame {i} is {frame.width}x{frame.height}, "
                    f"frame 0 is {width}x{height}; all frames must have one size"
                )
            pixels[i] = np.asarray(self.resize_to(frame, resized_h, resized_w))
        pad = -len(frames) % self.temporal_patch_size
        if pad:
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], pad, axis=0)])
        rows, grid = self.to_patches(normalize(pixels, self._table))
        return rows, grid, metadata

    def __call__(
        self,
        videos,
        video_metadata=None,
        fps=None,
        num_frames=None,
        do_sample_frames=None,
        return_tensors=None,
        **kwargs,
    ) -> dict:
        """Process videos: file paths, frame lists (PIL or arrays) or [T, H, W, C]
        / [T, C, H, W] arrays.

        Files are sampled at `fps` frames a second (default from the config).
        Frames with metadata that lists `frames_indices` are taken as already
        sampled (mlx-vlm's loader passes them so), their times index / metadata
        fps; frames with a metadata `fps` only are the whole clip at that rate and
        are sampled like a file; frames without metadata are taken as they are,
        spaced 1 / `fps` apart. `do_sample_frames` overrides that choice.
        """
        videos = batch_videos(videos)
        if video_metadata is not None and not isinstance(video_metadata, (list, tuple)):
            video_metadata = [video_metadata]
        if video_metadata is not None and len(video_metadata) != len(videos):
            raise ValueError(
                f"got {len(video_metadata)} video_metadata entries for {len(videos)} videos"
            )
        fps_list = fps if isinstance(fps, (list, tuple)) else [fps] * len(videos)
        if len(fps_list) != len(videos):
            raise ValueError(f"got {len(fps_list)} fps values for {len(videos)} videos")
        options = {
            k: kwargs[k]
            for k in (
                "min_pixels",
                "max_pixels",
                "cap_pixels_per_frame",
                "min_frames",
                "max_frames",
            )
            if kwargs.get(k) is not None
        }
        size = kwargs.get("size") or {}
        if size.get("shortest_edge"):
            options.setdefault("min_pixels", size["shortest_edge"])
        if size.get("longest_edge"):
            options.setdefault("max_pixels", size["longest_edge"])
        rows, grids, metadata = [], [], []
        for i, video in enumerate(videos):
            video_rows, grid, meta = self.process_one(
                video,
                video_metadata[i] if video_metadata is not None else None,
                fps=fps_list[i],
                num_frames=num_frames,
                do_sample_frames=do_sample_frames,
                **options,
            )
            rows.append(video_rows)
            grids.append(grid)
            metadata.append(meta)
        if not rows:
            raise ValueError("no videos were given")
        data = convert_tensors(self.pack(rows, grids), return_tensors)
        data["video_metadata"] = metadata
        return data

    preprocess = __call__


def _is_frame(item) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, np.ndarray) and item.ndim in (2, 3))


def batch_videos(videos) -> list:
    """A list of videos from one video (path, frame list, 4-D array) or a list of them."""
    if isinstance(videos, (str, Path)) or (isinstance(videos, np.ndarray) and videos.ndim == 4):
        return [videos]
    if isinstance(videos, np.ndarray) and videos.ndim == 5:
        return list(videos)
    if isinstance(videos, (list, tuple)):
        if videos and _is_frame(videos[0]):
            return [list(videos)]
        return list(videos)
    return [videos]
