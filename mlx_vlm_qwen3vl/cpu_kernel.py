"""The native CPU kernels for quantized and bfloat16 products (csrc/quantized_matvec.cpp).

MLX's CPU `quantized_matmul` unpacks one weight at a time (a 4-bit model
decoded slower than the same model in bfloat16) and its bfloat16 matmul runs
at ~7 GFLOP/s on one core. The extension in csrc/ adds two MLX primitives
(lazy, on the caller's stream) that split their output features over the
cores with a small thread pool: `quantized_matvec` (affine 4/8-bit weights)
and `matmul_bf16` (dense bfloat16, AVX-512 BF16 builds only).

It is compiled on first use, like MLX's own CPU `mx.compile` kernels: with the
system C++ compiler (`$CXX`, else c++/g++/clang++), for this machine's CPU,
against the installed MLX and nanobind, into
`~/.cache/mlx-vlm-qwen3vl/kernels/<key>/` (`<key>` hashes everything the
binary depends on). The build takes a few seconds once; later processes load
the cached library. A self-check against `mx.quantized_matmul` runs before
first use.

`MLX_VLM_QWEN3VL_KERNEL=0` turns it off; `=generic` builds the portable loops
without the AVX-512 path. If the kernel cannot be built or fails its check, a
warning says why (once) and the model keeps MLX's kernels.
"""

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

ENV_VAR = "MLX_VLM_QWEN3VL_KERNEL"
MODULE_NAME = "_quantized_matvec"
SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = (
    "quantized_matvec.cpp", "decode_ops.cpp", "decode_layer.cpp", "attention.cpp",
    "huge_pages.cpp", "module.cpp",
)
BUILD_TIMEOUT_S = 600
# Most rows one call takes (kMaxRows in the source).
MAX_ROWS = 8


class KernelUnavailable(RuntimeError):
    pass


def setting() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "1", "on", "native"):
        return "native"
    if value in ("0", "off"):
        return "off"
    if value == "generic":
        return "generic"
    raise ValueError(
        f"{ENV_VAR}={value!r}: expected 0 (off), 1 (on, the default) or generic "
        "(portable loops only); unset it for the default"
    )


def cache_root() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mlx-vlm-qwen3vl" / "kernels"


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelUnavailable(
        "no C++ compiler found: install one (`apt-get install g++`, or the Xcode "
        "command line tools) or set CXX"
    )


def _cpu_signature() -> str:
    """What the -march=native binary depends on."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def _paths():
    import mlx
    import nanobind

    mlx_root = Path(mlx.__path__[0])
    nb_root = Path(nanobind.__file__).parent
    return mlx_root, nb_root


def _flags(variant: str, mlx_root: Path, nb_root: Path) -> tuple[list, list, list]:
    """(common, kernel-only, link) flags."""
    common = [
        "-std=c++20", "-fPIC", "-fvisibility=hidden", "-DNDEBUG",
        "-DNB_COMPACT_ASSERTIONS", "-DNB_DOMAIN=mlx",  # share MLX's nanobind types
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{nb_root / 'include'}", f"-I{nb_root / 'ext' / 'robin_map' / 'include'}",
    ]
    kernel = ["-O3", f"-I{mlx_root / 'include'}"]
    machine = platform.machine().lower()
    if sys.platform != "darwin":
        kernel.append("-march=native" if machine in ("x86_64", "amd64") else "-mcpu=native")
    if variant == "generic":
        kernel.append("-DQMV_GENERIC")
    link = ["-shared", f"-L{mlx_root / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_root / 'lib'}"]
    if sys.platform == "darwin":
        link += ["-undefined", "dynamic_lookup"]
    return common, kernel, link


def _key(variant: str, compiler: str) -> str:
    import mlx.core as mx
    import nanobind

    h = hashlib.sha256()
    sources = [path.read_bytes() for path in sorted(SOURCE_DIR.iterdir()) if path.suffix in (".cpp", ".h")]
    for part in (*sources, mx.__version__, nanobind.__version__, variant, compiler,
                 sysconfig.get_config_var("EXT_SUFFIX") or "", _cpu_signature(), sys.version):
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()[:16]


def _run(cmd: list):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise KernelUnavailable(f"the compiler did not finish in {BUILD_TIMEOUT_S} s")
    if done.returncode != 0:
        raise KernelUnavailable(f"compiling failed:\n{' '.join(cmd)}\n{done.stderr[-2000:]}")


def build(variant: str = "native") -> Path:
    """The compiled module for `variant`, built unless cached."""
    compiler = _compiler()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = cache_root() / _key(variant, compiler) / f"{MODULE_NAME}{suffix}"
    if target.exists():
        return target
    mlx_root, nb_root = _paths()
    common, kernel, link = _flags(variant, mlx_root, nb_root)
    print(f"mlx-vlm-qwen3vl: building the native CPU kernels (once, a few seconds) "
          f"in {target.parent}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        compiles = [
            [compiler, *common, *kernel, "-c", str(SOURCE_DIR / name), "-o", str(Path(tmp) / f"{name}.o")]
            for name in SOURCES
        ]
        compiles.append([compiler, *common, "-O2", "-c", str(nb_root / "src" / "nb_combined.cpp"),
                         "-o", str(Path(tmp) / "nanobind.o")])
        objects = [cmd[-1] for cmd in compiles]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(_run, compiles))
        built = Path(tmp) / target.name
        _run([compiler, *objects, *link, "-o", str(built)])
        os.replace(built, target)  # atomic: a concurrent build writes the same bytes
    return target


def _self_check(module):
    """The kernel against MLX's own quantized product, both widths, a few rows."""
    import mlx.core as mx

    for bits in (4, 8):
        for rows in (1, 3):
            kw, kx = mx.random.split(mx.random.key(bits * 10 + rows))
            w = mx.random.normal((96, 256), key=kw).astype(mx.bfloat16)
            x = mx.random.normal((rows, 256), key=kx).astype(mx.bfloat16)
            q, s, b = mx.quantize(w, group_size=64, bits=bits)
            f32 = mx.float32
            want = mx.quantized_matmul(x.astype(f32), q, s.astype(f32), b.astype(f32),
                                       transpose=True, group_size=64, bits=bits, stream=mx.cpu)
            got = module.quantized_matvec(x, q, s, b, 64, bits, stream=mx.cpu)
            err = (mx.abs(got - want).max() / mx.abs(want).max()).item()
            if not err < 1e-4:
                raise KernelUnavailable(f"self-check failed ({bits}-bit, {rows} rows: relative error {err:.2e})")


def load_variant(variant: str):
    """Build (unless cached), import and check one variant; raises on failure."""
    path = build(variant)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _self_check(module)
    return module


@lru_cache(maxsize=None)
def load():
    """The kernel module, or None when it is off or cannot be had (warned once)."""
    variant = setting()
    if variant == "off":
        return None
    try:
        return load_variant(variant)
    except (KernelUnavailable, ImportError, OSError, TypeError) as e:
        warnings.warn(
            f"mlx-vlm-qwen3vl: the native CPU kernels are not used ({e}). "
            f"Quantized and bfloat16 products on the CPU fall back to MLX's kernels (much slower); "
            f"{ENV_VAR}=0 silences this.",
            stacklevel=2,
        )
        return None
