"""Plugin discovery: every installed package in the `mlx_vlm.plugins`
entry-point group is loaded once, on first use, never at interpreter start."""

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "mlx_vlm.plugins"

pm = pluggy.PluginManager(hookspecs.PROJECT)
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> pluggy.PluginManager:
    global _loaded
    if not _loaded:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _loaded = True
    return pm
