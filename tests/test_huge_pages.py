"""Weights in transparent huge pages (csrc/huge_pages.cpp, qwen3_vl/huge_pages.py)."""

import gc
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_vlm.utils import load_model

from mlx_vlm_qwen3vl import cpu_kernel
from mlx_vlm_qwen3vl.qwen3_vl import huge_pages

HUGE_PAGE = 2 << 20


@pytest.fixture(scope="module")
def kernel():
    return cpu_kernel.load()


def address(a: mx.array) -> int:
    view = a.view(mx.uint8) if a.dtype == mx.bfloat16 else a
    return np.asarray(memoryview(view)).__array_interface__["data"][0]


def mapping(addr: int):
    """(start, end, AnonHugePages kB) of the mapping holding addr, or None."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(x, 16) for x in head.split("-"))
            if start <= addr < end:
                for field in lines[i + 1:]:
                    if field.startswith("AnonHugePages:"):
                        return start, end, int(field.split()[1])
    return None


def huge_kb_around(start: int, end: int) -> int:
    """AnonHugePages kB of the mappings that overlap [start, end): madvise can
    leave one range in several adjacent mappings (their flags or origins differ)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    total, overlapping = 0, False
    for line in lines:
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            low, high = (int(x, 16) for x in head.split("-"))
            overlapping = low < end and start < high
        elif overlapping and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


def test_copies_hold_the_same_values_in_one_aligned_arena(kernel):
    arrays = [
        mx.random.normal((1500, 1024)).astype(mx.bfloat16),
        mx.random.randint(0, 2**31, (700, 256)).astype(mx.uint32),
        mx.random.normal((3, 5)),
        mx.arange(7, dtype=mx.int32),
    ]
    mx.eval(arrays)
    copies = kernel.copy_to_huge_pages(arrays)
    for a, c in zip(arrays, copies):
        assert c.dtype == a.dtype and c.shape == a.shape
        assert mx.array_equal(a, c).item()
    first = address(copies[0])
    assert first % HUGE_PAGE == 64  # after its 8-byte size header, on a cache line
    for c in copies:
        assert address(c) % 64 == 0
        assert first <= address(c) < first + sum(a.nbytes for a in arrays) + 64 * len(arrays)
    # and they compute like any array
    assert mx.allclose(copies[0].astype(mx.float32).sum(0), arrays[0].astype(mx.float32).sum(0)).item()


def test_the_arena_asks_for_huge_pages_and_goes_with_the_last_copy(kernel):
    a = mx.random.normal((3 * HUGE_PAGE // 4,))  # two arrays of 3 MB: two huge pages and a half
    b = a + 1
    mx.eval(a, b)
    first, second = kernel.copy_to_huge_pages([a, b])
    addr = address(first)
    start, end, huge_kb = mapping(addr)
    assert start % HUGE_PAGE == 0 and (end - start) % HUGE_PAGE == 0
    if huge_pages._thp_usable():
        assert huge_kb >= 2048, "the arena got no huge page although THP is enabled"
    del first
    gc.collect()
    assert mapping(addr) is not None  # second still reads it
    del second
    gc.collect()
    assert mapping(addr) is None or mapping(addr)[0] != start


def test_strided_views_stay_where_they_are(kernel):
    a = mx.random.normal((64, 32))
    t = a.T
    mx.eval(a, t)
    placed_t, placed_a = kernel.copy_to_huge_pages([t, a])
    assert mx.array_equal(placed_t, t).item() and mx.array_equal(placed_a, a).item()
    assert address(placed_t) == address(t) and address(placed_a) % HUGE_PAGE == 64


def test_large_arrays_are_collapsed_where_they_are(kernel):
    a = mx.random.normal((3 * HUGE_PAGE,))  # 12 MB
    mx.eval(a)
    expected = mx.array(a)  # a copy elsewhere
    mx.eval(expected)
    before = address(a)
    done = kernel.collapse_to_huge_pages(a)
    assert address(a) == before and mx.array_equal(a, expected).item()
    inner = ((before + a.nbytes) // HUGE_PAGE - -(-before // HUGE_PAGE)) * HUGE_PAGE
    if huge_pages._thp_usable():
        assert done == inner
        first = -(-before // HUGE_PAGE) * HUGE_PAGE
        assert huge_kb_around(first, first + inner) * 1024 >= inner
    with pytest.raises(ValueError, match="evaluate the array first"):
        kernel.collapse_to_huge_pages(mx.ones((4, 4)) * 3)


def test_unevaluated_arrays_are_refused(kernel):
    with pytest.raises(ValueError, match="evaluate the arrays first"):
        kernel.copy_to_huge_pages([mx.ones((4, 4)) * 2])


def _logits(model):
    tokens = mx.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    return model.language_model(tokens).logits


@pytest.mark.parametrize("in_place_bytes", [huge_pages.IN_PLACE_BYTES, 1 << 30])
def test_the_first_forward_moves_the_weights_and_changes_no_value(tiny_checkpoint, monkeypatch, in_place_bytes):
    monkeypatch.setenv(huge_pages.ENV_VAR, "0")
    kept = load_model(Path(tiny_checkpoint))
    expected = _logits(kept)
    mx.eval(expected)
    monkeypatch.delenv(huge_pages.ENV_VAR)

    # The tiny model's float32 embedding (78 MB) stays in place at the default, is copied at 1 GB.
    monkeypatch.setattr(huge_pages, "IN_PLACE_BYTES", in_place_bytes)
    model = load_model(Path(tiny_checkpoint))
    lm = model.language_model
    embedding_moves = lm.model.embed_tokens.weight.nbytes < in_place_bytes
    before = {id(p): address(p) for p in [lm.model.embed_tokens.weight, lm.model.layers[0].mlp.up_proj.weight]}
    mx.clear_cache()
    active = mx.get_active_memory()
    got = _logits(model)
    mx.eval(got)
    assert mx.array_equal(got, expected).item()
    moved = [lm.model.embed_tokens.weight, lm.model.layers[0].mlp.up_proj.weight]
    assert address(moved[1]) not in before.values()
    assert (address(moved[0]) not in before.values()) == embedding_moves
    if embedding_moves:  # MLX no longer counts the copies (the module docstring says so)
        lm_bytes = sum(v.nbytes for _, v in tree_flatten(lm.parameters()))
        assert mx.get_active_memory() < active - lm_bytes // 2
    assert getattr(model.vision_tower, huge_pages._PLACED, False) is False  # its weights are read once per image
    # once: a second forward leaves them
    again = _logits(model)
    mx.eval(again)
    assert address(lm.model.embed_tokens.weight) == address(moved[0])
    assert mx.array_equal(again, expected).item()
