"""SeCAt: self-context adaptation, open-ended few-shot classification with a small VLM.

Derakhshani, Najdenkoska, Snoek, Worring, Asano. "Self-Supervised Open-Ended Classification
with Small Visual Language Models" (v1: "Small Visual Language Models can also be Open-Ended
Few-Shot Learners"), 2023. https://arxiv.org/abs/2310.00500  (no official code is public)

The idea. A visual language model learns to name things from a few examples in its context,
without a single real caption. Cluster a pool of unlabelled images with a frozen image
encoder; give each cluster a name that says nothing about its content (nouns matched to the
clusters, or nonsense words such as "blicket"); then train on interleaved "self-context" sequences

    <img> Here is a kettle. <img> Here is a owl. ... <query img> What is here? Here is a  kettle.

with the loss only on the query's answer. The only way to answer is to find the support image
that looks like the query and copy its name. At test time the same model gets real class names
in Frozen's wording ("This is a ...", another template than training's) and answers in open
text (exact match of the generated name; nothing is trained at test time). As in the paper,
the image encoder is FROZEN; the mapper (image features -> visual prefix tokens) and the LM are TRAINED.

Commands:
    python secat.py --demo                # tiny LM from scratch on the synthetic world, a few min on 2 CPU cores
    python secat.py --data /imagenet/train --encoder dino_deitsmall16_pretrain.pth --lm gpt2-large/ \\
        --eval-data /mini-imagenet/test --class-names LOC_synset_mapping.txt \\
        --frozen-episodes open_ended_mi real_name_mi                                # paper scale
    torchrun --nproc_per_node=8 secat.py --data ... --encoder ... --lm ...
    python secat.py ... --resume          # continue <output-dir>/checkpoint.pth (all epochs done: evaluates it again)

Contents: config; data (frozen encoder and features, k-means, names matched to clusters, episodes
and tokens); model (GPT, GPT-2 loading, mapper); answer-only loss; generation; training; evaluation.
"""
import argparse
import copy
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

METHOD = "secat"


# ====== Config: paper-scale defaults (a ~1B pretrained LM, a DINO ViT-S/16); --demo overrides a few.
# --demo: everything small enough for 2 CPU cores in minutes; flags given win
DEMO = dict(encoder_arch="convnet_demo", image_size=32, lm_dim=128, lm_layers=4, lm_heads=4, context=512,
            prefix_tokens=8, clusters=12, max_ways=2, max_shots=1, epochs=10, steps_per_epoch=150, text_warmup_steps=300,
            batch_size_per_gpu=32, lr=2e-3, min_lr=1e-4, warmup_epochs=1, eval_episodes=100, eval_ways=[2, 5],
            eval_shots=[1], num_workers=0, log_every=10)


def get_args(argv=None):
    p = argparse.ArgumentParser("SeCAt: self-context adaptation")
    p.add_argument("--data", default=None, help="folder of unlabelled images (class folders, if any, are ignored), "
                   "or a video or folder of videos (their frames as images)")
    p.add_argument("--eval-data", default=None, help="ImageFolder of the icl benchmark (class folders: names or wnids; "
                   "--demo: a root laid out like the synthetic world, whose objects/val is used; default: the synthetic world)")
    p.add_argument("--class-names", default=None, help="wnid -> name file (LOC_synset_mapping.txt or JSON) for --eval-data")
    p.add_argument("--frozen-episodes", nargs="+", default=[], help="folders of Frozen's released episodes (evaluate.py)")
    p.add_argument("--output-dir", default="runs/secat")
    p.add_argument("--demo", action="store_true", help="tiny LM, short schedule, synthetic world (CPU, minutes)")
    p.add_argument("--encoder", default=None, help="frozen encoder (required outside --demo): DINO weights or a repo checkpoint")
    p.add_argument("--encoder-arch", default="vit_small", help="architecture of official DINO weights")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--lm", default=None, help="pretrained GPT-2-family LM (required outside --demo): a Hugging Face folder "
                   "(config.json, model.safetensors, vocab.json + merges.txt or tokenizer.json); it reads its own BPE")
    p.add_argument("--lm-dim", type=int, default=768, help="from-scratch LM (demo) width")
    p.add_argument("--lm-layers", type=int, default=12)
    p.add_argument("--lm-heads", type=int, default=12)
    p.add_argument("--context", type=int, default=1024, help="from-scratch LM context length")
    p.add_argument("--lm-positions", default="alibi", choices=["alibi", "learned"], help="from-scratch LM: ALiBi or learned")
    p.add_argument("--text-warmup-steps", type=int, default=0, help="first steps on text only (text_batch), for an LM from scratch")
    p.add_argument("--prefix-tokens", type=int, default=2, help="visual tokens per image (Frozen: 2; demo: 8, see README)")
    p.add_argument("--clusters", type=int, default=1000, help="K clusters of the unlabelled pool")
    p.add_argument("--pseudo-names", default=None, choices=["nonsense", "nouns"], help="nouns (default with --lm, the "
                   "paper's): matched one per cluster (match_nouns); nonsense (LM from scratch): re-drawn per episode")
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
    if args.data is None:
        p.error("--data is required (or --demo to use the synthetic world)")
    args.pseudo_names = args.pseudo_names or ("nouns" if args.lm else "nonsense")
    args.vocabulary = name_vocabulary(args.pseudo_names, args.eval_data)
    return args


def refuse_toy_setup(args):
    """Full scale needs the paper's two pretrained parts (random ones train for hours and measure nothing)."""
    if not args.demo and (args.encoder is None or args.lm is None):
        missing = " and ".join(f for f, v in (("--encoder", args.encoder), ("--lm", args.lm)) if v is None)
        raise data.DataError(f"secat.py: {missing} required outside --demo: pass --encoder <DINO weights or a repo "
                         "checkpoint> and --lm <GPT-2-family Hugging Face folder: config.json, model.safetensors, tokenizer>")


# ====== Data 1: the frozen image encoder and its features of the unlabelled pool.
def convnet_demo(width=32) -> nn.Module:
    """The demo's frozen encoder: 4 conv stages with BN (stride 8), global average pool; (B, 3, H, W) -> (B, 4*width)."""
    layers, c = [], 3
    for i, w in enumerate((width, 2 * width, 4 * width, 4 * width)):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()] + ([nn.MaxPool2d(2)] if i < 3 else [])
        c = w
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.out_dim = c
    return net


def build_backbone(args: dict) -> nn.Module:
    """The frozen encoder with fresh weights, from a checkpoint's stored args (evaluate.py calls this):
    the demo's conv net, another method file's backbone (rebuilt by that file), or a ViT for DINO weights."""
    if args.get("encoder_method"):
        import importlib
        return importlib.import_module(args["encoder_method"]).build_backbone(args["encoder_args"])
    if args["encoder_arch"] == "convnet_demo":
        return convnet_demo()
    import evaluate
    return evaluate.build_arch(args["encoder_arch"], args["patch_size"])


def load_encoder(args) -> nn.Module:
    """--encoder through evaluate.load_backbone: DINO weights (as --encoder-arch/--patch-size) or a repo checkpoint
    (its method kept in args for build_backbone). None: fresh weights (the demo then trains its stand-in)."""
    args.encoder_method = args.encoder_args = None
    if args.encoder is None:
        return build_backbone(vars(args))
    import evaluate
    state = data.load_checkpoint(args.encoder, flag="--encoder")  # weights_only=True; a damaged file names itself
    if "method" in state:
        args.encoder_method, args.encoder_args = state["method"], state["args"]
    return evaluate.load_backbone(args.encoder, args.encoder_arch, args.patch_size)


def feature_dim(encoder) -> int:  # the width of encoder(images): a ViT's [CLS], a conv net's pooled output
    return getattr(encoder, "out_dim", None) or encoder.embed_dim


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(size):  # uint8 (3, H, W) -> normalised float (3, size, size); the encoder is frozen: no augmentation
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


def train_demo_encoder(encoder, args, per_class=100, epochs=15, first_index=1000):
    """The demo's stand-in for the paper's pretrained encoder: convnet_demo trained WITH labels on synthetic
    crops that neither the pool (objects/train: train crops 0-59) nor the evaluation (objects/val) holds (train
    crops 1000+), then frozen; its features separate the classes as a pretrained encoder's do on real images."""
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


# ====== Data 2: cluster the pool (plain k-means on the frozen features, as in the paper) and name the
# clusters: nouns matched one to one (the paper's recipe), or nonsense words re-drawn per episode.
@torch.no_grad()
def cluster_features(feats, k, seed=0):
    """(N, F) -> (N,) int64: plain k-means (evaluate.kmeans: Lloyd, k-means++, best of 3) on L2-normalised
    features, on the features' device (at ImageNet scale a GPU's job)."""
    import evaluate
    return evaluate.kmeans(F.normalize(feats.float(), dim=1), k, seed=seed)[0].cpu()


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


def name_vocabulary(kind: str, eval_folder=None, class_names=None):
    """--pseudo-names nouns: the paper's kind, vocabulary nouns (NOUNS above) minus every word of the
    evaluation's class names (its folders, or their names in --class-names), so that no real name is
    seen in training; nonsense: None."""
    if kind == "nonsense":
        return None
    classes = os.listdir(eval_folder) if eval_folder and os.path.isdir(eval_folder) else []
    if class_names:
        import evaluate
        classes = list(evaluate.read_class_names(class_names).values())
    taken = {w for d in classes for w in d.lower().replace("_", " ").split()}
    return [w for w in NOUNS if w not in taken]


def pseudo_name(rng, vocabulary=None) -> str:
    """Half of the names one word, half two. With a vocabulary: nouns from it ("kettle", "owl
    harbor"); without: pronounceable nonsense of 1-3 syllables ("blicket", "dax fep"), in which
    every letter a-z occurs, so that copying a name is learned for any spelling."""
    words = []
    for _ in range(1 if rng.random() < 0.5 else 2):
        words.append(vocabulary[rng.integers(len(vocabulary))] if vocabulary else "".join(
            ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))] + CODAS[rng.integers(len(CODAS))]
            for _ in range(rng.integers(1, 4))))
    return " ".join(words)


def pseudo_names(n, rng, vocabulary=None) -> list:
    names = []
    while len(names) < n:
        name = pseudo_name(rng, vocabulary)
        if name not in names:
            names.append(name)
    return names




@torch.no_grad()
def match_nouns(model, tok, prototypes, vocabulary, seed=0) -> list:
    """One noun per cluster, fixed for the run (the paper's recipe as its reviews describe it): K random nouns
    (two-noun names added if the list is short), matched one to one to the K clusters by Hungarian assignment
    on the cosine of the LM's embedding of each noun (mean of its wte rows) and each prototype (mean frozen
    feature, (K, F)) mapped by the mapper (mean of its P tokens) as training starts (the paper says not when)."""
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


# ====== Data 3: interleaved N-way K-shot self-context episodes (Frozen's format) and their tokens.
# Training's wording differs from the evaluation's (Frozen's, evaluate.icl), as in the paper, which does not
# publish its own: ours keeps Frozen's form and length (relative positions carry over) and changes the words.
CAPTION, PROMPT = "Here is a {}.", "What is here? Here is a"  # training, with a pretrained LM
EVAL_CAPTION, EVAL_PROMPT = "This is a {}.", "What is this? This is a"  # evaluation (Frozen's)


def wording(args) -> tuple:
    """(caption, prompt) of training: the distinct template with a pretrained LM (the paper); Frozen's own for an LM
    from scratch, which has read no other text to carry copying over from one wording to the other (measured)."""
    return (CAPTION, PROMPT) if args.lm else (EVAL_CAPTION, EVAL_PROMPT)


def sample_episode(members, ways, shots, rng, vocabulary=None, cluster_names=None, words=(CAPTION, PROMPT)) -> dict:
    """members: list over clusters of image indices. N=ways clusters with their names (cluster_names,
    fixed: matched nouns) or fresh pseudo-names (re-drawn per episode: names must be read from the
    context), K=shots supports per cluster in random order, then a query image from one of the N clusters.
    Returns dict(images=[N*K support indices..., query], texts=[N*K captions..., PROMPT],
    answer=name, clusters=[cluster of each image], names={cluster: name})."""
    eligible = [c for c, m in enumerate(members) if len(m) >= shots + 1]
    if len(eligible) < ways:
        raise data.DataError(f"only {len(eligible)} clusters have {shots + 1}+ images; need {ways} (fewer --clusters?)")
    chosen = [int(c) for c in rng.choice(eligible, ways, replace=False)]
    names = {c: cluster_names[c] for c in chosen} if cluster_names else dict(zip(chosen, pseudo_names(ways, rng, vocabulary)))
    query_cluster = chosen[rng.integers(ways)]
    support, query = [], None
    for c in chosen:
        picks = [int(i) for i in rng.choice(members[c], shots + (c == query_cluster), replace=False)]
        if c == query_cluster:
            query = picks.pop()
        support += [(i, c) for i in picks]
    support = [support[j] for j in rng.permutation(len(support))]
    return dict(images=[i for i, _ in support] + [query], texts=[words[0].format(names[c]) for _, c in support] + [words[1]],
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
    return [sample_episode(members, ways, shots, rng, args.vocabulary, getattr(args, "cluster_names", None), wording(args))
            for _ in range(global_batch)]


def text_batch(step, args, tok, global_batch):
    """Text-only warm-up for an LM from scratch (a stand-in for pretraining, which teaches repeating words
    seen in the context): lines "This is a <name>." (the training caption) with names drawn, with repeats, from a few fresh
    pseudo-names, loss on every token; the dense loss grows the copying ("induction") heads that the
    sparse answer-only loss needs many more steps to find. Returns episode-like dicts."""
    rng = np.random.default_rng([args.seed, step, 7])
    batch = []
    for _ in range(global_batch):
        names = pseudo_names(int(rng.integers(2, 5)), rng, args.vocabulary)
        lines = [wording(args)[0].format(names[rng.integers(len(names))]) for _ in range(int(rng.integers(4, 8)))]
        batch.append(dict(images=[], texts=[], text="\n".join(lines)))
    return batch


# ====== Model 1: a GPT-style decoder (GPT-2's layout and parameter names: pre-norm blocks,
# learned positions (from scratch: ALiBi), tanh-GELU, causal SDPA attention, output tied to the embedding).
def alibi_bias(L, heads, device):  # -> (heads, L, L) additive attention bias; -inf on the future
    """ALiBi (Press et al., 2022): head h adds -2^(-8h/H) * distance to its scores: "the most recent image before
    me" is one pattern at every distance. Demo, measured: a context name in 100 % of answers (rotary: 72 %), and
    the matching of query and support images learned once by step 1,500 (rotary: never in 1,500 steps)."""
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
        if self.positions == "alibi":
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=alibi_bias(q.shape[2], self.heads, q.device).to(q.dtype))
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(rearrange(y, "b h l d -> b l (h d)"))


class GPTBlock(nn.Module):
    def __init__(self, dim, heads, positions="learned"):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), CausalSelfAttention(dim, heads, positions)
        self.ln_2, self.mlp = nn.LayerNorm(dim), nn.Sequential()
        self.mlp.c_fc, self.mlp.act, self.mlp.c_proj = nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """forward(embeddings (B, L, D)) -> logits (B, L, vocab). Inputs are embeddings, not ids,
    because visual prefix tokens are spliced in between the word embeddings (`wte`)."""

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


# --- Pretrained LMs: a Hugging Face GPT-2-family folder (gpt2 124M ... gpt2-xl 1.5B) maps onto GPT
# --- above by name: drop "transformer.", transpose the Conv1D weights (HF stores them (in, out)),
# --- drop the causal-mask buffers and lm_head (tied to wte). Reading the files: data.py.
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_to_ours(hf_state: dict) -> dict:
    out = {}
    for k, v in hf_state.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue
        out[k] = v.t().contiguous() if k.endswith(GPT2_CONV1D) else v
    return out


def load_lm(folder) -> GPT:
    """A GPT-2-family LM from a Hugging Face folder (data.read_hf_folder); shapes come from the
    weights, the number of heads from config.json (n_head; else GPT-2's 64-wide heads)."""
    hf, config = data.read_hf_folder(folder, flag="--lm")
    state = {k: v.float() for k, v in gpt2_to_ours(hf).items()}
    if "wte.weight" not in state:
        raise data.DataError(f"--lm {folder}: not a GPT-2-family state dict (no wte.weight); see the README for supported LMs")
    vocab, dim = state["wte.weight"].shape
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("h."))
    lm = GPT(vocab, state["wpe.weight"].shape[0], dim, layers, config.get("n_head", dim // 64))
    lm.load_state_dict(state, strict=True)
    return lm


def load_tokenizer(lm_dir=None):
    """encode(str) -> ids, decode(ids) -> str, .eos, .pad, .vocab_size. A pretrained LM reads its own
    byte-level BPE (data.BPETokenizer: the same ids as GPT-2's tokenizer for that folder); only an LM
    from scratch (lm_dir None) reads one id per UTF-8 byte (data.ByteTokenizer)."""
    return data.BPETokenizer.from_folder(lm_dir) if lm_dir else data.ByteTokenizer()


# ====== Model 2: the visual language model: frozen encoder -> mapper -> visual prefix tokens -> LM.
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


# ====== Loss: the query's answer only.
def answer_loss(logits, ids, targets, num_targets):
    """Cross-entropy on the query's answer tokens only (everything else is context): position t
    predicts token t+1, counted where token t+1 is a target. Summed and divided by num_targets,
    the count over the GLOBAL batch, so that DDP's mean over ranks (times W) is the global mean."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (nll * targets[:, 1:].flatten()).sum() / num_targets


# ====== Generation: greedy decoding of the answer until <eos>; the function evaluate.icl calls.
@torch.no_grad()
def greedy_decode(model, ids, image_slots, feats, eos, max_new_tokens=24) -> list:
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
    """generate(images, texts) -> str for evaluate.icl: images = the episode's uint8 (3, H, W) images, texts = the
    text after each (captions, then the prompt). Returns the answer without the caption's final period."""
    transform, model = eval_transform(args.image_size), model.eval()

    def generate(images, texts):
        pixels = torch.stack([transform(torch.as_tensor(im)) for im in images]).to(device)
        feats = model.encode_images(pixels)
        ids, slots, _ = encode_episode(tok, list(texts), None, args.prefix_tokens)
        new = greedy_decode(model, torch.tensor(ids, device=device), torch.tensor(slots, device=device), feats, tok.eos)
        return tok.decode(new).strip().removesuffix(".").strip()

    return generate


def build_generator(ckpt: dict, device="cpu"):
    """generate(images, texts) -> str from a checkpoint of this file: what `python evaluate.py
    icl --ckpt ...` calls. A checkpoint made with --lm needs that LM folder at the same path."""
    args = argparse.Namespace(**ckpt["args"])
    model, tok = build_model(args, build_backbone(ckpt["args"]))
    model.load_state_dict(ckpt["model"])
    return make_generate(model.to(device), tok, args, device)


# ====== Training: the encoder is frozen, so its features are computed once and cached; a step
# builds the global batch of episodes, takes this rank's share and updates mapper + LM.
def build_model(args, encoder, lm=None):
    """(model, tokenizer): a pretrained GPT-2-family LM and its own BPE from the --lm folder (`lm` if already
    loaded), else a GPT of --lm-dim/--lm-layers/--lm-heads from scratch with the byte tokenizer (258 ids)."""
    if not args.lm and args.lm_positions not in ("alibi", "learned"):  # "rope": an earlier secat.py's, since dropped
        raise data.DataError(f"this checkpoint's LM has {args.lm_positions} positions (an earlier secat.py's): train it again")
    tok = load_tokenizer(args.lm)
    if lm is None:
        lm = load_lm(args.lm) if args.lm else GPT(tok.vocab_size, args.context, args.lm_dim, args.lm_layers,
                                                  args.lm_heads, args.lm_positions)
    if tok.vocab_size > lm.wte.weight.shape[0]:
        raise data.DataError(f"{args.lm}: {tok.vocab_size} token ids for an LM with {lm.wte.weight.shape[0]}: not its tokenizer")
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


def train(args, before=None):
    """Returns (model, tokenizer, pool features, cluster members). before(model, tok), if given, runs on
    rank 0 just before the first self-context step (after any text warm-up): keep it to seconds (a copy of
    the weights), since the other ranks wait for it in the next step's all-reduce."""
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

    # the frozen encoder and its features of the unlabelled pool (class folders are ignored)
    t0 = time.time()
    encoder = load_encoder(args)
    if args.encoder is None and args.encoder_arch == "convnet_demo":  # the demo's stand-in, trained once
        if ckpt is None:
            train_demo_encoder(encoder, args)
        else:
            encoder.load_state_dict({k[9:]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")})
        if d.is_main:
            print(f"demo encoder: convnet_demo trained with labels on held-out synthetic crops in {time.time() - t0:.0f}s")
    pool = data.UnlabelledImages(args.data, transform=eval_transform(args.image_size))
    t0 = time.time()
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
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # mapper + LM
    optimizer = torch.optim.AdamW([{"params": [p for n, p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
                                   {"params": [p for n, p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    scaler = data.make_scaler(args.amp, d.device)
    lr_schedule = data.cosine_schedule(args.lr, args.min_lr, args.epochs, args.steps_per_epoch, args.warmup_epochs)
    start_epoch, step = data.resume_step(ckpt, args.steps_per_epoch)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.world_size > 1 else model
    global_batch = args.batch_size_per_gpu * d.world_size
    if d.is_main:
        print(f"trainable (mapper + LM): {sum(p.numel() for _, p in trainable) / 1e6:.2f}M; frozen encoder: {feats.shape[1]}-dim")

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
            text = step < args.text_warmup_steps  # LM from scratch: text-only warm-up first
            episodes = text_batch(step, args, tok, global_batch) if text else make_batch(step, members, args, global_batch)
            num_targets = sum(len(tok.encode(e["text"] if text else " " + e["answer"] + ".")) + (not text) for e in episodes)
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
                                  "scaler": scaler.state_dict(), "clusters": clusters, "world_size": d.world_size},
                                 ckpt_path)
            print(f"epoch {epoch}: loss {loss.item():.3f}, {eps:.0f} episodes/s, saved {ckpt_path}")
    data.finish_distributed()
    return model, tok, feats, members


# ====== Evaluation: Frozen's open-ended protocol through evaluate.run_icl (real class names, Frozen's
# nonsense words, Frozen's released episodes; with and without task induction), before and after
# self-context training; evaluate.icl_picture draws one episode.
@torch.no_grad()
def selfcontext_accuracy(model, tok, feats, members, args, episodes=100):
    """Exact-match accuracy on fresh self-context episodes of the pool (the training task and wording,
    with nonsense names never drawn in training): did the LM learn to read names from its context?"""
    model.eval()
    rng, hits, device = np.random.default_rng([args.seed, 10**9]), 0, next(model.parameters()).device
    for _ in range(episodes):
        e = sample_episode(members, 2, 1, rng, words=wording(args))
        ids, slots, _ = encode_episode(tok, e["texts"], None, args.prefix_tokens)
        new = greedy_decode(model, torch.tensor(ids, device=device), torch.tensor(slots, device=device),
                            feats[e["images"]].to(device), tok.eos)
        hits += tok.decode(new).strip().removesuffix(".") == e["answer"]
    return 100 * hits / episodes


def main(args):
    refuse_toy_setup(args)
    import evaluate
    untrained = []  # a CPU copy of the model just before self-context training, scored after it: no rank waits
    keep = lambda model, tok: untrained.append(copy.deepcopy(model).cpu())  # noqa: E731
    model, tok, feats, members = train(args, before=keep if args.eval_data else None)
    if int(os.environ.get("RANK", 0)) != 0 or not (args.eval_data or args.frozen_episodes):
        return
    device, before = next(model.parameters()).device, {}
    if untrained:  # the untrained baseline: real names, 2-way 1-shot
        res = evaluate.run_icl(make_generate(untrained.pop().to(device), tok, args, device), args.eval_data, (2,),
                               (1,), min(args.eval_episodes, 100), args.seed, args.class_names, False)
        before = {f"before/{k}": v for k, v in res.items() if k.startswith("real/")}
    generate = make_generate(model, tok, args, device)
    t0 = time.time()
    results = {"selfcontext/2way_1shot": selfcontext_accuracy(model, tok, feats, members, args)}
    if args.eval_data:
        ds = data.ImageFolder(args.eval_data, transform=eval_transform(args.image_size))
        x = torch.stack([ds[i][0] for i in range(len(ds))]).to(device)
        results["features/2way_1shot_nn"] = evaluate.feature_ceiling(
            torch.cat([model.encode_images(b) for b in x.split(64)]).cpu(), torch.tensor(ds.targets))
    results.update(before)
    results.update(evaluate.run_icl(generate, args.eval_data, args.eval_ways, args.eval_shots, args.eval_episodes,
                                    args.seed, args.class_names, (False, True), args.eval_repeats, args.frozen_episodes))
    print(f"icl on {args.eval_data} ({args.eval_episodes} episodes each, {time.time() - t0:.0f}s)")
    if args.eval_data:
        answer, truth = evaluate.icl_picture(generate, evaluate.named_folder(args.eval_data, args.class_names),
                                             os.path.join(args.output_dir, "episode.png"), seed=args.seed)
        print(f"picture: {args.output_dir}/episode.png (answer {answer!r}, truth {truth!r})")
    results.update(train_data=args.data, eval_data=args.eval_data)  # selfcontext on the pool, the rest on eval_data
    evaluate.print_table(results, "accuracy in %: selfcontext = held-out pool episodes; features = the frozen encoder's "
                         "nearest-neighbour ceiling; before = just before self-context training; real/open = evaluate.icl "
                         "with real names / Frozen's nonsense words (_induction: task induction; _in_context: a context name)")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results))


if __name__ == "__main__":
    data.cli(main, get_args)
