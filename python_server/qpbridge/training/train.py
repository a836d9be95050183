"""The training loop shared by every family's trainer: ``qpbridge train``.

Per epoch: the trainer's augmented batches (mixed precision on CUDA: ``torch.autocast`` fp16 with a
``GradScaler``), AdamW with a cosine learning-rate schedule over ``epochs`` (or over ``max_minutes`` when that
runs out first, so a time-limited run still ends at a low rate), then validation; the model folder
(card + weights + ``training.json``) is rewritten whenever the validation metric improves, so ``serve`` and
``annotate`` can use it at once and a crash never leaves it without weights; a checkpoint of the whole state
(``checkpoint.pt``: model, optimizer, scaler, RNG states, history, time spent) is written after every epoch for
``--resume``. Training stops after ``epochs``, when the metric has not improved for ``patience`` epochs (early
stopping), or once ``max_minutes`` have passed (after the epoch in progress).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qpbridge import __version__
from qpbridge.cards import CARD_FILE, sanitize_name, validate_card_dict
from qpbridge.errors import BadRequestError, QPBridgeError
from qpbridge.files import write_json_atomic
from qpbridge.training.base import FamilyTrainer, trainer_class
from qpbridge.training.checkpoint import CHECKPOINT, load_checkpoint, restore_rng, rng_state, save_checkpoint
from qpbridge.training.data import load_tiles

log = logging.getLogger("qpbridge")

TRAINING_JSON = "training.json"


@dataclass
class TrainOptions:
    card: Path
    data: Path
    out: Path
    epochs: int = 50
    device: str = "auto"
    resume: bool = False
    batch_size: int = 8
    seed: int = 0
    crop: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    samples_per_epoch: int | None = None
    max_minutes: float | None = None
    progress: bool = True


def read_card(path: Path) -> dict[str, Any]:
    """A card's JSON from a ``config.json`` file or the model folder holding one, validated."""
    file = path / CARD_FILE if path.is_dir() else path
    try:
        data: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadRequestError(f"--card: no model card at {file}") from None
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"--card: {file} is not valid JSON: {exc}") from None
    validate_card_dict(data, source=str(file))
    return data


class _Progress:
    """One self-updating line per epoch on stderr (a line every few seconds when not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def due(self) -> bool:
        """Whether a line is due (callers then make it: reading the loss waits for the device)."""
        return self.enabled and time.monotonic() - self._last >= (0.5 if self.tty else 10.0)

    def step(self, text: str) -> None:
        self._last = time.monotonic()
        print(("\r" if self.tty else "") + text, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def done(self, text: str) -> None:
        if self.enabled:
            print(("\r" if self.tty else "") + text, file=sys.stderr, flush=True)


def train(opts: TrainOptions, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the card's family on the dataset folder; returns what ``training.json`` holds.

    ``on_epoch`` is called with each epoch's record after its checkpoint is written."""
    from qpbridge.families.torch_runtime import resolve_torch_device

    if opts.epochs < 1 or opts.batch_size < 1:
        raise BadRequestError("--epochs and --batch-size must be at least 1")
    card = read_card(opts.card)
    cls = trainer_class(card["family"])
    data = load_tiles(opts.data, mode=cls.mode)
    if data.mpp and abs(data.mpp / float(card["mpp"]) - 1.0) > 0.01:
        log.info("tiles are at %.4g µm/px; the trained model's card says so (the template said %s)", data.mpp,
                 card["mpp"])
        card = {**card, "mpp": float(data.mpp)}
    device = resolve_torch_device(opts.device)
    cuda = device.type == "cuda"
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    name = sanitize_name(out.name)

    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    trainer = cls(card, data, device, batch_size=opts.batch_size, crop=opts.crop)
    model = trainer.build_model().to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # fixed crop size: pick the fastest convolutions once
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    n_samples = opts.samples_per_epoch or trainer.samples_per_epoch()
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": 0, trainer.metric: -math.inf}
    start = 1
    spent_s = 0.0  # training time of earlier runs of this training (before --resume)
    ckpt_path = out / CHECKPOINT
    if opts.resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("family") != card["family"] or ckpt.get("data") != str(Path(opts.data).resolve()):
            raise QPBridgeError(f"--resume: {ckpt_path} is from training {ckpt.get('family')} on {ckpt.get('data')}, "
                                f"not {card['family']} on {Path(opts.data).resolve()}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"], rng)
        history, best, start = ckpt["history"], ckpt["best"], int(ckpt["epoch"]) + 1
        spent_s = float(ckpt.get("spent_s", 0.0))
        log.info("resuming after epoch %d (best %s %.4f at epoch %d)", start - 1, trainer.metric,
                 best[trainer.metric], best["epoch"])

    summary: dict[str, Any] = {
        "qpbridge": __version__, "family": card["family"], "card": str(opts.card),
        "data": {"path": str(Path(opts.data).resolve()), **data.summary()},
        "split": {s: sorted(set(data.sources.get(s, []))) for s in ("train", "val")},
        "licence": data.licence, "seed": opts.seed, "device": str(device),
        "precision": "fp16 autocast" if cuda else "fp32",
        "settings": {"epochs": opts.epochs, "batch_size": opts.batch_size, "crop": trainer.crop, "lr": opts.lr,
                     "weight_decay": opts.weight_decay, "patience": opts.patience, "samples_per_epoch": n_samples,
                     "max_minutes": opts.max_minutes},
        "metric": trainer.metric,
    }
    progress = _Progress(opts.progress)
    t_start = time.monotonic()
    epoch = start - 1
    stop_reason = "epochs"
    try:
        for epoch in range(start, opts.epochs + 1):
            t0 = time.monotonic()
            done = (epoch - 1) / opts.epochs
            if opts.max_minutes:
                done = max(done, (spent_s + t0 - t_start) / (opts.max_minutes * 60.0))
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(opts.lr, min(done, 1.0))
            model.train()
            sums: dict[str, torch.Tensor] = {}
            steps = 0
            for batch in trainer.batches(rng, n_samples):
                with torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext():
                    loss, parts = trainer.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                steps += 1
                for k, v in {"loss": loss.detach(), **parts}.items():
                    sums[k] = sums.get(k, torch.zeros((), device=device)) + v.float()
                if progress.due():
                    progress.step(f"epoch {epoch}/{opts.epochs} step {steps} loss {float(sums['loss']) / steps:.4f}")
            train_s = time.monotonic() - t0
            model.eval()
            val = trainer.validate(model)
            losses = {k: float(v) / max(steps, 1) for k, v in sums.items()}
            record = {"epoch": epoch, "loss": losses, "val": val, "train_s": round(train_s, 2),
                      "val_s": round(time.monotonic() - t0 - train_s, 2), "lr": optimizer.param_groups[0]["lr"]}
            history.append(record)
            improved = val[trainer.metric] > best[trainer.metric]
            if improved:
                best = {"epoch": epoch, **val}
                _write_model(trainer, model, out, name, {**summary, "history": history, "best": best,
                                                          "epochs_run": epoch})
            save_checkpoint(ckpt_path, {
                "family": card["family"], "data": str(Path(opts.data).resolve()), "epoch": epoch,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "spent_s": spent_s + time.monotonic() - t_start, "scaler": scaler.state_dict(),
                "rng": rng_state(rng), "history": history, "best": best})
            metrics = " ".join(f"{k} {v:.4f}" for k, v in val.items() if k in ("pq", "aji", "dice", "dq", "sq"))
            progress.done(f"epoch {epoch}/{opts.epochs} loss {losses['loss']:.4f} "
                          f"({', '.join(f'{k} {v:.3f}' for k, v in losses.items() if k != 'loss')}) val {metrics}"
                          f"{' *' if improved else ''} [{train_s:.1f} s train, {record['val_s']:.1f} s val]")
            if on_epoch is not None:
                on_epoch(record)
            if epoch - best["epoch"] >= opts.patience:
                stop_reason = f"early stop: no better {trainer.metric} for {opts.patience} epochs"
                break
            if (opts.max_minutes is not None and epoch < opts.epochs
                    and spent_s + time.monotonic() - t_start >= opts.max_minutes * 60):
                stop_reason = f"time limit of {opts.max_minutes} min"
                break
    except KeyboardInterrupt:
        print(f"\nqpbridge: training stopped in epoch {epoch}; {ckpt_path} holds epoch {epoch - 1}: continue with "
              "--resume", file=sys.stderr, flush=True)
        raise
    result = {**summary, "history": history, "best": best, "epochs_run": epoch, "stopped": stop_reason,
              "minutes": round((time.monotonic() - t_start) / 60, 2)}
    if best["epoch"] == 0:
        raise QPBridgeError("training produced no model (no epoch completed)")
    write_json_atomic(out / TRAINING_JSON, result)
    return result


def cosine_lr(base: float, done: float, floor: float = 0.02) -> float:
    """The learning rate after a fraction ``done`` of training: cosine from ``base`` down to ``floor * base``."""
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done)))


def _write_model(trainer: FamilyTrainer, model: torch.nn.Module, out: Path, name: str, record: dict[str, Any]) -> None:
    """The model folder: weights, card (with the best metrics in its description), training.json."""
    card = trainer.export(model, out, name)
    best = record["best"]
    note = (f"Trained with qpbridge train on {Path(record['data']['path']).name} (epoch {best['epoch']}: "
            + ", ".join(f"{k} {v:.3f}" for k, v in best.items() if k != "epoch") + ").")
    card["description"] = f"{card.get('description', '').split(' Trained with')[0]} {note}".strip()
    if record.get("licence") and record["licence"] not in card.get("licence", ""):
        card["licence"] = f"Weights trained on data under {record['licence']}: the same terms apply to them."
    validate_card_dict(card, source=str(out / CARD_FILE))
    write_json_atomic(out / CARD_FILE, card)
    write_json_atomic(out / TRAINING_JSON, record)
