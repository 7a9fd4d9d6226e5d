"""Qwen3-VL: the vision tower's features placed into the prompt's image and
video placeholders, 3D positions for the whole prompt, and the language model.

`get_input_embeddings` runs once per prompt (batch rows left-padded with an
attention mask). It returns everything sequence-aligned, so the host can
slice rows and prefill chunks: `inputs_embeds` [B, L, D], `position_ids`
[3, B, L], `deepstack_visual_embeds` [B, L, n, D] (zero off visual tokens),
`visual_pos_masks` [B, L] and `rope_deltas` [B, 1] — for text-only prompts
too, where the vision tower does not run and positions are arange.
"""

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_vlm.models.base import InputEmbeddingsFeatures

from .config import ModelConfig
from .language import LanguageModel
from .layers import is_loadable_weight, vision_compute_dtype
from .vision import VisionModel


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        self.vision_tower = VisionModel(config.vision_config)
        self.language_model = LanguageModel(config.text_config, config)

    @property
    def layers(self):
        return self.language_model.model.layers

    # ------------------------------------------------------------ embeddings
    def get_input_embeddings(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        **kwargs,
    ) -> InputEmbeddingsFeatures:
        _check_length(input_ids, self.config.text_config.max_position_embeddings)
        mask = kwargs.get("mask", kwargs.get("attention_mask"))
        if mask is not None and mask.shape[-1] > input_ids.shape[-1]:
            mask = mask[:, -input_ids.shape[-1] :]  # ids are the uncached suffix
        image_grid_thw = kwargs.get("image_grid_thw")
        video_grid_thw = kwargs.get("video_grid_thw")
        pixel_values_videos = kwargs.get("pixel_values_videos")
        embeds = self.language_model.model.embed_tokens(input_ids)

        images = self._image_features(pixel_values, image_grid_thw, kwargs)
        videos = None
        if pixel_values_videos is not None:
            videos = self._encode(pixel_values_videos, video_grid_thw, "video_grid_thw")

        image_mask = input_ids == self.config.image_token_id
        video_mask = input_ids == self.config.video_token_id
        _check_counts(image_mask, images, "image", "pixel_values")
        _check_counts(video_mask, videos, "video", "pixel_values_videos")

        # Text-only prompts return the same keys (zero deepstack as a broadcast
        # view), so that the host can merge separately embedded requests into
        # one batch, as the server does.
        n_deepstack = len(self.config.vision_config.deepstack_visual_indexes)
        shape = embeds.shape[:2] + (n_deepstack, embeds.shape[-1])
        deepstack = mx.broadcast_to(mx.zeros((1, 1) + shape[2:], embeds.dtype), shape)
        for features, where in ((images, image_mask), (videos, video_mask)):
            if features is None:
                continue
            merged, *layers = features
            embeds = _scatter(embeds, where, merged)
            if len(layers) != n_deepstack:
                raise ValueError(
                    f"the vision features carry {len(layers)} deepstack layers but "
                    f"vision_config.deepstack_visual_indexes names {n_deepstack}"
                )
            if layers:
                deepstack = _scatter(deepstack, where, mx.stack(layers, axis=1))
        # Grids without pixels belong to an already cached prefix.
        position_ids, deltas = self.language_model.get_rope_index(
            input_ids,
            image_grid_thw if images is not None else None,
            video_grid_thw if videos is not None else None,
            mask,
        )
        self._remember(position_ids, deltas)
        return InputEmbeddingsFeatures(
            inputs_embeds=embeds,
            visual_pos_masks=image_mask | video_mask,
            deepstack_visual_embeds=deepstack,
            position_ids=position_ids,
            rope_deltas=deltas,
        )

    def encode_images(self, pixel_values: mx.array, **kwargs):
        """Vision features of images: (merged, *deepstack) — also the entry the
        host's vision-feature cache stores."""
        return self._encode(pixel_values, kwargs.get("image_grid_thw"), "image_grid_thw")

    def _image_features(self, pixel_values, image_grid_thw, kwargs):
        """Image features, from the host's vision-feature cache when it has them
        (`cached_image_features`, or the server's `vision_cache` + `_image_key`)."""
        cached = kwargs.get("cached_image_features")
        vision_cache, key = kwargs.get("vision_cache"), kwargs.get("_image_key")
        if cached is None and vision_cache is not None and key is not None:
            cached = vision_cache.get(key)
        if cached is not None or pixel_values is None:
            return cached
        features = self.encode_images(pixel_values, image_grid_thw=image_grid_thw)
        if vision_cache is not None and key is not None:
            mx.eval(*features)
            vision_cache.put(key, features)
        return features

    def _encode(self, pixel_values, grid_thw, grid_name):
        if grid_thw is None:
            raise ValueError(f"{grid_name} is required with pixel values; pass the processor's {grid_name}")
        if self.vision_tower is None:
            raise ValueError(
                "this checkpoint has no vision tower weights, so it takes text only; "
                "use a checkpoint that includes the vision tower for images and videos"
            )
        dtype = self.vision_tower.patch_embed.proj.weight.dtype
        merged, deepstack = self.vision_tower(pixel_values, grid_thw, vision_compute_dtype(dtype))
        return tuple(f.astype(dtype) for f in (merged, *deepstack))

    def _remember(self, position_ids, deltas):
        self.language_model._position_ids = position_ids
        self.language_model._rope_deltas = deltas

    # ------------------------------------------------------------ forward
    def __call__(
        self,
        input_ids: mx.array,
        pixel_values: Optional[mx.array] = None,
        mask: Optional[mx.array] = None,
        cache=None,
        **kwargs,
    ):
        continuing = cache is not None and cache and _processed(cache[0]) > 0
        vision = pixel_values is not None or kwargs.get("pixel_values_videos") is not None
        if continuing and not vision:
            return self.language_model(input_ids, mask=mask, cache=cache, **kwargs)
        features = self.get_input_embeddings(input_ids, pixel_values, mask=mask, **kwargs)
        return self.language_model(
            input_ids,
            inputs_embeds=features.inputs_embeds,
            mask=mask,
            cache=cache,
            position_ids=features.position_ids,
            rope_deltas=features.rope_deltas,
            deepstack_visual_embeds=features.deepstack_visual_embeds,
            logits_to_keep=kwargs.get("logits_to_keep", 0),
        )

    # ------------------------------------------------------------ weights
    def sanitize(self, weights: dict) -> dict:
        """Hugging Face names (`model.language_model.*`, `model.visual.*`,
        `lm_head.*`) to this module's; converted names pass through."""
        out = {}
        for key, value in weights.items():
            for old, new in _RENAMES:
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
            if key.endswith(_BUFFERS):
                continue
            out[key] = value

        head = [k for k in out if k.startswith("language_model.lm_head.")]
        if self.config.tie_word_embeddings:
            for key in head:
                del out[key]
        elif "language_model.lm_head.weight" not in out:
            raise ValueError(
                "config.json says tie_word_embeddings is false but the checkpoint has "
                "no lm_head.weight; set tie_word_embeddings to true or use a complete checkpoint"
            )
        if self.vision_tower is None:
            return out
        sanitized = self.vision_tower.sanitize(out)
        # Both towers at once, so that one error names every unexpected key.
        unknown = sorted(set(out) - set(sanitized)) + _unknown_language_weights(self.language_model, out)
        if unknown:
            raise ValueError(
                f"the checkpoint has {len(unknown)} weights this model does not have: "
                f"{', '.join(unknown[:10])}; check text_config and vision_config in config.json"
            )
        return sanitized

    def load_weights(self, file_or_weights, strict: bool = True):
        """nn.Module.load_weights; a strict load that lacks weights names them
        as both checkpoint layouts do and says what to do."""
        if strict and not isinstance(file_or_weights, str):
            file_or_weights = list(file_or_weights)
            given = {name for name, _ in file_or_weights}
            missing = sorted(set(tree_flatten(self.parameters(), destination={})) - given)
            if missing:
                named = [f"{_hugging_face_name(k)} ({k} when converted)" for k in missing[:10]]
                more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
                raise ValueError(
                    f"the checkpoint lacks {len(missing)} weights this model needs: "
                    f"{', '.join(named)}{more}; it is incomplete or for another architecture: "
                    "download or convert it again (a sharded checkpoint needs every file its "
                    "model.safetensors.index.json lists) and check config.json"
                )
        return super().load_weights(file_or_weights, strict=strict)


def _unknown_language_weights(language_model, weights: dict) -> list:
    """Keys under `language_model.` with no parameter there (quantization
    companions of a weight count as known: they appear after nn.quantize)."""
    names = {name for name, _ in tree_flatten(language_model.parameters())}
    prefix = "language_model."
    return [
        key
        for key in weights
        if key.startswith(prefix) and not is_loadable_weight(key[len(prefix) :], names)
    ]


# Hugging Face prefixes -> this module's (converted checkpoints use the latter).
_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.visual.", "vision_tower."),
    ("lm_head.", "language_model.lm_head."),
)


def _hugging_face_name(name: str) -> str:
    for hugging_face, ours in _RENAMES:
        if name.startswith(ours):
            return hugging_face + name[len(ours) :]
    return name


# Non-persistent buffers some exports include; the model computes them.
_BUFFERS = ("rotary_emb.inv_freq", "position_ids")


def _processed(cache) -> int:
    offset = getattr(cache, "_idx", None)
    if offset is None:
        offset = cache.offset
    if isinstance(offset, mx.array):
        return int(offset.max().item()) if offset.size else 0
    return int(offset)


def _check_length(input_ids, limit):
    if input_ids.shape[-1] > limit:
        raise ValueError(
            f"the prompt has {input_ids.shape[-1]} tokens but this model handles at most "
            f"{limit} (text_config.max_position_embeddings); shorten the prompt, use fewer "
            "or smaller images (max_pixels), or fewer video frames (max_frames)"
        )


def _check_counts(token_mask, features, name, pixels):
    n_tokens = int(token_mask.sum().item())
    n_features = 0 if features is None else features[0].shape[0]
    if n_tokens != n_features:
        raise ValueError(
            f"the prompt has {n_tokens} {name} placeholder tokens but {pixels} gave "
            f"{n_features} {name} features; the prompt's <|{name}_pad|> tokens must match "
            f"the {name}s (use the processor's input_ids with its {pixels})"
        )


def _scatter(target: mx.array, where: mx.array, values: mx.array) -> mx.array:
    """`target` [B, L, ...] with rows at True positions of `where` [B, L]
    replaced by `values` in row-major order."""
    B, L = where.shape
    flat = target.reshape((B * L,) + target.shape[2:])
    index = mx.array(np.flatnonzero(np.array(where)).astype(np.uint32))
    flat[index] = values.astype(flat.dtype)
    return flat.reshape(target.shape)
