"""The opt-in BLAS (MLX_VLM_QWEN3VL_BLAS) really replaces MLX's reference BLAS,
gives the same float32 results, leaves bf16/quantized paths untouched, and
never breaks interpreter start. Every case runs in a fresh interpreter because
the BLAS can only be chosen before `mlx` is first imported.

Needs an optimized BLAS on the machine: `apt-get install libopenblas0-pthread`
or `pip install mkl`.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mlx_vlm_qwen3vl import cpu_blas

ENV = cpu_blas.ENV_VAR

# The .pth hook preloads from the environment before this code runs, as for a user.
# Seeded workloads saved to argv[1], then a JSON line naming the BLAS in use.
# MLX's CPU convolutions call sgemm for every dtype; bf16/quantized matmuls never do.
WORKLOAD = textwrap.dedent(
    """
    import json, sys
    from mlx_vlm_qwen3vl import cpu_blas
    loaded = cpu_blas.loaded_library  # set by the interpreter-start hook
    import mlx.core as mx

    mx.random.seed(0)
    def normal(*shape):
        return mx.random.normal(shape)

    a, b = normal(48, 96), normal(96, 80)
    out = {
        "mm": a @ b,
        "mm_at": normal(96, 48).T @ b,
        "mm_bt": a @ normal(80, 96).T,
        "matvec": normal(1, 96) @ b,
        "batched": normal(3, 17, 33) @ normal(3, 33, 29),
        "broadcast": normal(2, 3, 16, 24) @ normal(24, 8),
        "addmm": mx.addmm(normal(48, 80), a, b, alpha=0.5, beta=2.0),
        "sdpa": mx.fast.scaled_dot_product_attention(
            normal(1, 2, 20, 16), normal(1, 2, 20, 16), normal(1, 2, 20, 16), scale=0.25
        ),
        "conv2d": mx.conv2d(normal(1, 12, 12, 8), normal(16, 3, 3, 8), padding=1),
        "conv3d": mx.conv3d(normal(1, 4, 8, 8, 3), normal(8, 2, 4, 4, 3), stride=(2, 4, 4)),
        "bf16": (a.astype(mx.bfloat16) @ b.astype(mx.bfloat16)).astype(mx.float32),
    }
    image, kernel = normal(1, 12, 12, 8), normal(16, 3, 3, 8)
    bf16_conv = mx.conv2d(image.astype(mx.bfloat16), kernel.astype(mx.bfloat16))
    out["conv2d_bf16"] = bf16_conv.astype(mx.float32)
    wq, scales, biases = mx.quantize(normal(64, 128), group_size=64, bits=4)
    out["quantized"] = mx.quantized_matmul(normal(5, 128), wq, scales, biases)
    mx.savez(sys.argv[1], **out)
    print(json.dumps({"loaded": loaded, "active": cpu_blas.active_blas()}))
    """
)
FLOAT32_KEYS = (
    "mm", "mm_at", "mm_bt", "matvec", "batched", "broadcast", "addmm", "sdpa", "conv2d", "conv3d"
)
UNTOUCHED_KEYS = ("bf16", "quantized")


def run_python(code, *args, blas=None):
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "LD_PRELOAD")}
    if blas is not None:
        env[ENV] = blas
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120
    )


def run_workload(tmp_path, name, blas=None):
    out = tmp_path / f"{name}.npz"
    proc = run_python(WORKLOAD, str(out), blas=blas)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["stderr"] = proc.stderr
    info["arrays"] = dict(np.load(out))
    return info


def is_bundled_reference(path):
    return path is not None and "mlx_cpu.libs" in path and "libblas" in os.path.basename(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_workload(tmp_path_factory.mktemp("ref"), "reference")


def installed_libraries():
    """Every installed one; with none, openblas, whose run then fails naming the install."""
    found = [spec for spec in ("openblas", "mkl") if cpu_blas.find_library(spec)]
    return found or ["openblas"]


@pytest.mark.parametrize("spec", installed_libraries())
def test_fast_blas_is_used_and_matches_reference(spec, reference, tmp_path):
    fast = run_workload(tmp_path, spec, blas=spec)
    assert fast["stderr"] == ""
    assert fast["active"] == fast["loaded"]
    assert not is_bundled_reference(fast["active"])
    assert ("openblas" if spec == "openblas" else "mkl_rt") in os.path.basename(fast["active"])
    # Another summation order: proof that MLX's float32 matmul really left the reference BLAS.
    assert not np.array_equal(fast["arrays"]["mm"], reference["arrays"]["mm"])
    for key in FLOAT32_KEYS:
        ref, got = reference["arrays"][key], fast["arrays"][key]
        assert got.shape == ref.shape, key
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() <= 1e-5 * scale, key
    ref, got = reference["arrays"]["conv2d_bf16"], fast["arrays"]["conv2d_bf16"]
    assert np.abs(got - ref).max() <= 2**-7 * np.abs(ref).max()  # bfloat16 rounding
    for key in UNTOUCHED_KEYS:
        np.testing.assert_array_equal(fast["arrays"][key], reference["arrays"][key], err_msg=key)


def test_unset_keeps_bundled_reference_blas(reference):
    assert reference["loaded"] is None
    assert reference["stderr"] == ""
    assert is_bundled_reference(reference["active"])


def numpy_bundled_openblas():
    """The documented pitfall: a real OpenBLAS whose symbols are prefixed."""
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    found = sorted(f for f in os.listdir(libs) if "openblas" in f)
    assert found, "numpy wheel without a bundled OpenBLAS"
    return os.path.realpath(os.path.join(libs, found[0]))


@pytest.mark.parametrize(
    "value, hint",
    [
        ("not-a-blas", "openblas, mkl, auto"),
        ("/nonexistent/libopenblas.so.0", "library not found"),
        (numpy_bundled_openblas(), "exports no `cblas_sgemm`"),
    ],
    ids=["unknown-name", "missing-path", "prefixed-symbols"],
)
def test_bad_value_warns_once_and_process_works(value, hint, tmp_path):
    code = WORKLOAD + "\nimport mlx.core as mx; assert mx.array([2.0]).item() == 2.0\n"
    proc = run_python(code, str(tmp_path / "out.npz"), blas=value)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert value in lines[0] and hint in lines[0]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["loaded"] is None and is_bundled_reference(info["active"])


def test_missing_named_library_says_how_to_install(monkeypatch):
    monkeypatch.setattr(cpu_blas, "find_library", lambda spec: None)
    with pytest.raises(ValueError, match="apt-get install libopenblas0-pthread"):
        cpu_blas.preload("openblas")
    with pytest.raises(ValueError, match="pip install mkl"):
        cpu_blas.preload("mkl")


def test_too_late_after_mlx_import_warns_and_changes_nothing():
    code = (
        "import warnings, mlx.core\n"
        "from mlx_vlm_qwen3vl import cpu_blas\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    print(cpu_blas.preload('auto'))\n"
        "message = str(caught[0].message)\n"
        "print(len(caught), caught[0].category.__name__, 'already imported' in message)\n"
        "import ctypes\n"  # loaded by hand anyway: MLX stays bound to its own BLAS
        "ctypes.CDLL(cpu_blas.find_library('auto'), mode=ctypes.RTLD_GLOBAL)\n"
        "print(cpu_blas.active_blas())\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    loaded, warning, active = proc.stdout.strip().splitlines()
    assert loaded == "None"
    assert warning == "1 RuntimeWarning True"
    assert is_bundled_reference(active)


def test_macos_is_never_touched(monkeypatch):
    monkeypatch.setattr(cpu_blas.sys, "platform", "darwin")
    monkeypatch.setattr(cpu_blas.ctypes, "CDLL", lambda *a, **k: pytest.fail("loaded a library"))
    assert cpu_blas.preload("openblas") is None
    assert cpu_blas.preload("not-a-blas") is None
    assert cpu_blas.active_blas() is None
