"""TimeT: self-supervised time-tuning of dense image representations.

Paper: Salehi, Gavves, Snoek, Asano, "Time Does Tell: Self-Supervised Time-Tuning of Dense
Image Representations", ICCV 2023, https://arxiv.org/abs/2308.11796
(official code: github.com/SMSD75/Timetuning, time_tuning.py).

The idea. An image model (DINO) gives patch features that segment single images well but
flicker over the frames of a video. TimeT fine-tunes it on unlabelled videos so that patches
cluster consistently in space *and time*. For a short clip (4 sorted random frames of a
video, one shared crop): a momentum teacher scores the first frame's patch tokens against
200 prototypes and Sinkhorn-Knopp turns the scores into balanced cluster assignments. The
Feature-Forwarder then carries those assignments through the clip to the last frame by label
propagation on the backbone's own patch features (each patch copies the labels of its 5 most
similar patches in a 6-patch neighbourhood of the first and previous frames), so the last
frame gets a cluster map that has *followed the motion*. The student must predict that map
from the last frame alone: cross-entropy of its prototype scores (temperature 0.1) against
the map's argmax. Only the last two ViT blocks, a projection head and the prototypes are
trained.

Commands:
  python timetuning.py --demo                                   # vit_demo, synthetic videos, ~3 min CPU
  python timetuning.py --demo --pretrained runs/dora/checkpoint.pth   # chain from another demo
  python timetuning.py --data /data/ytvos/train/JPEGImages --pretrained dino_deitsmall16_pretrain.pth
  torchrun --nproc_per_node=4 timetuning.py --data /data/ytvos/train/JPEGImages \
      --pretrained dino_deitsmall16_pretrain.pth --batch-size-per-gpu 32
  python timetuning.py --data DIR --resume                      # continue <output-dir>/checkpoint.pth

Official-code facts that differ from a plain reading (time_tuning.py), followed here: 10
Sinkhorn iterations and 7 context frames (get_loss's defaults, which the training call keeps);
clips are 4 sorted random frames of the whole video (data_loader.py; --frame-step: frames N
apart); the teacher update swaps m and 1 - m (see `train_step`; --paper-ema); photometric noise
is drawn once per clip on source-resolution frames, and only one of the four jitter adjustments
acts (see `ClipAugmentation`).

Contents: config; model (the ViT, a copy of DINO's as in every method file; projection head and
prototypes); data (the clip augmentation, clip sampling); Sinkhorn-Knopp; the Feature-Forwarder;
loss; training (one step, train()); evaluation (video k-means, pictures); main().
"""
import argparse
import copy
import json
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import data

METHOD = "timetuning"
MEAN, STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)  # official ClipToTensor: 0.228 (sic)


# ====== Config: the official time_tuning.py defaults; --demo overrides a few in one place (flags given win).
# --demo: vit_demo on 64-px clips of the synthetic world from scratch: no DINO to preserve, so all blocks train, faster
DEMO = dict(arch="vit_demo", patch_size=8, image_size=64, train_blocks=-1, epochs=6, batch_size_per_gpu=16,
            clips_per_video=100, num_workers=2, proj_dims=[384, 384, 128], num_prototypes=50, log_every=5,
            lr_heads=1e-3, lr_backbone=3e-4, momentum_teacher=0.995, eval_benches=["propagate", "seg-cluster"])


def get_args(argv=None):
    p = argparse.ArgumentParser("TimeT", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None,
                   help="videos: mp4 files, a frame folder, or a folder of either (YouTube-VOS JPEGImages/)")
    p.add_argument("--output-dir", default="runs/timetuning")
    p.add_argument("--demo", action="store_true", help="vit_demo, small frames, short schedule on the synthetic world")
    p.add_argument("--arch", default="vit_small", choices=["vit_demo", "vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--pretrained", default=None, help="DINO weights (plain or full checkpoint) or a checkpoint of "
                   "another method file (whose --arch and --patch-size it brings)")
    p.add_argument("--train-blocks", type=int, default=2, help="last ViT blocks trained (official: 2); -1: all")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size-per-gpu", type=int, default=128, help="clips per GPU (official: 128 on one GPU)")
    p.add_argument("--clips-per-video", type=int, default=1, help="random clips per video per epoch (official: 1)")
    p.add_argument("--num-frames", type=int, default=4, help="frames per clip")
    p.add_argument("--frame-step", type=int, default=None,
                   help="default: sorted random frames of the whole video (official); N: frames N apart (paper)")
    p.add_argument("--image-size", type=int, default=224, help="side of the clip crop")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.4, 1.0), help="area range of the clip's crop")
    p.add_argument("--lr-heads", type=float, default=1e-4, help="head and prototypes; cosine to 0")
    p.add_argument("--lr-backbone", type=float, default=1e-5, help="the trained ViT blocks; cosine to 0")
    p.add_argument("--weight-decay", type=float, default=0.04)
    p.add_argument("--weight-decay-end", type=float, default=0.4)
    p.add_argument("--momentum-teacher", type=float, default=0.995, help="teacher momentum m, cosine to 1")
    p.add_argument("--paper-ema", action="store_true", help="the paper's EMA teacher <- m*teacher + (1-m)*student "
                   "instead of the official (1-m)*teacher + m*student")
    p.add_argument("--proj-dims", type=int, nargs="+", default=[1024, 1024, 512, 256], help="projection head widths")
    p.add_argument("--num-prototypes", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.1, help="student softmax temperature")
    p.add_argument("--sk-eps", "--epsilon", type=float, default=0.05, help="Sinkhorn-Knopp entropy weight ε")
    p.add_argument("--sk-iters", "--sinkhorn-iters", type=int, default=10,
                   help="Sinkhorn-Knopp iterations (official: get_loss's default)")
    p.add_argument("--topk", type=int, default=5, help="Feature-Forwarder: source patches per target patch")
    p.add_argument("--neighborhood", type=int, default=6, help="Feature-Forwarder: window radius in patches")
    p.add_argument("--context-frames", type=int, default=7, help="Feature-Forwarder: previous frames besides the first")
    p.add_argument("--prop-temperature", type=float, default=0.1, help="Feature-Forwarder: affinity temperature")
    p.add_argument("--eval-size", type=int, default=None, help="short side of eval frames (default: --image-size)")
    p.add_argument("--eval-data", default=None, help="synthetic-world-style root (davis/, voc/) to evaluate on after "
                   "training (--demo: default the synthetic world)")
    p.add_argument("--eval-benches", nargs="*", default=["propagate", "seg-cluster", "seg-linear"],
                   help="evaluate.run_suite benchmarks after the video k-means")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation after training")
    # --demo --paper-ema: an EMA horizon as short as the demo's schedule
    demo = lambda given: {**DEMO, **({"momentum_teacher": 0.91} if given.paper_ema else {})}  # noqa: E731
    args = data.parse_args(p, argv, demo, workers=8, log_every=10)  # + the run flags all share
    if args.demo:
        if not args.no_eval:  # the synthetic world, or --eval-data after checking its layout
            args.eval_data = data.demo_eval_root(args.eval_data, ["davis", *args.eval_benches])
        args.data = args.data or os.path.join(data.ensure_synth("runs/synth", seed=0), "videos")
    if args.data is None:
        p.error("--data is required (or --demo to use the synthetic world)")
    args.eval_size = args.eval_size or args.image_size
    return args


# ====== Model: DINO's Vision Transformer, copied into each method file so that it reads alone
# DINO's parameter names: its released weights load strictly and give DINO's outputs.
class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):  # (B, N, D) -> q, k, v: (B, heads, N, D/heads) each
        B, N, D = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):  # (B, N, D) -> (B, N, D); a fused kernel (flash / memory-efficient) on GPUs
        B, N, D = x.shape
        out = F.scaled_dot_product_attention(*self._qkv(x))
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def weights(self, x):  # (B, N, D) -> (B, heads, N, N): the softmax attention, for pictures
        q, k, _ = self._qkv(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT with a [CLS] token; DINO's interface: forward -> [CLS] (B, D) after the final norm,
    get_last_selfattention -> (B, heads, 1+N, 1+N), get_intermediate_layers(x, n) -> n x (B, 1+N, D)."""

    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, img_size=224):
        super().__init__()
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        # no drop-path: TimeT fine-tunes
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()  # DINO keeps a (unused) head slot; no parameters
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, num_patches: int, h: int, w: int) -> torch.Tensor:
        """Bicubic resize of the patch part of the positional embedding to an (h/p, w/p) grid,
        as DINO does it (scale factor with DINO's +0.1 so that floors land on the grid)."""
        n = self.pos_embed.shape[1] - 1
        if num_patches == n and h == w:
            return self.pos_embed
        p = self.patch_embed.patch_size
        side = int(math.sqrt(n))
        h0, w0 = h // p + 0.1, w // p + 0.1
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(h0 / side, w0 / side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def prepare_tokens(self, x):  # (B, 3, H, W) -> (B, 1+N, D)
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, H, W)

    def forward(self, x):  # (B, 3, H, W) -> (B, D)
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def get_last_selfattention(self, x):  # -> (B, heads, 1+N, 1+N)
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1].attn.weights(self.blocks[-1].norm1(x))

    def get_intermediate_layers(self, x, n: int = 1):  # -> list of n tensors (B, 1+N, D), normed
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out

    def patch_tokens(self, x):  # (B, 3, H, W) -> (B, N, D): last layer, normed, [CLS] dropped
        return self.get_intermediate_layers(x, 1)[0][:, 1:]


def vit_demo(patch_size=8, **kw):  # for the CPU demos: ViT-Tiny width, 4 blocks
    return VisionTransformer(patch_size, embed_dim=192, depth=4, num_heads=3, **kw)


def vit_tiny(patch_size=16, **kw):
    return VisionTransformer(patch_size, embed_dim=192, depth=12, num_heads=3, **kw)


def vit_small(patch_size=16, **kw):
    return VisionTransformer(patch_size, embed_dim=384, depth=12, num_heads=6, **kw)


def vit_base(patch_size=16, **kw):
    return VisionTransformer(patch_size, embed_dim=768, depth=12, num_heads=12, **kw)


ARCHS = {"vit_demo": vit_demo, "vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def build_backbone(args) -> VisionTransformer:
    """Fresh ViT from args (a Namespace, or a checkpoint's stored args dict)."""
    args = args if isinstance(args, dict) else vars(args)
    return ARCHS[args["arch"]](patch_size=args.get("patch_size", 16))


# ====== Model: the trained network: backbone, projection head on every patch token, prototypes
class TimeTHead(nn.Module):
    """MLP on patch tokens (Linear-GELU..., no norm layers, as the official head) and K
    prototypes on the unit sphere. forward: tokens (..., D) -> scores (..., K) = cosines."""

    def __init__(self, in_dim: int, dims=(1024, 1024, 512, 256), num_prototypes: int = 200):
        super().__init__()
        layers, d = [], in_dim
        for i, out in enumerate(dims):
            layers.append(nn.Linear(d, out))
            if i < len(dims) - 1:
                layers.append(nn.GELU())
            d = out
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_prototypes, d), dim=1))

    def forward(self, tokens):
        return F.normalize(self.mlp(tokens), dim=-1) @ self.prototypes.t()

    @torch.no_grad()
    def normalize_prototypes(self):  # after every optimiser step (official)
        self.prototypes.copy_(F.normalize(self.prototypes, dim=1))


class TimeTNet(nn.Module):
    """backbone + head, DINO's MultiCropWrapper layout (`backbone.*`, `head.*` keys)."""

    def __init__(self, backbone: VisionTransformer, head: TimeTHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, frames):  # (B, 3, H, W) -> patch tokens (B, N, D), scores (B, N, K)
        tokens = self.backbone.patch_tokens(frames)
        return tokens, self.head(tokens)


def pretrained_arch(args) -> tuple:
    """(arch, patch_size) of the run: those of a repo checkpoint given as --pretrained (chaining the demos), else
    the flags'. Reads the file, so a wrong --pretrained fails here, before the videos are probed."""
    stored = data.read_pretrained(args.pretrained)[1] if args.pretrained else None
    arch = (stored["arch"], stored.get("patch_size", 16)) if stored else (args.arch, args.patch_size)
    if arch != (args.arch, args.patch_size):
        print(f"--pretrained {args.pretrained}: using its architecture {arch[0]}/{arch[1]}")
    return arch


def build_model(args) -> TimeTNet:
    """The network training starts from (the caller seeds it): a fresh head on a backbone with --pretrained's weights
    (strictly: DINO's release, a full DINO checkpoint, or a repo checkpoint's ViT) or random ones."""
    backbone = build_backbone(args)
    model = TimeTNet(backbone, TimeTHead(backbone.embed_dim, args.proj_dims, args.num_prototypes))
    if args.pretrained:
        data.load_pretrained(backbone, args.pretrained)
    return model


def freeze_backbone(backbone: VisionTransformer, train_blocks: int):
    """Official: only the last two blocks are tuned; patch embedding, positions, [CLS] and the
    final norm stay as DINO learned them. train_blocks = -1 trains everything (from scratch)."""
    if train_blocks < 0:
        return
    first = len(backbone.blocks) - train_blocks
    for name, param in backbone.named_parameters():
        param.requires_grad = name.startswith("blocks.") and int(name.split(".")[1]) >= first


# ====== Data: clips as the official training pipeline (time_tuning.py, `frame_transform` then `video_transform`)
# Photometric noise on the source-resolution frames, drawn once per clip (jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grayscale
# p 0.2, blur p 0.5 with σ in [0.1, 2] px per frame), then Resize(short side 224), one crop and flip for all frames (so
# patches correspond across time up to the motion), normalised with the official std 0.228 (sic, not 0.229).
# on_device (a GPU run): the loader only decodes; finish() runs the same steps on the device, clip by clip (the
# official noise acts at source resolution, before the resize, and videos differ in size).
class ClipAugmentation:
    """uint8 clip (T, 3, H, W) at source resolution -> normalised float clip (T, 3, size, size); on_device: the clip
    as it is, and finish() augments a batch (a list of clips) on the device."""

    def __init__(self, size=224, scale=(0.4, 1.0), jitter_p=0.8, gray_p=0.2, blur_p=0.5, on_device=False):
        self.size, self.scale, self.on_device = size, tuple(scale), on_device
        self.jitter_p, self.gray_p, self.blur_p = jitter_p, gray_p, blur_p

    def __call__(self, clip):
        return clip if self.on_device else self.augment(clip)

    def collate(self, clips):  # on_device: a list, the clips' sizes may differ
        return list(clips) if self.on_device else torch.utils.data.default_collate(clips)

    def finish(self, batch, device):  # -> (B, T, 3, size, size) on the device
        if not self.on_device:
            return batch.to(device, non_blocking=True)
        return torch.stack([self.augment(clip.to(device, non_blocking=True)) for clip in batch])

    def augment(self, clip):  # draws on the host (python's and torch's CPU generators): no device sync
        if random.random() < self.jitter_p:  # official video_transformations.ColorJitter(per_frame=False)
            b, c, s = (random.uniform(0.2, 1.8) for _ in range(3))  # official draw order: b, c, s, hue
            h = random.uniform(-0.2, 0.2)
            ops = [(TF.adjust_brightness, b), (TF.adjust_saturation, s), (TF.adjust_hue, h), (TF.adjust_contrast, c)]
            random.shuffle(ops)
            op, factor = ops[-1]  # official quirk (`jittered_img = func(img)` on the original): only the last acts
            clip = op(clip, factor)
        if torch.rand(()) < self.gray_p:  # official RandomGrayscale(per_frame=False) draws from torch
            clip = TF.rgb_to_grayscale(clip, num_output_channels=3)
        if random.random() < self.blur_p:  # official RandomGaussianBlur: once per clip, PIL radius (= σ) per frame
            sigmas = [random.uniform(0.1, 2.0) for _ in clip]
            clip = torch.stack([TF.gaussian_blur(f, 2 * math.ceil(3 * s) + 1, s) for f, s in zip(clip, sigmas)])
        clip = TF.resize(clip, self.size, antialias=True)  # official Resize(224): PIL bilinear of the short side
        i, j, h, w = T.RandomResizedCrop.get_params(clip[0], self.scale, (3 / 4, 4 / 3))  # one box for all frames
        clip = TF.resized_crop(clip, i, j, h, w, [self.size, self.size], antialias=True)
        if random.random() < 0.5:
            clip = TF.horizontal_flip(clip)
        clip = TF.to_dtype(clip, torch.float32, scale=True)
        return TF.normalize(clip, MEAN, STD).contiguous()  # the decoder's channels-last frames: NCHW for the ViT


def sample_frame_indices(video_frames: int, num_frames: int = 4, step=None, rng=random) -> list:
    """Official data_loader.py (VideoDataset.generate_indices, the UNIFORM mode training uses):
    num_frames distinct frames drawn uniformly from the whole video, sorted (with repeats when
    the video is shorter). step: the official Regular mode, frames `step` apart (fewer if the
    video is short) from a random start, as the paper's prose describes."""
    if step and video_frames >= num_frames:
        step = min(step, video_frames // num_frames)
        start = rng.randint(0, video_frames - num_frames * step)
        return list(range(start, start + num_frames * step, step))
    if video_frames < num_frames:
        return sorted(rng.choices(range(video_frames), k=num_frames))
    return sorted(rng.sample(range(video_frames), num_frames))


class RandomClipPerVideo(torch.utils.data.Dataset):
    """Official sampling: an epoch visits every video `clips_per_video` times, each time reading
    the frames sample_frame_indices picks. `videos`: data.VideoClips with one item per video
    (clip_start_every=None), whose read() decodes only the picked frames."""

    def __init__(self, videos: "data.VideoClips", num_frames=4, frame_step=None, clips_per_video=1):
        self.videos, self.num_frames, self.frame_step = videos, num_frames, frame_step
        self.clips_per_video = clips_per_video

    def __len__(self):
        return len(self.videos) * self.clips_per_video

    def __getitem__(self, i):
        video = i % len(self.videos)
        return self.videos.read(video, lambda n: sample_frame_indices(n, self.num_frames, self.frame_step))


# ====== Sinkhorn-Knopp (SwAV's online form): balanced soft assignments of a batch of patches
@torch.no_grad()
def sinkhorn_online(scores: torch.Tensor, eps: float = 0.05, iters: int = 10) -> torch.Tensor:
    """scores: (M, K) patch-prototype cosines -> Q: (M, K), rows sum to 1, and over all ranks
    each prototype receives ~M_total/K patches. Q = diag(u) exp(scores/ε) diag(v). Under DDP
    the batch is every rank's patches; only sums and the max cross ranks."""
    distributed = dist.is_available() and dist.is_initialized()

    def all_reduce(t, op=dist.ReduceOp.SUM):
        if distributed:
            dist.all_reduce(t, op=op)
        return t

    scores = scores.double()
    top = all_reduce(scores.max().reshape(1), dist.ReduceOp.MAX)  # the same shift on every rank
    Q = torch.exp((scores - top) / eps).t()  # (K, M)
    K = Q.shape[0]
    M = all_reduce(Q.new_full((1,), Q.shape[1]))  # a fill on the device, not a host copy (which syncs)
    Q /= all_reduce(Q.sum().reshape(1))
    for _ in range(iters):
        Q /= all_reduce(Q.sum(dim=1, keepdim=True)) * K  # every prototype: mass 1/K
        Q /= Q.sum(dim=0, keepdim=True) * M  # every patch: mass 1/M
    return (Q * M).t().float()


# ====== Feature-Forwarder (Sec. 3.2): the first frame's clusters carried through the clip by label propagation
def neighborhood_mask(h: int, w: int, radius: int, device=None) -> torch.Tensor:
    """(h*w, h*w) bool: target patch i may copy from source patch j when both row and column
    differ by at most `radius` patches (a local window; motion between frames is small)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)


@torch.no_grad()
def feature_forwarder(features: torch.Tensor, first_labels: torch.Tensor, grid: tuple, topk: int = 5,
                      radius: int = 6, context: int = 7, temperature: float = 0.1) -> torch.Tensor:
    """features: (B, T, N, D) patch tokens of each clip's frames; first_labels: (B, N, K) soft
    labels of frame 0; grid: (h, w) with h*w = N. Returns (B, T, N, K): the labels of every
    frame, frame t built from frame 0 and the `context` frames before t (DINO's video
    label propagation): affinity = exp(cos / temperature) within the window, keep the top-k
    sources, normalise, and average their labels."""
    B, T_, N, _ = features.shape
    feats = F.normalize(features.float(), dim=-1)
    allowed = neighborhood_mask(*grid, radius, device=features.device)  # (N, N) target x source
    labels = [first_labels.float()]
    batch = torch.arange(B, device=features.device)[:, None, None]
    for t in range(1, T_):
        sources = [0] + list(range(max(1, t - context), t))
        source_feats = torch.cat([feats[:, s] for s in sources], dim=1)  # (B, C*N, D)
        source_labels = torch.cat([labels[s] for s in sources], dim=1)  # (B, C*N, K)
        logits = feats[:, t] @ source_feats.transpose(1, 2) / temperature  # (B, N, C*N)
        logits = logits.masked_fill(~allowed.repeat(1, len(sources)), float("-inf"))
        top, idx = logits.topk(topk, dim=-1)  # (B, N, k)
        weights = top.softmax(dim=-1)  # = exp(a) / sum over the kept top-k
        labels.append((weights.unsqueeze(-1) * source_labels[batch, idx]).sum(dim=2))
    return torch.stack(labels, dim=1)


# ====== Loss
def timet_loss(student, teacher: TimeTNet, clips: torch.Tensor, args, autocast) -> tuple:
    """clips: (B, T, 3, H, W) -> (loss, {"loss"}): the teacher's Sinkhorn-Knopp clusters of frame 0, carried to the
    last frame by the Feature-Forwarder, are the student's cross-entropy target there (Eq. 3: the carried map's
    argmax, student scores at temperature 0.1). `student` may be DDP-wrapped; `teacher` is plain."""
    raw = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    B, T_, _, H, W = clips.shape
    p = raw.backbone.patch_embed.patch_size
    with autocast:
        tokens_last, scores_last = student(clips[:, -1])  # the only frame with gradients
        with torch.no_grad():
            tokens_before = raw.backbone.patch_tokens(rearrange(clips[:, :-1], "b t c h w -> (b t) c h w"))
            teacher_scores = teacher(clips[:, 0])[1]
    tokens_before = rearrange(tokens_before, "(b t) n d -> b t n d", b=B)
    features = torch.cat([tokens_before, tokens_last.detach()[:, None]], dim=1)  # (B, T, N, D)
    K = teacher_scores.shape[-1]
    first_labels = sinkhorn_online(teacher_scores.reshape(-1, K), args.sk_eps, args.sk_iters).view(B, -1, K)
    forwarded = feature_forwarder(features, first_labels, (H // p, W // p), args.topk, args.neighborhood,
                                  args.context_frames, args.prop_temperature)[:, -1]  # (B, N, K)
    logits = rearrange(scores_last.float() / args.temperature, "b n k -> (b n) k")
    loss = F.cross_entropy(logits, forwarded.argmax(dim=-1).flatten())
    return loss, {"loss": loss.detach()}


# ====== Training
def param_groups(model: TimeTNet, args):
    """AdamW groups: heads (lr_heads) and trained blocks (lr_backbone), each split into decayed
    weights and undecayed biases/norms; 'base_lr' and 'decay' drive the schedules."""
    groups = []
    for module, lr in ((model.head, args.lr_heads), (model.backbone, args.lr_backbone)):
        params = [(n, q) for n, q in module.named_parameters() if q.requires_grad]
        decay = [q for n, q in params if q.ndim > 1]
        no_decay = [q for n, q in params if q.ndim <= 1]
        groups += [dict(params=decay, base_lr=lr, decay=True), dict(params=no_decay, base_lr=lr, decay=False)]
    return [g for g in groups if g["params"]]


def train_step(student, teacher: TimeTNet, clips: torch.Tensor, optimizer, scaler, momentum: float, args,
               autocast) -> dict:
    """One update on clips (B, T, 3, H, W) -> {name: float}; `student` may be DDP-wrapped. The teacher takes
    1 - m of itself and m of the student (official: with m 0.995 -> 1 it stays next to the student); --paper-ema:
    the paper's EMA, m of itself."""
    raw = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    loss, stats = timet_loss(student, teacher, clips, args, autocast)
    # ------ update (the same block in every method file)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    stats = data.host_stats(stats)  # the step's one host sync; raises on a non-finite loss
    scaler.step(optimizer)
    scaler.update()
    raw.head.normalize_prototypes()  # TimeT: back on the sphere before the teacher takes them (official)
    data.ema_update(teacher, raw, momentum if args.paper_ema else 1 - momentum)
    teacher.head.normalize_prototypes()  # TimeT: the mixed prototypes too
    return stats


def train(args):
    d = data.init_distributed()
    args.amp = data.resolve_amp(args.amp, d.device)
    autocast = data.autocast(d.device, args.amp)
    data.seed_everything(args.seed, 0)  # the same initial weights on every rank (teacher included)
    args.arch, args.patch_size = pretrained_arch(args)  # before the output dir is touched; the checkpoint keeps them
    log, ckpt_path, ckpt = data.prepare_output_dir(args.output_dir, args.resume, args.overwrite, d.is_main, METHOD,
                                                   d.world_size)

    student = build_model(args)
    freeze_backbone(student.backbone, args.train_blocks)
    student.to(d.device)
    teacher = data.broadcast_module(copy.deepcopy(student).requires_grad_(False))

    videos = data.VideoClips(args.data, num_frames=1, clip_start_every=None,  # one item per video
                             short_side=None,  # official: noise at source resolution, then Resize(224)
                             transform=ClipAugmentation(args.image_size, args.crop_scale,
                                                        on_device=d.device.type == "cuda" or bool(args.bench)))
    dataset = RandomClipPerVideo(videos, args.num_frames, args.frame_step, args.clips_per_video)
    sampler = torch.utils.data.DistributedSampler(dataset, d.world_size, d.rank, shuffle=True, seed=args.seed,
                                                  drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, collate_fn=videos.transform.collate,
                                         pin_memory=d.device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"--data {args.data}: {len(dataset)} clips per epoch is fewer than one batch of "
                         f"{args.batch_size_per_gpu} per GPU; lower --batch-size-per-gpu or raise --clips-per-video")

    optimizer = torch.optim.AdamW(param_groups(student, args))
    scaler = data.make_scaler(args.amp, d.device)
    total = args.epochs * steps_per_epoch
    lr_factor = data.cosine_schedule(1.0, 0.0, args.epochs, steps_per_epoch)  # official: cosine annealing to 0
    wd_schedule = data.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    momentum_schedule = data.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch)

    start_epoch, step = data.resume_step(ckpt, steps_per_epoch)
    if ckpt is not None:  # --resume
        student.load_state_dict(ckpt["model"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    ddp = nn.parallel.DistributedDataParallel(student, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.world_size > 1 else student
    if args.bench:  # loader and step rates (data.bench_train)
        def bench_step(batch):
            return train_step(ddp, teacher, videos.transform.finish(batch, d.device), optimizer, scaler,
                              float(momentum_schedule[0]), args, autocast)
        data.bench_train(loader, bench_step, args.bench, d.device, args.num_frames)
        return student, teacher, d

    for epoch in range(start_epoch, min(args.epochs, start_epoch + (args.stop_after or args.epochs))):
        data.seed_everything(args.seed + epoch, d.rank)  # a resumed run replays the same randomness
        sampler.set_epoch(epoch)
        ddp.train()
        bar = tqdm(loader, disable=not d.is_main, desc=f"epoch {epoch}", leave=False)
        t0 = time.time()
        for batch in bar:
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * float(lr_factor[step])  # python floats: weights_only checkpoints
                g["weight_decay"] = float(wd_schedule[step]) if g["decay"] else 0.0
            stats = train_step(ddp, teacher, videos.transform.finish(batch, d.device), optimizer, scaler,
                               float(momentum_schedule[step]), args, autocast)
            step += 1
            clips_s = len(batch) * d.world_size * (bar.n + 1) / (time.time() - t0)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", clips_s=f"{clips_s:.1f}")
            if step % args.log_every == 0 or step == total:
                log.log({"epoch": epoch, "step": step, **stats, "lr_heads": args.lr_heads * float(lr_factor[step - 1]),
                         "wd": float(wd_schedule[step - 1]), "momentum": float(momentum_schedule[step - 1]),
                         "clips_s": clips_s, "img_s": clips_s * args.num_frames})
        if d.is_main:
            data.save_checkpoint({"method": METHOD, "args": vars(args), "epoch": epoch + 1, "step": step,
                                  "model": student.state_dict(), "teacher": teacher.state_dict(),
                                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                  "world_size": d.world_size}, ckpt_path)
            print(f"epoch {epoch}: loss {stats['loss']:.3f}, {clips_s:.1f} clips/s, saved {ckpt_path}")
    data.finish_distributed()
    return student, teacher, d


# ====== Evaluation and pictures: k-means on a whole video's patch features, one colour per cluster over time.
@torch.no_grad()
def save_cluster_pictures(backbone, davis_root: str, out_dir: str, size: int, device, k: int = 6,
                          num_videos: int = 2, columns: int = 8, tag: str = ""):
    """PNG grid (per video: a row of frames, a row of cluster maps) and one GIF per video."""
    import evaluate
    backbone.eval()
    colours = torch.tensor([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                            [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [128, 128, 128]],
                           dtype=torch.uint8)
    videos = data.DAVIS(davis_root, split="val")
    rows, names, picks = [], [], []
    name = f"TimeT ({tag.strip('_') or 'trained'})"
    title = f"{name}: k-means (k={k}) on all patch tokens of a video, one colour a cluster"
    for v in range(min(num_videos, len(videos))):
        item = videos[v]
        frames = TF.resize(item["frames"], [size, size], antialias=True)
        feats = F.normalize(evaluate.clip_features(backbone, item["frames"], size, device), dim=-1)
        sample = feats.reshape(-1, feats.shape[-1])
        subset = torch.randperm(len(sample), generator=torch.Generator().manual_seed(0))[:20000]
        clusters = evaluate.pixel_clusters(feats, evaluate.kmeans(sample[subset], k)[1], size)
        painted = rearrange(colours[clusters % len(colours)], "t h w c -> t c h w").float()
        overlay = (0.4 * frames.float() + 0.6 * painted).byte()
        picks.append(torch.linspace(0, len(frames) - 1, columns).long().tolist())
        rows += [list(frames[picks[-1]]), list(overlay[picks[-1]])]
        names += [f"{item['name']}:\nframes", f"{item['name']}:\nclusters"]
        gif = [data.labelled_grid([[f, o]], None, f"{name}, {item['name']}",
                                  col_names=[f"frame {t}", f"k-means, k={k}"])
               for t, (f, o) in enumerate(zip(frames, overlay))]
        gif[0].save(os.path.join(out_dir, f"clusters{tag}_{item['name']}.gif"), save_all=True, append_images=gif[1:],
                    duration=80, loop=0)
    same = all(p == picks[0] for p in picks)
    data.labelled_grid(rows, os.path.join(out_dir, f"clusters{tag}.png"), title, names,
                       [f"frame {t}" if same else f"{i + 1}/{columns} through" for i, t in enumerate(picks[0])])


def evaluate_backbone(backbone, args, device, tag: str):
    """The demo's table: video k-means (this file) + DAVIS propagation and VOC through evaluate.py."""
    import evaluate
    root = args.eval_data
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.time()
    world = root if os.path.exists(os.path.join(root, "world.json")) else None
    davis = os.path.join(root, "davis")
    kmeans = evaluate.video_kmeans_miou(backbone, davis, args.eval_size, device, world_root=world)
    save_cluster_pictures(backbone, davis, args.output_dir, args.eval_size, device, tag=tag)
    print(f"[{tag.strip('_') or 'timet'}] " + ", ".join(f"{k} {v:.2f}" for k, v in kmeans.items()), flush=True)
    seconds = time.time() - start
    suite = evaluate.run_suite(backbone.eval(), root, args.eval_benches, device, image_size=args.eval_size)
    return {**kmeans, "time/video_kmeans+pictures": seconds, **suite}


def main(args):
    if args.bench:
        return train(args)
    data.check_output_dir(args.output_dir, args.resume, args.overwrite, METHOD)  # refuse before any work
    student, teacher, d = train(args)
    if not args.eval_data or args.no_eval or not d.is_main:
        return
    # the initial weights are evaluated after training: before it, the other ranks would wait for rank 0 (hours)
    data.seed_everything(args.seed, 0)  # the same initialisation train() starts from
    init = evaluate_backbone(build_model(args).backbone.to(d.device), args, d.device, "_init")
    after = evaluate_backbone(teacher.backbone, args, d.device, "")
    start = f"--pretrained {args.pretrained}" if args.pretrained else "random init (scratch)"
    print(f"\n{'benchmark':<34s}{'init':>10s}{'timet':>10s}   (init = {start}; trained on {args.data}, "
          f"evaluated on {args.eval_data})")
    for key in after:
        print(f"{key:<34s}{init.get(key, float('nan')):>10.4f}{after[key]:>10.4f}")
    record = {"eval": "final", "init": init, "timet": after, "start": start, "train_data": args.data,
              "eval_data": args.eval_data}
    data.JsonlLogger(os.path.join(args.output_dir, "log.jsonl"), True).log(record)
    print(json.dumps(record))


if __name__ == "__main__":
    data.cli(main, get_args)
