"""Everything this package changes in mlx-vlm, in one place.

mlx-vlm resolves a checkpoint through module-level functions of
`mlx_vlm.utils`, looked up at call time, so replacing those attributes reaches
every caller (CLI, chat, server, Python API) without editing mlx-vlm:

- `get_model_and_args`: a `model_type` registered by a plugin loads the
  plugin's module instead of `mlx_vlm.models.<model_type>`.
- `get_model_path`: a registered alias (`qwen3-vl-4b`) becomes its checkpoint
  id; a missing download says what is missing and what to do in one line.
- `load_model`: a checkpoint loaded through an alias gets the alias's EOS
  tokens and sampling defaults where its own config has none.
- `AutoProcessor` (the name inside `mlx_vlm.utils` only, not transformers'
  class): a registered processor replaces transformers' for its model type.
- `process_image`: images for a plugin's processor reach it as given (path,
  URL, PIL image): mlx-vlm's converts them to RGB first, which drops an alpha
  channel (transparent pixels show whatever color they hold), where the
  reference composites transparency on white; the plugin's processor opens
  them itself.
- `mlx_vlm.generate.dispatch.parse_arguments`: the CLI's default prompt
  becomes the alias's default prompt.

mlx-vlm's own `mlx_vlm.models.qwen3_vl` is never touched (other built-in
models import it). `MLX_VLM_QWEN3VL_DISABLE=1` turns every patch into a
pass-through, checked at call time.
"""

import json
import os
import sys
from pathlib import Path

DISABLE_ENV = "MLX_VLM_QWEN3VL_DISABLE"
_PATCHED = "__mlx_vlm_qwen3vl_patched__"

_alias_of_path = {}  # resolved checkpoint path -> Alias it came from


class PluginUserError(RuntimeError):
    """A problem the user can fix; the CLI prints only its message."""


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def patch(module) -> None:
    if getattr(module, _PATCHED, False):
        return
    if module.__name__ == "mlx_vlm.utils":
        _patch_utils(module)
    elif module.__name__ == "mlx_vlm.generate.dispatch":
        _patch_cli(module)
    setattr(module, _PATCHED, True)


# ---------------------------------------------------------------- model type
def plugin_entry(config: dict):
    """The plugin registration for a checkpoint's config, or None."""
    if disabled() or config.get("model_file"):
        return None
    from .registry import model_entries

    model_type = str(config.get("model_type") or "").lower()
    return model_entries().get(model_type)


def _entry_for_path(model_path):
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return None
    with open(config_file, encoding="utf-8") as f:
        return plugin_entry(json.load(f))


def _patch_utils(utils) -> None:
    original_get_model_and_args = utils.get_model_and_args
    original_get_model_path = utils.get_model_path
    original_load_model = utils.load_model

    def get_model_and_args(config, model_path=None):
        entry = plugin_entry(config)
        if entry is None:
            return original_get_model_and_args(config, model_path=model_path)
        from .registry import import_object

        return import_object(entry.module), entry.model_type

    def get_model_path(path_or_hf_repo, *args, **kwargs):
        if disabled():
            return original_get_model_path(path_or_hf_repo, *args, **kwargs)
        alias = _resolve_alias_name(path_or_hf_repo)
        if alias is None:
            return original_get_model_path(path_or_hf_repo, *args, **kwargs)
        path = _download(original_get_model_path, alias, *args, **kwargs)
        _alias_of_path[str(path)] = alias
        return path

    def load_model(model_path, *args, **kwargs):
        model = original_load_model(model_path, *args, **kwargs)
        alias = _alias_of_path.get(str(model_path))
        if alias is not None and not disabled():
            _apply_alias_defaults(model.config, alias)
        return model

    original_process_image = utils.process_image

    def process_image(img, resize_shape, image_processor):
        if disabled() or resize_shape is not None or not _from_plugin(image_processor):
            return original_process_image(img, resize_shape, image_processor)
        return img

    utils.get_model_and_args = get_model_and_args
    utils.get_model_path = get_model_path
    utils.load_model = load_model
    utils.process_image = process_image
    utils.AutoProcessor = _PluginAutoProcessor(utils.AutoProcessor)
    _install_excepthook()


def _from_plugin(obj) -> bool:
    """Is obj an instance of a class from a package that registered a processor?"""
    if obj is None:
        return False
    from .registry import processor_packages

    return type(obj).__module__.split(".")[0] in processor_packages()


class _PluginAutoProcessor:
    """Stands in for transformers' AutoProcessor inside mlx_vlm.utils."""

    def __init__(self, auto_processor):
        self._auto_processor = auto_processor

    def __getattr__(self, name):
        return getattr(self._auto_processor, name)

    def from_pretrained(self, pretrained_model_name_or_path, *args, **kwargs):
        entry = _entry_for_path(pretrained_model_name_or_path)
        if entry is None or not entry.processor:
            return self._auto_processor.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        from .registry import import_object

        processor_class = import_object(entry.processor)
        return processor_class.from_pretrained(pretrained_model_name_or_path, **kwargs)


# ---------------------------------------------------------------- aliases
def _resolve_alias_name(name):
    """The Alias for `name`, None for a path or repo id; unknown aliases fail."""
    from .registry import aliases

    text = str(name)
    if Path(text).exists() or "/" in text or "\\" in text:
        return None
    table = aliases()
    alias = table.get(text.lower())
    if alias is None and text.lower().startswith("qwen3-vl"):
        known = ", ".join(sorted(table))
        raise PluginUserError(
            f"Unknown model alias '{text}'. Known aliases: {known}. "
            "Or pass a local checkpoint directory or a Hugging Face repo id."
        )
    return alias


def _download(original_get_model_path, alias, *args, **kwargs):
    try:
        return original_get_model_path(alias.checkpoint, *args, **kwargs)
    except Exception as exc:
        raise PluginUserError(
            f"'{alias.name}' is {alias.checkpoint}, which is not in the local Hugging Face "
            f"cache and could not be downloaded ({type(exc).__name__}). On a connected "
            f"machine run `hf download {alias.checkpoint}`, or pass a local checkpoint "
            "directory with --model (for a random-weight test checkpoint: "
            "`mlx-vlm-qwen3vl-checkpoint DIR --shape 2b`)."
        ) from None


def _apply_alias_defaults(model_config, alias) -> None:
    for key, value in alias.sampling.items():
        if getattr(model_config, key, None) is None:
            setattr(model_config, key, value)
    if getattr(model_config, "eos_token_id", None) is None:
        model_config.eos_token_id = list(alias.eos_token_ids)


# ---------------------------------------------------------------- CLI
def _patch_cli(dispatch) -> None:
    original_parse_arguments = dispatch.parse_arguments

    def parse_arguments(*args, **kwargs):
        parsed = original_parse_arguments(*args, **kwargs)
        if disabled() or getattr(parsed, "prompt", None) != dispatch.DEFAULT_PROMPT:
            return parsed
        from .registry import find_alias

        alias = find_alias(getattr(parsed, "model", ""))
        if alias is not None:
            parsed.prompt = alias.default_prompt
        return parsed

    dispatch.parse_arguments = parse_arguments


def _install_excepthook() -> None:
    previous = sys.excepthook
    if getattr(previous, _PATCHED, False):
        return

    def excepthook(exc_type, exc, tb):
        if isinstance(exc, PluginUserError):
            print(f"Error: {exc}", file=sys.stderr)
            return
        previous(exc_type, exc, tb)

    setattr(excepthook, _PATCHED, True)
    sys.excepthook = excepthook
