"""Model cards: the card type and its schema (``card``), model folders in other layouts such as WSInfer's
(``folders``) and finding them below a directory (``discovery``). Each imports only those before it."""

from qpbridge.cards.card import (
    CARD_FILE,
    ClassInfo,
    ModelCard,
    builtin_cards_dir,
    card_schema,
    load_card,
    require_weights,
    validate_card_dict,
)
from qpbridge.cards.discovery import discover_cards
from qpbridge.cards.folders import (
    is_model_folder,
    is_wsinfer_config,
    load_model_folder,
    sanitize_name,
    wsinfer_card_dict,
)

__all__ = [
    "CARD_FILE",
    "ClassInfo",
    "ModelCard",
    "builtin_cards_dir",
    "card_schema",
    "discover_cards",
    "is_model_folder",
    "is_wsinfer_config",
    "load_card",
    "load_model_folder",
    "require_weights",
    "sanitize_name",
    "validate_card_dict",
    "wsinfer_card_dict",
]
