"""evaluate.py: the benchmarks of the five papers, for any backbone with DINO's interface.

One shared implementation, so that every method of this repo (and the official DINO weights, the baseline)
is measured the same way, as the papers' official evaluation code measures it: PROTOCOLS (below) names the
official script each benchmark follows and what differs, and every JSON printed carries it.
  ImageNet-style, CIFAR, SVHN: knn, linear, linear-probes, nmi.   VOC, ADE20K, COCO: seg-linear, seg-fcn, seg-cluster.
  DAVIS: propagate, video-kmeans.    YouTube-VOS: video-kmeans.    Pictures: viz.    Frozen's icl: run_icl (secat.py).
  unsup-seg (VOC; unsupervised_segmentation, which leopart.py calls): Leopart's CBFE + Infomap community detection.
All scores are percentages (accuracy, mIoU, J, F, NMI). The last line printed is one JSON object.

Sections (in file order; each opens with a "# ====== <name>" line):
  backbones           its own DINO ViT and SeLa's conv nets; load_backbone: released weights, repo checkpoints
  transforms          normalisation and feature extraction ([CLS] and patch tokens, cached)
  classification      k-NN (DINO's, SeLa's), linear probes (cached, DINO's crops on the fly, SeLa's per layer)
  clustering          faiss_kmeans (torch), kmeans, match_clusters (Hungarian on IoU), mIoU, NMI, aNMI, ARI
  segmentation probes seg-linear (Leopart's recipe, or cached tokens), seg-fcn, seg-cluster on patch tokens
  unsupervised seg.   Leopart's CBFE + CD (Infomap community detection), the attention foregrounds
  DAVIS               J, F and label propagation
  in-context          Frozen's open-ended episodes (drawn or as released), task induction, repeats
  pictures            attention maps, k-means overlays, GIFs
  video k-means       TimeT's frame-, clip- and dataset-wise video segmentation (DAVIS, YouTube-VOS)
  runners, CLI        dataset-level runners shared by the CLI and run_suite; the command line
  python evaluate.py knn          --ckpt runs/dora/checkpoint.pth --data /data/imagenet
  python evaluate.py linear       --ckpt dino_deitsmall16_pretrain.pth --arch vit_small --patch-size 16 --data ...
  python evaluate.py seg-cluster  --ckpt ... --data /data/VOCdevkit/VOC2012   (VOC layout, data.py)
  python evaluate.py propagate    --ckpt ... --data /data/DAVIS --output-dir runs/davis
  python evaluate.py video-kmeans --ckpt ... --data /data/youtube-vos/train --mode frame --k 10 --sampling timet
  python evaluate.py unsup-seg    --ckpt ... --data /data/VOCdevkit/VOC2012 --attention <folder of attn_dino_*.pt>
  python evaluate.py suite        --arch vit_demo --random-init --patch-size 8 --data runs/synth  (or --arch pixels)
"""
import argparse
import functools
import glob
import itertools
import json
import math
import os
import random
import re
import string
import time
from collections import OrderedDict, defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from einops import rearrange
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

import data

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ====== Backbones: DINO's ViT, SeLa's conv nets, raw pixels ===========================================
# This file's own ViT (so that it imports no method file) under DINO's parameter names: DINO's releases and every
# ViT of this repo load into it; the conv nets under sinkhorn.py's names.
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def _qkv(self, x):  # (B, N, D) -> (3, B, heads, N, D / heads)
        return rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)

    def forward(self, x):  # (B, N, D) -> (B, N, D), the fused kernel
        return self.proj(rearrange(F.scaled_dot_product_attention(*self._qkv(x)), "b h n d -> b n (h d)"))

    def weights(self, x):  # (B, N, D) -> softmax attention (B, heads, N, N), for pictures
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        hidden = int(dim * mlp_ratio)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), nn.Sequential(OrderedDict(
            fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))  # DINO's Mlp's names

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """DINO's ViT, built and initialised in the method files' order (one seed, the same weights)."""

    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, img_size=224):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.patch_embed = nn.Module()
        self.patch_embed.patch_size = patch_size
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def prepare_tokens(self, x):  # (B, 3, H, W) -> (B, 1+N, D); DINO's bicubic resize of the positions (+0.1)
        B, _, H, W = x.shape
        p, n = self.patch_embed.patch_size, self.pos_embed.shape[1] - 1
        x, pos = self.patch_embed.proj(x).flatten(2).transpose(1, 2), self.pos_embed
        if x.shape[1] != n or H != W:
            side = int(math.sqrt(n))
            grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, scale_factor=((H // p + 0.1) / side, (W // p + 0.1) / side), mode="bicubic")
            pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)], dim=1)
        return torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + pos

    def forward(self, x):  # (B, 3, H, W) -> (B, D)
        return self.get_intermediate_layers(x, 1)[0][:, 0]

    def get_intermediate_layers(self, x, n: int = 1):  # -> n x (B, 1+N, D), each normed
        x, out = self.prepare_tokens(x), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out

    def get_last_selfattention(self, x):  # -> (B, heads, 1+N, 1+N)
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.weights(self.blocks[-1].norm1(x))


VIT_SIZES = {"vit_demo": (192, 4, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6),
             "vit_base": (768, 12, 12)}  # (width, blocks, heads) as in the method files


class ConvBackbone(nn.Module):
    """sinkhorn.py's: a conv trunk (B, 3, H, W) -> (B, C, h, w), an optional MLP on the map max-pooled to 6 x 6.
    forward -> (B, out_dim); get_intermediate_layers -> [(B, 1+h*w, C)], the mean token in the [CLS] slot."""

    def __init__(self, trunk, stride, map_dim, mlp=None, out_dim=None):
        super().__init__()
        self.trunk, self.mlp = trunk, mlp
        self.patch_embed = nn.Module()
        self.patch_embed.patch_size = stride
        self.embed_dim, self.out_dim = map_dim, out_dim or map_dim

    def forward(self, x):
        fmap = self.trunk(x)
        return fmap.mean(dim=(2, 3)) if self.mlp is None else self.mlp(F.adaptive_max_pool2d(fmap, 6).flatten(1))

    def get_intermediate_layers(self, x, n=1):  # one conv stage only, whatever n
        tokens = self.trunk(x).flatten(2).transpose(1, 2)
        return [torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)]


def conv_stages(widths) -> list:  # conv 3x3 + BN + ReLU per width, a 2x2 max-pool between stages
    layers, c = [], 3
    for i, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(True)]
        layers += [nn.MaxPool2d(2)] if i < len(widths) - 1 else []
        c = w
    return layers


@torch.no_grad()
def alexnet_bn() -> ConvBackbone:
    """SeLa's AlexNet with BN (RGB input), fc7 (4096) as output; its init (models/alexnet.py): conv weights
    N(0, sqrt(2 / (k * k * out))) a channel at a time, linear weights N(0, 0.01), biases 0."""
    layers, c = [], 3
    for v in [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]:
        layers += [nn.MaxPool2d(3, 2)] if v == "M" else [nn.Conv2d(c, *v), nn.BatchNorm2d(v[0]), nn.ReLU(True)]
        c = c if v == "M" else v[0]
    mlp = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(True), nn.Dropout(0.5),
                        nn.Linear(4096, 4096), nn.ReLU(True))
    net = ConvBackbone(nn.Sequential(*layers), stride=32, map_dim=256, mlp=mlp, out_dim=4096)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            for w in m.weight:  # one draw per output channel, as the official loop
                w.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0, 0.01)
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.bias.zero_()
    return net


class RawPixels(nn.Module):
    """The floor, with DINO's interface: a patch token is the patch's 3*p*p normalised values, the [CLS] their mean."""

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


def build_arch(arch: str, patch_size: int = 16) -> nn.Module:
    """A fresh backbone: a ViT of VIT_SIZES, sinkhorn.py's alexnet / resnet18 / resnet50 / convnet_demo, or pixels."""
    if arch in VIT_SIZES:
        return VisionTransformer(patch_size, *VIT_SIZES[arch])
    if arch in ("resnet18", "resnet50"):  # torchvision's, without avgpool and fc
        net = getattr(torchvision.models, arch)(weights=None)  # never downloads
        return ConvBackbone(nn.Sequential(*list(net.children())[:-2]), stride=32, map_dim=net.fc.in_features)
    if arch == "convnet_demo":  # sinkhorn.py's CPU demo: 4 stages, stride 8
        return ConvBackbone(nn.Sequential(*conv_stages((64, 128, 256, 256))), stride=8, map_dim=256)
    if arch in ("alexnet", "pixels"):
        return alexnet_bn() if arch == "alexnet" else RawPixels(patch_size)
    raise data.DataError(f"--arch {arch}: unknown; available: "
                         f"{sorted(VIT_SIZES) + ['pixels', 'alexnet', 'resnet18', 'resnet50', 'convnet_demo']}")


def stored_backbone(method: str, args: dict) -> nn.Module:
    """A fresh backbone from a repo checkpoint's stored args (arch, patch_size); secat.py's: its frozen encoder
    (another checkpoint's backbone, a ViT, or its demo's conv net, average-pooled)."""
    if method == "secat" and args.get("encoder_method"):
        return stored_backbone(args["encoder_method"], args["encoder_args"])
    if method == "secat" and args["encoder_arch"] == "convnet_demo":
        net = nn.Sequential(*conv_stages((32, 64, 128, 128)), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.out_dim = 128
        return net
    arch = args["encoder_arch"] if method == "secat" else args["arch"]
    return build_arch(arch, args.get("patch_size", 16))


def conv_weights(weights: dict) -> tuple:
    """SeLa's AlexNet / a torchvision ResNet -> (sinkhorn.py's arch, weights under its names); else (None, weights)"""
    if "classifier.1.weight" in weights:
        return "alexnet", {k.replace("features.", "trunk.", 1).replace("classifier.", "mlp.", 1): v
                           for k, v in weights.items() if not k.startswith("top_layer")}
    trunk = dict(conv1=0, bn1=1, layer1=4, layer2=5, layer3=6, layer4=7)
    depth = (50 if "layer1.0.conv3.weight" in weights else 18) if "layer1.0.conv1.weight" in weights else None
    return (f"resnet{depth}", {f"trunk.{trunk[k.split('.')[0]]}{k[k.index('.'):]}": v for k, v in weights.items()
                               if k.split(".")[0] in trunk}) if depth else (None, weights)


def load_backbone(ckpt=None, arch="vit_small", patch_size=16, random_init=False) -> nn.Module:
    """A frozen backbone in eval mode. A ckpt of this repo (has "method") is built from its stored args
    (stored_backbone) and loads the `backbone.` keys of its teacher (else model); SeLa's AlexNet or a torchvision
    ResNet loads under sinkhorn.py's names; any other release is a ViT of arch / patch_size (data.load_pretrained).
    random_init: no loading."""
    if ckpt is None:
        if not random_init and arch != "pixels":
            raise data.DataError("no --ckpt given: pass one, or --random-init (or --arch pixels) for a floor")
        return build_arch(arch, patch_size).eval()
    state = data.load_checkpoint(ckpt, flag="--ckpt")  # one line for a missing, empty or damaged file
    if "method" in state:
        net = stored_backbone(state["method"], state["args"])
        if not random_init:
            weights = state.get("teacher") or state["model"]
            net.load_state_dict({k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")})
        return net.eval()
    conv, weights = conv_weights(data.backbone_weights(state)[1])  # SeLa's AlexNet, a ResNet: sinkhorn.py's names
    net = build_arch(conv or arch, patch_size)
    if not random_init and not conv:
        data.load_pretrained(net, ckpt, flag="--ckpt")
    elif not random_init and [k for k in net.load_state_dict(weights, strict=False).missing_keys  # older torch: no
                              if "num_batches" not in k]:  # num_batches_tracked
        raise data.CheckpointError(f"--ckpt {ckpt}: holds {data.describe_checkpoint(state)}, not all of {conv}")
    return net.eval()


def patch_size_of(backbone) -> int:
    return int(backbone.patch_embed.patch_size)


# ====== Transforms and feature extraction (uint8 images from data.py -> normalised floats) ==========
def normalize(img: torch.Tensor) -> torch.Tensor:  # uint8 (..., 3, H, W) -> float
    return TF.normalize(img.float() / 255, MEAN, STD)


def classify_transform(img, size: int):  # DINO's eval transform: bicubic resize to size * 256 / 224, centre crop
    img = TF.resize(img, int(size * 256 / 224), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return normalize(TF.center_crop(img, size))


def random_crop_transform(img, size: int):  # DINO eval_linear.py's, SeLa's probes' train: RandomResizedCrop, flip
    return normalize(T.RandomHorizontalFlip()(T.RandomResizedCrop(size, antialias=True)(img)))


def ten_crop_transform(img, size: int):  # SeLa's probes' val: Resize(256) (bilinear), TenCrop(224) -> (10, 3, S, S)
    return normalize(torch.stack(TF.ten_crop(TF.resize(img, int(size * 256 / 224), antialias=True), size)))


def sela_cifar_transform(img, size: int):  # SeLa cifar.py's test: Resize(256) (bilinear), CenterCrop, CIFAR mean/std
    img = TF.center_crop(TF.resize(img, int(size * 256 / 224), antialias=True), size).float() / 255
    return TF.normalize(img, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def seg_transform(img, mask, size: int):  # image bilinear, mask nearest to size x size (Leopart's linear probe)
    mask = resize_ids(mask[None], size, "nearest-exact")[0].to(torch.uint8)
    return normalize(TF.resize(img, [size, size], antialias=True)), mask


def resize_ids(ids, size: int, mode="nearest") -> torch.Tensor:
    """Label maps (N, H, W) -> (N, size, size) int64 by F.interpolate (nearest: the official codes' default)."""
    return F.interpolate(ids[:, None].float(), size=(size, size), mode=mode)[:, 0].long()


def token_grid(n: int, height: int, width: int) -> tuple:
    """(h, w) with h*w = n closest to the image's aspect (exact for a ViT: H/p, W/p)."""
    h = max(1, round(math.sqrt(n * height / width)))
    while n % h:
        h -= 1
    return h, n // h


@torch.no_grad()
def extract(backbone, loader, device, n_last_blocks=1, patch_tokens=False):
    """(features, targets) of a loader: [CLS] of the last n blocks (N, n, D) float32 (a conv net: forward() (N, 1, D),
    as DINO's eval_knn.py takes it), or with patch_tokens the last block's patch tokens (N, D, h, w) float16."""
    feats, targets = [], []
    for images, y in loader:
        x, vit = images.to(device), patch_tokens or hasattr(backbone, "blocks")
        layers = backbone.get_intermediate_layers(x, n_last_blocks) if vit else [backbone(x)[:, None]]
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
    train, test = F.normalize(train_features.float(), dim=1), F.normalize(test_features.float(), dim=1)
    num_classes, out = int(max(train_labels.max(), test_labels.max())) + 1, {}
    for k in ks:
        kk, top1, top5 = min(k, len(train)), 0, 0
        for i in range(0, len(test), chunk):
            sim, idx = (test[i:i + chunk] @ train.T).topk(kk, dim=1)
            votes = torch.zeros(len(sim), num_classes, device=sim.device)
            votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
            ranked = votes.argsort(dim=1, descending=True)
            hit = ranked == test_labels[i:i + chunk, None]
            top1 += hit[:, :1].sum().item()
            top5 += hit[:, :min(5, kk)].sum().item()  # DINO: top-5 counts min(5, k) guesses
        out[f"knn/k{k}/top1"], out[f"knn/k{k}/top5"] = 100 * top1 / len(test), 100 * top5 / len(test)
    return out


def _fit(head, opt, loss_of, n, epochs, batch_size, seed):
    """The probes' loop: per epoch a seeded permutation of the n samples in batches, lr cosine to 0."""
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(n / batch_size))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head


def _train_linear(x, y, num_classes, lr, epochs, batch_size, seed):
    """DINO's recipe: nn.Linear (weights N(0, 0.01), bias 0), SGD momentum 0.9, no weight decay, lr x batch/256."""
    head = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0)
    return _fit(head, opt, lambda idx: F.cross_entropy(head(x[idx]), y[idx]), len(x), epochs, batch_size, seed)


@torch.no_grad()
def _top1(head, x, y) -> float:
    return 100 * (head(x).argmax(1) == y).float().mean().item()


def linear(train_features, train_labels, test_features, test_labels, epochs=100, lrs=(0.001, 0.01, 0.1, 1.0),
           batch_size=256, seed=0) -> dict:
    """Linear probe on cached features (N, D): lr chosen on a held-out 10 % of train (DINO sweeps it too),
    retrained on all of train, measured once on test. -> {"linear/top1", "linear/lr"}."""
    x, y = train_features.float(), train_labels
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    held, fit = perm[:max(1, len(x) // 10)], perm[max(1, len(x) // 10):]
    scores = {lr: _top1(_train_linear(x[fit], y[fit], num_classes, lr, epochs, batch_size, seed), x[held], y[held])
              for lr in lrs}
    best = max(lrs, key=lambda lr: scores[lr])
    head = _train_linear(x, y, num_classes, best, epochs, batch_size, seed)
    return {"linear/top1": _top1(head, test_features.float(), test_labels), "linear/lr": best}


def _train_probes(probes, inputs, train_set, device, epochs, lr_at, batch_size, weight_decay=0.0, num_workers=4,
                  seed=0, after_epoch=lambda: None):
    """probes[i] on inputs(x)[i], summed cross-entropy, SGD 0.9 at lr_at(epoch), DistributedSampler's order."""
    opt = torch.optim.SGD(probes.parameters(), lr_at(0), momentum=0.9, weight_decay=weight_decay)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=1, rank=0, seed=seed)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch)
        probes.train()
        for x, y in torch.utils.data.DataLoader(train_set, batch_size, sampler=sampler, num_workers=num_workers):
            with torch.no_grad():
                feats = inputs(x.to(device))
            loss = sum(F.cross_entropy(probe(f), y.to(device)) for probe, f in zip(probes, feats))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after_epoch()


@torch.no_grad()
def _probe_top1(probes, inputs, val_set, device, batch_size=32) -> list:
    """Top-1 (%) of each probe; items of several crops (B, V, 3, S, S) are scored on their mean logits."""
    probes.eval()
    hits = [0] * len(probes)
    for x, y in _loader(val_set, batch_size, 0):
        views = x.shape[1] if x.dim() == 5 else 1
        for i, (probe, f) in enumerate(zip(probes, inputs(x.flatten(0, x.dim() - 4).to(device)))):
            hits[i] += (probe(f).view(len(x), views, -1).mean(1).argmax(1).cpu() == y).sum().item()
    return [100 * h / len(val_set) for h in hits]


def linear_augmented(backbone, train_set, val_set, device, epochs=100, lr=0.001, batch_size=1024, num_workers=4,
                     seed=0) -> dict:
    """DINO's eval_linear.py: crops afresh each epoch (random_crop_transform); nn.Linear N(0, 0.01), lr x batch / 256,
    no wd, cosine per epoch; val each epoch, the best reported as DINO's log. DoRA's 512 x 4 GPUs = batch 2048."""
    n, avgpool = (1, True) if getattr(backbone, "embed_dim", 0) >= 768 else (4, False)

    def inputs(x):  # [CLS] of the last n blocks, ViT-B's mean patch token interleaved (cat + reshape); else forward()
        if not hasattr(backbone, "blocks"):
            return [backbone(x)]
        layers = backbone.get_intermediate_layers(x, n)
        out = torch.cat([t[:, 0] for t in layers], dim=-1)
        return [torch.stack([out, layers[-1][:, 1:].mean(1)], dim=-1).flatten(1) if avgpool else out]
    with torch.no_grad():
        head = nn.Linear(inputs(val_set[0][0][None].to(device))[0].shape[1], len(train_set.classes))
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    probes, accs, base = nn.ModuleList([head]).to(device), [], lr * batch_size / 256
    cosine = lambda e: base * (1 + math.cos(math.pi * e / epochs)) / 2  # noqa: E731  CosineAnnealingLR per epoch
    _train_probes(probes, inputs, train_set, device, epochs, cosine, batch_size, 0.0, num_workers, seed,
                  lambda: accs.append(_probe_top1(probes, inputs, val_set, device)[0]))
    return {"linear/top1": max(accs), "linear/top1_last": accs[-1], "linear/lr": lr}


def linear_probes(backbone, train_set, val_set, device, epochs=None, batch_size=None, num_workers=4, seed=0) -> dict:
    """SeLa's eval_linear_probes.py Probes (AlexNet: conv1-5 max-pooled to ~9k dims, BN without affine, a conv over the
    map; 36 epochs) or eval_resnet.py (ResNet: 146 epochs, its BN in train mode as officially); sets: random_crop /
    ten_crop_transform. -> {"probe/conv1/top1": %, ...} or {"probe/top1": %}, after the last epoch."""
    if not hasattr(backbone, "trunk"):
        raise data.DataError("linear-probes: SeLa's probes are for its conv nets (AlexNet, ResNet); a ViT: linear")
    alexnet, num_classes = getattr(backbone, "mlp", None) is not None, len(train_set.classes)
    taps = (2, 6, 10, 13, 16)  # sinkhorn.py's alexnet_bn trunk: the ReLUs after conv1-conv5 (official: BN absorbed)
    inputs = lambda x: [h for i, h in enumerate(itertools.accumulate(  # noqa: E731
        backbone.trunk[:17], lambda h, layer: layer(h), initial=x)) if i - 1 in taps] if alexnet else [backbone(x)]
    pools = [nn.MaxPool2d(6, 6, 3), nn.MaxPool2d(4, 4), nn.MaxPool2d(3, 3, 1), nn.MaxPool2d(3, 3, 1), nn.MaxPool2d(2)]
    with torch.no_grad():  # the probes' sizes from a 224 input, as Probes.__init__
        maps = [pool(m) for pool, m in zip(pools, inputs(torch.zeros(2, 3, 224, 224, device=device)) * alexnet)]
    xavier = lambda conv: (nn.init.xavier_uniform_(conv.weight), nn.init.zeros_(conv.bias), conv)[2]  # noqa: E731
    probes = nn.ModuleList([nn.Sequential(pool, nn.BatchNorm2d(m.shape[1], affine=False), xavier(nn.Conv2d(
        m.shape[1], num_classes, m.shape[2:])), nn.Flatten()) for pool, m in zip(pools, maps)] if alexnet else
        [nn.Linear(backbone.out_dim, num_classes)]).to(device)
    lr_at = (lambda e: 1e-2 * 0.1 ** min(e // 10, 3)) if alexnet else (lambda e: 0.1 * 0.1 ** ((e >= 85) + (e >= 128)))
    backbone.train(not alexnet)
    _train_probes(probes, inputs, train_set, device, epochs or (36 if alexnet else 146), lr_at,
                  batch_size or (192 if alexnet else 1024), 1e-5 if alexnet else 0.0, num_workers, seed)
    backbone.eval()
    top1 = _probe_top1(probes, inputs, val_set, device, batch_size=19 if alexnet else 102)  # SeLa: batch / 10
    return dict(zip([f"probe/conv{i + 1}/top1" for i in range(5)] if alexnet else ["probe/top1"], top1))


# ====== Clustering: k-means, matching, mIoU, NMI, Hungarian accuracy ================================
def _assign(x, centroids, spherical, chunk=65536):
    """x (N, D), centroids (k, D) -> (score, label) (N,) of the nearest centroid: squared L2, or (spherical)
    largest inner product as faiss's IndexFlatIP."""
    c_sq = (centroids * centroids).sum(1)
    scores, labels = [], []
    for xb in x.split(chunk):
        s, a = ((xb @ centroids.T).max(1) if spherical
                else ((xb * xb).sum(1, keepdim=True) - 2 * (xb @ centroids.T) + c_sq).min(1))
        scores.append(s)
        labels.append(a)
    return torch.cat(scores), torch.cat(labels)


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
    """Lloyd's k-means on x's device, k-means++ init, best of `restarts` (secat.py's, viz's; the official
    protocols use faiss_kmeans). x (N, D) -> (labels (N,) int64, centroids (k, D))."""
    x, k = x.float(), min(k, len(x))
    g, best = torch.Generator(device=x.device).manual_seed(seed), None
    for _ in range(restarts):
        centroids, previous = _kmeans_pp(x, k, g), float("inf")
        for _ in range(iters):
            dists, labels = _assign(x, centroids, False, chunk=16384)
            dists = dists.clamp_min(0)
            inertia, counts = dists.sum().item(), torch.bincount(labels, minlength=k)
            centroids = torch.zeros_like(centroids).index_add_(0, labels, x) / counts.clamp_min(1)[:, None].float()
            empty = (counts == 0).nonzero().flatten()
            if len(empty):  # re-seed empty clusters at the worst-fitted points
                centroids[empty] = x[dists.topk(len(empty)).indices]
            if previous - inertia <= tol * previous:
                break
            previous = inertia
        dists, labels = _assign(x, centroids, False, chunk=16384)
        if best is None or dists.clamp_min(0).sum().item() < best[0]:
            best = (dists.clamp_min(0).sum().item(), labels, centroids)
    return best[1], best[2]


def confusion(pred, true, num_pred, num_true, ignore=255) -> torch.Tensor:
    """(num_pred, num_true) counts of (prediction, ground truth) pairs; `ignore` in true is skipped."""
    pred, true = pred.flatten().long(), true.flatten().long()
    keep = true != ignore
    idx = pred[keep] * num_true + true[keep]
    return torch.bincount(idx.cpu(), minlength=num_pred * num_true).view(num_pred, num_true)


def match_clusters(conf, many_to_one=False, unmatched=0, matchable=None) -> torch.Tensor:
    """cluster -> class from a (clusters, classes) confusion, as Leopart's PredsmIoU (utils.py) and TimeT's
    (metrics.py): linear_sum_assignment(1 - IoU) on (classes, clusters) (their call: ties break alike), the
    first `matchable` clusters eligible, the rest -> `unmatched` (theirs: 0; -1 = a miss); or many-to-one:
    each cluster to its highest-precision, i.e. majority, class."""
    if many_to_one:
        return conf.argmax(1)  # precision tp / (tp + fp) has one denominator per cluster; first maximum wins
    c = conf.double().numpy()
    union = c.sum(1, keepdims=True) + c.sum(0, keepdims=True) - c
    iou = c / np.maximum(union, 1e-8)  # PredsmIoU.get_score
    classes, clusters = linear_sum_assignment(1 - iou.T[:, :matchable])
    mapping = torch.full((conf.shape[0],), unmatched, dtype=torch.long)
    mapping[torch.as_tensor(clusters)] = torch.as_tensor(classes)
    return mapping


def miou(conf, mapping=None, gt_classes_only=False) -> float:
    """Mean IoU (%) of conf (P, C), rows mapped to classes by `mapping` (P,) (-1 = a miss). A class absent
    from both maps scores 0 (Leopart's PredsmIoU); gt_classes_only: the ground truth's classes (TimeT's)."""
    num_classes = conf.shape[1]
    if mapping is not None:
        merged = torch.zeros(num_classes + 1, num_classes, dtype=conf.dtype)
        conf = merged.index_add_(0, mapping.clamp(min=-1) % (num_classes + 1), conf)
    conf = conf.double()
    tp = conf[:num_classes].diagonal()
    union = conf[:num_classes].sum(1) + conf.sum(0) - tp
    iou = tp / union.clamp_min(1e-8)
    return 100 * (iou[conf.sum(0) > 0] if gt_classes_only else iou).mean().item()


def _contingency(pred, true) -> torch.Tensor:
    """(clusters, classes) float64 counts of two labellings, ids relabelled 0..n-1 (sklearn's contingency_matrix)."""
    pred, true = [torch.as_tensor(v).flatten().long().unique(return_inverse=True)[1] for v in (pred, true)]
    return confusion(pred, true, int(pred.max()) + 1, int(true.max()) + 1, ignore=-1).double()


def _mi_and_entropies(c) -> tuple:  # contingency -> (mutual information, H(pred), H(true)), natural log
    p = c / c.sum()
    rows, cols, nz = p.sum(1), p.sum(0), p > 0
    mi = (p[nz] * (p[nz] / (rows[:, None] * cols[None, :])[nz]).log()).sum().clamp_min(0)
    return mi, -(rows[rows > 0] * rows[rows > 0].log()).sum(), -(cols[cols > 0] * cols[cols > 0].log()).sum()


def nmi(pred, true) -> float:
    """Normalised mutual information (%) with the arithmetic-mean normaliser (sklearn's default)."""
    mi, h_p, h_t = _mi_and_entropies(_contingency(pred, true))
    return 100.0 if h_p + h_t == 0 else (100 * mi / ((h_p + h_t) / 2)).item()


def adjusted_nmi(pred, true) -> float:
    """Adjusted MI (%) as sklearn's: (MI - E[MI]) / (mean entropy - E[MI]), E[MI] exact under the hypergeometric."""
    c = _contingency(pred, true)
    if c.shape == (1, 1):
        return 100.0
    (mi, h_p, h_t), lg = _mi_and_entropies(c), torch.lgamma
    n, a, b, emi = c.sum().item(), c.sum(1), c.sum(0), 0.0
    for k in range(1, int(min(a.max(), b.max())) + 1):  # sklearn's expected_mutual_information, a term per n_ij = k
        A, B = a[a >= k][:, None], b[b >= k][None, :]
        log_p = lg(A + 1) + lg(B + 1) + lg(n - A + 1) + lg(n - B + 1) - math.lgamma(n + 1) - math.lgamma(k + 1) \
            - lg(A - k + 1) - lg(B - k + 1) - lg((n - A - B + k).clamp_min(0) + 1)
        emi += torch.where(n - A - B + k >= 0, k / n * (math.log(n * k) - A.log() - B.log()) * log_p.exp(), 0).sum()
    denominator = ((h_p + h_t) / 2 - emi).item()  # sklearn keeps it at least eps from 0, its sign kept
    return 100 * (mi - emi).item() / math.copysign(max(abs(denominator), np.finfo(np.float64).eps), denominator)


def ari(pred, true) -> float:
    """Adjusted Rand index (%) as sklearn's adjusted_rand_score: pairs grouped alike by both, against chance."""
    c = _contingency(pred, true)
    pairs = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    both, rows, cols = pairs(c), pairs(c.sum(1)), pairs(c.sum(0))
    expected, best = rows * cols / pairs(c.sum()), (rows + cols) / 2
    return 100.0 if both == rows == cols else (100 * (both - expected) / (best - expected)).item()  # alike: 1


def cluster_heads(ckpt) -> list:
    """(weight, bias) of each clustering head in a file: sinkhorn.py's heads.{h}, SeLa's top_layer{h} or fc (*_pp)."""
    state = data.load_checkpoint(ckpt, flag="--ckpt") if ckpt else {}
    w = {k.removeprefix("module."): v for k, v in (state.get("model") or state.get("state_dict") or state).items()}
    heads = [(w[k].float(), w[k[:-6] + "bias"].float()) for k in w
             if re.fullmatch(r"(heads\.\d+|top_layer\d*|fc)\.weight", k)]
    if not heads:
        raise data.CheckpointError(f"--ckpt {ckpt}: no clustering heads (heads.*, top_layer*, fc) to score")
    return heads


def cluster_accuracy(pred, true) -> float:
    """Accuracy (%) after the best one-to-one cluster -> class map (Hungarian)."""
    conf = _contingency(pred, true)
    rows, cols = linear_sum_assignment(conf.numpy(), maximize=True)
    return 100 * conf[rows, cols].sum().item() / conf.sum().item()


# ====== Segmentation probes on patch tokens (N, D, h, w) and masks (N, H, W), 255 ignored ============
def seg_linear(train_features, train_masks, val_features, val_masks, num_classes, epochs=20, lr=1e-2,
               batch_size=16, device="cpu", seed=0) -> dict:
    """A 1x1 conv on frozen patch tokens, logits bilinearly upsampled to the mask, cross-entropy with
    255 ignored (AdamW + cosine: our choice). Returns {"seg_linear/miou": %, "seg_linear/pixel_acc": %}."""
    torch.manual_seed(seed)
    head = nn.Conv2d(train_features.shape[1], num_classes, 1).to(device)

    def loss_of(idx):
        logits = head(train_features[idx].to(device).float())
        logits = F.interpolate(logits, size=train_masks.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, train_masks[idx].to(device).long(), ignore_index=255)
    _fit(head, torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0), loss_of, len(train_features), epochs,
         batch_size, seed)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for f, m in zip(val_features.split(batch_size), val_masks.split(batch_size)):
            logits = F.interpolate(head(f.to(device).float()), size=m.shape[-2:], mode="bilinear",
                                   align_corners=False)
            conf += confusion(logits.argmax(1).cpu(), m, num_classes, num_classes)
    pixel_acc = 100 * conf.diagonal().sum().item() / conf.sum().item()
    return {"seg_linear/miou": miou(conf), "seg_linear/pixel_acc": pixel_acc}


def seg_augment(img, mask, size: int, scale=(0.8, 1.0)):
    """Leopart's linear_finetuning_transforms: one RandomResizedCrop (scale 0.8-1) of the image (bilinear) and mask
    (PIL's nearest) to size, a flip with p 0.5. uint8 (3, H, W), (H, W) -> normalised (3, S, S), uint8 (S, S)."""
    top, left, h, w = torchvision.transforms.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
    img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    mask = TF.resized_crop(mask[None].byte(), top, left, h, w, [size, size], TF.InterpolationMode.NEAREST_EXACT)
    flip = torch.rand(()) < 0.5
    return normalize(TF.horizontal_flip(img) if flip else img), (TF.horizontal_flip(mask) if flip else mask)[0]


class FCNHead(nn.Module):
    """Leopart's fcn/fcn_head.py (mmseg's FCNHead: 2 convs 3x3, concat_input, no norm, ReLU, 512 channels,
    Dropout2d 0.1, 1x1 conv_seg), its parameter names; mmcv ConvModule's init (kaiming normal fan_out, bias 0)."""

    def __init__(self, dim, num_classes, channels=512, dropout=0.1):
        super().__init__()
        def block(i):  # mmcv's ConvModule: .conv, .activate
            return nn.Sequential(OrderedDict(conv=nn.Conv2d(i, channels, 3, padding=1), activate=nn.ReLU()))
        self.convs, self.conv_cat = nn.Sequential(block(dim), block(channels)), block(dim + channels)
        self.dropout, self.conv_seg = nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1)
        for conv in (self.convs[0].conv, self.convs[1].conv, self.conv_cat.conv):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x):  # (B, dim, h, w) -> (B, num_classes, h, w)
        return self.conv_seg(self.dropout(self.conv_cat(torch.cat([x, self.convs(x)], dim=1))))


def seg_linear_leopart(backbone, train_set, val_features, val_masks, num_classes, device="cpu", head="linear",
                       epochs=25, drop_at=20, lr=0.01, batch_size=120, train_size=100, eval_size=448, num_workers=0,
                       seed=0) -> dict:
    """Leopart's linear_finetune.py on the fly: train_set items (image, mask) augmented (seg_augment), frozen patch
    tokens upsampled bilinearly to train_size, a 1x1 conv (head "fcn": FCNHead) against masks nearest at train_size,
    255 ignored; SGD momentum 0.9, wd 1e-4, lr x 0.1 every drop_at epochs (StepLR), drop_last (60 x 2 GPUs officially).
    Scored as eval_linear.py: val tokens (N, D, h, w) upsampled to eval_size, mIoU over all classes of masks (N, S, S).
    -> {"seg_<head>/miou", "seg_<head>/pixel_acc"}."""
    torch.manual_seed(seed)
    dim = val_features.shape[1]
    probe = (FCNHead(dim, num_classes) if head == "fcn" else nn.Conv2d(dim, num_classes, 1)).to(device)
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, drop_at, gamma=0.1)
    loader = torch.utils.data.DataLoader(train_set, batch_size, shuffle=True, num_workers=num_workers,
                                         drop_last=len(train_set) > batch_size)
    for _ in range(epochs):
        probe.train()
        for images, masks in loader:
            with torch.no_grad():
                tokens = backbone.get_intermediate_layers(images.to(device), 1)[0][:, 1:]
                h, w = token_grid(tokens.shape[1], *images.shape[-2:])
                tokens = F.interpolate(rearrange(tokens.float(), "b (h w) d -> b d h w", h=h, w=w), size=train_size,
                                       mode="bilinear")
            loss = F.cross_entropy(probe(tokens), resize_ids(masks.to(device), train_size), ignore_index=255)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()  # Lightning steps StepLR once an epoch
    probe.eval()
    up = lambda x: F.interpolate(x, size=eval_size, mode="bilinear")  # noqa: E731
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():  # the linear head commutes with the upsampling: logits are upsampled instead of tokens
        for f, m in zip(val_features.split(4), val_masks.split(4)):
            f = f.to(device).float()
            logits = probe(up(f)) if head == "fcn" else up(probe(f))
            conf += confusion(logits.argmax(1).cpu(), resize_ids(m, eval_size), num_classes, num_classes)
    pixel_acc = 100 * conf.diagonal().sum().item() / conf.sum().item()
    return {f"seg_{head}/miou": miou(conf), f"seg_{head}/pixel_acc": pixel_acc}


def _cluster_confusion(labels, masks, k, num_classes, chunk=64):
    """Upsample (N, h, w) cluster maps to the masks (nearest) and count against them, in chunks."""
    conf = torch.zeros(k, num_classes, dtype=torch.long)
    for lab, m in zip(labels.split(chunk), masks.split(chunk)):
        up = F.interpolate(lab[:, None].float(), size=m.shape[-2:], mode="nearest")[:, 0].long()
        conf += confusion(up, m, k, num_classes)
    return conf


def seg_cluster(features, masks, num_classes, ks=(100, 300, 500), restarts=5, seeds=5, device="cpu", seed=0,
                iters=100, pca_dim=50, eval_size=100, foreground=True, background=0) -> dict:
    """k-means on the val set's patch tokens as Leopart's sup_overcluster.py: standardise + PCA, faiss
    k-means averaged over `seeds` seeds, maps and masks to eval_size (nearest); K = num_classes Hungarian,
    each K in ks many-to-one; foreground-only (ours): K = num_classes - 1 on the mostly-foreground patches,
    Hungarian over the foreground classes. features (N, D, h, w), masks (N, H, W) -> {"seg_cluster/...": %}."""
    n, d, h, w = features.shape
    x = standardise_and_pca(rearrange(features, "n d h w -> (n h w) d").to(device), pca_dim)
    small = resize_ids(masks, eval_size)
    def runs(x, k):  # one k-means per seed
        return [faiss_kmeans(x, k, iters, restarts, s)[0].cpu() for s in range(seed, seed + seeds)]
    out = {}
    for k, many in [(num_classes, False)] + [(k, True) for k in ks]:
        scores = []
        for labels in runs(x, min(k, len(x))):
            conf = _cluster_confusion(labels.view(n, h, w), small, min(k, len(x)), num_classes)
            scores.append(miou(conf, match_clusters(conf, many)))
        out[f"seg_cluster/k{k}" + ("_many_to_one" if many else "_hungarian")] = float(np.mean(scores))
    if foreground and num_classes > 2:
        is_fg, valid = ((masks != background) & (masks != 255)).float(), (masks != 255).float()
        pool = lambda m: F.adaptive_avg_pool2d(m[:, None], (h, w))[:, 0]  # noqa: E731
        fg = (pool(is_fg) > 0.5 * pool(valid)).flatten()  # patches mostly covered by foreground
        if fg.sum() > num_classes:
            fg_masks = small.clone()
            fg_masks[fg_masks == background] = 255
            scores = []
            for fg_labels in runs(x[fg.to(device)], num_classes - 1):
                labels = torch.full((n * h * w,), num_classes - 1, dtype=torch.long)  # extra row: "no cluster"
                labels[fg] = fg_labels
                conf = _cluster_confusion(labels.view(n, h, w), fg_masks, num_classes, num_classes)[:, 1:]
                mapping = torch.full((num_classes,), -1, dtype=torch.long)
                mapping[:-1] = match_clusters(conf[:-1])  # clusters <-> foreground classes only
                scores.append(miou(conf, mapping))
            out[f"seg_cluster/fg_k{num_classes - 1}_hungarian"] = float(np.mean(scores))
    return out


# ====== Fully unsupervised segmentation (Leopart, Ziegler & Asano, CVPR 2022, Sec. 4.4) ============
@torch.no_grad()
def dense_features(backbone, images, batch_size=32):
    """images (N, 3, S, S) normalised -> last-block patch tokens (N, h, w, D), mean [CLS] attention (N, h, w)."""
    p, device = patch_size_of(backbone), next(backbone.parameters()).device
    tokens, attns = [], []
    for x in images.split(batch_size):
        h, w, x = x.shape[-2] // p, x.shape[-1] // p, x.to(device)
        t, a = backbone.get_intermediate_layers(x, 1)[0], backbone.get_last_selfattention(x)
        tokens.append(rearrange(t[:, 1:], "b (h w) d -> b h w d", h=h, w=w).float().cpu())
        attns.append(rearrange(a[:, :, 0, 1:].mean(1), "b (h w) -> b h w", h=h, w=w).float().cpu())
    return torch.cat(tokens), torch.cat(attns)


def standardise_and_pca(x, dim=50, max_points_per_dim=1000, seed=1234, chunk=262144):
    """(N, D) -> (N, min(dim, D)) as Leopart's utils.normalize_and_transform: sklearn's StandardScaler
    (a constant dimension left unscaled), then faiss.PCAMatrix(D, dim) (centred, no whitening, fitted
    on a random max_points_per_dim * D rows when given more), by an exact eigendecomposition."""
    x = x.float()
    n, D = x.shape
    mean = sum(c.double().sum(0) for c in x.split(chunk)) / n
    std = (sum(((c.double() - mean) ** 2).sum(0) for c in x.split(chunk)) / n).sqrt()
    std = torch.where(std < 10 * torch.finfo(torch.float64).eps, torch.ones_like(std), std)
    z = (x - mean.float()) / std.float()
    fit = z
    if n > max_points_per_dim * D:
        fit = z[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_points_per_dim * D]]
    centre = fit.mean(0)
    fit = fit - centre
    _, vectors = torch.linalg.eigh((fit.T @ fit).double() / len(fit))  # eigenvalues ascending
    return (z - centre) @ vectors[:, -min(dim, D):].flip(1).float()


@torch.no_grad()
def faiss_kmeans(x, k, niter=100, nredo=5, seed=1, spherical=False, copies=None, max_points_per_centroid=256):
    """faiss.Kmeans(D, k, niter, nredo, seed, spherical).train(x) + index.search(x, 1), as faiss does it with
    torch's draws: the k-means of the official protocols (Leopart utils.cluster, TimeT cluster_features).
    Trains on a random k * 256 rows, each run from k random rows, niter Lloyd steps (an empty cluster
    splits a big one, faiss split_clusters), best objective kept; spherical: unit centroids, inner product.
    copies (N,): row i stands for that many equal rows (a token's pixels). x (N, D) -> (labels, centroids)."""
    x, g = x.float(), torch.Generator().manual_seed(seed)
    copies = torch.ones(len(x), dtype=torch.long, device="cpu") if copies is None else copies.long().cpu()
    total, cap = int(copies.sum()), k * max_points_per_centroid
    rows = torch.arange(total) if total <= cap else torch.randperm(total, generator=g)[:cap]  # g draws on the CPU
    train = x[torch.searchsorted(copies.cumsum(0), rows, right=True).to(x.device)]
    n = len(train)
    if n < k:
        raise ValueError(f"faiss_kmeans: {n} rows for {k} clusters")
    best = None
    for _ in range(nredo):
        centroids = train[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
        centroids, previous = F.normalize(centroids, dim=1) if spherical else centroids, None
        for _ in range(niter):
            score, assign = _assign(train, centroids, spherical)
            objective, counts = score.double().sum().item(), torch.bincount(assign, minlength=k)
            if previous is not None and torch.equal(assign, previous) and bool((counts > 0).all()):
                break  # a fixed point with no empty cluster: the remaining iterations would change nothing
            previous = assign
            centroids = torch.zeros_like(centroids).index_add_(0, assign, train) / counts.clamp(min=1)[:, None]
            sizes = counts.double().tolist()
            for ci in (i for i in range(k) if sizes[i] == 0):  # faiss split_clusters
                cj = 0
                while torch.rand((), generator=g).item() >= (sizes[cj] - 1) / (n - k):
                    cj = (cj + 1) % k
                sign = torch.tensor([1.0, -1.0], device=x.device).repeat(x.shape[1] // 2 + 1)[:x.shape[1]] / 1024
                centroids[ci] = centroids[cj] * (1 + sign)
                centroids[cj] = centroids[cj] * (1 - sign)
                sizes[ci] = sizes[cj] / 2
                sizes[cj] -= sizes[ci]
            centroids = F.normalize(centroids, dim=1) if spherical else centroids
        if best is None or (objective > best[0] if spherical else objective < best[0]):
            best = (objective, centroids)
    return _assign(x, best[1], spherical)[1], best[1]


def glcm_offsets(distances=(1, 2), angles=(0, np.pi / 4, np.pi / 2, 3 * np.pi / 4, np.pi, 4 * np.pi / 3,
                                           3 * np.pi / 2, 7 * np.pi / 4)) -> list:
    """(row, col) offsets of skimage's greycomatrix for Leopart's create_matrix arguments: C's round of
    (sin, cos) * distance, so distance 2 on a diagonal lands on (+-1, +-1); the official 4 pi / 3 (sic)."""
    c_round = lambda v: int(math.copysign(math.floor(abs(v) + 0.5), v))  # noqa: E731
    return [(c_round(math.sin(a) * d), c_round(math.cos(a) * d)) for a in angles for d in distances]


def cooccurrence(clusters, n, offsets=None, chunk=64):
    """clusters (N, H, W) ids < n -> (n, n), Leopart's fully_unsup_seg.create_matrix: per image, cluster j
    at an offset from cluster i, diagonal zeroed, rows normalised; averaged over the images where row i
    has a neighbour (a row with none stays 0 where the official code divides 0 by 0)."""
    offsets = glcm_offsets() if offsets is None else offsets
    total, appear = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for c in clusters.long().split(chunk):
        B, H, W = c.shape
        base, counts = torch.arange(B)[:, None, None] * n * n, torch.zeros(B * n * n, dtype=torch.float64)
        for dy, dx in offsets:
            a = c[:, max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx)]
            b = c[:, max(0, dy):H - max(0, -dy), max(0, dx):W - max(0, -dx)]
            counts += torch.bincount((base + a * n + b).flatten(), minlength=B * n * n)
        counts = counts.reshape(B, n, n) * (1 - torch.eye(n, dtype=torch.float64))
        rows = counts.sum(2, keepdim=True)
        total += (counts / rows.clamp(min=1)).sum(0)
        appear += (rows[..., 0] > 0).sum(0)
    return (total / appear.clamp(min=1)[:, None]).numpy()


def infomap_communities(co, edge_threshold=0.09, markov_time=2.0, modules=20, seed=1) -> dict:
    """Leopart's community detection: undirected edges of weight min(co[i, j], co[j, i]) where both reach
    edge_threshold, two-level Infomap. -> {node: module id >= 1}; unlinked nodes absent."""
    from infomap import Infomap  # only this benchmark needs it
    n = len(co)
    links = [(i, j, float(min(co[i, j], co[j, i]))) for i in range(n) for j in range(i, n)
             if co[i, j] >= edge_threshold and co[j, i] >= edge_threshold]
    im = Infomap(directed=False, two_level=True, seed=seed, markov_time=markov_time, silent=True,
                 preferred_number_of_modules=modules)
    if not links:  # infomap >= 2.x refuses an empty network
        return {}
    im.add_links(links)
    im.run()
    return {node.node_id: node.module_id for node in im.tree if node.is_leaf}


def _pixel_tokens(h, w, *sizes):
    """(H * W,) the token each pixel shows after F.interpolate(mode='nearest') to each size in turn."""
    idx = torch.arange(h * w, dtype=torch.float64).reshape(1, 1, h, w)
    for s in sizes:
        idx = F.interpolate(idx, size=(s, s), mode="nearest")
    return idx.flatten().long()


def iou_matched_miou(pred, gt, num_pred, num_gt, ignore=255) -> tuple:
    """Leopart's utils.PredsmIoU(num_pred, num_gt).compute(many_to_one=False): ids < num_pred matched to the
    classes by IoU, the rest -> class 0; mIoU (%) over all classes. -> (mIoU, id -> class (max(num_pred, ids),))."""
    kept = pred[gt != ignore]
    conf = confusion(pred, gt, max(num_pred, int(kept.max()) + 1 if kept.numel() else 0), num_gt, ignore)
    mapping = match_clusters(conf, matchable=num_pred)
    return miou(conf, mapping), mapping


def _token_blocks(tok_of_pixel, fg_pixels, T):
    """tok_of_pixel (P,), fg_pixels (N, P) bool -> foreground pixels in each token's block (N, T), sizes (T,)."""
    N = len(fg_pixels)
    idx = (torch.arange(N)[:, None] * T + tok_of_pixel).flatten()
    inside = torch.bincount(idx, weights=fg_pixels.flatten().double(), minlength=N * T).reshape(N, T)
    return inside, torch.bincount(tok_of_pixel, minlength=T).double()


def _foreground_iou(fg_tokens, gt_inside, sizes) -> float:
    """Leopart's utils.eval_jac: foreground IoU (%) per image, averaged; fg_tokens (N, T), rest: _token_blocks."""
    inter = (fg_tokens * gt_inside).sum(1)
    union = fg_tokens.double() @ sizes + gt_inside.sum(1) - inter
    return 100 * (inter / union.clamp(min=1e-8)).mean().item()


def _cluster_precision(clusters, noisy_fg, sizes, k) -> np.ndarray:
    """Leopart's get_cluster_precs: per cluster, the share of its pixels in the noisy foreground averaged
    over the images it occurs in (0 if none: the official asserts). clusters, noisy_fg (N, T), sizes (T,)."""
    N = len(clusters)
    idx, w = (torch.arange(N)[:, None] * k + clusters).flatten(), sizes.repeat(N)
    hits = torch.bincount(idx, weights=w * noisy_fg.flatten(), minlength=N * k).reshape(N, k).numpy()
    size = torch.bincount(idx, weights=w, minlength=N * k).reshape(N, k).numpy()
    precision = np.divide(hits, size, out=np.zeros_like(hits), where=size > 0).sum(0)  # rows in image order
    return np.divide(precision, (size > 0).sum(0), out=np.zeros(k), where=(size > 0).sum(0) > 0)


def cbfe_cd(tokens, noisy_fg, n_train, num_classes, train_masks=None, val_masks=None, k_fg=200, k_community=149,
            pca_dim=50, edge_threshold=0.09, markov_time=2.0, infomap_runs=10, cbfe_runs=5, eval_size=100, seed=0):
    """Leopart's fully_unsup_seg.py. tokens (N, h, w, D), train first; noisy_fg (N, h, w) bool; masks (N, S, S),
    255 = boundary. -> (val maps (N_val, S, S) of the first Infomap run, matched to classes; scores)."""
    N, h, w, D = tokens.shape
    T, E = h * w, eval_size
    feats, noisy_fg = standardise_and_pca(tokens.reshape(-1, D), pca_dim), noisy_fg.reshape(N, T)
    tok_e = torch.bincount(_pixel_tokens(h, w, E), minlength=T).double()  # pixels per token at E x E
    split = (slice(0, n_train), slice(n_train, N))

    # 1. CBFE: spherical k-means on train + val tokens; foreground = clusters of precision >= threshold
    k_fg = min(k_fg, len(feats) // 4)  # only binds on toy sets: the official code asserts all k occur
    clusters = faiss_kmeans(feats, k_fg, seed=seed, spherical=True)[0].reshape(N, T)
    precs = [_cluster_precision(clusters[s], noisy_fg[s], tok_e, k_fg) for s in split]
    order, ranked = np.argsort(precs[0]), np.sort(precs[0])
    start = int(0.65 * k_fg)  # no train masks: the middle of the official search range
    if train_masks is not None:  # find_good_threshold: the cut of best train IoU (ties: the later cut)
        gt = resize_ids(train_masks, E).flatten(1) != 0
        gt_inside, sizes = _token_blocks(_pixel_tokens(h, w, E), gt, T)
        best = -1.0
        for s in range(int(0.55 * k_fg), int(0.75 * k_fg)):  # 55-75 % of the clusters to background
            iou = _foreground_iou(torch.isin(clusters[:n_train], torch.as_tensor(order[s:])), gt_inside, sizes)
            best, start = (iou, s) if iou >= best else (best, start)
    grid = np.arange(0, 1, 0.05)
    threshold = float(grid[np.argmin(np.abs(grid - ranked[start]))])  # the official rounding to 0.05
    fg = torch.cat([torch.isin(clusters[s], torch.as_tensor(np.flatnonzero(p >= threshold)))
                    for s, p in zip(split, precs)])  # (N, T): val uses its own precisions
    scores = {"protocol": f"leopart fully_unsup_seg.py: standardise + PCA {pca_dim}; CBFE spherical faiss k-means "
              f"k={k_fg}, threshold {threshold:.2f} from train IoU at {E}x{E}; CD faiss k-means k={k_community} on "
              f"foreground pixels at {E}x{E}, skimage co-occurrence (distances 1, 2), Infomap (Markov time "
              f"{markov_time}, {num_classes - 1} modules, edge threshold {edge_threshold}), mean of {infomap_runs} "
              f"seeds; Hungarian IoU at {E}x{E}, 255 ignored", "cbfe_threshold": threshold,
              "cbfe_fg_fraction": 100 * float((fg[n_train:].double() @ tok_e).sum()) / ((N - n_train) * E * E)}
    if val_masks is not None:  # the official scores the val foreground at the input size
        S = val_masks.shape[-1]
        gt_inside, sizes = _token_blocks(_pixel_tokens(h, w, E, S), val_masks.flatten(1) != 0, T)
        scores["cbfe_fg_iou"] = _foreground_iou(fg[n_train:], gt_inside, sizes)

    # 2. k-means on the foreground pixels at E x E (a token weighs its pixels); the background is cluster k
    fg = fg.flatten()
    copies = tok_e.long().repeat(N)[fg]
    k_community = min(k_community, max(int(fg.sum()) // 4, num_classes))  # binds on toy sets only

    def pixel_maps(ids, k, s):  # token ids on the foreground -> (N_s, E, E) maps, background = k
        full = torch.full((N * T,), k, dtype=torch.long)
        full[fg] = ids
        return full.reshape(N, T)[s][:, _pixel_tokens(h, w, E)].reshape(-1, E, E)

    fine, val_gt = faiss_kmeans(feats[fg], k_community, seed=seed, copies=copies)[0], None
    if val_masks is not None:
        val_gt = resize_ids(val_masks, E)
        # CBFE alone (evaluate_cbfe): k-means with one cluster per object class, seeds 0..cbfe_runs-1
        scores["cbfe_miou"] = float(np.mean([iou_matched_miou(pixel_maps(faiss_kmeans(
            feats[fg], num_classes - 1, seed=r, copies=copies)[0], num_classes - 1, split[1]), val_gt, num_classes,
            num_classes)[0] for r in range(cbfe_runs)]))

    # 3. CD: Infomap on the co-occurrence graph of train + val maps per seed (official 0..9; infomap >= 2.x
    #    refuses 0, so 1..10); unlinked clusters pooled into id 0, communities are 1, 2, ...
    maps = pixel_maps(fine, k_community, slice(0, N))
    co = cooccurrence(maps, k_community + 1)
    runs = []  # (communities, mIoU) per seed; the first seed's val map and matching are returned
    for r in range(infomap_runs):
        module = infomap_communities(co, edge_threshold, markov_time, num_classes - 1, seed=r + 1)
        lookup = torch.zeros(k_community + 1, dtype=torch.long)
        lookup[torch.tensor(list(module), dtype=torch.long)] = torch.tensor(list(module.values()), dtype=torch.long)
        merged = lookup[maps[n_train:]]
        ids = merged.unique()
        # the official PredsmIoU asserts at most num_classes ids no larger than num_classes: beyond, all compete
        num_pred = num_classes if len(ids) <= num_classes and int(ids.max()) <= num_classes else int(ids.max()) + 1
        score, mapping = iou_matched_miou(merged, val_gt, num_pred, num_classes) if val_gt is not None else (0.0, None)
        runs.append((len(ids), score))
        if r == 0:
            first = (merged, mapping)
    communities, mious = zip(*runs)
    scores["cd_communities"] = float(np.mean(communities))
    merged, mapping = first
    if val_masks is not None:
        scores["cd_miou"], scores["cd_miou_std"] = float(np.mean(mious)), float(np.std(mious))
        merged = mapping[merged]  # ids -> matched classes
    S = val_masks.shape[-1] if val_masks is not None else E
    return resize_ids(merged, S), scores


def unsupervised_segmentation(backbone, train_images, val_images, num_classes, foreground, train_masks=None,
                              val_masks=None, k_fg=200, k_community=149, seed=0, **settings):
    """Leopart's label-free pipeline (cbfe_cd) on a backbone. images (N, 3, S, S) normalised; masks (N, S, S),
    255 = boundary (train masks only pick the CBFE threshold, as officially); foreground(attn (N, h, w)) ->
    bool (N, h, w), e.g. leopart.foreground_mask. -> (val maps (N, S, S) of classes, scores in %)."""
    tokens, attn = dense_features(backbone, torch.cat([train_images, val_images]))
    return cbfe_cd(tokens, foreground(attn), len(train_images), num_classes, train_masks, val_masks, k_fg,
                   k_community, seed=seed, **settings)


def load_segmentation(root, split, size):
    """VOC-layout split -> images (N, 3, size, size) normalised, masks (N, size, size) by torchvision's nearest."""
    ds, images, masks = data.VOCSegmentation(root, split), [], []
    for i in range(len(ds)):
        img, mask = ds[i]
        images.append(normalize(TF.resize(img, [size, size], antialias=True)))
        masks.append(TF.resize(mask[None], [size, size], interpolation=TF.InterpolationMode.NEAREST)[0])
    return torch.stack(images), torch.stack(masks), ds.num_classes


def unsupervised_segmentation_voc(backbone, root, size, foreground, k_fg, k_community, seed=0, picture=None,
                                  name="") -> dict:
    """unsupervised_segmentation on a VOC-layout root's train + val at size x size; picture: save_cluster_maps."""
    expect_kind(root, ("voc",), "unsup-seg")
    train_x, train_y, num_classes = load_segmentation(root, "train", size)
    val_x, val_y, _ = load_segmentation(root, "val", size)
    maps, scores = unsupervised_segmentation(backbone, train_x, val_x, num_classes, foreground, train_y, val_y,
                                             k_fg, k_community, seed=seed)
    if picture:
        save_cluster_maps(backbone, val_x, val_y, maps, num_classes, picture, name)
        print(f"wrote {picture}")
    return scores


def attention_foreground(attn, mass=0.65, sigma=0.6):
    """Leopart's utils.process_attentions as fully_unsup_seg.py stores DINO's (threshold 0.65): 7x7 Gaussian blur,
    the tokens over 1 - mass of the ascending cumulative mass, 8-connected components of <= 2 tokens dropped.
    attn (N, h, w) head-averaged [CLS] attention -> bool (N, h, w)."""
    a = TF.gaussian_blur(attn.float()[:, None], [7, 7], [sigma, sigma]).flatten(1)
    values, order = a.sort(dim=1)
    keep = torch.zeros_like(a, dtype=torch.bool).scatter(1, order, (values / values.sum(1, keepdim=True)).cumsum(1)
                                                           > 1 - mass).view(attn.shape).numpy()
    for m in keep:
        labels, n = ndimage.label(m, structure=np.ones((3, 3)))
        m[(np.bincount(labels.ravel(), minlength=n + 1) <= 2)[labels] & (labels > 0)] = False
    return torch.from_numpy(keep)


def saved_foreground(folder):
    """foreground(attn) from Leopart's saved DINO maps, folder/attn_dino_{train,val}.pt ((N, 1, h', w') 0/1, as
    fully_unsup_seg.py loads them), brought to the tokens' (h, w) by nearest interpolation as it does."""
    maps = []  # read before any feature is computed: a wrong folder fails at once
    for path in [os.path.join(folder, f"attn_dino_{split}.pt") for split in ("train", "val")]:
        data._need(path, "file")
        try:
            maps.append(torch.load(path, map_location="cpu", weights_only=True).float())
        except Exception as e:  # pickle garbage, a truncated zip, a dict: all not a saved tensor to the user
            raise data.DataError(f"{path}: not a tensor saved by torch.save ({type(e).__name__})") from None
    maps = torch.cat([m.reshape(-1, 1, *m.shape[-2:]) for m in maps])

    def foreground(attn):
        if len(maps) != len(attn):
            raise data.DataError(f"{folder}: attn_dino_train.pt + attn_dino_val.pt hold {len(maps)} maps for "
                                 f"{len(attn)} train + val images")
        return F.interpolate(maps, size=attn.shape[-2:], mode="nearest")[:, 0] > 0
    return foreground


@torch.no_grad()
def save_cluster_maps(backbone, images, masks, unsup_maps, num_classes, path, name="", rows=8):
    """Picture: per validation image, the image, k-means clusters of its patch tokens (K = number of
    classes, fitted on all shown images), the fully unsupervised segmentation, the ground truth."""
    palette = np.array(data.voc_palette(), dtype=np.uint8).reshape(-1, 3)
    images, masks, unsup_maps = images[:rows], masks[:rows], unsup_maps[:rows]
    tokens, _ = dense_features(backbone, images)
    N, h, w, D = tokens.shape
    clusters = resize_ids(kmeans(F.normalize(tokens.reshape(-1, D), dim=1), num_classes)[0].reshape(N, h, w),
                          images.shape[-1])
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    colour = lambda ids: palette[ids.clamp(0, len(palette) - 1).numpy()]  # noqa: E731  (H, W) -> (H, W, 3)
    tiles = [[((images[i] * std + mean).clamp(0, 1) * 255).byte(), colour(clusters[i] + 1), colour(unsup_maps[i]),
              colour(masks[i])] for i in range(N)]
    data.labelled_grid(tiles, path, f"{name}: fully unsupervised segmentation of {N} validation images (rows). "
                       "Colours: ids in the VOC palette; the unsupervised ids are matched to the classes, the "
                       "k-means ids are not", [f"val {i}" for i in range(N)],
                       ["image", f"k-means of patch tokens (K={num_classes})", "unsupervised segmentation",
                        "ground truth"])


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


def _cv2_taps(src: int, dst: int) -> tuple:
    """cv2.resize INTER_LINEAR's source indices and 11-bit fixed-point weights along one axis."""
    f = ((torch.arange(dst, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).float()  # float32 in cv2
    i = f.floor()
    f = torch.where(i < 0, 0.0, f - i)
    i = i.long().clamp(min=0)
    f = torch.where(i >= src - 1, 0.0, f)
    i = i.clamp(max=src - 1)
    return i, (i + 1).clamp(max=src - 1), ((1 - f) * 2048).round().long(), (f * 2048).round().long()


def cv2_resize(img, size) -> torch.Tensor:
    """cv2.resize INTER_LINEAR (no antialiasing) in integers as cv2's SIMD path rounds. uint8 (C, H, W) -> (C, h, w)."""
    (x0, x1, a0, a1), (y0, y1, b0, b1) = _cv2_taps(img.shape[-1], size[1]), _cv2_taps(img.shape[-2], size[0])
    v = img.long()[..., x0] * a0 + img.long()[..., x1] * a1
    out = ((((v[..., y0, :] >> 4) * b0[:, None]) >> 16) + (((v[..., y1, :] >> 4) * b1[:, None]) >> 16) + 2) >> 2
    return out.clamp(0, 255).to(torch.uint8)


def davis_frame(frame, size) -> torch.Tensor:
    """DINO's read_frame (eval_video_segmentation.py): cv2.resize to size (h, w), /255, color_normalize
    with std 0.228 (sic) for red. uint8 (3, H, W) -> float (3, h, w)."""
    return TF.normalize(cv2_resize(frame, size).float() / 255, MEAN, (0.228, 0.224, 0.225))


@torch.no_grad()
def propagate_video(backbone, frames, first_mask, device="cpu", short_side=480, multiple=64, n_last_frames=7,
                    topk=5, neighbourhood=12, temperature=0.1) -> torch.Tensor:
    """DINO's label propagation (eval_video_segmentation.py): each frame takes the top-k affinity-weighted labels
    of the first and n_last_frames previous frames. frames uint8 (T, 3, H, W), first_mask (H, W) -> (T, H, W)."""
    T, _, H, W = frames.shape
    th, tw = davis_size(H, W, short_side, multiple)
    p = patch_size_of(backbone)
    h, w = th // p, tw // p
    first_mask = torch.where(first_mask == 255, 0, first_mask)
    num_ids = int(first_mask.max()) + 1
    # nearest-exact samples pixel centres like PIL's NEAREST, which DINO's read_seg uses
    small = F.interpolate(first_mask[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].long()
    first_seg = F.one_hot(small.flatten(), num_ids).T.float().to(device)  # (C, h*w)
    yy, xx = (t.flatten() for t in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    window = ((yy[:, None] - yy[None]).abs() <= neighbourhood) & ((xx[:, None] - xx[None]).abs() <= neighbourhood)
    window = window.to(device).float()  # (queries, sources)

    def features(t):  # L2-normalised last-block patch tokens (h*w, D)
        x = davis_frame(frames[t], (th, tw))[None].to(device)
        return F.normalize(backbone.get_intermediate_layers(x, 1)[0][0, 1:], dim=1)

    first_feat, context, preds = features(0), [], [first_mask]
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
    img = Image.fromarray(mask.to(torch.uint8).numpy(), mode="P")
    img.putpalette(list(data.voc_palette() if palette is None else palette))
    img.save(path)


def propagate(backbone, videos, device="cpu", out_dir=None, max_frames=None, **kwargs) -> dict:
    """DAVIS-2017 semi-supervised over data.DAVIS items: J and F per object over the annotated frames 1..T-2 (as
    the toolkit), then over objects, in %; palette PNGs to out_dir/<name>/; max_frames: the demos' shortcut."""
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


# Frozen's (Tsimpoukelli et al. 2021) nonsense class words of the open-ended setting, by position in the episode
FROZEN_WORDS = ("dax", "blicket", "slation", "perpo", "shously")


def icl_episode(dataset, by_class, n, k, seed, task_induction=False, open_ended=False, repeats=0) -> tuple:
    """One episode of `icl` from its seed (any hashable): n classes, k support images each in shuffled order (the
    whole support shown 1 + repeats times: Frozen's "repeats"), then a query of one of them. open_ended: the n classes
    are called FROZEN_WORDS[:n] (Frozen's Open-Ended miniImageNet, episode_names); task_induction: "Answer with a or
    b." before the question. Returns (images, texts, the n classes, the query's class)."""
    eligible = sorted(c for c, idx in by_class.items() if len(idx) > k)
    if len(eligible) < n:
        raise data.DataError(f"icl: {n}-way {k}-shot needs {n} classes with > {k} images, have {len(eligible)}")
    if open_ended and n > len(FROZEN_WORDS):
        raise data.DataError(f"icl: open-ended {n}-way needs {n} nonsense words, Frozen's list has {len(FROZEN_WORDS)}")
    rng = random.Random(seed)
    classes = rng.sample(eligible, n)
    names, target = episode_names(dataset, classes, open_ended), rng.choice(classes)
    picks = {c: rng.sample(by_class[c], k + (c == target)) for c in classes}
    query, support = picks[target].pop(), [(i, c) for c in classes for i in picks[c]]
    rng.shuffle(support)
    support, prompt = support * (1 + repeats), "What is this? This is a"
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


def _settings(ways, shots, task_induction, repeats) -> list:  # (n, k, task induction?, repeats, key) of each asked
    listed = lambda v, kind: [v] if isinstance(v, kind) else v  # noqa: E731
    return [(n, k, ti, r, f"{n}way_{k}shot" + ("_induction" if ti else "") + (f"_{r}repeats" if r else ""))
            for n in listed(ways, int) for k in listed(shots, int) for ti in listed(task_induction, bool)
            for r in listed(repeats, int)]


def icl(generate, dataset, ways=(2, 5), shots=(1, 3, 5), episodes=100, seed=0, task_induction=(False, True),
        repeats=0, open_ended=False) -> dict:
    """Frozen's open-ended N-way K-shot classification, exact match, with the classes' real names or (open_ended)
    Frozen's nonsense words by position; the same episodes for every model (a seed per episode). generate(images,
    texts): the shuffled supports then the query, texts[i] after images[i] ("This is a <name>." / "What is this?
    This is a", after "Answer with a or b." with task induction). Keys "icl/2way_1shot" (+ "_induction",
    "_3repeats"): accuracy, 95 % interval, chance and `_in_context` (the answer is one of the episode's names,
    right or wrong; features that cannot tell the classes apart score at most about in_context / N), in %."""
    by_class, out = _by_class(dataset), {}
    for n, k, ti, r, key in _settings(ways, shots, task_induction, repeats):
        answers, truths, context = [], [], []
        for e in range(episodes):
            images, texts, classes, target = icl_episode(dataset, by_class, n, k, f"icl-{seed}-{n}-{k}-{e}", ti,
                                                         open_ended, r)
            names = episode_names(dataset, classes, open_ended)
            answers.append(generate(images, texts))
            truths.append(names[target])
            context.append(names.values())
        out.update(_icl_scores(f"icl/{key}", answers, truths, context, n))
    return out


def frozen_episodes(folder, ways, shots) -> list:
    """Frozen's released episodes (https://fh295.github.io/frozen.html: open_ended_mi.tar.gz, real_name_mi.tar.gz,
    extracted): folder/<task>_shots_<k>_ways_<n>_all_questions.json, a JSON list of one dict per question: image_1
    .. image_<n*k> (jpg names in folder, support order), caption_1 .. ("This is a dax."), question_image, question,
    answer. Returns those dicts."""
    files = sorted(glob.glob(os.path.join(folder, f"*_shots_{shots}_ways_{ways}_all_questions.json")))
    if not files:
        raise data.DataError(f"{folder}: no *_shots_{shots}_ways_{ways}_all_questions.json (Frozen's episode files)")
    with open(files[0]) as f:
        return json.load(f)


def icl_frozen(generate, folder, ways=(2, 5), shots=(1, 3, 5), task_induction=(False, True), repeats=0,
               episodes=None) -> dict:
    """`icl` on Frozen's fixed episodes (frozen_episodes): the file's captions as they are, the question
    followed by " This is a" as the prompt (our assumption of Frozen's "Q: What is this? A: This is a"),
    "Answer with a or b." (names read off the captions) before it with task induction, the support
    repeated as in `icl`. Keys "frozen/2way_1shot" and the rest as in `icl`. episodes: the first so many."""
    out = {}
    for n, k, ti, r, key in _settings(ways, shots, task_induction, repeats):
        answers, truths, context = [], [], []
        for q in frozen_episodes(folder, n, k)[:episodes]:
            captions = [q[f"caption_{i}"] for i in range(1, n * k + 1)]
            names = sorted({re.sub(r"^this is an? ", "", c.strip().rstrip(".").lower()) for c in captions})
            prompt = (q.get("question") or "What is this?").strip() + " This is a"
            if ti:
                order = random.Random(str(q.get("question_id"))).sample(names, len(names))
                prompt = f"Answer with {' or '.join(order)}. " + prompt
            files = [q[f"image_{i}"] for i in range(1, n * k + 1)] * (1 + r) + [q["question_image"]]
            answers.append(generate([data.load_image(os.path.join(folder, f)) for f in files],
                                    captions * (1 + r) + [prompt]))
            truths.append(q["answer"])
            context.append(names)
        out.update(_icl_scores(f"frozen/{key}", answers, truths, context, n))
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


def named_folder(folder, class_names=None):
    """data.ImageFolder whose classes are the names an episode writes: through class_names (a wnid file,
    read_class_names), else the folder names as words ("checkered_box" -> "checkered box", as a folder
    "house_finch" holds house finches: an LM reads and writes words, not file names)."""
    real = data.ImageFolder(folder)
    if class_names:
        mapping = read_class_names(class_names)
        missing = [c for c in real.classes if c not in mapping]
        if missing:
            raise data.DataError(f"{class_names}: no name for the folders {missing[:5]} of {folder}")
    real.classes = [mapping[c] if class_names else c.replace("_", " ") for c in real.classes]
    return real


def run_icl(generate, folder=None, ways=(2, 5), shots=(1, 3, 5), episodes=100, seed=0, class_names=None,
            task_induction=(False, True), repeats=0, frozen=()) -> dict:
    """The open-ended benchmarks a VLM of this repo reports: on an ImageFolder, `icl` with the real class
    names ("real/..."; wnid folders renamed through class_names, read_class_names) and with Frozen's
    nonsense words ("open/..."); on each of Frozen's released episode folders, icl_frozen
    ("<folder name>/frozen/...": every question of the files, as released)."""
    results = {}
    if folder:
        real = named_folder(folder, class_names)
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
    over it, then the query with the answer. Returns (answer, the query's true name)."""
    n = min(ways, len(dataset.classes))
    images, texts, _, target = icl_episode(dataset, _by_class(dataset), n, shots, f"icl-picture-{seed}")
    answer = generate(images, texts)
    tiles = [Image.fromarray(torch.as_tensor(im).permute(1, 2, 0).numpy()).resize((size, size)) for im in images]
    names = [f"support {j + 1}:\n{text}" for j, text in enumerate(texts[:-1])] + [f"query:\n-> {answer}"]
    data.labelled_grid([tiles], path, f"In-context {n}-way {shots}-shot episode: support images with their "
                       f"captions, then the query and the model's answer (truth: {dataset.classes[target]})",
                       col_names=names)
    return answer, dataset.classes[target]


# ====== Pictures: attention of 3 heads as R, G, B, per-video k-means maps; PNG grids and a GIF ========
COLOURS = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
                       dtype=torch.uint8)


@torch.no_grad()
def viz(backbone, frames, out_dir, name="video", device="cpu", heads=(0, 1, 2), ks=(5, 10), seed=0) -> list:
    """frames uint8 (T, 3, H, W) -> [<name>_grid.png, <name>.gif]: frames, [CLS] attention of `heads` as R, G, B
    (if the backbone has it), a k-means overlay per k; columns (GIF: time) the frames."""
    p = patch_size_of(backbone)
    T, _, H, W = frames.shape
    frames = frames[:, :, :H // p * p, :W // p * p]
    H, W = frames.shape[-2:]
    x = normalize(frames).to(device)
    rows, names = [frames], ["frame"]
    if hasattr(backbone, "get_last_selfattention"):
        attn = backbone.get_last_selfattention(x)[:, :, 0, 1:].float()  # [CLS] -> patches (T, heads, N)
        chosen = [h % attn.shape[1] for h in heads]
        attn = attn[:, chosen].reshape(T, 3, H // p, W // p)
        lo, hi = attn.amin(dim=(2, 3), keepdim=True), attn.amax(dim=(2, 3), keepdim=True)
        attn = (attn - lo) / (hi - lo).clamp_min(1e-12)  # each head stretched to [0, 1] per frame
        rows.append((F.interpolate(attn, scale_factor=p, mode="nearest") * 255).to(torch.uint8).cpu())
        names.append("[CLS] attention,\nheads {}, {}, {}\nas R, G, B".format(*chosen))
    tokens = backbone.get_intermediate_layers(x, 1)[0][:, 1:]
    flat = F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=1)
    for k in ks:  # one clustering per video, so that colours are consistent across frames
        labels = kmeans(flat, k, seed=seed)[0].cpu().view(T, 1, H // p, W // p)
        labels = F.interpolate(labels.float(), scale_factor=p, mode="nearest")[:, 0].long()
        colour = COLOURS[labels % len(COLOURS)].permute(0, 3, 1, 2)
        rows.append(((frames.float() + colour.float()) / 2).to(torch.uint8))
        names.append(f"k-means of patch\ntokens, k={k},\none colour a cluster")
    os.makedirs(out_dir, exist_ok=True)
    grid_path, gif_path = os.path.join(out_dir, f"{name}_grid.png"), os.path.join(out_dir, f"{name}.gif")
    title = f"{name}: the backbone's last block on {T} frames (k-means fitted on all frames at once)"
    data.labelled_grid([list(r) for r in rows], grid_path, title, names, [f"frame {t}" for t in range(T)])
    gif = [data.labelled_grid([[r[t] for r in rows]], None, title, None, [f"frame {t}"] + names[1:]) for t in range(T)]
    gif[0].save(gif_path, save_all=True, append_images=gif[1:], duration=200, loop=0)
    return [grid_path, gif_path]


# ====== Video k-means (TimeT's unsupervised video segmentation): frame-, clip- and dataset-wise =====
def cluster_miou(pred: torch.Tensor, truth: torch.Tensor, many_to_one=False) -> float:
    """mIoU (%) as TimeT's PredsmIoU(involve_bg=True) (metrics.py): the ids present in pred and truth (255 dropped)
    matched by Hungarian IoU, the unmatched clusters -> 0, or many_to_one (precision_based): each cluster to its
    highest-precision class; the mean over the classes present."""
    keep = truth != 255
    pred_ids, pred = pred[keep].unique(return_inverse=True)
    true_ids, true = truth[keep].unique(return_inverse=True)
    conf = confusion(pred, true, len(pred_ids), len(true_ids), ignore=-1)
    background = int((true_ids == 0).nonzero()[0]) if (true_ids == 0).any() else -1
    return miou(conf, match_clusters(conf, many_to_one, unmatched=background), gt_classes_only=True)


@torch.no_grad()
def clip_features(backbone, frames: torch.Tensor, size: int, device, batch: int = 32):
    """uint8 (T, 3, H, W) -> patch features (T, h, w, D), frames resized to `size` x `size`."""
    x = TF.resize(frames, [size, size], antialias=True)
    std = (0.228, 0.224, 0.225)  # TimeT evaluation.py's ClipToTensor (sic)
    x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), MEAN, std)
    feats = torch.cat([backbone.get_intermediate_layers(x[i:i + batch].to(device), 1)[0][:, 1:].float().cpu()
                       for i in range(0, len(x), batch)])
    return rearrange(feats, "t (h w) d -> t h w d", h=size // patch_size_of(backbone))


def pixel_clusters(feats: torch.Tensor, centroids: torch.Tensor, size: int) -> torch.Tensor:
    """(T, h, w, D), centroids (k, D) -> (T, size, size): each bilinearly upsampled feature u to its nearest
    centroid c; argmax u.c - |c|^2 / 2 is linear in u, so the patch scores are upsampled instead."""
    scores = feats @ centroids.t() - 0.5 * (centroids * centroids).sum(1)  # (T, h, w, k)
    up = F.interpolate(rearrange(scores, "t h w k -> t k h w"), size=(size, size), mode="bilinear", align_corners=False)
    return up.argmax(1)


def _upsample(feats, size) -> torch.Tensor:  # (T, h, w, d) -> (T * size * size, d), bilinear in float64 as TimeT
    up = F.interpolate(rearrange(feats, "t h w d -> t d h w").double(), size=(size, size), mode="bilinear",
                       align_corners=False)
    return rearrange(up.float(), "t d h w -> (t h w) d")


def pixel_kmeans(feats, k, size, niter=50, nredo=5, seed=1, chunk=16) -> torch.Tensor:
    """TimeT's clustering.cluster_features after its PCA: (T, h, w, d) upsampled bilinearly to size, faiss
    k-means on the pixels -> (T, size, size); faiss's k * 256 sample drawn chunk by chunk (memory)."""
    n = size * size  # pixels per frame
    idx = torch.randperm(len(feats) * n, generator=torch.Generator().manual_seed(seed))[:k * 256]
    starts = range(0, len(feats), chunk)
    sample = torch.cat([_upsample(feats[t:t + chunk], size)[idx[(idx >= t * n) & (idx < (t + chunk) * n)] - t * n]
                        for t in starts])
    centroids = faiss_kmeans(sample, k, niter, nredo, seed, max_points_per_centroid=256)[1]
    labels = [_assign(_upsample(feats[t:t + chunk], size), centroids, False, 16384)[1] for t in starts]
    return torch.cat(labels).view(len(feats), size, size)


@functools.lru_cache(maxsize=None)
def synthetic_classes(root: str, name: str) -> torch.Tensor:
    """Instance id -> class id (0 background, 255 kept) of a synthetic-world tour, from its generator."""
    meta = json.load(open(os.path.join(root, "world.json")))
    tour = data.SyntheticWorld(meta["seed"]).video(meta["videos"].index(name), meta["frames_per_video"], meta["size"])
    lut = torch.tensor([0] + [int(c) + 1 for c in tour["labels"]] + [0] * 255)
    lut[255] = 255
    return lut


@torch.no_grad()
def video_kmeans_miou(backbone, root: str, size: int, device, clip_frames: int = 16, world_root=None,
                      pca_batch: int = 16, pca_dim: int = 50, modes=("clip", "dataset"), k=None, many_to_one=False,
                      sampling="consecutive", seed=0, split_file=None):
    """TimeT's evaluation.py + clustering.py: standardise + PCA (per pca_batch clips; dataset: all), pixel_kmeans
    per frame (frame-wise), clip (its sample-wise) or on all clips (dataset-wise, at size // 2: official 112),
    cluster_miou. k: fixed (TimeT's default 10) or the labels present (< 2: skipped). sampling: back-to-back clips,
    or "timet": one clip of random sorted frames a video (SamplingMode.UNIFORM, seeded). Labels: DAVIS ids, a
    synthetic world's classes (dataset-wise), YouTube-VOS's category maps (data.YouTubeVOS val; split_file)."""
    backbone.eval()
    ytvos = expect_kind(root, ("davis", "youtube-vos"), "video-kmeans") == "youtube-vos"
    videos = data.YouTubeVOS(root, "val", seed) if ytvos else data.DAVIS(root, split="val")
    if ytvos and split_file:
        os.makedirs(os.path.dirname(os.path.abspath(split_file)), exist_ok=True)
        json.dump(dict(seed=seed, **videos.split), open(split_file, "w"))
    rng, clips = random.Random(seed), []  # (features (T, h, w, D), masks, semantic masks) at size
    for item in videos:
        frames, masks, n = item["frames"], item["masks"], len(item["frames"])
        timet = sorted(rng.sample(range(n), clip_frames) if n >= clip_frames else rng.choices(range(n), k=clip_frames))
        consecutive = [list(range(s, s + clip_frames)) for s in range(0, n - clip_frames + 1, clip_frames)]
        for idx in [timet] if sampling == "timet" else consecutive:
            m = videos.category_map(masks[idx], item["objects"]) if ytvos else masks[idx]
            semantic = synthetic_classes(world_root, item["name"])[m] if world_root else m
            clips.append((clip_features(backbone, frames[idx], size, device), *(resize_ids(x, size, "nearest-exact")
                                                                                 for x in (m, semantic))))
    if not clips:
        raise data.DataError(f"{root}: no val video has {clip_frames} frames (the clip length, --clip-frames)")
    k_of = lambda m: k or len(m[m != 255].unique())  # noqa: E731
    batch_scores = {mode: [] for mode in ("frame", "clip")}
    for b in range(0, len(clips), pca_batch):
        batch = clips[b:b + pca_batch]
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f, _, _ in batch])
        reduced = standardise_and_pca(flat, pca_dim).split([f[..., 0].numel() for f, _, _ in batch])
        scores = {mode: [] for mode in ("frame", "clip")}
        for (f, m, _), x in zip(batch, reduced):
            x = x.view(*f.shape[:3], -1)
            if "clip" in modes and k_of(m) > 1:
                scores["clip"].append(cluster_miou(pixel_kmeans(x, k_of(m), size), m, many_to_one))
            for t in range(len(x)) if "frame" in modes else ():
                if k_of(m[t]) > 1:
                    scores["frame"].append(cluster_miou(pixel_kmeans(x[t:t + 1], k_of(m[t]), size), m[t:t + 1],
                                                        many_to_one))
        for mode, values in scores.items():
            batch_scores[mode] += [float(np.mean(values))] if values else []
    suffix = "_many_to_one" if many_to_one else ""
    out = {f"video_kmeans/{mode}_wise_miou{suffix}": float(np.mean(batch_scores[mode])) for mode in ("frame", "clip")
           if mode in modes}
    if "dataset" in modes:
        feats, truth = torch.cat([f for f, _, _ in clips]), resize_ids(torch.cat([t for _, _, t in clips]), size // 2)
        reduced = standardise_and_pca(feats.reshape(-1, feats.shape[-1]), pca_dim).view(*feats.shape[:3], -1)
        pred = pixel_kmeans(reduced, k or int(truth[truth != 255].max()) + 1, size // 2)
        out[f"video_kmeans/dataset_wise_miou{suffix}"] = cluster_miou(pred, truth, many_to_one)
    return out


# ====== Dataset-level runners (CLI and run_suite share them) ========================================
# The protocol each benchmark runs, named in evaluate.py's JSON (official file: what is followed).
PROTOCOLS = {
    "knn": "DINO eval_knn.py: weighted k-NN on L2-normalised [CLS], k = 10/20/100/200, T = 0.07, top-1/top-5",
    "knn-sela": "SeLa cifar_utils.kNN: K = 10, sigma 0.1 on forward() (AlexNet fc7); CIFAR: cifar.py's test transform",
    "linear": "DINO eval_linear.py: crops on the fly, last 4 [CLS] (ViT-B: 1 + mean patch), cosine, best epoch",
    "linear-cached": "DINO eval_linear.py's head on cached centre-crop [CLS], lr held out (ours: for CPU and demos)",
    "linear-probes": "SeLa eval_linear_probes.py Probes (AlexNet) / eval_resnet.py (ResNet); ten-crop val, last epoch",
    "nmi": "each clustering head's argmax on val vs labels: NMI, adjusted NMI, ARI as sklearn's; mean over heads",
    "seg-linear": "Leopart linear_finetune.py + eval_linear.py: trainaug (VOC; COCO: 10 % of train), random "
                  "resized crops 0.8-1 + flips on the fly, tokens bilinear to 100x100, 1x1 conv, SGD 0.01 momentum "
                  "0.9 wd 1e-4, 25 epochs x 0.1 at 20, batch 120; scored at 448, mIoU over all classes, 255 ignored",
    "seg-linear-cached": "1x1-conv probe on cached patch tokens of train (trainaug if present; ours: no augmentation, "
                         "AdamW + cosine), logits upsampled bilinearly to the mask; mIoU over all classes (PredsmIoU)",
    "seg-fcn": "Leopart linear_finetune.py with fcn_head.py (configs/pascal/fcn: 10 epochs, batch 64, lr 0.01) as "
               "seg-linear; eval_linear.py: tokens bilinear to 448 before the head",
    "seg-cluster": "Leopart sup_overcluster.py: standardise + PCA50, k-means as faiss (100 it, 5 restarts) with "
                   "5 seeds averaged, nearest to 100x100; K = #classes Hungarian IoU, K = 100/300/500 "
                   "many-to-one (precision); fg_k variant ours",
    "propagate": "DINO eval_video_segmentation.py: cv2 INTER_LINEAR to short side 480 (long side floored to x64), "
                 "std 0.228, T = 0.1, top-5, first + 7 previous frames, neighbourhood 12; J, F as the DAVIS toolkit",
    "video-kmeans": "TimeT evaluation.py + clustering.py: standardise + PCA50, features upsampled bilinearly, k-means "
                    "as faiss (50 it, 5 restarts, seed 1) on the pixels, Hungarian IoU (PredsmIoU); clip-wise at the "
                    "input size, dataset-wise at half",
}


def expect_kind(root, kinds, bench) -> str:  # root's data.dataset_kind, else a DataError saying what bench reads
    if (kind := data.dataset_kind(root)) not in kinds:
        raise data.DataError(f"{root}: laid out as {kind} (see data.py inspect); {bench} reads {' or '.join(kinds)}")
    return kind


def _loader(dataset, batch_size, num_workers):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)


def classification_sets(root, transform) -> tuple:
    """(train, val) of an ImageFolder root with train/ and val/, or of CIFAR / SVHN as downloaded (test as val)."""
    if any(os.path.exists(os.path.join(root, f)) for f in ("batches.meta", "meta", "test_32x32.mat")):
        return data.SmallImages(root, "train", transform), data.SmallImages(root, "test", transform)
    return tuple(data.ImageFolder(os.path.join(root, s), transform) for s in ("train", "val"))


def classification(backbone, root, device, benches=("knn", "linear"), image_size=224, batch_size=64, num_workers=0,
                   epochs=100, knn_protocol="dino", linear_protocol="cached", lr=0.001, linear_batch_size=1024) -> dict:
    """knn (DINO's, or SeLa's: K 10, sigma 0.1) and/or linear (cached features, or DINO's linear_augmented)."""
    sela = knn_protocol == "sela" and "knn" in benches
    sets = classification_sets(root, functools.partial(classify_transform, size=image_size))
    for s in sets if sela and isinstance(sets[0], data.SmallImages) else ():  # SeLa cifar.py's own test transform
        s.transform = functools.partial(sela_cifar_transform, size=image_size)
    out = {}
    if "knn" in benches or "linear" in benches and linear_protocol == "cached":
        (train_x, train_y), (val_x, val_y) = [extract(backbone, _loader(s, batch_size, num_workers), device, 4)
                                              for s in sets]
        train_y, val_y = train_y.to(device), val_y.to(device)
    if sela and len(train_x) % 64:  # cifar_utils.kNN stores its last batch of r < 64 at (n // 64) * r: kept
        n, r = len(train_x), len(train_x) % 64
        last, train_x = train_x[n - r:], torch.cat([train_x[:n - r], torch.zeros_like(train_x[n - r:])])
        train_x[n // 64 * r:n // 64 * r + r] = last
    if "knn" in benches:  # the last block's [CLS] or a conv net's forward(), as DINO's eval_knn.py
        out.update(knn(train_x[:, -1].to(device), train_y, val_x[:, -1].to(device), val_y,
                       **(dict(ks=(10,), temperature=0.1) if sela else {})))
    if "linear" in benches and linear_protocol == "dino":
        train = classification_sets(root, functools.partial(random_crop_transform, size=image_size))[0]
        out.update(linear_augmented(backbone, train, sets[1], device, epochs, lr, linear_batch_size, num_workers))
    elif "linear" in benches:  # DINO: the [CLS] of the last 4 blocks, concatenated
        out.update(linear(train_x.flatten(1).to(device), train_y, val_x.flatten(1).to(device), val_y, epochs=epochs))
    return out


def segmentation(backbone, root, device, benches=("seg-linear", "seg-cluster"), image_size=448, batch_size=16,
                 num_workers=0, epochs=20, ks=(100, 300, 500), restarts=5, seeds=5, recipe="cached", labels="stuff",
                 eval_size=448, seed=0) -> dict:
    """seg-linear / seg-fcn (train -> val; recipe "leopart": seg_linear_leopart, "cached": seg_linear) and/or
    seg-cluster (val) on a VOC root (trainaug when present), ADE20K or COCO (labels stuff / thing, 10 % of train)."""
    kind = expect_kind(root, ("voc", "coco", "ade20k"), "seg-*")
    coco, aug = kind == "coco", os.path.exists(f"{root}/ImageSets/Segmentation/trainaug.txt")

    def sets(split, transform):
        if kind == "ade20k":
            return data.ADE20K(root, split, transform)
        if coco:
            return data.COCOSegmentation(root, split, transform, labels, 0.1 if split == "train" else 1, seed)
        return data.VOCSegmentation(root, "trainaug" if split == "train" and aug else split, transform)
    val = sets("val", functools.partial(seg_transform, size=image_size))
    val_x, val_y = extract(backbone, _loader(val, batch_size, num_workers), device, patch_tokens=True)
    out = {}
    for head in [h for h in ("linear", "fcn") if f"seg-{h}" in benches and recipe == "leopart"]:
        train = sets("train", functools.partial(seg_augment, size=image_size))
        out.update(seg_linear_leopart(backbone, train, val_x, val_y, val.num_classes, device, head, epochs=epochs,
                                      batch_size=(120, 64)[head == "fcn"], eval_size=eval_size,
                                      num_workers=num_workers, seed=seed))
    if "seg-linear" in benches and recipe == "cached":
        train = sets("train", functools.partial(seg_transform, size=image_size))
        train_x, train_y = extract(backbone, _loader(train, batch_size, num_workers), device, patch_tokens=True)
        out.update(seg_linear(train_x, train_y, val_x, val_y, val.num_classes, epochs=epochs, device=device))
    if "seg-cluster" in benches:
        out.update(seg_cluster(val_x, val_y, val.num_classes, ks=ks, restarts=restarts, seeds=seeds, device=device))
    return out


def run_suite(backbone, root, benches=("knn", "linear", "seg-linear", "seg-cluster", "propagate"), device="cpu",
              image_size=64, out_dir=None) -> dict:
    """The demos' before/after table on a synthetic-world root (objects/, voc/, davis/): images at image_size,
    frames at short side 2 * image_size, first 24 frames. Prints it; -> numbers and "time/<bench>" (s)."""
    backbone, out = backbone.to(device).eval(), {}
    for group, names in [("cls", ("knn", "linear")), ("seg", ("seg-linear", "seg-cluster")), ("vid", ("propagate",))]:
        chosen = tuple(b for b in benches if b in names)
        if not chosen:
            continue
        start = time.time()
        if group == "cls":
            out.update(classification(backbone, os.path.join(root, "objects"), device, chosen, image_size, epochs=30))
        elif group == "seg":
            out.update(segmentation(backbone, os.path.join(root, "voc"), device, chosen, image_size, epochs=30,
                                    restarts=1, seeds=1))  # the demos' shortcut: 1 k-means run, not 5 x 5
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
BENCHES = ("knn", "linear", "linear-probes", "nmi", "seg-linear", "seg-cluster", "propagate", "video-kmeans", "icl",
           "viz", "suite", "seg-fcn", "unsup-seg")


def get_args(argv=None):
    p = argparse.ArgumentParser("evaluate.py: DINO-style benchmarks for a frozen backbone",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("bench", choices=BENCHES, help="suite: all on a synthetic-world root; icl: secat.py")
    p.add_argument("--data", help="(required) ImageFolder root with train/ val/ (knn, linear), "
                   "VOC-layout root (seg-*), DAVIS-layout root (propagate, video-kmeans), videos (viz), synth root")
    p.add_argument("--ckpt", default=None, help="checkpoint of a method of this repo, or an official DINO one")
    p.add_argument("--arch", default="vit_small", help="vit_demo|vit_tiny|vit_small|vit_base|pixels, for "
                   "official DINO weights and --random-init without --ckpt; pixels = the raw-RGB floor")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--random-init", action="store_true", help="fresh weights of the same architecture")
    p.add_argument("--image-size", type=int, help="224 (knn, linear, video-kmeans), 448 (seg-*), 64 (suite)")
    p.add_argument("--short-side", type=int, default=480, help="propagate/viz: frame short side (DINO: 480)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--epochs", type=int, help="probes' (default: 100 linear; seg-linear 25, cached 20; seg-fcn 10)")
    p.add_argument("--knn-protocol", default="dino", choices=["dino", "sela"], help="sela: cifar.py's K 10, sigma 0.1")
    p.add_argument("--linear-protocol", choices=["dino", "cached"], help="default: dino (crops on the fly) on CUDA")
    p.add_argument("--lr", type=float, default=0.001, help="linear (dino) lr per 256 images (DINO 0.001, DoRA 0.01)")
    p.add_argument("--probe-batch-size", type=int, help="linear: 1024 (DoRA 2048); linear-probes: 192 / 1024")
    p.add_argument("--restarts", type=int, default=5, help="seg-cluster: k-means restarts (best kept; Leopart: 5)")
    p.add_argument("--clip-frames", type=int, default=16, help="video-kmeans: frames per clip (TimeT: 16)")
    p.add_argument("--max-videos", type=int, default=3, help="viz: pictures for this many videos")
    p.add_argument("--frames", type=int, default=8, help="viz: frames per video")
    p.add_argument("--output-dir", default="runs/eval", help="propagate: palette PNGs; viz: pictures")
    p.add_argument("--recipe", choices=["leopart", "cached"], default=None, help="seg-linear: Leopart's augmented "
                   "on-the-fly probe or ours on cached tokens (default: leopart on CUDA, cached on CPU)")
    p.add_argument("--labels", choices=["stuff", "thing"], default="stuff", help="COCO: Leopart's 15 / 12 classes")
    p.add_argument("--mask-eval-size", type=int, default=448, help="seg-linear/fcn leopart: scored at (official 448)")
    p.add_argument("--mode", nargs="+", choices=["frame", "clip", "dataset"], default=["clip", "dataset"],
                   help="video-kmeans: a k-means per frame (TimeT's default), per clip, on the whole dataset")
    p.add_argument("--k", type=int, default=None, help="video-kmeans: clusters (TimeT's default 10); default: labels")
    p.add_argument("--many-to-one", action="store_true", help="video-kmeans: overclustering, precision-based")
    p.add_argument("--sampling", choices=["consecutive", "timet"], default="consecutive", help="video-kmeans: clips "
                   "back to back, or TimeT's one clip of --clip-frames random sorted frames per video (its: 4)")
    p.add_argument("--attention", help="unsup-seg: a folder of Leopart's attn_dino_{train,val}.pt, else ours")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.data is None and args.bench != "icl":  # icl only points to secat.py
        p.error("the following arguments are required: --data")
    if args.k is not None and args.k < 2:  # a k-means of one cluster scores nothing (NaN)
        p.error(f"--k {args.k}: video-kmeans needs at least 2 clusters")
    return args


def main(args):
    if args.bench == "icl":  # answering needs the method's language model: secat.py scores its own checkpoints
        if not args.ckpt:
            raise data.DataError("icl: needs --ckpt, a secat.py checkpoint (secat.py --eval-only scores it)")
        state = data.load_checkpoint(args.ckpt, flag="--ckpt")
        if state.get("method") == "secat":
            raise data.DataError(f"--ckpt {args.ckpt}: a SeCAt checkpoint; score it with: python secat.py --eval-only "
                                 f"{args.ckpt} --eval-data DIR")
        raise data.CheckpointError(f"--ckpt {args.ckpt}: holds {data.describe_checkpoint(state)}; icl needs a "
                                   "checkpoint of a method with a language model (secat.py)")
    torch.manual_seed(args.seed)  # --random-init draws its weights from this seed
    backbone = load_backbone(args.ckpt, args.arch, args.patch_size, args.random_init).to(args.device)
    backbone.requires_grad_(False)
    device, size, workers = args.device, args.image_size, args.num_workers
    linear = args.linear_protocol or ("dino" if torch.device(device).type == "cuda" else "cached")
    if args.bench in ("knn", "linear"):
        results = classification(backbone, args.data, device, (args.bench,), size or 224, args.batch_size, workers,
                                 args.epochs or 100, args.knn_protocol, linear, args.lr, args.probe_batch_size or 1024)
        suffix = {"knn": "-sela" * (args.knn_protocol == "sela"), "linear": "-cached" * (linear == "cached")}
        args.bench += suffix[args.bench]
    elif args.bench == "linear-probes":  # SeLa's crops: random for training, ten per val image
        train, val = classification_sets(args.data, functools.partial(random_crop_transform, size=224))
        val.transform = functools.partial(ten_crop_transform, size=224)
        results = linear_probes(backbone, train, val, device, args.epochs, args.probe_batch_size, workers, args.seed)
    elif args.bench == "nmi":  # each clustering head's argmax on val against the labels
        heads = cluster_heads(args.ckpt)
        val = classification_sets(args.data, functools.partial(classify_transform, size=size or 224))[1]
        x, y = extract(backbone, _loader(val, args.batch_size, workers), device)
        results = {key: float(np.mean([score((x[:, -1] @ w.T + b).argmax(1), y) for w, b in heads]))
                   for key, score in [("nmi", nmi), ("anmi", adjusted_nmi), ("ari", ari)]}
    elif args.bench in ("seg-linear", "seg-cluster", "seg-fcn"):
        recipe = "leopart" if args.bench == "seg-fcn" else args.recipe or ("cached" if device == "cpu" else "leopart")
        results = segmentation(backbone, args.data, device, (args.bench,), size or 448, args.batch_size, workers,
                               args.epochs or (20 if recipe == "cached" else 10 if args.bench == "seg-fcn" else 25),
                               restarts=args.restarts, recipe=recipe, labels=args.labels,
                               eval_size=args.mask_eval_size, seed=args.seed)
        args.bench += "-cached" if recipe == "cached" and args.bench == "seg-linear" else ""
    elif args.bench == "unsup-seg":
        foreground = saved_foreground(args.attention) if args.attention else attention_foreground
        results = unsupervised_segmentation_voc(backbone, args.data, size or 448, foreground, 200, 149, args.seed)
        results["foreground"] = args.attention or "the evaluated backbone's [CLS] attention (attention_foreground)"
    elif args.bench == "propagate":
        results = propagate(backbone, data.DAVIS(args.data), device, args.output_dir, short_side=args.short_side)
    elif args.bench == "video-kmeans":  # a synthetic world's davis/ is scored on its semantic classes
        world = os.path.dirname(os.path.abspath(args.data))
        world = world if os.path.exists(os.path.join(world, "world.json")) else None
        results = video_kmeans_miou(backbone, args.data, size or 224, device, args.clip_frames, world, modes=args.mode,
                                    k=args.k, many_to_one=args.many_to_one, sampling=args.sampling, seed=args.seed,
                                    split_file=os.path.join(args.output_dir, "ytvos_split.json"))
    elif args.bench == "viz":
        paths = []
        for i, video in enumerate(data.find_videos(args.data)[:args.max_videos]):
            n = data.probe_video(video).num_frames
            idx = np.linspace(0, n - 1, min(args.frames, n)).round().astype(int).tolist()
            frames = data.read_frames(video, idx, short_side=args.short_side if size is None else size)
            paths += viz(backbone, frames, args.output_dir, name=f"video{i}", device=device, seed=args.seed)
        print("\n".join(paths))
        results = {"viz/pictures": len(paths)}
    else:  # suite: it prints its own table; the JSON names each benchmark's protocol
        results = run_suite(backbone, args.data, device=device, image_size=size or 64, out_dir=args.output_dir)
        results["protocol"] = {b: PROTOCOLS.get(b + "-cached", PROTOCOLS[b]) for b in
                               ("knn", "linear", "seg-linear", "seg-cluster", "propagate")}
    if args.bench != "suite":
        print_table(results, f"{args.bench}: {args.ckpt or ('random ' if args.random_init else '') + args.arch}")
        results["protocol"] = results.get("protocol", PROTOCOLS.get(args.bench, "ours"))
        if args.bench == "video-kmeans" and (args.k, args.many_to_one, args.sampling, args.mode) != (
                None, False, "consecutive", ["clip", "dataset"]):
            results["protocol"] += f"; --mode {args.mode} --k {args.k} many-to-one {args.many_to_one} {args.sampling}"
    print(json.dumps(results))


if __name__ == "__main__":
    data.cli(main, get_args)
