"""The measuring side of bench_model.py: one backend in one process.

`run(spec)` loads one backend, times the figures the spec asks for and returns
a JSON-able dict. "plugin" and "builtin" are the same MLX code path (the host's
`mlx_vlm.utils.load`); only `MLX_VLM_QWEN3VL_DISABLE`, set by the parent before
this process starts, decides which model class it returns. "transformers" is
PyTorch on the CPU with the same checkpoint.
"""

import os
import resource
import statistics
import sys
import time

import numpy as np

IMAGE_PROMPT = (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "Describe this image.<|im_end|>\n<|im_start|>assistant\n"
)
DECODE_PROMPT_TOKENS = 16
# Ordinary BPE tokens only: no special tokens, which start at 151643.
TOKEN_RANGE = (1000, 100000)


def test_image(side: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed + side)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def prompt_ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(*TOKEN_RANGE, size=(1, n)).astype(np.int32)


def vision_cases(sizes):
    """`448` is one 448x448 image, `4x448` four of them in one call."""
    cases = []
    for size in sizes:
        count, _, side = size.rpartition("x")
        cases.append((f"vision_{size}", int(count or 1), int(side)))
    return cases


def timed(fn, repeats):
    """Wall and process CPU seconds of each call."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus


def summary(timing, work=None):
    """min/median wall seconds; with `work` (tokens), also tokens per second.
    CPU seconds are kept too: for the single-threaded MLX backends (built-in,
    plugin with MLX_VLM_QWEN3VL_THREADS=1) they stay honest when other
    processes share the cores."""
    walls, cpus = timing
    out = {"times": walls, "cpu_times": cpus, "min_s": min(walls), "median_s": statistics.median(walls)}
    if work is not None:
        out["work"] = work
        out["best_rate"] = work / min(walls)
        out["median_rate"] = work / statistics.median(walls)
    return out


def maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ---------------------------------------------------------------------- MLX
class MLXBackend:
    def __init__(self, path):
        import mlx.core as mx
        from mlx_vlm.models.cache import make_prompt_cache
        from mlx_vlm.utils import load

        self.mx = mx
        self.make_cache = make_prompt_cache
        self.model, self.processor = load(str(path))
        self.kind = type(self.model).__module__
        if self.kind.startswith("mlx_vlm_qwen3vl"):
            # What the first forward pass would do; here so that load_s counts it.
            from mlx_vlm_qwen3vl.qwen3_vl import huge_pages

            huge_pages.place(self.model.language_model)
        self.vision_dtype = self._vision_dtype()

    def _vision_dtype(self):
        tower = self.model.vision_tower
        return tower.patch_embed.proj.weight.dtype

    def vision_inputs(self, images):
        out = self.processor.image_processor(images=images, return_tensors="np")
        pixels = self.mx.array(np.asarray(out["pixel_values"])).astype(self.vision_dtype)
        grid = self.mx.array(np.asarray(out["image_grid_thw"]))
        self.mx.eval(pixels, grid)
        return pixels, grid

    def vision(self, inputs):
        features, deepstack = self.model.vision_tower(*inputs)
        self.mx.eval(features, *deepstack)

    def image_inputs(self, image):
        out = self.processor(text=[IMAGE_PROMPT], images=[image], return_tensors="np")
        return {
            "input_ids": self.mx.array(np.asarray(out["input_ids"])),
            "pixel_values": self.mx.array(np.asarray(out["pixel_values"])),
            "image_grid_thw": self.mx.array(np.asarray(out["image_grid_thw"])),
        }

    def prefill(self, input_ids, **extra):
        """Fill a fresh cache the way mlx-vlm's generate does (logits for the
        last position only); returns (cache, next token)."""
        mx = self.mx
        ids = input_ids if isinstance(input_ids, mx.array) else mx.array(input_ids)
        cache = self.make_cache(self.model.language_model)
        out = self.model(ids, cache=cache, logits_to_keep=1, **extra)
        token = mx.argmax(out.logits[:, -1, :], axis=-1)
        mx.eval(token, [c.state for c in cache])
        return cache, token

    def decode(self, cache, token, steps):
        mx = self.mx
        for _ in range(steps):
            out = self.model.language_model(token[:, None], cache=cache, logits_to_keep=1)
            token = mx.argmax(out.logits[:, -1, :], axis=-1)
            mx.eval(token)
        return token

    def lm_bytes_per_token(self) -> int:
        """Language-model weight bytes every decode step reads: all of them
        but the embedding table, unless that table is also the lm_head."""
        from mlx.utils import tree_flatten

        lm = self.model.language_model
        tied = not any(name.startswith("lm_head") for name, _ in tree_flatten(lm.parameters()))
        total = 0
        for name, value in tree_flatten(lm.parameters()):
            if "embed_tokens" in name and not tied:
                continue
            total += value.nbytes
        return total

    def memory(self):
        return {"peak_bytes": self.mx.get_peak_memory(), "maxrss_bytes": maxrss_bytes()}

    def reset_peak(self):
        self.mx.reset_peak_memory()


# ---------------------------------------------------------------- transformers
class TorchBackend:
    kind = "transformers"

    def __init__(self, path, threads):
        import json

        import torch
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        dtype = json.loads((path / "config.json").read_text()).get("dtype") or "float32"
        self.dtype = getattr(torch, dtype)
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(str(path), dtype=self.dtype).eval()
        # transformers' Qwen3VLProcessor needs torchvision (for videos); images
        # go through its PIL image processor and the prompt is expanded here.
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))

    def vision_inputs(self, images):
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"].to(self.dtype), out["image_grid_thw"]

    def vision(self, inputs):
        with self.torch.inference_mode():
            self.model.model.visual(inputs[0], grid_thw=inputs[1])

    def image_inputs(self, image):
        torch = self.torch
        pixels, grid = self.vision_inputs([image])
        pad = self.model.config.image_token_id
        count = int(grid.prod()) // self.image_processor.merge_size**2
        ids = []
        for token in self.tokenizer(IMAGE_PROMPT)["input_ids"]:
            ids += [token] * (count if token == pad else 1)
        ids = torch.tensor([ids])
        return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid,
                "mm_token_type_ids": (ids == pad).int()}

    def prefill(self, input_ids, **extra):
        from transformers import DynamicCache

        torch = self.torch
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.from_numpy(input_ids).long()
        self.model.model.rope_deltas = None
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        return cache, out.logits[:, -1, :].argmax(-1)

    def decode(self, cache, token, steps):
        with self.torch.inference_mode():
            for _ in range(steps):
                out = self.model(input_ids=token[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1, :].argmax(-1)
        return token

    def lm_bytes_per_token(self) -> int:
        lm = self.model.model.language_model
        head = self.model.lm_head.weight
        body = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if "embed_tokens" not in n)
        return body + head.numel() * head.element_size()

    def memory(self):
        return {"peak_bytes": None, "maxrss_bytes": maxrss_bytes()}

    def reset_peak(self):
        pass


# ---------------------------------------------------------------- measuring
def load_backend(spec):
    from pathlib import Path

    path = Path(spec["path"])
    if spec["backend"] == "transformers":
        return TorchBackend(path, spec["torch_threads"])
    return MLXBackend(path)


def measure(backend, spec, log):
    only, repeats, seed = spec["only"], spec["repeats"], spec["seed"]
    small = spec["warmup"] == "small"
    figures = {}

    if "vision" in only:
        for name, count, side in vision_cases(spec["vision_sizes"]):
            inputs = backend.vision_inputs([test_image(side, seed + i) for i in range(count)])
            if spec["warmup"] != "none":
                backend.vision(backend.vision_inputs([test_image(224, seed)]) if small else inputs)
            log(f"{name}: {count} image(s) of {side}x{side}")
            figures[name] = summary(timed(lambda: backend.vision(inputs), repeats))

    if "prefill" in only:
        ids = prompt_ids(spec["prefill_tokens"], seed)
        if spec["warmup"] != "none":
            backend.prefill(ids[:, :32] if small else ids)
        log(f"prefill_text: {ids.shape[1]} tokens")
        figures["prefill_text"] = summary(timed(lambda: backend.prefill(ids), repeats), ids.shape[1])

        inputs = backend.image_inputs(test_image(448, seed))
        n = int(inputs["input_ids"].shape[1])
        if spec["warmup"] != "none":
            backend.prefill(**(backend.image_inputs(test_image(224, seed)) if small else inputs))
        log(f"prefill_image: 448x448 image + text, {n} tokens")
        figures["prefill_image"] = summary(timed(lambda: backend.prefill(**inputs), repeats), n)

    if "decode" in only:
        ids = prompt_ids(DECODE_PROMPT_TOKENS, seed)
        steps = spec["decode_tokens"]
        if spec["warmup"] != "none":
            backend.decode(*backend.prefill(ids), 4 if small else steps)
        log(f"decode: {steps} greedy tokens after a {DECODE_PROMPT_TOKENS}-token prompt")
        walls, cpus = [], []
        for _ in range(repeats):
            state = backend.prefill(ids)
            wall, cpu = timed(lambda: backend.decode(*state, steps), 1)
            walls += wall
            cpus += cpu
        figures["decode"] = summary((walls, cpus), steps)
    return figures


def run(spec, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    start = time.perf_counter()
    backend = load_backend(spec)
    load_s = time.perf_counter() - start
    log(f"{spec['backend']}: loaded {backend.kind} in {load_s:.1f} s")
    backend.reset_peak()
    figures = measure(backend, spec, log)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "backend": spec["backend"],
        "model_class": backend.kind,
        "load_s": load_s,
        "figures": figures,
        "lm_bytes_per_token": backend.lm_bytes_per_token(),
        "memory": backend.memory(),
        "wall_s": time.perf_counter() - start,
        # CPU seconds per wall second: ~1 for the single-threaded built-in, up to the core count
        # for the plugin (products split across cores) and up to the thread count for
        # torch; a low value with a high load average means another process took the cores.
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "loadavg_1min": os.getloadavg()[0],
    }


# ---------------------------------------------------------------- bandwidth
def _set_numpy_huge_pages(on: bool) -> bool:
    """numpy asks Linux for transparent huge pages for large arrays unless told not to."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    try:
        return multiarray._set_madvise_hugepage(on)
    except AttributeError:
        return False


def _huge_page_share(a: np.ndarray) -> float:
    """Fraction of a's bytes in huge pages (the mappings it spans in
    /proc/self/smaps: asking for huge pages splits off the unaligned ends)."""
    first = a.__array_interface__["data"][0]
    last = first + a.nbytes
    huge_kb, overlapping = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()[0] if line.strip() else ""
                if "-" in head and all(c in "0123456789abcdef-" for c in head):
                    start, end = (int(x, 16) for x in head.split("-"))
                    overlapping = start < last and first < end
                elif overlapping and line.startswith("AnonHugePages:"):
                    huge_kb += int(line.split()[1])
    except OSError:
        return 0.0
    return min(1.0, huge_kb * 1024 / a.nbytes)


def bandwidth(size_mb=1024, repeats=5, threads=2) -> dict:
    """Memory bandwidth from large arrays: `*_read` streams the array once
    through a reduction (what decode does to its weights); `*_copy` counts
    each byte read and written once. Measured twice: in 4 KB pages and in
    transparent huge pages, which Linux grants only where it finds free 2 MB
    blocks (`huge_page_share` says how much of each array got them). On this
    project's VMs reads in huge pages ran up to 2x faster, and the plugin's
    decode weights live in them (qwen3_vl/huge_pages.py): the roofline uses the
    best read."""
    found, share = {}, {}
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    previous = _set_numpy_huge_pages(False)
    try:
        for pages in ("4k", "huge"):
            _set_numpy_huge_pages(pages == "huge")
            src = np.random.default_rng(0).random(size_mb * (1 << 20) // 8)
            dst = np.empty_like(src)
            share[pages] = _huge_page_share(src)
            found[f"numpy_read_{pages}"] = src.nbytes / min(timed(lambda: src.sum(), repeats)[0])
            found[f"numpy_copy_{pages}"] = 2 * src.nbytes / min(timed(lambda: np.copyto(dst, src), repeats)[0])
            if torch is not None:
                a, b = torch.from_numpy(src), torch.from_numpy(dst)
                found[f"torch_read_{pages}"] = a.nbytes / min(timed(lambda: a.sum(), repeats)[0])
                found[f"torch_copy_{pages}"] = 2 * a.nbytes / min(timed(lambda: b.copy_(a), repeats)[0])
                del a, b
            del src, dst
    finally:
        _set_numpy_huge_pages(previous)
    reads = {k: v for k, v in found.items() if "_read_" in k}
    return {"per_method": found, "huge_page_share": share, "bytes_per_s": max(reads.values()),
            "bytes_per_s_4k": max(v for k, v in reads.items() if k.endswith("_4k"))}
