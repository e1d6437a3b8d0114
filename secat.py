"""SeCAt: self-context adaptation, open-ended few-shot classification with a small VLM.

Derakhshani, Najdenkoska, Snoek, Worring, Asano. "Self-Supervised Open-Ended Classification
with Small Visual Language Models" (v1: "Small Visual Language Models can also be Open-Ended
Few-Shot Learners"), 2023. https://arxiv.org/abs/2310.00500  (no official code is public)

The idea. A visual language model learns to name things from a few examples in its context,
without a single real caption. Cluster a pool of unlabelled images with a frozen image
encoder; give each cluster a name that means nothing about its content ("dax", "blicket");
then train on interleaved "self-context" sequences

    <img> This is a dax. <img> This is a blicket. ... <query img> What is this? This is a  dax.

with the loss only on the query's answer. As names are re-drawn for every episode, the only
way to answer is to find the support image that looks like the query and copy its name. At
test time the same model gets real class names in its context and answers in open text
(Frozen's protocol: exact match of the generated name, nothing is trained at test time).

What is trained (as in the paper): the image encoder is FROZEN; the mapper from image
features to visual prefix tokens and the language model are TRAINED.

Commands:
    python secat.py --demo                                   # tiny LM from scratch, ~6 min on 2 CPU cores
    python secat.py --demo --encoder runs/sinkhorn/checkpoint.pth   # frozen encoder from a demo run
    python secat.py --data /imagenet/train --eval-data /mini-imagenet/val \\
        --encoder dino_deitsmall16_pretrain.pth --lm gpt2-xl/model.safetensors   # full scale
    torchrun --nproc_per_node=8 secat.py --data ... --encoder ... --lm ...
    python secat.py ... --resume                             # continue <output-dir>/checkpoint.pth
                                                             # (all epochs done: evaluates it again)

Contents: config; the frozen DINO-compatible ViT (this file's own copy); the byte-level
tokenizer; the GPT decoder and GPT-2 weight loading; the visual mapper; clustering
(Sinkhorn-Knopp equipartition or k-means) and pseudo-names; self-context episodes and the
masked loss; greedy generation; training; evaluation through evaluate.icl; a picture.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.transforms import v2 as T
from tqdm import tqdm

import data

METHOD = "secat"


# ----------------------------------------------------------------------------------------
# Config. Paper-scale defaults (a ~1B LM, a DINO ViT-S/16); --demo overrides a few.
# ----------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser("SeCAt: self-context adaptation")
    p.add_argument("--data", default=None, help="folder of unlabelled images (class folders, if any, are ignored), "
                   "or a video or folder of videos (their frames as images)")
    p.add_argument("--eval-data", default=None, help="ImageFolder with real class names for the icl benchmark (--demo: "
                   "a root laid out like the synthetic world, whose objects/val is used; default: the synthetic world)")
    p.add_argument("--output-dir", default="runs/secat")
    p.add_argument("--demo", action="store_true", help="tiny LM, short schedule, synthetic world (CPU, minutes)")
    p.add_argument("--encoder", default=None, help="frozen image encoder: official DINO weights or a repo checkpoint; "
                   "random init when not given")
    p.add_argument("--encoder-arch", default="vit_small", help="architecture when --encoder is not given")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lm", default=None, help="pretrained causal LM: a HF GPT-2-family state dict "
                   "(pytorch_model.bin / model.safetensors, or their folder); else a GPT trained from scratch")
    p.add_argument("--lm-dim", type=int, default=768, help="from-scratch LM width")
    p.add_argument("--lm-layers", type=int, default=12)
    p.add_argument("--lm-heads", type=int, default=12)
    p.add_argument("--context", type=int, default=1024, help="from-scratch LM context length")
    p.add_argument("--lm-positions", default="rope", choices=["rope", "learned"],
                   help="from-scratch LM: rotary (relative) or GPT-2's learned absolute positions")
    p.add_argument("--text-warmup-steps", type=int, default=0, help="first steps on text only (next-token loss on "
                   "caption lists with repeated nonsense names): for an LM from scratch, which lacks pretraining")
    p.add_argument("--prefix-tokens", type=int, default=2, help="visual tokens per image (Frozen: 2)")
    p.add_argument("--clusters", type=int, default=1000, help="K clusters of the unlabelled pool")
    p.add_argument("--cluster-method", default="sinkhorn", choices=["sinkhorn", "kmeans"],
                   help="sinkhorn: k-means with Sinkhorn-Knopp equal-size assignments; kmeans: plain")
    p.add_argument("--pseudo-names", default="nonsense", choices=["nonsense", "nouns"],
                   help="cluster names, re-drawn per episode: pronounceable nonsense words, or nouns from this "
                   "file's list of 157 minus the evaluation's class words (the paper's kind, for a pretrained LM: "
                   "an LM from scratch learns to write the list's words instead of copying, README)")
    p.add_argument("--max-ways", type=int, default=5, help="training episodes: N drawn from 2..max-ways")
    p.add_argument("--max-shots", type=int, default=5, help="training episodes: K drawn from 1..max-shots")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, default=2000)
    p.add_argument("--batch-size-per-gpu", type=int, default=16, help="episodes per GPU per step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--eval-episodes", type=int, default=200, help="episodes per (ways, shots) setting")
    p.add_argument("--eval-ways", type=int, nargs="+", default=[2, 5])
    p.add_argument("--eval-shots", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"], help="default: bf16 on capable GPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pth")
    p.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds a checkpoint")
    p.add_argument("--log-every", type=int, default=20)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.demo:  # everything small enough for 2 CPU cores in about 5 minutes
        given = {a.split("=")[0] for a in argv}
        demo = dict(encoder_arch="vit_demo", patch_size=8, image_size=64, lm_dim=128, lm_layers=4, lm_heads=4,
                    context=512, clusters=16, max_ways=2, max_shots=1, epochs=6, steps_per_epoch=150,
                    text_warmup_steps=300,
                    batch_size_per_gpu=32, lr=2e-3, min_lr=1e-4, warmup_epochs=1, eval_episodes=200,
                    eval_ways=[2, 5], eval_shots=[1],
                    num_workers=0, log_every=10)
        for k, v in demo.items():  # explicit flags win over the demo's settings
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
        args.eval_data = os.path.join(data.demo_eval_root(args.eval_data, ["objects"]), "objects", "val")
        args.data = args.data or os.path.join(data.ensure_synth("runs/synth", seed=0), "objects", "train")
    if args.data is None:
        p.error("--data is required (or --demo to use the synthetic world)")
    args.vocabulary = name_vocabulary(args.pseudo_names, args.eval_data)
    return args


# ---------------------------------------------------------------------------------------
# A DINO-compatible Vision Transformer. Each method file carries its own copy so that it
# reads alone (house style); parameter names follow the official DINO checkpoints, so
#   model.load_state_dict(torch.load("dino_deitsmall16_pretrain.pth"), strict=True)
# works and gives the same outputs as DINO's vision_transformer.py. (Frozen here: stochastic
# depth, a training-only regulariser without parameters, is left out of this copy.)
# ---------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention: bool = False):
        """x: (B, N, D) -> (B, N, D), and the attention (B, heads, N, N) if asked."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if return_attention:  # the explicit path: the weights are needed (viz, tracking)
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            out = attn @ v
        else:  # fused kernel (flash / memory-efficient) when no weights are needed
            attn = None
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))
        return (out, attn) if return_attention else out

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

    def forward(self, x, return_attention: bool = False):
        if return_attention:
            y, attn = self.attn(self.norm1(x), return_attention=True)
        else:
            y, attn = self.attn(self.norm1(x)), None
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return (x, attn) if return_attention else x

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
        return self.blocks[-1](x, return_attention=True)[1]

    def get_intermediate_layers(self, x, n: int = 1):  # -> list of n tensors (B, 1+N, D), normed
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out

VIT_ARCHS = {"vit_demo": (8, 192, 4), "vit_tiny": (16, 192, 12), "vit_small": (16, 384, 12), "vit_base": (16, 768, 12)}


def build_backbone(args: dict) -> nn.Module:
    """The frozen image encoder with fresh weights, from a checkpoint's stored args (evaluate.py
    calls this). DINO's ViTs all have 64-dim heads, so width and depth fix the architecture; an
    encoder from another method file that is not a ViT (sinkhorn.py's conv nets) is rebuilt by it."""
    if args.get("encoder_method"):
        import importlib
        return importlib.import_module(args["encoder_method"]).build_backbone(args["encoder_args"])
    if args.get("encoder_dim") is None:
        _, dim, depth = VIT_ARCHS[args.get("encoder_arch", "vit_small")]
    else:
        dim, depth = args["encoder_dim"], args["encoder_depth"]
    return VisionTransformer(args.get("patch_size", 16), dim, depth, dim // 64, img_size=args.get("encoder_img_size", 224))


def feature_dim(encoder) -> int:  # the width of encoder(images): a ViT's [CLS], a conv net's pooled output
    return getattr(encoder, "out_dim", encoder.embed_dim)


def load_encoder(args) -> nn.Module:
    """--encoder: official DINO weights (a plain ViT state dict) or a checkpoint of this repo
    (the `backbone.` keys of `teacher`, else of `model`); the architecture is read off the
    weights (or, for a non-ViT, taken from the checkpoint's method and args) and stored in args
    so that build_backbone(args) rebuilds it. None: random init."""
    args.encoder_method = args.encoder_args = None
    if args.encoder is None:
        args.encoder_dim = args.encoder_depth = None
        args.encoder_img_size = 224
        return build_backbone(vars(args))
    state = data.load_checkpoint(args.encoder, flag="--encoder")  # weights_only=True; a damaged file names itself
    weights = state.get("teacher") or state.get("model") or {}
    if "method" in state and "backbone.cls_token" not in weights:  # another method's non-ViT backbone
        import evaluate
        args.encoder_method, args.encoder_args = state["method"], state["args"]
        return evaluate.load_backbone(args.encoder)
    if "teacher" in state or "model" in state:  # a training checkpoint: take its ViT
        state = state["teacher"] if state.get("teacher") else state["model"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if "cls_token" not in state:
        raise SystemExit(f"--encoder {args.encoder}: no DINO-style ViT weights found (need cls_token, blocks.*)")
    args.encoder_dim = int(state["cls_token"].shape[-1])
    args.encoder_depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    args.patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    args.encoder_img_size = int(math.isqrt(state["pos_embed"].shape[1] - 1)) * args.patch_size
    encoder = build_backbone(vars(args))
    encoder.load_state_dict(state, strict=True)
    return encoder


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(size):  # uint8 (3, H, W) -> normalised float (3, size, size); the encoder is frozen: no augmentation
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


# ----------------------------------------------------------------------------------------
# Language side 1: a byte-level tokenizer. One id per UTF-8 byte, so any name can be
# spelled, including names never seen in training ("striped ring", "Ærø", "狐").
# ----------------------------------------------------------------------------------------
def gpt2_byte_ids():
    """GPT-2's vocabulary starts with the 256 single bytes, printable ones first (the order of
    its bytes_to_unicode table). Returns the list byte -> GPT-2 token id."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    order = printable + [b for b in range(256) if b not in printable]
    ids = [0] * 256
    for token_id, byte in enumerate(order):
        ids[byte] = token_id
    return ids


class ByteTokenizer:
    """Text <-> ids, one id per UTF-8 byte. kind="bytes" (LM from scratch): ids 0-255 are the
    bytes, 256 <eos>, 257 <pad>. kind="gpt2" (pretrained GPT-2 family): GPT-2's own byte
    tokens, <|endoftext|> (50256) as <eos> and <pad>. <eos> also opens every sequence."""

    def __init__(self, kind="bytes"):
        if kind == "bytes":
            self.byte_to_id, self.eos, self.pad, self.vocab_size = list(range(256)), 256, 257, 258
        elif kind == "gpt2":
            self.byte_to_id, self.eos, self.pad, self.vocab_size = gpt2_byte_ids(), 50256, 50256, 50257
        else:
            raise ValueError(f"tokenizer kind {kind!r}: use 'bytes' or 'gpt2'")
        self.id_to_byte = {i: b for b, i in enumerate(self.byte_to_id)}

    def encode(self, text: str) -> list:
        return [self.byte_to_id[b] for b in text.encode("utf-8")]

    def decode(self, ids) -> str:  # specials dropped; a cut multi-byte character becomes U+FFFD
        return bytes(self.id_to_byte[i] for i in ids if i in self.id_to_byte).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------
# Language side 2: a GPT-style decoder (GPT-2's layout and parameter names: pre-norm blocks,
# learned positions, tanh-GELU, causal SDPA attention, output layer tied to the embedding).
# ----------------------------------------------------------------------------------------
def rotate(x, base=10000.0):  # (B, h, L, d) -> same: rotary position embedding (RoPE)
    """Rotate pairs of channels by position-dependent angles, so that q.k depends on the offset
    between positions: "the image just before me" or "the letter after the one I copied" is
    then one pattern at every position (in-context copying is learned much sooner)."""
    L, d = x.shape[-2], x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = torch.arange(L, device=x.device, dtype=torch.float32)[:, None] * freqs  # (L, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads, rope=False):
        super().__init__()
        self.heads, self.rope = heads, rope
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, D) -> (B, L, D); each position sees itself and the past
        q, k, v = rearrange(self.c_attn(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        if self.rope:
            q, k = rotate(q), rotate(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(rearrange(y, "b h l d -> b l (h d)"))


class GPTBlock(nn.Module):
    def __init__(self, dim, heads, rope=False):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads, rope)
        self.ln_2, self.mlp = nn.LayerNorm(dim), nn.Sequential()
        self.mlp.c_fc, self.mlp.act, self.mlp.c_proj = nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """forward(embeddings (B, L, D)) -> logits (B, L, vocab). Inputs are embeddings, not ids,
    because visual prefix tokens are spliced in between the word embeddings (`wte`)."""

    def __init__(self, vocab_size, context, dim, layers, heads, rope=False):
        super().__init__()
        self.dim, self.context = dim, context
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = None if rope else nn.Embedding(context, dim)  # GPT-2: learned positions
        self.h = nn.ModuleList([GPTBlock(dim, heads, rope) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), residual outputs / sqrt(2 L)
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x):
        if self.wpe is not None and x.shape[1] > self.context:  # RoPE has no fixed length
            raise ValueError(f"sequence of {x.shape[1]} tokens exceeds the LM's context {self.context} (--context)")
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # weight tying: the output layer is wte


# --- Pretrained LMs. HF GPT-2 checkpoints (gpt2 124M ... gpt2-xl 1.5B) map onto GPT above by
# --- name: drop "transformer.", transpose the Conv1D weights (HF stores them (in, out)),
# --- drop the causal-mask buffers and lm_head (tied to wte).
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_to_ours(hf_state: dict) -> dict:
    out = {}
    for k, v in hf_state.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue
        out[k] = v.t().contiguous() if k.endswith(GPT2_CONV1D) else v
    return out


def read_safetensors(path) -> dict:
    """A .safetensors file without the safetensors package: 8-byte header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        blob = f.read()
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            start, end = info["data_offsets"]
            out[name] = torch.frombuffer(bytearray(blob[start:end]), dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return out


def load_lm(path) -> GPT:
    """A GPT-2-family LM from a local HF checkpoint (file or folder); shapes come from the weights
    (GPT-2 heads are 64 wide; a config.json next to the weights, if present, gives n_head)."""
    if os.path.isdir(path):
        names = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(path, n))]
        if not names:
            raise SystemExit(f"--lm {path}: no model.safetensors or pytorch_model.bin in this folder")
        path = os.path.join(path, names[0])
    try:
        hf = read_safetensors(path) if path.endswith(".safetensors") else data.load_checkpoint(path, flag="--lm")
    except (OSError, ValueError, KeyError) as e:  # a missing, empty or damaged .safetensors
        raise data.CheckpointError(f"--lm {path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    state = {k: v.float() for k, v in gpt2_to_ours(hf).items()}
    if "wte.weight" not in state:
        raise SystemExit(f"--lm {path}: not a GPT-2-family state dict (no wte.weight); see the README for supported LMs")
    vocab, dim = state["wte.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("h."))
    config = os.path.join(os.path.dirname(path), "config.json")
    heads = json.load(open(config)).get("n_head", dim // 64) if os.path.exists(config) else dim // 64
    lm = GPT(vocab, state["wpe.weight"].shape[0], dim, layers, heads)
    lm.load_state_dict(state, strict=True)
    return lm


# ----------------------------------------------------------------------------------------
# The visual language model: frozen encoder -> mapper -> visual prefix tokens -> LM.
# ----------------------------------------------------------------------------------------
class VisualMapper(nn.Module):
    """Frozen image features (M, F) -> (M, P, D): P prefix tokens in the LM's embedding space
    (an MLP; Frozen used a linear map to 2 tokens)."""

    def __init__(self, feat_dim, lm_dim, prefix_tokens, hidden=None):
        super().__init__()
        self.prefix_tokens, hidden = prefix_tokens, hidden or 2 * lm_dim
        self.norm = nn.LayerNorm(feat_dim)  # frozen features come at any scale
        self.net = nn.Sequential(nn.Linear(feat_dim, hidden), nn.GELU(), nn.Linear(hidden, prefix_tokens * lm_dim))

    def forward(self, feats):
        return rearrange(self.net(self.norm(feats)), "m (p d) -> m p d", p=self.prefix_tokens)


class SeCAt(nn.Module):
    """backbone: the frozen image encoder (kept in eval mode, no gradients); mapper and lm: trained.
    forward(ids (B, L), image_slots (B, L) bool, feats (M, F)) -> logits (B, L, vocab): the word
    embeddings at image slots are replaced, in order, by the M images' P prefix tokens."""

    def __init__(self, backbone, mapper, lm):
        super().__init__()
        self.backbone, self.mapper, self.lm = backbone.requires_grad_(False), mapper, lm

    def train(self, mode=True):  # the frozen encoder never leaves eval mode
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def encode_images(self, images):  # (M, 3, H, W) -> (M, F) [CLS] features
        return self.backbone(images).float()

    def forward(self, ids, image_slots, feats):
        x = self.lm.wte(ids)
        visual = self.mapper(feats.to(x.dtype)).reshape(-1, x.shape[-1]).to(x.dtype)
        x = x.masked_scatter(image_slots[..., None], visual)
        return self.lm(x)


# ----------------------------------------------------------------------------------------
# Self-context data 1: cluster the unlabelled pool (frozen features) and name clusters with
# pronounceable nonsense words (paper: names "semantically unrelated" to the images).
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(encoder, dataset, d, autocast, batch_size=64, num_workers=0):
    """Frozen [CLS] features of every image, (N, F) float32 on every rank. Rank r embeds images
    r, r+W, ...; the rows are then summed across ranks (each row is non-zero on one rank only)."""
    own = list(range(d.rank, len(dataset), d.world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, own), batch_size=batch_size,
                                         num_workers=num_workers)
    encoder = encoder.to(d.device).eval()
    chunks = []
    for images, _ in tqdm(loader, disable=not d.is_main, desc="frozen features", leave=False):
        with autocast:
            chunks.append(encoder(images.to(d.device)).float())
    feats = torch.zeros(len(dataset), feature_dim(encoder), device=d.device)
    feats[own] = torch.cat(chunks)
    if d.world_size > 1:
        dist.all_reduce(feats)
    return feats


@torch.no_grad()
def sinkhorn_knopp(scores, eps=0.05, iters=50):  # (N, K) -> (N, K), rows sum to 1
    """Equipartition (SeLa Eq. 6, SwAV's form): rescale exp(scores/eps) alternately so that each
    of the K clusters receives N/K of the mass and each sample a mass of 1. This file's own copy."""
    Q = torch.exp((scores.double() - scores.max()) / eps).t()  # (K, N)
    K, N = Q.shape
    Q /= Q.sum()
    for _ in range(iters):
        Q /= Q.sum(dim=1, keepdim=True) * K
        Q /= Q.sum(dim=0, keepdim=True) * N
    return (Q * N).t()


@torch.no_grad()
def cluster_features(feats, k, method="sinkhorn", iters=30, seed=0):
    """Spherical k-means on L2-normalised features; with method="sinkhorn" the assignment step
    is Sinkhorn-Knopp's equal-size partition (no giant or empty clusters). (N, F) -> (N,) int64."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(feats.double().cpu(), dim=1)
    centroids = x[torch.randperm(len(x), generator=g)[:k]]
    for _ in range(iters):
        scores = x @ centroids.t()
        labels = (sinkhorn_knopp(scores) if method == "sinkhorn" else scores).argmax(1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        empty = torch.bincount(labels, minlength=k) == 0  # an emptied cluster restarts at a random image
        sums[empty] = x[torch.randint(len(x), (int(empty.sum()),), generator=g)]
        centroids = F.normalize(sums, dim=1)
    return labels


ONSETS = "b c d f g h j k l m n p r s t v w x z bl br ch cr dr fl gl gr kl pl pr qu sh sk sl sp st th tr y".split()
VOWELS = "a e i o u a e i o u ai ee oo y".split()
CODAS = ["", "", "", "", "n", "k", "x", "s", "t", "m", "ck", "nd", "rp", "sh"]


NOUNS = """apple anchor apron badger bagel banjo barrel basket beetle bell bicycle blanket bottle bucket
butter cabin cactus camel candle canoe carpet carrot castle cello chair cherry chimney clock coffee comet
copper cotton crab crayon cricket daisy desk dolphin donkey door dragon drum eagle engine falcon feather
fern fiddle finch flute fork fox garlic giraffe glove goat goose grape guitar hammer harbor harp helmet
honey horse igloo island jacket jaguar kayak kettle kite koala ladder lamp lantern lemon lizard llama
magnet mango maple marble meadow melon mitten monkey moose mushroom needle nest noodle oak oar olive onion
otter owl paddle panda parrot peach peanut pencil pepper piano pickle pillow pine pirate plum pocket pony
potato pumpkin quilt rabbit radio raft raven river robin rocket saddle salmon sandal scarf sheep shovel
sled snail sock spoon squid stool sugar swan table teapot tiger toast tomato tractor trumpet tulip turnip
turtle violin wagon walnut walrus whale willow window wolf yak zebra""".split()  # concrete, none a shape or texture


def name_vocabulary(kind: str, eval_folder=None):
    """--pseudo-names nouns: the paper's kind, vocabulary nouns (NOUNS above) minus every word of the
    evaluation folder's class names, so that no real name is seen in training; nonsense: None."""
    if kind == "nonsense":
        return None
    taken = set()
    if eval_folder and os.path.isdir(eval_folder):
        taken = {w for d in os.listdir(eval_folder) for w in d.lower().replace("_", " ").split()}
    return [w for w in NOUNS if w not in taken]


def pseudo_name(rng, vocabulary=None) -> str:
    """Half of the names one word, half two. With a vocabulary: nouns from it ("kettle", "owl
    harbor"); without: pronounceable nonsense of 1-3 syllables ("blicket", "dax fep"), in which
    every letter a-z occurs, so that copying a name is learned for any spelling."""
    words = []
    for _ in range(1 if rng.random() < 0.5 else 2):
        if vocabulary:
            words.append(vocabulary[rng.integers(len(vocabulary))])
            continue
        syllables = rng.integers(1, 4)
        words.append("".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] +
                             CODAS[rng.integers(len(CODAS))] for _ in range(syllables)))
    return " ".join(words)


def pseudo_names(n, rng, vocabulary=None) -> list:
    names = []
    while len(names) < n:
        name = pseudo_name(rng, vocabulary)
        if name not in names:
            names.append(name)
    return names


# ----------------------------------------------------------------------------------------
# Self-context data 2: interleaved N-way K-shot episodes (Frozen's format) and their tokens.
# ----------------------------------------------------------------------------------------
CAPTION = "This is a {}."
PROMPT = "What is this? This is a"


def sample_episode(members, ways, shots, rng, vocabulary=None) -> dict:
    """members: list over clusters of image indices. N=ways clusters, fresh pseudo-names for them
    (drawn per episode: names must be read from the context), K=shots supports per cluster in
    random order, then a query image from one of the N clusters (not among the supports).
    Returns dict(images=[N*K support indices..., query], texts=[N*K captions..., PROMPT],
    answer=name, clusters=[cluster of each image], names={cluster: name})."""
    eligible = [c for c, m in enumerate(members) if len(m) >= shots + 1]
    if len(eligible) < ways:
        raise ValueError(f"only {len(eligible)} clusters have {shots + 1}+ images; need {ways} (fewer --clusters?)")
    chosen = [int(c) for c in rng.choice(eligible, ways, replace=False)]
    names = dict(zip(chosen, pseudo_names(ways, rng, vocabulary)))
    query_cluster = chosen[rng.integers(ways)]
    support, query = [], None
    for c in chosen:
        picks = [int(i) for i in rng.choice(members[c], shots + (c == query_cluster), replace=False)]
        if c == query_cluster:
            query = picks.pop()
        support += [(i, c) for i in picks]
    support = [support[j] for j in rng.permutation(len(support))]
    return dict(images=[i for i, _ in support] + [query], texts=[CAPTION.format(names[c]) for _, c in support] + [PROMPT],
                answer=names[query_cluster], clusters=[c for _, c in support] + [query_cluster], names=names)


def encode_episode(tok, texts, answer, prefix_tokens, plain_text=None):
    """<eos> then, per image, P image slots and its text (support captions end with a newline, the
    last text is the prompt). With an answer: " <name>." + <eos> follows, and only those tokens
    are targets. Returns ids, image_slots, targets: three lists of equal length."""
    ids, slots, targets = [tok.eos], [False], [False]
    if plain_text is not None:  # text warm-up: every token is a target
        piece = tok.encode(plain_text)
        return ids + piece, slots + [False] * len(piece), targets + [True] * len(piece)
    for i, text in enumerate(texts):
        piece = tok.encode(text + ("\n" if i < len(texts) - 1 else ""))
        ids += [tok.pad] * prefix_tokens + piece
        slots += [True] * prefix_tokens + [False] * len(piece)
        targets += [False] * (prefix_tokens + len(piece))
    if answer is not None:
        piece = tok.encode(" " + answer + ".") + [tok.eos]
        ids, slots, targets = ids + piece, slots + [False] * len(piece), targets + [True] * len(piece)
    return ids, slots, targets


def collate(episodes, feats, tok, prefix_tokens, device):
    """Right-padded batch: ids (B, L), image_slots (B, L), targets (B, L), feats (M, F) with the
    M images in slot order. Right padding is harmless: attention is causal."""
    encoded = [encode_episode(tok, e["texts"], e.get("answer"), prefix_tokens, e.get("text")) for e in episodes]
    L = max(len(ids) for ids, _, _ in encoded)
    ids = torch.full((len(encoded), L), tok.pad, dtype=torch.long)
    slots, targets = torch.zeros(len(encoded), L, dtype=torch.bool), torch.zeros(len(encoded), L, dtype=torch.bool)
    for b, (i, s, t) in enumerate(encoded):
        ids[b, :len(i)], slots[b, :len(s)], targets[b, :len(t)] = torch.tensor(i), torch.tensor(s), torch.tensor(t)
    image_feats = feats[torch.tensor([i for e in episodes for i in e["images"]], dtype=torch.long).reshape(-1)]
    return ids.to(device), slots.to(device), targets.to(device), image_feats.to(device)


def make_batch(step, members, args, global_batch):
    """The global batch of a step, a function of (seed, step) only: every rank builds the same
    list and takes its share, so 1 and W processes see the same episodes and a resumed run
    replays them. N and K vary during training (one draw per step, so lengths match)."""
    rng = np.random.default_rng([args.seed, step])
    ways, shots = int(rng.integers(2, args.max_ways + 1)), int(rng.integers(1, args.max_shots + 1))
    return [sample_episode(members, ways, shots, rng, args.vocabulary) for _ in range(global_batch)]


def text_batch(step, args, tok, global_batch):
    """Text-only warm-up for an LM trained from scratch (a stand-in for the pretrained LM of the
    paper, which arrives able to repeat words seen in its context): lines "This is a <name>."
    with names drawn, with repeats, from a few fresh nonsense words, loss on every token. The
    dense loss grows the copying ("induction") heads that the sparse answer-only loss of
    self-context episodes needs many more steps to find. Returns episode-like dicts."""
    rng = np.random.default_rng([args.seed, step, 7])
    batch = []
    for _ in range(global_batch):
        names = pseudo_names(int(rng.integers(2, 5)), rng, args.vocabulary)
        lines = [CAPTION.format(names[rng.integers(len(names))]) for _ in range(int(rng.integers(4, 8)))]
        batch.append(dict(images=[], texts=[], text="\n".join(lines)))
    return batch


def answer_loss(logits, ids, targets, num_targets):
    """Cross-entropy on the query's answer tokens only (everything else is context): position t
    predicts token t+1, counted where token t+1 is a target. Summed and divided by num_targets,
    the count over the GLOBAL batch, so that DDP's mean over ranks (times W) is the global mean."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (nll * targets[:, 1:].flatten()).sum() / num_targets


# ----------------------------------------------------------------------------------------
# Generation: greedy decoding of the answer until <eos>; the function evaluate.icl calls.
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_decode(model, ids, image_slots, feats, eos, max_new_tokens=32) -> list:
    """ids, image_slots: (L,) one sequence; feats: (M, F). Appends argmax tokens until <eos>.
    Returns the new ids (without <eos>). No KV cache: answers are a few tokens."""
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids[None], image_slots[None], feats)[0, -1]
        token = int(logits.argmax())
        if token == eos:
            break
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([token])])
        image_slots = torch.cat([image_slots, image_slots.new_zeros(1)])
    return new


def make_generate(model, tok, args, device):
    """generate(images, texts) -> str for evaluate.icl: images = the episode's images (uint8
    (3, H, W), supports then query), texts = one text after each image (captions, then the
    prompt). Returns the answer with the caption's final period removed."""
    transform = eval_transform(args.image_size)
    model = model.eval()

    def generate(images, texts):
        pixels = torch.stack([transform(torch.as_tensor(im)) for im in images]).to(device)
        feats = model.encode_images(pixels)
        ids, slots, _ = encode_episode(tok, list(texts), None, args.prefix_tokens)
        new = greedy_decode(model, torch.tensor(ids, device=device), torch.tensor(slots, device=device), feats, tok.eos)
        return tok.decode(new).strip().removesuffix(".").strip()

    return generate


def build_generator(ckpt: dict, device="cpu"):
    """generate(images, texts) -> str from a checkpoint of this file: what `python evaluate.py
    icl --ckpt ...` calls. A checkpoint made with --lm needs that LM file at the same path."""
    args = argparse.Namespace(**ckpt["args"])
    model, tok = build_model(args, build_backbone(ckpt["args"]))
    model.load_state_dict(ckpt["model"])
    return make_generate(model.to(device), tok, args, device)


# ----------------------------------------------------------------------------------------
# Training. The encoder is frozen, so its features are computed once and cached; a step
# builds the global batch of episodes, takes this rank's share and updates mapper + LM.
# ----------------------------------------------------------------------------------------
def build_model(args, encoder, lm=None):
    """(model, tokenizer): a pretrained GPT-2-family LM from --lm (GPT-2's byte tokens; `lm` if
    already loaded), else a GPT of --lm-dim/--lm-layers/--lm-heads from scratch (258 byte ids)."""
    tok = ByteTokenizer("gpt2" if args.lm else "bytes")
    if lm is None:
        lm = load_lm(args.lm) if args.lm else GPT(tok.vocab_size, args.context, args.lm_dim, args.lm_layers, args.lm_heads,
                                                  rope=args.lm_positions == "rope")
    return SeCAt(encoder, VisualMapper(feature_dim(encoder), lm.dim, args.prefix_tokens), lm), tok


def train_step(model, optimizer, scaler, batch, num_targets, world_size, autocast, clip_grad=1.0):
    """One update on this rank's share of the batch; returns the loss (mean over the global
    batch's answer tokens, as far as this rank's share contributes)."""
    ids, slots, targets, feats = batch
    with autocast:
        logits = model(ids, slots, feats)
    loss = answer_loss(logits, ids, targets, num_targets) * world_size  # DDP averages over ranks
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if clip_grad:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach() / world_size


def train(args):
    d = data.init_distributed()
    args.amp = data.resolve_amp(args.amp, d.device)
    autocast = data.autocast(d.device, args.amp)
    data.seed_everything(args.seed)  # not per rank: the same random encoder / LM init everywhere
    log, ckpt_path, ckpt = data.prepare_output_dir(args.output_dir, args.resume, args.overwrite, d.is_main, METHOD)
    lm = load_lm(args.lm) if args.lm else None  # a wrong --lm fails before the features are extracted

    # the frozen encoder and its features of the unlabelled pool (class folders are ignored)
    encoder = load_encoder(args)
    pool = data.UnlabelledImages(args.data, transform=eval_transform(args.image_size))
    t0 = time.time()
    feats = extract_features(encoder, pool, d, autocast, num_workers=args.num_workers).cpu()
    if ckpt is not None:
        clusters = ckpt["clusters"]
    else:
        clusters = cluster_features(feats, args.clusters, args.cluster_method, seed=args.seed)
    members = [torch.nonzero(clusters == c).flatten().tolist() for c in range(args.clusters)]
    if d.is_main:
        sizes = sorted(len(m) for m in members)
        print(f"{len(pool)} images -> {args.clusters} clusters ({args.cluster_method}; sizes {sizes[0]}..{sizes[-1]}) "
              f"in {time.time() - t0:.1f}s")

    model, tok = build_model(args, encoder, lm)
    model = model.to(d.device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # mapper + LM
    optimizer = torch.optim.AdamW([{"params": [p for n, p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for n, p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    scaler = data.make_scaler(args.amp, d.device)
    lr_schedule = data.cosine_schedule(args.lr, args.min_lr, args.epochs, args.steps_per_epoch, args.warmup_epochs)
    start_epoch, step = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = ckpt["epoch"], ckpt["step"]
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.world_size > 1 else model
    global_batch = args.batch_size_per_gpu * d.world_size
    if d.is_main:
        print(f"trainable (mapper + LM): {sum(p.numel() for _, p in trainable) / 1e6:.2f}M parameters; "
              f"frozen encoder: {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M")

    for epoch in range(start_epoch, args.epochs):
        data.seed_everything(args.seed + epoch, d.rank)
        ddp.train()
        bar = tqdm(range(args.steps_per_epoch), disable=not d.is_main, desc=f"epoch {epoch}", leave=False)
        t0 = time.time()
        for i in bar:
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[step])
            if step < args.text_warmup_steps:  # LM from scratch: text-only warm-up first
                episodes = text_batch(step, args, tok, global_batch)
                num_targets = sum(len(tok.encode(e["text"])) for e in episodes)
            else:
                episodes = make_batch(step, members, args, global_batch)
                num_targets = sum(len(tok.encode(" " + e["answer"] + ".")) + 1 for e in episodes)
            batch = collate(episodes[d.rank::d.world_size], feats, tok, args.prefix_tokens, d.device)
            loss = train_step(ddp, optimizer, scaler, batch, num_targets, d.world_size, autocast, args.clip_grad)
            step += 1
            eps = global_batch * (i + 1) / (time.time() - t0)  # episodes/s; each has N*K+1 images
            bar.set_postfix(loss=f"{loss.item():.3f}", episodes_s=f"{eps:.0f}")
            if step % args.log_every == 0:
                log.log({"epoch": epoch, "step": step, "loss": loss.item(), "lr": float(lr_schedule[step - 1]), "episodes_s": eps})
        if d.is_main:
            data.save_checkpoint({"method": METHOD, "args": vars(args), "epoch": epoch + 1, "step": step,
                                  "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "clusters": clusters}, ckpt_path)
            print(f"epoch {epoch}: loss {loss.item():.3f}, {eps:.0f} episodes/s, saved {ckpt_path}")
    if d.world_size > 1:
        dist.barrier()
    return model, tok, feats, members


# ----------------------------------------------------------------------------------------
# Evaluation: Frozen's open-ended protocol through evaluate.icl, with real class names and
# with nonsense names swapped in (the paper's control); evaluate.icl_picture draws one episode.
# ----------------------------------------------------------------------------------------
def run_icl(generate, folder, ways, shots, episodes, seed, vocabulary=None):
    """evaluate.icl (Frozen's protocol) with the folder's real class names, then with nonsense
    names swapped in (the paper's control); keys "real/icl/2way_1shot", "..._ci95", "..._chance",
    "..._in_context" (the answer is one of the episode's names: the LM's copying, whatever the features)."""
    import evaluate
    real = data.ImageFolder(folder)
    fake = copy.copy(real)  # the same images under nonsense names
    fake.classes = pseudo_names(len(real.classes), np.random.default_rng([seed, 99]), vocabulary)
    results = {}
    for kind, dataset in (("real", real), ("pseudo", fake)):
        ok_ways = tuple(n for n in ways if n <= len(real.classes))
        res = evaluate.icl(generate, dataset, ways=ok_ways, shots=shots, episodes=episodes, seed=seed)
        results.update({f"{kind}/{k}": v for k, v in res.items()})
    return results


@torch.no_grad()
def selfcontext_accuracy(model, tok, feats, members, args, episodes=100):
    """Exact-match accuracy on fresh self-context episodes of the pool (the training task, with
    names never drawn in training): did the LM learn to read names from its context?"""
    model.eval()
    rng, hits = np.random.default_rng([args.seed, 10**9]), 0
    for _ in range(episodes):
        e = sample_episode(members, 2, 1, rng, args.vocabulary)
        ids, slots, _ = encode_episode(tok, e["texts"], None, args.prefix_tokens)
        device = next(model.parameters()).device
        new = greedy_decode(model, torch.tensor(ids, device=device), torch.tensor(slots, device=device),
                            feats[e["images"]].to(device), tok.eos)
        hits += tok.decode(new).strip().removesuffix(".") == e["answer"]
    return 100 * hits / episodes


@torch.no_grad()
def feature_ceiling(model, folder, args, trials=2000):
    """2-way 1-shot accuracy of the frozen features alone (is the query's cosine-nearest support of
    its class?): what a perfect reader of the context could reach with this encoder."""
    ds = data.ImageFolder(folder, transform=eval_transform(args.image_size))
    x = torch.stack([ds[i][0] for i in range(len(ds))]).to(next(model.parameters()).device)
    f = F.normalize(torch.cat([model.encode_images(b) for b in x.split(64)]).cpu(), dim=1)
    by_class = [[i for i, (_, y) in enumerate(ds.samples) if y == c] for c in range(len(ds.classes))]
    rng, hits = np.random.default_rng(0), 0
    for _ in range(trials):
        a, b = rng.choice(len(by_class), 2, replace=False)
        q, same = rng.choice(by_class[a], 2, replace=False)
        hits += float(f[q] @ f[same] > f[q] @ f[rng.choice(by_class[b])])
    return 100 * hits / trials


def main(args):
    import evaluate
    model, tok, feats, members = train(args)
    if int(os.environ.get("RANK", 0)) != 0 or not args.eval_data:
        return
    device = next(model.parameters()).device
    generate = make_generate(model, tok, args, device)
    t0 = time.time()
    results = {"selfcontext/2way_1shot": selfcontext_accuracy(model, tok, feats, members, args),
               "features/2way_1shot_nn": feature_ceiling(model, args.eval_data, args)}
    results.update(run_icl(generate, args.eval_data, args.eval_ways, args.eval_shots, args.eval_episodes, args.seed,
                           args.vocabulary))
    answer, truth = evaluate.icl_picture(generate, data.ImageFolder(args.eval_data),
                                         os.path.join(args.output_dir, "episode.png"), seed=args.seed)
    print(f"icl on {args.eval_data} ({args.eval_episodes} episodes each, {time.time() - t0:.0f}s); "
          f"picture: {args.output_dir}/episode.png (answer {answer!r}, truth {truth!r})")
    results.update(train_data=args.data, eval_data=args.eval_data)  # selfcontext on the pool, the rest on eval_data
    evaluate.print_table(results, "accuracy in %: selfcontext = held-out pool episodes; features = nearest-neighbour "
                         "ceiling of the frozen encoder; real/pseudo = evaluate.icl with real / nonsense class names "
                         "(_in_context: the answer is one of the episode's names)")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    data.cli(main, get_args)
