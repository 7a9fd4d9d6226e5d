"""Test helpers shared by several suites: our model run on one prompt, the
host's keyword arguments for a prompt, a drained BatchGenerator, an edited copy
of a checkpoint, a seeded Hugging Face cache, a real encoded video file, and
the accelerator code path on the CPU."""

import shutil
from pathlib import Path

import av
import mlx.core as mx
import numpy as np

from mlx_vlm.models.cache import make_prompt_cache
from mlx_vlm_qwen3vl import cpu_kernel
from mlx_vlm_qwen3vl.qwen3_vl import layers


def use_accelerator_ops(monkeypatch):
    """Run the model as it runs off the CPU (Metal, CUDA: what most users run):
    nn.Linear, mx.fast.* and MLX's own quantized products, here on the CPU.
    Using the native CPU kernel then fails the test."""
    def no_kernel():
        raise AssertionError("the native CPU kernel was used off the CPU path")

    monkeypatch.setattr(layers, "cpu_policy", lambda: (False, False))
    monkeypatch.setattr(cpu_kernel, "load", no_kernel)


def ours_kwargs(media):
    """`media` (numpy or lists: pixel values, grids) as our model's
    `(pixel_values, kwargs)`."""
    kwargs = {k: mx.array(np.array(v)) for k, v in media.items()}
    return kwargs.pop("pixel_values", None), kwargs


def single_run(model, ids, media, n):
    """One prompt alone: the prompt's logits [L, V] followed by the last-token
    logits of each of `n` greedy steps, and the `n` greedy tokens."""
    pixels, kwargs = ours_kwargs(media)
    cache = make_prompt_cache(model.language_model)
    logits = model(mx.array([ids]), pixels, cache=cache, **kwargs).logits
    steps, tokens = [np.array(logits[0])], []
    for _ in range(n):
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model.language_model(mx.array([[tokens[-1]]]), cache=cache).logits
        steps.append(np.array(logits[0, -1]))
    return steps, tokens


def prompt_kwargs(features, **extra):
    """What the host hands BatchGenerator for a prompt: its data kwargs and the
    non-None fields of `get_input_embeddings`' result."""
    return {**extra, **{k: v for k, v in features.to_dict().items() if v is not None}}


def drain(generator, uids):
    """Step a BatchGenerator until it is idle; each uid's tokens, in `uids` order."""
    got = {uid: [] for uid in uids}
    while generator.has_work:
        for response in generator.next()[1]:
            got[response.uid].append(response.token)
    generator.close()
    return [got[uid] for uid in uids]


def copy_checkpoint_with(src: Path, dst: Path, edit):
    shutil.copytree(src, dst)
    weights = dict(mx.load(str(dst / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "pt"})
    return dst


def seed_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """Lay `checkpoint` out as a cached Hugging Face snapshot of `repo_id`."""
    commit = "0" * 40
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in checkpoint.iterdir():
        (snapshot / item.name).symlink_to(item)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot



def write_video(path, num_frames=30, fps=10, height=96, width=128):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.start_encoding()  # writes the header even when no frame follows
        for i in range(num_frames):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = i * 8
            frame[:, : i * 4, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
