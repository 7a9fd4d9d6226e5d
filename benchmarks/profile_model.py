"""Where one vision call and one decode step spend their time, per submodule (MLX backends).

Every submodule is wrapped so that its inputs are evaluated before and its
output after it runs; the inclusive wall time is summed per module path, with
layer numbers folded (`blocks.*.mlp`). Forcing evaluation at every module
boundary removes MLX's lazy fusion, so the total is a little above the
unprofiled time: read the shares, not the absolute sum.

    python benchmarks/profile_model.py PATH [--backend plugin|builtin] [--image 448] [--steps 3]
"""

import argparse
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import model_workers  # noqa: E402


def _arrays(tree):
    import mlx.core as mx

    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [a for item in tree for a in _arrays(item)]
    if isinstance(tree, dict):
        return [a for item in tree.values() for a in _arrays(item)]
    return [a for a in vars(tree).values() if isinstance(a, mx.array)] if hasattr(tree, "logits") else []


class Timings:
    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.enabled = False


def instrument(root, timings: Timings):
    """Time every submodule of `root` (an MLX nn.Module) by its folded path."""
    import mlx.core as mx

    timed_classes = {}
    for path, module in root.named_modules():
        if module is root:
            continue
        pattern = re.sub(r"\.\d+(?=\.|$)", ".*", path)
        cls = type(module)
        if cls not in timed_classes:
            original = cls.__call__

            def call(self, *args, __original=original, **kwargs):
                if not timings.enabled:
                    return __original(self, *args, **kwargs)
                mx.eval(_arrays(args), _arrays(kwargs))
                start = time.perf_counter()
                out = __original(self, *args, **kwargs)
                mx.eval(_arrays(out))
                name = self.__dict__.get("_profile_path", "?")
                timings.seconds[name] += time.perf_counter() - start
                timings.calls[name] += 1
                return out

            timed_classes[cls] = type(cls.__name__, (cls,), {"__call__": call})
        module.__class__ = timed_classes[cls]
        object.__setattr__(module, "_profile_path", pattern)


def report(title, timings: Timings, wall, top=25):
    print(f"\n{title}: {wall:.3f} s wall (profiled)")
    print(f"  {'module (inclusive)':48s} {'seconds':>9s} {'share':>7s} {'calls':>6s}")
    rows = sorted(timings.seconds.items(), key=lambda kv: -kv[1])[:top]
    for name, secs in rows:
        print(f"  {name:48s} {secs:9.3f} {secs / wall:7.1%} {timings.calls[name]:6d}")
    top = [s for name, s in timings.seconds.items() if re.fullmatch(r"[^.]+(\.\*)?", name)]
    outside = wall - sum(top)
    print(f"  {'(outside every submodule: glue, tied lm_head)':48s} {outside:9.3f} {outside / wall:7.1%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--backend", choices=("plugin", "builtin"), default="plugin")
    p.add_argument("--image", type=int, default=448, help="side of the square test image")
    p.add_argument("--steps", type=int, default=3, help="decode steps to profile")
    p.add_argument("--only", default="vision,decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-plain", action="store_true", help="skip the unprofiled runs (halves the time)")
    args = p.parse_args()
    if args.backend == "builtin":
        os.environ["MLX_VLM_QWEN3VL_DISABLE"] = "1"
    import mlx.core as mx

    backend = model_workers.MLXBackend(args.path)
    print(f"{args.backend}: {backend.kind}")
    only = args.only.split(",")

    if "vision" in only:
        timings = Timings()
        instrument(backend.model.vision_tower, timings)
        inputs = backend.vision_inputs([model_workers.test_image(args.image, args.seed)])
        if not args.skip_plain:
            (wall,), (cpu,) = model_workers.timed(lambda: backend.vision(inputs), 1)
            print(f"vision {args.image}x{args.image}: {wall:.3f} s unprofiled ({cpu:.3f} CPU s)")
        timings.enabled = True
        start = time.perf_counter()
        backend.vision(inputs)
        wall = time.perf_counter() - start
        report(f"vision {args.image}x{args.image}", timings, wall)

    if "decode" in only:
        timings = Timings()
        instrument(backend.model.language_model, timings)
        ids = model_workers.prompt_ids(model_workers.DECODE_PROMPT_TOKENS, args.seed)
        cache, token = backend.prefill(ids)
        token = backend.decode(cache, token, 1)
        if not args.skip_plain:
            start, cpu = time.perf_counter(), time.process_time()
            token = backend.decode(cache, token, args.steps)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            print(f"\ndecode step: {wall / args.steps:.3f} s unprofiled ({cpu / args.steps:.3f} CPU s)")
        timings.enabled = True
        start = time.perf_counter()
        backend.decode(cache, token, args.steps)
        wall = (time.perf_counter() - start) / args.steps
        timings.enabled = False
        for name in timings.seconds:
            timings.seconds[name] /= args.steps
            timings.calls[name] //= args.steps
        report("decode step (per token)", timings, wall)
        mx.eval(token)


if __name__ == "__main__":
    main()
