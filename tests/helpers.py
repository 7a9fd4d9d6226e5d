"""Test helpers shared by the model and batching suites: our model run on one
prompt, the host's keyword arguments for a prompt, and a drained BatchGenerator."""

import mlx.core as mx
import numpy as np

from mlx_vlm.models.cache import make_prompt_cache


def ours_kwargs(media):
    """`media` (numpy or lists: pixel values, grids) as our model's
    `(pixel_values, kwargs)`."""
    kwargs = {k: mx.array(np.array(v)) for k, v in media.items()}
    return kwargs.pop("pixel_values", None), kwargs


def single_run(model, ids, media, n):
    """One prompt alone: the prompt's logits [L, V] followed by the last-token
    logits of each of `n` greedy steps, and the `n` greedy tokens."""
    pixels, kwargs = ours_kwargs(media)
    cache = make_prompt_cache(model.language_model)
    logits = model(mx.array([ids]), pixels, cache=cache, **kwargs).logits
    steps, tokens = [np.array(logits[0])], []
    for _ in range(n):
        tokens.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model.language_model(mx.array([[tokens[-1]]]), cache=cache).logits
        steps.append(np.array(logits[0, -1]))
    return steps, tokens


def prompt_kwargs(features, **extra):
    """What the host hands BatchGenerator for a prompt: its data kwargs and the
    non-None fields of `get_input_embeddings`' result."""
    return {**extra, **{k: v for k, v in features.to_dict().items() if v is not None}}


def drain(generator, uids):
    """Step a BatchGenerator until it is idle; each uid's tokens, in `uids` order."""
    got = {uid: [] for uid in uids}
    while generator.has_work:
        for response in generator.next()[1]:
            got[response.uid].append(response.token)
    generator.close()
    return [got[uid] for uid in uids]
