"""Exact batched generation on the tiny random checkpoints: left-padded batches
of text, image, two-image and video prompts built by the processor, against
each prompt run alone and against transformers on the same padded batch;
greedy tokens through mlx-vlm's BatchGenerator, fed both ways the host feeds
it; and the host's OpenAI server answering concurrent requests."""

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from mlx_vlm import load
from mlx_vlm.generate.ar import BatchGenerator, _split_prompt_kwargs_per_row
from mlx_vlm.utils import StoppingCriteria
from mlx_vlm_qwen3vl.qwen3_vl import Model

from helpers import drain, ours_kwargs, prompt_kwargs, single_run

TOL = 1e-4
N_TOKENS = 16
MIN_PIXELS = 32 * 32  # keeps the test images at a few merged tokens each
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def _image(height, width, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _video(frames, height, width, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(frames)]


# name: (question, images, videos). Longer prompts come first, so the host's
# length sort reorders every batch.
ROWS = {
    "two images": ("Compare the two pictures.", [_image(64, 96, 1), _image(96, 128, 2)], []),
    "video": ("What happens in the video?", [], [_video(4, 64, 64, 3)]),
    "one image": ("What is in this picture?", [_image(80, 80, 4)], []),
    "text": ("Write a short poem about the sea and the sky.", [], []),
    "short text": ("Hi.", [], []),
}
BATCHES = {2: ["two images", "text"], 3: ["video", "one image", "short text"], 5: list(ROWS)}


def _chat(processor, name):
    question, images, videos = ROWS[name]
    content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
    content.append({"type": "text", "text": question})
    conversation = [{"role": "user", "content": content}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def _process(processor, names):
    """The processor's left-padded batch of the named rows (numpy)."""
    images = [image for name in names for image in ROWS[name][1]]
    videos = [video for name in names for video in ROWS[name][2]]
    return processor(
        text=[_chat(processor, name) for name in names],
        images=images or None,
        videos=videos or None,
        padding=True,
        padding_side="left",
        return_tensors="np",
        min_pixels=MIN_PIXELS,
        return_mm_token_type_ids=True,
    )


def _media(inputs):
    return {k: inputs[k] for k in MEDIA_KEYS if k in inputs}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=["tied", "untied"])
def host(request, tiny_checkpoint, tiny_checkpoint_untied):
    """Our model and processor as mlx-vlm loads them, and each row run alone."""
    path = Path(tiny_checkpoint if request.param == "tied" else tiny_checkpoint_untied)
    model, processor = load(str(path))
    assert isinstance(model, Model)
    alone = {}
    for name in ROWS:
        inputs = _process(processor, [name])
        steps, tokens = single_run(model, inputs["input_ids"][0].tolist(), _media(inputs), N_TOKENS)
        alone[name] = SimpleNamespace(logits=steps[0], tokens=tokens)
    return SimpleNamespace(model=model, processor=processor, path=path, name=request.param, alone=alone)


@pytest.fixture(scope="module")
def reference(host):
    return Qwen3VLForConditionalGeneration.from_pretrained(host.path, dtype=torch.float32).eval()


def test_greedy_outputs_differ_across_rows_and_positions(host):
    """Guards the generation tests below against passing vacuously."""
    outputs = [tuple(row.tokens) for row in host.alone.values()]
    assert len(set(outputs)) == len(outputs), "two rows generate the same tokens"
    for tokens in outputs:
        assert len(set(tokens)) >= 3, f"a degenerate greedy output: {tokens}"


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("size", sorted(BATCHES))
def test_padded_batch_logits_match_single_runs_and_transformers(host, reference, size, code_path):
    names = BATCHES[size]
    inputs = _process(host.processor, names)
    mask = inputs["attention_mask"]
    assert len(set(mask.sum(axis=1))) == size, "rows of equal length would not test padding"
    pixels, media = ours_kwargs(_media(inputs))
    ours = host.model(mx.array(inputs["input_ids"]), pixels, mask=mx.array(mask), **media).logits
    ours = np.array(ours)
    with torch.no_grad():
        theirs = reference(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()
    for row, name in enumerate(names):
        real = mask[row].astype(bool)
        np.testing.assert_allclose(ours[row, real], host.alone[name].logits, rtol=0, atol=TOL)
        np.testing.assert_allclose(ours[row, real], theirs[row, real], rtol=0, atol=TOL)


# ------------------------------------------------------------------ BatchGenerator
def _stop_token(host):
    """A token the text row generates mid-way (and not before), used as an
    extra EOS, so that this row stops early, before its max_tokens."""
    tokens = host.alone["text"].tokens
    for k in range(4, N_TOKENS - 4):
        if tokens[k] not in tokens[:k]:
            return tokens[k]
    raise AssertionError(f"no usable stop token in {tokens}")


def _expected(tokens, max_tokens, stop):
    tokens = tokens[:max_tokens]
    return tokens[: tokens.index(stop) + 1] if stop in tokens else tokens


def _generator(host, stop, **kwargs):
    # A private stopping criteria: BatchGenerator adds stop tokens to the one
    # it is given, which would leak into the processor shared by other tests.
    tokenizer = SimpleNamespace(stopping_criteria=StoppingCriteria([stop], None))
    return BatchGenerator(host.model.language_model, SimpleNamespace(tokenizer=tokenizer),
                          compute_logprobs=False, **kwargs)


# Rows finish at different times: their own max_tokens, and the text row on a stop token.
MAX_TOKENS = {"two images": N_TOKENS, "video": 5, "one image": 11, "text": N_TOKENS, "short text": 8}


def _max_tokens(names):
    return [MAX_TOKENS[name] for name in names]


def _check(host, names, got, stop):
    expected = [_expected(host.alone[n].tokens, m, stop) for n, m in zip(names, _max_tokens(names))]
    assert got == expected
    return expected


def _embedded(host, names):
    """The named rows through the processor and `get_input_embeddings`, as the
    host does it: token ids, attention mask and BatchGenerator prompt kwargs."""
    inputs = {k: mx.array(v) for k, v in _process(host.processor, names).items()}
    ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    inputs.pop("mm_token_type_ids")
    pixels = inputs.pop("pixel_values", None)
    features = host.model.get_input_embeddings(ids, pixels, mask=mask, **inputs)
    return ids, mask, prompt_kwargs(features, **inputs)


@pytest.mark.parametrize("size", range(1, len(ROWS) + 1))
def test_batch_generator_on_one_padded_batch(host, size):
    """As `batch_generate` feeds it: the processor's padded batch embedded at
    once, split per row, `insert(..., attention_mask=mask)`. Even sizes prefill
    in chunks of 12 columns, which cut through image and video tokens."""
    names = list(ROWS)[-size:] if size % 2 else list(ROWS)[:size]
    stop = _stop_token(host)
    ids, mask, kwargs = _embedded(host, names)
    step = 12 if size % 2 == 0 else 2048
    generator = _generator(host, stop, prefill_batch_size=size, completion_batch_size=size,
                           prefill_step_size=step)
    per_row = _split_prompt_kwargs_per_row(kwargs, size)
    uids = generator.insert(ids, _max_tokens(names), prompt_kwargs=per_row, attention_mask=mask)
    expected = _check(host, names, drain(generator, uids), stop)
    if size == len(ROWS):
        assert len({len(tokens) for tokens in expected}) >= 3, "rows should finish at different times"
        stopped = [len(t) < m and t[-1] == stop for t, m in zip(expected, _max_tokens(names))]
        assert any(stopped), "no row stopped on the EOS"


@pytest.mark.parametrize(
    "copies, slots",
    [
        (1, dict(prefill_batch_size=5, completion_batch_size=5)),
        (1, dict(prefill_batch_size=2, completion_batch_size=3, prefill_step_size=16)),
        (1, dict(prefill_batch_size=1, completion_batch_size=2)),
        (2, {}),
    ],
    ids=["all at once", "chunked prefill, 3 slots", "one at a time, 2 slots", "10 requests, host defaults"],
)
def test_batch_generator_on_separate_requests(host, copies, slots):
    """As the server feeds it: each request embedded alone and inserted; with
    fewer slots than requests, later requests join the running batch. The
    host's defaults prefill 8 at a time, then the other 2 join."""
    names = list(ROWS) * copies
    stop = _stop_token(host)
    rows = [_embedded(host, [name]) for name in names]
    generator = _generator(host, stop, **slots)
    uids = generator.insert([ids[0].tolist() for ids, _, _ in rows], _max_tokens(names),
                            prompt_kwargs=[kwargs for _, _, kwargs in rows])
    _check(host, names, drain(generator, uids), stop)


# ------------------------------------------------------------------ server
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


@pytest.fixture(scope="module")
def server(tiny_checkpoint_untied, tmp_path_factory):
    """`python -m mlx_vlm.server` on 127.0.0.1 with the tiny model preloaded."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "mlx_vlm.server", "--host", "127.0.0.1", "--port", str(port),
               "--model", str(tiny_checkpoint_untied), "--max-tokens", str(N_TOKENS)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            if process.poll() is not None:
                raise AssertionError(f"the server exited:\n{log_path.read_text()[-3000:]}")
            try:
                if _get(url + "/health", timeout=2) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not start in 45 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield SimpleNamespace(url=url, model=str(tiny_checkpoint_untied), log=log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _data_uri(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat_completion(server, question, image):
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_uri(image)}},
            {"type": "text", "text": question},
        ]}],
        "temperature": 0,
        "max_tokens": N_TOKENS,
        "stream": False,
        "logprobs": True,
    }
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        choice = json.loads(response.read())["choices"][0]
    return choice["message"]["content"], [t["bytes"] for t in choice["logprobs"]["content"]]


SERVER_REQUESTS = [
    ("Describe this image.", _image(64, 64, 10)),
    ("What colours do you see?", _image(96, 64, 11)),
    ("Is there a cat in this photo?", _image(128, 96, 12)),
    ("Caption this.", _image(48, 160, 13)),
]


def test_server_answers_concurrent_requests_as_it_answers_each_alone(server):
    alone = [_chat_completion(server, question, image) for question, image in SERVER_REQUESTS]
    assert len({content for content, _ in alone}) == len(alone), "requests should answer differently"
    assert all(len(tokens) == N_TOKENS for _, tokens in alone)

    log_start = len(server.log.read_text())
    results = [None] * len(SERVER_REQUESTS)
    barrier = threading.Barrier(len(SERVER_REQUESTS))

    def send(i):
        barrier.wait()
        try:
            results[i] = _chat_completion(server, *SERVER_REQUESTS[i])
        except Exception as error:  # reported below, with the row
            results[i] = error

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(SERVER_REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == alone

    # The four decodes overlapped: all started before the first finished, so
    # they ran in one batch of the server's BatchGenerator.
    events = [line.split(" request=")[0].rsplit(" - ", 1)[-1]
              for line in server.log.read_text()[log_start:].splitlines()
              if "Decode started:" in line or "Decode completed:" in line]
    assert events[: len(SERVER_REQUESTS)] == ["Decode started:"] * len(SERVER_REQUESTS), events
