"""``gradcam``: HistoSegNet-style weak segmentation from a patch classifier (Chan et al., ICCV 2019).

A classifier trained on patch-level labels (no masks) gives class regions through Grad-CAM; HistoSegNet's
inter-class adjustment turns the per-class maps into disjoint regions. Everything runs on the device, batched
by the :class:`~qpbridge.families.torch_runtime.DeviceWorker` with ``autograd=True`` (gradients of each class
score with respect to the explained layer's activations), and the result is a ``SemanticResult`` whose
per-class scores the engine blends over tile overlaps like any semantic model's probabilities.

Classifier (``card.weights``), the file itself says which:

- a state dict of a torchvision model named by ``params.arch`` (built with ``weights=None`` and
  ``num_classes`` = the classifier's outputs, so nothing is downloaded), or of a timm model with
  ``arch: "timm:<name>"`` when timm is installed (not a dependency of qpbridge);
- a TorchScript file whose module has the methods ``forward_features(x) -> activations N x C x h x w`` (the
  layer to explain) and ``forward_head(activations) -> logits N x K`` (timm's names): hooks do not work in
  TorchScript, and gradients with respect to an intermediate output of one scripted call are not reliable
  (the executor may fuse it away), so the export keeps the two halves apart (``@torch.jit.export`` on both
  when scripting; ``torch.jit.trace_module`` with both methods when tracing).

The layer explained: ``params.target_layer`` (a module name, e.g. ``layer4``); by default ``layer4`` for
torchvision ResNets, ``features`` for models that have it (DenseNet, VGG, EfficientNet, MobileNet, ConvNeXt),
timm's ``forward_features``/``forward_head`` split for timm models.

Per tile, on the device:

1. Grad-CAM (Selvaraju et al.) for each classifier output k: weights = spatial mean of d logit_k / d A,
   map = sum over channels of weight x A, resized bilinearly to the tile, ReLU, divided by its maximum, then
   multiplied by the class's confidence (sigmoid of its logit for multi-label classifiers as HistoSegNet's,
   or softmax with ``params.scores: "softmax"``); classes scoring below ``params.score_threshold`` (one value,
   or one per output) get no map, as HistoSegNet only explains the classes it predicts. HistoSegNet also
   divides the gradients by their RMS first: a positive factor per map that the division by the maximum
   cancels, so it is left out.
2. The inter-class adjustment (HistoSegNet's ``modify_by_htt`` and ``get_cs_gradcam``):
   - ``params.background`` (optional, ``{"class", "max", "white", "slope", "sigma_px", "exceptions"}``):
     the glass class is not one the classifier knows; its map is ``max * sigmoid(slope * (grey - white))``
     of the tile's mean RGB (defaults 0.75, 240, 4: near-white pixels), Gaussian-smoothed with ``sigma_px``
     (2), minus the maximum of the ``exceptions`` classes' maps (tissue that is itself white, such as
     adipose), clipped to [0, 1];
   - ``params.other`` (optional, ``{"class", "mult"}``): an "other tissue" class whose map is
     ``mult * (1 - max of all maps)`` (default 0.05): tissue no known class claims;
   - class subtraction (``params.class_subtraction``, default true): each map minus the maximum of all
     the others (the "other" class excepted), clipped to [0, 1], so at most one class is positive at a pixel.
     HistoSegNet does this in place, class after class, which makes the result depend on the class order;
     here every map is reduced by the others' maxima before any is changed.
3. Refinement (``params.refine``: ``"guided"``, the default, or ``"none"``). HistoSegNet refines with a
   fully connected CRF (pydensecrf). Its substitute here is the guided filter (He et al., 2010/2013) with the
   tile's grey image as guide (``guided_radius_px``, default 8; ``guided_eps``, default 1e-2 on [0, 1]
   intensities): like the CRF's bilateral term, it snaps the coarse CAMs (one value per 32 px for a ResNet)
   to the image's edges, but it is a handful of box filters - linear time, batched on the GPU, deterministic,
   differentiable and without a dependency (pydensecrf is unmaintained, CPU-only and has no wheels for
   current Pythons). It does not do the CRF's label competition (the class subtraction already did), and its
   local window means it cannot move a boundary by more than its radius, which is what a refinement of
   Grad-CAM's coarse grid needs. Refined maps are clipped to [0, 1].

Pixels where every adjusted map is 0 belong to no class (the stitcher's "no class"), so the card need not
have a background class. Per-tile normalisation (step 1) is HistoSegNet's; overlapping tiles are blended with
the engine's cosine window, which is what keeps tile borders from showing.

Card ``params`` besides the above: ``classifier_classes`` (card class names in the classifier's output order,
``null`` for an output this card does not segment, such as the morphological types of a classifier trained on
all of ADP's; default: the card's classes other than the background and other classes), ``precision``, ``max_batch``,
``batch_wait_ms``, ``channels_last`` as for the other torch families (fp32 is advised: gradients in fp16 can
underflow).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qpbridge.errors import ModelCardError, ModelLoadError
from qpbridge.families.base import NO_CLASS, SemanticResult, TileResult, register_family
from qpbridge.families.params import bool_param
from qpbridge.families.stains import check_rgb_tile
from qpbridge.families.torch_runtime import IMAGENET_MEAN, IMAGENET_STD, DeviceWorker, Normalization
from qpbridge.families.torch_segmentation import TorchSegmentation, pad_to
from qpbridge.families.weights import is_torchscript, load_state_dict_file, load_torchscript, load_weights_strict

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard


def _number(value: Any, key: str, minimum: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ModelCardError(f"card parameter '{key}' must be a number >= {minimum}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Adjustment:
    """HistoSegNet's inter-class adjustment and the refinement, in the card's class indices."""

    n_classes: int
    clf_to_card: tuple[int, ...]  # card class index of each classifier output (-1: not segmented)
    background: int | None = None
    bg_max: float = 0.75
    bg_white: float = 240.0
    bg_slope: float = 4.0
    bg_sigma: float = 2.0
    bg_exceptions: tuple[int, ...] = ()
    other: int | None = None
    other_mult: float = 0.05
    subtract: bool = True
    refine: str = "guided"
    radius: int = 8
    eps: float = 1e-2

    @classmethod
    def from_card(cls, card: ModelCard) -> Adjustment:
        params = card.params
        names = [c.name for c in card.classes]

        def index(name: Any, key: str) -> int:
            if name not in names:
                raise ModelCardError(f"card parameter '{key}' names class {name!r}, which is not one of the card's "
                                     f"classes {names}")
            return names.index(name)

        bg = params.get("background")
        other = params.get("other")
        if bg is not None and not (isinstance(bg, dict) and "class" in bg):
            raise ModelCardError("card parameter 'background' must be an object with a 'class' name, or null")
        if other is not None and not (isinstance(other, dict) and "class" in other):
            raise ModelCardError("card parameter 'other' must be an object with a 'class' name, or null")
        bg_index = index(bg["class"], "background.class") if bg else None
        other_index = index(other["class"], "other.class") if other else None
        derived = {i for i in (bg_index, other_index) if i is not None}
        clf_names = params.get("classifier_classes", [n for i, n in enumerate(names) if i not in derived])
        if not isinstance(clf_names, list) or not any(n is not None for n in clf_names):
            raise ModelCardError("card parameter 'classifier_classes' must list the classifier's outputs by class name")
        # null: an output of the classifier that this card does not segment
        clf_to_card = tuple(-1 if n is None else index(n, "classifier_classes") for n in clf_names)
        used = [i for i in clf_to_card if i >= 0]
        if derived & set(used) or len(set(used)) != len(used):
            raise ModelCardError("card parameter 'classifier_classes' must name each class once, and not the "
                                 "background or other class (those are derived, not classified)")
        refine = params.get("refine", "guided")
        if refine not in ("guided", "none"):
            raise ModelCardError(f"card parameter 'refine' must be 'guided' or 'none', got {refine!r}")
        radius = params.get("guided_radius_px", 8)
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 1:
            raise ModelCardError(f"card parameter 'guided_radius_px' must be an integer >= 1, got {radius!r}")
        bg = bg or {}
        return cls(
            n_classes=len(names), clf_to_card=clf_to_card, background=bg_index,
            bg_max=_number(bg.get("max", 0.75), "background.max", 0.0),
            bg_white=_number(bg.get("white", 240.0), "background.white"),
            bg_slope=_number(bg.get("slope", 4.0), "background.slope", 0.0),
            bg_sigma=_number(bg.get("sigma_px", 2.0), "background.sigma_px", 0.0),
            bg_exceptions=tuple(index(n, "background.exceptions") for n in bg.get("exceptions", [])),
            other=other_index, other_mult=_number((other or {}).get("mult", 0.05), "other.mult", 0.0),
            subtract=bool_param(params, "class_subtraction", True), refine=refine, radius=radius,
            eps=_number(params.get("guided_eps", 1e-2), "guided_eps", 1e-12))

    def __call__(self, cams: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
        """Classifier maps (N, K, H, W) in [0, 1] and the tiles' RGB (N, 3, H, W, 0..255) -> (N, C, H, W)."""
        n, k, h, w = cams.shape
        if k != len(self.clf_to_card):
            raise ModelLoadError(f"the classifier has {k} outputs but the card's classifier_classes name "
                                 f"{len(self.clf_to_card)}; list the classifier's outputs in order")
        out = cams.new_zeros((n, self.n_classes, h, w))
        used = [i for i, c in enumerate(self.clf_to_card) if c >= 0]
        out[:, [self.clf_to_card[i] for i in used]] = cams[:, used]
        if self.background is not None:
            grey = rgb.mean(dim=1, keepdim=True)
            bg = self.bg_max * torch.sigmoid(self.bg_slope * (grey - self.bg_white))
            bg = gaussian_blur(bg, self.bg_sigma)[:, 0]
            if self.bg_exceptions:
                bg = bg - out[:, list(self.bg_exceptions)].amax(dim=1)
            out[:, self.background] = bg.clamp(0.0, 1.0)
        if self.other is not None:
            out[:, self.other] = (self.other_mult * (1.0 - out.amax(dim=1))).clamp(0.0, 1.0)
        if self.subtract and self.n_classes > 1:
            top2 = out.topk(2, dim=1)
            first, second = top2.values[:, 0:1], top2.values[:, 1:2]
            is_first = torch.arange(self.n_classes, device=out.device).view(1, -1, 1, 1) == top2.indices[:, 0:1]
            others_max = torch.where(is_first, second, first)  # the max over the classes other than c
            sub = out - others_max
            if self.other is not None:
                sub[:, self.other] = out[:, self.other]
            out = sub.clamp(0.0, 1.0)
        if self.refine == "guided":
            out = guided_filter(rgb.mean(dim=1, keepdim=True) / 255.0, out, self.radius, self.eps).clamp(0.0, 1.0)
        return out


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W), reflected at the borders (scipy's gaussian_filter, truncate 4)."""
    if sigma <= 0:
        return x
    r = max(1, int(4.0 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    mode = "reflect" if min(h, w) > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a (2r+1)^2 window, over the pixels inside the image only."""
    return F.avg_pool2d(x, 2 * r + 1, stride=1, padding=r, count_include_pad=False)


def guided_filter(guide: torch.Tensor, p: torch.Tensor, r: int, eps: float) -> torch.Tensor:
    """He et al.'s guided filter of every channel of ``p`` (N, C, H, W) with the grey ``guide`` (N, 1, H, W)."""
    r = max(1, min(r, (min(int(p.shape[-2]), int(p.shape[-1])) - 1) // 2)) if min(p.shape[-2:]) > 2 else 0
    if r == 0:
        return p
    g, p = guide.float(), p.float()
    mean_i = _box(g, r)
    var_i = _box(g * g, r) - mean_i * mean_i
    mean_p = _box(p, r)
    cov_ip = _box(g * p, r) - mean_i * mean_p
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    return _box(a, r) * g + _box(b, r)


class GradCAMNet(nn.Module):
    """A classifier and the layer to explain -> (Grad-CAM maps (N, K, H, W) in [0, 1] x confidence, scores)."""

    thresholds: torch.Tensor

    def __init__(self, classifier: nn.Module, kind: str, target: str | None, scores: str,
                 thresholds: torch.Tensor) -> None:
        super().__init__()
        self.classifier = classifier
        self.kind = kind  # "module" (forward hook on ``target``), "timm"/"torchscript" (forward_features/head)
        self.scores = scores
        self.register_buffer("thresholds", thresholds, persistent=False)
        # per thread: the worker serves while a torch.compile warm-up may run the model on another thread
        self._local = threading.local()
        if kind == "module":
            assert target is not None
            layer = dict(classifier.named_modules()).get(target)
            if layer is None:
                raise ModelCardError(f"the classifier has no layer '{target}' (card parameter 'target_layer')")
            layer.register_forward_hook(self._hook)

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, activations), with the activations a leaf of the graph: the backward passes then run only
        through the layers after them (the classifier's head), and never depend on how the rest was built."""
        if self.kind in ("timm", "torchscript"):
            acts = self.classifier.forward_features(x).detach().requires_grad_(True)  # type: ignore[operator]
            return self.classifier.forward_head(acts), acts  # type: ignore[operator]
        self._local.acts = []
        logits = self.classifier(x)
        if not self._local.acts:
            raise ModelLoadError("the explained layer did not run in the classifier's forward pass")
        explained: torch.Tensor = self._local.acts[-1]
        return logits, explained

    def _hook(self, _module: nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
        leaf = out.detach().requires_grad_(True)  # what the rest of the classifier computes from
        self._local.acts.append(leaf)
        return leaf

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        with torch.enable_grad():
            logits, acts = self._run(x)
            if logits.ndim != 2 or acts.ndim != 4 or logits.shape[0] != x.shape[0]:
                raise ModelLoadError(f"Grad-CAM needs logits N x K and activations N x C x h x w, got "
                                     f"{tuple(logits.shape)} and {tuple(acts.shape)}")
            k = int(logits.shape[1])
            weights = []
            for c in range(k):  # one backward pass per class through the head, sharing its forward graph
                (grad,) = torch.autograd.grad(logits[:, c].sum(), acts, retain_graph=c < k - 1)
                weights.append(grad.float().mean(dim=(2, 3)))
        w_all = torch.stack(weights, dim=1)  # (N, K, C)
        cams = torch.einsum("nkc,nchw->nkhw", w_all, acts.detach().float())
        cams = F.interpolate(cams, size=(h, w), mode="bilinear", align_corners=False).clamp_min(0.0)
        cams = cams / cams.amax(dim=(2, 3), keepdim=True).clamp_min(1e-7)
        logits = logits.detach().float()
        scores = torch.softmax(logits, dim=1) if self.scores == "softmax" else torch.sigmoid(logits)
        keep = (scores >= self.thresholds.to(scores.device)).to(scores.dtype)
        return cams * (scores * keep)[:, :, None, None], scores


def _default_target(net: nn.Module) -> str:
    for name in ("layer4", "features", "trunk_output"):
        if hasattr(net, name):
            return name
    raise ModelCardError("no default layer to explain for this architecture: set the card parameter 'target_layer' "
                         "to the name of its last convolutional block")


def build_classifier(arch: str, k: int, name: str) -> nn.Module:
    """The classifier ``params.arch`` names, with ``k`` outputs and random weights (nothing is downloaded):
    a torchvision model, or ``timm:<name>`` when timm is installed."""
    if arch.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise ModelLoadError(f"model '{name}' is a timm model ({arch}) but timm is not installed: "
                                 "pip install timm") from exc
        model: nn.Module = timm.create_model(arch[len("timm:"):], pretrained=False, num_classes=k)
        return model
    import torchvision

    try:
        built: nn.Module = torchvision.models.get_model(arch, weights=None, num_classes=k)
    except (ValueError, TypeError) as exc:
        raise ModelCardError(f"model '{name}': '{arch}' is not a torchvision classification model ({exc})") from exc
    return built


@register_family("gradcam")
class GradCAMSegmentation(TorchSegmentation):
    """Class regions from a patch classifier's Grad-CAM maps, adjusted as HistoSegNet does."""

    default_mean = IMAGENET_MEAN
    default_std = IMAGENET_STD
    weights_kind = "classifier weights (state dict of params.arch, or TorchScript returning (logits, activations))"
    thread_safe: ClassVar[bool] = True

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        self.adjust = Adjustment.from_card(card)
        scores = card.params.get("scores", "sigmoid")
        if scores not in ("sigmoid", "softmax"):
            raise ModelCardError(f"card parameter 'scores' must be 'sigmoid' or 'softmax', got {scores!r}")
        self.scores = str(scores)
        super().__init__(card, device)

    def _thresholds(self) -> torch.Tensor:
        k = len(self.adjust.clf_to_card)
        value = self.card.params.get("score_threshold", 0.0)
        values = value if isinstance(value, list) else [value] * k
        if len(values) != k:
            raise ModelCardError(f"card parameter 'score_threshold' needs one value or {k} (one per classifier "
                                 f"output), got {len(values)}")
        return torch.tensor([_number(v, "score_threshold") for v in values], dtype=torch.float32)

    def _load(self, weights: Path, device: torch.device) -> torch.nn.Module:
        params = self.card.params
        k = len(self.adjust.clf_to_card)
        target = params.get("target_layer")
        if target is not None and not isinstance(target, str):
            raise ModelCardError(f"card parameter 'target_layer' must be a module name, got {target!r}")
        if weights.is_file() and is_torchscript(weights):
            module = load_torchscript(weights, self.card.name, device)
            if not (hasattr(module, "forward_features") and hasattr(module, "forward_head")):
                raise ModelLoadError(f"model '{self.card.name}': the TorchScript classifier {weights} needs the "
                                     "methods forward_features(x) and forward_head(activations) for Grad-CAM "
                                     "(see the gradcam family's documentation)", path=str(weights))
            net = GradCAMNet(module, "torchscript", None, self.scores, self._thresholds())
        else:
            arch = params.get("arch")
            if not isinstance(arch, str) or not arch:
                raise ModelCardError(f"model '{self.card.name}': a state dict needs its architecture: set the card "
                                     "parameter 'arch' (a torchvision model name such as resnet18, or timm:<name>)")
            classifier = self._build(arch, k)
            load_weights_strict(classifier, load_state_dict_file(weights, self.card.name), self.card.name, weights)
            kind = "timm" if arch.startswith("timm:") and target is None else "module"
            net = GradCAMNet(classifier, kind, target or (None if kind == "timm" else _default_target(classifier)),
                             self.scores, self._thresholds())
        for p in net.parameters():
            p.requires_grad_(False)  # gradients are taken with respect to activations only
        return net.to(device).eval()

    def _build(self, arch: str, k: int) -> nn.Module:
        return build_classifier(arch, k, self.card.name)

    def _start_worker(self, model: torch.nn.Module, precision: str, settings: dict[str, Any]) -> DeviceWorker:
        card = self.card
        norm: Normalization = settings["normalization"]
        std = torch.tensor(norm.std).view(1, 3, 1, 1)
        mean = torch.tensor(norm.mean).view(1, 3, 1, 1)
        adjust = self.adjust

        def head(output: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
            cams, scores = output
            rgb = (x.float() * std.to(x.device) + mean.to(x.device)) * norm.scale  # the tile's 0..255 values
            probs = adjust(cams, rgb)
            return {"probs": probs.to(torch.float16 if x.is_cuda else torch.float32), "scores": scores}

        worker = DeviceWorker(model, self.torch_device, name=card.name, precision=precision, head=head,
                              autograd=True, **settings)
        worker.warm_up(card.tile_size)
        return worker

    def _run(self, tiles: Sequence[np.ndarray], on_device: bool) -> list[TileResult]:
        checked = [check_rgb_tile(t, i) for i, t in enumerate(tiles)]
        size = self.card.tile_size
        groups: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(checked):
            groups.setdefault((max(t.shape[0], size), max(t.shape[1], size)), []).append(i)
        futures = [(idx, self.worker.submit(np.stack([pad_to(checked[i], h, w) for i in idx]), on_device=on_device))
                   for (h, w), idx in groups.items()]
        results: list[TileResult | None] = [None] * len(checked)
        for idx, fut in futures:
            probs = fut.result()["probs"]
            for j, i in enumerate(idx):
                h, w = checked[i].shape[:2]
                p = probs[j, :, :h, :w]
                if isinstance(p, np.ndarray):
                    p = np.ascontiguousarray(p)
                    best = p.max(axis=0)
                    cmap = np.where(best > 0, p.argmax(axis=0), NO_CLASS).astype(np.uint8)
                    results[i] = SemanticResult(classes=cmap, probs=p)
                else:
                    results[i] = SemanticResult(probs=p)
        return [r for r in results if r is not None]

    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        return self._run(tiles, on_device=False)

    def predict_native(self, tiles: Sequence[np.ndarray], *, on_device: bool = False) -> list[TileResult]:
        return self._run(tiles, on_device=on_device)

    def scores_of(self, tiles: Sequence[np.ndarray]) -> np.ndarray:
        """The classifier's confidences (N, K) for tiles of one size (for tests and previews)."""
        batch = np.stack([check_rgb_tile(t, i) for i, t in enumerate(tiles)])
        return np.asarray(self.worker.run(batch)["scores"])
