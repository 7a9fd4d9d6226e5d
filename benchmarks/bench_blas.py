"""MLX CPU speed under the bundled reference BLAS vs an opt-in OpenBLAS / MKL.

Each configuration runs in its own subprocess (the BLAS is chosen at interpreter
start through MLX_VLM_QWEN3VL_BLAS, see mlx_vlm_qwen3vl/cpu_blas.py), one after
the other. Figures are the best of --repeats after one warm-up call, printed as
ratios to the reference BLAS for the same dtype. Linux only.

    python benchmarks/bench_blas.py
    python benchmarks/bench_blas.py --libs reference,openblas --threads default,1 --json out.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

from mlx_vlm_qwen3vl import cpu_blas

DTYPES = ("float32", "bfloat16", "float16")
# name -> (m, k, n): one 448x448 image's vision MLP fc1, and a decode-step projection
MATMULS = {
    "gemm 784x1024@1024x4096": (784, 1024, 4096),
    "matvec 1x2048@2048x6144": (1, 2048, 6144),
}
VISION_TOKENS = 784  # 448x448 image, 16x16 patches


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--libs", default=None,
                   help="comma list of reference, openblas, mkl or .so paths "
                   "(default: reference and every installed one)")
    p.add_argument("--threads", default="default", help="comma list of BLAS thread counts to try; "
                   "'default' lets cpu_blas choose (the core count)")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-vision", action="store_true", help="skip the vision block and patch embed")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def best_seconds(fn, repeats):
    import mlx.core as mx

    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def vision_block_fn(dtype):
    """One Qwen3-VL-2B vision block (the plugin's own) on one 448x448 image."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlx_vlm_qwen3vl.qwen3_vl.config import VisionConfig
    from mlx_vlm_qwen3vl.qwen3_vl.vision import VisionBlock

    config = VisionConfig()
    block = VisionBlock(config)
    block.update(tree_map(lambda p: p.astype(dtype), block.parameters()))
    x = mx.random.normal((VISION_TOKENS, config.hidden_size)).astype(dtype)
    angles = mx.random.uniform(shape=(VISION_TOKENS, 1, config.head_dim))
    rotary = (mx.cos(angles), mx.sin(angles))
    mx.eval(block.parameters(), x, rotary)
    return lambda: block(x, rotary, [(1, VISION_TOKENS)])


def patch_embed_fn(dtype):
    """The vision PatchEmbed conv3d (kernel 2x16x16, 3 -> 1024) on one 448x448 image."""
    import mlx.core as mx

    pixels = mx.random.normal((VISION_TOKENS, 2, 16, 16, 3)).astype(dtype)
    weight = mx.random.normal((1024, 2, 16, 16, 3)).astype(dtype) * 0.02
    mx.eval(pixels, weight)
    return lambda: mx.conv3d(pixels, weight, stride=(2, 16, 16))


def worker(args):
    loaded = cpu_blas.preload_from_env()
    import mlx.core as mx

    mx.random.seed(0)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(mx, dtype_name)
        for name, (m, k, n) in MATMULS.items():
            a = mx.random.normal((m, k)).astype(dtype)
            b = mx.random.normal((k, n)).astype(dtype)
            mx.eval(a, b)
            sec = best_seconds(lambda: a @ b, args.repeats)
            rows.append({"op": name, "dtype": dtype_name, "seconds": sec,
                         "gflops": 2 * m * k * n / sec / 1e9,
                         "weight_gbps": k * n * a.itemsize / sec / 1e9})
        if not args.no_vision:
            for name, build in (("vision block (2B, 784 tok)", vision_block_fn),
                                ("patch embed conv3d (784 tok)", patch_embed_fn)):
                sec = best_seconds(build(dtype), args.repeats)
                rows.append({"op": name, "dtype": dtype_name, "seconds": sec})
    print(json.dumps({"loaded": loaded, "active": cpu_blas.active_blas(),
                      "threads": os.environ.get("OPENBLAS_NUM_THREADS"), "rows": rows}))


def installed_libs():
    return ["reference"] + [spec for spec in ("openblas", "mkl") if cpu_blas.find_library(spec)]


def run_config(lib, threads, args):
    env = {k: v for k, v in os.environ.items() if k != cpu_blas.ENV_VAR}
    if lib != "reference":
        env[cpu_blas.ENV_VAR] = lib
        if threads != "default":
            env["OPENBLAS_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--dtypes", args.dtypes,
           "--repeats", str(args.repeats)] + (["--no-vision"] if args.no_vision else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or proc.stderr.strip():
        print(f"[{lib}] {proc.stderr.strip()}", file=sys.stderr)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label(lib, threads):
    return lib if lib == "reference" or threads == "default" else f"{lib} ({threads} thr)"


def print_table(results):
    reference = {(r["op"], r["dtype"]): r for r in results["reference"]["rows"]}
    print(f"\n{'op':30} {'dtype':9} {'config':20} {'ms':>10} {'GFLOP/s':>8} {'vs ref':>7}")
    for key, ref in reference.items():
        for name, result in results.items():
            row = next(r for r in result["rows"] if (r["op"], r["dtype"]) == key)
            gflops = f"{row['gflops']:.1f}" if "gflops" in row else ""
            ratio = ref["seconds"] / row["seconds"]
            ms = row["seconds"] * 1e3
            print(f"{key[0]:30} {key[1]:9} {name:20} {ms:10.1f} {gflops:>8} {ratio:6.2f}x")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if not sys.platform.startswith("linux"):
        sys.exit("bench_blas.py measures MLX's Linux CPU backend (macOS uses Accelerate/Metal)")
    libs = args.libs.split(",") if args.libs else installed_libs()
    if "reference" not in libs:
        libs.insert(0, "reference")
    results = {}
    for lib in libs:
        for threads in (["default"] if lib == "reference" else args.threads.split(",")):
            name = label(lib, threads)
            print(f"running {name} ...", file=sys.stderr, flush=True)
            result = run_config(lib, threads, args)
            if result is not None:
                results[name] = result
                print(f"  {name}: MLX's cblas_sgemm from {result['active']}", file=sys.stderr)
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}")
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
