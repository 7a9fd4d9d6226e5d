"""Lower precision on the tiny random checkpoint: bfloat16 against transformers'
bfloat16, 4- and 8-bit checkpoints made by mlx-vlm's own converter, the converted
float layout, and the loading errors the parity suite does not cover.

The measurements are printed (run with `-s`) and recorded as junit properties."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from mlx_vlm.convert import convert
from mlx_vlm.generate import generate
from mlx_vlm.utils import load, load_model
from mlx_vlm_qwen3vl import cpu_kernel
from mlx_vlm_qwen3vl.builder import build_checkpoint
from mlx_vlm_qwen3vl.qwen3_vl import Model
from mlx_vlm_qwen3vl.qwen3_vl.processing import Qwen3VLProcessor

from helpers import copy_checkpoint_with, single_run, use_accelerator_ops

N_TOKENS = 16
GROUP_SIZE = 64  # divides every text-layer input width of the tiny shape (128, 256)


# ------------------------------------------------------------------ inputs
def _image():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8))


def _inputs(processor, question, images=()):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=[text], images=list(images) or None, return_tensors="np")
    return {k: np.asarray(v) for k, v in inputs.items() if k != "attention_mask"}


@pytest.fixture(scope="module")
def prompts(tiny_checkpoint):
    processor = Qwen3VLProcessor.from_pretrained(tiny_checkpoint)
    return {
        "text": _inputs(processor, "Write a short poem about the sea and the sky."),
        "image": _inputs(processor, "Describe this image in detail.", [_image()]),
    }


def _with_tokens(inputs, tokens):
    """`inputs` with `tokens` appended to the prompt (teacher forcing)."""
    out = dict(inputs)
    out["input_ids"] = np.concatenate([inputs["input_ids"], np.array([tokens])], axis=1)
    return out


# ------------------------------------------------------------------ runs
def _reference(path, dtype):
    return Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def _reference_kwargs(inputs):
    ids = inputs["input_ids"]
    kwargs = {k: torch.tensor(v) for k, v in inputs.items() if k != "input_ids"}
    kwargs["mm_token_type_ids"] = torch.tensor((ids == 151655) * 1 + (ids == 151656) * 2)
    return torch.tensor(ids), kwargs


def _reference_logits(model, inputs):
    ids, kwargs = _reference_kwargs(inputs)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits[0].float().numpy()


def _reference_greedy(model, inputs, n=N_TOKENS):
    ids, kwargs = _reference_kwargs(inputs)
    with torch.no_grad():
        out = model.generate(input_ids=ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _ours_logits(model, inputs):
    kwargs = {k: mx.array(v) for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
    pixels = inputs.get("pixel_values")
    logits = model(mx.array(inputs["input_ids"]), None if pixels is None else mx.array(pixels), **kwargs).logits
    return np.array(logits[0].astype(mx.float32))


def _log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _kl(reference_logits, logits):
    """KL(reference || other) of the next-token distributions, one value per position."""
    p, q = _log_softmax(reference_logits), _log_softmax(logits)
    return (np.exp(p) * (p - q)).sum(-1)


def _report(record_property, name, values):
    text = ", ".join(f"{float(v):.3g}" for v in np.atleast_1d(values))
    print(f"\n{name}: {text}")
    record_property(name, text)


# ------------------------------------------------------------------ bfloat16
@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """The seed-0 tiny checkpoint stored in bfloat16."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny_bf16"), shape="tiny", seed=0, dtype="bfloat16")


@pytest.mark.parametrize("case", ["text", "image"])
def test_bfloat16_is_as_close_to_float32_as_transformers_bfloat16(bf16_checkpoint, prompts, case, record_property, code_path):
    """All three runs share the bf16 weights (transformers float32 upcasts them), so
    the deviations are the compute precision alone. Teacher-forced on float32's
    16 greedy tokens: logits at every position, argmax at the 16 decode steps."""
    float32 = _reference(bf16_checkpoint, torch.float32)
    tokens = _reference_greedy(float32, prompts[case])
    forced = _with_tokens(prompts[case], tokens[:-1])
    expected = _reference_logits(float32, forced)
    del float32

    ours = load_model(Path(bf16_checkpoint))
    assert ours.language_model.model.embed_tokens.weight.dtype == mx.bfloat16
    theirs = _reference_logits(_reference(bf16_checkpoint, torch.bfloat16), forced)
    got = _ours_logits(ours, forced)
    decode = slice(-N_TOKENS, None)

    stats = {}
    for name, logits in (("ours", got), ("transformers", theirs)):
        error = np.abs(logits - expected)
        stats[name] = (error.max(), error.mean(), int((logits[decode].argmax(-1) == tokens).sum()))
        _report(record_property, f"bf16 {case} {name}: max|dlogit|, mean|dlogit|, greedy agreement of {N_TOKENS}",
                stats[name])
    assert stats["transformers"][0] > 0, "transformers bf16 equals float32: the comparison would be vacuous"
    # MLX and PyTorch round bf16 intermediates at different places (fused RMSNorm and
    # attention accumulate in float32), so the two are not equal: measured ours/theirs
    # 0.99-1.11 (max) and 1.01-1.07 (mean) of ~8e-3 and ~1e-3, agreement 15-16 of 16
    # for both. Allow 25% on the error and one token of agreement.
    assert stats["ours"][0] <= 1.25 * stats["transformers"][0]
    assert stats["ours"][1] <= 1.25 * stats["transformers"][1]
    assert stats["ours"][2] >= stats["transformers"][2] - 1


# ------------------------------------------------------------------ 4 and 8 bit
@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """mlx-vlm's converter on the tiny checkpoint: float (no quantization), 8 and 4 bit."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, bits in (("float", None), ("8bit", 8), ("4bit", 4)):
        out[name] = root / name
        convert(str(tiny_checkpoint), mlx_path=str(out[name]), quantize=bits is not None,
                q_bits=bits or 4, q_group_size=GROUP_SIZE)
    return out


@pytest.fixture(scope="module")
def float32_logits(tiny_checkpoint, prompts):
    reference = _reference(tiny_checkpoint, torch.float32)
    return {case: _reference_logits(reference, inputs) for case, inputs in prompts.items()}


@pytest.fixture(scope="module")
def unrelated_logits(tiny_checkpoint_untied, prompts):
    """Another random model of the same shape: the scale of a KL between different models."""
    reference = _reference(tiny_checkpoint_untied, torch.float32)
    return {case: _reference_logits(reference, inputs) for case, inputs in prompts.items()}


def test_quantized_checkpoints_load_as_our_model_and_stay_close(
    converted, prompts, float32_logits, unrelated_logits, record_property
):
    kl, agreement = {}, {}
    for bits in ("8bit", "4bit"):
        model, processor = load(str(converted[bits]))
        assert isinstance(model, Model)
        lm = model.language_model.model
        assert type(lm.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
        assert type(lm.embed_tokens).__name__ == "QuantizedEmbedding"
        assert lm.layers[0].mlp.up_proj.bits == int(bits[0])
        # mlx-vlm keeps vision towers in float
        assert type(model.vision_tower.blocks[0].mlp.linear_fc1).__name__ == "Linear"

        result = generate(model, processor, "Hello", max_tokens=4, temperature=0.0)
        assert len(result.token_ids) == 4

        per_case = {case: _ours_logits(model, inputs) for case, inputs in prompts.items()}
        values = np.concatenate([_kl(float32_logits[c], per_case[c]) for c in prompts])
        same = np.concatenate([per_case[c].argmax(-1) == float32_logits[c].argmax(-1) for c in prompts])
        kl[bits], agreement[bits] = values.mean(), same.mean()
        assert np.isfinite(values).all() and (values > -1e-9).all()
        _report(record_property, f"{bits} KL(float32 || {bits}) mean, max over positions", (values.mean(), values.max()))
        _report(record_property, f"{bits} argmax agreement with float32", agreement[bits])

    unrelated = np.concatenate([_kl(float32_logits[c], unrelated_logits[c]) for c in prompts]).mean()
    _report(record_property, "KL(float32 || unrelated random model) mean", unrelated)
    # The quantization step halves with every bit and KL grows with its square:
    # 8 bit should be ~256x closer than 4 bit; ask for 16x.
    assert kl["8bit"] * 16 < kl["4bit"]
    # Both stay far closer to the float model than another model of the same shape is.
    assert kl["4bit"] < 0.01 * unrelated
    # The random checkpoint's next-token distributions are nearly flat (logits within
    # about +-0.6, median top-2 margin ~1e-2), so 4 bit flips many argmaxes; chance
    # agreement would be 1/151936. Measured: 8 bit 0.94-0.97, 4 bit 0.56-0.60.
    assert agreement["8bit"] >= 0.8
    assert agreement["4bit"] >= 0.25


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_native_quantized_products_match_mlx_quantized_matmul(converted, prompts, bits, monkeypatch):
    """On the CPU the quantized products run in the native kernel; off it
    MLX's own quantized_matmul, the reference for the format, runs them."""
    model = load_model(Path(converted[bits]))
    native = {case: _ours_logits(model, inputs) for case, inputs in prompts.items()}
    use_accelerator_ops(monkeypatch)
    for case, inputs in prompts.items():
        reference = _ours_logits(model, inputs)
        assert np.abs(native[case] - reference).max() <= 1e-4 * np.abs(reference).max()
        np.testing.assert_array_equal(native[case].argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_native_quantized_decode_matches_mlx_quantized_matmul(converted, prompts, bits, monkeypatch):
    """Decode steps (one row: each layer in two native ops, decode_layer.py)
    against MLX's quantized_matmul, step by step."""
    model = load_model(Path(converted[bits]))
    kernel = cpu_kernel.load()
    calls = []
    for op in ("decode_qkv", "decode_residual_mlp"):
        native_op = getattr(kernel, op)
        monkeypatch.setattr(kernel, op, lambda *a, _op=native_op, **kw: calls.append(1) or _op(*a, **kw))
    ids = prompts["text"]["input_ids"][0].tolist()
    assert len(ids) > 8  # the prompt's products take the many-row path
    steps = 6
    native, native_tokens = single_run(model, ids, {}, steps)
    assert len(calls) == steps * 2 * len(model.language_model.layers)
    use_accelerator_ops(monkeypatch)
    reference, reference_tokens = single_run(model, ids, {}, steps)
    assert native_tokens == reference_tokens and len(set(native_tokens)) > 1
    for got, want in zip(native[1:], reference[1:]):
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_converted_float_checkpoint_gives_identical_logits(converted, tiny_checkpoint, prompts):
    """mlx-vlm's layout round-trips: same weights, same logits, bit for bit."""
    original = load_model(Path(tiny_checkpoint))
    reloaded = load_model(converted["float"])
    assert isinstance(reloaded, Model)
    for inputs in prompts.values():
        np.testing.assert_array_equal(_ours_logits(reloaded, inputs), _ours_logits(original, inputs))


# ------------------------------------------------------------------ loading errors


@pytest.mark.parametrize(
    "key",
    [
        "model.visual.patch_embed.proj.weight",
        "model.visual.pos_embed.weight",
        "model.visual.blocks.1.mlp.linear_fc1.weight",
        "model.visual.deepstack_merger_list.1.norm.weight",
    ],
)
def test_missing_vision_weight_is_named(tiny_checkpoint, tmp_path, key):
    path = copy_checkpoint_with(Path(tiny_checkpoint), tmp_path / "missing", lambda w: w.pop(key))
    loaded_name = key.replace("model.visual.", "vision_tower.")
    with pytest.raises(ValueError, match="the checkpoint lacks 1 weights") as error:
        load_model(path)
    assert f"{key} ({loaded_name} when converted)" in str(error.value)
    assert "download or convert it again" in str(error.value)


def test_missing_weights_in_both_towers_are_all_named(tiny_checkpoint, tmp_path):
    keys = ["model.visual.blocks.0.attn.qkv.bias", "model.language_model.norm.weight"]
    path = copy_checkpoint_with(Path(tiny_checkpoint), tmp_path / "missing", lambda w: [w.pop(k) for k in keys])
    with pytest.raises(ValueError) as error:
        load_model(path)
    assert "model.visual.blocks.0.attn.qkv.bias (vision_tower.blocks.0.attn.qkv.bias when converted)" in str(error.value)
    assert "model.language_model.norm.weight (language_model.model.norm.weight when converted)" in str(error.value)


def test_unexpected_weights_in_both_towers_are_named_together(tiny_checkpoint, tmp_path):
    def add(w):
        w["model.visual.merger.extra_proj.weight"] = mx.zeros((2, 2))
        w["model.language_model.norm.extra"] = mx.zeros((2,))

    path = copy_checkpoint_with(Path(tiny_checkpoint), tmp_path / "extra", add)
    with pytest.raises(ValueError) as error:
        load_model(path)
    assert "vision_tower.merger.extra_proj.weight" in str(error.value)
    assert "language_model.model.norm.extra" in str(error.value)


def test_bfloat16_host_greedy_follows_the_model_argmax(bf16_checkpoint, prompts):
    """mlx-vlm's loop takes log-probabilities in the logits' dtype: the model
    returns float32 logits so that bf16 near-ties do not collapse to the
    lowest token id (found on this checkpoint: the raw top token was 101453,
    the loop picked 11432)."""
    from mlx_vlm.generate.ar import generate_step

    model = load_model(Path(bf16_checkpoint))
    for case in ("text", "image"):
        inputs = prompts[case]
        pixels = inputs.get("pixel_values")
        kwargs = {k: mx.array(v) for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
        steps = generate_step(
            mx.array(inputs["input_ids"]), model, None if pixels is None else mx.array(pixels), None,
            max_tokens=8, temperature=0.0, **kwargs,
        )
        tokens = [int(token) for token, _ in steps]
        logits = _ours_logits(model, _with_tokens(inputs, tokens[:-1]))
        assert logits.dtype == np.float32
        assert logits[-8:].argmax(-1).tolist() == tokens, case
