"""Finding model folders below a directory: qpbridge cards and WSInfer-style folders."""

from __future__ import annotations

import json
from pathlib import Path

from qpbridge.cards.card import CARD_FILE, ModelCard
from qpbridge.cards.folders import is_wsinfer_config, load_model_folder
from qpbridge.errors import ModelCardError


def discover_cards(folder: Path) -> dict[str, ModelCard]:
    """Every model folder below ``folder``: qpbridge cards (their name must match the folder's) and
    WSInfer-style folders (named after the folder); other ``config.json`` files (such as a Hugging Face
    ``save_pretrained`` folder of weights) are not models and are passed over."""
    cards: dict[str, ModelCard] = {}
    if not folder.is_dir():
        return cards
    for sub in sorted(p for p in folder.iterdir() if (p / CARD_FILE).is_file()):
        try:
            data = json.loads((sub / CARD_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelCardError(f"{sub / CARD_FILE} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "schema_version" not in data:
            if is_wsinfer_config(data):
                card = load_model_folder(sub)
                cards[card.name] = card
            continue
        card = ModelCard.from_dict(data, folder=sub)
        if card.name != sub.name:
            raise ModelCardError(f"model card {sub / CARD_FILE} names '{card.name}' but its folder is '{sub.name}'")
        cards[card.name] = card
    return cards
