"""Model families behind a registry: one module per family, registered by name.

Family modules are imported lazily (a card names its family; the module loads on first use), so
``import qpbridge`` never pulls in torch.
"""

from qpbridge.families.base import (
    FAMILY_MODULES,
    NO_CLASS,
    InstanceResult,
    ModelFamily,
    SemanticResult,
    TileResult,
    create_model,
    family_class,
    known_families,
    register_family,
)

__all__ = [
    "FAMILY_MODULES",
    "NO_CLASS",
    "InstanceResult",
    "ModelFamily",
    "SemanticResult",
    "TileResult",
    "create_model",
    "family_class",
    "known_families",
    "register_family",
]
