"""DoRA: discover and track objects to learn image features from one long video.

Venkataramanan, Rizve, Carreira, Asano, Avrithis. "Is ImageNet worth 1 video? Learning
strong image encoders from 1 long unlabelled video". ICLR 2024.
https://arxiv.org/abs/2310.08584 (project page https://shashankvkt.github.io/dora)

The idea. DINO learns by making a student match an EMA teacher on two crops of one image. In a video the natural "second
view" of an object is the same object some seconds later, but it moves and the camera moves, so a crop-to-crop
correspondence no longer holds. DoRA finds the correspondences itself, with the teacher's own attention and no tracker:
  1. discover: on the first frame of a clip, the [CLS]-to-patch attention of k = 3 random heads of the teacher's last
     block weighs the patch queries into k object prototypes; Sinkhorn-Knopp then shares the patches out equally
     between the prototypes, so that the k objects are distinct rather than three copies of the most salient one;
  2. track: in every frame, each prototype cross-attends to that frame's patch keys; the patches above the mean
     attention (over the batch) form the object's mask there;
  3. learn: the student sees each frame masked to one object (k masked clips) and small local crops, and matches the
     teacher's output for the unmasked frame (DINO loss).
Trained from scratch on one Walking Tours video (Venice, 4K), a ViT-S/16 comes out on par with DINO trained on ImageNet
(see the paper's tables for the numbers).

Commands:
    python dora.py --demo                                    # tiny ViT, synthetic tours, CPU (see README)
    python dora.py --data venice.mp4                         # one GPU
    torchrun --nproc_per_node=8 dora.py --data venice.mp4    # the paper's run (README command)
    python dora.py --data venice.mp4 --resume                # continue <output-dir>/checkpoint.pth

Contents: config; a DINO-compatible ViT (its last block's queries and keys too), DINO's head; the clip augmentation;
the tracker (Sinkhorn-Knopp, discovery, tracking, masking); the loss; training; evaluation and the tracker's picture.
"""
import argparse
import json
import math
import os
import random
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from einops import rearrange
from tqdm import tqdm

import data

METHOD = "dora"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ====== Config: the official code's defaults, and the README command's values where it sets them
# --demo: a tiny ViT on 64-px crops of the synthetic world's videos, on CPU; flags given win
DEMO = dict(arch="vit_demo", patch_size=8, out_dim=1024, norm_last_layer=1, image_size=64, precrop_size=86,
            frames_per_clip=4, step_between_clips=4, clip_start_every=2, local_crops_number=2, epochs=8,
            batch_size_per_gpu=8, lr=0.015, min_lr=1e-5, warmup_epochs=1, warmup_teacher_temp_epochs=0,
            momentum_teacher=0.99, num_workers=2, log_every=5)


def get_args(argv=None):
    p = argparse.ArgumentParser("DoRA: discover and track objects in one long video")
    p.add_argument("--data", nargs="+", default=None, help="video files (mp4 ...), frame folders, or folders of them")
    p.add_argument("--output-dir", default="runs/dora")
    p.add_argument("--demo", action="store_true", help="tiny ViT, short schedule, synthetic world (CPU, minutes)")
    p.add_argument("--eval-data", default=None, help="--demo: evaluate on this root laid out like the synthetic world")
    p.add_argument("--pretrained", default=None, help="start from DINO weights (backbone or full checkpoint)")
    # model
    p.add_argument("--arch", default="vit_small", choices=["vit_demo", "vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--out-dim", type=int, default=65536, help="DINO head output dimension")
    p.add_argument("--norm-last-layer", type=int, default=0, choices=[0, 1],
                   help="fix the norm of the head's last layer (README: 0 for ViT-S; DINO's default 1 is steadier)")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the student")
    # data: clips of a long video
    p.add_argument("--frames-per-clip", type=int, default=8)
    p.add_argument("--step-between-clips", type=int, default=60,
                   help="frames between consecutive frames of a clip (official name and meaning; README: 60)")
    p.add_argument("--clip-start-every", type=int, default=1, help="clips start this many frames apart (official: 1)")
    p.add_argument("--short-side", type=int, default=None, help="decode at this short side (official: full size)")
    p.add_argument("--precrop-size", type=int, default=300, help="clip-consistent first crop, scale --precrop-scale")
    p.add_argument("--precrop-scale", type=float, nargs=2, default=(0.2, 1.0))
    p.add_argument("--image-size", type=int, default=224, help="global crop; local crops are half of it (112)")
    p.add_argument("--global-crops-scale", type=float, nargs=2, default=(0.4, 1.0))
    p.add_argument("--local-crops-number", type=int, default=6, help="README: 6 (code default 8)")
    p.add_argument("--local-crops-scale", type=float, nargs=2, default=(0.05, 0.4))
    # the tracker
    p.add_argument("--num-objects", type=int, default=3, help="k: heads (= objects) drawn at random each step")
    p.add_argument("--sk-eps", type=float, default=0.05, help="Sinkhorn-Knopp entropic regularisation ε")
    p.add_argument("--sk-iters", type=int, default=30)
    # DINO loss and teacher
    p.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    p.add_argument("--teacher-temp", type=float, default=0.04)
    p.add_argument("--warmup-teacher-temp-epochs", type=int, default=30, help="README: 30")
    p.add_argument("--student-temp", type=float, default=0.1)
    p.add_argument("--center-momentum", type=float, default=0.9)
    p.add_argument("--paper-loss", type=int, default=0, choices=[0, 1], help="1: the paper's plain mean over objects "
                   "and all local crops (official: skips local crop 0, weighs earlier objects more)")
    p.add_argument("--momentum-teacher", type=float, default=0.996, help="EMA, cosine to 1")
    # optimisation
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size-per-gpu", type=int, default=16, help="clips per GPU (README: 16 on A100, 6 on V100)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW peak lr for 256 clips, scaled by total batch/256")
    p.add_argument("--min-lr", type=float, default=1e-5, help="end of the cosine (README: 1e-5; DINO's default 1e-6)")
    p.add_argument("--warmup-epochs", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.04)
    p.add_argument("--weight-decay-end", type=float, default=0.4)
    p.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient norm clip (0: off)")
    p.add_argument("--freeze-last-layer", type=int, default=1, help="epochs with the head's last layer fixed")
    args = data.parse_args(p, argv, DEMO, workers=10, log_every=10)  # + the run flags all share
    if args.demo:
        args.eval_data = data.demo_eval_root(args.eval_data, ["knn", "seg-cluster", "propagate"])  # default: synthetic
        args.data = args.data or [os.path.join(data.ensure_synth("runs/synth", seed=0), "videos")]
    if args.data is None:
        p.error("--data is required (a video, a frame folder, or a folder of them), or --demo")
    return args


# ====== Model: this file's own copy of DINO's ViT, head and multi-crop wrapper (DINO's names: its weights load)
class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):  # (B, N, D) -> queries, keys, values stacked: (3, B, heads, N, D/heads)
        B, N, D = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):  # (B, N, D) -> (B, N, D), by the fused kernel (flash / memory-efficient)
        q, k, v = self.qkv_heads(x)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def queries_keys(self, x):  # (B, N, D) -> queries, keys (B, heads, N, D/heads): the tracker's inputs
        q, k, _ = self.qkv_heads(x)
        return q, k

    def weights(self, x):  # (B, N, D) -> softmax attention (B, heads, N, N), for pictures
        q, k = self.queries_keys(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT with a [CLS] token; DINO's interface: forward -> [CLS] (B, D) after the final norm,
    get_last_selfattention -> (B, heads, 1+N, 1+N), get_intermediate_layers(x, n) -> n x (B, 1+N, D);
    and DoRA's forward_track (the tracker's inputs)."""

    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                 drop_path_rate=0.0, img_size=224):
        super().__init__()
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()  # DINO keeps a (unused) head slot; no parameters
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):  # DINO's; its LayerNorms' ones and zeros are torch's defaults
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, num_patches: int, h: int, w: int) -> torch.Tensor:
        """Bicubic resize of the patch part of the positional embedding to an (h/p, w/p) grid,
        as DINO does it (scale factor with DINO's +0.1 so that floors land on the grid)."""
        n = self.pos_embed.shape[1] - 1
        if num_patches == n and h == w:
            return self.pos_embed
        p, side = self.patch_embed.patch_size, int(math.sqrt(n))
        h0, w0 = h // p + 0.1, w // p + 0.1
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(h0 / side, w0 / side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def prepare_tokens(self, x):  # (B, 3, H, W) -> (B, 1+N, D)
        B, _, H, W = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(x)], dim=1)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, H, W)

    def forward(self, x):  # (B, 3, H, W) -> (B, D): the last layer's [CLS], normed
        return self.get_intermediate_layers(x, 1)[0][:, 0]

    def forward_track(self, x):
        """(B, 3, H, W) -> tokens (B, 1+N, D) after the final norm, and the last block's queries and keys
        (B, heads, 1+N, D/heads)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        q, k = self.blocks[-1].attn.queries_keys(self.blocks[-1].norm1(x))
        return self.norm(self.blocks[-1](x)), q, k

    def get_last_selfattention(self, x):  # -> (B, heads, 1+N, 1+N)
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.weights(self.blocks[-1].norm1(x))

    def get_intermediate_layers(self, x, n: int = 1):  # -> list of n tensors (B, 1+N, D), normed
        x, out = self.prepare_tokens(x), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out


ARCHS = {"vit_demo": (192, 4, 3), "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def build_backbone(args: dict, drop_path: float = 0.0) -> nn.Module:
    """Fresh backbone from args (a dict: a checkpoint's stored args too); ARCHS: (embed_dim, depth, num_heads)."""
    return VisionTransformer(args["patch_size"], *ARCHS[args["arch"]], drop_path_rate=drop_path)


# DINO's projection head and multi-crop wrapper: DINO's eval scripts read our checkpoints with --checkpoint_key teacher
class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| per output row, i.e. what
    nn.utils.weight_norm builds, with its parameter names weight_g and weight_v."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as in DINO
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        return F.linear(x, self.weight_g * F.normalize(self.weight_v, dim=1))


class DINOHead(nn.Module):
    """3-layer MLP (hidden 2048, GELU) -> 256-d bottleneck, L2-normalised -> weight-normalised
    linear layer to out_dim. (B, D) -> (B, out_dim)."""

    def __init__(self, in_dim, out_dim, norm_last_layer=True, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp.apply(VisionTransformer._init_weights)  # DINO's: truncated normal, std 0.02, zero biases
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer  # a fixed norm steadies training

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropWrapper(nn.Module):
    """backbone + head over a list of crop batches, one backbone pass per resolution:
    [(B_i, 3, H_i, W_i)] -> (sum B_i, out_dim)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        crops = crops if isinstance(crops, (list, tuple)) else [crops]
        return self.head(torch.cat([self.backbone(c) for c in crops]))


# ====== Data: a clip of T frames, `step_between_clips` frames apart, and its crops
class ClipAugmentation:
    """uint8 (T, 3, H, W) -> [global clip (T, 3, S, S), local clip 1 (T, 3, S/2, S/2), ...]. One aggressive crop
    shared by the clip (300 px, scale 0.2-1), then a shared 224 global crop (scale 0.4-1) and flip, both resized as
    torchvision's RandomResizedCropVideo (F.interpolate: bilinear, no antialiasing); local crops (112 px, scale
    0.05-0.4, PIL bicubic: antialiased) per frame from the 300-px crop; colour, gray, blur per frame. on_device (a GPU
    run): the loader makes only the uint8 300-px crop [(T, 3, 300, 300)], and finish() the rest there, batched."""

    def __init__(self, args, on_device=False):
        self.a, self.on_device = args, on_device or bool(getattr(args, "bench", 0))  # --bench: a GPU run's loader
        self.jitter = T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
        self.gray = T.RandomGrayscale(p=0.2)

    @staticmethod
    def crop(x, size, scale, mode=T.InterpolationMode.BILINEAR, antialias=False):  # one box for all frames
        i, j, h, w = T.RandomResizedCrop.get_params(x, scale, (3 / 4, 4 / 3))
        return TF.resized_crop(x, i, j, h, w, [size, size], interpolation=mode, antialias=antialias).clamp(0, 1)

    def photometric(self, frame, blur_p):  # (3, H, W) in [0, 1] -> normalised
        frame = self.gray(self.jitter(frame))
        if torch.rand(()) < blur_p:  # official utils.GaussianBlur: PIL's radius (= σ) 0.1-2 px at any crop size
            sigma = float(torch.empty(()).uniform_(0.1, 2.0))
            frame = TF.gaussian_blur(frame, 2 * math.ceil(3 * sigma) + 1, sigma)
        return TF.normalize(frame, MEAN, STD)

    @staticmethod
    def photometric_batch(x, blur_p):  # photometric() of every image of x (N, 3, H, W), batched
        x = data.random_grayscale(data.color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8), 0.2)
        sigma = torch.empty(len(x), device=x.device).uniform_(0.1, 2.0)  # kernel 2 ceil(3 sigma) + 1: 13 at most
        return TF.normalize(data.gaussian_blur(x, sigma, 2 * torch.ceil(3 * sigma).long() + 1, blur_p, 13), MEAN, STD)

    def finish(self, crops, device):  # on the device: the crops of __call__'s CPU path, batched
        crops = [c.to(device, non_blocking=True) for c in crops]
        if not self.on_device:
            return crops
        a, clips = self.a, crops[0].float() / 255  # (B, T, 3, P, P)
        (B, T_, C, P, _), S, L = clips.shape, a.image_size, a.local_crops_number
        boxes = data.random_boxes(B, P, P, a.global_crops_scale, device=device)  # one box and flip per clip
        glob = data.resized_crops(clips.flatten(1, 2), boxes, S).clamp(0, 1).view(B, T_, C, S, S)
        glob = torch.where(torch.rand(B, 1, 1, 1, 1, device=device) < 0.5, glob.flip(-1), glob)
        out = [self.photometric_batch(glob.flatten(0, 1), 0.1).view_as(glob)]
        boxes = data.random_boxes(L * B * T_, P, P, a.local_crops_scale, device=device).view(L, B * T_, 4)
        local = torch.cat([data.resized_crops(clips.flatten(0, 1), b, S // 2, antialias=True) for b in boxes])
        local = local.clamp(0, 1)  # (L*B*T, 3, S/2, S/2): a box per frame and crop
        return out + list(self.photometric_batch(local, 0.5).view(L, B, T_, C, S // 2, S // 2).unbind(0))

    def __call__(self, frames):
        a = self.a
        i, j, h, w = T.RandomResizedCrop.get_params(frames, a.precrop_scale, (3 / 4, 4 / 3))  # uint8 crop, then float
        if self.on_device:
            return [TF.resized_crop(frames, i, j, h, w, [a.precrop_size] * 2, antialias=False)]
        clip = TF.resized_crop(frames[..., i:i + h, j:j + w].float() / 255, 0, 0, h, w, [a.precrop_size] * 2,
                               interpolation=T.InterpolationMode.BILINEAR, antialias=False).clamp(0, 1)
        glob = self.crop(clip, a.image_size, a.global_crops_scale)
        glob = glob.flip(-1) if torch.rand(()) < 0.5 else glob
        local = lambda f: self.photometric(self.crop(f, a.image_size // 2, a.local_crops_scale,
                                                     T.InterpolationMode.BICUBIC, antialias=True), 0.5)
        return [torch.stack([self.photometric(f, 0.1) for f in glob])] + \
            [torch.stack([local(f) for f in clip]) for _ in range(a.local_crops_number)]


# ====== Discover and track (paper Sec. 3, official utils.MOT), without gradients, the arithmetic in float32
@torch.no_grad()
def sinkhorn_online(scores: torch.Tensor, eps: float = 0.05, iters: int = 30) -> torch.Tensor:
    """(B, N, K) patch-to-prototype similarities -> (B, N, K) soft assignment: each patch's row
    sums to 1 and each prototype receives N/K patches in total (equipartition). Same
    alternating row/column scaling of exp(scores / ε) as SwAV, done in log space."""
    B, N, K = scores.shape
    log_q = scores.float() / eps
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(K)  # each prototype: mass 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=2, keepdim=True) - math.log(N)  # each patch: mass 1/N
    return log_q.exp() * N


@torch.no_grad()
def discover_objects(cls_attn, queries, features, use_sinkhorn=True, eps=0.05, iters=30):
    """First frame -> k object prototypes (B, k, D). cls_attn (B, k, N): [CLS]-to-patch attention of the k chosen heads;
    queries (B, N, D): patch queries of the last block, heads concatenated; features (B, N, D): teacher patch tokens."""
    prototypes = torch.einsum("bkn,bnd->bkd", cls_attn.float(), queries.float())
    if not use_sinkhorn:
        return prototypes
    features = F.normalize(features.float(), dim=-1)
    assignment = sinkhorn_online(features @ prototypes.transpose(1, 2), eps, iters)  # (B, N, k)
    return assignment.transpose(1, 2) @ features  # refined: each object = its share of the patches


@torch.no_grad()
def track_objects(prototypes, keys):
    """prototypes (B, k, D), keys (B, T, N, D) of every frame's patches (heads concatenated) ->
    attention maps (B, k, T, N) (softmax over patches) and masks (B, k, T, N): each map divided by its
    L2 norm, kept above the mean of those over the batch, per object and frame (official utils.MOT;
    under DDP each rank's own batch, as there). A map's peak always passes: no mask is empty."""
    logits = torch.einsum("bkd,btnd->bktn", prototypes.float(), keys.float()) * prototypes.shape[-1] ** -0.5
    maps = logits.softmax(dim=-1)
    unit = maps / maps.norm(dim=-1, keepdim=True)
    # the official threshold, the batch mean; the paper's text puts each map at its own mean
    return maps, unit > unit.mean(dim=(0, 3), keepdim=True)


@torch.no_grad()
def tracker_inputs(teacher_backbone, clip, heads):
    """clip (B, T, 3, H, W) normalised frames -> the teacher's tokens (B, T, 1+N, D) after the final norm, the chosen
    heads' [CLS]-to-patch attention (B, k, T, N) in float32, and the last block's patch queries and keys
    (B, T, N, D), heads concatenated."""
    B = clip.shape[0]
    tokens, q, k = teacher_backbone.forward_track(clip.flatten(0, 1))
    attn = (q[:, heads] @ k[:, heads].transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # as Attention.weights
    patches = lambda t: rearrange(t[:, :, 1:], "(b t) h n d -> b t n (h d)", b=B)
    return (rearrange(tokens, "(b t) n d -> b t n d", b=B),
            rearrange(attn[:, :, 0, 1:], "(b t) k n -> b k t n", b=B).float(), patches(q), patches(k))


@torch.no_grad()
def track(teacher_backbone, clip, heads, use_sinkhorn=True, eps=0.05, iters=30):
    """clip (B, T, 3, H, W) normalised frames -> the teacher's [CLS] (B, T, D) and the masks (B, k, T, H/p, W/p)
    of the k objects, one per chosen head: discovered on the first frame, tracked through the clip."""
    tokens, cls_attn, queries, keys = tracker_inputs(teacher_backbone, clip, heads)
    with torch.autocast(clip.device.type, enabled=False):
        prototypes = discover_objects(cls_attn[:, :, 0], queries[:, 0], tokens[:, 0, 1:], use_sinkhorn, eps, iters)
        masks = track_objects(prototypes, keys)[1]
    h = clip.shape[-2] // teacher_backbone.patch_embed.patch_size
    return tokens[:, :, 0], rearrange(masks, "b k t (h w) -> b k t h w", h=h)


def mask_clip(clip, masks):
    """clip (B, T, 3, H, W), masks (B, k, T, h, w) -> k masked clips (k, B, T, 3, H, W); masked-out
    pixels become 0, the dataset's mean colour after normalisation."""
    up = F.interpolate(masks.flatten(0, 2)[:, None].float(), size=clip.shape[-2:], mode="nearest")
    up = rearrange(up, "(b k t) 1 h w -> k b t 1 h w", b=masks.shape[0], k=masks.shape[1])
    return clip[None] * up


# ====== Loss: DINO's cross-entropy, teacher on the unmasked frame, student on masked frames and local crops
class DoRALoss(nn.Module):
    """The sharpened, centred teacher on the unmasked frame against the student on (a) each object's masked frame
    and (b) the local crops of that frame; ½ (a) + ½ (b), over objects and frames as the official DINOLoss sums
    them (paper Eq. 5)."""

    def __init__(self, args):
        super().__init__()
        self.student_temp, self.center_momentum = args.student_temp, args.center_momentum
        self.paper_loss = bool(args.paper_loss)
        self.register_buffer("center", torch.zeros(1, args.out_dim))
        warm = min(args.warmup_teacher_temp_epochs, args.epochs)  # a too hot teacher early makes training unstable
        self.teacher_temps = np.concatenate([np.linspace(args.warmup_teacher_temp, args.teacher_temp, warm),
                                             np.full(args.epochs - warm, args.teacher_temp)])

    @staticmethod
    def object_weights(k, frames, device=None):
        """Official DINOLoss: its per-frame sum is never reset between objects, so object j's running sum is R_j =
        R_{j-1} / T + F_j (its frame mean), loss = mean_j R_j: object i weighs (1 + 1/T + ... + 1/T^(k-1-i)) / k."""
        return ((float(frames) ** -torch.arange(k, dtype=torch.float64, device=device)).cumsum(0).flip(0) / k).float()

    def forward(self, student_masked, student_local, teacher_out, epoch):
        """student_masked (k, B, T, O), student_local (L, B, T, O), teacher_out (B, T, O): the targets of both -> scalar
        loss, its masked half (mean over objects), its local half and the mean entropy of the teacher's targets."""
        target = F.softmax((teacher_out.float() - self.center) / self.teacher_temps[epoch], dim=-1)
        ce = lambda s: -(target * F.log_softmax(s.float() / self.student_temp, dim=-1)).sum(-1).flatten(1).mean(1)
        masked = ce(student_masked)  # (k,): each object's mean over clips and frames
        used = student_local if self.paper_loss else student_local[1:]  # official: DINO's same-view skip; paper: all
        local = ce(used).mean() if len(used) else masked.new_zeros(())  # no local crop left: no local term
        per_object = 0.5 * masked + 0.5 * local
        weights = self.object_weights(masked.shape[0], teacher_out.shape[1], per_object.device).to(per_object)
        loss = per_object.mean() if self.paper_loss else (weights * per_object).sum()  # the paper: a plain mean
        # DINO's collapse diagnostic (its Fig. 7): ln(out_dim) = a uniform teacher, 0 = one-hot
        entropy = -(target * target.clamp_min(1e-30).log()).sum(-1).mean()
        self.update_center(teacher_out)
        return loss, masked.mean().detach(), local.detach(), entropy.detach()

    @torch.no_grad()
    def update_center(self, teacher_out):  # EMA of the teacher's mean output, over all frames of all ranks
        batch_sum = teacher_out.float().flatten(0, 1).sum(0, keepdim=True)
        count = batch_sum.new_full((), teacher_out.shape[0] * teacher_out.shape[1])  # a fill, not a host copy (sync)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)


def dora_loss(student, teacher, criterion, crops, heads, epoch, args):
    """The forward of one step on crops = [global clips (B, T, 3, S, S), local clips (B, T, 3, S/2, S/2) x L]:
    the teacher tracks the chosen heads' objects, the student sees them masked -> loss, stats (0-d tensors)."""
    clip, local = crops[0], crops[1:]
    B, Tn = clip.shape[:2]
    with torch.no_grad():  # the teacher sees the unmasked clip, and finds and tracks the objects in it
        cls, masks = track(teacher.backbone, clip, heads, True, args.sk_eps, args.sk_iters)
        teacher_out = rearrange(teacher.head(cls.flatten(0, 1)), "(b t) o -> b t o", b=B)
    masked = mask_clip(clip, masks)  # (k, B, T, 3, S, S)
    views = [masked.flatten(0, 2)] + ([torch.stack(local).flatten(0, 2)] if local else [])
    # one (DDP) forward: the k masked clips at S, then the L local crops at S/2
    out = rearrange(student(views), "(v b t) o -> v b t o", b=B, t=Tn)
    loss, loss_masked, loss_local, entropy = criterion(out[:len(masked)], out[len(masked):], teacher_out, epoch)
    return loss, dict(loss=loss, loss_masked=loss_masked, loss_local=loss_local, teacher_entropy=entropy)


# ====== Training: student and EMA teacher, AdamW with per-iteration schedules, one step below
def build_models(args, device, steps_per_epoch, world_size=1):
    """Student (stochastic depth; DDP on several processes), EMA teacher with the same weights and no gradients,
    the loss with its centre, AdamW over DINO's two parameter groups, the scaler, and the per-iteration schedules
    (DINO): lr warm-up then cosine, weight decay and EMA momentum cosine."""
    backbone = build_backbone(vars(args), args.drop_path)
    if args.pretrained:  # DINO's weights, strictly: a backbone (DINO's releases) or a full checkpoint's teacher
        data.load_pretrained(backbone, args.pretrained)
    student = MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, args.out_dim, bool(args.norm_last_layer)))
    teacher = MultiCropWrapper(build_backbone(vars(args)), DINOHead(backbone.embed_dim, args.out_dim))
    student, teacher = student.to(device), teacher.to(device)
    teacher.requires_grad_(False).load_state_dict(student.state_dict())  # the student's weights, no gradients
    ddp = nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None) \
        if world_size > 1 else student
    decay = [p for n, p in student.named_parameters() if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)]
    no_decay = [p for n, p in student.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])  # lr, wd: schedules
    base_lr = args.lr * args.batch_size_per_gpu * world_size / 256  # linear scaling rule
    schedules = dict(lr=data.cosine_schedule(base_lr, args.min_lr, args.epochs, steps_per_epoch,
                                              min(args.warmup_epochs, args.epochs)),
                     wd=data.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch),
                     momentum=data.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch))
    return dict(student=student, ddp=ddp, teacher=teacher, loss=DoRALoss(args).to(device), optimizer=optimizer,
                scaler=data.make_scaler(args.amp, device), schedules=schedules)


def choose_heads(args, num_heads, it):
    """k heads drawn at random each step; the draw depends on (seed, step) only, so that every
    rank tracks the same heads and a resumed run draws what the uninterrupted one drew."""
    # unsorted, as official utils.MOT's random.sample: the loss weighs object 0 most, so no head is always first
    return random.Random(args.seed * 1_000_003 + it).sample(range(num_heads), args.num_objects)


def train_step(m, crops, it, epoch, args, autocast):
    """One DoRA step at iteration `it` on crops (see dora_loss) -> the logged values (python floats)."""
    student, teacher, optimizer, scaler = m["student"], m["teacher"], m["optimizer"], m["scaler"]
    # python floats: the optimizer state must load with weights_only
    lr, wd, momentum = (float(m["schedules"][name][it]) for name in ("lr", "wd", "momentum"))
    for group, decay in zip(optimizer.param_groups, (wd, 0.0)):  # only the first group is regularised
        group.update(lr=lr, weight_decay=decay)
    with autocast:
        loss, stats = dora_loss(m["ddp"], teacher, m["loss"], crops, choose_heads(args, teacher.backbone.num_heads, it),
                                epoch, args)

    # ------ update (the same block in every method file)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    stats = data.host_stats(stats)  # the step's one host sync; raises on a non-finite loss
    if args.clip_grad:  # DINO: each parameter's gradient clipped on its own
        scaler.unscale_(optimizer)
        for grad in [p.grad for p in student.parameters() if p.grad is not None]:
            grad.mul_((args.clip_grad / (grad.norm() + 1e-6)).clamp(max=1.0))
    if epoch < args.freeze_last_layer:  # DINO: a fixed output layer in the first epoch helps training start
        for p in student.head.last_layer.parameters():
            p.grad = None
    scaler.step(optimizer)
    scaler.update()
    data.ema_update(teacher, student, momentum)
    return {**stats, "lr": lr, "wd": wd, "momentum": momentum}


def train(args):
    d = data.init_distributed()
    args.amp = data.resolve_amp(args.amp, d.device)
    autocast = data.autocast(d.device, args.amp)
    data.seed_everything(args.seed)  # not per rank: the same student and teacher everywhere (per rank: each epoch)
    log, ckpt_path, ckpt = data.prepare_output_dir(args.output_dir, args.resume, args.overwrite, d.is_main, METHOD,
                                                   d.world_size)
    if args.pretrained:  # refuse a wrong file before the videos are probed
        data.read_pretrained(args.pretrained)

    dataset = data.VideoClips(args.data, num_frames=args.frames_per_clip, frame_gap=args.step_between_clips,
                              clip_start_every=args.clip_start_every, short_side=args.short_side,
                              transform=ClipAugmentation(args, on_device=d.device.type == "cuda"))
    sampler = torch.utils.data.DistributedSampler(dataset, d.world_size, d.rank, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=d.device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.data}: {len(dataset)} clips is fewer than one batch of {args.batch_size_per_gpu} "
                         "per GPU; lower --batch-size-per-gpu, --step-between-clips or --frames-per-clip")
    m = build_models(args, d.device, steps_per_epoch, d.world_size)
    data.broadcast_module(m["teacher"])  # DDP makes the students equal; the teachers must start equal too
    if args.bench:  # loader and step rates (data.bench_train) instead of training
        step = lambda crops: train_step(m, dataset.transform.finish(crops, d.device), 0, 0, args, autocast)
        data.bench_train(loader, step, args.bench, d.device, args.frames_per_clip)
        return m, dataset
    start_epoch, _ = data.resume_step(ckpt, steps_per_epoch)
    if ckpt is not None:  # --resume
        m["student"].load_state_dict(ckpt["model"])
        for key in ("teacher", "optimizer", "scaler"):
            m[key].load_state_dict(ckpt[key])
        m["loss"].center.copy_(ckpt["center"])
    if d.is_main:
        print(f"{len(dataset.videos)} video(s), {len(dataset)} clips of {args.frames_per_clip} frames, "
              f"{steps_per_epoch} steps/epoch x {args.epochs} epochs, {args.arch}/{args.patch_size}, amp {args.amp}")

    for epoch in range(start_epoch, args.epochs):
        data.seed_everything(args.seed + epoch, d.rank)  # per epoch: a resumed run replays the same randomness
        sampler.set_epoch(epoch)
        m["ddp"].train()
        bar, t0 = tqdm(loader, disable=not d.is_main, desc=f"epoch {epoch}", leave=False), time.time()
        for i, crops in enumerate(bar):
            it = epoch * steps_per_epoch + i
            stats = train_step(m, dataset.transform.finish(crops, d.device), it, epoch, args, autocast)
            frames_s = (i + 1) * args.batch_size_per_gpu * args.frames_per_clip * d.world_size / (time.time() - t0)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{frames_s:.0f}")
            if it % args.log_every == 0:
                log.log({"epoch": epoch, "step": it, **stats, "img_s": frames_s})
        if d.is_main:
            data.save_checkpoint({"method": METHOD, "args": vars(args), "epoch": epoch + 1, "step": it + 1,
                                  "model": m["student"].state_dict(), "teacher": m["teacher"].state_dict(),
                                  "optimizer": m["optimizer"].state_dict(), "scaler": m["scaler"].state_dict(),
                                  "center": m["loss"].center.cpu(), "world_size": d.world_size}, ckpt_path)
            print(f"epoch {epoch}: loss {stats['loss']:.3f}, {frames_s:.0f} frames/s, saved {ckpt_path}")
        if args.stop_after and epoch + 1 - start_epoch >= args.stop_after:
            break
    data.finish_distributed()
    return m, dataset


# ====== Evaluation: the tracker's picture, then (--demo) the benchmarks through evaluate.py, before and after
def mask_overlap(masks) -> float:
    """Mean pairwise IoU between the k objects' masks (B, k, T, h, w): 1 = all the same object."""
    m, k = masks.flatten(3).float(), masks.shape[1]
    ious = [((m[:, i] * m[:, j]).sum(-1) / ((m[:, i] + m[:, j]).clamp(max=1).sum(-1)).clamp(min=1)).mean()
            for i in range(k) for j in range(i + 1, k)]
    return float(torch.stack(ious).mean()) if ious else 0.0


@torch.no_grad()
def tracking_picture(backbone, clip, path, heads=(0, 1, 2)) -> tuple:
    """The tracker on clip (T, 3, H, W) normalised -> a png at path (columns: frames; rows named in it); returns the
    tracked masks' mask_overlap without and with Sinkhorn-Knopp."""
    heads = list(heads)[:3]  # one colour channel per object
    tokens, cls_attn, queries, keys = tracker_inputs(backbone, clip[None], heads)
    grid = lambda t: rearrange(t, "b k t (h w) -> b k t h w", h=clip.shape[-2] // backbone.patch_embed.patch_size)
    maps, masks = {}, {}
    for sk in (False, True):
        prototypes = discover_objects(cls_attn[:, :, 0], queries[:, 0], tokens[:, 0, 1:], use_sinkhorn=sk)
        maps[sk], masks[sk] = (grid(t) for t in track_objects(prototypes, keys))
    size = [max(192, s) for s in clip.shape[-2:]]  # small demo frames are enlarged to be seen

    def rgb(x):  # (1, k, T, h, w) -> (T, 3, H, W): object i in colour channel i, each map min-max scaled
        x = x[0].float()
        low, high = x.flatten(2).amin(-1)[..., None, None], x.flatten(2).amax(-1)[..., None, None]
        x = torch.cat([(x - low) / (high - low).clamp(min=1e-8), x.new_zeros(3 - x.shape[0], *x.shape[1:])])
        return F.interpolate(x.transpose(0, 1), size=size, mode="nearest").cpu()

    mean, std = (torch.tensor(v, device=clip.device)[:, None, None] for v in (MEAN, STD))
    frames = F.interpolate((clip * std + mean).clamp(0, 1), size=size, mode="bilinear").cpu()
    rows = [frames, rgb(grid(cls_attn)), rgb(maps[False]), rgb(maps[True]), 0.4 * frames + 0.6 * rgb(masks[True])]
    objects = ", ".join(f"{c} = head {h}" for c, h in zip("RGB", heads))
    data.labelled_grid([list(r) for r in rows], path, f"DoRA's tracker on a clip of {len(clip)} frames (columns): "
                       f"one object a chosen head, one colour channel an object ({objects})",
                       ["frame", "[CLS] attention\nof the heads", "object attention\nwithout\nSinkhorn-Knopp",
                        "object attention\nwith\nSinkhorn-Knopp", "tracked masks\n(with SK)\nover the frame"],
                       [f"frame {t}" for t in range(len(clip))])
    return mask_overlap(masks[False]), mask_overlap(masks[True])


def main(args):
    m, dataset = train(args)
    if args.bench or int(os.environ.get("RANK", 0)) != 0:
        return
    device = next(m["teacher"].parameters()).device
    teacher = m["teacher"].backbone.eval()
    transform = T.Compose([T.Resize(args.image_size, antialias=True), T.CenterCrop(args.image_size),  # short side
                           T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])
    clips = data.VideoClips(dataset.videos, num_frames=args.frames_per_clip, frame_gap=args.step_between_clips,
                            clip_start_every=args.clip_start_every, short_side=args.short_side, transform=transform)
    where = np.linspace(0, len(clips) - 1, 4).astype(int).tolist()  # where the tracker looks
    overlaps = [tracking_picture(teacher, clips[i].to(device), os.path.join(args.output_dir, f"tracking_{n}.png"),
                                 choose_heads(args, teacher.num_heads, i)) for n, i in enumerate(where)]
    print(f"tracking pictures: {args.output_dir}/tracking_*.png; mean pairwise IoU of the object masks without "
          f"Sinkhorn-Knopp {np.mean([o[0] for o in overlaps]):.3f}, with {np.mean([o[1] for o in overlaps]):.3f}")
    if not args.demo:
        return
    import evaluate  # k-NN, seg-cluster and label propagation on the synthetic world (or --eval-data)
    torch.manual_seed(args.seed)  # the student's own initialisation, rebuilt
    init = build_backbone(vars(args)).to(device).eval()
    if args.pretrained:
        data.load_pretrained(init, args.pretrained)
    results = {}
    for name, net in (("init", init), ("dora", teacher)):
        print(f"--- {name} ---")
        res = evaluate.run_suite(net, args.eval_data, ["knn", "seg-cluster", "propagate"], device,
                                 image_size=args.image_size)
        results.update({f"{name}/{k}": v for k, v in res.items()})
    print(f"trained on {' '.join(args.data)}, evaluated on {args.eval_data}")
    print("\n".join(f"{k:>32s}  {v:.4f}" for k, v in results.items()))
    print(json.dumps({**results, "train_data": args.data, "eval_data": args.eval_data}))


if __name__ == "__main__":
    data.cli(main, get_args)
