"""mlx-vlm's real command line (`python -m mlx_vlm.generate`) running this plugin:
greedy text against transformers for an image and a video, the alias default
prompt, and bad image files.

Each CLI run costs seconds of imports, so the module starts all of them at once
(output to files) and each test waits for its own."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor as ReferenceProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as ReferenceVideoProcessor
from transformers.video_utils import VideoMetadata

from mlx_vlm.utils import prepare_inputs
from mlx_vlm_qwen3vl.qwen3_vl.processing import Qwen3VLProcessor
from helpers import seed_hub_cache, write_video

IMAGE_TOKEN, VIDEO_TOKEN = 151655, 151656
ALIAS, ALIAS_REPO = "qwen3-vl-4b", "Qwen/Qwen3-VL-4B-Instruct"
ALIAS_DEFAULT_PROMPT = "Describe this image."
CLIP_FRAMES, CLIP_FPS = 30, 10  # 3 s


class Run:
    """One `python -m mlx_vlm.generate` process writing to files."""

    def __init__(self, folder: Path, args, env_extra=None):
        env = {k: v for k, v in os.environ.items() if k != "MLX_VLM_QWEN3VL_DISABLE"}
        env.update({"HF_HUB_OFFLINE": "1", **(env_extra or {})})
        folder.mkdir()
        self._out, self._err = folder / "stdout", folder / "stderr"
        with open(self._out, "w") as out, open(self._err, "w") as err:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mlx_vlm.generate", *map(str, args)], stdout=out, stderr=err, env=env
            )

    def result(self, timeout=300):
        returncode = self._process.wait(timeout=timeout)
        return SimpleNamespace(returncode=returncode, stdout=self._out.read_text(), stderr=self._err.read_text())

    def stop(self):
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("cli_files")
    rng = np.random.default_rng(0)
    image = root / "picture.png"
    Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8)).save(image)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(image.read_bytes()[:8] + b"not an image at all")
    cache = root / "hub"
    seed_hub_cache(cache, ALIAS_REPO, Path(tiny_checkpoint))
    return SimpleNamespace(
        image=image,
        corrupt=corrupt,
        missing=root / "no_such_picture.png",
        video=write_video(root / "clip.mp4", num_frames=CLIP_FRAMES, fps=CLIP_FPS),
        cache=cache,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint, files):
    root = tmp_path_factory.mktemp("cli_runs")
    model = ["--model", tiny_checkpoint, "--temperature", "0"]
    started = {
        "image": Run(root / "image", [*model, "--image", files.image, "--prompt", "Describe this image.",
                                      "--max-tokens", 8]),
        "video": Run(root / "video", [*model, "--video", files.video, "--prompt", "What happens in this video?",
                                      "--max-tokens", 4, "--verbose"]),
        "alias": Run(root / "alias", ["--model", ALIAS, "--image", files.image, "--max-tokens", 2,
                                      "--temperature", "0", "--verbose"], {"HF_HUB_CACHE": files.cache}),
        "corrupt": Run(root / "corrupt", [*model, "--image", files.corrupt, "--prompt", "Hi", "--max-tokens", 2]),
        "missing": Run(root / "missing", [*model, "--image", files.missing, "--prompt", "Hi", "--max-tokens", 2]),
    }
    yield started
    for run in started.values():
        run.stop()


def _succeeded(run):
    result = run.result()
    assert result.returncode == 0, result.stderr[-4000:]
    return result


# ------------------------------------------------------------------ references
@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Qwen3VLProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return Qwen3VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def _chat(processor, question, media_type):
    """The prompt the CLI renders: one user turn, the media first, then the text."""
    content = [{"type": media_type}, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _reference_greedy(reference, inputs, n):
    ids = np.asarray(inputs["input_ids"])
    media = {k: torch.tensor(np.asarray(inputs[k])) for k in
             ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in inputs}
    types = (ids == IMAGE_TOKEN) * 1 + (ids == VIDEO_TOKEN) * 2
    with torch.no_grad():
        out = reference.generate(input_ids=torch.tensor(ids), mm_token_type_ids=torch.tensor(types),
                                 do_sample=False, max_new_tokens=n, min_new_tokens=n, **media)
    tokens = out[0, ids.shape[1]:].tolist()
    assert len(set(tokens)) >= 2, "the reference output is degenerate; the test would be weak"
    eos = json.loads((Path(reference.name_or_path) / "generation_config.json").read_text())["eos_token_id"]
    assert not set(tokens) & set(eos if isinstance(eos, list) else [eos]), "the CLI would stop early"
    return tokens


def _printed_prompt(stdout):
    """The prompt `--verbose` prints, between 'Prompt: ' and the blank line that ends it."""
    match = re.search(r"^Prompt: (.*?assistant\n)\n", stdout, re.S | re.M)
    assert match, stdout
    return match.group(1)


# ------------------------------------------------------------------ tests
def test_image_prompt_prints_transformers_greedy_text(runs, files, processor, reference):
    n = 8
    inputs = processor(text=[_chat(processor, "Describe this image.", "image")], images=[Image.open(files.image)],
                       return_tensors="np")
    expected = processor.decode(_reference_greedy(reference, inputs, n))
    result = _succeeded(runs["image"])
    assert expected.strip(), "nothing to compare"
    assert expected + "\n" in result.stdout, (expected, result.stdout)


def test_video_file_is_sampled_at_two_fps_and_matches_transformers(runs, files, processor, reference):
    result = _succeeded(runs["video"])
    prompt = _printed_prompt(result.stdout)
    assert prompt == _chat(processor, "What happens in this video?", "video")

    # transformers' sampling rule at the checkpoint's fps (2) on a 3 s, 10 fps clip
    settings = SimpleNamespace(fps=2, min_frames=4, max_frames=768)
    metadata = VideoMetadata(total_num_frames=CLIP_FRAMES, fps=CLIP_FPS)
    indices = ReferenceVideoProcessor.sample_frames(settings, metadata).tolist()
    assert len(indices) == 6
    times = ReferenceProcessor._calculate_timestamps(None, list(indices), CLIP_FPS, 2)
    assert f"sampled {len(indices)} of {CLIP_FRAMES} frames at 2.00 fps" in result.stdout

    # The inputs the CLI builds from that prompt (the host's prepare_inputs on our processor).
    inputs = prepare_inputs(processor, videos=[str(files.video)], prompts=prompt)
    ids = np.array(inputs["input_ids"])[0]
    grid_t, grid_h, grid_w = np.array(inputs["video_grid_thw"])[0].tolist()
    assert grid_t == len(indices) // 2
    text = processor.decode(ids.tolist())
    assert re.findall(r"<[\d.]+ seconds>", text) == [f"<{t:.1f} seconds>" for t in times]
    frame = "<|vision_start|>" + "<|video_pad|>" * (grid_h * grid_w // 4) + "<|vision_end|>"
    assert text.count(frame) == grid_t
    assert (ids == VIDEO_TOKEN).sum() == grid_t * grid_h * grid_w // 4

    expected = processor.decode(_reference_greedy(reference, inputs, 4))
    assert f"\n{expected}\n==========" in result.stdout  # --verbose streams the text, then a rule


def test_alias_without_prompt_uses_describe_this_image(runs, processor):
    result = _succeeded(runs["alias"])
    assert _printed_prompt(result.stdout) == _chat(processor, ALIAS_DEFAULT_PROMPT, "image")


@pytest.mark.parametrize("case, reason", [("corrupt", "cannot identify image file"), ("missing", "image file not found")])
def test_bad_image_file_is_a_clear_error_naming_it(runs, files, case, reason):
    result = runs[case].result()
    path = str(getattr(files, case))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError:") and path in last and reason in last, last
    # It fails while loading the file, before the model or MLX computes anything.
    assert "qwen3_vl/model.py" not in result.stderr and "mlx/nn" not in result.stderr
    assert not result.stdout.strip()
