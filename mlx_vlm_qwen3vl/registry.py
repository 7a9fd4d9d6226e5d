"""What the installed plugins registered: model types and aliases."""

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional

from .aliases import Alias
from .plugins import load_plugins


@dataclass(frozen=True)
class ModelEntry:
    model_type: str
    module: str
    processor: Optional[str] = None


def model_entries() -> Dict[str, ModelEntry]:
    entries: Dict[str, ModelEntry] = {}

    def register(model_type: str, module: str, processor: Optional[str] = None):
        entries[model_type.lower()] = ModelEntry(model_type.lower(), module, processor)

    load_plugins().hook.register_models(register=register)
    return entries


def processor_packages() -> FrozenSet[str]:
    """Top-level packages of the registered processors."""
    return frozenset(
        entry.processor.split(".")[0] for entry in model_entries().values() if entry.processor
    )


def aliases() -> Dict[str, Alias]:
    table: Dict[str, Alias] = {}

    def register(alias: Alias):
        table[alias.name.lower()] = alias

    load_plugins().hook.register_aliases(register=register)
    return table


def find_alias(name: str) -> Optional[Alias]:
    return aliases().get(str(name).lower())


def import_object(dotted: str):
    """`pkg.module` or `pkg.module:attr` to the object it names."""
    import importlib

    module_name, _, attr = dotted.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module
