"""Preprocessing speed: the plugin's Qwen3-VL processor vs transformers' PIL backend.

Images: `Qwen3VLImageProcessor` vs `Qwen2VLImageProcessorPil` (what a qwen3_vl
checkpoint resolves to without torchvision) on the same PIL images.
Video: the same sampled frames through ours vs transformers' pieces (its PIL
resize/rescale/normalize per frame and its torch `patchify`; its own video
processor needs torchvision); decoding with PyAV is timed separately.

Prints min and median seconds over repeats and the ratio transformers / ours
(above 1: ours is faster).

    python benchmarks/bench_processor.py [--repeats 5]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

from mlx_vlm_qwen3vl.builder.metadata import preprocessor_config, video_preprocessor_config
from mlx_vlm_qwen3vl.builder.shapes import resolve

IMAGE_SIZES = [(224, 224), (640, 480), (1280, 720), (1920, 1080), (4032, 3024)]
# The real Qwen3-VL settings, from the checkpoint builder (one source of truth).
_ARCH = resolve("2b")
PREPROCESSOR_CONFIG = {
    k: v for k, v in preprocessor_config(_ARCH).items() if k not in ("image_processor_type", "processor_class")
}
VIDEO_CONFIG = {
    k: v
    for k, v in video_preprocessor_config(_ARCH).items()
    if k not in ("video_processor_type", "processor_class", "do_sample_frames")
}


def timings(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def report(label, ours, theirs):
    print(
        f"{label:<28} ours {ours[0]:8.4f} / {ours[1]:8.4f} s   "
        f"transformers {theirs[0]:8.4f} / {theirs[1]:8.4f} s   "
        f"ratio {theirs[0] / ours[0]:5.2f} (min) {theirs[1] / ours[1]:5.2f} (median)"
    )


def bench_images(repeats):
    from transformers import Qwen2VLImageProcessorPil

    from mlx_vlm_qwen3vl.qwen3_vl.image_processing import Qwen3VLImageProcessor

    ours = Qwen3VLImageProcessor(**PREPROCESSOR_CONFIG)
    theirs = Qwen2VLImageProcessorPil(**PREPROCESSOR_CONFIG)
    rng = np.random.default_rng(0)
    for width, height in IMAGE_SIZES:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        n = max(2, repeats if width * height < 4_000_000 else repeats // 2)
        got = ours([image])
        grid = got["image_grid_thw"][0].tolist()
        report(
            f"image {width}x{height} {grid}",
            timings(lambda: ours([image]), n),
            timings(lambda: theirs(images=[image], return_tensors="np"), n),
        )


def write_video(path, seconds=10, fps=30, width=640, height=360):
    rng = np.random.default_rng(1)
    background = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(seconds * fps):
            frame = np.roll(background, i * 4, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def reference_video(frames, resized_h, resized_w, image_processor):
    import torch
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import PILImageResampling, SizeDict
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    processed = []
    for frame in frames:
        chw = PilBackend.resize(
            image_processor,
            frame.transpose(2, 0, 1),
            SizeDict(height=resized_h, width=resized_w),
            PILImageResampling.BICUBIC,
        )
        chw = image_processor.rescale(chw, 1 / 255)
        processed.append(
            image_processor.normalize(chw, image_processor.image_mean, image_processor.image_std)
        )
    video = torch.from_numpy(np.stack(processed))[None]
    return Qwen3VLVideoProcessor.patchify(None, video, 16, 2, 2)[0]


def bench_video(repeats):
    from transformers import Qwen2VLImageProcessorPil

    from mlx_vlm_qwen3vl.qwen3_vl.video_processing import Qwen3VLVideoProcessor

    ours = Qwen3VLVideoProcessor(**VIDEO_CONFIG)
    image_processor = Qwen2VLImageProcessorPil(**PREPROCESSOR_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        write_video(path)
        result = ours([str(path)])
        metadata = result["video_metadata"][0]
        with av.open(str(path)) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        frames = np.stack([decoded[i] for i in metadata.frames_indices])
        grid = result["video_grid_thw"][0].tolist()
        resized_h, resized_w = grid[1] * 16, grid[2] * 16
        label = f"video 10s 640x360 {grid}"
        report(
            label + " frames",
            timings(
                lambda: ours(
                    [frames], video_metadata=[{"fps": 2, "frames_indices": metadata.frames_indices}]
                ),
                repeats,
            ),
            timings(
                lambda: reference_video(frames, resized_h, resized_w, image_processor), repeats
            ),
        )
        file_time = timings(lambda: ours([str(path)]), repeats)
        print(
            f"{label + ' file':<28} ours (PyAV decode + sample + process) {file_time[0]:8.4f} / {file_time[1]:8.4f} s"
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bench_images(args.repeats)
    bench_video(args.repeats)


if __name__ == "__main__":
    main()
