"""The plugin's Qwen3-VL processor against transformers' (PIL backend, no torchvision).

Images: `Qwen2VLImageProcessorPil`, the class a `qwen3_vl` checkpoint resolves to
without torchvision. Videos: transformers' video processor needs torchvision, so
each step is checked with the pieces that run here: its `sample_frames`, its
video `smart_resize`, the PIL backend's resize/rescale/normalize on the sampled
frames and its torch `patchify`. Text: transformers' `Qwen3VLProcessor` built
around the PIL image processor.
"""

import json
import shutil
import types

import av
import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.image_utils import load_image as reference_load_image
from transformers.models.qwen3_vl.processing_qwen3_vl import (
    Qwen3VLProcessor as ReferenceProcessor,
)
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    Qwen3VLVideoProcessor as ReferenceVideoProcessor,
)
from transformers.models.qwen3_vl.video_processing_qwen3_vl import (
    smart_resize as reference_video_smart_resize,
)
from transformers.video_utils import VideoMetadata as ReferenceVideoMetadata

from mlx_vlm_qwen3vl.qwen3_vl.image_processing import Qwen3VLImageProcessor
from mlx_vlm_qwen3vl.qwen3_vl.processing import DEFAULT_CHAT_TEMPLATE, Qwen3VLProcessor

from helpers import write_video

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


class _OfflineReferenceProcessor(ReferenceProcessor):
    # ProcessorMixin's class check looks up torchvision-only classes; skip it.
    def check_argument_for_proper_class(self, argument_name, argument):
        return type(argument)


class _PrecomputedVideos:
    """Stands in for transformers' torchvision video processor: returns our
    video outputs, so the reference processor's text expansion can be checked."""

    def __init__(self, outputs, merge_size=2, temporal_patch_size=2):
        self.outputs = outputs
        self.merge_size = merge_size
        self.temporal_patch_size = temporal_patch_size

    def __call__(self, videos, **kwargs):
        return dict(self.outputs)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Qwen3VLProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def reference_images(tiny_checkpoint):
    return Qwen2VLImageProcessorPil.from_pretrained(tiny_checkpoint)


def _random_image(rng, height, width, mode="RGB"):
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").convert("P")
    if mode == "P-transparent":
        image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
        return image
    if mode == "I;16":
        values = rng.integers(0, 400, (height, width)).astype(np.uint16)
        return Image.fromarray(values)
    return rgba.convert(mode)


def _assert_same_as_reference(ours, reference, images, min_pixels=None, max_pixels=None):
    bounds = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    size = {
        "shortest_edge": min_pixels or reference.size.shortest_edge,
        "longest_edge": max_pixels or reference.size.longest_edge,
    }
    expected = reference(images=images, size=size, return_tensors="np")
    got = ours(images, **{k: v for k, v in bounds.items() if v is not None})
    np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert got["pixel_values"].dtype == np.float32
    assert got["pixel_values"].shape == expected["pixel_values"].shape
    assert np.abs(got["pixel_values"] - expected["pixel_values"]).max() <= 1e-6
    return got


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize(
    "height, width, mode",
    [
        (50, 70, "RGB"),  # below min_pixels: upscaled
        (333, 517, "RGB"),  # odd sides
        (41, 2050, "RGB"),  # aspect ratio 50
        (120, 90, "RGBA"),
        (97, 131, "LA"),
        (64, 200, "L"),
        (80, 80, "P"),
        (80, 96, "P-transparent"),
        (72, 90, "CMYK"),
        (60, 70, "I;16"),
    ],
)
def test_image_matches_transformers(processor, reference_images, height, width, mode):
    image = _random_image(np.random.default_rng(height * width), height, width, mode)
    _assert_same_as_reference(processor.image_processor, reference_images, [image])


def test_image_above_max_pixels_and_per_call_bounds(processor, reference_images):
    rng = np.random.default_rng(1)
    image = _random_image(rng, 700, 500)
    got = _assert_same_as_reference(
        processor.image_processor,
        reference_images,
        [image],
        min_pixels=4096,
        max_pixels=100_000,
    )
    t, h, w = got["image_grid_thw"][0]
    assert h * w * 16 * 16 <= 100_000 and h % 2 == 0 and w % 2 == 0
    small = _assert_same_as_reference(
        processor.image_processor,
        reference_images,
        [_random_image(rng, 20, 30)],
        min_pixels=300_000,
        max_pixels=10**7,
    )
    assert small["image_grid_thw"][0].prod() * 256 >= 300_000


def test_several_images_numpy_and_paths(processor, reference_images, tmp_path):
    rng = np.random.default_rng(2)
    images = [_random_image(rng, 100, 150), _random_image(rng, 256, 256)]
    path = tmp_path / "a.png"
    images[0].save(path)
    expected = reference_images(images=images, return_tensors="np")
    hwc = np.asarray(images[1])
    for inputs in ([str(path), hwc], [f"file://{path}", hwc.transpose(2, 0, 1)], [path, images[1]]):
        got = processor.image_processor(inputs)
        np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
        assert np.abs(got["pixel_values"] - expected["pixel_values"]).max() <= 1e-6


def test_rgba_array_and_data_uri(processor, reference_images):
    import base64
    import io

    rgba = np.random.default_rng(10).integers(0, 256, (70, 90, 4), dtype=np.uint8)
    _assert_same_as_reference(processor.image_processor, reference_images, [rgba])
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    expected = reference_images(images=[Image.fromarray(rgba)], return_tensors="np")
    got = processor.image_processor([uri])
    assert np.abs(got["pixel_values"] - expected["pixel_values"]).max() <= 1e-6


def test_exif_orientation_applied(processor, reference_images, tmp_path):
    stored = _random_image(np.random.default_rng(3), 64, 160)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    got = processor.image_processor([str(path)])
    expected = reference_images(images=[reference_load_image(str(path))], return_tensors="np")
    np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert np.abs(got["pixel_values"] - expected["pixel_values"]).max() <= 1e-6
    _, grid_h, grid_w = got["image_grid_thw"][0]
    assert grid_h > grid_w  # shown upright: taller than the stored landscape image


@pytest.mark.parametrize("orientation", [1, 6])
def test_huge_jpeg_is_reduced_while_decoding(
    tiny_checkpoint, reference_images, tmp_path, orientation
):
    path = tmp_path / "huge.jpg"
    gradient = np.linspace(0, 255, 3200, dtype=np.float32)
    pixels = np.stack([np.broadcast_to(gradient, (2400, 3200))] * 3, axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=90, exif=exif)
    upright = (2400, 3200) if orientation == 1 else (3200, 2400)
    ours = Qwen3VLImageProcessor.from_pretrained(
        tiny_checkpoint, max_pixels=200_000, max_decode_pixels=1_000_000
    )
    target_h, target_w = ours.target_size(*upright)
    decoded = ours.load(str(path))
    assert decoded.height < upright[0]  # not decoded at full size
    assert decoded.height >= target_h and decoded.width >= target_w
    assert (decoded.height > decoded.width) == (upright[0] > upright[1])
    got = ours([str(path)])
    expected = reference_images(
        images=[reference_load_image(str(path))],
        size={"shortest_edge": 65536, "longest_edge": 200_000},
        return_tensors="np",
    )
    np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert got["image_grid_thw"][0].tolist() == [1, target_h // 16, target_w // 16]
    assert np.abs(got["pixel_values"] - expected["pixel_values"]).mean() < 0.02


def test_huge_png_is_box_reduced_before_resizing(tiny_checkpoint, reference_images, tmp_path):
    path = tmp_path / "huge.png"
    gradient = np.linspace(0, 255, 2400, dtype=np.float32)
    pixels = np.stack([np.broadcast_to(gradient, (1800, 2400))] * 3, axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    ours = Qwen3VLImageProcessor.from_pretrained(
        tiny_checkpoint, max_pixels=100_000, max_decode_pixels=1_000_000
    )
    target_h, target_w = ours.target_size(1800, 2400)
    decoded = ours.load(str(path))
    assert decoded.size == (2400 // 6, 1800 // 6)  # largest factor keeping >= 352x256
    assert decoded.width >= target_w and decoded.height >= target_h
    got = ours([str(path)])
    expected = reference_images(
        images=[Image.open(path)],
        size={"shortest_edge": 65536, "longest_edge": 100_000},
        return_tensors="np",
    )
    np.testing.assert_array_equal(got["image_grid_thw"], expected["image_grid_thw"])
    assert np.abs(got["pixel_values"] - expected["pixel_values"]).mean() < 0.02


def test_num_image_tokens_matches_processing(processor):
    from mlx_vlm.utils import estimate_num_image_tokens

    image = _random_image(np.random.default_rng(4), 333, 517)
    grid = processor.image_processor([image], max_pixels=150_000)["image_grid_thw"][0]
    assert estimate_num_image_tokens(processor, 333, 517, max_pixels=150_000) == grid.prod() // 4


# ----------------------------------------------------------------------------- image errors


def test_aspect_ratio_limit_names_the_image(processor):
    image = Image.new("RGB", (2100, 10))
    with pytest.raises(ValueError, match=r"PIL image 2100x10.*aspect ratio 210.0.*limit of 200"):
        processor.image_processor([image])


def test_unreadable_and_truncated_files_are_named(processor, tmp_path):
    garbage = tmp_path / "not_an_image.png"
    garbage.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*not_an_image\.png"):
        processor.image_processor([str(garbage)])
    full = tmp_path / "full.jpg"
    _random_image(np.random.default_rng(5), 200, 200).save(full)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:2000])
    with pytest.raises(
        ValueError, match=r"cannot decode image .*truncated\.jpg \(truncated or corrupt"
    ):
        processor.image_processor([str(truncated)])
    with pytest.raises(ValueError, match=r"image file not found: .*missing\.png"):
        processor.image_processor([str(tmp_path / "missing.png")])


def test_decompression_bomb_limit(tiny_checkpoint, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000)).save(path)
    guarded = Qwen3VLImageProcessor.from_pretrained(tiny_checkpoint, max_image_pixels=1_000_000)
    with pytest.raises(
        ValueError,
        match=r"big\.png is 1200x1000 = 1200000 pixels, above the decompression-bomb limit of 1000000",
    ):
        guarded([str(path)])


# ----------------------------------------------------------------------------- text


def test_input_ids_match_transformers_processor(processor, reference_images, tiny_checkpoint):
    rng = np.random.default_rng(6)
    images = [_random_image(rng, 300, 200), _random_image(rng, 64, 64), _random_image(rng, 500, 90)]
    conversation = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}],
        }
    ]
    texts = [
        processor.apply_chat_template(conversation, add_generation_prompt=True),
        f"<|im_start|>user\n{IMAGE}What is this?<|im_end|>\n<|im_start|>assistant\n",
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    reference = _OfflineReferenceProcessor(image_processor=reference_images, tokenizer=tokenizer)
    expected = reference(
        text=list(texts), images=images, padding=True, padding_side="left", return_tensors="np"
    )
    got = processor(
        text=texts, images=images, padding=True, return_tensors="np", return_mm_token_type_ids=True
    )
    for key in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids"):
        np.testing.assert_array_equal(got[key], expected[key])
    assert np.abs(got["pixel_values"] - expected["pixel_values"]).max() <= 1e-6
    # left padding: the shorter prompt starts with pad tokens, masked out
    assert got["attention_mask"][1, 0] == 0 and got["attention_mask"][1, -1] == 1
    assert got["input_ids"][1, 0] == tokenizer.pad_token_id
    counts = (got["input_ids"] == processor.image_token_id).sum(axis=1)
    # 300x200 -> 20x14 patches; 64x64 is below min_pixels -> 256x256 -> 16x16; 500x90 -> 38x8
    assert counts.tolist() == [(280 + 256) // 4, 304 // 4]


def test_chat_template_from_checkpoint_and_fallback(processor, tiny_checkpoint, tmp_path):
    assert processor.chat_template == (tiny_checkpoint / "chat_template.jinja").read_text()
    bare = tmp_path / "bare"
    shutil.copytree(tiny_checkpoint, bare)
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    fallback = Qwen3VLProcessor.from_pretrained(bare)
    assert fallback.chat_template == DEFAULT_CHAT_TEMPLATE
    conversation = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "And"}, {"type": "video"}],
        },
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{IMAGE}And{VIDEO}<|im_end|>\n<|im_start|>assistant\n"
    )
    for p in (processor, fallback):
        assert p.apply_chat_template(conversation, add_generation_prompt=True) == expected


def test_placeholder_count_mismatch(processor):
    image = _random_image(np.random.default_rng(7), 40, 40)
    with pytest.raises(
        ValueError,
        match=r"2 image placeholders \(<\|image_pad\|>; prompt 0: 1, prompt 1: 1\) but 1 images were given",
    ):
        processor(text=[f"a {IMAGE}", f"b {IMAGE}"], images=[image])
    with pytest.raises(
        ValueError,
        match=r"0 image placeholders \(<\|image_pad\|>; prompt 0: 0\) but 2 images were given",
    ):
        processor(text="no placeholder", images=[image, image])
    with pytest.raises(
        ValueError,
        match=r"1 video placeholders \(<\|video_pad\|>; prompt 0: 1\) but 0 videos were given",
    ):
        processor(text=f"clip {VIDEO}")


def test_save_and_reload(processor, tmp_path):
    processor.save_pretrained(tmp_path / "saved")
    again = Qwen3VLProcessor.from_pretrained(tmp_path / "saved")
    assert again.image_processor.to_dict() == processor.image_processor.to_dict()
    assert again.video_processor.to_dict() == processor.video_processor.to_dict()
    assert again.chat_template == processor.chat_template


# ----------------------------------------------------------------------------- videos




def _decoded_frames(path):
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _reference_video_rows(reference_images, frames, num_frames, min_pixels, max_pixels):
    """transformers' pieces: video smart_resize, PIL resize/rescale/normalize, torch patchify."""
    height, width = frames[0].shape[:2]
    resized_h, resized_w = reference_video_smart_resize(
        num_frames,
        height,
        width,
        temporal_factor=2,
        factor=32,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    processed = []
    for frame in frames:
        chw = frame.transpose(2, 0, 1)
        chw = PilBackend.resize(
            reference_images,
            chw,
            SizeDict(height=resized_h, width=resized_w),
            PILImageResampling.BICUBIC,
        )
        chw = reference_images.rescale(chw, 1 / 255)
        processed.append(
            reference_images.normalize(chw, reference_images.image_mean, reference_images.image_std)
        )
    video = torch.from_numpy(np.stack(processed))[None]
    rows, grid_t, grid_h, grid_w = ReferenceVideoProcessor.patchify(None, video, 16, 2, 2)
    return rows[0].numpy(), [grid_t, grid_h, grid_w]


def test_video_file_sampling_timestamps_and_pixels(processor, reference_images, tmp_path):
    path = write_video(tmp_path / "clip.mp4")  # 3 s at 10 fps
    video_processor = processor.video_processor
    got = video_processor([str(path)])
    metadata = got["video_metadata"][0]
    settings = types.SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    expected_indices = ReferenceVideoProcessor.sample_frames(
        settings, ReferenceVideoMetadata(total_num_frames=30, fps=10)
    ).tolist()
    assert expected_indices == [0, 6, 12, 17, 23, 29]  # linspace(0, 29, 3 s * 2 fps)
    assert metadata.total_num_frames == 30 and metadata.fps == pytest.approx(10)
    assert metadata.frames_indices == expected_indices
    np.testing.assert_allclose(metadata.timestamps, [i / 10 for i in expected_indices], atol=1e-6)

    frames = _decoded_frames(path)
    assert len(frames) == 30
    rows, grid = _reference_video_rows(
        reference_images,
        [frames[i] for i in expected_indices],
        6,
        video_processor.min_pixels,
        video_processor.max_pixels,
    )
    assert got["video_grid_thw"].tolist() == [grid]
    assert np.abs(got["pixel_values_videos"] - rows).max() <= 1e-6


def test_variable_frame_rate_keeps_container_times(processor, tmp_path):
    from fractions import Fraction

    path = tmp_path / "vfr.mp4"
    pts_ms = np.cumsum([0] + [50, 150] * 15)[:30]  # frames 50 ms and 150 ms apart
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i, pts in enumerate(pts_ms):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 8, np.uint8), "rgb24")
            frame.pts, frame.time_base = int(pts), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    metadata = processor.video_processor([str(path)])["video_metadata"][0]
    assert metadata.total_num_frames == 30
    expected = [pts_ms[i] / 1000 for i in metadata.frames_indices]
    np.testing.assert_allclose(metadata.timestamps, expected, atol=1e-6)
    # index / average fps would be off here: the container times are used
    assert not np.allclose(expected, [i / metadata.fps for i in metadata.frames_indices], atol=0.01)


def test_video_odd_frame_count_pads_last_frame(processor, reference_images, tmp_path):
    path = write_video(tmp_path / "clip.mp4", num_frames=21, fps=7, height=64, width=80)
    got = processor.video_processor([str(path)], num_frames=5, max_pixels=64 * 64 * 8)
    metadata = got["video_metadata"][0]
    assert metadata.frames_indices == [0, 5, 10, 15, 20]
    frames = _decoded_frames(path)
    picked = [frames[i] for i in metadata.frames_indices]
    rows, grid = _reference_video_rows(
        reference_images, picked, 5, processor.video_processor.min_pixels, 64 * 64 * 8
    )
    assert got["video_grid_thw"].tolist() == [grid] and grid[0] == 3
    assert np.abs(got["pixel_values_videos"] - rows).max() <= 1e-6


def test_video_text_matches_transformers_expansion(
    processor, reference_images, tiny_checkpoint, tmp_path
):
    path = write_video(tmp_path / "clip.mp4")
    outputs = processor.video_processor([str(path)])
    prompt = "<|im_start|>user\n{}Describe<|im_end|>\n<|im_start|>assistant\n"
    got = processor(text=prompt.format(VIDEO), videos=[str(path)], return_tensors="np")
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    reference = _OfflineReferenceProcessor(
        image_processor=reference_images,
        tokenizer=tokenizer,
        video_processor=_PrecomputedVideos(outputs),
    )
    # transformers 5.23 replaces only the pad token and keeps the template's
    # vision_start/vision_end around the expansion; Qwen3-VL was trained with
    # the whole wrapped placeholder replaced (transformers <= 4.57, qwen-vl-utils),
    # which is what the bare pad token gives here.
    expected = reference(
        text=[prompt.format("<|video_pad|>")], videos=[str(path)], return_tensors="np"
    )
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    text = tokenizer.decode(got["input_ids"][0])
    assert (
        text.count("<|vision_start|>") == 3 and "<0.3 seconds>" in text and "<2.6 seconds>" in text
    )
    assert (got["input_ids"] == processor.video_token_id).sum() == outputs["video_grid_thw"][
        0
    ].prod() // 4


def _runs(ids, token_id):
    """Lengths of the consecutive runs of `token_id` in `ids`."""
    runs, length = [], 0
    for token in list(ids) + [None]:
        if token == token_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def test_images_and_videos_interleaved_in_order(processor):
    rng = np.random.default_rng(12)
    small, large = _random_image(rng, 64, 64), _random_image(rng, 320, 480)
    clip = rng.integers(0, 256, (8, 64, 96, 3), dtype=np.uint8)
    text = f"<|im_start|>user\n{IMAGE}a{VIDEO}b{IMAGE}<|im_end|>\n"
    got = processor(text=text, images=[large, small], videos=[clip], return_tensors="np")
    ids = got["input_ids"][0].tolist()
    image_grids, (video_grid,) = got["image_grid_thw"], got["video_grid_thw"]
    assert _runs(ids, processor.image_token_id) == [g.prod() // 4 for g in image_grids]
    t, h, w = video_grid
    assert _runs(ids, processor.video_token_id) == [h * w // 4] * t
    decoded = processor.decode(ids)
    # frames without metadata are taken as sampled at the configured 2 fps
    markers = ["<0.2 seconds>", "<1.2 seconds>", "<2.2 seconds>", "<3.2 seconds>"]
    positions = [decoded.index(m) for m in markers]
    assert positions == sorted(positions)
    assert decoded.index("<|image_pad|>") < positions[0] < decoded.index("b<|vision_start|>")


def test_frame_lists_and_arrays(processor, tmp_path):
    rng = np.random.default_rng(8)
    frames = rng.integers(0, 256, (30, 48, 64, 3), dtype=np.uint8)
    video_processor = processor.video_processor
    sampled = video_processor([frames], video_metadata=[{"fps": 10}])
    metadata = sampled["video_metadata"][0]
    assert metadata.frames_indices == [0, 6, 12, 17, 23, 29]
    np.testing.assert_allclose(metadata.timestamps, [0.0, 0.6, 1.2, 1.7, 2.3, 2.9])
    as_given = video_processor([list(frames[metadata.frames_indices])])
    assert as_given["video_metadata"][0].timestamps == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]  # i / fps 2
    np.testing.assert_array_equal(as_given["pixel_values_videos"], sampled["pixel_values_videos"])
    pil_frames = [Image.fromarray(f) for f in frames[metadata.frames_indices]]
    chw = frames[metadata.frames_indices].transpose(0, 3, 1, 2)
    for video in (pil_frames, chw):
        again = video_processor([video])
        np.testing.assert_array_equal(again["pixel_values_videos"], sampled["pixel_values_videos"])


@pytest.mark.parametrize("cap", [False, True])
def test_video_patch_counts_match_transformers(processor, cap):
    ours = processor.video_processor
    values = dict(
        size=ours.size,
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        cap_pixels_per_frame=cap,
        max_video_tokens=ours.max_video_tokens,
    )
    # transformers up to 5.24 reads these as attributes, from 5.25 through
    # _merge_and_standardize_kwargs (the processor's defaults + the call's kwargs).
    settings = types.SimpleNamespace(
        **values, _merge_and_standardize_kwargs=lambda **kwargs: {**values, **kwargs}
    )
    for frames, height, width in [
        (4, 360, 640),
        (7, 1080, 1920),
        (300, 720, 1280),
        (768, 2160, 3840),
    ]:
        expected = ReferenceVideoProcessor.get_num_of_video_patches(settings, frames, height, width)
        got = ours.get_num_of_video_patches(frames, height, width, {"cap_pixels_per_frame": cap})
        assert got == expected, (frames, height, width)


def test_chat_template_tokenize_loads_media(processor, tmp_path):
    image_path = tmp_path / "a.png"
    _random_image(np.random.default_rng(11), 90, 120).save(image_path)
    video_path = write_video(tmp_path / "clip.mp4")
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(image_path)},
                {"type": "video", "video": str(video_path)},
                {"type": "text", "text": "Both?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        conversation,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
    )
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    direct = processor(
        text=text, images=[str(image_path)], videos=[str(video_path)], return_tensors="np"
    )
    for key in ("input_ids", "pixel_values", "pixel_values_videos", "video_grid_thw"):
        np.testing.assert_array_equal(inputs[key], direct[key])


def test_prepare_inputs_host_path(processor, tmp_path):
    from mlx_vlm.utils import prepare_inputs

    image_path = tmp_path / "a.png"
    _random_image(np.random.default_rng(9), 90, 120).save(image_path)
    video_path = write_video(tmp_path / "clip.mp4")
    prompt = f"<|im_start|>user\n{IMAGE}{VIDEO}Both?<|im_end|>\n<|im_start|>assistant\n"
    inputs = prepare_inputs(
        processor, images=[str(image_path)], videos=[str(video_path)], prompts=[prompt]
    )
    direct = processor(
        text=prompt, images=[str(image_path)], videos=[str(video_path)], return_tensors="np"
    )
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "video_grid_thw"):
        assert isinstance(inputs[key], mx.array)
        np.testing.assert_array_equal(np.array(inputs[key]), direct[key])
    # mlx-vlm decodes with OpenCV but asks our sample_frames which frames
    assert (
        np.abs(np.array(inputs["pixel_values_videos"]) - direct["pixel_values_videos"]).max()
        <= 1e-6
    )


def test_prepare_inputs_keeps_transparency_for_our_processor(processor, reference_images, tmp_path):
    """mlx-vlm's process_image drops an image's alpha channel (convert("RGB")):
    transparent pixels would show whatever color they hold. Images for our
    processor reach it with their alpha, composited on white as transformers does."""
    from mlx_vlm.utils import prepare_inputs

    image = _random_image(np.random.default_rng(11), 90, 120, "RGBA")
    image_path = tmp_path / "transparent.png"
    image.save(image_path)
    prompt = f"<|im_start|>user\n{IMAGE}What?<|im_end|>\n<|im_start|>assistant\n"
    for source in (str(image_path), image):
        inputs = prepare_inputs(processor, images=[source], prompts=[prompt])
        expected = reference_images(images=[image], return_tensors="np")["pixel_values"]
        assert np.abs(np.array(inputs["pixel_values"]) - expected).max() <= 1e-6


def test_video_errors(processor, tmp_path):
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match=r"cannot read video .*broken\.mp4"):
        processor.video_processor([str(garbage)])
    with pytest.raises(ValueError, match=r"video file not found: .*nothing\.mp4"):
        processor.video_processor([str(tmp_path / "nothing.mp4")])
    with pytest.raises(ValueError, match=r"video .* has no frames"):
        processor.video_processor([np.zeros((0, 32, 32, 3), np.uint8)])
    empty = write_video(tmp_path / "empty.mp4", num_frames=0)
    with pytest.raises(ValueError, match=r"video .*empty\.mp4 has no (video stream|frames)"):
        processor.video_processor([str(empty)])
    with pytest.raises(ValueError, match=r"metadata lists 2 frame indices for 3 frames"):
        processor.video_processor(
            [np.zeros((3, 32, 32, 3), np.uint8)],
            video_metadata=[{"fps": 2, "frames_indices": [0, 1]}],
        )
