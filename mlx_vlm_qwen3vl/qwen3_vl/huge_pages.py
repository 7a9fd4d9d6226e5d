"""Weights in transparent huge pages, on Linux CPUs (csrc/huge_pages.cpp says why).

The first forward pass of the language model on the CPU moves its parameters
into huge pages. Arrays of at least IN_PLACE_BYTES (the embedding) stay where
they are and have the 2 MB pages inside them collapsed in place; the others
are copied into 2 MB-aligned arenas, CHUNK_BYTES at a time, so that memory
never holds more than one chunk twice. The values do not change.

MLX's memory counters (`mx.get_active_memory`, `mx.get_peak_memory`) do not see
the arenas: compare memory by the process's resident size.
`MLX_VLM_QWEN3VL_HUGE_PAGES=0` leaves the weights where MLX put them.
"""

import os
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_vlm_qwen3vl import cpu_kernel

from . import layers

ENV_VAR = "MLX_VLM_QWEN3VL_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
IN_PLACE_BYTES = 64 << 20
CHUNK_BYTES = 64 << 20
_PLACED = "_weights_in_huge_pages"


@lru_cache(maxsize=None)
def _thp_usable() -> bool:
    """Does the kernel hand out huge pages to memory that asks (mode always or madvise)?"""
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def enabled() -> bool:
    if os.environ.get(ENV_VAR, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not layers.cpu_policy()[0] or not _thp_usable():
        return False
    kernel = cpu_kernel.load()
    return kernel is not None and kernel.huge_pages_available()


def place(module) -> None:
    """Moves `module`'s parameters into huge pages, once (see the module docstring)."""
    if getattr(module, _PLACED, False):
        return
    setattr(module, _PLACED, True)
    if not enabled():
        return
    kernel = cpu_kernel.load()
    mx.clear_cache()
    chunks, size = [[]], 0
    for name, array in tree_flatten(module.parameters()):
        if array.nbytes >= IN_PLACE_BYTES:
            mx.eval(array)
            kernel.collapse_to_huge_pages(array)
            continue
        if size >= CHUNK_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += array.nbytes
    for names in chunks:
        _copy(module, names)
        mx.clear_cache()  # the replaced buffers go back before the next chunk is copied
    kernel.release_free_memory()


def _copy(module, names: list) -> None:
    if not names:
        return
    parameters = dict(tree_flatten(module.parameters()))
    arrays = [parameters[name] for name in names]
    mx.eval(arrays)
    copies = cpu_kernel.load().copy_to_huge_pages(arrays)
    module.update(tree_unflatten(list(zip(names, copies))))
