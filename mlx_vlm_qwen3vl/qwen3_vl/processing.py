"""`Qwen3VLProcessor`: tokenizer, image processor and video processor together.

Duck-types the parts of transformers' `ProcessorMixin` that mlx-vlm uses
(`__call__`, `apply_chat_template`, `chat_template`, `tokenizer`,
`image_processor`, `video_processor`, `decode`/`batch_decode`,
`save_pretrained`) without torch or torchvision. Its image processor is
deliberately not a transformers `BaseImageProcessor`: mlx-vlm sends those down
a fixed-size LLaVA-style path.

Each `<|image_pad|>` in a prompt becomes one pad token per merged patch; each
video's `<|vision_start|><|video_pad|><|vision_end|>` becomes one
`<t seconds><|vision_start|>...<|vision_end|>` block per temporal group, the
format Qwen3-VL was trained on.
"""

import json
import re
from pathlib import Path
from typing import List, Optional

import numpy as np

from .image_processing import Qwen3VLImageProcessor, convert_tensors, flatten_images
from .video_processing import Qwen3VLVideoProcessor, batch_videos, group_timestamps

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

# Used only when a checkpoint ships no chat template: the standard Qwen3-VL
# conversation format, media items rendered as vision placeholders.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'tool' -%}{{- '<|im_start|>user\\n<tool_response>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message.role + '\\n' -}}{%- endif -%}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if item.type == 'image' or item.type == 'image_url' or 'image' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message.role == 'tool' -%}{{- '\\n</tool_response>' -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_PROCESSOR_OPTIONS = {
    "min_pixels",
    "max_pixels",
    "video_min_pixels",
    "video_max_pixels",
    "fps",
    "min_frames",
    "max_frames",
    "cap_pixels_per_frame",
    "max_image_pixels",
    "max_decode_pixels",
}
_TOKENIZER_LOADING = {"revision", "cache_dir", "local_files_only", "token", "force_download"}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def find_chat_template(path: Path, tokenizer) -> str:
    """The checkpoint's chat template, wherever it is kept, else ours."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json"):
        template = _read_json(path / name).get("chat_template")
        if template:
            return template
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE


def _token(tokenizer, name: str, default: str) -> str:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, str) and value else default


def _media_in(conversation, kind: str) -> list:
    """Media sources of one kind ("image" or "video") in message order."""
    found = []
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for item in content:
            if not isinstance(item, dict) or item.get("type", kind) != kind:
                continue
            for key in (kind, "url", "path", f"{kind}_url"):
                source = item.get(key)
                if isinstance(source, dict):
                    source = source.get("url")
                if source is not None:
                    found.append(source)
                    break
    return found


class Qwen3VLProcessor:
    attributes = ["image_processor", "tokenizer", "video_processor"]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        **unused,
    ):
        if tokenizer is None:
            raise ValueError("Qwen3VLProcessor needs a tokenizer")
        self.tokenizer = tokenizer
        self.image_processor = image_processor or Qwen3VLImageProcessor()
        self.video_processor = video_processor or Qwen3VLVideoProcessor()
        self.chat_template = (
            chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        )
        self.image_token = _token(tokenizer, "image_token", IMAGE_TOKEN)
        self.video_token = _token(tokenizer, "video_token", VIDEO_TOKEN)
        self.vision_start_token = _token(tokenizer, "vision_start_token", VISION_START)
        self.vision_end_token = _token(tokenizer, "vision_end_token", VISION_END)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
        wrapped = re.escape(self.vision_start_token + self.video_token + self.vision_end_token)
        self._placeholders = re.compile(
            f"(?P<video>{wrapped}|{re.escape(self.video_token)})|(?P<image>{re.escape(self.image_token)})"
        )

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "Qwen3VLProcessor":
        from transformers import AutoTokenizer

        path = Path(path)
        options = {k: kwargs[k] for k in kwargs if k in _PROCESSOR_OPTIONS}
        # mlx-vlm forwards all of load()'s options here; the tokenizer gets only its own
        loading = {k: kwargs[k] for k in kwargs if k in _TOKENIZER_LOADING}
        tokenizer = AutoTokenizer.from_pretrained(str(path), **loading)
        image_options = {
            k: v
            for k, v in options.items()
            if k in ("min_pixels", "max_pixels", "max_image_pixels", "max_decode_pixels")
        }
        video_options = {
            k: v
            for k, v in options.items()
            if k in ("fps", "min_frames", "max_frames", "cap_pixels_per_frame")
        }
        for name in ("min_pixels", "max_pixels"):
            if options.get(f"video_{name}") is not None:
                video_options[name] = options[f"video_{name}"]
        image_processor = Qwen3VLImageProcessor.from_pretrained(path, **image_options)
        video_config = path / "video_preprocessor_config.json"
        if video_config.is_file():
            video_processor = Qwen3VLVideoProcessor.from_pretrained(path, **video_options)
        else:
            # Older layouts keep video settings with the image settings.
            shared = _read_json(path / "preprocessor_config.json")
            shared.pop("size", None)
            video_processor = Qwen3VLVideoProcessor.from_dict(shared, **video_options)
        return cls(image_processor, tokenizer, video_processor, find_chat_template(path, tokenizer))

    def save_pretrained(self, save_directory, **kwargs):
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out))
        (out / "preprocessor_config.json").write_text(
            json.dumps(self.image_processor.to_dict(), indent=2)
        )
        (out / "video_preprocessor_config.json").write_text(
            json.dumps(self.video_processor.to_dict(), indent=2)
        )
        if isinstance(self.chat_template, str):
            (out / "chat_template.jinja").write_text(self.chat_template)
        return [str(out)]

    @property
    def model_input_names(self) -> List[str]:
        names = list(self.tokenizer.model_input_names)
        names += self.image_processor.model_input_names + self.video_processor.model_input_names
        return list(dict.fromkeys(names))

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens=True, **kwargs
    ):
        return self.tokenizer.batch_decode(
            generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs
        )

    def apply_chat_template(
        self,
        conversation,
        chat_template: Optional[str] = None,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        return_dict: bool = False,
        return_tensors=None,
        **kwargs,
    ):
        """Render messages with the chat template; with `tokenize=True`, also load
        the images and videos the messages name and process everything."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        processor_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _PROCESSOR_OPTIONS}
        texts = [
            self.tokenizer.apply_chat_template(
                list(messages),
                chat_template=chat_template or self.chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
            for messages in conversations
        ]
        if not tokenize:
            return texts if batched else texts[0]
        images = [image for messages in conversations for image in _media_in(messages, "image")]
        videos = [video for messages in conversations for video in _media_in(messages, "video")]
        inputs = self(
            text=texts,
            images=images or None,
            videos=videos or None,
            padding=len(texts) > 1,
            return_tensors=return_tensors,
            **processor_kwargs,
        )
        if return_dict:
            return inputs
        return inputs["input_ids"] if batched else inputs["input_ids"][0]

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        padding=False,
        padding_side: str = "left",
        return_tensors=None,
        video_metadata=None,
        fps=None,
        return_mm_token_type_ids: bool = False,
        return_metadata: bool = False,
        **kwargs,
    ):
        from transformers.feature_extraction_utils import BatchFeature

        texts = [text] if isinstance(text, str) else list(text or [])
        if texts and not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        image_list = flatten_images(images)
        video_list = batch_videos(videos) if videos is not None else []
        if texts:
            self.check_placeholders(texts, len(image_list), len(video_list))
        image_kwargs = {
            k: kwargs.pop(k)
            for k in ("min_pixels", "max_pixels", "resized_height", "resized_width", "size")
            if k in kwargs
        }
        video_kwargs = {
            k: kwargs.pop(k)
            for k in (
                "num_frames",
                "do_sample_frames",
                "min_frames",
                "max_frames",
                "cap_pixels_per_frame",
            )
            if k in kwargs
        }
        data = {}
        if image_list:
            data.update(self.image_processor(image_list, **image_kwargs))
        # a video's pixel bounds cover all its frames together, so they are
        # separate options from the per-image min_pixels / max_pixels
        for name in ("min_pixels", "max_pixels"):
            if kwargs.get(f"video_{name}") is not None:
                video_kwargs[name] = kwargs.pop(f"video_{name}")
        metadata = []
        if video_list:
            processed = self.video_processor(
                video_list, video_metadata=video_metadata, fps=fps, **video_kwargs
            )
            metadata = processed.pop("video_metadata")
            data.update(processed)
            if return_metadata:
                data["video_metadata"] = metadata
        if texts:
            expanded = self.expand_placeholders(
                texts, data.get("image_grid_thw"), data.get("video_grid_thw"), metadata
            )
            data.update(
                self._tokenize(
                    expanded,
                    padding,
                    padding_side,
                    return_tensors,
                    return_mm_token_type_ids,
                    kwargs,
                )
            )
        tensors = {k: v for k, v in data.items() if k != "video_metadata"}
        data.update(convert_tensors(tensors, return_tensors))
        return BatchFeature(data=data)

    def check_placeholders(self, texts: List[str], num_images: int, num_videos: int):
        image_counts = [t.count(self.image_token) for t in texts]
        video_counts = [t.count(self.video_token) for t in texts]
        for kind, counts, given, token in (
            ("image", image_counts, num_images, self.image_token),
            ("video", video_counts, num_videos, self.video_token),
        ):
            if sum(counts) != given:
                where = ", ".join(f"prompt {i}: {n}" for i, n in enumerate(counts))
                raise ValueError(
                    f"the text has {sum(counts)} {kind} placeholders ({token}; {where}) "
                    f"but {given} {kind}s were given; each {kind} needs exactly one "
                    f"{self.vision_start_token}{token}{self.vision_end_token} in the prompt, "
                    f"in the order the {kind}s are passed"
                )

    def expand_placeholders(
        self, texts, image_grid_thw, video_grid_thw, video_metadata
    ) -> List[str]:
        """Texts with every image and video placeholder grown to its token count."""
        merge_area = self.image_processor.merge_size**2
        images = iter([] if image_grid_thw is None else np.asarray(image_grid_thw).tolist())
        videos = iter(
            []
            if video_grid_thw is None
            else zip(np.asarray(video_grid_thw).tolist(), video_metadata)
        )

        def replace(match):
            if match.group("image"):
                t, h, w = next(images)
                return self.image_token * (t * h * w // merge_area)
            (grid_t, h, w), metadata = next(videos)
            return self.video_placeholder(
                grid_t, h * w // self.video_processor.merge_size**2, metadata
            )

        return [self._placeholders.sub(replace, text) for text in texts]

    def video_placeholder(self, grid_t: int, frame_tokens: int, metadata) -> str:
        times = group_timestamps(metadata.timestamps, self.video_processor.temporal_patch_size)
        if len(times) != grid_t:
            raise ValueError(
                f"{len(times)} timestamp groups for a video with {grid_t} temporal groups"
            )
        frame = self.vision_start_token + self.video_token * frame_tokens + self.vision_end_token
        return "".join(f"<{seconds:.1f} seconds>" + frame for seconds in times)

    def _tokenize(
        self, texts, padding, padding_side, return_tensors, return_mm_token_type_ids, kwargs
    ) -> dict:
        # no truncation: cutting through a run of pad tokens would desync it from the pixels
        tokenizer_kwargs = {k: v for k, v in kwargs.items() if k == "add_special_tokens"}
        if padding and self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        encoded = self.tokenizer(
            texts,
            padding=padding,
            padding_side=padding_side,
            return_attention_mask=True,
            **tokenizer_kwargs,
        )
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        if len({len(row) for row in ids}) == 1:
            ids, mask = np.array(ids, dtype=np.int64), np.array(mask, dtype=np.int64)
        elif return_tensors is not None:
            raise ValueError("prompts of different lengths need padding=True to be batched")
        result = {"input_ids": ids, "attention_mask": mask}
        if return_mm_token_type_ids:
            result["mm_token_type_ids"] = self.mm_token_type_ids(ids)
        return result

    def mm_token_type_ids(self, ids):
        """0 for text, 1 for image pad tokens, 2 for video pad tokens."""
        if not isinstance(ids, np.ndarray):
            return [self.mm_token_type_ids(np.asarray(row)).tolist() for row in ids]
        return (ids == self.image_token_id) * 1 + (ids == self.video_token_id) * 2
