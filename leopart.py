"""Leopart: dense self-supervised clustering of ViT patch tokens into object parts.

Paper: Ziegler & Asano, "Self-Supervised Learning of Object Parts for Semantic Segmentation",
CVPR 2022, https://arxiv.org/abs/2204.13101 (official code: github.com/MkuuWaUjinga/leopart).

The idea. Start from a DINO ViT and fine-tune it so that its *patch tokens* cluster into object parts. Every
token goes through a projection head and is scored against 300 L2-normalised prototypes. For each image we take
2 global and 4 local crops that overlap and keep their boxes. An EMA teacher scores the tokens of each global
crop; an online Sinkhorn-Knopp (eps 0.05, 3 iterations, a queue of past tokens for small batches) turns the
scores into balanced soft cluster assignments. Those assignments are RoI-aligned (7x7) onto the region each
other crop shares with the global crop, and the student must predict them from that other crop: a
swapped-prediction cross-entropy between *aligned* token maps. The loss only counts foreground tokens, taken
from the teacher's [CLS] attention (blurred, 60 % of its mass). After training, the paper segments without
labels: k-means on tokens, cluster-based foreground extraction, then community detection merges clusters.

Commands:
  python leopart.py --demo                          # vit_demo on the synthetic world, ~5 min CPU
  python leopart.py --demo --pretrained runs/dora/checkpoint.pth   # chain from another demo
  python leopart.py --data /data/coco/train2017 --pretrained dino_deitsmall16_pretrain.pth
  torchrun --nproc_per_node=2 leopart.py --data /data/coco/train2017 --pretrained dino.pth

Contents: args, the ViT (a copy of DINO's, as in every method file), head and wrapper, multi-crop with boxes,
Sinkhorn-Knopp, foreground mask, loss, train(), evaluation (evaluate.py's unsupervised segmentation).
"""
import argparse
import collections
import itertools
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.ops import roi_align
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import data

METHOD = "leopart"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ====== Config: the official train_coco_config.yml's values; --demo overrides a few in one place.
# --demo: ~300 steps, not ~90k, so lr x10, a faster teacher; DEMO_SCRATCH: attention means nothing yet, so all tokens
DEMO = dict(arch="vit_demo", patch_size=8, epochs=15, batch_size_per_gpu=8, num_workers=1, global_crops_size=64,
            local_crops_size=32, proj_hidden_dim=512, queue_length=2048, lr_backbone=1e-4, lr_heads=1e-3,
            momentum_teacher=0.99, eval_size=96, log_every=5, k_fg=100, k_community=50)
DEMO_SCRATCH = dict(lr_backbone=5e-4, lr_heads=5e-4, loss_mask="all")


def get_args(argv=None):
    p = argparse.ArgumentParser("Leopart", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="VOC-layout root (train split), image folder (recursive), or a "
                   "video or folder of videos (one frame every --video-frame-step as an image)")
    p.add_argument("--output-dir", default="runs/leopart")
    p.add_argument("--arch", default="vit_small", choices=["vit_demo", "vit_tiny", "vit_small", "vit_base"])
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--pretrained", help="DINO weights (plain or full checkpoint) or another method file's checkpoint")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size-per-gpu", type=int, default=32)
    p.add_argument("--lr-backbone", type=float, default=1e-5, help="small: the DINO features are already good")
    p.add_argument("--lr-heads", type=float, default=1e-4)
    p.add_argument("--final-lr", type=float, default=0.0, help="both learning rates decay by cosine to this")
    p.add_argument("--weight-decay", type=float, default=0.04)
    p.add_argument("--weight-decay-end", type=float, default=0.5)
    p.add_argument("--momentum-teacher", type=float, default=0.9995, help="EMA, cosine to 1")
    p.add_argument("--drop-path", type=float, default=0.1, help="student only")
    p.add_argument("--global-crops-size", type=int, default=224)
    p.add_argument("--local-crops-size", type=int, default=96)
    p.add_argument("--global-crops-number", type=int, default=2, help="all global crops give assignments")
    p.add_argument("--local-crops-number", type=int, default=4)
    p.add_argument("--global-crops-scale", type=float, nargs=2, default=(0.25, 1.0))
    p.add_argument("--local-crops-scale", type=float, nargs=2, default=(0.05, 0.25))
    p.add_argument("--min-intersection", type=float, default=0.01, help="of the image area (x2 between globals)")
    p.add_argument("--proj-hidden-dim", type=int, default=2048)
    p.add_argument("--proj-dim", type=int, default=256)
    p.add_argument("--proj-layers", type=int, default=3)
    p.add_argument("--num-prototypes", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.1, help="student softmax")
    p.add_argument("--sk-eps", "--epsilon", type=float, default=0.05, help="Sinkhorn-Knopp entropy weight ε")
    p.add_argument("--sk-iters", "--sinkhorn-iters", type=int, default=3)
    p.add_argument("--queue-length", type=int, default=8192, help="0 disables the queue")
    p.add_argument("--roi-align-size", type=int, default=7)
    p.add_argument("--loss-mask", default="fg", choices=["fg", "all", "bg"])
    p.add_argument("--fg-mass", type=float, default=0.6, help="share of [CLS]-attention mass kept as foreground")
    p.add_argument("--blur-sigma", type=float, default=0.6)
    p.add_argument("--eval-data", default=None, help="VOC-layout root: unsupervised seg. (--demo: like runs/synth)")
    p.add_argument("--eval-size", type=int, default=448, help="validation image size (paper: 448)")
    p.add_argument("--k-fg", type=int, default=200, help="clusters for cluster-based foreground extraction")
    p.add_argument("--k-community", type=int, default=149, help="foreground clusters merged by community detection")
    p.add_argument("--video-frame-step", type=int, default=30, help="one training frame every N frames of a video")
    p.add_argument("--demo", action="store_true", help="vit_demo, small crops, short schedule, synthetic world")
    demo = lambda given: {**DEMO, **(DEMO_SCRATCH if given.pretrained is None else {})}  # noqa: E731
    args = data.parse_args(p, argv, demo, workers=8, log_every=10)  # + the run flags all share
    args.synth_root = None
    if args.demo:
        args.synth_root = data.demo_eval_root(args.eval_data, ["seg-cluster", "seg-linear"])  # or --eval-data, checked
        args.eval_data = os.path.join(args.synth_root, "voc")
        args.data = args.data or os.path.join(data.ensure_synth("runs/synth", seed=0), "voc")  # its train split
    if args.data is None:
        p.error("--data is required (or --demo for the synthetic world)")
    return args


# ====== Model: DINO's Vision Transformer
# A copy in every method file, so that each reads alone; DINO's parameter names, so that DINO's checkpoints load
class DropPath(nn.Module):  # stochastic depth: drop the whole residual branch of a sample with probability p
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

    def heads(self, x):  # (B, N, D) -> q, k, v, each (B, heads, N, D / heads)
        return rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)

    def weights(self, x):  # (B, N, D) -> softmax attention (B, heads, N, N)
        q, k, _ = self.heads(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)

    def forward(self, x, weights=None):
        """x (B, N, D) -> (B, N, D): the fused kernel (flash / mem-efficient), or, given this x's `weights`,
        the explicit mix through them (the teacher's tokens and its foreground mask then come from one pass)."""
        q, k, v = self.heads(x)
        out = F.scaled_dot_product_attention(q, k, v) if weights is None else weights @ v
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)  # DINO's Mlp: fc1, GELU, fc2
        self.mlp = nn.Sequential(collections.OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                                         fc2=nn.Linear(hidden, dim)))

    def forward(self, x, weights=None):  # weights: this block's attention (Attention.weights), to mix through
        x = x + self.drop_path(self.attn(self.norm1(x), weights))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, H/p * W/p, D)
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT with a [CLS] token; DINO's interface (forward -> [CLS] (B, D) after the final norm, get_last_selfattention,
    get_intermediate_layers(x, n) -> n x (B, 1+N, D)), and tokens_and_attention for Leopart's teacher."""

    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, drop_path_rate=0.0,
                 img_size=224):
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
    def _init_weights(m):  # DINO's; its LayerNorm init (1, 0) is PyTorch's default
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
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return x + self.interpolate_pos_encoding(x.shape[1] - 1, H, W)

    def forward(self, x):  # (B, 3, H, W) -> [CLS] (B, D)
        return self.get_intermediate_layers(x)[0][:, 0]

    def tokens_and_attention(self, x):
        """(B, 3, H, W) -> the normed tokens (B, 1+N, D) and the last block's attention (B, heads, 1+N, 1+N),
        in one pass (Leopart's teacher: its assignments and its foreground mask)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        attn = self.blocks[-1].attn.weights(self.blocks[-1].norm1(x))
        return self.norm(self.blocks[-1](x, attn)), attn

    def get_last_selfattention(self, x):  # -> (B, heads, 1+N, 1+N)
        return self.tokens_and_attention(x)[1]

    def get_intermediate_layers(self, x, n: int = 1):  # -> list of n tensors (B, 1+N, D), normed
        x, out = self.prepare_tokens(x), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out


def vit_demo(patch_size=8, **kw):  # for the CPU demos: ViT-Tiny width, 4 blocks
    return VisionTransformer(patch_size, embed_dim=192, depth=4, num_heads=3, **kw)


def vit_tiny(patch_size=16, **kw):
    return VisionTransformer(patch_size, embed_dim=192, depth=12, num_heads=3, **kw)


def vit_small(patch_size=16, **kw):
    return VisionTransformer(patch_size, embed_dim=384, depth=12, num_heads=6, **kw)


def vit_base(patch_size=16, **kw):
    return VisionTransformer(patch_size, embed_dim=768, depth=12, num_heads=12, **kw)


ARCHS = dict(vit_demo=vit_demo, vit_tiny=vit_tiny, vit_small=vit_small, vit_base=vit_base)


def build_backbone(args) -> VisionTransformer:
    """Fresh ViT with the architecture stored in a checkpoint's args (evaluate.py's entry point)."""
    args = args if isinstance(args, dict) else vars(args)
    return ARCHS[args["arch"]](patch_size=args["patch_size"])


# ====== Model: projection head with prototypes, and the student/teacher wrapper
class LeopartHead(nn.Module):
    """3-layer MLP (GELU) to an L2-normalised 256-d embedding, scored against the prototypes
    (a bias-free linear layer whose rows are re-normalised every step, so scores are cosines)."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=256, num_layers=3, num_prototypes=300):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.mlp = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.GELU())][:-1])
        self.prototypes = nn.Linear(out_dim, num_prototypes, bias=False)
        self.apply(VisionTransformer._init_weights)

    def forward(self, tokens):  # (..., D) -> embeddings (..., E) unit norm, scores (..., K)
        emb = F.normalize(self.mlp(tokens), dim=-1)
        return emb, self.prototypes(emb)

    @torch.no_grad()
    def normalize_prototypes(self):
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))


class LeopartNet(nn.Module):
    """ViT at `backbone`, head at `head`: DINO's MultiCropWrapper layout, so that DINO's eval scripts load it."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops, with_attention: bool = False):
        """crops: list of (B, 3, H_i, W_i) -> per crop: embeddings (B, h*w, E), scores (B, K, h, w), and with
        attention the [CLS]->patch attention of the last block averaged over heads (B, h, w) (else an empty list)."""
        embs, scores, attns = [], [], []
        for _, group in itertools.groupby(crops, key=lambda c: c.shape[-2:]):  # crops of one size: one pass
            group = list(group)
            x, p = torch.cat(group), self.backbone.patch_embed.patch_size
            h, w = x.shape[-2] // p, x.shape[-1] // p
            if with_attention:
                tokens, attn = self.backbone.tokens_and_attention(x)
                attns += rearrange(attn[:, :, 0, 1:].mean(1), "b (h w) -> b h w", h=h, w=w).chunk(len(group))
            else:
                tokens = self.backbone.get_intermediate_layers(x)[0]
            emb, score = self.head(tokens[:, 1:])
            embs += emb.chunk(len(group))
            scores += rearrange(score, "b (h w) k -> b k h w", h=h, w=w).chunk(len(group))
        return embs, scores, attns


# ====== Data: multi-crop with kept boxes (paper Sec. 3.2), every crop overlapping the global crops
def pair_boxes(abs_boxes: torch.Tensor, sizes: list, num_global: int):
    """abs_boxes: (C, 4) crop boxes x1 y1 x2 y2 in the image; sizes: output side of each crop.
    -> in_global (G, C, 4): box of g ∩ v in crop g's pixels; in_crop (G, C, 4): in crop v's pixels."""
    C = len(abs_boxes)
    g = abs_boxes[:num_global, None].expand(-1, C, -1)  # (G, C, 4)
    v = abs_boxes[None].expand(num_global, -1, -1)  # (G, C, 4)
    inter = torch.cat([torch.maximum(g[..., :2], v[..., :2]), torch.minimum(g[..., 2:], v[..., 2:])], dim=-1)
    sizes = torch.tensor(sizes, dtype=torch.float32)

    def inside(ref, size):  # image coordinates -> pixels of the resized crop `ref`
        origin, extent = ref[..., :2].repeat(1, 1, 2), (ref[..., 2:] - ref[..., :2]).repeat(1, 1, 2)
        return (inter - origin) / extent * size

    return inside(g, sizes[:num_global, None, None]), inside(v, sizes[None, :, None])


class LeopartCrops:
    """Image uint8 (3, H, W) -> (list of normalised crops, dict(in_global, in_crop) boxes).
    Random resized crops that must intersect the earlier global crops; colour jitter (0.8, 0.8,
    0.8, 0.2; p 0.8), grayscale p 0.2, blur p 0.5. No flips: they would break the boxes.
    on_device (a GPU run): the loader hands over uint8 crops, finish() adds the colours on the device, batched."""

    def __init__(self, global_size=224, local_size=96, num_global=2, num_local=4,
                 global_scale=(0.25, 1.0), local_scale=(0.05, 0.25), min_intersection=0.01, on_device=False):
        self.num_global, self.min_intersection, self.on_device = num_global, min_intersection, on_device
        self.sizes = [global_size] * num_global + [local_size] * num_local
        self.scales = [tuple(global_scale)] * num_global + [tuple(local_scale)] * num_local
        self.blur_kernel = 2 * (global_size // 20) + 1  # official: the global crops' kernel for every crop
        self.colour = T.Compose([T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(p=0.2),
                                 T.RandomApply([T.GaussianBlur(self.blur_kernel, sigma=(0.1, 2.0))], p=0.5)])

    def finish(self, batch, device):  # (crops, boxes) of a batch -> on the device, the colours of __call__ batched
        crops = [c.to(device, non_blocking=True) for c in batch[0]]
        boxes = {k: v.to(device) for k, v in batch[1].items()}
        if not self.on_device:
            return crops, boxes
        out = []
        for c in crops:
            x = data.random_grayscale(data.color_jitter(c.float() / 255, 0.8, 0.8, 0.8, 0.2, p=0.8), 0.2)
            sigma = torch.empty(len(x), device=device).uniform_(0.1, 2.0)
            out.append(TF.normalize(data.gaussian_blur(x, sigma, self.blur_kernel, p=0.5), MEAN, STD))
        return out, boxes

    def sample_box(self, img, i, boxes):  # boxes: the earlier crops' [x1, y1, x2, y2] -> this crop's
        H, W = img.shape[-2:]  # official leopart_transforms.py: an int 1 % of the area, twice that for global crops
        min_area = int(H * W * self.min_intersection) * (2 if i < self.num_global else 1)
        while True:  # the official redraws until the crop meets every global crop (some draw always can)
            y, x, h, w = T.RandomResizedCrop.get_params(img, self.scales[i], (3 / 4, 4 / 3))
            if all(max(min(x2, x + w) - max(x1, x), 0) * max(min(y2, y + h) - max(y1, y), 0) > min_area
                   for x1, y1, x2, y2 in boxes[:min(i, self.num_global)]):
                return [x, y, x + w, y + h]

    def __call__(self, img):
        img = img[None].contiguous(memory_format=torch.channels_last)[0]  # torch's fast uint8 resize (load_image's)
        boxes, crops = [], []
        for i, size in enumerate(self.sizes):
            boxes.append(self.sample_box(img, i, boxes))
            x1, y1, x2, y2 = boxes[i]
            crop = TF.resized_crop(img, int(y1), int(x1), int(y2 - y1), int(x2 - x1), [size, size], antialias=True)
            crops.append(crop if self.on_device else TF.normalize(self.colour(crop).float() / 255, MEAN, STD))
        boxes = torch.tensor(boxes, dtype=torch.float32)
        in_global, in_crop = pair_boxes(boxes, self.sizes, self.num_global)
        return crops, {"in_global": in_global, "in_crop": in_crop}


def align(maps: torch.Tensor, boxes: torch.Tensor, patch_size: int, out_size: int = 7):
    """RoI-align (aligned=True) a box of every map: maps (B, C, h, w) token grids, boxes (B, 4) in
    the crop's pixels -> (B, C, out, out). Token i covers pixels [i p, (i+1) p)."""
    rois = torch.cat([torch.arange(len(boxes), device=maps.device, dtype=maps.dtype)[:, None],
                      boxes.to(maps) / patch_size], dim=1)
    return roi_align(maps, rois, out_size, spatial_scale=1.0, aligned=True)


# ====== Dense clustering: online Sinkhorn-Knopp assignments (SwAV's, as Leopart runs it), foreground (Sec. 3.3)
@torch.no_grad()
def sinkhorn_online(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """scores (N, K) cosines of this rank's tokens (+ queue) -> Q (N, K), rows sum to 1, every prototype getting an
    equal share of the tokens of all ranks (DDP: only sums cross devices). Q = exp(scores / eps) rescaled (eq. 3)."""
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1

    def all_sum(t, op=dist.ReduceOp.SUM if distributed else None):
        if distributed:
            dist.all_reduce(t, op=op)
        return t

    scores = scores.float()
    top = all_sum(scores.max().clone(), dist.ReduceOp.MAX if distributed else None)
    Q = torch.exp((scores - top) / eps).t()  # (K, N); subtracting the global max changes nothing
    Q /= all_sum(Q.sum())
    K, N = Q.shape
    for _ in range(iters):
        Q /= all_sum(Q.sum(dim=1, keepdim=True)) * K  # rows: each prototype 1/K of the mass
        Q /= Q.sum(dim=0, keepdim=True) * (N * world)  # columns: each token 1/N
    return (Q / Q.sum(dim=0, keepdim=True)).t()


@torch.no_grad()
def foreground_mask(attn: torch.Tensor, mass: float = 0.6, sigma: float = 0.6, min_size: int = 3):
    """attn (B, h, w) head-averaged [CLS] attention -> bool (B, h, w): blur (7x7 Gaussian), keep the most-attended
    tokens that together hold `mass` of the blurred attention, then drop connected components (8-neighbourhood)
    smaller than `min_size` (<= 3) tokens: a token is in one of 3 or more if it has 2 neighbours, or 1 that has 2."""
    B, h, w = attn.shape
    a = TF.gaussian_blur(attn.float()[:, None], kernel_size=[7, 7], sigma=[sigma, sigma]).flatten(1)
    a = a / a.sum(dim=1, keepdim=True)
    values, order = a.sort(dim=1, descending=True)
    before = values.cumsum(dim=1) - values  # mass of the tokens ranked above this one
    keep_sorted = before < mass  # smallest top set whose mass reaches `mass`
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted).reshape(B, h, w)
    if min_size > 3:
        raise ValueError(f"foreground_mask: min_size {min_size} > 3 (official: 3)")
    count = lambda x: F.conv2d(x[:, None], x.new_ones(1, 1, 3, 3), padding=1)[:, 0] - x  # noqa: E731  8-neighbours
    n = count(keep.float()) * keep
    return keep & [keep, keep, n >= 1, (n >= 2) | ((n == 1) & (count(n) >= 2))][max(min_size, 0)]


def foreground_bins(fg: torch.Tensor, boxes: torch.Tensor, patch_size: int, out_size: int = 7):
    """fg bool (B, h, w), boxes (B, 4) -> float (B, out, out): 1 where a RoI-align bin lies entirely on foreground
    (`>= 1.0`, float error included, as official spatial_loss)."""
    return (align(fg[:, None].float(), boxes, patch_size, out_size)[:, 0] >= 1.0).float()


# ====== Loss (paper eq. 4): teacher's aligned assignments vs the student's aligned predictions, on foreground
class LeopartLoss(nn.Module):
    """Cross-entropy between the aligned Sinkhorn assignments of each global crop (the teacher's) and the aligned
    predictions from every other crop (the student's). Holds the queue of past teacher embeddings (this rank's)."""

    def __init__(self, args, world_size=1):
        super().__init__()
        self.args = args
        n = args.queue_length // world_size if args.queue_length > 0 else 0
        self.register_buffer("queue", torch.zeros(args.global_crops_number, n, args.proj_dim))
        self.full = [False] * args.global_crops_number

    def forward(self, student_scores, teacher_embs, teacher_scores, teacher_attns, boxes, prototypes):
        """student_scores: per crop (B, K, h, w); teacher_*: per global crop (B, h*w, E), (B, K, h, w), (B, h, w)
        (no attentions, []: every token counts); boxes: dict of (B, G, C, 4); prototypes (K, E), for the queue -> the
        loss and the entropy of the aligned targets averaged as the loss is (0-d each): the loss's floor, so that
        loss - entropy is the KL the student has yet to close."""
        a, G, C = self.args, self.args.global_crops_number, len(student_scores)
        p, r = a.patch_size, a.roi_align_size
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        fgs = [foreground_mask(m, a.fg_mass, a.blur_sigma) for m in teacher_attns] or [None] * G
        fgs = [~fg if a.loss_mask == "bg" else fg for fg in fgs]
        pairs = [(g, v) for g in range(G) for v in range(C) if v != g]
        weights = [foreground_bins(fgs[g], boxes["in_global"][:, g, v], p, r) if fgs[g] is not None else
                   teacher_scores[g].new_ones(len(teacher_scores[g]), r, r, dtype=torch.float32) for g, v in pairs]
        counts = torch.stack([weight.sum() for weight in weights]).detach()
        if world > 1:  # normalise by the global counts (one all-reduce): DDP then equals one big batch
            dist.all_reduce(counts)
        if self.queue.shape[1] > 0 and not all(self.full):  # one host sync a step, only until the queues are full
            self.full = (self.queue[:, -1] != 0).any(dim=1).tolist()
        loss, entropy = 0.0, 0.0
        for g in range(G):
            B, K, h, w = teacher_scores[g].shape
            with torch.no_grad():
                scores = rearrange(teacher_scores[g].float(), "b k h w -> (b h w) k")
                if self.queue.shape[1] > 0:
                    if self.full[g]:  # use the queue once it is full
                        scores = torch.cat([self.queue[g] @ prototypes.float().t(), scores])
                    self.push(g, teacher_embs[g], fgs[g])
                q = sinkhorn_online(scores, a.sk_eps, a.sk_iters)[-B * h * w:]
                q = rearrange(q, "(b h w) k -> b k h w", b=B, h=h, w=w)
            sub, sub_entropy = 0.0, 0.0
            for (g_, v), weight, count in zip(pairs, weights, counts):
                if g_ != g:
                    continue
                target = align(q, boxes["in_global"][:, g, v], p, r)
                logits = align(student_scores[v].float(), boxes["in_crop"][:, g, v], p, r)
                ce = -(target * F.log_softmax(logits / a.temperature, dim=1)).sum(1)  # (B, 7, 7)
                bin_entropy = -(target * target.clamp_min(1e-12).log()).sum(1)  # CE = this + KL, per bin
                has, per_bin = count > 0, world / count.clamp_min(1)  # official `if count > 0`, without a host sync
                sub = sub + torch.where(has, (ce * weight).sum() * per_bin, 0.0)
                sub_entropy = sub_entropy + torch.where(has, (bin_entropy * weight).sum() * per_bin, 0.0)
            loss, entropy = loss + sub / (C - 1), entropy + sub_entropy / (C - 1)
        return loss / G, entropy / G

    @torch.no_grad()
    def push(self, g, emb, fg):
        """Add up to 10 random (foreground) teacher embeddings per image to the front of queue g (no host sync)."""
        emb = emb.reshape(-1, emb.shape[-1]).float()
        most = min(self.args.batch_size_per_gpu * 10, self.queue.shape[1], len(emb))
        rank = torch.rand(len(emb), device=emb.device) - (0 if fg is None else 2.0 * ~fg.flatten())  # fg first
        pick = emb[rank.argsort(descending=True)[:most]]  # a random order of the foreground tokens
        n = fg.sum().clamp(max=most) if fg is not None else most  # stays on the device: a gather shifts the queue
        rows = torch.arange(self.queue.shape[1], device=emb.device)
        old = self.queue[g, (rows - n).clamp(min=0)]
        self.queue[g] = torch.where((rows < n)[:, None], pick[rows.clamp(max=most - 1)], old)


def leopart_loss(student, teacher, criterion: LeopartLoss, crops, boxes, autocast):
    """crops: list of (B, 3, H_i, W_i) on the device, the global crops first; boxes: dict of (B, G, C, 4)
    -> the loss (0-d) and stats {name: 0-d tensor}. `student` may be DDP-wrapped; the teacher sees the global crops."""
    model = student.module if hasattr(student, "module") else student
    model.head.normalize_prototypes()  # scores are cosines
    teacher.head.normalize_prototypes()
    with autocast:
        with torch.no_grad():
            t_embs, t_scores, t_attns = teacher(crops[:criterion.args.global_crops_number],
                                                with_attention=criterion.args.loss_mask != "all")
        _, s_scores, _ = student(crops)
        loss, target_entropy = criterion(s_scores, t_embs, t_scores, t_attns, boxes,
                                         model.head.prototypes.weight.detach())
    return loss, {"loss": loss, "target_entropy": target_entropy}


# ====== Training
def init_backbone(args, drop_path=None):
    """The network training starts from: --pretrained, else random (seeded by the caller); drop_path: --drop-path."""
    backbone = ARCHS[args.arch](args.patch_size, drop_path_rate=args.drop_path if drop_path is None else drop_path)
    if args.pretrained:
        data.load_pretrained(backbone, args.pretrained)
    return backbone


def init_teacher(args, device="cpu"):
    """As official src/leopart.py `init_model`: its own random draw, no drop-path, --pretrained loaded; rank 0's."""
    backbone = init_backbone(args, drop_path=0.0)
    head = LeopartHead(backbone.embed_dim, args.proj_hidden_dim, args.proj_dim, args.proj_layers, args.num_prototypes)
    return data.broadcast_module(LeopartNet(backbone, head).to(device).requires_grad_(False).eval())


def param_groups(model: LeopartNet, args):
    """Backbone and head groups, each split into decayed weights and (no-decay) norms and biases."""
    groups = []
    for part, lr, base in ((model.backbone, args.lr_backbone, "backbone"), (model.head, args.lr_heads, "head")):
        decay = [p for n, p in part.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
        no_decay = [p for n, p in part.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
        groups += [dict(params=decay, lr=lr, base=base, decay=True),
                   dict(params=no_decay, lr=lr, weight_decay=0.0, base=base, decay=False)]
    return groups


def gather_queue(queue, world_size):
    """Every rank's queue (G, n, E), newest first, interleaved -> (G, world_size * n, E), newest first."""
    queues = [torch.empty_like(queue) for _ in range(world_size)] if world_size > 1 else [queue]
    if world_size > 1:
        dist.all_gather(queues, queue)
    return rearrange(torch.stack(queues), "w g n e -> g (n w) e")


def queue_share(saved, rank, world_size, n):
    """This rank's (G, n, E) of a gather_queue (an older checkpoint's: (W, G, n, E)): every world_size-th entry,
    so the same world size gets its queue back exactly, another one a share of the newest (zero-padded)."""
    saved = rearrange(saved, "w g n e -> g (n w) e") if saved.dim() == 4 else saved
    share = saved[:, rank::world_size][:, :n]
    return torch.cat([share, share.new_zeros(share.shape[0], n - share.shape[1], share.shape[2])], dim=1)


# What a training step uses besides the batch: the student (maybe DDP-wrapped), its EMA teacher, the loss (its queue)
TrainState = collections.namedtuple("TrainState", "student teacher criterion optimizer scaler autocast device")


def train_step(state: TrainState, crops, boxes, momentum: float) -> dict:
    """One Leopart step on a batch on the device (crops: list of (B, 3, H_i, W_i), boxes: dict of (B, G, C, 4), from
    LeopartCrops.finish) -> its stats as floats. The training loop's step and --bench's."""
    student, teacher, criterion, optimizer, scaler, autocast, _ = state
    loss, stats = leopart_loss(student, teacher, criterion, crops, boxes, autocast)
    # ------ update (the same block in every method file)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    stats = data.host_stats(stats)  # the step's one host sync; raises on a non-finite loss
    scaler.step(optimizer)
    scaler.update()
    data.ema_update(teacher, student, momentum)
    return stats


def train(args):
    d = data.init_distributed()
    args.amp = data.resolve_amp(args.amp, d.device)
    autocast = data.autocast(d.device, args.amp)
    data.seed_everything(args.seed)  # not per rank: the same initial networks everywhere (per rank: each epoch)
    log, ckpt_path, ckpt = data.prepare_output_dir(args.output_dir, args.resume, args.overwrite, d.is_main, METHOD,
                                                   d.world_size)

    backbone = init_backbone(args)  # first, right after seeding: main() rebuilds the same for "before"
    crops = LeopartCrops(args.global_crops_size, args.local_crops_size, args.global_crops_number,
                         args.local_crops_number, args.global_crops_scale, args.local_crops_scale,
                         args.min_intersection, on_device=d.device.type == "cuda" or bool(args.bench))  # GPU: uint8
    dataset = data.ImagesOrFrames(args.data, crops, args.video_frame_step)
    sampler = torch.utils.data.DistributedSampler(dataset, d.world_size, d.rank, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=d.device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"--data {args.data}: {len(dataset)} images is fewer than one batch of "
                         f"{args.batch_size_per_gpu}")

    head = LeopartHead(backbone.embed_dim, args.proj_hidden_dim, args.proj_dim, args.proj_layers, args.num_prototypes)
    model = LeopartNet(backbone, head).to(d.device)
    teacher = init_teacher(args, d.device)
    criterion = LeopartLoss(args, d.world_size).to(d.device)

    optimizer = torch.optim.AdamW(param_groups(model, args), lr=args.lr_backbone, weight_decay=args.weight_decay)
    scaler = data.make_scaler(args.amp, d.device)
    lr_sched = {base: data.cosine_schedule(lr, args.final_lr, args.epochs, steps_per_epoch)
                for base, lr in (("backbone", args.lr_backbone), ("head", args.lr_heads))}
    wd_sched = data.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, steps_per_epoch)
    momentum_sched = data.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, steps_per_epoch)

    start_epoch, step = data.resume_step(ckpt, steps_per_epoch)
    if ckpt is not None:  # --resume
        for part, key in ((model, "model"), (teacher, "teacher"), (optimizer, "optimizer"), (scaler, "scaler")):
            part.load_state_dict(ckpt[key])
        criterion.queue.copy_(queue_share(ckpt["queue"], d.rank, d.world_size, criterion.queue.shape[1]))
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.world_size > 1 else model
    state = TrainState(ddp, teacher, criterion, optimizer, scaler, autocast, d.device)
    if args.bench:  # loader and step rates (data.bench_train) of the training step
        step_on = lambda b: train_step(state, *crops.finish(b, d.device), float(momentum_sched[0]))  # noqa: E731
        data.bench_train(loader, step_on, args.bench, d.device)
        return model, teacher

    for epoch in range(start_epoch, min(args.epochs, start_epoch + (args.stop_after or args.epochs))):
        data.seed_everything(args.seed + epoch, d.rank)  # a resumed run replays the same randomness
        sampler.set_epoch(epoch)
        ddp.train()
        bar = tqdm(loader, disable=not d.is_main, desc=f"epoch {epoch}", leave=False)
        t0 = time.time()
        for batch in bar:
            for group in optimizer.param_groups:  # per-step schedules, precomputed (DINO's way)
                group["lr"] = float(lr_sched[group["base"]][step])
                if group["decay"]:
                    group["weight_decay"] = float(wd_sched[step])
            stats = train_step(state, *crops.finish(batch, d.device), float(momentum_sched[step]))
            step += 1
            ips = args.batch_size_per_gpu * d.world_size * (bar.n + 1) / (time.time() - t0)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{ips:.0f}")
            if step % args.log_every == 0 or step == args.epochs * steps_per_epoch:
                log.log({"epoch": epoch, "step": step, **stats, "lr_backbone": float(lr_sched["backbone"][step - 1]),
                         "lr_heads": float(lr_sched["head"][step - 1]), "wd": float(wd_sched[step - 1]),
                         "momentum": float(momentum_sched[step - 1]), "img_s": ips})
        queue = gather_queue(criterion.queue, d.world_size)
        if d.is_main:
            data.save_checkpoint({"method": METHOD, "args": vars(args), "epoch": epoch + 1, "step": step,
                                  "model": model.state_dict(), "teacher": teacher.state_dict(),
                                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                  "queue": queue.cpu(), "world_size": d.world_size}, ckpt_path)
            print(f"epoch {epoch}: loss {stats['loss']:.3f}, {ips:.0f} img/s, saved {ckpt_path}")
    data.finish_distributed()
    return model, teacher


# ====== Evaluation, and its pictures, through evaluate.py
def evaluate_backbone(backbone, args, tag, pictures=False):
    """evaluate.run_suite's seg-cluster and seg-linear on the synthetic world, and the paper's fully unsupervised
    segmentation (evaluate.py's, with this file's foreground mask) on a VOC-layout split."""
    import evaluate
    backbone.eval()
    device = next(backbone.parameters()).device
    results = evaluate.run_suite(backbone, args.synth_root, ["seg-cluster", "seg-linear"], device,
                                 image_size=args.eval_size) if args.synth_root else {}
    if args.eval_data:
        noisy_fg = lambda attn: foreground_mask(attn, 0.65, 0.6)  # noqa: E731  (the official CBFE's mass)
        picture = os.path.join(args.output_dir, f"cluster_maps_{tag}.png") if pictures else None
        scores = evaluate.unsupervised_segmentation_voc(backbone, args.eval_data, args.eval_size, noisy_fg,
                                                        args.k_fg, args.k_community, args.seed, picture,
                                                        f"Leopart, {tag} training")
        results.update({f"unsup/{k}": v for k, v in scores.items()})
    return results


def main(args):
    if int(os.environ.get("RANK", 0)) != 0 or args.bench:  # other ranks (and --bench) only train
        train(args)
        return
    data.check_output_dir(args.output_dir, args.resume, args.overwrite, METHOD)  # refuse before any work
    _, teacher = train(args)
    before, device = {}, next(teacher.parameters()).device
    if args.demo:  # after training, when the other ranks have left: none waits for rank 0's evaluation
        data.seed_everything(args.seed)  # init_backbone: what train() started from
        before = evaluate_backbone(init_backbone(args).to(device), args, "before", pictures=True)
    after = evaluate_backbone(teacher.backbone, args, "after", pictures=True)
    start = "--pretrained " + args.pretrained if args.pretrained else "random initialisation (from scratch)"
    print(f"\nLeopart {args.arch}/{args.patch_size}, {args.epochs} epochs, started from {start}, trained on "
          f"{args.data}, evaluated on {args.synth_root or args.eval_data}")
    print(f"{'metric':>28s} {'before':>8s} {'after':>8s}")
    for k, v in after.items():
        print(f"{k:>28s} " + (v if isinstance(v, str) else f"{before.get(k, float('nan')):8.4f} {v:8.4f}"))
    print(__import__("json").dumps({"before": before, "after": after, "train_data": args.data,
                                    "eval_data": args.synth_root or args.eval_data}))


if __name__ == "__main__":
    data.cli(main, get_args)
