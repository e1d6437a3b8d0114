"""Tests for dora.py (CPU, small tensors): the tracker, DINO weights, DDP, bf16, resume."""
import argparse
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import dora  # noqa: E402
import evaluate  # noqa: E402
from conftest import (draw_from_every_stream, one_run_and_two_pieces, own_noisy_video,  # noqa: E402
                      own_video_and_tiny_world, run_demo)

torch.set_num_threads(1)


def tiny_args(*extra):
    """A vit_demo student on 32-px clips of 3 frames, 2 local crops, a 256-d head."""
    return dora.get_args(["--data", "unused", "--arch", "vit_demo", "--patch-size", "8", "--out-dim", "256",
                          "--image-size", "32", "--precrop-size", "40", "--frames-per-clip", "3",
                          "--step-between-clips", "1", "--local-crops-number", "2", "--batch-size-per-gpu", "2",
                          "--epochs", "2", "--warmup-epochs", "1", "--warmup-teacher-temp-epochs", "1",
                          "--drop-path", "0", "--amp", "none", "--num-workers", "0", *extra])


def random_crops(batch, args, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, S = args.frames_per_clip, args.image_size
    return [torch.randn(batch, T, 3, S, S, generator=g)] + \
        [torch.randn(batch, T, 3, S // 2, S // 2, generator=g) for _ in range(args.local_crops_number)]


# ---------------------------------------------------------------------------- augmentation
def test_clip_crops_resize_like_the_official_video_crop():
    """Official RandomResizedCropVideo(300) / (224): F.interpolate, bilinear, no antialiasing."""
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(2, 3, 60, 80, generator=g)  # textured: every pixel its own value
    for seed in range(3):
        torch.manual_seed(seed)
        i, j, h, w = dora.T.RandomResizedCrop.get_params(frames, (0.2, 1.0), (3 / 4, 4 / 3))  # the box crop() draws
        torch.manual_seed(seed)
        ours = dora.ClipAugmentation.crop(frames, 24, (0.2, 1.0))
        box = frames[..., i:i + h, j:j + w]
        official = F.interpolate(box, size=(24, 24), mode="bilinear", align_corners=False, antialias=False)
        assert torch.allclose(ours, official, atol=1e-6)
        smoothed = F.interpolate(box, size=(24, 24), mode="bilinear", align_corners=False, antialias=True)
        assert (ours - smoothed).abs().mean() > 0.02  # the test tells the two apart (h >= 26 > 24)


def test_local_crop_blur_sigma_is_unscaled_at_112px(monkeypatch):
    """Official utils.GaussianBlur: PIL radius (= σ) uniform in [0.1, 2] px, whatever the crop size."""
    seen = []
    blur = dora.TF.gaussian_blur
    monkeypatch.setattr(dora.TF, "gaussian_blur", lambda x, k, s: seen.append((k, s)) or blur(x, k, s))
    aug = dora.ClipAugmentation(tiny_args())
    torch.manual_seed(0)
    for _ in range(200):
        aug.photometric(torch.rand(3, 112, 112), blur_p=1.0)
    sigmas = [s for _, s in seen]
    assert len(seen) == 200 and all(0.1 <= s <= 2.0 for s in sigmas)
    assert max(sigmas) > 1.9  # the old size/224 scaling capped σ at 1.0 for 112 px
    assert all(k == 2 * math.ceil(3 * s) + 1 for k, s in seen)


# ---------------------------------------------------------------------------- the tracker
def scene(T=5, S=12, D=24, seed=0):
    """Feature maps of a synthetic clip on an S x S patch grid with three equal regions: a 6 x 8
    object moving one patch right per frame, a ground strip (bottom 4 rows), and the rest.
    Returns labels (T, S, S) and patch features (T, S*S, D) = region vector + noise."""
    g = torch.Generator().manual_seed(seed)
    vectors = F.normalize(torch.randn(3, D, generator=g), dim=-1) * 3
    labels = torch.zeros(T, S, S, dtype=torch.long)
    labels[:, 8:] = 2
    for t in range(T):
        labels[t, 0:6, t:t + 8] = 1
    feats = vectors[labels.flatten(1)] + 0.5 * torch.randn(T, S * S, D, generator=g)
    return labels, feats


def head_attention(labels0, regions, seed=0):
    """[CLS] attention (1, k, N) of k heads, head i mostly on region regions[i] of the first frame."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.stack([(labels0.flatten() == r).float() * 20 + torch.rand(labels0.numel(), generator=g)
                        for r in regions])
    return (attn / attn.sum(-1, keepdim=True))[None]


def test_sinkhorn_online_equipartition():
    q = dora.sinkhorn_online(torch.randn(2, 50, 5), eps=0.5, iters=50)
    assert torch.allclose(q.sum(-1), torch.ones(2, 50), atol=1e-4)  # each patch fully assigned
    assert torch.allclose(q.sum(1), torch.full((2, 5), 10.0), atol=1e-2)  # each object gets N/K patches


def test_track_gives_k_masks_per_frame():
    torch.manual_seed(0)
    vit = dora.VisionTransformer(patch_size=8, embed_dim=48, depth=2, num_heads=4).eval()
    clip = torch.randn(2, 5, 3, 32, 48)
    cls, masks = dora.track(vit, clip, heads=[0, 2, 3])
    assert cls.shape == (2, 5, 48)
    assert masks.shape == (2, 3, 5, 4, 6) and masks.dtype == torch.bool
    tokens, head_attn, queries, keys = dora.tracker_inputs(vit, clip, [0, 2, 3])  # what track and the picture use
    assert torch.equal(tokens[:, :, 0], cls) and queries.shape == keys.shape == (2, 5, 24, 48)
    maps, again = dora.track_objects(dora.discover_objects(head_attn[:, :, 0], queries[:, 0], tokens[:, 0, 1:]), keys)
    assert maps.shape == head_attn.shape == (2, 3, 5, 24) and torch.equal(again.view(2, 3, 5, 4, 6), masks)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 3, 5))  # softmax over the patches
    assert masks.flatten(3).any(-1).all() and not masks.flatten(3).all(-1).any()  # above the mean: some, not all
    masked = dora.mask_clip(clip, masks)
    assert masked.shape == (3, 2, 5, 3, 32, 48)
    up = masks[1, 2, 4].repeat_interleave(8, 0).repeat_interleave(8, 1)  # object 2 of clip 1 in frame 4
    assert torch.equal(masked[2, 1, 4, :, up], clip[1, 4, :, up]) and (masked[2, 1, 4, :, ~up] == 0).all()


def test_sinkhorn_makes_objects_distinct():
    labels, feats = scene()
    attn = head_attention(labels[0], [1, 1, 1])  # all three heads look at the same (salient) object
    overlap = {}
    for sk in (False, True):
        prototypes = dora.discover_objects(attn, feats[:1], feats[:1], use_sinkhorn=sk)
        _, masks = dora.track_objects(prototypes, feats[None])
        overlap[sk] = dora.mask_overlap(masks.reshape(1, 3, 5, 12, 12))
    assert overlap[False] > 0.9  # without SK: three copies of one object
    assert overlap[True] < overlap[False] - 0.3


@pytest.mark.parametrize("use_sinkhorn", [False, True])
def test_tracker_follows_translating_object(use_sinkhorn):
    labels, feats = scene()
    attn = head_attention(labels[0], [1, 2, 0])  # head 0 on the object, the others elsewhere
    prototypes = dora.discover_objects(attn, feats[:1], feats[:1], use_sinkhorn=use_sinkhorn)
    _, masks = dora.track_objects(prototypes, feats[None])
    masks = masks.reshape(3, 5, 12, 12)
    cols = torch.arange(12).float()
    centres = []
    for t in range(5):
        obj, truth = masks[0, t], labels[t] == 1
        assert obj.sum() >= 3 and (obj & truth).sum() >= 0.9 * obj.sum()  # the mask lies on the object
        assert not (masks[1:, t] & truth).any()  # and no other object takes it
        centres.append((obj.float() * cols).sum() / obj.sum())
    moves = np.diff(centres)
    assert (moves > 0).all() and abs(moves.mean() - 1.0) < 0.5  # one patch right per frame, like the object


def test_tracking_picture_rows_and_overlap(tmp_path, monkeypatch):
    grids, labelled_grid = [], data.labelled_grid  # what the picture hands data.labelled_grid: tile sizes and labels
    monkeypatch.setattr(data, "labelled_grid", lambda rows, path, title, row_names, col_names: grids.append(dict(
        sizes=[[data._as_pil(t).size for t in r] for r in rows], title=title, row_names=row_names,
        col_names=col_names)) or labelled_grid(rows, path, title, row_names, col_names))
    torch.manual_seed(0)
    vit = dora.VisionTransformer(patch_size=8, embed_dim=48, depth=2, num_heads=4).eval()
    clip = torch.randn(3, 3, 32, 40)
    overlaps = dora.tracking_picture(vit, clip, str(tmp_path / "t.png"), heads=[0, 2, 3])
    (grid,) = grids
    assert grid["sizes"] == [[(192, 192)] * 3] * 5  # frames, heads, objects without / with SK, masks; enlarged
    assert grid["col_names"] == ["frame 0", "frame 1", "frame 2"] and "Sinkhorn" in grid["row_names"][2]
    assert "B = head 3" in grid["title"] and all(0 <= o <= 1 for o in overlaps)
    assert os.path.getsize(tmp_path / "t.png") > 0
    masks = torch.zeros(1, 2, 1, 2, 2)
    masks[0, 0, 0, 0] = masks[0, 1, 0, :, 0] = 1  # a row and a column of a 2 x 2 grid: IoU 1/3
    assert dora.mask_overlap(masks) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------- DINO weights
def dino_reference_forward(sd, x, patch, heads, depth):
    """DINO's ViT written out from its parameter names: [CLS] output and last attention."""
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    B, N, D = t.shape
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = F.linear(ln(t, p + "norm1"), sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (D // heads) ** -0.5).softmax(-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(B, N, D), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + y
        h = F.gelu(F.linear(ln(t, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        t = t + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return ln(t, "norm")[:, 0], attn


def test_dino_weights_load_strict_and_match(tmp_path):
    """DINO's released weights (e.g. dino_deitsmall16_pretrain.pth) load strictly and give DINO's outputs."""
    torch.manual_seed(0)
    # a DINO checkpoint's backbone: DINO's names and shapes, random values (ViT-S/16 layout, 2 blocks)
    D, heads, depth, patch = 384, 6, 2, 16
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 197, D), "patch_embed.proj.weight": (D, 3, 16, 16),
              "patch_embed.proj.bias": (D,), "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(depth):
        for n, s in {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
                     "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "norm2.weight": (D,), "norm2.bias": (D,),
                     "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D),
                     "mlp.fc2.bias": (D,)}.items():
            shapes[f"blocks.{i}.{n}"] = s
    sd = {k: torch.randn(s) * 0.05 for k, s in shapes.items()}
    # ... saved as DINO's full checkpoints are: teacher with backbone./head. prefixes, args a Namespace
    head = {"head.mlp.0.weight": (2048, D), "head.mlp.0.bias": (2048,), "head.mlp.2.weight": (2048, 2048),
            "head.mlp.2.bias": (2048,), "head.mlp.4.weight": (256, 2048), "head.mlp.4.bias": (256,),
            "head.last_layer.weight_g": (512, 1), "head.last_layer.weight_v": (512, 256)}
    full = {**{"backbone." + k: v for k, v in sd.items()}, **{k: torch.randn(s) * 0.05 for k, s in head.items()}}
    torch.save({"teacher": full, "args": argparse.Namespace(arch="vit_small")}, tmp_path / "dino_full.pth")

    vit = dora.VisionTransformer(patch, D, depth, heads).eval()
    vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 224, 224)
    ref_cls, ref_attn = dino_reference_forward(sd, x, patch, heads, depth)
    with torch.no_grad():
        assert torch.allclose(vit(x), ref_cls, atol=1e-4)
        assert torch.allclose(vit.get_last_selfattention(x), ref_attn, atol=1e-5)
        assert torch.allclose(vit.get_intermediate_layers(x, 1)[0][:, 0], ref_cls, atol=1e-4)
        tokens, q, k = vit.forward_track(x)  # the tracker's: the last block's queries and keys give its attention
        attn = (q @ k.transpose(-2, -1) * (D // heads) ** -0.5).softmax(-1)
        assert torch.allclose(tokens[:, 0], ref_cls, atol=1e-4) and torch.allclose(attn, ref_attn, atol=1e-5)
        assert tokens.shape == (2, 197, D) and q.shape == k.shape == (2, heads, 197, D // heads)
        assert vit(torch.randn(1, 3, 160, 96)).shape == (1, D)  # pos-embed interpolation

    other = dora.VisionTransformer(patch, D, depth, heads)
    data.load_pretrained(other, str(tmp_path / "dino_full.pth"))  # weights_only, strict
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    wrapper = dora.MultiCropWrapper(dora.VisionTransformer(patch, D, depth, heads), dora.DINOHead(D, 512)).eval()
    wrapper.load_state_dict(full, strict=True)  # the DINO head's names too (weight_g, weight_v)
    with torch.no_grad():
        z = F.normalize(torch.randn(3, 256), dim=-1)
        w = full["head.last_layer.weight_g"] * F.normalize(full["head.last_layer.weight_v"], dim=1)
        assert torch.allclose(wrapper.head.last_layer(z), z @ w.T, atol=1e-5)


# ---------------------------------------------------------------------------- training steps
def one_step(args, crops, world=1, amp="none"):
    torch.manual_seed(0)
    m = dora.build_models(args, torch.device("cpu"), steps_per_epoch=4, world_size=world)
    it = 5  # epoch 1: past the frozen last layer and the lr warm-up
    stats = dora.train_step(m, crops, it, 1, args, data.autocast("cpu", amp))
    return m, stats


def _ddp_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    args = tiny_args("--batch-size-per-gpu", "2")
    crops = [c[2 * rank:2 * rank + 2] for c in random_crops(4, args)]  # this rank's half of the global batch
    m, _ = one_step(args, crops, world=2)
    if rank == 0:
        torch.save({"student": m["student"].state_dict(), "teacher": m["teacher"].state_dict(),
                    "center": m["loss"].center}, out_file)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_equal_one(tmp_path, monkeypatch):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path / "ddp.pth")), nprocs=2, join=True)
    two = torch.load(tmp_path / "ddp.pth", weights_only=True)
    args = tiny_args("--batch-size-per-gpu", "4")  # the same global batch, and so the same lr, in one process
    whole = dora.track_objects  # each rank thresholds its masks at its own batch's mean (official utils.MOT), so
    monkeypatch.setattr(dora, "track_objects", lambda p, k: tuple(  # the reference does it per half of the batch
        torch.cat(t) for t in zip(whole(p[:2], k[:2]), whole(p[2:], k[2:]))))
    m, _ = one_step(args, random_crops(4, args))
    # AdamW's first steps move each weight by about lr * sign(grad): where a gradient is ~0, summation-order noise
    # can flip its sign (this CPU: 2.6e-6 on 1 of the 4.2M head weights), so allow that on a few weights, not on many
    for net in ("student", "teacher"):
        for k, v in m[net].state_dict().items():
            off = (v - two[net][k]).abs()
            assert off.max() < 2e-5 and (off > 2e-6).float().mean() < 1e-3, (net, k, off.max().item())
    assert torch.allclose(m["loss"].center, two["center"], atol=1e-7)


def test_bf16_step_on_cpu():
    args = tiny_args("--amp", "bf16")
    crops = random_crops(2, args)
    torch.manual_seed(0)
    before = [p.detach().clone() for p in dora.build_models(args, torch.device("cpu"), 4)["student"].parameters()]
    m, stats = one_step(args, crops, amp="bf16")
    _, ref_stats = one_step(tiny_args(), crops)  # the same step in float32
    assert np.isfinite(stats["loss"]) and abs(stats["loss"] - ref_stats["loss"]) < 0.05 * ref_stats["loss"]
    moved = [not torch.equal(a, b) for a, b in zip(m["student"].parameters(), before)]
    assert all(moved[:-1])  # every trained parameter changed (the last layer's fixed norm g stays)


def test_loss_halves_and_center():
    args = tiny_args()
    loss_fn = dora.DoRALoss(args)
    teacher = torch.randn(2, 3, 256)
    same = teacher * 2.5  # student logits / 0.1 = teacher logits / 0.04: the target itself
    loss, masked, local, teacher_entropy = loss_fn(same.expand(3, -1, -1, -1), torch.randn(2, 2, 3, 256), teacher,
                                                   epoch=1)
    target = F.softmax(teacher / 0.04, -1)
    entropy = -(target * target.clamp(min=1e-30).log()).sum(-1).mean()
    assert torch.allclose(masked, entropy, atol=1e-4) and local > masked
    assert torch.allclose(teacher_entropy, entropy, atol=1e-5)
    w = torch.tensor([1 + 1 / 3 + 1 / 9, 1 + 1 / 3, 1]) / 3  # official weights of 3 objects over 3 frames
    assert torch.allclose(dora.DoRALoss.object_weights(3, 3), w)
    assert torch.allclose(loss, w.sum() * (0.5 * masked + 0.5 * local))  # equal objects
    assert torch.allclose(loss_fn.center, 0.1 * teacher.flatten(0, 1).mean(0, keepdim=True), atol=1e-6)
    flat_teacher = torch.zeros(2, 3, 256)  # the same logit for every output: a uniform target
    flat = dora.DoRALoss(args)(same.expand(3, -1, -1, -1), same[None], flat_teacher, epoch=1)[3]
    assert abs(flat.item() - math.log(256)) < 1e-4


def hand_loss(k, local_logits, masked_logits, paper=0):
    """DoRALoss on 1 clip of 2 frames, 2 outputs, a uniform teacher: (loss, grad of the local logits)."""
    args = tiny_args("--out-dim", "2", "--paper-loss", str(paper))
    local = torch.tensor(local_logits).reshape(2, 1, 2, 2).mul(0.1).requires_grad_()  # (L, B, T, O); /0.1 inside
    masked = torch.tensor(masked_logits).reshape(k, 1, 2, 2).mul(0.1)
    loss = dora.DoRALoss(args)(masked, local, torch.zeros(1, 2, 2), epoch=1)[0]
    return loss.item(), torch.autograd.grad(loss, local)[0]


def test_official_loss_skips_local_crop_0_by_hand():
    ln2, l3, l9 = math.log(2), math.log(3), math.log(9)
    ce3, ce9 = 0.5 * math.log(16 / 3), 0.5 * math.log(100 / 9)  # -½ ln p - ½ ln(1-p) for p = 3/4, 9/10
    # 1 object, frames 0 and 1: masked (0, 0) then (ln 3, 0); local crop 0 (ln 9, 0), crop 1 (ln 3, 0) in both
    local, masked = [[l9, 0, l9, 0], [l3, 0, l3, 0]], [[0, 0, l3, 0]]
    loss, grad = hand_loss(1, local, masked)
    assert abs(loss - (0.5 * (ln2 + ce3) + 0.5 * (ce3 + ce3)) / 2) < 1e-6  # crop 0 is not in it
    assert (grad[0] == 0).all() and (grad[1] != 0).all()
    loss, grad = hand_loss(1, local, masked, paper=1)
    both = (ce9 + ce3) / 2
    assert abs(loss - (0.5 * (ln2 + both) + 0.5 * (ce3 + both)) / 2) < 1e-6
    assert (grad[0] != 0).all()


def test_official_loss_carries_the_frame_sum_across_objects_by_hand():
    """Object i weighs (1 + 1/T + ... + 1/T^(k-1-i)) / k; at the paper's k = 3, T = 8: 0.380, 0.375, 0.333, sum 1.089,
    so the official loss is 9 % above the paper's plain mean (--paper-loss 1)."""
    ln2, ce3 = math.log(2), 0.5 * math.log(16 / 3)
    # 2 objects over 2 frames, local terms ln 2: object 0's frame mean F0 = ln 2, object 1's F1 = ½ (ce3 + ln 2)
    local, masked = [[0, 0, 0, 0]] * 2, [[0, 0, 0, 0], [math.log(3), 0, math.log(3), 0]]
    f0, f1 = ln2, 0.5 * (ce3 + ln2)
    assert abs(hand_loss(2, local, masked)[0] - (f0 + (f0 / 2 + f1)) / 2) < 1e-6  # R_1 = R_0 / T + F1
    assert abs(hand_loss(2, local, masked, paper=1)[0] - (f0 + f1) / 2) < 1e-6


def test_official_mask_threshold_is_the_batch_mean_of_unit_maps():
    """Official utils.MOT: each map / its L2 norm, kept above the mean over the batch (per object and frame)."""
    maps = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.28, 0.24, 0.24, 0.24]])  # a peaked and a flat map
    keys = maps.log().reshape(2, 1, 4, 1)  # one frame, D = 1: logits = keys, softmax = maps
    got_maps, masks = dora.track_objects(torch.ones(2, 1, 1), keys)
    assert torch.allclose(got_maps[:, 0, 0], maps, atol=1e-6)
    # unit maps: (7, 1, 1, 1) / √52 and (28, 24, 24, 24) / √2512, mean (10/√52 + 100/√2512) / 8 = 0.423
    assert masks[:, 0, 0].tolist() == [[True, False, False, False], [True, True, True, True]]
    alone = dora.track_objects(torch.ones(1, 1, 1), keys[1:])[1]  # the flat map alone: its own mean, 0.25 in maps
    assert alone[0, 0, 0].tolist() == [True, False, False, False]


def test_heads_come_in_draw_order():
    """Official utils.MOT keeps random.sample's order; the loss weighs object 0 most, so sorting would favour head 0."""
    firsts = [dora.choose_heads(tiny_args(), 6, it)[0] for it in range(60)]
    assert len(set(firsts)) == 6 and max(firsts.count(h) for h in range(6)) < 20  # each head leads about 10 times


def test_log_has_teacher_entropy():
    args = tiny_args()
    _, stats = one_step(args, random_crops(2, args))
    assert 0.0 <= stats["teacher_entropy"] <= math.log(args.out_dim) + 1e-4


# ---------------------------------------------------------------------------- the demo on one's own video
def test_demo_trains_on_ones_own_video_and_evaluates_on_the_eval_data_folder(tmp_path):
    # `dora.py --demo --data my_walk.mp4` once crashed after training: it took the video's folder for the world.
    # Here the benchmarks come from --eval-data, a folder laid out like the world: none is written to runs/synth
    video = own_video_and_tiny_world(tmp_path, world="bench")
    result = run_demo("dora", tmp_path, "--data", video, "--eval-data", "bench", "--output-dir", "out",
                      "--image-size", "32", "--precrop-size", "40", "--epochs", "1", "--batch-size-per-gpu", "2",
                      "--frames-per-clip", "2", "--step-between-clips", "2", "--clip-start-every", "8",
                      "--num-workers", "0", "--out-dim", "64", "--local-crops-number", "1")
    assert (tmp_path / "out" / "checkpoint.pth").exists() and (tmp_path / "out" / "tracking_0.png").exists()
    assert result["train_data"] == [video] and result["eval_data"] == "bench" and not (tmp_path / "runs").exists()
    assert {"init/knn/k20/top1", "dora/knn/k20/top1", "dora/seg_cluster/k7_hungarian", "dora/davis/J&F"} <= set(result)


# ---------------------------------------------------------------------------- resume
def write_frames(folder, n=14, size=48):
    os.makedirs(folder)
    g = np.random.default_rng(0)
    base = (g.random((size, size * 2, 3)) * 255).astype(np.uint8)
    for i in range(n):  # a panning camera over a random texture
        Image.fromarray(base[:, i * 2:i * 2 + size]).save(os.path.join(folder, f"{i:05d}.png"))


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_frames(tmp_path / "video")
    common = ["--data", str(tmp_path / "video"), "--clip-start-every", "3", "--log-every", "1"]
    full = tiny_args(*common, "--output-dir", str(tmp_path / "full"))
    dora.train(full)
    part = tiny_args(*common, "--output-dir", str(tmp_path / "part"), "--stop-after", "1")
    dora.train(part)
    assert data.load_checkpoint(tmp_path / "part" / "checkpoint.pth")["epoch"] == 1
    dora.train(tiny_args(*common, "--output-dir", str(tmp_path / "part"), "--resume"))
    a = data.load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    b = data.load_checkpoint(tmp_path / "part" / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] and a["method"] == "dora"
    for key in ("model", "teacher"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    assert torch.equal(a["center"], b["center"])
    backbone = dora.build_backbone(a["args"])  # what evaluate.py does with a checkpoint
    backbone.load_state_dict({k[9:]: v for k, v in a["teacher"].items() if k.startswith("backbone.")}, strict=True)


def test_device_photometric_draws_what_the_cpu_path_draws():
    args = dora.get_args(["--data", "x"])
    torch.manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(400, 3, 3, 3), size=(12, 12), mode="bilinear")
    cpu = torch.stack([dora.ClipAugmentation(args).photometric(x, 0.5) for x in images])
    device = dora.ClipAugmentation.photometric_batch(images, 0.5)
    for x in (cpu, device):
        assert x.shape == (400, 3, 12, 12)
    stats = [(x.std(1).amax((1, 2)) < 1e-4, x[:, :, 1:] - x[:, :, :-1]) for x in (cpu, device)]
    assert abs(stats[0][0].float().mean() - stats[1][0].float().mean()) < 0.07  # grayscale p 0.2 (+ jitter's)
    assert abs(cpu.mean() - device.mean()) < 0.06 and abs(cpu.std() - device.std()) < 0.06
    assert abs(stats[0][1].abs().mean() / stats[1][1].abs().mean() - 1) < 0.1  # blur p 0.5, sigma 0.1-2


def test_demo_on_ones_own_video_in_two_pieces_equals_one_run(tmp_path, monkeypatch):
    # `dora.py --demo --data my_walk.mp4 --epochs 2` vs `--stop-after 1` then `--resume`, through main: the demo's 2
    # DataLoader workers and their per-clip draws, and the pictures and evaluation after each piece; equal weights
    monkeypatch.setattr(data, "demo_eval_root", lambda *a, **k: str(tmp_path))  # the evaluation is stubbed below
    monkeypatch.setattr(evaluate, "run_suite", draw_from_every_stream)
    monkeypatch.setattr(dora, "tracking_picture", lambda *a: draw_from_every_stream() or (0.0, 0.0))
    straight, pieces = one_run_and_two_pieces(dora, tmp_path, "--data", own_noisy_video(tmp_path / "walk.mp4"),
                                              "--image-size", "32", "--precrop-size", "40", "--frames-per-clip", "2",
                                              "--step-between-clips", "2", "--clip-start-every", "8",
                                              "--batch-size-per-gpu", "2", "--out-dim", "64",
                                              "--local-crops-number", "1")
    assert straight["step"] == pieces["step"] == 4
    for part in ("model", "teacher"):
        for k, v in straight[part].items():
            assert torch.equal(v, pieces[part][k]), (part, k)
    assert torch.equal(straight["center"], pieces["center"])


def test_bench_prints_the_loader_and_step_rates_and_their_ratio(tmp_path, capsys, monkeypatch):
    """--bench N (data.bench_train): one JSON line whose ratio is the loader's rate x workers over the step's rate;
    no checkpoint, no training."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    write_frames(tmp_path / "video")
    args = tiny_args("--data", str(tmp_path / "video"), "--clip-start-every", "3", "--output-dir",
                     str(tmp_path / "out"), "--bench", "2")
    dora.main(args)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"loader_items_per_s_per_worker", "workers", "step_s", "images_per_s", "peak_memory_gib",
            "ratio"} <= set(result)
    assert result["step_s"] > 0 and result["loader_items_per_s_per_worker"] > 0
    items_per_s = result["images_per_s"] / args.frames_per_clip
    assert math.isclose(result["ratio"], result["loader_items_per_s_per_worker"] * result["workers"] / items_per_s,
                        rel_tol=1e-6)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def ramp_crop_stats(crops):
    """(N, 3, h, w) crops of a frame whose channels 0 and 1 ramp left-right and top-bottom: per crop the box's width,
    height and centre as fractions of the frame, and whether it is flipped (N, 5)."""
    x, y = crops[:, 0], crops[:, 1]
    w, h = x.amax((1, 2)) - x.amin((1, 2)), y.amax((1, 2)) - y.amin((1, 2))
    return torch.stack([w, h, x.mean((1, 2)), y.mean((1, 2)), (x[:, :, -1] < x[:, :, 0]).float().mean(1)], 1)


def test_device_crops_draw_what_the_cpu_path_draws(monkeypatch):
    """The GPU run's split: the loader hands over the uint8 300-px crop, finish() makes the global clip (one box and
    flip per clip, bilinear) and the local crops (a box per frame and crop, bicubic antialiased, no flip) on the
    device. Colours off (the test above pins them), the first crop the whole frame: over 300 clips, the crops' widths,
    heights, centres and flips have the CPU path's means and spreads; the clip's frames share the global box."""
    monkeypatch.setattr(dora.ClipAugmentation, "photometric", lambda self, x, p: x)
    monkeypatch.setattr(dora.ClipAugmentation, "photometric_batch", staticmethod(lambda x, p: x))
    args = tiny_args("--local-crops-number", "4", "--precrop-scale", "1", "1", "--precrop-size", "64")
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8)
    frame = torch.stack([ramp.expand(64, 64), ramp[:, None].expand(64, 64), torch.zeros(64, 64, dtype=torch.uint8)])
    clip = frame.expand(2, 3, 64, 64)
    cpu_aug, device_aug = dora.ClipAugmentation(args), dora.ClipAugmentation(args, on_device=True)
    torch.manual_seed(0)
    cpu = [torch.stack(c) for c in zip(*[cpu_aug(clip) for _ in range(300)])]
    loaded = torch.stack([device_aug(clip)[0] for _ in range(300)])
    assert loaded.dtype == torch.uint8 and loaded.shape == (300, 2, 3, 64, 64)
    device = device_aug.finish([loaded], torch.device("cpu"))
    assert [c.shape for c in device] == [c.shape for c in cpu]
    cpu = [ramp_crop_stats(cpu[0].flatten(0, 1)), ramp_crop_stats(torch.cat(cpu[1:]).flatten(0, 1))]
    device = [ramp_crop_stats(device[0].flatten(0, 1)), ramp_crop_stats(torch.cat(device[1:]).flatten(0, 1))]
    for c, d in zip(cpu, device):
        assert ((c.mean(0) - d.mean(0))[:4].abs() < 0.02).all() and ((c.std(0) - d.std(0))[:4].abs() < 0.02).all()
        area = [(x[0::2, 0] * x[0::2, 1]) for x in (c, d)]  # one frame a clip: its 2 frames share the global box
        assert abs(area[0].mean() - area[1].mean()) < 3 * ((area[0].var() + area[1].var()) / len(area[0])).sqrt()
    assert 0.4 < device[0][:, 4].mean() < 0.6 and device[1][:, 4].max() == cpu[1][:, 4].max() == 0  # flips: global
    assert torch.equal(device[0][0::2], device[0][1::2])  # one box for a clip's frames
