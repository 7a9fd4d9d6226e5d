"""A decoder layer's decode step in two native ops (qwen3_vl/decode_layer.py,
csrc/decode_layer.cpp), quantized or dense bfloat16: the same bits as the separate ops it
replaces, op by op and
through the model (one row, a left-padded batch, mlx-vlm's BatchGenerator), and where
it does not apply."""

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_vlm.convert import convert
from mlx_vlm.generate.ar import BatchGenerator
from mlx_vlm.models.cache import make_prompt_cache
from mlx_vlm.utils import StoppingCriteria, load_model
from mlx_vlm_qwen3vl import cpu_kernel
from mlx_vlm_qwen3vl.builder import build_checkpoint
from mlx_vlm_qwen3vl.qwen3_vl import decode_layer, language

from helpers import drain, prompt_kwargs, single_run, use_accelerator_ops

STEPS = 6
PROMPT = [9707, 11, 1879, 0, 358, 1079, 264, 1273, 10135, 13, 3555, 374]


@pytest.fixture(scope="module")
def kernel():
    return cpu_kernel.load()


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint in float32 at 4 and 8 bits, and a bfloat16 one
    as built and at 4 bits (their products take the AVX-512 BF16 paths where
    there are)."""
    root = tmp_path_factory.mktemp("decode_layer")
    bf16 = build_checkpoint(root / "bf16", shape="tiny", dtype="bfloat16", seed=5)
    paths = {}
    for name, source, bits in (("float32-4bit", tiny_checkpoint, 4), ("float32-8bit", tiny_checkpoint, 8),
                               ("bfloat16-4bit", bf16, 4)):
        paths[name] = root / name
        convert(str(source), mlx_path=str(paths[name]), quantize=True, q_bits=bits, q_group_size=64)
    paths["bfloat16-dense"] = bf16
    return paths


def _taken(name) -> bool:
    """Dense weights take the two-op step only on a CPU with AVX-512 BF16."""
    return name != "bfloat16-dense" or cpu_kernel.load().has_dense_bf16()


def _counting(monkeypatch) -> list:
    """Records, per decoder layer call, whether the two-op step ran."""
    calls = []

    def counting(*args):
        out = decode_layer.decode_layer(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(language, "decode_layer", counting)
    return calls


def _separate_ops(monkeypatch):
    monkeypatch.setattr(language, "decode_layer", lambda *args: None)


@pytest.mark.parametrize("name", ["float32-4bit", "float32-8bit", "bfloat16-4bit", "bfloat16-dense"])
def test_decode_steps_are_the_separate_ops_bits(quantized, name, monkeypatch):
    model = load_model(Path(quantized[name]))
    layers = len(model.language_model.layers)
    with monkeypatch.context() as m:
        calls = _counting(m)
        fused, fused_tokens = single_run(model, PROMPT, {}, STEPS)
    # The prompt's layers run op by op (many rows); every decode step's layers in two ops.
    assert calls == [False] * layers + [_taken(name)] * layers * STEPS
    _separate_ops(monkeypatch)
    separate, separate_tokens = single_run(model, PROMPT, {}, STEPS)
    assert fused_tokens == separate_tokens and len(set(fused_tokens)) > 1
    for got, want in zip(fused, separate):
        np.testing.assert_array_equal(got, want)


def _padded_batch_run(model, rows, steps):
    """Last-position logits of a left-padded batch's prompt and `steps` greedy steps."""
    width = max(len(r) for r in rows)
    ids = mx.array([[0] * (width - len(r)) + r for r in rows])
    mask = mx.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    cache = make_prompt_cache(model.language_model)
    logits = model(ids, None, cache=cache, mask=mask).logits[:, -1]
    out = [np.array(logits)]
    for _ in range(steps):
        logits = model.language_model(mx.argmax(logits, axis=-1)[:, None], cache=cache).logits[:, -1]
        out.append(np.array(logits))
    return out


@pytest.mark.parametrize("name", ["bfloat16-4bit", "bfloat16-dense"])
def test_left_padded_batch_decode_is_the_separate_ops_bits(quantized, name, monkeypatch):
    """Rows at different positions (per-row rope offsets, the padding mask)."""
    model = load_model(Path(quantized[name]))
    rows = [PROMPT, PROMPT[3:9], PROMPT[:10]]
    with monkeypatch.context() as m:
        calls = _counting(m)
        fused = _padded_batch_run(model, rows, STEPS)
    assert calls.count(True) == len(model.language_model.layers) * STEPS * _taken(name)
    _separate_ops(monkeypatch)
    separate = _padded_batch_run(model, rows, STEPS)
    for got, want in zip(fused, separate):
        np.testing.assert_array_equal(got, want)
    tokens = np.array([step.argmax(-1) for step in fused])
    assert len({tuple(column) for column in tokens.T}) == len(rows)


def _batch_generator_tokens(model, rows, max_tokens):
    """Greedy tokens of mlx-vlm's BatchGenerator (the server's path: a batch KV
    cache, per-row offsets and padding), the prompts prefilled one at a time,
    each joining the running batch."""
    tokenizer = SimpleNamespace(stopping_criteria=StoppingCriteria([151643], None))
    generator = BatchGenerator(model.language_model, SimpleNamespace(tokenizer=tokenizer),
                               compute_logprobs=False, prefill_batch_size=1, completion_batch_size=3)
    kwargs = []
    for ids in rows:
        ids = mx.array([ids])
        kwargs.append(prompt_kwargs(model.get_input_embeddings(ids, None, mask=mx.ones_like(ids))))
    uids = generator.insert(rows, [max_tokens] * len(rows), prompt_kwargs=kwargs)
    return drain(generator, uids)


def test_batch_generator_decode_is_the_separate_ops_tokens(quantized, monkeypatch):
    model = load_model(Path(quantized["bfloat16-4bit"]))
    rows = [PROMPT, PROMPT[2:7], PROMPT[:9]]
    with monkeypatch.context() as m:
        calls = []
        original = decode_layer.decode_layer
        m.setattr(language, "decode_layer",
                  lambda layer, x, *args: calls.append(x.shape[0]) or original(layer, x, *args))
        fused = _batch_generator_tokens(model, rows, 10)
    assert max(calls) == len(rows), "the batch never decoded all rows together"
    _separate_ops(monkeypatch)
    assert fused == _batch_generator_tokens(model, rows, 10)
    assert len({tuple(tokens) for tokens in fused}) == len(rows)


def test_not_taken_for_float32_dense_weights_or_off_the_cpu(quantized, tiny_checkpoint, monkeypatch):
    dense = load_model(Path(tiny_checkpoint))
    with monkeypatch.context() as m:
        calls = _counting(m)
        single_run(dense, PROMPT, {}, 2)
    assert calls and not any(calls)
    model = load_model(Path(quantized["float32-4bit"]))
    use_accelerator_ops(monkeypatch)
    calls = _counting(monkeypatch)
    single_run(model, PROMPT, {}, 2)
    assert calls and not any(calls)


# ------------------------------------------------------------------ the ops themselves
def _quantized(rng, out_features, in_features, dtype, bits):
    w = mx.array(rng.standard_normal((out_features, in_features)).astype(np.float32) * 0.05).astype(dtype)
    return list(mx.quantize(w, group_size=64, bits=bits))


def _vector(rng, shape, dtype, scale=1.0):
    return mx.array(rng.standard_normal(shape).astype(np.float32) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_qkv_is_norm_products_and_norm_rope(kernel, dtype, rows):
    rng = np.random.default_rng(rows)
    D, H, Hkv, hd, bits = 256, 4, 2, 64, 4
    x = _vector(rng, (rows, 1, D), dtype)
    norm, q_norm, k_norm = (_vector(rng, (n,), dtype, 0.3) + 1 for n in (D, hd, hd))
    q, k, v = (_quantized(rng, n, D, dtype, bits) for n in (H * hd, Hkv * hd, Hkv * hd))
    offsets = mx.array([5, 17, 0][:rows] if rows > 1 else [11], dtype=mx.int32)
    got = kernel.decode_qkv(x, norm, q + k + v, q_norm, k_norm, offsets, H, 1e-6, 1e-5, 10000.0,
                            64, bits, threads=2)
    normed = kernel.rms_norm(x, norm, 1e-6)
    joint = kernel.quantized_matvec_many(normed, [q[0], k[0], v[0]], [q[1], k[1], v[1]],
                                         [q[2], k[2], v[2]], 64, bits, threads=2, dtype=dtype)
    want = [
        kernel.norm_rope(joint[..., : H * hd], q_norm, offsets, H, 1e-5, 10000.0),
        kernel.norm_rope(joint[..., H * hd: (H + Hkv) * hd], k_norm, offsets, Hkv, 1e-5, 10000.0),
        joint[..., (H + Hkv) * hd:].reshape(rows, 1, Hkv, hd).transpose(0, 2, 1, 3),
    ]
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == dtype
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
    assert not np.array_equal(np.array(got[0][0].astype(mx.float32)), np.array(want[2][0].astype(mx.float32)))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_residual_mlp_is_products_adds_norm_and_gate(kernel, dtype, bits):
    rng = np.random.default_rng(bits)
    rows, A, D, inner = 2, 192, 256, 320
    attn, x = _vector(rng, (rows, 1, A), dtype), _vector(rng, (rows, 1, D), dtype)
    norm = _vector(rng, (D,), dtype, 0.3) + 1
    o = _quantized(rng, D, A, dtype, bits)
    gate, up = _quantized(rng, inner, D, dtype, bits), _quantized(rng, inner, D, dtype, bits)
    down = _quantized(rng, D, inner, dtype, bits)
    got = kernel.decode_residual_mlp(attn, x, o, norm, 1e-6, gate + up + down, 64, bits, threads=2)
    h = x + kernel.quantized_matvec(attn, *o, 64, bits, threads=2, dtype=dtype)
    m = kernel.rms_norm(h, norm, 1e-6)
    g = kernel.quantized_matvec(m, *gate, 64, bits, threads=2, dtype=dtype)
    u = kernel.quantized_matvec(m, *up, 64, bits, threads=2, dtype=dtype)
    want = h + kernel.quantized_matvec(kernel.silu_mul(g, u), *down, 64, bits, threads=2, dtype=dtype)
    assert got.shape == want.shape and got.dtype == dtype
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))


def _dense(rng, out_features, in_features):
    return [_vector(rng, (out_features, in_features), mx.bfloat16, 0.05)]


def test_decode_ops_with_dense_bfloat16_weights_are_the_separate_ops(kernel):
    rng = np.random.default_rng(7)
    rows, D, H, Hkv, hd, inner = 2, 256, 4, 2, 64, 320
    dtype = mx.bfloat16
    x = _vector(rng, (rows, 1, D), dtype)
    norm, q_norm, k_norm = (_vector(rng, (n,), dtype, 0.3) + 1 for n in (D, hd, hd))
    q, k, v = (_dense(rng, n, D) for n in (H * hd, Hkv * hd, Hkv * hd))
    o, gate, up, down = _dense(rng, D, H * hd), _dense(rng, inner, D), _dense(rng, inner, D), _dense(rng, D, inner)
    offsets = mx.array([3, 9], dtype=mx.int32)
    if not kernel.has_dense_bf16():
        with pytest.raises(ValueError, match="AVX-512 BF16 build"):
            kernel.decode_qkv(x, norm, q + k + v, q_norm, k_norm, offsets, H, 1e-6, 1e-6, 1e4, 0, 0)
        return
    got_q, got_k, got_v = kernel.decode_qkv(x, norm, q + k + v, q_norm, k_norm, offsets, H,
                                            1e-6, 1e-6, 1e4, 0, 0, threads=2)
    product = lambda a, w: kernel.matmul_bf16(a, w[0], threads=2)  # noqa: E731
    normed = kernel.rms_norm(x, norm, 1e-6)
    want = [kernel.norm_rope(product(normed, q), q_norm, offsets, H, 1e-6, 1e4),
            kernel.norm_rope(product(normed, k), k_norm, offsets, Hkv, 1e-6, 1e4),
            product(normed, v).reshape(rows, 1, Hkv, hd).transpose(0, 2, 1, 3)]
    for a, b in zip((got_q, got_k, got_v), want):
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32)))
    a = got_q.transpose(0, 2, 1, 3).reshape(rows, 1, H * hd)
    got = kernel.decode_residual_mlp(a, x, o, norm, 1e-6, gate + up + down, 0, 0, threads=2)
    h = x + product(a, o)
    m = kernel.rms_norm(h, norm, 1e-6)
    want = h + product(kernel.silu_mul(product(m, gate), product(m, up)), down)
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))
    strided = [_vector(rng, (D, H * hd), dtype).T]  # rows H * hd apart: not contiguous
    with pytest.raises(ValueError, match="decode_qkv: the rows of w, scales and biases must be contiguous"):
        mx.eval(kernel.decode_qkv(x, norm, strided + k + v, q_norm, k_norm, offsets, H, 1e-6, 1e-6, 1e4,
                                  0, 0)[0])


def test_decode_ops_reject_what_they_do_not_take(kernel):
    rng = np.random.default_rng(0)
    dtype, D = mx.float32, 128
    norm = mx.ones((D,))
    qkv = _quantized(rng, 64, D, dtype, 4) * 3
    heads = mx.ones((32,))
    offsets = mx.array([0], dtype=mx.int32)
    with pytest.raises(ValueError, match=r"x must be \[B, 1, D\]"):
        kernel.decode_qkv(mx.ones((1, 2, D)), norm, qkv, heads, heads, offsets, 2, 1e-6, 1e-6, 1e4, 64, 4)
    with pytest.raises(ValueError, match="expected 3 matrices"):
        kernel.decode_qkv(mx.ones((1, 1, D)), norm, qkv[:6], heads, heads, offsets, 2, 1e-6, 1e-6, 1e4, 64, 4)
    with pytest.raises(ValueError, match="shapes of x, w, scales, biases disagree"):
        kernel.decode_qkv(mx.ones((1, 1, 2 * D)), mx.ones((2 * D,)), qkv, heads, heads, offsets, 2,
                          1e-6, 1e-6, 1e4, 64, 4)
    with pytest.raises(ValueError, match="a norm weight is not"):
        kernel.decode_qkv(mx.ones((1, 1, D)), mx.ones((D + 1,)), qkv, heads, heads, offsets, 2,
                          1e-6, 1e-6, 1e4, 64, 4)
    o = _quantized(rng, D, 64, dtype, 4)
    with pytest.raises(ValueError, match="attn must be"):
        kernel.decode_residual_mlp(mx.ones((1, 2, 64)), mx.ones((1, 1, D)), o, norm, 1e-6, qkv, 64, 4)
    with pytest.raises(ValueError, match="bfloat16 x"):  # dense weights (bits 0) with float32 x
        kernel.decode_qkv(mx.ones((1, 1, D)), norm, [mx.ones((64, D))] * 3, heads, heads, offsets, 2,
                          1e-6, 1e-6, 1e4, 0, 0)
