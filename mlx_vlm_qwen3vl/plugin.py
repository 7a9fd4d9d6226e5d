"""This package's own registration, through the same hooks any plugin uses."""

from .aliases import qwen3_vl_aliases
from .hookspecs import hookimpl


@hookimpl
def register_models(register):
    register(
        "qwen3_vl",
        "mlx_vlm_qwen3vl.qwen3_vl",
        processor="mlx_vlm_qwen3vl.qwen3_vl.processing:Qwen3VLProcessor",
    )


@hookimpl
def register_aliases(register):
    for alias in qwen3_vl_aliases():
        register(alias)
