"""evaluate.py: the benchmarks of the five papers, for any backbone with DINO's interface.

One shared implementation, so that every method of this repo (and the official DINO weights,
the baseline) is measured the same way. Protocols (facts from the papers / official code):
  knn         DINO's weighted k-NN on L2-normalised [CLS] (k = 10, 20, 100, 200, T = 0.07), top-1/5.
  linear      linear classifier on the [CLS] of the last 4 blocks, concatenated; features cached.
  seg-linear  1x1-conv probe on frozen patch tokens, logits upsampled to the mask; mIoU, 255 ignored.
  seg-cluster k-means on the patch tokens of the val set: K = #classes + Hungarian, K = 100/300/500
              + many-to-one (overclustering), and a foreground-only variant (K = #classes - 1).
  propagate   DAVIS-2017 label propagation (affinity T = 0.1, top-5, first + 7 previous frames,
              neighbourhood 12, 480 px); J (region IoU), F (boundary F, DAVIS toolkit), J&F.
  icl         open-ended N-way K-shot in-context classification (Frozen's protocol, exact match).
  unsupervised_segmentation (a function; leopart.py calls it): Leopart's label-free pipeline,
              cluster-based foreground extraction + community detection merging clusters into K.
  viz         last-layer attention of 3 heads as R, G, B and k-means maps (k = 5, 10); PNG + GIF.
All scores are percentages (accuracy, mIoU, J, F, NMI).

Commands:
  python evaluate.py knn        --ckpt runs/dora/checkpoint.pth --data /data/imagenet
  python evaluate.py linear     --ckpt dino_deitsmall16_pretrain.pth --arch vit_small --patch-size 16 --data ...
  python evaluate.py seg-linear --ckpt ... --data /data/VOCdevkit/VOC2012   (VOC layout, data.py)
  python evaluate.py propagate  --ckpt ... --data /data/DAVIS --output-dir runs/davis
  python evaluate.py suite      --random-init --arch vit_demo --patch-size 8 --data runs/synth
  python evaluate.py suite      --arch pixels --patch-size 8 --data runs/synth    (raw-pixel floor)
The last line printed is one JSON object with every number.
"""
import argparse
import functools
import glob
import importlib
import json
import math
import os
import random
import re
import string
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from einops import rearrange
from scipy.optimize import linear_sum_assignment

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
METHOD_MODULES = ("dora", "leopart", "timetuning", "sinkhorn")  # searched for a ViT definition
VIT_ARCHS = {}  # arch name -> constructor(patch_size=...); filled from a method module (or a test)


# ====== Backbones ===================================================================================
class RawPixels(nn.Module):
    """The floor: patchified, normalised RGB as 'features' with DINO's interface.
    Patch tokens are the 3*p*p pixel values of a patch; the [CLS] slot holds their mean."""

    def __init__(self, patch_size: int = 16):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.patch_size = patch_size
        self.embed_dim = 3 * patch_size * patch_size

    def get_intermediate_layers(self, x, n: int = 1):  # -> [(B, 1+N, 3*p*p)], one "block" only
        tokens = F.unfold(x, self.patch_embed.patch_size, stride=self.patch_embed.patch_size).transpose(1, 2)
        return [torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)]

    def forward(self, x):  # -> (B, 3*p*p)
        return self.get_intermediate_layers(x)[0][:, 0]


def vit_archs() -> dict:
    """ViT constructors: VIT_ARCHS if set, else those of the first method module defining vit_small/vit_base."""
    if not VIT_ARCHS:
        for name in METHOD_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "vit_small") and hasattr(module, "vit_base"):
                VIT_ARCHS.update({a: getattr(module, a) for a in ("vit_demo", "vit_tiny", "vit_small", "vit_base")
                                  if hasattr(module, a)})
                break
    return VIT_ARCHS


def build_arch(arch: str, patch_size: int) -> nn.Module:
    if arch == "pixels":
        return RawPixels(patch_size)
    archs = vit_archs()
    if arch not in archs:
        raise ValueError(f"--arch {arch}: unknown; available: {sorted(archs) + ['pixels']} "
                         f"(ViTs come from the first importable of {METHOD_MODULES})")
    return archs[arch](patch_size=patch_size)


def load_backbone(ckpt=None, arch="vit_small", patch_size=16, random_init=False) -> nn.Module:
    """A frozen backbone in eval mode.
    ckpt of this repo (has "method"): built by `<method>.build_backbone(ckpt["args"])`, loaded strictly
    from the `backbone.` keys of ckpt["teacher"] (else ckpt["model"]). Any other ckpt is an official
    DINO file: a plain ViT state dict or a dict with teacher/student/model, `module.`/`backbone.`
    stripped, head keys dropped, built as --arch/--patch-size. random_init skips the loading."""
    if ckpt is None:
        if not random_init and arch != "pixels":
            raise ValueError("no --ckpt given: pass one, or --random-init (or --arch pixels) for a floor")
        return build_arch(arch, patch_size).eval()
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--ckpt {ckpt}: cannot be read as a checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "method" in state:
        net = importlib.import_module(state["method"]).build_backbone(state["args"])
        if not random_init:
            weights = state.get("teacher") or state["model"]
            net.load_state_dict({k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")})
        return net.eval()
    net = build_arch(arch, patch_size)
    if not random_init:
        for key in ("teacher", "student", "model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
        state = {re.sub(r"^(module\.)?(backbone\.)?", "", k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # DINO's projection head
        net.load_state_dict(state, strict=True)
    return net.eval()


def patch_size_of(backbone) -> int:
    return int(backbone.patch_embed.patch_size)


# ====== Transforms and feature extraction (uint8 images from data.py -> normalised floats) ==========
def normalize(img: torch.Tensor) -> torch.Tensor:  # uint8 (..., 3, H, W) -> float
    return TF.normalize(img.float() / 255, MEAN, STD)


class ClassifyTransform:
    """DINO's eval transform: resize to size*256/224 (bicubic), centre crop to size."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        img = TF.resize(img, int(self.size * 256 / 224), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return normalize(TF.center_crop(img, self.size))


class SegTransform:
    """Image (bilinear) and mask (nearest) resized to size x size, as in Leopart's linear probe."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img, mask):
        img = TF.resize(img, [self.size, self.size], antialias=True)
        mask = F.interpolate(mask[None, None].float(), size=(self.size, self.size), mode="nearest-exact")[0, 0]
        return normalize(img), mask.to(torch.uint8)


def token_grid(n: int, height: int, width: int) -> tuple:
    """(h, w) with h*w = n closest to the image's aspect (exact for a ViT: H/p, W/p)."""
    h = max(1, round(math.sqrt(n * height / width)))
    while n % h:
        h -= 1
    return h, n // h


@torch.no_grad()
def extract(backbone, loader, device, n_last_blocks=1, patch_tokens=False):
    """Frozen features of a loader of (images, targets): (features, targets).
    [CLS] of the last n blocks -> (N, n, D) float32 (a conv backbone gives n = 1), or with patch_tokens
    the last block's patch tokens as maps (N, D, h, w) in float16 (the segmentation probes' cache)."""
    feats, targets = [], []
    for images, y in loader:
        layers = backbone.get_intermediate_layers(images.to(device), n_last_blocks)
        if patch_tokens:
            h, w = token_grid(layers[-1].shape[1] - 1, *images.shape[-2:])
            feats.append(rearrange(layers[-1][:, 1:], "b (h w) d -> b d h w", h=h, w=w).half().cpu())
        else:
            feats.append(torch.stack([t[:, 0] for t in layers], dim=1).float().cpu())
        targets.append(y)
    return torch.cat(feats), torch.cat(targets)


# ====== Classification: k-NN and linear probe on cached [CLS] features ==============================
@torch.no_grad()
def knn(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200), temperature=0.07,
        chunk=256) -> dict:
    """DINO's weighted k-NN: the k most cosine-similar train samples vote with weight exp(sim / T).
    features (N, D) any scale (L2-normalised here). Returns {"knn/k20/top1": %, "knn/k20/top5": %, ...}."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    out = {}
    for k in ks:
        kk = min(k, len(train))
        top1 = top5 = 0
        for i in range(0, len(test), chunk):
            sim, idx = (test[i:i + chunk] @ train.T).topk(kk, dim=1)
            votes = torch.zeros(len(sim), num_classes, device=sim.device)
            votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
            ranked = votes.argsort(dim=1, descending=True)
            hit = ranked == test_labels[i:i + chunk, None]
            top1 += hit[:, :1].sum().item()
            top5 += hit[:, :min(5, kk)].sum().item()  # DINO: top-5 counts min(5, k) guesses
        out[f"knn/k{k}/top1"] = 100 * top1 / len(test)
        out[f"knn/k{k}/top5"] = 100 * top5 / len(test)
    return out


def _train_linear(x, y, num_classes, lr, epochs, batch_size, seed):
    """DINO's recipe: nn.Linear (weights N(0, 0.01), bias 0), SGD momentum 0.9, no weight decay,
    lr scaled by batch/256, cosine to 0 over the epochs."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


@torch.no_grad()
def _top1(head, x, y) -> float:
    return 100 * (head(x).argmax(1) == y).float().mean().item()


def linear(train_features, train_labels, test_features, test_labels, epochs=100, lrs=(0.001, 0.01, 0.1, 1.0),
           batch_size=256, seed=0) -> dict:
    """Linear probe on cached features (N, D) (for ViTs the [CLS] of the last 4 blocks).
    The learning rate is chosen on a held-out 10% of train (DINO sweeps it too), then the probe
    is retrained on all of train and measured once on test. Returns {"linear/top1", "linear/lr"}."""
    x, y = train_features.float(), train_labels
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    held, fit = perm[:max(1, len(x) // 10)], perm[max(1, len(x) // 10):]
    scores = {lr: _top1(_train_linear(x[fit], y[fit], num_classes, lr, epochs, batch_size, seed), x[held], y[held])
              for lr in lrs}
    best = max(lrs, key=lambda lr: scores[lr])
    head = _train_linear(x, y, num_classes, best, epochs, batch_size, seed)
    return {"linear/top1": _top1(head, test_features.float(), test_labels), "linear/lr": best}


# ====== Clustering: k-means, matching, mIoU, NMI, Hungarian accuracy ================================
def _nearest(x, centroids, chunk=16384):
    """Squared distance to, and index of, the nearest centroid for every row of x."""
    c_sq = (centroids * centroids).sum(1)
    dists, labels = [], []
    for xb in x.split(chunk):
        d = (xb * xb).sum(1, keepdim=True) - 2 * (xb @ centroids.T) + c_sq
        m, a = d.min(1)
        dists.append(m.clamp_min(0))
        labels.append(a)
    return torch.cat(dists), torch.cat(labels)


def _kmeans_pp(x, k, g):
    """k-means++ seeding: each new centre drawn with probability proportional to D(x)^2."""
    x_sq = (x * x).sum(1)
    centres = [x[torch.randint(len(x), (1,), generator=g, device=g.device).to(x.device)][0]]
    d2 = (x_sq - 2 * (x @ centres[0]) + centres[0] @ centres[0]).clamp_min(0)
    for _ in range(1, k):
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        c = x[torch.multinomial(weights, 1, generator=g).to(x.device)][0]
        centres.append(c)
        d2 = torch.minimum(d2, (x_sq - 2 * (x @ c) + c @ c).clamp_min(0))
    return torch.stack(centres)


@torch.no_grad()
def kmeans(x, k, iters=100, restarts=3, seed=0, tol=1e-4):
    """Lloyd's k-means in torch on x's device, k-means++ init, best of `restarts` by inertia.
    x (N, D) float -> (labels (N,) int64, centroids (k, D)). Distances are computed in chunks."""
    x = x.float()
    k = min(k, len(x))
    g = torch.Generator(device=x.device).manual_seed(seed)
    best = None
    for _ in range(restarts):
        centroids = _kmeans_pp(x, k, g)
        previous = float("inf")
        for _ in range(iters):
            dists, labels = _nearest(x, centroids)
            inertia = dists.sum().item()
            counts = torch.bincount(labels, minlength=k)
            centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / counts.clamp_min(1)[:, None].float()
            empty = (counts == 0).nonzero().flatten()
            if len(empty):  # re-seed empty clusters at the worst-fitted points
                centroids[empty] = x[dists.topk(len(empty)).indices]
            if previous - inertia <= tol * previous:
                break
            previous = inertia
        dists, labels = _nearest(x, centroids)
        if best is None or dists.sum().item() < best[0]:
            best = (dists.sum().item(), labels, centroids)
    return best[1], best[2]


def confusion(pred, true, num_pred, num_true, ignore=255) -> torch.Tensor:
    """(num_pred, num_true) counts of (prediction, ground truth) pairs; `ignore` in true is skipped."""
    pred, true = pred.flatten().long(), true.flatten().long()
    keep = true != ignore
    idx = pred[keep] * num_true + true[keep]
    return torch.bincount(idx.cpu(), minlength=num_pred * num_true).view(num_pred, num_true)


def match_clusters(conf, many_to_one=False) -> torch.Tensor:
    """cluster -> class (-1 = unmatched) from a (clusters, classes) confusion: Hungarian (one-to-one,
    scipy's linear_sum_assignment maximising overlap) or many-to-one (each cluster to its majority class)."""
    if many_to_one:
        return conf.argmax(1)
    rows, cols = linear_sum_assignment(conf.numpy(), maximize=True)
    mapping = torch.full((conf.shape[0],), -1, dtype=torch.long)
    mapping[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return mapping


def miou(conf, mapping=None) -> float:
    """Mean IoU (%) over classes that occur (in ground truth or prediction). conf (P, C): rows are
    predictions; `mapping` (P,) sends each prediction row to a class, -1 = no class (a miss)."""
    num_classes = conf.shape[1]
    if mapping is not None:
        merged = torch.zeros(num_classes + 1, num_classes, dtype=conf.dtype)
        conf = merged.index_add_(0, mapping.clamp(min=-1) % (num_classes + 1), conf)
    conf = conf.double()
    tp = conf[:num_classes].diagonal()
    union = conf[:num_classes].sum(1) + conf.sum(0) - tp
    return 100 * (tp[union > 0] / union[union > 0]).mean().item()


def nmi(pred, true) -> float:
    """Normalised mutual information (%) with the arithmetic-mean normaliser (sklearn's default)."""
    pred, true = torch.as_tensor(pred).flatten().long(), torch.as_tensor(true).flatten().long()
    _, pred = pred.unique(return_inverse=True)
    _, true = true.unique(return_inverse=True)
    joint = confusion(pred, true, int(pred.max()) + 1, int(true.max()) + 1, ignore=-1).double()
    joint /= joint.sum()
    p, t = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (p[:, None] * t[None, :])[nz]).log()).sum()
    h_p, h_t = -(p[p > 0] * p[p > 0].log()).sum(), -(t[t > 0] * t[t > 0].log()).sum()
    return 100.0 if h_p + h_t == 0 else (100 * mi / ((h_p + h_t) / 2)).item()


def cluster_accuracy(pred, true) -> float:
    """Accuracy (%) after the best one-to-one cluster -> class map (Hungarian)."""
    pred, true = torch.as_tensor(pred).flatten().long(), torch.as_tensor(true).flatten().long()
    conf = confusion(pred, true, int(pred.max()) + 1, int(true.max()) + 1, ignore=-1)
    rows, cols = linear_sum_assignment(conf.numpy(), maximize=True)
    return 100 * conf[rows, cols].sum().item() / len(true)


# ====== Segmentation probes on cached patch tokens (N, D, h, w) and masks (N, H, W), 255 ignored =====
def seg_linear(train_features, train_masks, val_features, val_masks, num_classes, epochs=20, lr=1e-2,
               batch_size=16, device="cpu", seed=0) -> dict:
    """A 1x1 conv on frozen patch tokens, logits bilinearly upsampled to the mask, cross-entropy with
    255 ignored (AdamW + cosine: our choice). Returns {"seg_linear/miou": %, "seg_linear/pixel_acc": %}."""
    torch.manual_seed(seed)
    head = nn.Conv2d(train_features.shape[1], num_classes, 1).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(train_features) / batch_size))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_features), generator=g).split(batch_size):
            logits = head(train_features[idx].to(device).float())
            logits = F.interpolate(logits, size=train_masks.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, train_masks[idx].to(device).long(), ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for f, m in zip(val_features.split(batch_size), val_masks.split(batch_size)):
            logits = F.interpolate(head(f.to(device).float()), size=m.shape[-2:], mode="bilinear",
                                   align_corners=False)
            conf += confusion(logits.argmax(1).cpu(), m, num_classes, num_classes)
    pixel_acc = 100 * conf.diagonal().sum().item() / conf.sum().item()
    return {"seg_linear/miou": miou(conf), "seg_linear/pixel_acc": pixel_acc}


def _cluster_confusion(labels, masks, k, num_classes, chunk=64):
    """Upsample (N, h, w) cluster maps to the masks (nearest) and count against them, in chunks."""
    conf = torch.zeros(k, num_classes, dtype=torch.long)
    for lab, m in zip(labels.split(chunk), masks.split(chunk)):
        up = F.interpolate(lab[:, None].float(), size=m.shape[-2:], mode="nearest")[:, 0].long()
        conf += confusion(up, m, k, num_classes)
    return conf


def seg_cluster(features, masks, num_classes, ks=(100, 300, 500), restarts=3, device="cpu", seed=0,
                foreground=True, background=0) -> dict:
    """Unsupervised segmentation by k-means on L2-normalised patch tokens of the whole set.
    K = num_classes matched one-to-one (Hungarian); each K in ks matched many-to-one (overclustering);
    foreground-only: k-means on the patches mostly covered by foreground classes (ground truth),
    K = num_classes - 1, Hungarian, mIoU over the foreground classes with background pixels ignored."""
    n, d, h, w = features.shape
    x = F.normalize(rearrange(features, "n d h w -> (n h w) d").float(), dim=1).to(device)
    out = {}
    for k, many in [(num_classes, False)] + [(k, True) for k in ks]:
        labels = kmeans(x, k, restarts=restarts, seed=seed)[0].cpu().view(n, h, w)
        conf = _cluster_confusion(labels, masks, min(k, len(x)), num_classes)
        out[f"seg_cluster/k{k}" + ("_many_to_one" if many else "_hungarian")] = miou(conf, match_clusters(conf, many))
    if foreground and num_classes > 2:
        is_fg, valid = ((masks != background) & (masks != 255)).float(), (masks != 255).float()
        pool = lambda m: F.adaptive_avg_pool2d(m[:, None], (h, w))[:, 0]  # noqa: E731
        fg = (pool(is_fg) > 0.5 * pool(valid)).flatten()  # patches mostly covered by foreground
        if fg.sum() > num_classes:
            fg_labels = kmeans(x[fg.to(device)], num_classes - 1, restarts=restarts, seed=seed)[0].cpu()
            labels = torch.full((n * h * w,), num_classes - 1, dtype=torch.long)  # extra row: "no cluster"
            labels[fg] = fg_labels
            fg_masks = masks.clone()
            fg_masks[fg_masks == background] = 255
            conf = _cluster_confusion(labels.view(n, h, w), fg_masks, num_classes, num_classes)
            mapping = torch.full((num_classes,), -1, dtype=torch.long)
            mapping[:-1] = match_clusters(conf[:-1, 1:]) + 1  # clusters <-> foreground classes only
            mapping[mapping == 0] = -1
            out[f"seg_cluster/fg_k{num_classes - 1}_hungarian"] = miou(conf, mapping)
    return out


# ====== Fully unsupervised segmentation (Leopart, Ziegler & Asano, CVPR 2022, Sec. 4.4) ============
# Cluster-based foreground extraction (CBFE), then k-means on the foreground and community
# detection merging the clusters into K classes: no label is used but to pick one threshold.
@torch.no_grad()
def dense_features(backbone, images, batch_size=32):
    """images (N, 3, S, S) normalised -> last-block patch tokens (N, h, w, D) and head-averaged [CLS]
    attention (N, h, w). One pass where the ViT offers `forward_tokens` (leopart.py's), else DINO's
    get_intermediate_layers + get_last_selfattention."""
    p = patch_size_of(backbone)
    device = next(backbone.parameters()).device
    tokens, attns = [], []
    for x in images.split(batch_size):
        h, w, x = x.shape[-2] // p, x.shape[-1] // p, x.to(device)
        if hasattr(backbone, "forward_tokens"):
            t, a = backbone.forward_tokens(x, return_attention=True)
        else:
            t, a = backbone.get_intermediate_layers(x, 1)[0], backbone.get_last_selfattention(x)
        tokens.append(rearrange(t[:, 1:], "b (h w) d -> b h w d", h=h, w=w).float().cpu())
        attns.append(rearrange(a[:, :, 0, 1:].mean(1), "b (h w) -> b h w", h=h, w=w).float().cpu())
    return torch.cat(tokens), torch.cat(attns)


def standardise_and_pca(x, dim=50):
    """(N, D) -> (N, min(dim, D)): per-dimension standardisation then PCA, as the paper's pipeline.
    Exact PCA (eigenvectors of the D x D covariance), so that the result depends on x alone
    (torch.pca_lowrank draws random projections from the global generator)."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    _, vectors = torch.linalg.eigh((x.T.double() @ x.double()) / len(x))  # eigenvalues ascending
    return x @ vectors[:, -min(dim, x.shape[1]):].flip(1).to(x.dtype)


def cooccurrence(clusters, n):
    """clusters (N, h, w) ids < n -> (n, n) row-stochastic: how often cluster j is a neighbour (8
    directions, distances 1 and 2) of cluster i, normalised per image and averaged over the
    images where i occurs (the paper's graph for community detection)."""
    total, appear = np.zeros((n, n)), np.zeros(n)
    offsets = [(dy * s, dx * s) for s in (1, 2) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    for c in clusters.numpy():
        counts = np.zeros((n, n))
        h, w = c.shape
        for dy, dx in offsets:
            a = c[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
            b = c[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
            np.add.at(counts, (a.ravel(), b.ravel()), 1)
        np.fill_diagonal(counts, 0)
        rows = counts.sum(1, keepdims=True)
        total += np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
        appear += rows[:, 0] > 0
    return total / np.maximum(appear, 1)[:, None]


def merge_communities(weights: np.ndarray, num: int) -> np.ndarray:
    """Greedy modularity agglomeration (Clauset-Newman-Moore) of an undirected weighted graph until
    `num` communities remain -> community id per node. Stands in for the paper's Infomap, which
    is not a dependency here; both merge nodes that are densely linked."""
    n = len(weights)
    e = weights / max(weights.sum(), 1e-12)  # fraction of edge weight between communities
    alive, members = list(range(n)), {i: [i] for i in range(n)}
    while len(alive) > num:
        sub = e[np.ix_(alive, alive)]
        a = sub.sum(1)
        gain = 2 * (sub - np.outer(a, a))  # ΔQ of merging two communities
        np.fill_diagonal(gain, -np.inf)
        i, j = np.unravel_index(np.argmax(gain), gain.shape)
        i, j = alive[i], alive[j]
        e[i] += e[j]
        e[:, i] += e[:, j]
        e[j], e[:, j] = 0, 0
        members[i] += members.pop(j)
        alive.remove(j)
    out = np.zeros(n, dtype=np.int64)
    for c, i in enumerate(alive):
        out[members[i]] = c
    return out


def hungarian_miou(pred, gt, num_classes, ignore=255):
    """Best one-to-one matching of predicted ids to classes (both < num_classes) -> mIoU."""
    keep = gt != ignore
    pred, gt = pred[keep].long(), gt[keep].long()
    conf = torch.bincount(gt * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes).double()
    iou = conf / (conf.sum(0, keepdim=True) + conf.sum(1, keepdim=True) - conf).clamp(min=1)
    rows, cols = linear_sum_assignment(-iou.numpy())
    return float(iou[rows, cols].mean()), dict(zip(cols.tolist(), rows.tolist()))


def unsupervised_segmentation(backbone, train_images, val_images, num_classes, foreground, train_masks=None,
                              val_masks=None, k_fg=200, k_community=150, pca_dim=50, edge_threshold=0.09, seed=0):
    """Leopart's label-free pipeline. images (N, 3, S, S) normalised; masks (N, S, S) int64 with 255 =
    ignore (train masks only pick the CBFE precision cut, as the official code does; val masks only
    score). foreground(attn (N, h, w)) -> bool (N, h, w): the noisy foreground from the ViT's [CLS]
    attention (Leopart: leopart.foreground_mask with 65 % of the mass). Returns (val maps (N, S, S)
    of class ids in [0, num_classes), scores: cbfe_fg_fraction, and with val masks cd_miou, cbfe_fg_iou)."""
    kmeans_ids = lambda x, k, seed: kmeans(x, k, seed=seed)[0]  # noqa: E731
    n_train = len(train_images)
    tokens, attn = dense_features(backbone, torch.cat([train_images, val_images]))
    N, h, w, D = tokens.shape
    feats = standardise_and_pca(tokens.reshape(-1, D), pca_dim)
    noisy_fg = foreground(attn).reshape(-1)  # the ViT's attention as noisy foreground

    # 1. CBFE: over-cluster all tokens; a cluster is foreground if, on average over the images it
    #    appears in, most of its tokens fall inside the attention foreground.
    k_fg = min(k_fg, len(feats) // 4)
    clusters = kmeans_ids(F.normalize(feats, dim=1), k_fg, seed).reshape(N, h * w)
    precision = torch.zeros(k_fg)
    seen = torch.zeros(k_fg)
    fg_img = noisy_fg.reshape(N, h * w).float()
    for i in range(N):
        hits = torch.bincount(clusters[i], weights=fg_img[i], minlength=k_fg)
        size = torch.bincount(clusters[i], minlength=k_fg).float()
        precision += torch.where(size > 0, hits / size.clamp(min=1), torch.zeros(()))
        seen += size > 0
    precision = precision / seen.clamp(min=1)
    order = precision.argsort()
    cut = int(0.65 * k_fg)  # the official search range is 55-75 % of clusters to background
    if train_masks is not None:  # pick the cut that best matches train foreground, rounded to 0.05
        gt_fg = F.interpolate((train_masks[:, None] > 0).float() * (train_masks[:, None] != 255).float(), (h, w))
        best = -1.0
        for start in range(int(0.55 * k_fg), max(int(0.75 * k_fg), int(0.55 * k_fg) + 1)):
            fg = torch.isin(clusters[:n_train], order[start:]).reshape(n_train, 1, h, w).float()
            iou = ((fg * gt_fg).sum() / ((fg + gt_fg) > 0).sum().clamp(min=1)).item()
            if iou > best:
                best, threshold = iou, round(float(precision[order[start]]) * 20) / 20
        cut = int((precision[order] < threshold).sum())
    fg = torch.isin(clusters, order[cut:]).reshape(-1)

    # 2. Cluster the foreground only; background becomes one more node.
    k_community = min(k_community, max(int(fg.sum()) // 4, num_classes))
    fine = torch.full((N * h * w,), k_community, dtype=torch.long)
    fine[fg] = kmeans_ids(feats[fg], k_community, seed)
    fine = fine.reshape(N, h, w)

    # 3. Community detection on the co-occurrence graph merges the k+1 clusters into num_classes.
    co = cooccurrence(fine, k_community + 1)
    weights = np.minimum(co, co.T) * ((co >= edge_threshold) & (co.T >= edge_threshold))
    community = torch.from_numpy(merge_communities(weights, num_classes))
    merged = community[fine]  # (N, h, w)

    scores = {"cbfe_fg_fraction": float(fg.float().mean())}
    S = val_images.shape[-1]
    val_maps = F.interpolate(merged[n_train:, None].float(), size=(S, S), mode="nearest")[:, 0].long()
    if val_masks is not None:
        scores["cd_miou"], match = hungarian_miou(val_maps, val_masks, num_classes)
        scores["cd_miou"] *= 100  # a percentage, as every score of this file
        val_maps = torch.tensor([match.get(i, 0) for i in range(num_classes)])[val_maps]  # ids -> matched classes
        fg_val = F.interpolate(fg.reshape(N, 1, h, w)[n_train:].float(), size=(S, S))[:, 0] > 0
        gt_val = (val_masks > 0) & (val_masks != 255)
        scores["cbfe_fg_iou"] = 100 * float((fg_val & gt_val).sum() / (fg_val | gt_val).sum().clamp(min=1))
    return val_maps, scores


# ====== DAVIS: J, F and label propagation ===========================================================
def j_measure(pred, gt, void=None) -> float:
    """Region similarity: IoU of two binary masks (1 when both are empty), void pixels excluded."""
    keep = torch.ones_like(gt, dtype=torch.bool) if void is None else ~void
    inter, union = (pred & gt & keep).sum().item(), ((pred | gt) & keep).sum().item()
    return 1.0 if union == 0 else inter / union


def boundary_map(mask) -> torch.Tensor:
    """1-pixel boundary of a binary mask as the DAVIS toolkit draws it (seg2bmap at full size):
    a pixel is boundary when it differs from its right, lower or lower-right neighbour."""
    m = mask.bool()
    right, down, diag = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
    right[:, :-1], down[:-1, :], diag[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
    b = (m ^ right) | (m ^ down) | (m ^ diag)
    b[-1, :] = m[-1, :] ^ right[-1, :]
    b[:, -1] = m[:, -1] ^ down[:, -1]
    b[-1, -1] = False
    return b


def _dilate(b, radius: int):
    """Binary dilation with a disk of the given radius (skimage.morphology.disk)."""
    r = torch.arange(-radius, radius + 1)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()
    return F.conv2d(b[None, None].float(), disk[None, None], padding=radius)[0, 0] > 0


def f_measure(pred, gt, void=None, bound_th=0.008) -> float:
    """Boundary F-measure (DAVIS): boundaries matched within bound_th * image diagonal (pixels if >= 1)."""
    if void is not None:
        pred, gt = pred & ~void, gt & ~void
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape)))
    pb, gb = boundary_map(pred), boundary_map(gt)
    n_p, n_g = pb.sum().item(), gb.sum().item()
    if n_p == 0 or n_g == 0:  # the toolkit's conventions for empty boundaries
        precision, recall = (1.0, 0.0) if n_g else ((0.0, 1.0) if n_p else (1.0, 1.0))
    else:
        precision = (pb & _dilate(gb, radius)).sum().item() / n_p
        recall = (gb & _dilate(pb, radius)).sum().item() / n_g
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def davis_size(height, width, short_side=480, multiple=64) -> tuple:
    """DINO's frame size: short side -> short_side, long side scaled and floored to a multiple of 64."""
    if height > width:
        return int(short_side * height / width // multiple * multiple), short_side
    return short_side, int(short_side * width / height // multiple * multiple)


@torch.no_grad()
def propagate_video(backbone, frames, first_mask, device="cpu", short_side=480, multiple=64, n_last_frames=7,
                    topk=5, neighbourhood=12, temperature=0.1) -> torch.Tensor:
    """Semi-supervised VOS by label propagation (DINO). frames uint8 (T, 3, H, W), first_mask int64 (H, W)
    with ids 0..C-1 -> predicted ids (T, H, W). Each frame's labels are the top-k affinity-weighted
    labels of the first frame and the n_last_frames previous (soft) predictions, within a window."""
    T, _, H, W = frames.shape
    th, tw = davis_size(H, W, short_side, multiple)
    p = patch_size_of(backbone)
    h, w = th // p, tw // p
    first_mask = torch.where(first_mask == 255, 0, first_mask)
    num_ids = int(first_mask.max()) + 1
    # nearest-exact samples pixel centres like PIL's NEAREST, which DINO's read_seg uses
    small = F.interpolate(first_mask[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].long()
    first_seg = F.one_hot(small.flatten(), num_ids).T.float().to(device)  # (C, h*w)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    yy, xx = yy.flatten(), xx.flatten()
    window = ((yy[:, None] - yy[None]).abs() <= neighbourhood) & ((xx[:, None] - xx[None]).abs() <= neighbourhood)
    window = window.to(device).float()  # (queries, sources)

    def features(t):  # L2-normalised last-block patch tokens (h*w, D)
        x = normalize(TF.resize(frames[t], [th, tw], antialias=True))[None].to(device)
        return F.normalize(backbone.get_intermediate_layers(x, 1)[0][0, 1:], dim=1)

    first_feat, context = features(0), []
    preds = [first_mask]
    for t in range(1, T):
        feat = features(t)
        src_feats = torch.stack([first_feat] + [f for f, _ in context])  # (n, h*w, D)
        src_segs = torch.cat([first_seg] + [s for _, s in context], dim=1)  # (C, n*h*w)
        aff = torch.exp(torch.einsum("qd,nsd->nsq", feat, src_feats) / temperature) * window.T[None]
        aff = aff.reshape(-1, h * w)  # (n*h*w sources, h*w queries)
        kth = aff.topk(topk, dim=0).values[-1]  # keep each query's top-k sources over all context frames
        aff = torch.where(aff >= kth[None], aff, torch.zeros_like(aff))
        seg = src_segs @ (aff / aff.sum(0, keepdim=True).clamp_min(1e-12))  # (C, h*w)
        context = (context + [(feat, seg)])[-n_last_frames:]
        up = F.interpolate(seg.view(1, num_ids, h, w), scale_factor=p, mode="bilinear", align_corners=False)[0]
        lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
        up = torch.where(hi > 0, (up - lo) / (hi - lo).clamp_min(1e-12), up)  # DINO's norm_mask per id
        label = up.argmax(0).float()[None, None]
        preds.append(F.interpolate(label, size=(H, W), mode="nearest-exact")[0, 0].long().cpu())
    return torch.stack(preds)


def save_palette_png(path, mask, palette=None):
    from PIL import Image
    img = Image.fromarray(mask.to(torch.uint8).numpy(), mode="P")
    if palette is None:
        import data
        palette = data.voc_palette()
    img.putpalette(list(palette))
    img.save(path)


def propagate(backbone, videos, device="cpu", out_dir=None, max_frames=None, **kwargs) -> dict:
    """DAVIS-2017 semi-supervised evaluation over DAVIS items (dicts with name, frames, masks, palette).
    J and F per object averaged over the annotated frames 1..T-2 (the toolkit skips the first and last), then over
    objects; J&F their mean; all in %. Writes the palette PNGs to out_dir/<name>/ when given.
    max_frames: only the first frames of each video (quick demos; the benchmark uses all)."""
    js, fs = [], []
    for video in videos:
        masks, frames = video["masks"][:max_frames], video["frames"][:max_frames]
        pred = propagate_video(backbone, frames, masks[0], device=device, **kwargs)
        if out_dir:
            os.makedirs(os.path.join(out_dir, video["name"]), exist_ok=True)
            for t, m in enumerate(pred):
                save_palette_png(os.path.join(out_dir, video["name"], f"{t:05d}.png"), m, video.get("palette"))
        last = len(masks) - 1 if len(masks) > 2 else len(masks)
        frames = [t for t in range(1, last) if (masks[t] != 255).any()]  # frames with an annotation
        for obj in masks[0].unique().tolist():
            if obj in (0, 255):
                continue
            js.append(np.mean([j_measure(pred[t] == obj, masks[t] == obj, masks[t] == 255) for t in frames]))
            fs.append(np.mean([f_measure(pred[t] == obj, masks[t] == obj, masks[t] == 255) for t in frames]))
    j, f = 100 * float(np.mean(js)), 100 * float(np.mean(fs))
    return {"davis/J": j, "davis/F": f, "davis/J&F": (j + f) / 2}


# ====== In-context classification (Frozen / SeCAt): generate(images, texts) -> str ==================
def normalise_answer(text: str) -> str:
    """The generated name up to the first sentence end, lower-cased, punctuation dropped."""
    text = re.split(r"[.\n]", text.strip(), maxsplit=1)[0].lower()
    return " ".join(text.translate(str.maketrans("", "", string.punctuation)).split())


def _by_class(dataset) -> dict:  # class -> indices of its images
    samples = dataset.samples if hasattr(dataset, "samples") else [dataset[i] for i in range(len(dataset))]
    by_class = defaultdict(list)
    for i, (_, y) in enumerate(samples):
        by_class[y].append(i)
    return by_class


# Nonsense class words for the open-ended setting, by position in the episode: Frozen (Tsimpoukelli et al. 2021)
# names "dax" and "blicket"; the other three are as we recall its 5-way files, not verified here
FROZEN_WORDS = ("dax", "blicket", "slation", "perpo", "shously")


def icl_episode(dataset, by_class, n, k, seed, task_induction=False, open_ended=False, repeats=0) -> tuple:
    """One episode of `icl` from its seed (any hashable): n classes, k support images each in shuffled
    order (the whole support shown 1 + repeats times: Frozen's "repeats"), then a query of one of them.
    open_ended: the n classes are called FROZEN_WORDS[:n] instead of their names (Frozen's Open-Ended
    miniImageNet, episode_names); task_induction: "Answer with a or b." before the question. Returns
    (images, texts, the n classes, the query's class)."""
    eligible = sorted(c for c, idx in by_class.items() if len(idx) > k)
    if len(eligible) < n:
        raise ValueError(f"icl: {n}-way {k}-shot needs {n} classes with > {k} images, have {len(eligible)}")
    if open_ended and n > len(FROZEN_WORDS):
        raise ValueError(f"icl: open-ended {n}-way needs {n} nonsense words, Frozen's list has {len(FROZEN_WORDS)}")
    rng = random.Random(seed)
    classes = rng.sample(eligible, n)
    names = episode_names(dataset, classes, open_ended)
    target = rng.choice(classes)
    picks = {c: rng.sample(by_class[c], k + (c == target)) for c in classes}
    query = picks[target].pop()
    support = [(i, c) for c in classes for i in picks[c]]
    rng.shuffle(support)
    support = support * (1 + repeats)
    prompt = "What is this? This is a"
    if task_induction:
        prompt = f"Answer with {' or '.join(names[c] for c in rng.sample(classes, n))}. " + prompt
    images = [dataset[i][0] for i, _ in support] + [dataset[query][0]]
    return images, [f"This is a {names[c]}." for _, c in support] + [prompt], classes, target


def episode_names(dataset, classes, open_ended=False) -> dict:  # class -> the name an episode calls it
    return dict(zip(classes, FROZEN_WORDS)) if open_ended else {c: dataset.classes[c] for c in classes}


def _icl_scores(key, answers, truths, context_names, n) -> dict:
    """Accuracy (exact match after normalise_answer), its 95 % interval, chance and `_in_context`, in %."""
    acc = sum(normalise_answer(a) == normalise_answer(t) for a, t in zip(answers, truths)) / len(answers)
    in_context = sum(normalise_answer(a) in {normalise_answer(x) for x in names}
                     for a, names in zip(answers, context_names)) / len(answers)
    return {key: 100 * acc, key + "_ci95": 100 * 1.96 * math.sqrt(acc * (1 - acc) / len(answers)),
            key + "_chance": 100 / n, key + "_in_context": 100 * in_context}


def _settings(task_induction, repeats):  # (task induction?, repeats, key suffix) for every combination asked
    tis = [task_induction] if isinstance(task_induction, bool) else task_induction
    reps = [repeats] if isinstance(repeats, int) else repeats
    return [(ti, r, ("_induction" if ti else "") + (f"_{r}repeats" if r else "")) for ti in tis for r in reps]


def icl(generate, dataset, ways=(2, 5), shots=(1, 3, 5), episodes=100, seed=0, task_induction=(False, True),
        repeats=0, open_ended=False) -> dict:
    """Open-ended N-way K-shot classification, exact match (Frozen's protocol), with the classes' real
    names, or with Frozen's fixed nonsense words (open_ended: "dax", "blicket", ... by position).
    An episode draws N classes, K support images each and one query from one of them (fixed seed per
    episode, so every model sees the same episodes, with and without task induction). generate(images,
    texts) gets the support images in shuffled order and the query, with texts[i] the text after
    images[i]: "This is a <name>." for supports and "What is this? This is a" (preceded by "Answer with
    a or b." with task induction) after the query. Keys "icl/2way_1shot" (+ "_induction", "_3repeats"):
    accuracy, its 95% interval (normal approximation) and chance, in %, and `_in_context`: how often
    the answer is one of the episode's names, right or wrong. With features that cannot tell the
    classes apart, accuracy is at most about in_context / N."""
    by_class = _by_class(dataset)
    out = {}
    for n in ([ways] if isinstance(ways, int) else ways):
        for k in ([shots] if isinstance(shots, int) else shots):
            for ti, r, suffix in _settings(task_induction, repeats):
                answers, truths, context = [], [], []
                for e in range(episodes):
                    images, texts, classes, target = icl_episode(
                        dataset, by_class, n, k, f"icl-{seed}-{n}-{k}-{e}", ti, open_ended, r)
                    names = episode_names(dataset, classes, open_ended)
                    answers.append(generate(images, texts))
                    truths.append(names[target])
                    context.append(names.values())
                out.update(_icl_scores(f"icl/{n}way_{k}shot{suffix}", answers, truths, context, n))
    return out


def frozen_episodes(folder, ways, shots) -> list:
    """Frozen's released episodes (Tsimpoukelli et al. 2021; https://fh295.github.io/frozen.html:
    open_ended_mi.tar.gz = Open-Ended miniImageNet, real_name_mi.tar.gz = Real-Name miniImageNet; extract
    with tar -xzf). Layout as documented there: folder/<task>_shots_<k>_ways_<n>_all_questions.json, a
    JSON list with one dict per question: image_1 .. image_<n*k> (jpg file names in folder, in support
    order), caption_1 .. ("This is a dax."), question_image, question, answer (the key names as read by
    public loaders of these files; not confirmed against the files here). Returns those dicts."""
    files = sorted(glob.glob(os.path.join(folder, f"*_shots_{shots}_ways_{ways}_all_questions.json")))
    if not files:
        raise ValueError(f"{folder}: no *_shots_{shots}_ways_{ways}_all_questions.json (Frozen's episode files)")
    with open(files[0]) as f:
        return json.load(f)


def icl_frozen(generate, folder, ways=(2, 5), shots=(1, 3, 5), task_induction=(False, True), repeats=0,
               episodes=None) -> dict:
    """`icl` on Frozen's fixed episodes (frozen_episodes): the file's captions as they are, the question
    followed by " This is a" as the prompt (our assumption of Frozen's "Q: What is this? A: This is a"),
    "Answer with a or b." (names read off the captions) before it with task induction, the support
    repeated as in `icl`. Keys "frozen/2way_1shot" and the rest as in `icl`. episodes: the first so many."""
    import data
    out = {}
    for n in ([ways] if isinstance(ways, int) else ways):
        for k in ([shots] if isinstance(shots, int) else shots):
            questions = frozen_episodes(folder, n, k)[:episodes]
            for ti, r, suffix in _settings(task_induction, repeats):
                answers, truths, context = [], [], []
                for q in questions:
                    captions = [q[f"caption_{i}"] for i in range(1, n * k + 1)]
                    names = sorted({re.sub(r"^this is an? ", "", c.strip().rstrip(".").lower()) for c in captions})
                    prompt = (q.get("question") or "What is this?").strip() + " This is a"
                    if ti:
                        prompt = f"Answer with {' or '.join(random.Random(str(q.get('question_id'))).sample(names, len(names)))}. " + prompt
                    files = [q[f"image_{i}"] for i in range(1, n * k + 1)] * (1 + r) + [q["question_image"]]
                    answers.append(generate([data.load_image(os.path.join(folder, f)) for f in files],
                                            captions * (1 + r) + [prompt]))
                    truths.append(q["answer"])
                    context.append(names)
                out.update(_icl_scores(f"frozen/{n}way_{k}shot{suffix}", answers, truths, context, n))
    return out


def read_class_names(path) -> dict:
    """folder name (an ImageNet wnid) -> class name, from a file the user passes: JSON {wnid: name} or
    lines "n01532829 house finch, linnet" (ImageNet's LOC_synset_mapping.txt); the first name is kept."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    pairs = (line.strip().split(maxsplit=1) for line in text.splitlines() if line.strip())
    return {p[0]: p[1].split(",")[0].strip() for p in pairs if len(p) == 2}


def feature_ceiling(features, labels, trials=2000, seed=0) -> float:
    """2-way 1-shot accuracy of frozen features alone, in %: how often the query's cosine-nearest support
    is of its class. What a perfect reader of the context could reach with this encoder. (N, F), (N,)."""
    f = F.normalize(features.float(), dim=1)
    by_class = [torch.nonzero(labels == c).flatten().tolist() for c in labels.unique().tolist()]
    rng, hits = np.random.default_rng(seed), 0
    for _ in range(trials):
        a, b = rng.choice(len(by_class), 2, replace=False)
        q, same = rng.choice(by_class[a], 2, replace=False)
        hits += float(f[q] @ f[same] > f[q] @ f[rng.choice(by_class[b])])
    return 100 * hits / trials


def run_icl(generate, folder=None, ways=(2, 5), shots=(1, 3, 5), episodes=100, seed=0, class_names=None,
            task_induction=(False, True), repeats=0, frozen=()) -> dict:
    """The open-ended benchmarks a VLM of this repo reports: on an ImageFolder, `icl` with the real class
    names ("real/..."; wnid folders renamed through class_names, read_class_names) and with Frozen's
    nonsense words ("open/..."); on each of Frozen's released episode folders, icl_frozen
    ("<folder name>/frozen/...": every question of the files, as released)."""
    import data
    results = {}
    if folder:
        real = data.ImageFolder(folder)
        if class_names:
            mapping = read_class_names(class_names)
            missing = [c for c in real.classes if c not in mapping]
            if missing:
                raise ValueError(f"{class_names}: no name for the folders {missing[:5]} of {folder}")
            real.classes = [mapping[c] for c in real.classes]
        for kind, open_ended in (("real", False), ("open", True)):
            ok_ways = tuple(n for n in ways if n <= len(real.classes))
            res = icl(generate, real, ok_ways, shots, episodes, seed, task_induction, repeats, open_ended)
            results.update({f"{kind}/{k}": v for k, v in res.items()})
    for path in frozen:
        res = icl_frozen(generate, path, ways, shots, task_induction, repeats)
        results.update({f"{os.path.basename(os.path.normpath(path))}/{k}": v for k, v in res.items()})
    return results


def icl_picture(generate, dataset, path, ways=3, shots=1, seed=0, size=96) -> tuple:
    """One `icl` episode answered by generate, drawn as a strip: each support image with its caption
    under it, then the query with the answer in red. Returns (answer, the query's true name)."""
    from PIL import Image, ImageDraw
    images, texts, _, target = icl_episode(dataset, _by_class(dataset), min(ways, len(dataset.classes)), shots,
                                           f"icl-picture-{seed}")
    answer = generate(images, texts)
    cell_w = size + 40
    sheet = Image.new("RGB", (cell_w * len(images), size + 44), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (im, text) in enumerate(zip(images, texts)):
        sheet.paste(Image.fromarray(torch.as_tensor(im).permute(1, 2, 0).numpy()).resize((size, size)), (j * cell_w + 20, 4))
        is_query = j == len(images) - 1
        lines = ["query", f"-> {answer}"] if is_query else ["This is", text[len("This is "):]]
        for r, line in enumerate(lines):
            draw.text((j * cell_w + 4, size + 8 + 14 * r), line[:22], fill="red" if is_query and r else "black")
    draw.line([((len(images) - 1) * cell_w, 0), ((len(images) - 1) * cell_w, sheet.height)], fill="gray", width=2)
    sheet.save(path)
    return answer, dataset.classes[target]


# ====== Pictures: attention of 3 heads as R, G, B, per-video k-means maps; PNG grids and a GIF ========
COLOURS = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
                       dtype=torch.uint8)


@torch.no_grad()
def viz(backbone, frames, out_dir, name="video", device="cpu", heads=(0, 1, 2), ks=(5, 10), seed=0) -> list:
    """frames uint8 (T, 3, H, W) (cropped to a multiple of the patch size). Writes <name>_grid.png
    (rows: frames, attention of `heads` as R/G/B when the backbone has it, one k-means overlay per k)
    and <name>.gif (the same rows side by side per frame). Returns the written paths."""
    from PIL import Image
    p = patch_size_of(backbone)
    T, _, H, W = frames.shape
    frames = frames[:, :, :H // p * p, :W // p * p]
    H, W = frames.shape[-2:]
    x = normalize(frames).to(device)
    rows = [frames]
    if hasattr(backbone, "get_last_selfattention"):
        attn = backbone.get_last_selfattention(x)[:, :, 0, 1:].float()  # [CLS] -> patches (T, heads, N)
        chosen = [h % attn.shape[1] for h in heads]
        attn = attn[:, chosen].reshape(T, 3, H // p, W // p)
        lo, hi = attn.amin(dim=(2, 3), keepdim=True), attn.amax(dim=(2, 3), keepdim=True)
        attn = (attn - lo) / (hi - lo).clamp_min(1e-12)  # each head stretched to [0, 1] per frame
        rows.append((F.interpolate(attn, scale_factor=p, mode="nearest") * 255).to(torch.uint8).cpu())
    tokens = backbone.get_intermediate_layers(x, 1)[0][:, 1:]
    flat = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=1)
    for k in ks:  # one clustering per video, so that colours are consistent across frames
        labels = kmeans(flat, k, seed=seed)[0].cpu().view(T, 1, H // p, W // p)
        labels = F.interpolate(labels.float(), scale_factor=p, mode="nearest")[:, 0].long()
        colour = COLOURS[labels % len(COLOURS)].permute(0, 3, 1, 2)
        rows.append(((frames.float() + colour.float()) / 2).to(torch.uint8))
    os.makedirs(out_dir, exist_ok=True)
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*H, T*W)
    grid_path, gif_path = os.path.join(out_dir, f"{name}_grid.png"), os.path.join(out_dir, f"{name}.gif")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(grid_path)
    gif = [Image.fromarray(torch.cat([r[t] for r in rows], dim=2).permute(1, 2, 0).numpy()) for t in range(T)]
    gif[0].save(gif_path, save_all=True, append_images=gif[1:], duration=200, loop=0)
    return [grid_path, gif_path]


# ====== Video k-means (TimeT's unsupervised video segmentation): clip-wise and dataset-wise ========
# k-means on the patch features of whole clips, clusters matched to the ground truth by Hungarian
# matching; the official protocol upsamples to pixels before matching.
def cluster_miou(pred: torch.Tensor, truth: torch.Tensor, k: int, num_classes: int) -> float:
    """mIoU (%) of cluster ids `pred` against `truth` (255 ignored) after Hungarian matching."""
    conf = confusion(pred, truth, k, num_classes)
    return miou(conf, match_clusters(conf))


@torch.no_grad()
def clip_features(backbone, frames: torch.Tensor, size: int, device, batch: int = 32):
    """uint8 (T, 3, H, W) -> patch features (T, h, w, D), frames resized to `size` x `size`."""
    x = TF.resize(frames, [size, size], antialias=True)
    x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), MEAN, STD)
    p = backbone.patch_embed.patch_size
    feats = torch.cat([backbone.get_intermediate_layers(x[i:i + batch].to(device), 1)[0][:, 1:].float().cpu() for i in range(0, len(x), batch)])
    return rearrange(feats, "t (h w) d -> t h w d", h=size // p)


def pixel_clusters(feats: torch.Tensor, centroids: torch.Tensor, size: int) -> torch.Tensor:
    """(T, h, w, D) features, (k, D) centroids -> (T, size, size): each pixel's bilinearly
    upsampled feature u goes to its nearest centroid c. argmin |u - c|^2 = argmax u.c - |c|^2/2,
    and u.c is the upsampled patch-level score, so the scores are upsampled, not the features."""
    scores = feats @ centroids.t() - 0.5 * (centroids * centroids).sum(1)  # (T, h, w, k)
    up = F.interpolate(rearrange(scores, "t h w k -> t k h w"), size=(size, size), mode="bilinear", align_corners=False)
    return up.argmax(1)


@functools.lru_cache(maxsize=None)
def synthetic_classes(root: str, name: str) -> torch.Tensor:
    """Instance id -> class id (0 background, 255 kept) of a synthetic-world tour, from its generator."""
    import data
    meta = json.load(open(os.path.join(root, "world.json")))
    tour = data.SyntheticWorld(meta["seed"]).video(meta["videos"].index(name), meta["frames_per_video"], meta["size"])
    lut = torch.tensor([0] + [int(c) + 1 for c in tour["labels"]] + [0] * 255)
    lut[255] = 255
    return lut


@torch.no_grad()
def video_kmeans_miou(backbone, davis_root: str, size: int, device, clip_frames: int = 16, world_root=None):
    """Clip-wise: each clip clustered alone with K = its number of labels, matched alone;
    dataset-wise: all clips' patches clustered together with K = the dataset's number of
    classes, matched once. Labels: DAVIS instance ids (clip-wise) and semantic classes where
    known (synthetic world: from the generator; else the DAVIS ids as given)."""
    import data
    backbone.eval()
    videos = data.DAVIS(davis_root, split="val")
    clip_scores, all_feats, all_truth = [], [], []
    for item in videos:
        frames, masks = item["frames"], item["masks"]
        semantic = synthetic_classes(world_root, item["name"])[masks] if world_root else masks
        feats = clip_features(backbone, frames, size, device)
        masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        semantic = F.interpolate(semantic[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
        for s in range(0, len(frames) - clip_frames + 1, clip_frames):
            f, m = feats[s:s + clip_frames], masks[s:s + clip_frames]
            ids = m[m != 255].unique()
            lut = torch.full((256,), 255, dtype=torch.long)
            lut[ids] = torch.arange(len(ids))
            k = len(ids)
            if k < 2:
                continue
            centroids = kmeans(F.normalize(f.reshape(-1, f.shape[-1]), dim=1), k)[1]
            pred = pixel_clusters(F.normalize(f, dim=-1), centroids, size)
            clip_scores.append(cluster_miou(pred, lut[m], k, k))
            all_feats.append(f)
            all_truth.append(semantic[s:s + clip_frames])
    feats, truth = torch.cat(all_feats), torch.cat(all_truth)
    num_classes = int(truth[truth != 255].max()) + 1
    flat = F.normalize(feats.reshape(-1, feats.shape[-1]), dim=1)
    sample = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:20000]]
    centroids = kmeans(sample, num_classes)[1]
    pred = pixel_clusters(F.normalize(feats, dim=-1), centroids, size)
    return {"video_kmeans/clip_wise_miou": float(np.mean(clip_scores)),
            "video_kmeans/dataset_wise_miou": cluster_miou(pred, truth, num_classes, num_classes)}


# ====== Dataset-level runners (CLI and run_suite share them) ========================================
def _loader(dataset, batch_size, num_workers):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)


def classification(backbone, root, device, benches=("knn", "linear"), image_size=224, batch_size=64,
                   num_workers=0, epochs=100) -> dict:
    """knn and/or linear on an ImageFolder root with train/ and val/ (features extracted once)."""
    import data
    sets = [data.ImageFolder(os.path.join(root, s), ClassifyTransform(image_size)) for s in ("train", "val")]
    (train_x, train_y), (val_x, val_y) = [extract(backbone, _loader(s, batch_size, num_workers), device, 4)
                                          for s in sets]
    out = {}
    train_y, val_y = train_y.to(device), val_y.to(device)
    if "knn" in benches:  # the last block's [CLS]: a DINO ViT's forward output
        out.update(knn(train_x[:, -1].to(device), train_y, val_x[:, -1].to(device), val_y))
    if "linear" in benches:  # DINO: the [CLS] of the last 4 blocks, concatenated
        out.update(linear(train_x.flatten(1).to(device), train_y, val_x.flatten(1).to(device), val_y, epochs=epochs))
    return out


def segmentation(backbone, root, device, benches=("seg-linear", "seg-cluster"), image_size=448, batch_size=16,
                 num_workers=0, epochs=20, ks=(100, 300, 500), restarts=3) -> dict:
    """seg-linear (train -> val) and/or seg-cluster (val) on a VOC-layout root."""
    import data
    val = data.VOCSegmentation(root, "val", SegTransform(image_size))
    val_x, val_y = extract(backbone, _loader(val, batch_size, num_workers), device, patch_tokens=True)
    out = {}
    if "seg-linear" in benches:
        train = data.VOCSegmentation(root, "train", SegTransform(image_size))
        train_x, train_y = extract(backbone, _loader(train, batch_size, num_workers), device, patch_tokens=True)
        out.update(seg_linear(train_x, train_y, val_x, val_y, val.num_classes, epochs=epochs, device=device))
    if "seg-cluster" in benches:
        out.update(seg_cluster(val_x, val_y, val.num_classes, ks=ks, restarts=restarts, device=device))
    return out


def run_suite(backbone, root, benches=("knn", "linear", "seg-linear", "seg-cluster", "propagate"), device="cpu",
              image_size=64, out_dir=None) -> dict:
    """The benchmarks on a synthetic-world root (objects/ for knn/linear, voc/ for seg-*, davis/ for
    propagate) at a small image size, for the method demos' before/after tables: images at image_size,
    video frames at short side 2 * image_size (the synthetic frames are 128 px) and only the first 24
    frames of each video. Prints the table and returns a flat dict of numbers (and "time/<bench>" s)."""
    import data
    backbone = backbone.to(device).eval()
    out = {}
    for group, names in [("cls", ("knn", "linear")), ("seg", ("seg-linear", "seg-cluster")), ("vid", ("propagate",))]:
        chosen = tuple(b for b in benches if b in names)
        if not chosen:
            continue
        start = time.time()
        if group == "cls":
            out.update(classification(backbone, os.path.join(root, "objects"), device, chosen, image_size, epochs=30))
        elif group == "seg":
            out.update(segmentation(backbone, os.path.join(root, "voc"), device, chosen, image_size, epochs=30,
                                    restarts=1))
        else:
            out.update(propagate(backbone, data.DAVIS(os.path.join(root, "davis")), device, out_dir,
                                 max_frames=24, short_side=2 * image_size, multiple=patch_size_of(backbone)))
        out[f"time/{'+'.join(chosen)}"] = time.time() - start
    print_table(out)
    return out


def print_table(results: dict, title=None):
    width = max(len(k) for k in results) if results else 10
    if title:
        print(title)
    for key, value in results.items():
        print(f"  {key:<{width}}  {value:8.2f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


# ====== Command line ================================================================================
BENCHES = ("knn", "linear", "seg-linear", "seg-cluster", "propagate", "icl", "viz", "suite")


def get_args(argv=None):
    p = argparse.ArgumentParser("evaluate.py: DINO-style benchmarks for a frozen backbone",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bench", choices=BENCHES, help="which benchmark; suite = all on a synthetic-world root")
    p.add_argument("--data", required=True, help="ImageFolder root with train/ val/ (knn, linear, icl: val/ only), "
                   "VOC-layout root (seg-*), DAVIS-layout root (propagate), videos (viz), synth root (suite)")
    p.add_argument("--ckpt", default=None, help="checkpoint of a method of this repo, or an official DINO one")
    p.add_argument("--arch", default="vit_small", help="vit_demo|vit_tiny|vit_small|vit_base|pixels, for "
                   "official DINO weights and --random-init without --ckpt; pixels = the raw-RGB floor")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--random-init", action="store_true", help="fresh weights of the same architecture")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size (default: 224 knn/linear, 448 seg-*, 64 suite); propagate uses --short-side")
    p.add_argument("--short-side", type=int, default=480, help="propagate/viz: frame short side (DINO: 480)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--epochs", type=int, default=None, help="probe epochs (default: 100 linear, 20 seg-linear)")
    p.add_argument("--restarts", type=int, default=3, help="seg-cluster: k-means restarts (best inertia kept)")
    p.add_argument("--episodes", type=int, default=100, help="icl episodes per (ways, shots)")
    p.add_argument("--task-induction", nargs="?", const="with", default="both", choices=["without", "with", "both"],
                   help="icl: 'Answer with a or b.' before the question; default: report without and with")
    p.add_argument("--repeats", type=int, nargs="+", default=[0], help="icl: extra times the support is shown (Frozen)")
    p.add_argument("--class-names", default=None, help="icl: file mapping wnid folders to names (JSON, or "
                   "ImageNet's LOC_synset_mapping.txt lines 'n01532829 house finch, linnet')")
    p.add_argument("--frozen", nargs="+", default=[], help="icl: folders of Frozen's released episodes "
                   "(open_ended_mi, real_name_mi from https://fh295.github.io/frozen.html), evaluated as released")
    p.add_argument("--max-videos", type=int, default=3, help="viz: pictures for this many videos")
    p.add_argument("--frames", type=int, default=8, help="viz: frames per video")
    p.add_argument("--output-dir", default="runs/eval", help="propagate: palette PNGs; viz: pictures")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(args):
    torch.manual_seed(args.seed)  # --random-init draws its weights from this seed
    backbone = load_backbone(args.ckpt, args.arch, args.patch_size, args.random_init).to(args.device)
    for param in backbone.parameters():
        param.requires_grad_(False)
    device, size, workers = args.device, args.image_size, args.num_workers
    import data
    if args.bench in ("knn", "linear"):
        results = classification(backbone, args.data, device, (args.bench,), size or 224, args.batch_size, workers,
                                 epochs=args.epochs or 100)
    elif args.bench in ("seg-linear", "seg-cluster"):
        results = segmentation(backbone, args.data, device, (args.bench,), size or 448, args.batch_size, workers,
                               epochs=args.epochs or 20, restarts=args.restarts)
    elif args.bench == "propagate":
        results = propagate(backbone, data.DAVIS(args.data), device, args.output_dir, short_side=args.short_side)
    elif args.bench == "icl":  # the checkpoint's module turns it into a generate(images, texts) -> str
        state = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        module = importlib.import_module(state["method"])
        if not hasattr(module, "build_generator"):
            raise ValueError(f"--ckpt {args.ckpt}: module {state['method']} has no build_generator(ckpt, device)")
        folder = os.path.join(args.data, "val") if os.path.isdir(os.path.join(args.data, "val")) else args.data
        ti = {"without": False, "with": True, "both": (False, True)}[args.task_induction]
        results = run_icl(module.build_generator(state, device), folder, episodes=args.episodes, seed=args.seed,
                          class_names=args.class_names, task_induction=ti, repeats=args.repeats, frozen=args.frozen)
    elif args.bench == "viz":
        paths = []
        for i, video in enumerate(data.find_videos(args.data)[:args.max_videos]):
            n = data.probe_video(video).num_frames
            idx = np.linspace(0, n - 1, min(args.frames, n)).round().astype(int).tolist()
            frames = data.read_frames(video, idx, short_side=args.short_side if size is None else size)
            paths += viz(backbone, frames, args.output_dir, name=f"video{i}", device=device, seed=args.seed)
        print("\n".join(paths))
        results = {"viz/pictures": len(paths)}
    else:
        results = run_suite(backbone, args.data, device=device, image_size=size or 64, out_dir=args.output_dir)
    if args.bench != "suite":
        print_table(results, f"{args.bench}: {args.ckpt or ('random ' if args.random_init else '') + args.arch}")
    print(json.dumps(results))


if __name__ == "__main__":
    main(get_args())
