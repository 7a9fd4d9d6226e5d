"""A streaming safetensors writer: float32 or bfloat16, one file or shards with an index.

safetensors.numpy cannot write bfloat16 and wants every tensor in memory at once. The format is
simple enough to write directly: an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw little-endian bytes. Tensors are generated chunk
by chunk straight into the file, so even the 32B shape never holds more than one chunk.
"""

import json
import struct
from pathlib import Path

import numpy as np

from .weights import generate

DTYPES = {"float32": ("F32", 4), "bfloat16": ("BF16", 2)}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def to_bfloat16_bits(values):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest, ties to even."""
    bits = values.view(np.uint32)
    lsb = (bits >> 16) & 1
    return ((bits + 0x7FFF + lsb) >> 16).astype(np.uint16)


def _header(specs, dtype):
    code, itemsize = DTYPES[dtype]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        end = offset + spec.size * itemsize
        header[spec.name] = {"dtype": code, "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps the tensor data 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


def write_file(path, specs, seed, dtype):
    with open(path, "wb") as f:
        f.write(_header(specs, dtype))
        for spec in specs:
            for chunk in generate(spec, seed):
                if dtype == "bfloat16":
                    chunk = to_bfloat16_bits(chunk)
                f.write(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False).data)


def plan_shards(specs, dtype, shard_bytes):
    """Split tensors, in order, into groups of at most `shard_bytes` (a bigger tensor goes alone)."""
    itemsize = DTYPES[dtype][1]
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = spec.size * itemsize
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_weights(out_dir, specs, seed, dtype, shard_bytes):
    """Write `model.safetensors`, or numbered shards plus the index when they exceed `shard_bytes`.

    Returns the paths written.
    """
    out_dir = Path(out_dir)
    shards = plan_shards(specs, dtype, shard_bytes)
    if len(shards) == 1:
        write_file(out_dir / SINGLE_FILE, shards[0], seed, dtype)
        return [out_dir / SINGLE_FILE]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_file(path, shard, seed, dtype)
        weight_map.update({spec.name: path.name for spec in shard})
        paths.append(path)
    total = sum(spec.size for spec in specs) * DTYPES[dtype][1]
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*paths, out_dir / INDEX_FILE]
