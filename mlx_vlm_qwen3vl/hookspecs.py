"""The hook specification: what a plugin for mlx-vlm may provide.

A plugin is any module named in the `mlx_vlm.plugins` entry-point group that
implements some of these hooks with `@hookimpl`. This package is one such
plugin (see `plugin.py`); any other package can register models the same way.
"""

from pluggy import HookimplMarker, HookspecMarker

PROJECT = "mlx_vlm_plugins"

hookspec = HookspecMarker(PROJECT)
hookimpl = HookimplMarker(PROJECT)


@hookspec
def register_models(register):
    """Register model implementations.

    Call `register(model_type, module)` where `model_type` is the `model_type`
    of a checkpoint's config.json and `module` is the dotted path of a module
    exposing what mlx-vlm loads (`Model`, `ModelConfig`, `TextConfig`,
    `VisionConfig`, ...). `module` is imported only when such a checkpoint loads.
    Optionally pass `processor="pkg.module:Class"` for a processor whose
    `from_pretrained(path)` replaces transformers' AutoProcessor.
    """


@hookspec
def register_aliases(register):
    """Register short model names: call `register(alias)` with an `Alias`."""
