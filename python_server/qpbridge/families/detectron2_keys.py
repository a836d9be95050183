"""detectron2 Mask R-CNN R50-FPN checkpoints as torchvision ``MaskRCNN`` state dicts, without detectron2.

Supported: the ``mask_rcnn_R_50_FPN_{1x,3x}`` configs of detectron2's model zoo and models trained from them
(``model_final.pth`` from ``DefaultTrainer``: a ``torch.save`` dict whose ``model`` entry is the state dict;
model-zoo ``.pkl``/``.pth`` files: a pickled dict whose ``model`` entry maps names to numpy arrays). That is:
ResNet-50 with frozen BatchNorm (``MODEL.RESNETS.DEPTH: 50``, ``NORM: FrozenBN``, ``STRIDE_IN_1X1: True``,
no deformable convs), FPN on res2-res5 with a max-pool P6 and no norm, the standard RPN head, the
``FastRCNNConvFCHead`` with two fc layers (``NUM_FC: 2``, ``NUM_CONV: 0``), class-specific box regression and
the 4-conv ``MaskRCNNConvUpsampleHead`` with class-specific masks. Anything else is refused with the
mismatch named (no FPN keys: a C4/DC5 model; 23 blocks in res4: R101; ``box_head.0``: Cascade R-CNN;
one mask or box channel for several classes: class-agnostic heads; unknown keys: GroupNorm, deformable
convs, keypoint heads ...).

The key map (detectron2 name -> torchvision name; ``k`` = 2..5, ``j`` = 1..3, ``i`` a block index):

=====================================================  =================================================
detectron2                                             torchvision ``maskrcnn_resnet50_fpn``
=====================================================  =================================================
backbone.bottom_up.stem.conv1.weight                   backbone.body.conv1.weight (input channels BGR->RGB)
backbone.bottom_up.stem.conv1.norm.*                   backbone.body.bn1.*
backbone.bottom_up.res{k}.{i}.conv{j}.weight           backbone.body.layer{k-1}.{i}.conv{j}.weight
backbone.bottom_up.res{k}.{i}.conv{j}.norm.*           backbone.body.layer{k-1}.{i}.bn{j}.*
backbone.bottom_up.res{k}.0.shortcut.weight            backbone.body.layer{k-1}.0.downsample.0.weight
backbone.bottom_up.res{k}.0.shortcut.norm.*            backbone.body.layer{k-1}.0.downsample.1.*
backbone.fpn_lateral{k}.*                              backbone.fpn.inner_blocks.{k-2}.0.*
backbone.fpn_output{k}.*                               backbone.fpn.layer_blocks.{k-2}.0.*
proposal_generator.rpn_head.conv.*                     rpn.head.conv.0.0.*
proposal_generator.rpn_head.objectness_logits.*        rpn.head.cls_logits.*
proposal_generator.rpn_head.anchor_deltas.*            rpn.head.bbox_pred.*
roi_heads.box_head.fc1.* / fc2.*                       roi_heads.box_head.fc6.* / fc7.*
roi_heads.box_predictor.cls_score.*                    roi_heads.box_predictor.cls_score.* (rows reordered)
roi_heads.box_predictor.bbox_pred.*                    roi_heads.box_predictor.bbox_pred.* (4 rows added)
roi_heads.mask_head.mask_fcn{1..4}.*                   roi_heads.mask_head.{0..3}.0.*
roi_heads.mask_head.deconv.*                           roi_heads.mask_predictor.conv5_mask.*
roi_heads.mask_head.predictor.*                        roi_heads.mask_predictor.mask_fcn_logits.* (1 row added)
=====================================================  =================================================

``norm.*`` is ``weight, bias, running_mean, running_var`` of detectron2's ``FrozenBatchNorm2d``, which is
torchvision's ``FrozenBatchNorm2d`` with the same eps (1e-5). ``pixel_mean``/``pixel_std`` (older
checkpoints keep them) and anchor buffers are not weights: the mean/std become the input normalisation.

What differs beyond names, and how the family makes torchvision compute what detectron2 computes:

* Class order: detectron2's ``cls_score`` has the K foreground classes first and background *last*
  (K + 1 rows); torchvision's has background *first*. Rows are moved: torchvision row 0 = detectron2 row K.
  detectron2's box deltas (4K rows) and mask logits (K channels) have no background entry; torchvision's
  have one in front, filled with zeros (never used: background is dropped before boxes and masks are read).
  Foreground class c (0-based) is torchvision label c + 1 and the card's class c.
* Colour order and pixel scale: detectron2 defaults to ``INPUT.FORMAT: BGR`` on 0-255 pixels, normalised by
  ``PIXEL_MEAN`` [103.53, 116.28, 123.675] (BGR) and ``PIXEL_STD`` [1, 1, 1]. The first convolution's input
  channels are reversed so the model takes RGB, and the normalisation becomes, in RGB, mean
  [123.675, 116.28, 103.53], std [1, 1, 1] on unscaled pixels (``scale`` 1): a card's ``normalization``
  block states it, and the device worker applies it once (torchvision's own transform normalises nothing).
* Bottleneck stride: detectron2's MSRA ResNets stride in the first 1x1 convolution of a stage's first
  block (``STRIDE_IN_1X1: True``); torchvision strides in the 3x3. The strides of the built model are moved
  (``params.stride_in_1x1``, default true).
* RoIAlign: detectron2 pools with ``ROIAlignV2`` (``aligned=True``, sampling ratio 0) and assigns boxes to
  levels by ``floor(4 + log2(sqrt(area) / 224 + 1e-8))``; torchvision's default pooler uses
  ``aligned=False`` and sampling ratio 2. The family's pooler does what detectron2 does.
* Anchors: both use sizes 32-512 on P2-P6 and ratios 0.5, 1, 2 in the same order at offset 0, but
  torchvision rounds the cell anchors to whole pixels; the family keeps detectron2's unrounded ones.
* Input size: detectron2 resizes test images (``MIN_SIZE_TEST`` 800); torchvision's transform would too.
  The family never resizes: the card's tile size and µm/px say at which scale the model sees tissue, so set
  ``mpp`` to the scale the model was trained at.
* Mask pasting: each 28 x 28 mask is pasted into its box by bilinear sampling at pixel centres (detectron2's
  ``paste_masks_in_image``), thresholded at ``params.mask_threshold``.

Box coding (weights 10, 10, 5, 5 for the heads, 1, 1, 1, 1 for the RPN, the same clamp), NMS and the
top-k settings are the same in both; their test-time values are card parameters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from qpbridge.errors import ModelLoadError

__all__ = ["R50_BLOCKS", "check_supported", "detectron2_to_torchvision", "num_classes_of",
           "torchvision_to_detectron2"]

R50_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}  # blocks per ResNet stage
_NORM = r"(weight|bias|running_mean|running_var)"

# (detectron2 pattern, torchvision replacement), and the inverse pairs below; each pattern matches whole names.
_RULES: list[tuple[str, str, str, str]] = [
    (r"backbone\.bottom_up\.stem\.conv1\.weight", "backbone.body.conv1.weight",
     r"backbone\.body\.conv1\.weight", "backbone.bottom_up.stem.conv1.weight"),
    (rf"backbone\.bottom_up\.stem\.conv1\.norm\.{_NORM}", "backbone.body.bn1.{1}",
     rf"backbone\.body\.bn1\.{_NORM}", "backbone.bottom_up.stem.conv1.norm.{1}"),
    (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.weight", "backbone.body.layer{k1}.{2}.conv{3}.weight",
     r"backbone\.body\.layer([1-4])\.(\d+)\.conv([1-3])\.weight", "backbone.bottom_up.res{k2}.{2}.conv{3}.weight"),
    (rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([1-3])\.norm\.{_NORM}",
     "backbone.body.layer{k1}.{2}.bn{3}.{4}",
     rf"backbone\.body\.layer([1-4])\.(\d+)\.bn([1-3])\.{_NORM}", "backbone.bottom_up.res{k2}.{2}.conv{3}.norm.{4}"),
    (r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight", "backbone.body.layer{k1}.{2}.downsample.0.weight",
     r"backbone\.body\.layer([1-4])\.(\d+)\.downsample\.0\.weight", "backbone.bottom_up.res{k2}.{2}.shortcut.weight"),
    (rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.{_NORM}",
     "backbone.body.layer{k1}.{2}.downsample.1.{3}",
     rf"backbone\.body\.layer([1-4])\.(\d+)\.downsample\.1\.{_NORM}",
     "backbone.bottom_up.res{k2}.{2}.shortcut.norm.{3}"),
    (r"backbone\.fpn_lateral([2-5])\.(weight|bias)", "backbone.fpn.inner_blocks.{f1}.0.{2}",
     r"backbone\.fpn\.inner_blocks\.([0-3])\.0\.(weight|bias)", "backbone.fpn_lateral{f2}.{2}"),
    (r"backbone\.fpn_output([2-5])\.(weight|bias)", "backbone.fpn.layer_blocks.{f1}.0.{2}",
     r"backbone\.fpn\.layer_blocks\.([0-3])\.0\.(weight|bias)", "backbone.fpn_output{f2}.{2}"),
    (r"proposal_generator\.rpn_head\.conv\.(weight|bias)", "rpn.head.conv.0.0.{1}",
     r"rpn\.head\.conv\.0\.0\.(weight|bias)", "proposal_generator.rpn_head.conv.{1}"),
    (r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)", "rpn.head.cls_logits.{1}",
     r"rpn\.head\.cls_logits\.(weight|bias)", "proposal_generator.rpn_head.objectness_logits.{1}"),
    (r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)", "rpn.head.bbox_pred.{1}",
     r"rpn\.head\.bbox_pred\.(weight|bias)", "proposal_generator.rpn_head.anchor_deltas.{1}"),
    (r"roi_heads\.box_head\.fc1\.(weight|bias)", "roi_heads.box_head.fc6.{1}",
     r"roi_heads\.box_head\.fc6\.(weight|bias)", "roi_heads.box_head.fc1.{1}"),
    (r"roi_heads\.box_head\.fc2\.(weight|bias)", "roi_heads.box_head.fc7.{1}",
     r"roi_heads\.box_head\.fc7\.(weight|bias)", "roi_heads.box_head.fc2.{1}"),
    (r"roi_heads\.box_predictor\.cls_score\.(weight|bias)", "roi_heads.box_predictor.cls_score.{1}",
     r"roi_heads\.box_predictor\.cls_score\.(weight|bias)", "roi_heads.box_predictor.cls_score.{1}"),
    (r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)", "roi_heads.box_predictor.bbox_pred.{1}",
     r"roi_heads\.box_predictor\.bbox_pred\.(weight|bias)", "roi_heads.box_predictor.bbox_pred.{1}"),
    (r"roi_heads\.mask_head\.mask_fcn([1-4])\.(weight|bias)", "roi_heads.mask_head.{m1}.0.{2}",
     r"roi_heads\.mask_head\.([0-3])\.0\.(weight|bias)", "roi_heads.mask_head.mask_fcn{m2}.{2}"),
    (r"roi_heads\.mask_head\.deconv\.(weight|bias)", "roi_heads.mask_predictor.conv5_mask.{1}",
     r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)", "roi_heads.mask_head.deconv.{1}"),
    (r"roi_heads\.mask_head\.predictor\.(weight|bias)", "roi_heads.mask_predictor.mask_fcn_logits.{1}",
     r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)", "roi_heads.mask_head.predictor.{1}"),
]

# Entries of a detectron2 state dict that are not weights of the network.
_NOT_WEIGHTS = re.compile(r"(pixel_mean|pixel_std|proposal_generator\.anchor_generator\..*)$")


def _fill(template: str, groups: tuple[str, ...]) -> str:
    """The replacement with ``{n}`` = group n, and the index shifts {k1} stage -> layer, {k2} layer -> stage,
    {f1} P-level -> FPN block, {f2} FPN block -> P-level, {m1} mask_fcn -> mask_head index, {m2} back."""
    g = {str(i + 1): v for i, v in enumerate(groups)}
    first = int(groups[0]) if groups and groups[0].isdigit() else 0
    g.update(k1=str(first - 1), k2=str(first + 1), f1=str(first - 2), f2=str(first + 2), m1=str(first - 1),
             m2=str(first + 1))
    return re.sub(r"\{(\w+)\}", lambda m: g[m.group(1)], template)


def _rename(name: str, direction: int) -> str | None:
    for rule in _RULES:
        pattern, template = (rule[0], rule[1]) if direction == 0 else (rule[2], rule[3])
        m = re.fullmatch(pattern, name)
        if m:
            return _fill(template, m.groups())
    return None


def _tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    raise ModelLoadError(f"detectron2 checkpoint entry {name} is a {type(value).__name__}, not an array")


def num_classes_of(state: Mapping[str, Any]) -> int:
    """K, the number of foreground classes, from ``cls_score`` (K + 1 rows, background last)."""
    key = "roi_heads.box_predictor.cls_score.weight"
    if key not in state:
        raise ModelLoadError(f"not a detectron2 R-CNN checkpoint: no {key}")
    return int(np.shape(state[key])[0]) - 1


def check_supported(state: Mapping[str, Any], n_classes: int | None = None) -> None:
    """Refuse, naming the mismatch, a checkpoint that is not a Mask R-CNN R50-FPN of the supported layout."""
    names = set(state)
    if not any(k.startswith("backbone.bottom_up.") for k in names):
        raise ModelLoadError("not a detectron2 checkpoint: no backbone.bottom_up.* keys (a torchvision state dict "
                             "needs params.weights_format \"torchvision\")")
    if any(re.match(r"roi_heads\.(box_head|box_predictor)\.\d+\.", k) for k in names):
        raise ModelLoadError("a Cascade R-CNN checkpoint (roi_heads.box_head.0/1/2 ...): only the single-stage "
                             "mask_rcnn_R_50_FPN box head is supported")
    if not any(k.startswith("backbone.fpn_lateral") for k in names):
        raise ModelLoadError("no backbone.fpn_lateral* keys: not an FPN model (C4 and DC5 backbones are not "
                             "supported; use a mask_rcnn_R_50_FPN config)")
    for stage, want in R50_BLOCKS.items():
        blocks = {int(m.group(1)) for k in names
                  if (m := re.match(rf"backbone\.bottom_up\.res{stage}\.(\d+)\.", k))}
        if len(blocks) != want:
            depth = {23: "ResNet-101", 36: "ResNet-152"}.get(len(blocks), "not ResNet-50")
            raise ModelLoadError(f"res{stage} has {len(blocks)} blocks, ResNet-50 has {want} ({depth}): only "
                                 "R50-FPN checkpoints are supported")
    if not any(k.startswith("roi_heads.mask_head.") for k in names):
        raise ModelLoadError("no roi_heads.mask_head.* keys: a Faster R-CNN (boxes only) checkpoint; the maskrcnn "
                             "family needs the mask head")
    k = num_classes_of(state)
    if n_classes is not None and k != n_classes:
        raise ModelLoadError(f"the checkpoint has {k} classes (roi_heads.box_predictor.cls_score has {k + 1} rows, "
                             f"background last) but the card lists {n_classes}")
    box_rows = int(np.shape(state.get("roi_heads.box_predictor.bbox_pred.weight", np.zeros((0,))))[0])
    if box_rows != 4 * k:
        raise ModelLoadError(f"roi_heads.box_predictor.bbox_pred has {box_rows} rows for {k} classes: class-agnostic "
                             "box regression (CLS_AGNOSTIC_BBOX_REG) is not supported")
    mask_rows = int(np.shape(state.get("roi_heads.mask_head.predictor.weight", np.zeros((0,))))[0])
    if mask_rows != k:
        raise ModelLoadError(f"roi_heads.mask_head.predictor has {mask_rows} channels for {k} classes: "
                             "class-agnostic masks (CLS_AGNOSTIC_MASK) are not supported")
    unknown = sorted(n for n in names if _rename(n, 0) is None and not _NOT_WEIGHTS.match(n))
    if unknown:
        shown = ", ".join(unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
        raise ModelLoadError(f"{len(unknown)} checkpoint entries outside the R50-FPN Mask R-CNN layout ({shown}): "
                             "GroupNorm, deformable convolutions, extra heads and box-head convolutions are not "
                             "supported")


def detectron2_to_torchvision(state: Mapping[str, Any], *, bgr: bool = True) -> dict[str, torch.Tensor]:
    """The torchvision ``MaskRCNN`` state dict of a supported detectron2 state dict (see the module docstring);
    ``bgr``: the checkpoint was trained on BGR input (detectron2's default), so its first convolution's input
    channels are reversed for RGB."""
    check_supported(state)
    k = num_classes_of(state)
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if _NOT_WEIGHTS.match(name):
            continue
        new = _rename(name, 0)
        assert new is not None  # check_supported refused unknown names
        t = _tensor(value, name)
        out[new] = _TO_TV.get(new, _same)(t, k, bgr)
    return out


def torchvision_to_detectron2(state: Mapping[str, torch.Tensor], *, bgr: bool = True) -> dict[str, np.ndarray]:
    """The inverse map: a torchvision ``maskrcnn_resnet50_fpn`` state dict in detectron2's names and layout
    (numpy arrays), as detectron2 would have saved the same network (for tests and for export)."""
    k = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0]) - 1
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        new = _rename(name, 1)
        if new is None:
            raise ValueError(f"no detectron2 name for torchvision parameter {name}")
        t = _TO_D2.get(name, _same)(value.detach().to("cpu", torch.float32), k, bgr)
        out[new] = t.numpy().copy()
    return out


def _same(t: torch.Tensor, k: int, bgr: bool) -> torch.Tensor:
    return t


def _flip_input(t: torch.Tensor, k: int, bgr: bool) -> torch.Tensor:
    return t.flip(1).contiguous() if bgr else t


def _bg_first(t: torch.Tensor, k: int, bgr: bool) -> torch.Tensor:
    return torch.cat([t[k:k + 1], t[:k]])


def _bg_last(t: torch.Tensor, k: int, bgr: bool) -> torch.Tensor:
    return torch.cat([t[1:], t[:1]])


def _add_rows(n: int) -> Callable[[torch.Tensor, int, bool], torch.Tensor]:
    def add(t: torch.Tensor, k: int, bgr: bool) -> torch.Tensor:
        return torch.cat([torch.zeros((n, *t.shape[1:]), dtype=t.dtype), t])

    return add


def _drop_rows(n: int) -> Callable[[torch.Tensor, int, bool], torch.Tensor]:
    def drop(t: torch.Tensor, k: int, bgr: bool) -> torch.Tensor:
        return t[n:].contiguous()

    return drop


_TO_TV: dict[str, Callable[[torch.Tensor, int, bool], torch.Tensor]] = {
    "backbone.body.conv1.weight": _flip_input,
    "roi_heads.box_predictor.cls_score.weight": _bg_first,
    "roi_heads.box_predictor.cls_score.bias": _bg_first,
    "roi_heads.box_predictor.bbox_pred.weight": _add_rows(4),
    "roi_heads.box_predictor.bbox_pred.bias": _add_rows(4),
    "roi_heads.mask_predictor.mask_fcn_logits.weight": _add_rows(1),
    "roi_heads.mask_predictor.mask_fcn_logits.bias": _add_rows(1),
}
_TO_D2: dict[str, Callable[[torch.Tensor, int, bool], torch.Tensor]] = {
    "backbone.body.conv1.weight": _flip_input,
    "roi_heads.box_predictor.cls_score.weight": _bg_last,
    "roi_heads.box_predictor.cls_score.bias": _bg_last,
    "roi_heads.box_predictor.bbox_pred.weight": _drop_rows(4),
    "roi_heads.box_predictor.bbox_pred.bias": _drop_rows(4),
    "roi_heads.mask_predictor.mask_fcn_logits.weight": _drop_rows(1),
    "roi_heads.mask_predictor.mask_fcn_logits.bias": _drop_rows(1),
}
