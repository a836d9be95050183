"""``qpbridge train``: trainers per model family behind a registry, and the shared training loop.

A trainer module registers a :class:`~qpbridge.training.base.FamilyTrainer` subclass for a card family with
``@register_trainer``; ``TRAINER_MODULES`` names the module to import on first use, so nothing here imports
torch until a model is trained. Add a family by writing its trainer module and one line in that table.
"""

from qpbridge.training.base import TRAINER_MODULES, FamilyTrainer, register_trainer, trainer_class

__all__ = ["TRAINER_MODULES", "FamilyTrainer", "register_trainer", "trainer_class"]
