"""The JSON files of a checkpoint other than the tokenizer's, laid out as in the released ones."""

from .tokenizer import ADDED_TOKEN_IDS

IMAGE_TOKEN_ID = ADDED_TOKEN_IDS["<|image_pad|>"]
VIDEO_TOKEN_ID = ADDED_TOKEN_IDS["<|video_pad|>"]
VISION_START_TOKEN_ID = ADDED_TOKEN_IDS["<|vision_start|>"]
VISION_END_TOKEN_ID = ADDED_TOKEN_IDS["<|vision_end|>"]
ENDOFTEXT_ID = ADDED_TOKEN_IDS["<|endoftext|>"]
IM_END_ID = ADDED_TOKEN_IDS["<|im_end|>"]


def model_config(arch, dtype, seed) -> dict:
    text = dict(arch.text)
    mrope_section = text.pop("mrope_section")
    text_config = {
        "model_type": "qwen3_vl_text",
        **text,
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "initializer_range": 0.02,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": mrope_section, "rope_type": "default"},
        "tie_word_embeddings": arch.tie_word_embeddings,
        "use_cache": True,
        "dtype": dtype,
    }
    # Released files say "qwen3_vl" here; transformers maps it to "qwen3_vl_vision".
    vision_config = {"model_type": "qwen3_vl", **arch.vision, "initializer_range": 0.02}
    return {
        "random_weights": True,
        "_comment": "RANDOM WEIGHTS for testing only, made by mlx-vlm-qwen3vl-checkpoint; not a trained model.",
        "random_weights_shape": arch.shape,
        "random_weights_seed": seed,
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": IMAGE_TOKEN_ID,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
        "vision_end_token_id": VISION_END_TOKEN_ID,
        **arch.top,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "dtype": dtype,
        "torch_dtype": dtype,
        "text_config": text_config,
        "vision_config": vision_config,
    }


def generation_config() -> dict:
    """Qwen's sampling defaults for the Instruct models."""
    return {
        "bos_token_id": ENDOFTEXT_ID,
        "do_sample": True,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.0,
    }


def _vision_sizes(vision) -> dict:
    return {
        "patch_size": vision["patch_size"],
        "temporal_patch_size": vision["temporal_patch_size"],
        "merge_size": vision["spatial_merge_size"],
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def preprocessor_config(arch) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "size": {"shortest_edge": 65536, "longest_edge": 16777216},
        **_vision_sizes(arch.vision),
    }


def video_preprocessor_config(arch) -> dict:
    return {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "size": {"shortest_edge": 4096, "longest_edge": 25165824},
        "fps": 2,
        "min_frames": 4,
        "max_frames": 768,
        "do_sample_frames": True,
        **_vision_sizes(arch.vision),
    }


def readme(arch, dtype, seed) -> str:
    return f"""# RANDOM WEIGHTS: NOT A TRAINED MODEL

This directory was made by `mlx-vlm-qwen3vl-checkpoint` for testing and benchmarking.
Every weight is seeded Gaussian noise; the model produces meaningless text.

- architecture: Qwen3-VL, shape `{arch.shape}` (the layout of `Qwen3VLForConditionalGeneration`)
- seed: {seed}
- dtype: {dtype}
- tied word embeddings: {str(arch.tie_word_embeddings).lower()}
- attention bias: {str(arch.text["attention_bias"]).lower()}

The tokenizer, chat template and processor settings are the real Qwen3-VL ones, so
prompts tokenize exactly as they would for the released models.
"""
