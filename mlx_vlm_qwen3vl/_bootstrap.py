"""Run at interpreter start by `mlx_vlm_qwen3vl_activate.pth`.

mlx-vlm has no plugin API, so this installs a tiny import watcher: when (and
only if) the process imports one of the host modules named in `WATCHED`,
the watcher lets the module run, then hands it to `host.patch` for the plugin
hooks. Nothing else is imported here (measured in benchmarks/bench_import.py),
and nothing here may raise: a broken plugin must never break `python`.

With `MLX_VLM_QWEN3VL_BLAS` set (Linux CPU only, opt-in), an optimized BLAS is
loaded here too, because it must be in the process before mlx is first
imported (see cpu_blas.py).
"""

import os
import sys

WATCHED = ("mlx_vlm.utils", "mlx_vlm.generate.dispatch")


class _PatchAfterExec:
    """Loader wrapper: execute the real module, then patch it."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            from mlx_vlm_qwen3vl import host

            host.patch(module)
        except Exception as exc:  # never break the host because of the plugin
            print(f"mlx-vlm-qwen3vl: plugin not activated ({exc!r})", file=sys.stderr)


class _HostWatcher:
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchAfterExec(spec.loader)
                return spec
        return None


def install():
    if not any(isinstance(f, _HostWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _HostWatcher())


try:
    install()
except Exception:
    pass

try:
    if os.environ.get("MLX_VLM_QWEN3VL_BLAS"):
        from mlx_vlm_qwen3vl import cpu_blas

        cpu_blas.preload_from_env()
except Exception:
    pass
