"""SeCAt: self-context adaptation, open-ended few-shot classification with a small VLM.

Derakhshani, Najdenkoska, Snoek, Worring, Asano. "Self-Supervised Open-Ended Classification with Small Visual
Language Models" (v1: "Small Visual Language Models can also be Open-Ended Few-Shot Learners"), 2023.
https://arxiv.org/abs/2310.00500  (no official code is public)

The idea. A visual language model learns to name things from a few examples in its context, without a single
real caption. Cluster a pool of unlabelled images with a frozen image encoder; give each cluster a name that says
nothing about its content (nouns matched to the clusters, or nonsense words such as "blicket"); then train on
interleaved "self-context" sequences

    <img> Here is a kettle. <img> Here is a owl. ... <query img> What is here? Here is a  kettle.

with the loss only on the query's answer: the only way to answer is to copy the name of the support image that
looks like the query. At test time the model gets real class names in Frozen's wording ("This is a ...") and
answers in open text. The image encoder is FROZEN; the mapper (features -> prefix tokens) and the LM are TRAINED.

Commands:
    python secat.py --demo                # tiny LM from scratch on the synthetic world, a few min on 2 CPU cores
    python secat.py --data /imagenet/train --encoder dino_deitsmall16_pretrain.pth --lm gpt2-large/ \\
        --eval-data /mini-imagenet/test --class-names LOC_synset_mapping.txt \\
        --frozen-episodes open_ended_mi real_name_mi                                # paper scale
    torchrun --nproc_per_node=8 secat.py --data ... --encoder ... --lm ...
    python secat.py ... --resume          # continue <output-dir>/checkpoint.pth (all epochs done: evaluates it again)
    python secat.py --eval-only runs/secat/checkpoint.pth --eval-data DIR   # score a checkpoint, no training

Contents: config; model (GPT, GPT-2 loading, mapper); data (frozen features); self-context (k-means, names,
episodes, tokens); answer-only loss; training; evaluation (greedy answers, Frozen's protocol).
"""
import argparse
import copy
import itertools
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from scipy.optimize import linear_sum_assignment
from torchvision.transforms import v2 as T
from tqdm import tqdm

import data
import evaluate

METHOD = "secat"


# ====== Config: paper-scale defaults (a ~1B pretrained LM, a DINO ViT-S/16); --demo overrides a few (flags given win)
DEMO = dict(encoder_arch="convnet_demo", image_size=32, lm_dim=128, lm_layers=4, lm_heads=4, context=512,
            prefix_tokens=8, clusters=12, max_ways=2, max_shots=1, epochs=10, steps_per_epoch=150,
            text_warmup_steps=300, batch_size_per_gpu=32, lr=2e-3, min_lr=1e-4, warmup_epochs=1, eval_episodes=100,
            eval_ways=[2, 5], eval_shots=[1], num_workers=0, log_every=10)


def get_args(argv=None):
    p = argparse.ArgumentParser("SeCAt: self-context adaptation")
    p.add_argument("--data", default=None, help="unlabelled images (class folders are ignored) or videos' frames")
    p.add_argument("--eval-data", default=None, help="ImageFolder of the icl benchmark (class folders: names or "
                   "wnids; --demo: a root laid out like the synthetic world, default: that world; its objects/val)")
    p.add_argument("--class-names", default=None, help="wnid -> name file (LOC_synset_mapping.txt or JSON)")
    p.add_argument("--frozen-episodes", nargs="+", default=[], help="folders of Frozen's released episodes")
    p.add_argument("--eval-only", default=None, metavar="CKPT", help="score a checkpoint as training ends, no training")
    p.add_argument("--output-dir", default="runs/secat")
    p.add_argument("--demo", action="store_true", help="tiny LM, short schedule, synthetic world (CPU, minutes)")
    p.add_argument("--encoder", default=None, help="frozen encoder (outside --demo): DINO weights or a checkpoint")
    p.add_argument("--encoder-arch", default="vit_small", help="architecture of official DINO weights")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lm", default=None, help="pretrained GPT-2-family LM (outside --demo): a Hugging Face folder")
    p.add_argument("--lm-dim", type=int, default=768, help="from-scratch LM (demo) width")
    p.add_argument("--lm-layers", type=int, default=12)
    p.add_argument("--lm-heads", type=int, default=12)
    p.add_argument("--context", type=int, default=1024, help="from-scratch LM context length")
    p.add_argument("--lm-positions", default="alibi", choices=["alibi", "learned"], help="from-scratch LM's positions")
    p.add_argument("--text-warmup-steps", type=int, default=0, help="first steps on text only, for an LM from scratch")
    p.add_argument("--prefix-tokens", type=int, default=2, help="visual tokens per image (Frozen: 2)")
    p.add_argument("--clusters", type=int, default=1000, help="K clusters of the unlabelled pool")
    p.add_argument("--pseudo-names", default=None, choices=["nonsense", "nouns"],
                   help="nouns (with --lm, the paper's): one per cluster; nonsense (LM from scratch): new per episode")
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
    p.add_argument("--eval-repeats", type=int, nargs="+", default=[0], help="extra times the support is shown (Frozen)")
    args = data.parse_args(p, argv, DEMO, workers=8, log_every=20)  # + the run flags all share
    if args.demo:
        args.eval_data = os.path.join(data.demo_eval_root(args.eval_data, ["objects"]), "objects", "val")
        args.data = args.data or os.path.join(data.ensure_synth("runs/synth", seed=0), "objects", "train")
    if args.data is None and not args.eval_only:
        p.error("--data is required (or --demo to use the synthetic world)")
    if args.eval_only and not (args.eval_data or args.frozen_episodes):
        p.error("--eval-only needs --eval-data (the icl benchmark's folder) or --frozen-episodes")
    args.pseudo_names = args.pseudo_names or ("nouns" if args.lm else "nonsense")
    args.vocabulary = name_vocabulary(args.pseudo_names, args.eval_data, args.class_names)
    return args


# ====== Model: a GPT-2-layout decoder (its parameter names), the mapper, the visual language model
def alibi_bias(L, heads, device):  # -> (heads, L, L) additive attention bias; -inf on the future
    """ALiBi (Press et al., 2022): head h adds -2^(-8h/H) * distance: "the last image before me" at any distance."""
    i = torch.arange(L, device=device)
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads)
    dist = (i[:, None] - i[None, :]).float()
    return torch.where(dist >= 0, -slopes[:, None, None] * dist, float("-inf"))


class CausalSelfAttention(nn.Module):
    def __init__(self, dim, heads, positions="learned"):
        super().__init__()
        self.heads, self.positions = heads, positions
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, D) -> (B, L, D); each position sees itself and the past
        q, k, v = rearrange(self.c_attn(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        bias = alibi_bias(q.shape[2], self.heads, q.device).to(q.dtype) if self.positions == "alibi" else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None)
        return self.c_proj(rearrange(y, "b h l d -> b l (h d)"))


class GPTBlock(nn.Module):
    def __init__(self, dim, heads, positions="learned"):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads, positions)
        self.ln_2, self.mlp = nn.LayerNorm(dim), nn.Sequential()
        self.mlp.c_fc, self.mlp.act = nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh")
        self.mlp.c_proj = nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: pre-norm blocks, learned positions (from scratch: ALiBi), tanh-GELU, output tied to the embedding.
    forward(embeddings (B, L, D)) -> logits (B, L, vocab): embeddings, as image tokens sit between the words'."""

    def __init__(self, vocab_size, context, dim, layers, heads, positions="learned"):
        super().__init__()
        self.dim, self.context = dim, context
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(context, dim) if positions == "learned" else None  # GPT-2: learned positions
        self.h = nn.ModuleList([GPTBlock(dim, heads, positions) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        for name, p in self.named_parameters():  # GPT-2's init: N(0, 0.02), residual outputs / sqrt(2 L)
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, x):
        if self.wpe is not None and x.shape[1] > self.context:  # ALiBi has no fixed length
            raise ValueError(f"sequence of {x.shape[1]} tokens exceeds the LM's context {self.context} (--context)")
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(x.shape[1], device=x.device))
        for block in self.h:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)  # weight tying: the output layer is wte


# --- Pretrained LMs: a Hugging Face GPT-2-family folder (gpt2 ... gpt2-xl) maps onto GPT by name
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # (in, out)


def load_lm(folder) -> GPT:
    """A GPT-2-family LM from a Hugging Face folder: shapes from the weights, heads from config.json's n_head."""
    hf, config = data.read_hf_folder(folder, flag="--lm")
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}  # HF names -> ours; Conv1D weights transposed
    state = {k: (v.t().contiguous() if k.endswith(GPT2_CONV1D) else v).float() for k, v in hf.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}  # no masks; tied head
    if "wte.weight" not in state:
        raise data.DataError(f"--lm {folder}: not a GPT-2-family state dict (no wte.weight); see the README")
    vocab, dim = state["wte.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("h."))
    lm = GPT(vocab, state["wpe.weight"].shape[0], dim, layers, config.get("n_head", dim // 64))
    lm.load_state_dict(state, strict=True)
    return lm


def load_tokenizer(lm_dir=None):
    """encode, decode, .eos, .pad, .vocab_size: a pretrained LM's own BPE, or one id per UTF-8 byte (from scratch)."""
    return data.BPETokenizer.from_folder(lm_dir) if lm_dir else data.ByteTokenizer()


# --- The visual language model: frozen encoder -> mapper -> visual prefix tokens -> LM
class VisualMapper(nn.Module):
    """Frozen image features (M, F) -> (M, P, D): P prefix tokens in the LM's embedding space (Frozen: linear, P=2)."""

    def __init__(self, feat_dim, lm_dim, prefix_tokens, hidden=None):
        super().__init__()
        self.prefix_tokens, hidden = prefix_tokens, hidden or 2 * lm_dim
        self.norm = nn.LayerNorm(feat_dim)  # frozen features come at any scale
        self.net = nn.Sequential(nn.Linear(feat_dim, hidden), nn.GELU(), nn.Linear(hidden, prefix_tokens * lm_dim))

    def forward(self, feats):
        return rearrange(self.net(self.norm(feats)), "m (p d) -> m p d", p=self.prefix_tokens)


class SeCAt(nn.Module):
    """backbone: the frozen image encoder (eval mode, no gradients); mapper and lm: trained. forward(ids (B, L),
    image_slots (B, L) bool, feats (M, F)) -> logits (B, L, vocab), the M images' P tokens at the image slots."""

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
        return self.lm(x.masked_scatter(image_slots[..., None], visual))


def build_model(args, encoder, lm=None):
    """(model, tokenizer): the --lm folder's LM (`lm` if loaded) and BPE, else a GPT from scratch and byte ids."""
    if not args.lm and args.lm_positions not in ("alibi", "learned"):  # "rope": an earlier secat.py's
        raise data.DataError(f"this checkpoint's LM has {args.lm_positions} positions (an earlier secat.py's): "
                             "train it again")
    tok = load_tokenizer(args.lm)
    if lm is None:
        lm = load_lm(args.lm) if args.lm else GPT(tok.vocab_size, args.context, args.lm_dim, args.lm_layers,
                                                  args.lm_heads, args.lm_positions)
    if tok.vocab_size > (rows := lm.wte.weight.shape[0]):
        raise data.DataError(f"{args.lm}: {tok.vocab_size} token ids for an LM with {rows}: not its tokenizer")
    return SeCAt(encoder, VisualMapper(feature_dim(encoder), lm.dim, args.prefix_tokens), lm), tok


# ====== Data: the frozen image encoder and its features of the unlabelled pool
def build_backbone(args: dict) -> nn.Module:
    """A fresh frozen encoder from stored args (evaluate.stored_backbone): the demo's conv net (average-pooled),
    another repo checkpoint's backbone, or a DINO ViT."""
    return evaluate.stored_backbone(METHOD, args)


def load_encoder(args) -> nn.Module:
    """--encoder: DINO weights (--encoder-arch/--patch-size) or a repo checkpoint (its method kept in args); None:
    fresh weights (the demo then trains its stand-in)."""
    args.encoder_method = args.encoder_args = None
    if args.encoder is None:
        return build_backbone(vars(args))
    state = data.load_checkpoint(args.encoder, flag="--encoder")  # weights_only=True; a damaged file names itself
    if "method" in state:
        args.encoder_method, args.encoder_args = state["method"], state["args"]
    return evaluate.load_backbone(args.encoder, args.encoder_arch, args.patch_size)


def feature_dim(encoder) -> int:  # the width of encoder(images): a ViT's [CLS], a conv net's pooled output
    return getattr(encoder, "out_dim", None) or encoder.embed_dim


def eval_transform(size):  # uint8 (3, H, W) -> float (3, size, size); the encoder is frozen: no augmentation
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(evaluate.MEAN, evaluate.STD)])


def train_demo_encoder(encoder, args, per_class=100, epochs=15, first_index=1000):
    """The demo's stand-in for a pretrained encoder, trained WITH labels on synthetic crops 1000+, in neither split."""
    world, transform = data.SyntheticWorld(0), eval_transform(args.image_size)
    x = torch.stack([transform(torch.as_tensor(world.crop(c, first_index + i, "train")).permute(2, 0, 1))
                     for c in range(len(world.classes)) for i in range(per_class)])
    y = torch.arange(len(world.classes)).repeat_interleave(per_class)
    head, g = nn.Linear(feature_dim(encoder), len(world.classes)), torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=3e-3, weight_decay=1e-4)
    encoder.train()
    for _ in range(epochs):
        for b in torch.randperm(len(x), generator=g).split(64):
            flip = torch.rand(len(b), generator=g)[:, None, None, None] < 0.5  # horizontal flips
            loss = F.cross_entropy(head(encoder(torch.where(flip, x[b].flip(3), x[b]))), y[b])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return encoder.eval()


@torch.no_grad()
def extract_features(encoder, dataset, d, autocast, batch_size=64, num_workers=0):
    """Frozen [CLS] features of every image, (N, F) float32 on every rank (rank r embeds images r, r+W, ...)."""
    own = list(range(d.rank, len(dataset), d.world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, own), batch_size=batch_size,
                                         num_workers=num_workers)
    encoder, chunks = encoder.to(d.device).eval(), []
    for images, _ in tqdm(loader, disable=not d.is_main, desc="frozen features", leave=False):
        with autocast:
            chunks.append(encoder(images.to(d.device)).float())
    feats = torch.zeros(len(dataset), feature_dim(encoder), device=d.device)
    feats[own] = torch.cat(chunks)
    if d.world_size > 1:
        dist.all_reduce(feats)
    return feats


# ====== Self-context: k-means clusters of the pool, names for them, and N-way K-shot episodes of them
@torch.no_grad()
def cluster_features(feats, k, seed=0):
    """(N, F) -> (N,) int64: plain k-means (evaluate.kmeans) of the L2-normalised features, on their device."""
    return evaluate.kmeans(F.normalize(feats.float(), dim=1), k, seed=seed)[0].cpu()


ONSETS = "b c d f g h j k l m n p r s t v w x z bl br ch cr dr fl gl gr kl pl pr qu sh sk sl sp st th tr y".split()
VOWELS = "a e i o u a e i o u ai ee oo y".split()
CODAS = ["", "", "", "", "n", "k", "x", "s", "t", "m", "ck", "nd", "rp", "sh"]


# concrete nouns, none a shape or texture
NOUNS = """apple anchor apron badger bagel banjo barrel basket beetle bell bicycle blanket bottle bucket butter cabin
cactus camel candle canoe carpet carrot castle cello chair cherry chimney clock coffee comet copper cotton crab crayon
cricket daisy desk dolphin donkey door dragon drum eagle engine falcon feather fern fiddle finch flute fork fox garlic
giraffe glove goat goose grape guitar hammer harbor harp helmet honey horse igloo island jacket jaguar kayak kettle
kite koala ladder lamp lantern lemon lizard llama magnet mango maple marble meadow melon mitten monkey moose mushroom
needle nest noodle oak oar olive onion otter owl paddle panda parrot peach peanut pencil pepper piano pickle pillow
pine pirate plum pocket pony potato pumpkin quilt rabbit radio raft raven river robin rocket saddle salmon sandal
scarf sheep shovel sled snail sock spoon squid stool sugar swan table teapot tiger toast tomato tractor trumpet tulip
turnip turtle violin wagon walnut walrus whale willow window wolf yak zebra""".split()


def name_vocabulary(kind: str, eval_folder=None, class_names=None):
    """--pseudo-names nouns (the paper's): NOUNS minus every word of the evaluation's class names (its folders, or
    their names in --class-names), so that training sees no real name; nonsense: None."""
    if kind == "nonsense":
        return None
    classes = (list(evaluate.read_class_names(class_names).values()) if class_names
               else os.listdir(eval_folder) if eval_folder and os.path.isdir(eval_folder) else [])
    taken = {w for d in classes for w in d.lower().replace("_", " ").split()}
    return [w for w in NOUNS if w not in taken]


def pseudo_names(n, rng, vocabulary=None) -> list:
    """n distinct names in the order drawn, half one word, half two: nouns of the vocabulary ("owl harbor"), else
    pronounceable nonsense of 1-3 syllables over every letter ("blicket", "dax fep"), so copying learns any spelling."""
    names = {}
    while len(names) < n:
        words = [vocabulary[rng.integers(len(vocabulary))] if vocabulary else "".join(
            ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] + CODAS[rng.integers(len(CODAS))]
            for _ in range(rng.integers(1, 4))) for _ in range(1 if rng.random() < 0.5 else 2)]
        names[" ".join(words)] = None
    return list(names)


@torch.no_grad()
def match_nouns(model, tok, prototypes, vocabulary, seed=0) -> list:
    """One noun per cluster, fixed for the run (the paper's recipe): K random nouns matched one to one to the K
    prototypes (K, F), Hungarian on the cosine of their LM embeddings (mean wte row / mean mapper token)."""
    rng = np.random.default_rng([seed, 5])
    nouns = [str(w) for w in rng.permutation(vocabulary)]
    while len(nouns) < len(prototypes):
        nouns += [n for n in pseudo_names(len(prototypes) - len(nouns), rng, vocabulary) if n not in nouns]
    nouns, wte = nouns[:len(prototypes)], model.lm.wte.weight
    words = torch.stack([wte[tok.encode(" " + n)].mean(0) for n in nouns]).float()
    visual = model.mapper(prototypes.to(wte.device, wte.dtype)).mean(1).float()
    similarity = F.normalize(visual, dim=1) @ F.normalize(words, dim=1).t()  # (K clusters, K nouns)
    _, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
    return [nouns[j] for j in cols]


# --- Episodes in Frozen's format and their tokens; training's wording: Frozen's form and length, other words
CAPTION, PROMPT = "Here is a {}.", "What is here? Here is a"  # training, with a pretrained LM
EVAL_CAPTION, EVAL_PROMPT = "This is a {}.", "What is this? This is a"  # evaluation (Frozen's)


def wording(args) -> tuple:
    """(caption, prompt) of training: another template than the evaluation's (the paper); an LM from scratch, which
    read no other text to carry copying over to another wording, gets Frozen's own."""
    return (CAPTION, PROMPT) if args.lm else (EVAL_CAPTION, EVAL_PROMPT)


def sample_episode(members, ways, shots, rng, vocabulary=None, cluster_names=None, words=(CAPTION, PROMPT)) -> dict:
    """members: image indices per cluster. N=ways clusters, named by cluster_names or fresh pseudo-names, K=shots
    supports each in random order, then a query of one of them. Returns dict(images=[N*K supports..., query],
    texts=[N*K captions..., PROMPT], answer=name, clusters=[cluster of each image], names={cluster: name})."""
    eligible = [c for c, m in enumerate(members) if len(m) >= shots + 1]
    if len(eligible) < ways:
        raise data.DataError(f"only {len(eligible)} clusters have {shots + 1}+ images; need {ways} (fewer --clusters?)")
    chosen = [int(c) for c in rng.choice(eligible, ways, replace=False)]
    names = ({c: cluster_names[c] for c in chosen} if cluster_names
             else dict(zip(chosen, pseudo_names(ways, rng, vocabulary))))
    query_cluster = chosen[rng.integers(ways)]
    support, query = [], None
    for c in chosen:
        picks = [int(i) for i in rng.choice(members[c], shots + (c == query_cluster), replace=False)]
        if c == query_cluster:
            query = picks.pop()
        support += [(i, c) for i in picks]
    support = [support[j] for j in rng.permutation(len(support))]
    return dict(images=[i for i, _ in support] + [query],
                texts=[words[0].format(names[c]) for _, c in support] + [words[1]],
                answer=names[query_cluster], clusters=[c for _, c in support] + [query_cluster], names=names)


def encode_episode(tok, texts, answer, prefix_tokens, plain_text=None):
    """<eos>, then per image P image slots and its text (captions, then the prompt), then " <name>." <eos> (the only
    targets) if answer is given. Returns ids, image_slots, targets: three lists of equal length."""
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
    """Right-padded (attention is causal): ids, image_slots, targets (B, L), feats (M, F) of the images in order."""
    encoded = [encode_episode(tok, e["texts"], e.get("answer"), prefix_tokens, e.get("text")) for e in episodes]
    L = max(len(ids) for ids, _, _ in encoded)
    ids = torch.full((len(encoded), L), tok.pad, dtype=torch.long)
    slots, targets = torch.zeros(len(encoded), L, dtype=torch.bool), torch.zeros(len(encoded), L, dtype=torch.bool)
    for b, (i, s, t) in enumerate(encoded):
        ids[b, :len(i)], slots[b, :len(s)], targets[b, :len(t)] = torch.tensor(i), torch.tensor(s), torch.tensor(t)
    image_feats = feats[torch.tensor([i for e in episodes for i in e["images"]], dtype=torch.long).reshape(-1)]
    return ids.to(device), slots.to(device), targets.to(device), image_feats.to(device)


def make_batch(step, members, args, global_batch):
    """The global batch of a step, a function of (seed, step) only: any world size or a resume, the same episodes."""
    rng = np.random.default_rng([args.seed, step])
    ways, shots = int(rng.integers(2, args.max_ways + 1)), int(rng.integers(1, args.max_shots + 1))
    return [sample_episode(members, ways, shots, rng, args.vocabulary, getattr(args, "cluster_names", None),
                           wording(args)) for _ in range(global_batch)]


def text_batch(step, args, tok, global_batch):
    """Text-only warm-up for an LM from scratch (a stand-in for pretraining): episode-like dicts of caption lines that
    repeat a few fresh pseudo-names, every token a target: the dense loss grows copying heads sooner."""
    rng = np.random.default_rng([args.seed, step, 7])
    batch = []
    for _ in range(global_batch):
        names = pseudo_names(int(rng.integers(2, 5)), rng, args.vocabulary)
        lines = [wording(args)[0].format(names[rng.integers(len(names))]) for _ in range(int(rng.integers(4, 8)))]
        batch.append(dict(images=[], texts=[], text="\n".join(lines)))
    return batch


def step_batch(step, members, feats, tok, args, d):
    """(this rank's share of the step's batch, the target tokens of the global batch): warm-up text, then episodes."""
    global_batch, text = args.batch_size_per_gpu * d.world_size, step < args.text_warmup_steps
    episodes = text_batch(step, args, tok, global_batch) if text else make_batch(step, members, args, global_batch)
    num_targets = sum(len(tok.encode(e["text"] if text else " " + e["answer"] + ".")) + (not text) for e in episodes)
    return collate(episodes[d.rank::d.world_size], feats, tok, args.prefix_tokens, d.device), num_targets


class StepBatches:  # the batches of steps start, start + 1, ... as a loader gives them (data.bench_train)
    def __init__(self, start, members, feats, tok, args, d):
        self.start, self.source, self.batch_size = start, (members, feats, tok, args, d), args.batch_size_per_gpu

    def __iter__(self):
        return (step_batch(step, *self.source) for step in itertools.count(self.start))


# ====== Loss: the query's answer only
def answer_loss(logits, ids, targets, num_targets):
    """Cross-entropy of the answer tokens only (position t predicts target t+1), summed and divided by num_targets,
    the count of the GLOBAL batch, so that DDP's mean over ranks (times W) is the global mean."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (nll * targets[:, 1:].flatten()).sum() / num_targets


def secat_loss(model, batch, num_targets, world_size, autocast):
    """batch: this rank's (ids, image_slots, targets, feats) -> (loss times W, as DDP averages, stats {"loss"})."""
    ids, slots, targets, feats = batch
    with autocast:
        logits = model(ids, slots, feats)
    loss = answer_loss(logits, ids, targets, num_targets) * world_size
    return loss, {"loss": loss.detach() / world_size}


# ====== Training: the encoder is frozen, so its features are computed once; a step updates mapper + LM
def train_step(model, optimizer, scaler, batch, num_targets, world_size, autocast, clip_grad=1.0) -> dict:
    """One update on this rank's share of a step's batch (text warm-up or self-context) -> stats {name: float}."""
    loss, stats = secat_loss(model, batch, num_targets, world_size, autocast)

    # ------ update (the same block in every method file)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    stats = data.host_stats(stats)  # the step's one host sync; raises on a non-finite loss
    scaler.unscale_(optimizer)  # clip the true gradients
    if clip_grad:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return stats


def train(args, before=None):
    """Returns (model, tokenizer, pool features, cluster members). before(model, tok), if given, runs on rank 0
    just before the first self-context step: keep it to seconds, the other ranks wait in the next all-reduce."""
    d = data.init_distributed()
    args.amp = data.resolve_amp(args.amp, d.device)
    autocast = data.autocast(d.device, args.amp)
    data.seed_everything(args.seed)  # not per rank: the same random encoder / LM init everywhere
    log, ckpt_path, ckpt = data.prepare_output_dir(args.output_dir, args.resume, args.overwrite, d.is_main, METHOD,
                                                   d.world_size)
    if ckpt is not None and ckpt["args"].get("lm_positions") != args.lm_positions:  # before any work
        raise data.DataError(f"{ckpt_path}: its LM has {ckpt['args'].get('lm_positions')} positions, this run "
                             f"{args.lm_positions}; pass the same --lm-positions, or --overwrite to start over")
    lm = load_lm(args.lm) if args.lm else None  # a wrong --lm fails before the features are extracted

    t0, encoder = time.time(), load_encoder(args)
    if args.encoder is None and args.encoder_arch == "convnet_demo":  # the demo's stand-in, trained once
        if ckpt is None:
            train_demo_encoder(encoder, args)
        else:
            encoder.load_state_dict({k[9:]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")})
        if d.is_main:
            print(f"demo encoder: convnet_demo trained with labels on held-out crops in {time.time() - t0:.0f}s")
    pool, t0 = data.UnlabelledImages(args.data, transform=eval_transform(args.image_size)), time.time()
    feats = extract_features(encoder, pool, d, autocast, num_workers=args.num_workers)
    clusters = ckpt["clusters"] if ckpt is not None else cluster_features(feats, args.clusters, seed=args.seed)
    feats = feats.cpu()
    members = [torch.nonzero(clusters == c).flatten().tolist() for c in range(args.clusters)]
    if d.is_main:
        sizes = sorted(len(m) for m in members)
        print(f"{len(pool)} images -> {args.clusters} clusters (k-means; sizes {sizes[0]}..{sizes[-1]}) "
              f"in {time.time() - t0:.1f}s")

    model, tok = build_model(args, encoder, lm)
    model = model.to(d.device)
    args.cluster_names = None
    if args.pseudo_names == "nouns":  # fixed names, matched once; kept in args, so saved with the checkpoint
        prototypes = torch.stack([feats[m].mean(0) if m else feats.new_zeros(feats.shape[1]) for m in members])
        args.cluster_names = ckpt["args"]["cluster_names"] if ckpt else match_nouns(model, tok, prototypes,
                                                                                     args.vocabulary, args.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]  # mapper + LM
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]  # no decay: norms, biases
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    scaler = data.make_scaler(args.amp, d.device)
    lr_schedule = data.cosine_schedule(args.lr, args.min_lr, args.epochs, args.steps_per_epoch, args.warmup_epochs)
    start_epoch, step = data.resume_step(ckpt, args.steps_per_epoch)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.world_size > 1 else model
    if d.is_main:
        print(f"trainable (mapper + LM): {sum(p.numel() for p in trainable) / 1e6:.2f}M; frozen encoder: "
              f"{feats.shape[1]}-dim")
    if args.bench:  # the rate of the episode batches and of one training step (data.bench_train)
        batches = StepBatches(max(step, args.text_warmup_steps), members, feats, tok, args, d)
        (ids, _, _, images), _ = next(iter(batches))  # images per episode: N*K+1
        data.bench_train(batches, lambda b: train_step(ddp, optimizer, scaler, *b, d.world_size, autocast,
                         args.clip_grad), args.bench, d.device, len(images) / len(ids))
        return model, tok, feats, members

    for epoch in range(start_epoch, min(args.epochs, start_epoch + (args.stop_after or args.epochs))):
        data.seed_everything(args.seed + epoch, d.rank)
        ddp.train()
        bar = tqdm(range(args.steps_per_epoch), disable=not d.is_main, desc=f"epoch {epoch}", leave=False)
        t0 = time.time()
        for i in bar:
            if before is not None and step == args.text_warmup_steps and d.is_main:
                before(model, tok)
                ddp.train()
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[step])
            batch, num_targets = step_batch(step, members, feats, tok, args, d)
            stats = train_step(ddp, optimizer, scaler, batch, num_targets, d.world_size, autocast, args.clip_grad)
            step += 1
            eps = args.batch_size_per_gpu * d.world_size * (i + 1) / (time.time() - t0)  # episodes/s, N*K+1 images each
            bar.set_postfix(loss=f"{stats['loss']:.3f}", episodes_s=f"{eps:.0f}")
            if step % args.log_every == 0:
                log.log({"epoch": epoch, "step": step, **stats, "lr": float(lr_schedule[step - 1]), "episodes_s": eps})
        if d.is_main:
            data.save_checkpoint({"method": METHOD, "args": vars(args), "epoch": epoch + 1, "step": step,
                                  "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scaler": scaler.state_dict(), "clusters": clusters, "world_size": d.world_size},
                                 ckpt_path)
            print(f"epoch {epoch}: loss {stats['loss']:.3f}, {eps:.0f} episodes/s, saved {ckpt_path}")
    data.finish_distributed()
    return model, tok, feats, members


# ====== Evaluation: Frozen's open-ended protocol (evaluate.run_icl) on the answers of greedy decoding
@torch.no_grad()
def greedy_decode(model, ids, image_slots, feats, eos, max_new_tokens=24) -> list:
    """ids, image_slots: (L,) one sequence; feats: (M, F) -> the argmax tokens before <eos> (no KV cache: few)."""
    new = []
    for _ in range(max_new_tokens):
        token = int(model(ids[None], image_slots[None], feats)[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([token])])
        image_slots = torch.cat([image_slots, image_slots.new_zeros(1)])
    return new


@torch.no_grad()
def answer(model, tok, texts, feats, prefix_tokens) -> str:
    """The greedy answer after an episode's texts (captions, then the prompt) and image features (M, F)."""
    ids, slots, _ = encode_episode(tok, list(texts), None, prefix_tokens)
    ids, slots = torch.tensor(ids, device=feats.device), torch.tensor(slots, device=feats.device)
    return tok.decode(greedy_decode(model, ids, slots, feats, tok.eos)).strip().removesuffix(".")


def make_generate(model, tok, args, device):
    """generate(images, texts) -> str for evaluate.icl: uint8 (3, H, W) images, the text after each -> the answer."""
    transform, model = eval_transform(args.image_size), model.eval()

    def generate(images, texts):
        pixels = torch.stack([transform(torch.as_tensor(im)) for im in images]).to(device)
        return answer(model, tok, texts, model.encode_images(pixels), args.prefix_tokens).strip()

    return generate


def build_generator(ckpt: dict, device="cpu"):
    """generate(images, texts) -> str from a checkpoint of this file; one made with --lm needs that LM folder."""
    args = argparse.Namespace(**ckpt["args"])
    model, tok = build_model(args, build_backbone(ckpt["args"]))
    model.load_state_dict(ckpt["model"])
    return make_generate(model.to(device), tok, args, device)


@torch.no_grad()
def selfcontext_accuracy(model, tok, feats, members, args, episodes=100):
    """Exact match on fresh self-context episodes of the pool, fresh nonsense names: does it read names in context?"""
    model.eval()
    rng, hits, device = np.random.default_rng([args.seed, 10**9]), 0, next(model.parameters()).device
    for _ in range(episodes):
        e = sample_episode(members, 2, 1, rng, words=wording(args))
        hits += answer(model, tok, e["texts"], feats[e["images"]].to(device), args.prefix_tokens) == e["answer"]
    return 100 * hits / episodes


ICL_LEGEND = ("real/open = evaluate.icl with real names / Frozen's nonsense words (_induction: task induction; "
              "_in_context: a context name)")


def eval_only(args):
    """--eval-only CKPT: the icl evaluation that ends training, on --eval-data (or its val/) and --frozen-episodes."""
    ckpt = data.load_checkpoint(args.eval_only, METHOD, flag="--eval-only")
    has_val = args.eval_data and os.path.isdir(os.path.join(args.eval_data, "val"))
    folder = os.path.join(args.eval_data, "val") if has_val else args.eval_data
    t0, generate = time.time(), build_generator(ckpt, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    results = evaluate.run_icl(generate, folder, args.eval_ways, args.eval_shots, args.eval_episodes, args.seed,
                               args.class_names, (False, True), args.eval_repeats, args.frozen_episodes)
    print(f"icl on {folder} ({args.eval_episodes} episodes each, {time.time() - t0:.0f}s)")
    results = {**results, "ckpt": args.eval_only, "eval_data": folder}
    evaluate.print_table(results, f"accuracy in % of {args.eval_only}: {ICL_LEGEND}")
    print(json.dumps(results))


def main(args):
    if args.eval_only:
        return eval_only(args)
    if not args.demo and (args.encoder is None or args.lm is None):  # random ones train for hours, measure nothing
        missing = " and ".join(f for f, v in (("--encoder", args.encoder), ("--lm", args.lm)) if v is None)
        raise data.DataError(f"secat.py: {missing} required outside --demo: pass --encoder <DINO weights or a "
                             "repo checkpoint> and --lm <GPT-2-family Hugging Face folder: config.json, "
                             "model.safetensors, tokenizer>")
    if args.bench:
        return train(args)
    untrained = []  # a CPU copy of the model just before self-context training, scored after it: no rank waits
    keep = lambda model, tok: untrained.append(copy.deepcopy(model).cpu())  # noqa: E731
    model, tok, feats, members = train(args, before=keep if args.eval_data else None)
    if int(os.environ.get("RANK", 0)) != 0 or not (args.eval_data or args.frozen_episodes):
        return
    device, before, features = next(model.parameters()).device, {}, {}
    if untrained:  # the untrained baseline: real names, 2-way 1-shot
        res = evaluate.run_icl(make_generate(untrained.pop().to(device), tok, args, device), args.eval_data, (2,),
                               (1,), min(args.eval_episodes, 100), args.seed, args.class_names, False)
        before = {f"before/{k}": v for k, v in res.items() if k.startswith("real/")}
    generate, t0 = make_generate(model, tok, args, device), time.time()
    selfcontext = {"selfcontext/2way_1shot": selfcontext_accuracy(model, tok, feats, members, args)}
    if args.eval_data:
        ds = data.ImageFolder(args.eval_data, transform=eval_transform(args.image_size))
        x = torch.stack([ds[i][0] for i in range(len(ds))]).to(device)
        features = {"features/2way_1shot_nn": evaluate.feature_ceiling(
            torch.cat([model.encode_images(b) for b in x.split(64)]).cpu(), torch.tensor(ds.targets))}
    icl = evaluate.run_icl(generate, args.eval_data, args.eval_ways, args.eval_shots, args.eval_episodes, args.seed,
                           args.class_names, (False, True), args.eval_repeats, args.frozen_episodes)
    print(f"icl on {args.eval_data} ({args.eval_episodes} episodes each, {time.time() - t0:.0f}s)")
    if args.eval_data:
        said, truth = evaluate.icl_picture(generate, evaluate.named_folder(args.eval_data, args.class_names),
                                           os.path.join(args.output_dir, "episode.png"), seed=args.seed)
        print(f"picture: {args.output_dir}/episode.png (answer {said!r}, truth {truth!r})")
    results = {**selfcontext, **features, **before, **icl, "train_data": args.data, "eval_data": args.eval_data}
    evaluate.print_table(results, "accuracy in %: selfcontext = held-out pool episodes; features = the frozen "
                         "encoder's nearest-neighbour ceiling; before = just before self-context training; "
                         + ICL_LEGEND)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    data.cli(main, get_args)
