"""SeLa: self-labelling via simultaneous clustering and representation learning.

Asano, Rupprecht, Vedaldi. ICLR 2020. https://arxiv.org/abs/1911.05371

The idea. Train a network with cross-entropy on pseudo-labels, and choose the labels so
that they minimise that same cross-entropy, under one constraint: every one of the K
clusters receives an equal share N/K of the N images. Without that constraint the
trivial solution (everything in one cluster) wins. With it, and an entropy term weighted
by 1/λ, the label step is an optimal-transport problem solved in seconds by the
Sinkhorn-Knopp algorithm (`sinkhorn_knopp`). Training alternates: many SGD steps on the
current labels, then a fresh label assignment of the whole dataset, on a schedule that
is dense early and sparse late. Several clustering heads on one backbone give several
labellings at once. The later methods of this repo (Leopart, TimeT, DoRA) use the same
equipartition per batch instead of per dataset (`sinkhorn_online`, as in SwAV).

Commands:
    python sinkhorn.py --demo                         # small conv net, synthetic world, CPU
    python sinkhorn.py --data /imagenet               # paper: AlexNet, 10 heads x 3000
    torchrun --nproc_per_node=8 sinkhorn.py --data /imagenet --arch resnet50 \
        --batch-size-per-gpu 32                       # 8 x 32 = the paper's 256
    python sinkhorn.py --data DIR --resume            # continue <output-dir>/checkpoint.pth

Contents: config; model (AlexNet, ResNet, a DINO-compatible ViT, the clustering heads); data;
Sinkhorn-Knopp (offline and online) and the label step over the whole dataset; the loss; training;
evaluation (NMI, Hungarian accuracy, k-NN/linear through evaluate.py, a picture of the clusters).
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as T
from tqdm import tqdm

import data

METHOD = "sinkhorn"


# ====== Config: the paper's ImageNet defaults; --demo overrides a few of them (flags given win)
# --demo: a small conv net (a random-init ViT's first labels are noise) with the official CIFAR config's λ and crops
DEMO = dict(arch="convnet_demo", image_size=64, crop_scale=(0.2, 1.0), lam=10.0, num_heads=3, num_clusters=None,
            epochs=32, batch_size_per_gpu=64, lr_milestones=[24], num_label_updates=16, num_workers=0, log_every=5)


def get_args(argv=None):
    p = argparse.ArgumentParser("SeLa: self-labelling with Sinkhorn-Knopp", add_help=True)
    p.add_argument("--data", default=None, help="image folder (ImageFolder with train/, or any folder of images), "
                   "or a video or folder of videos (their frames as images)")
    p.add_argument("--eval-data", default=None, help="ImageFolder with train/ and val/ for k-NN/linear after training "
                   "(--demo: a root laid out like the synthetic world, with objects/; default: the synthetic world)")
    p.add_argument("--output-dir", default="runs/sinkhorn")
    p.add_argument("--demo", action="store_true", help="small net, short schedule, synthetic world (CPU, minutes)")
    p.add_argument("--arch", default="alexnet",
                   choices=["alexnet", "resnet18", "resnet50", "convnet_demo", "vit_demo", "vit_small", "vit_base"])
    p.add_argument("--patch-size", type=int, default=16, help="ViT patch size")
    p.add_argument("--image-size", type=int, default=224, help="RandomResizedCrop output size")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), help="RandomResizedCrop area range")
    p.add_argument("--num-heads", type=int, default=10, help="clustering heads (paper: 10)")
    p.add_argument("--num-clusters", type=int, default=3000, help="clusters per head K (paper: 3000)")
    p.add_argument("--lam", type=float, default=25.0, help="λ: inverse entropic regularisation of the label step")
    p.add_argument("--sk-tol", type=float, default=0.1, help="stop SK when sum |c/c_new - 1| falls below this")
    p.add_argument("--num-label-updates", type=int, default=100,
                   help="label re-optimisations over training (paper: 100)")
    p.add_argument("--epochs", type=int, default=400, help="as official main.py's: it trains epochs + 1 passes")
    p.add_argument("--batch-size-per-gpu", type=int, default=256, help="paper: 256 in total")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adamw"],
                   help="default: SGD for AlexNet/ResNet (paper), AdamW for ViTs (as DINO trains them)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: SGD 0.08 (official main.py; paper 0.05), demo 0.05 (official cifar.py), AdamW 5e-4")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=[150, 300, 350], help="epochs where lr drops x0.1")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    args = data.parse_args(p, argv, DEMO, workers=8, log_every=20)  # + the run flags all share
    if args.demo:
        args.eval_data = os.path.join(data.demo_eval_root(args.eval_data, ["knn", "linear"]), "objects")
        args.data = args.data or os.path.join(data.ensure_synth("runs/synth", seed=0), "objects", "train")
    args.optimizer = args.optimizer or ("adamw" if args.arch.startswith("vit") else "sgd")
    # SGD: official main.py's default 0.08 (its help text and the paper say 0.05); the demo: cifar.py's 0.05
    args.lr = args.lr if args.lr is not None else (5e-4 if args.optimizer == "adamw" else 0.05 if args.demo else 0.08)
    if args.data is None:
        p.error("--data is required (or --demo to use the synthetic world)")
    return args


# ====== Model: AlexNet (BN, RGB) and ResNet-50 as in SeLa, each with DINO's interface for evaluate.py
class _PatchSize:  # stands in for a ViT's patch_embed: evaluate.py reads .patch_size
    def __init__(self, patch_size):
        self.patch_size = patch_size


class ConvBackbone(nn.Module):
    """A conv trunk (B,3,H,W) -> map (B,C,h,w), plus an optional MLP on the flattened map.
    forward -> (B, D) the clustering heads' input; get_intermediate_layers -> [(B, 1+h*w, C)]:
    the globally pooled map in the [CLS] slot, then the map's positions as patch tokens."""

    def __init__(self, trunk, stride, map_dim, mlp=None, out_dim=None, alexnet_init=False):
        super().__init__()
        self.trunk, self.mlp = trunk, mlp
        self.alexnet_init = alexnet_init  # SeLaNet then gives its heads the same initialisation
        self.patch_embed = _PatchSize(stride)
        self.embed_dim = map_dim  # the dimension of the tokens evaluate.py reads
        self.out_dim = out_dim or map_dim  # the dimension of forward(), the heads' input

    def forward(self, x):
        fmap = self.trunk(x)
        if self.mlp is None:
            return fmap.mean(dim=(2, 3))
        return self.mlp(F.adaptive_max_pool2d(fmap, 6).flatten(1))

    def get_intermediate_layers(self, x, n=1):  # one conv stage only, whatever n
        fmap = self.trunk(x)
        tokens = fmap.flatten(2).transpose(1, 2)
        return [torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)]


def alexnet_bn():
    """AlexNet with BatchNorm as in SeLa/DeepCluster ('big' config), fc7 (4096) as output."""
    cfg = [(96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"]
    layers, c_in = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(3, 2))
        else:
            layers += [nn.Conv2d(c_in, v[0], v[1], v[2], v[3]), nn.BatchNorm2d(v[0]), nn.ReLU(inplace=True)]
            c_in = v[0]
    mlp = nn.Sequential(nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
                        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True))
    return alexnet_init_(ConvBackbone(nn.Sequential(*layers), stride=32, map_dim=256, mlp=mlp, out_dim=4096,
                                      alexnet_init=True))


@torch.no_grad()
def alexnet_init_(module):
    """SeLa's AlexNet initialisation, in place (official models/alexnet.py, `_initialize_weights`):
    conv weights N(0, sqrt(2 / (k*k*out_channels))), linear weights N(0, 0.01), BatchNorm weight 1,
    every bias 0. Returns `module`."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            std = math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
            for w in m.weight:  # one draw per output channel, as the official loop
                w.normal_(0, std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.fill_(1)
            m.bias.zero_()
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0, 0.01)
            m.bias.zero_()
    return module


def convnet_demo(width=64):
    """A 4-stage conv net with BN for the CPU demo (a small AlexNet-style trunk, stride 8). No official
    counterpart: PyTorch's init (AlexNet's made the demo's clusters less reliable)."""
    layers, c_in = [], 3
    for i, c in enumerate((width, 2 * width, 4 * width, 4 * width)):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        layers += [nn.MaxPool2d(2)] if i < 3 else []
        c_in = c
    return ConvBackbone(nn.Sequential(*layers), stride=8, map_dim=c_in)


def resnet(depth):  # torchvision's init (the official resnetv2.py keeps PyTorch's defaults, heads too)
    net = getattr(torchvision.models, f"resnet{depth}")(weights=None)  # never downloads
    trunk = nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc
    return ConvBackbone(trunk, stride=32, map_dim=net.fc.in_features)


# --- A DINO ViT, this file's own copy (it reads alone): DINO's parameter names and outputs
class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def queries_keys_values(self, x):  # (B, N, D) -> (3, B, heads, N, D / heads)
        B, N, D = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        q, k, v = self.queries_keys_values(x)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def weights(self, x):  # (B, N, D) -> (B, heads, N, N): the softmax attention, for pictures
        q, k, _ = self.queries_keys_values(x)
        return (q @ k.transpose(-2, -1) * self.scale).softmax(-1)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()  # named fc1/fc2 like DINO's Mlp
        hidden = int(dim * mlp_ratio)
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
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

    def prepare_tokens(self, x):  # (B, 3, H, W) -> (B, 1+N, D), pos-embed resized as DINO does
        B, _, H, W = x.shape
        p, n = self.patch_embed.patch_size, self.pos_embed.shape[1] - 1
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        pos = self.pos_embed
        if x.shape[1] != n or H != W:
            side = int(math.sqrt(n))
            grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, scale_factor=((H // p + 0.1) / side, (W // p + 0.1) / side), mode="bicubic")
            pos = torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, self.embed_dim)], 1)
        return torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + pos

    def forward(self, x):  # -> (B, D) [CLS]
        return self.get_intermediate_layers(x, 1)[0][:, 0]

    def get_intermediate_layers(self, x, n=1):  # -> n x (B, 1+N, D), each normed
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


VIT_SIZES = {"vit_demo": (192, 4, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def build_backbone(args: dict) -> nn.Module:
    """Fresh backbone from args (a dict: a checkpoint's stored args)."""
    arch = args["arch"]
    if arch == "alexnet":
        return alexnet_bn()
    if arch.startswith("resnet"):
        return resnet(int(arch[6:]))
    if arch == "convnet_demo":
        return convnet_demo()
    dim, depth, heads = VIT_SIZES[arch]
    return VisionTransformer(args.get("patch_size", 16), dim, depth, heads)


class SeLaNet(nn.Module):
    """backbone + `num_heads` linear clustering heads; forward -> list of (B, K) logits."""

    def __init__(self, backbone, num_heads, num_clusters):
        super().__init__()
        self.backbone = backbone
        dim = getattr(backbone, "out_dim", backbone.embed_dim)
        self.heads = nn.ModuleList([nn.Linear(dim, num_clusters) for _ in range(num_heads)])
        if getattr(backbone, "alexnet_init", False):  # official AlexNet: its top layers N(0, 0.01), bias 0
            alexnet_init_(self.heads)

    def forward(self, x):
        z = self.backbone(x)
        return [h(z) for h in self.heads]


# ====== Data: SeLa's augmentation level 3, and the dataset with the index of each image.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def train_transform(size, scale=(0.08, 1.0)):  # uint8 (3,H,W) -> float (3,size,size)
    return T.Compose([T.RandomResizedCrop(size, scale=tuple(scale), antialias=True), T.RandomGrayscale(0.2),
                      T.ColorJitter(0.4, 0.4, 0.4, 0.4), T.RandomHorizontalFlip(),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


class Indexed(torch.utils.data.Dataset):
    """(image, label, index): the index says which pseudo-label to train on."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image, label = self.base[i]
        return image, label, i


def make_dataset(root, transform):
    """ImageFolder when `root` (or root/train) has class folders (labels then serve the NMI
    evaluation only), else every image below `root`, unlabelled."""
    if os.path.isdir(os.path.join(root, "train")):
        root = os.path.join(root, "train")
    try:
        return data.ImageFolder(root, transform=transform)
    except (ValueError, FileNotFoundError, RuntimeError):
        return data.UnlabelledImages(root, transform=transform)


# ====== Sinkhorn-Knopp: the label step.
def _all_reduce(t, world_size):
    if world_size > 1:
        dist.all_reduce(t)
    return t


def _all_reduce_max(t, world_size):
    if world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


@torch.no_grad()
def sinkhorn_knopp(log_probs, lam=25.0, tol=0.1, world_size=1):
    """Equipartitioned soft labels for a whole dataset (SeLa, Sec. 3.1, Eq. 6-7).

    The labels Q (an N x K matrix) live in the transportation polytope
        U = {Q >= 0 : Q 1_K = 1_N / N,  Q^T 1_N = 1_K / K}
    (each image carries mass 1/N, each cluster receives mass 1/K: an equal partition).
    Minimising <Q, -log P> - H(Q)/λ over U has the solution Q = diag(c) P^λ diag(r), with
    the scaling vectors found by alternating row and column normalisation (Sinkhorn-Knopp).
    Larger λ: closer to the hard optimal-transport assignment. Runs until the relative change
    of c falls to `tol`, however many iterations that takes (as official `optimize_L_sk`); a non-finite change raises.

    log_probs: (N_local, K) log-softmax of one head over this rank's share of the dataset.
    Under DDP each rank holds its own rows; only the K-vector of column sums and the
    scalars N and the error cross ranks (all-reduce), never the matrix.
    Returns Q: (N_local, K) float64; rows sum to 1/N, columns (over all ranks) to 1/K.
    Hard labels are Q.argmax(1).
    """
    N_local, K = log_probs.shape
    N = _all_reduce(torch.tensor([float(N_local)], dtype=torch.float64, device=log_probs.device), world_size).item()
    # P^λ, each row rescaled to max 1: a per-row factor is absorbed by c, and it keeps
    # exp() away from underflow where the official code's P**λ can reach zero.
    z = lam * log_probs.double()
    shift = z.max(dim=1).values
    Q = torch.exp(z - shift[:, None])
    c = torch.exp(shift) / N  # the official c = 1/N of the unshifted P^λ: the same iterates, the same stop
    it, err = 0, math.inf
    while err > tol:  # as the official loop: check the relative change every 10 steps
        r = (1.0 / K) / _all_reduce(Q.t() @ c, world_size)  # (K,): column marginals -> 1/K
        c_new = (1.0 / N) / (Q @ r)  # (N_local,): row marginals -> 1/N
        if it % 10 == 0:
            err = _all_reduce((c / c_new - 1).abs().sum().reshape(1), world_size).item()
            if not math.isfinite(err):  # a cluster no image reaches: the official's nanargmax fails later
                raise FloatingPointError(f"Sinkhorn-Knopp diverged at iteration {it} (change {err})")
        c = c_new
        it += 1
    return Q * c[:, None] * r[None, :]


@torch.no_grad()
def sinkhorn_online(scores, eps=0.05, iters=3, world_size=1):
    """Per-batch equipartition (SwAV's form, used by Leopart, TimeT and DoRA).

    scores: (B_local, K) similarities of samples to K prototypes. Q = exp(scores/ε) is
    rescaled `iters` times so that clusters share the batch equally (mass B/K each, summed
    over ranks) and each sample has total mass 1. ε is SeLa's 1/λ.
    Returns (B_local, K) soft assignments, rows summing to 1.
    """
    top = _all_reduce_max(scores.detach().double().max().reshape(1), world_size)  # one shift for all ranks
    Q = torch.exp((scores.double() - top) / eps).t()  # (K, B_local)
    B = _all_reduce(torch.tensor([float(Q.shape[1])], dtype=torch.float64, device=Q.device), world_size).item()
    K = Q.shape[0]
    Q /= _all_reduce(Q.sum().reshape(1), world_size)
    for _ in range(iters):
        Q /= _all_reduce(Q.sum(dim=1, keepdim=True), world_size) * K  # each cluster: 1/K
        Q /= Q.sum(dim=0, keepdim=True) * B  # each sample: 1/B
    return (Q * B).t().float()


@torch.no_grad()
def update_labels(model, dataset, args, dist_info, autocast):
    """The label step over the whole dataset (SeLa, Sec. 3.2): embed every image once (on the
    same augmented pipeline as training, as the official code), apply each head, and solve
    Sinkhorn-Knopp per head. Each rank embeds the indices rank, rank+W, ...; the labels
    (N ints per head, small) are then summed across ranks so that every rank has all.
    Returns (num_heads, N) int64."""
    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    # the network stays in training mode, as in the official code: BN normalises with batch
    # statistics, which keeps a freshly initialised network's features in range at step 0
    own = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, own), batch_size=args.batch_size_per_gpu,
                                         num_workers=args.num_workers, shuffle=False)
    feats = []
    for images, _, _ in loader:
        with autocast:
            feats.append(raw.backbone(images.to(dist_info.device)).float())
    feats = torch.cat(feats)
    labels = torch.zeros(len(raw.heads), len(dataset), dtype=torch.int64, device=dist_info.device)
    for h, head in enumerate(raw.heads):
        Q = sinkhorn_knopp(F.log_softmax(head(feats), dim=1), args.lam, args.sk_tol, world_size=dist_info.world_size)
        labels[h, own] = Q.argmax(1)
    return _all_reduce(labels, dist_info.world_size)


def label_update_steps(num_updates, epochs, num_images, batch_size, steps_per_epoch):
    """Global steps (of a run of epochs + 1 passes, `steps_per_epoch` each) before which labels are
    re-solved, at the epoch and iteration where official main.py (`optimize`) re-solves them: when
    the images seen, counted as iterations x batch_size with the last short batch of each epoch
    counted full (its loader keeps it), reach (epochs + 1.01) * N * t² for t = k / (n - 1),
    k = 0 .. n - 1: dense early, sparse late, the first before step 0. The last (t = 1) lies past
    the end and fires only where that count overshoots N.
    At most one update per step, as the official pops one per step. batch_size: global batch."""
    official_steps_per_epoch = math.ceil(num_images / batch_size)
    steps = []
    for seen in (epochs + 1.01) * num_images * np.linspace(0, 1, num_updates) ** 2:
        it = math.ceil(seen / batch_size)  # the first official iteration with it * batch_size >= seen
        epoch, i = divmod(it, official_steps_per_epoch)
        if i >= steps_per_epoch:  # the official epoch's short last batch: ours dropped it, so next epoch
            epoch, i = epoch + 1, 0
        step = max(epoch * steps_per_epoch + i, steps[-1] + 1 if steps else 0)
        if step < (epochs + 1) * steps_per_epoch:
            steps.append(step)
    return steps


# ====== Loss: cross-entropy of each head to its own labels, averaged over heads
def sela_loss(model, images, labels, autocast):
    """images (B, 3, H, W), labels (num_heads, B) of these images -> (loss, stats {name: 0-d tensor})."""
    with autocast:
        loss = torch.stack([F.cross_entropy(z.float(), labels[h]) for h, z in enumerate(model(images))]).mean()
    return loss, {"loss": loss.detach()}


# ====== Training
def train_step(model, optimizer, scaler, images, labels, autocast) -> dict:
    """One update on the current labels (num_heads, B) of these images -> stats {name: float}."""
    loss, stats = sela_loss(model, images, labels, autocast)

    # ------ update (the same block in every method file)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    stats = data.host_stats(stats)  # the step's one host sync; raises on a non-finite loss
    scaler.step(optimizer)
    scaler.update()
    return stats


def lr_at(epoch, args):  # step schedule of the paper: x0.1 at each milestone
    return args.lr * 0.1 ** sum(epoch >= m for m in args.lr_milestones)


def train(args):
    d = data.init_distributed()
    args.amp = data.resolve_amp(args.amp, d.device)
    autocast = data.autocast(d.device, args.amp)
    data.seed_everything(args.seed)  # not per rank: the same initial network everywhere (per rank: each epoch)
    log, ckpt_path, ckpt = data.prepare_output_dir(args.output_dir, args.resume, args.overwrite, d.is_main, METHOD,
                                                   d.world_size)

    dataset = Indexed(make_dataset(args.data, train_transform(args.image_size, args.crop_scale)))
    if args.num_clusters is None:  # demo: K = 3 x the classes when the folder has them (paper: 3000 for 1000)
        args.num_clusters = 3 * len(getattr(dataset.base, "classes", [])) or 30
    sampler = torch.utils.data.DistributedSampler(dataset, d.world_size, d.rank, shuffle=True, seed=args.seed,
                                                  drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler,
                                         num_workers=args.num_workers, drop_last=True, persistent_workers=False)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"{args.data}: {len(dataset)} images is fewer than one batch of {args.batch_size_per_gpu} "
                         "per GPU")

    model = SeLaNet(build_backbone(vars(args)), args.num_heads, args.num_clusters).to(d.device)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.04)  # DINO's weight decay
    scaler = data.make_scaler(args.amp, d.device)
    updates = label_update_steps(args.num_label_updates, args.epochs, len(dataset),
                                 args.batch_size_per_gpu * d.world_size, steps_per_epoch)
    labels = None
    start_epoch, step = data.resume_step(ckpt, steps_per_epoch)
    if ckpt is not None:  # --resume
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        labels = ckpt["labels"].to(d.device)
    if labels is None:  # start from a random balanced labelling (as the official code)
        g = torch.Generator().manual_seed(args.seed)
        labels = torch.stack([torch.arange(len(dataset))[torch.randperm(len(dataset), generator=g)]
                              % args.num_clusters for _ in range(args.num_heads)]).to(d.device)
    updates = [u for u in updates if u >= step]  # on resume: those before `step` are done
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.world_size > 1 else model
    if args.bench:  # loader and step rates (data.bench_train)
        def bench_step(batch):  # the step of the loop below
            images, _, index = batch
            images, index = images.to(d.device, non_blocking=True), index.to(d.device)
            return train_step(ddp, optimizer, scaler, images, labels[:, index], autocast)
        data.bench_train(loader, bench_step, args.bench, d.device)
        return model, labels, dataset

    # epochs + 1 passes, as official main.py's loop (fewer with --stop-after)
    for epoch in range(start_epoch, min(args.epochs + 1, start_epoch + (args.stop_after or args.epochs + 1))):
        data.seed_everything(args.seed + epoch, d.rank)  # per epoch: a resumed run replays the same randomness
        sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(epoch, args)
        ddp.train()
        bar = tqdm(loader, disable=not d.is_main, desc=f"epoch {epoch}", leave=False)
        t0 = time.time()
        for images, _, index in bar:
            if updates and step >= updates[0]:  # the label step, on the paper's schedule
                while updates and step >= updates[0]:
                    updates.pop(0)
                labels = update_labels(ddp, dataset, args, d, autocast)
            images, index = images.to(d.device, non_blocking=True), index.to(d.device)
            stats = train_step(ddp, optimizer, scaler, images, labels[:, index], autocast)
            step += 1
            ips = len(images) * d.world_size * (bar.n + 1) / (time.time() - t0)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{ips:.0f}")
            if step % args.log_every == 0:
                log.log({"epoch": epoch, "step": step, **stats, "lr": optimizer.param_groups[0]["lr"], "img_s": ips})
        if d.is_main:
            data.save_checkpoint({"method": METHOD, "args": vars(args), "epoch": epoch + 1, "step": step,
                                  "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "labels": labels.cpu(), "world_size": d.world_size},
                                 ckpt_path)
            print(f"epoch {epoch}: loss {stats['loss']:.3f}, {ips:.0f} img/s, saved {ckpt_path}")
    data.finish_distributed()
    return model, labels, dataset


# ====== Evaluation: how well do the clusters match the true classes, and how good are the features.
def eval_transform(size):
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


@torch.no_grad()
def cluster_quality(model, root, size, device, lam=25.0):
    """NMI and Hungarian accuracy of each head's argmax against the folder's classes, on
    un-augmented images, plus `nmi_sk/mean`: the NMI of each head's equipartitioned labels
    (the label step on these images). The latter is the fair floor for a fresh network, whose
    argmax often puts nearly every image in one cluster (NMI ~0), while any balanced labelling
    of N images scores about (K-1)(C-1)/(2N ln C) by chance alone.
    Returns {"nmi/head0": ..., "acc/head0": ..., "nmi/head1": ..., ..., "nmi/mean": ..., "nmi_sk/mean": ...}."""
    import evaluate
    ds = make_dataset(root, eval_transform(size))
    if not hasattr(ds, "classes"):
        return {}
    loader = torch.utils.data.DataLoader(ds, batch_size=128)
    logits, truth = [[] for _ in model.heads], []
    model.eval()
    for images, y in loader:
        for h, z in enumerate(model(images.to(device))):
            logits[h].append(z.float().cpu())
        truth.append(y)
    logits, truth = [torch.cat(z) for z in logits], torch.cat(truth)
    nmi = [evaluate.nmi(z.argmax(1), truth) for z in logits]
    acc = [evaluate.cluster_accuracy(z.argmax(1), truth) for z in logits]
    nmi_sk = [evaluate.nmi(sinkhorn_knopp(F.log_softmax(z, 1), lam).argmax(1), truth) for z in logits]
    per_head = {f"{name}/head{h}": v[h] for h in range(len(logits)) for name, v in (("nmi", nmi), ("acc", acc))}
    return {**per_head, "nmi/mean": float(np.mean(nmi)), "nmi_sk/mean": float(np.mean(nmi_sk))}


@torch.no_grad()
def save_cluster_grid(model, root, size, path, clusters=8, per_cluster=8):
    """A picture: rows = the clusters of head 0 with the most images, columns = members."""
    ds = make_dataset(root, eval_transform(size))
    raw = make_dataset(root, T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size)]))
    model.eval()
    assign = torch.cat([model(x)[0].argmax(1) for x, _ in torch.utils.data.DataLoader(ds, batch_size=128)])
    counts = torch.bincount(assign, minlength=model.heads[0].out_features)
    top = counts.argsort(descending=True)[:clusters]
    rows = []
    for k in top:
        members = (assign == k).nonzero().flatten()  # a random sample: folders are sorted by class
        members = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(0))]
        rows.append([raw[i][0] for i in members[:per_cluster].tolist()])
    names = [f"cluster {k}\n{counts[k]} image{'s' * (counts[k] != 1)}" for k in top.tolist()]
    data.labelled_grid(rows, path, f"SeLa: the {len(top)} largest clusters of head 0 (rows), up to {per_cluster} "
                       "random images of each (columns)", names)


def main(args):
    if args.bench:
        return train(args)
    model, _, _ = train(args)
    if int(os.environ.get("RANK", 0)) != 0:
        return
    import evaluate
    device = next(model.parameters()).device
    torch.manual_seed(args.seed)  # the floor: the same network with fresh weights
    fresh = SeLaNet(build_backbone(vars(args)), args.num_heads, args.num_clusters).to(device)
    results = {}
    for name, net in (("init", fresh), ("sela", model)):
        res = cluster_quality(net, args.data, args.image_size, device, args.lam)
        if args.eval_data:  # k-NN and linear probe on the learned features (evaluate.py)
            res.update(evaluate.classification(net.backbone.eval(), args.eval_data, device, ("knn", "linear"),
                                               image_size=args.image_size, epochs=30 if args.demo else 100))
        results.update({f"{name}/{k}": v for k, v in res.items()})
    save_cluster_grid(model, args.data, args.image_size, os.path.join(args.output_dir, "clusters.png"))
    evaluate.print_table(results, title=f"SeLa ({args.arch}) vs. the same network at initialisation; clusters (nmi, "
                         f"acc) on --data {args.data} if it has classes, k-NN and linear probe on {args.eval_data}")
    print(json.dumps({**results, "train_data": args.data, "eval_data": args.eval_data}))


if __name__ == "__main__":
    data.cli(main, get_args)
