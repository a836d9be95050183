"""The stages of a pipeline card (``"pipeline": [names]``), found without loading any model.

A stage name resolves relative to the pipeline card: a sibling card folder (the same models directory), then
the built-in cards; a name with a ``/`` is a model folder path relative to the card's folder. The ``models``
op reports a pipeline as available only when every stage's weights are installed.
"""

from __future__ import annotations

from pathlib import Path

from qpbridge.cards.card import ModelCard, builtin_cards_dir
from qpbridge.cards.folders import is_model_folder, load_model_folder
from qpbridge.errors import ModelCardError


def stage_card(card: ModelCard, name: str) -> ModelCard:
    """The card of the stage ``name`` of ``card``'s pipeline; ModelCardError when there is none."""
    if "/" in name or "\\" in name:
        path = Path(name).expanduser()
        candidates = [path if path.is_absolute() or card.folder is None else card.folder / path]
    else:
        candidates = ([card.folder.parent / name] if card.folder is not None else []) + [builtin_cards_dir() / name]
    for folder in candidates:
        if folder != card.folder and is_model_folder(folder):
            return load_model_folder(folder)
    raise ModelCardError(f"pipeline '{card.name}': no model card '{name}' (looked in "
                         f"{', '.join(str(c) for c in candidates)})")


def stages_available(card: ModelCard) -> bool:
    """True when every stage of the pipeline exists and has its weights installed."""
    try:
        stages = [stage_card(card, name) for name in card.pipeline]
    except ModelCardError:
        return False
    return all(s.weights_available() for s in stages)
