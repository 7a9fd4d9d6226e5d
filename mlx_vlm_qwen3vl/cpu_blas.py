"""Opt-in optimized BLAS for MLX's Linux CPU backend.

The `mlx[cpu]` wheel links a bundled single-threaded reference BLAS. MLX calls
`cblas_sgemm` for every float32 matmul, and the dynamic linker looks a symbol
up in the global scope before a library's own dependencies. So loading
OpenBLAS or MKL with RTLD_GLOBAL *before* `mlx.core` is first imported makes
MLX use it. bfloat16/float16 and quantized matmuls never call BLAS; MLX's
CPU convolutions call `cblas_sgemm` for every dtype.

Contract: `MLX_VLM_QWEN3VL_BLAS=openblas|mkl|auto|/path/to/lib.so`, read at
interpreter start by `_bootstrap.py` through `preload_from_env()`. Unset: nothing
happens. Nothing here runs on macOS. Imports only the standard library.
"""

import ctypes
import os
import sys

ENV_VAR = "MLX_VLM_QWEN3VL_BLAS"
SPECS = ("openblas", "mkl", "auto")
INSTALL_HINT = {
    "openblas": "install it with `apt-get install libopenblas0-pthread`",
    "mkl": "install it with `pip install mkl`",
    "auto": "install `apt-get install libopenblas0-pthread` or `pip install mkl`",
}
# What preload() loaded in this process (the interpreter-start hook calls it).
loaded_library: str | None = None

MULTIARCH = ("x86_64-linux-gnu", "aarch64-linux-gnu")


def _prefix_lib_dirs() -> list[str]:
    """`<prefix>/lib` of this interpreter, its base, the user base, and every
    prefix that owns a site-packages on sys.path (pip puts wheel data there)."""
    prefixes = [sys.prefix, sys.base_prefix]
    try:
        import site

        prefixes.append(site.getuserbase())
    except Exception:
        pass
    for entry in sys.path:
        if entry.endswith("site-packages"):
            # <prefix>/lib/pythonX.Y/site-packages
            prefixes.append(os.path.dirname(os.path.dirname(os.path.dirname(entry))))
    dirs = []
    for prefix in prefixes:
        for sub in ("lib", "lib64"):
            path = os.path.join(prefix, sub)
            if path not in dirs:
                dirs.append(path)
    return dirs


def _openblas_candidates() -> list[str]:
    paths = [os.path.join(d, "libopenblas.so.0") for d in _prefix_lib_dirs()]
    for arch in MULTIARCH:
        paths.append(f"/usr/lib/{arch}/libopenblas.so.0")
        paths.append(f"/usr/lib/{arch}/openblas-pthread/libopenblas.so.0")
        paths.append(f"/usr/lib/{arch}/openblas-openmp/libopenblas.so.0")
    paths += ["/usr/lib64/libopenblasp.so.0", "/usr/lib64/libopenblas.so.0"]
    return paths


def _files_starting(directory: str, prefix: str) -> list[str]:
    """Files in `directory` named prefix*, newest soname first (.so.3 before .so.2)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return []
    return [os.path.join(directory, n) for n in sorted(names, reverse=True)]


def _mkl_candidates() -> list[str]:
    return [path for d in _prefix_lib_dirs() for path in _files_starting(d, "libmkl_rt.so")]


def _first_existing(paths: list[str], soname: str) -> str | None:
    for path in paths:
        if os.path.isfile(path):
            return path
    import ctypes.util

    return ctypes.util.find_library(soname)


def find_library(spec: str) -> str | None:
    """Path (or soname) of the library `spec` names, None when not installed."""
    if spec == "openblas":
        return _first_existing(_openblas_candidates(), "openblas")
    if spec == "mkl":
        return _first_existing(_mkl_candidates(), "mkl_rt")
    if spec == "auto":
        return find_library("openblas") or find_library("mkl")
    return spec if os.path.isfile(spec) else None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _configure_threads(path: str):
    """Both libraries read these at load time (and fall back to OMP_NUM_THREADS);
    an explicit user setting wins."""
    threads = str(_cpu_count())
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if name not in os.environ and "OMP_NUM_THREADS" not in os.environ:
            os.environ[name] = threads
    if "mkl_rt" in os.path.basename(path) and "MKL_THREADING_LAYER" not in os.environ:
        # `pip install --no-deps mkl` lacks libiomp5: MKL's default Intel
        # threading layer would then kill the process at the first sgemm.
        if not _files_starting(os.path.dirname(path), "libiomp5.so"):
            os.environ["MKL_THREADING_LAYER"] = "GNU" if _has_libgomp() else "SEQUENTIAL"


def _has_libgomp() -> bool:
    try:
        ctypes.CDLL("libgomp.so.1")
        return True
    except OSError:
        return False


def preload(spec: str) -> str | None:
    """Load the BLAS that `spec` names so MLX's float32 matmuls use it.

    `spec` is "openblas", "mkl", "auto" (OpenBLAS, else MKL) or a path to a
    shared library exporting `cblas_sgemm`. Returns the loaded path; None off
    Linux, or (with a warning) when `mlx.core` is already imported.
    Raises ValueError when the spec is unknown or the library is missing.
    """
    if not sys.platform.startswith("linux"):
        return None
    is_path = os.sep in spec or spec.endswith(".so") or ".so." in spec
    if spec not in SPECS and not is_path:
        raise ValueError(
            f"{ENV_VAR}={spec!r} is not one of openblas, mkl, auto or a path to a .so"
        )
    path = find_library(spec)
    if path is None:
        hint = INSTALL_HINT.get(spec, "point it to an existing shared library")
        raise ValueError(f"{ENV_VAR}={spec!r}: library not found; {hint}")
    if "mlx.core" in sys.modules:
        import warnings

        warnings.warn(
            f"{ENV_VAR}: mlx is already imported, so its BLAS can no longer be "
            "replaced; preload() must run before the first `import mlx`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _configure_threads(path)
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
    except OSError as exc:
        raise ValueError(f"{ENV_VAR}={spec!r}: cannot load {path} ({exc})") from None
    sgemm = _symbol_address(lib, "cblas_sgemm")
    if sgemm is None:
        raise ValueError(
            f"{ENV_VAR}={spec!r}: {path} exports no `cblas_sgemm` "
            "(numpy's bundled OpenBLAS uses prefixed names and cannot be used)"
        )
    # Checked first, then promoted: a wrong library never enters the global scope.
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    global loaded_library
    loaded_library = _library_path(sgemm) or path
    return loaded_library


def preload_from_env() -> str | None:
    """Interpreter-start entry point: never raises, one stderr line on failure."""
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return None
    try:
        return preload(spec)
    except Exception as exc:
        print(f"mlx-vlm-qwen3vl: BLAS not changed: {exc}", file=sys.stderr)
        return None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _library_path(address: int | None) -> str | None:
    """File of the shared library that contains `address` (dladdr)."""
    if not address:
        return None
    libc = ctypes.CDLL(None)
    libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not libc.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(info.dli_fname.decode())


def _symbol_address(handle: ctypes.CDLL, name: str) -> int | None:
    try:
        return ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
    except AttributeError:
        return None


def active_blas() -> str | None:
    """Real path of the library whose `cblas_sgemm` MLX calls in this process.

    Reads the address the dynamic linker stored for it in libmlx's GOT; if that
    is not bound yet, follows the linker's rule (global scope first, then
    libmlx's own dependencies). Imports mlx. Returns None off Linux.
    """
    if not sys.platform.startswith("linux"):
        return None
    import mlx.core  # noqa: F401  (libmlx must be mapped to be inspected)

    libmlx, base = _mapped_library("libmlx.so")
    if libmlx is None:
        return None
    bound = _library_path(_got_entry(libmlx, base, b"cblas_sgemm"))
    if bound is not None and bound != os.path.realpath(libmlx):
        return bound
    found = _symbol_address(ctypes.CDLL(None), "cblas_sgemm")
    if found is None:
        handle = ctypes.CDLL(libmlx, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        found = _symbol_address(handle, "cblas_sgemm")
    return _library_path(found)


def _mapped_library(basename: str) -> tuple[str | None, int]:
    """Path and load address (its offset-0 mapping) of a mapped shared library."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if os.path.basename(fields[-1]) == basename and int(fields[2], 16) == 0:
                return fields[-1], int(fields[0].split("-")[0], 16)
    return None, 0


def _got_entry(path: str, base: int, name: bytes) -> int | None:
    """Current value of the GOT slot a relocation binds `name` to (ELF64 LE)."""
    import struct

    try:
        with open(path, "rb") as f:
            header = f.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
                return None
            shoff, = struct.unpack_from("<Q", header, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            # (type, offset, size, link) per section
            sections = [
                struct.unpack_from("<4xI16xQQI", table, i * shentsize) for i in range(shnum)
            ]

            def read(index):
                _, offset, size, _ = sections[index]
                f.seek(offset)
                return f.read(size)

            dynsym = next(i for i, sec in enumerate(sections) if sec[0] == 11)  # SHT_DYNSYM
            symbols, strings = read(dynsym), read(sections[dynsym][3])
            for index, sec in enumerate(sections):
                if sec[0] != 4 or sec[3] != dynsym:  # SHT_RELA against .dynsym
                    continue
                relocs = read(index)
                for r_offset, r_info, _ in struct.iter_unpack("<QQq", relocs):
                    st_name, = struct.unpack_from("<I", symbols, (r_info >> 32) * 24)
                    if strings[st_name:strings.index(b"\0", st_name)] == name:
                        return ctypes.c_void_p.from_address(base + r_offset).value
    except (OSError, StopIteration, struct.error, ValueError, IndexError):
        return None
    return None
