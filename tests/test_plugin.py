"""Plugin foundation: activation, discovery, aliases, escape hatch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


from helpers import seed_hub_cache
DISABLE_ENV = "MLX_VLM_QWEN3VL_DISABLE"


def run_python(code, env_extra=None, cwd=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != DISABLE_ENV}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def checked(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()


def test_interpreter_start_imports_nothing_heavy():
    out = checked(
        run_python(
            """
            import sys
            print(sorted(m for m in ("mlx", "mlx_vlm", "pluggy", "numpy", "transformers")
                         if m in sys.modules))
            print("mlx_vlm_qwen3vl._bootstrap" in sys.modules)
            """
        )
    )
    assert out == ["[]", "True"], "the .pth hook must install the watcher and import nothing heavy"


def test_load_returns_plugin_model_and_processor(tiny_checkpoint):
    code = f"""
        from mlx_vlm.utils import load
        model, processor = load({str(tiny_checkpoint)!r})
        print(type(model).__module__)
        print(type(processor).__module__)
    """
    model_module, processor_module = checked(run_python(code))
    assert model_module.startswith("mlx_vlm_qwen3vl.qwen3_vl")
    assert processor_module.startswith("mlx_vlm_qwen3vl.qwen3_vl")

    builtin_model, _ = checked(run_python(code, {DISABLE_ENV: "1"}))
    assert builtin_model.startswith("mlx_vlm.models.qwen3_vl")


def test_other_model_types_and_builtin_module_untouched():
    out = checked(
        run_python(
            """
            import mlx_vlm.utils as u
            arch, model_type = u.get_model_and_args({"model_type": "qwen2_vl"})
            print(arch.__name__, model_type)
            import mlx_vlm.models.qwen3_vl as builtin
            print(builtin.Model.__module__)
            arch, _ = u.get_model_and_args({"model_type": "qwen3_vl"})
            print(arch.__name__)
            """
        )
    )
    assert out == [
        "mlx_vlm.models.qwen2_vl qwen2_vl",
        "mlx_vlm.models.qwen3_vl.qwen3_vl",
        "mlx_vlm_qwen3vl.qwen3_vl",
    ]


def _write_fake_plugin(root: Path) -> None:
    """A second installed plugin: a package plus dist-info with an entry point."""
    pkg = root / "fake_vlm_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from mlx_vlm_qwen3vl.aliases import Alias
            from mlx_vlm_qwen3vl.hookspecs import hookimpl

            @hookimpl
            def register_models(register):
                register("fake_vlm", "fake_vlm_plugin.model")

            @hookimpl
            def register_aliases(register):
                register(Alias("fake-vlm-tiny", "fake-org/fake-vlm-tiny"))
            """
        )
    )
    (pkg / "model.py").write_text("class Model:\n    pass\n\nclass ModelConfig:\n    pass\n")
    dist = root / "fake_vlm_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-vlm-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mlx_vlm.plugins]\nfake = fake_vlm_plugin\n")


def test_second_plugin_discovered_through_entry_points(tmp_path):
    _write_fake_plugin(tmp_path)
    out = checked(
        run_python(
            """
            import mlx_vlm.utils as u
            from mlx_vlm_qwen3vl import registry
            print(sorted(registry.model_entries()))
            arch, model_type = u.get_model_and_args({"model_type": "fake_vlm"})
            print(arch.__name__, model_type)
            print(registry.find_alias("FAKE-VLM-TINY").checkpoint)
            """,
            {"PYTHONPATH": str(tmp_path)},
        )
    )
    assert out == ["['fake_vlm', 'qwen3_vl']", "fake_vlm_plugin.model fake_vlm", "fake-org/fake-vlm-tiny"]

    without = checked(run_python("from mlx_vlm_qwen3vl import registry; print(sorted(registry.model_entries()))"))
    assert without == ["['qwen3_vl']"]




OFFLINE = {"HF_HUB_OFFLINE": "1"}


def test_alias_resolves_to_cached_checkpoint_offline(tmp_path, tiny_checkpoint):
    cache = tmp_path / "hub"
    snapshot = seed_hub_cache(cache, "Qwen/Qwen3-VL-4B-Instruct", tiny_checkpoint)
    out = checked(
        run_python(
            """
            from mlx_vlm.utils import get_model_path
            print(get_model_path("qwen3-vl-4b"))
            print(get_model_path("Qwen3-VL-4B"))
            """,
            {**OFFLINE, "HF_HUB_CACHE": str(cache)},
        )
    )
    assert out == [str(snapshot), str(snapshot)]


def test_path_and_repo_id_pass_through(tmp_path, tiny_checkpoint):
    out = checked(
        run_python(
            f"""
            from mlx_vlm.utils import get_model_path
            print(get_model_path({str(tiny_checkpoint)!r}))
            try:
                get_model_path("someone/qwen3-vl-never-existed")
            except Exception as exc:
                print(type(exc).__module__.split(".")[0])
            """,
            {**OFFLINE, "HF_HUB_CACHE": str(tmp_path)},
        )
    )
    # A repo id is the host's business: its own hub error, not ours.
    assert out == [str(tiny_checkpoint), "huggingface_hub"]


def test_unknown_alias_names_the_known_ones():
    result = run_python(
        """
        from mlx_vlm.utils import get_model_path
        get_model_path("qwen3-vl-5b")
        """
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "Unknown model alias 'qwen3-vl-5b'" in line
    assert "qwen3-vl-4b" in line and "qwen3-vl-8b-thinking-4bit" in line


def test_uncached_alias_offline_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_vlm.generate", "--model", "qwen3-vl-2b-8bit", "--max-tokens", "2"],
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE, "HF_HUB_CACHE": str(tmp_path)},
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.strip().splitlines() if l.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    assert "mlx-community/Qwen3-VL-2B-Instruct-8bit" in lines[0]
    assert "hf download" in lines[0]


def test_alias_table_carries_generation_defaults():
    from mlx_vlm_qwen3vl.registry import aliases

    table = aliases()
    for size in ("2b", "4b", "8b", "32b"):
        for suffix in ("", "-4bit", "-8bit"):
            instruct = table[f"qwen3-vl-{size}{suffix}"]
            thinking = table[f"qwen3-vl-{size}-thinking{suffix}"]
            assert "Instruct" in instruct.checkpoint and "Thinking" in thinking.checkpoint
            assert instruct.sampling == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
            assert thinking.sampling == {"temperature": 1.0, "top_p": 0.95, "top_k": 20}
            assert instruct.eos_tokens == ("<|im_end|>", "<|endoftext|>")
    assert table["qwen3-vl-4b-4bit"].checkpoint == "mlx-community/Qwen3-VL-4B-Instruct-4bit"


def test_alias_defaults_reach_the_loaded_model(tmp_path, tiny_checkpoint):
    stripped = tmp_path / "ckpt"
    stripped.mkdir()
    for item in tiny_checkpoint.iterdir():
        if item.name != "generation_config.json":
            (stripped / item.name).symlink_to(item)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    for key in ("temperature", "top_p", "top_k", "eos_token_id"):
        config.pop(key, None)
    (stripped / "config.json").unlink()
    (stripped / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "hub"
    seed_hub_cache(cache, "Qwen/Qwen3-VL-8B-Thinking", stripped)
    out = checked(
        run_python(
            """
            from mlx_vlm.utils import load
            model, _ = load("qwen3-vl-8b-thinking")
            c = model.config
            print(c.temperature, c.top_p, c.top_k, list(c.eos_token_id))
            """,
            {**OFFLINE, "HF_HUB_CACHE": str(cache)},
        )
    )
    assert out == ["1.0 0.95 20 [151645, 151643]"]
