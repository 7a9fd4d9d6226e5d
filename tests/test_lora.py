"""LoRA through the host's trainer wraps our attention and MLP linears."""

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_vlm.trainer.peft.lora_layers import LoRALinear
from mlx_vlm.trainer.peft.utils import get_peft_model, save_adapter
from mlx_vlm.utils import load_model


def _logits(model, ids):
    return np.array(model(ids).logits)


def test_host_lora_wraps_our_linears_and_round_trips(tiny_checkpoint, tmp_path):
    ids = mx.array([[151644, 872, 198, 9707, 11, 1879, 0, 151645]])
    model = load_model(Path(tiny_checkpoint))
    base = _logits(model, ids)

    get_peft_model(model, rank=4, alpha=8.0, dropout=0.0, verbose=False)
    wrapped = {name for name, module in model.named_modules() if isinstance(module, LoRALinear)}
    layer0 = "language_model.model.layers.0"
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"{layer0}.{proj}" in wrapped
    assert not any(name.startswith("vision_tower") for name in wrapped)
    np.testing.assert_allclose(_logits(model, ids), base, atol=1e-6)  # lora_b starts at zero

    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(".lora_" in k for k in trainable)

    for name, value in trainable.items():
        if name.endswith("lora_b"):
            trainable[name] = mx.random.normal(value.shape, key=mx.random.key(1)) * 0.05
    model.load_weights(list(trainable.items()), strict=False)
    tuned = _logits(model, ids)
    assert np.abs(tuned - base).max() > 1e-3

    adapter = tmp_path / "adapters"
    adapter.mkdir()
    save_adapter(model, adapter / "adapters.safetensors")
    from mlx_vlm.trainer.peft.utils import apply_lora_layers

    fresh = apply_lora_layers(load_model(Path(tiny_checkpoint)), adapter)
    np.testing.assert_allclose(_logits(fresh, ids), tuned, atol=1e-5)
