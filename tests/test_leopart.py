"""Tests for leopart.py (CPU, seconds each): weights, boxes and RoI-align, the fg mask, DDP,
bf16 and exact resume."""
import contextlib
import copy
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torchvision.ops import roi_align

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import leopart as L  # noqa: E402
from conftest import (draw_from_every_stream, one_run_and_two_pieces, own_photos,  # noqa: E402
                      own_video_and_tiny_world, run_demo)

torch.set_num_threads(1)


def tiny_args(*extra):
    return L.get_args(["--data", "unused", "--arch", "vit_demo", "--patch-size", "8", "--global-crops-size", "32",
                       "--local-crops-size", "16", "--proj-hidden-dim", "64", "--proj-dim", "32",
                       "--num-prototypes", "20", "--queue-length", "64", "--drop-path", "0",
                       "--num-workers", "0", "--batch-size-per-gpu", "4", *extra])


def tiny_model(args, seed=0):
    torch.manual_seed(seed)
    backbone = L.ARCHS[args.arch](args.patch_size, drop_path_rate=args.drop_path)
    head = L.LeopartHead(backbone.embed_dim, args.proj_hidden_dim, args.proj_dim, args.proj_layers, args.num_prototypes)
    student = L.LeopartNet(backbone, head)
    return student, copy.deepcopy(student).requires_grad_(False)


def smooth_image(h=96, w=128, seed=0):
    """uint8 (3, H, W) made of a few smooth blobs, so crops have something to agree on."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 5, generator=g)
    return (torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=True)[0]
            .clamp(0, 1) * 255).to(torch.uint8)


def make_batch(args, n, seed=0):
    torch.manual_seed(seed)
    tf = L.LeopartCrops(args.global_crops_size, args.local_crops_size, args.global_crops_number,
                        args.local_crops_number, args.global_crops_scale, args.local_crops_scale)
    items = [tf(smooth_image(seed=seed + i)) for i in range(n)]
    crops = [torch.stack([it[0][c] for it in items]) for c in range(len(items[0][0]))]
    boxes = {k: torch.stack([it[1][k] for it in items]) for k in ("in_global", "in_crop")}
    return crops, boxes


# --------------------------------------------------------------------------- weights
def dino_key_names(depth):
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    return set(names)


def test_dino_weights_load_strict(tmp_path):
    torch.manual_seed(0)
    dino = L.vit_tiny(16)  # a DINO-architecture ViT (DeiT-Tiny width, DINO's vit_tiny): DINO's key names
    assert set(dino.state_dict()) == dino_key_names(12)
    x = torch.randn(2, 3, 64, 48)
    plain, full, ours = tmp_path / "plain.pth", tmp_path / "full.pth", tmp_path / "ours.pth"
    torch.save(dino.state_dict(), plain)  # like dino_deitsmall16_pretrain.pth
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in dino.state_dict().items()},
                            "head.last_layer.weight_g": torch.ones(3)},  # DINO's full checkpoint
                "student": {f"module.backbone.{k}": v for k, v in dino.state_dict().items()}}, full)
    torch.save({"method": "dora", "args": {}, "model": {}, "teacher": {f"backbone.{k}": v for k, v in
                                                                       dino.state_dict().items()}}, ours)
    for path in (plain, full, ours):
        fresh = L.vit_tiny(16)
        data.load_pretrained(fresh, str(path))
        with torch.no_grad():
            assert torch.equal(fresh(x), dino(x))
            assert torch.equal(fresh.get_last_selfattention(x), dino.get_last_selfattention(x))
    with pytest.raises(RuntimeError, match="--pretrained"):
        data.load_pretrained(L.vit_small(16), str(plain))


def test_one_pass_tokens_and_attention_equal_dino_s_calls():
    """tokens_and_attention (the teacher's one pass: the last block mixes through the explicit weights it returns)
    against DINO's calls (the fused kernel): the same attention, the same tokens up to float error."""
    torch.manual_seed(0)
    vit = L.vit_demo(8).eval()
    x = torch.randn(2, 3, 32, 24)  # 4 x 3 patches
    with torch.no_grad():
        tokens, attn = vit.tokens_and_attention(x)
        assert attn.shape == (2, 3, 13, 13) and torch.allclose(attn.sum(-1), torch.ones(2, 3, 13))
        assert torch.equal(attn, vit.get_last_selfattention(x))
        assert torch.allclose(tokens, vit.get_intermediate_layers(x)[0], atol=1e-5)
        assert torch.equal(vit(x), vit.get_intermediate_layers(x)[0][:, 0])


def test_teacher_initialised_independently(tmp_path):
    # official src/leopart.py init_model: the teacher is a second network with its own random draw and
    # no drop-path; --pretrained weights go into both backbones, the heads stay independent
    args = tiny_args("--drop-path", "0.1")
    torch.manual_seed(0)
    student_backbone = L.init_backbone(args)
    student_head = L.LeopartHead(student_backbone.embed_dim, args.proj_hidden_dim, args.proj_dim, args.proj_layers,
                                 args.num_prototypes)
    teacher = L.init_teacher(args)
    assert not torch.equal(teacher.head.prototypes.weight, student_head.prototypes.weight)
    assert not torch.equal(teacher.backbone.blocks[0].attn.qkv.weight, student_backbone.blocks[0].attn.qkv.weight)
    assert all(blk.drop_path.p == 0 for blk in teacher.backbone.blocks) and student_backbone.blocks[-1].drop_path.p > 0
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    torch.save(student_backbone.state_dict(), tmp_path / "w.pth")
    args = tiny_args("--pretrained", str(tmp_path / "w.pth"))
    teacher, again = L.init_teacher(args), L.init_teacher(args)
    for k, v in student_backbone.state_dict().items():
        assert torch.equal(teacher.backbone.state_dict()[k], v), k
    assert not torch.equal(teacher.head.prototypes.weight, again.head.prototypes.weight)


# --------------------------------------------------------------------------- boxes, RoI-align
def test_shifted_crop_sees_same_clusters():
    """Two crops of one label image, shifted by whole tokens; their token cluster maps, RoI-aligned
    onto the shared box, agree."""
    p = 8
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4, 4), generator=g).repeat_interleave(16, 0).repeat_interleave(16, 1)  # 64x64
    abs_boxes = torch.tensor([[0.0, 0, 48, 48], [16, 8, 64, 56]])
    in_global, in_crop = L.pair_boxes(abs_boxes, [48, 48], num_global=1)
    assert torch.equal(in_global[0, 1], torch.tensor([16.0, 8, 48, 48]))  # shared box in crop 0's pixels
    assert torch.equal(in_crop[0, 1], torch.tensor([0.0, 0, 32, 40]))  # ... and in crop 1's pixels

    def cluster_map(box):  # one-hot clusters of the crop's tokens (B=1, K=5, 6, 6)
        x1, y1, x2, y2 = [int(v) for v in box]
        tokens = labels[y1:y2, x1:x2][p // 2::p, p // 2::p]
        return torch.nn.functional.one_hot(tokens, 5).permute(2, 0, 1)[None].float()

    a = L.align(cluster_map(abs_boxes[0]), in_global[None, 0, 1], p)
    b = L.align(cluster_map(abs_boxes[1]), in_crop[None, 0, 1], p)
    assert a.shape == (1, 5, 7, 7)
    # Inside the box both crops see the same tokens; on the outer ring of bins one crop samples past
    # its own border (clamped), as in training, so only most of those agree.
    assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-6)
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.9


def test_crop_boxes_match_image_content():
    """With colour augmentation off, every crop pair shows the same image content in its shared box."""
    torch.manual_seed(0)
    tf = L.LeopartCrops(64, 32, 2, 4, (0.25, 1.0), (0.05, 0.25))
    tf.colour = torch.nn.Identity()
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 120), torch.linspace(0, 1, 160), indexing="ij")
    img = (torch.stack([xx, yy, (xx + yy) / 2]) * 255).to(torch.uint8)  # ramps: bilinear is exact on them
    for _ in range(5):
        crops, boxes = tf(img)
        for gi in range(2):
            for v in range(6):
                a = L.align(crops[gi][None], boxes["in_global"][None, gi, v], 1, 5)
                b = L.align(crops[v][None], boxes["in_crop"][None, gi, v], 1, 5)
                assert (a - b).abs().max() < 0.15, (gi, v)  # ~3 grey levels after normalisation


def test_crops_must_beat_the_officials_whole_number_intersection(monkeypatch):
    """Official leopart_transforms.py: intersection > int(1 % of the area), doubled between global crops. Image 25 x 30:
    int(7.5) * 2 = 14, so a second global crop meeting the first in 15 pixels is kept (15 > 2 * 7.5 would reject it),
    one meeting it in 14 is drawn again."""
    tf = L.LeopartCrops(8, 4, 2, 1, min_intersection=0.01, on_device=True)
    img, first = torch.zeros(3, 25, 30, dtype=torch.uint8), [0, 0, 10, 10]
    draws = iter([(7, 5, 3, 10), (8, 0, 2, 7), (0, 2, 9, 9)])  # (top, left, h, w): 5 x 3 = 15 px, 7 x 2 = 14 px
    monkeypatch.setattr(L.T.RandomResizedCrop, "get_params", lambda *a: next(draws))
    assert tf.sample_box(img, 1, [first]) == [5, 7, 15, 10]
    assert tf.sample_box(img, 1, [first]) == [2, 0, 11, 9]


# --------------------------------------------------------------------------- Sinkhorn, fg mask
def test_sinkhorn_balances_prototypes():
    scores = torch.nn.functional.normalize(torch.randn(512, 16), dim=1) @ \
        torch.nn.functional.normalize(torch.randn(16, 8), dim=0)
    q = L.sinkhorn_online(scores, 0.05, 50)
    assert torch.allclose(q.sum(1), torch.ones(512), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((8,), 64.0), rtol=1e-3)
    q3 = L.sinkhorn_online(scores, 0.05, 3)  # the training setting: close to balanced already
    assert (q3.sum(0) / 64 - 1).abs().max() < 0.5


@pytest.mark.parametrize("mass", [0.3, 0.6, 0.9])
def test_fg_mask_keeps_requested_mass(mass):
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(4, 14, 14, generator=g) ** 4
    keep = L.foreground_mask(attn, mass=mass, sigma=0.6, min_size=1)
    blurred = L.TF.gaussian_blur(attn[:, None], [7, 7], [0.6, 0.6])[:, 0]
    blurred = blurred / blurred.sum(dim=(1, 2), keepdim=True)
    for b in range(4):
        kept = blurred[b][keep[b]]
        assert kept.sum() >= mass - 1e-6  # at least the requested mass ...
        assert kept.sum() - kept.min() < mass  # ... with the fewest tokens
        assert kept.min() >= blurred[b][~keep[b]].max()  # the most-attended ones
    # Dropping components below 3 tokens: an isolated peak goes, a blob stays.
    attn = torch.zeros(1, 14, 14)
    attn[0, 3:8, 3:8], attn[0, 12, 12] = 1.0, 5.0
    assert not L.foreground_mask(attn, mass=0.99, sigma=0.01)[0, 12, 12]
    assert L.foreground_mask(attn, mass=0.99, sigma=0.01)[0, 5, 5]


def test_foreground_bins_as_official():
    # official spatial_loss: roi_align(mask, boxes / p, 7, aligned=True) >= 1.0. On an all-foreground
    # map, float error leaves one bin of this box at 0.99999994: dropped there, so dropped here
    fg = torch.ones(1, 14, 14, dtype=torch.bool)
    box = torch.tensor([[10.0, 12.0, 37.0, 41.0]])
    official = roi_align(fg[:, None].float(), [box / 16], 7, aligned=True)[:, 0] >= 1.0
    kept = L.foreground_bins(fg, box, 16)
    assert torch.equal(kept.bool(), official) and kept.sum() == 48
    fg[:, :, 3:] = False  # foreground: token columns 0-2 = pixels 0-47; the box spans x 10-37
    assert L.foreground_bins(fg, box, 16).sum() == 48
    fg[:, :, 2:] = False  # now pixels 0-31 only: bins reaching past x = 32 drop out
    kept = L.foreground_bins(fg, box, 16)
    assert torch.equal(kept.bool(), roi_align(fg[:, None].float(), [box / 16], 7, aligned=True)[:, 0] >= 1.0)
    assert 0 < kept.sum() < 48


@pytest.mark.parametrize("mask", ["all", "fg"])
def test_target_entropy_is_the_loss_floor(mask):
    """CE(target, student) = H(target) + KL >= H(target), with H averaged over the same bins as the loss."""
    args = tiny_args("--loss-mask", mask)
    crops, boxes = make_batch(args, 4)
    student, teacher = tiny_model(args)
    criterion = L.LeopartLoss(args)
    with torch.no_grad():
        t_embs, t_scores, t_attns = teacher(crops[:args.global_crops_number], with_attention=mask != "all")
        _, s_scores, _ = student(crops)
    loss, target_entropy = criterion(s_scores, t_embs, t_scores, t_attns, boxes, student.head.prototypes.weight)
    assert 0 < target_entropy <= loss.item() + 1e-5
    uniform = [torch.zeros_like(s) for s in s_scores]  # a student that predicts nothing: loss = ln K exactly
    loss, target_entropy = criterion(uniform, t_embs, t_scores, t_attns, boxes, student.head.prototypes.weight)
    assert abs(loss.item() - math.log(args.num_prototypes)) < 1e-4
    assert target_entropy < loss.item() - 0.01  # Sinkhorn's targets are not uniform


# --------------------------------------------------------------------------- steps: DDP, bf16
def one_step(args, crops, boxes, student, teacher, autocast=contextlib.nullcontext()):
    criterion = L.LeopartLoss(args, torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)  # plain SGD: the update is the gradient
    state = L.TrainState(student, teacher, criterion, optimizer, torch.amp.GradScaler("cpu", enabled=False), autocast,
                         torch.device("cpu"))
    return L.train_step(state, crops, boxes, momentum=0.9)["loss"]


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    args = tiny_args("--loss-mask", "fg")
    crops, boxes = make_batch(args, 8)
    half = slice(rank * 4, rank * 4 + 4)
    student, teacher = tiny_model(args)
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    loss = one_step(args, [c[half] for c in crops], {k: v[half] for k, v in boxes.items()}, ddp, teacher)
    torch.manual_seed(rank)  # per-rank seeds, as train(): the teacher's draw must still be rank 0's everywhere
    drawn = L.init_teacher(args).state_dict()
    torch.save({"loss": loss, "student": student.state_dict(), "teacher": teacher.state_dict(), "drawn": drawn},
               os.path.join(out_dir, f"rank{rank}.pth"))
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one(tmp_path):
    args = tiny_args("--loss-mask", "fg")
    crops, boxes = make_batch(args, 8)
    student, teacher = tiny_model(args)
    before = copy.deepcopy(student.state_dict())
    loss = one_step(args, crops, boxes, student, teacher)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    assert abs((r0["loss"] + r1["loss"]) / 2 - loss) < 1e-4  # ranks' losses average to the global one
    moved = 0
    for k, v in student.state_dict().items():
        assert torch.allclose(r0["student"][k], v, atol=1e-5), k
        assert torch.equal(r0["student"][k], r1["student"][k]), k
        assert torch.allclose(r0["teacher"][k], teacher.state_dict()[k], atol=1e-5), k
        moved += not torch.equal(v, before[k])
    assert moved > len(before) // 2  # the step did something
    assert all(torch.equal(r0["drawn"][k], r1["drawn"][k]) for k in r0["drawn"])


def test_bf16_autocast_step():
    args = tiny_args("--loss-mask", "fg")
    crops, boxes = make_batch(args, 4)
    s32, t32 = tiny_model(args)
    s16, t16 = tiny_model(args)
    loss32 = one_step(args, crops, boxes, s32, t32)
    loss16 = one_step(args, crops, boxes, s16, t16, torch.autocast("cpu", dtype=torch.bfloat16))
    assert np.isfinite(loss16) and abs(loss16 - loss32) < 0.05 * loss32
    assert all(torch.isfinite(p).all() for p in s16.parameters())
    initial = tiny_model(args)[0].backbone.blocks[0].attn.qkv.weight
    assert not torch.equal(s16.backbone.blocks[0].attn.qkv.weight, initial)


def test_step_stops_on_a_non_finite_loss_before_the_update():
    args = tiny_args("--loss-mask", "all")
    crops, boxes = make_batch(args, 4)
    crops[1][0] = float("nan")  # one broken crop
    student, teacher = tiny_model(args)
    before = copy.deepcopy(student.backbone.state_dict())
    with pytest.raises(FloatingPointError, match="loss is nan"):
        one_step(args, crops, boxes, student, teacher)
    assert all(torch.equal(v, before[k]) for k, v in student.backbone.state_dict().items())  # no update taken


# --------------------------------------------------------------------------- the demo on one's own video
def test_demo_trains_on_ones_own_video_and_evaluates_on_the_synthetic_world(tmp_path):
    # `leopart.py --demo --data my_walk.mp4`: its frames are the images (once: "1 images is fewer than one batch")
    video = own_video_and_tiny_world(tmp_path)
    result = run_demo("leopart", tmp_path, "--data", video, "--output-dir", "out", "--global-crops-size", "32",
                      "--local-crops-size", "16", "--local-crops-number", "1", "--epochs", "1",
                      "--batch-size-per-gpu", "8", "--num-workers", "0", "--video-frame-step", "1", "--eval-size", "32",
                      "--proj-hidden-dim", "32", "--proj-dim", "16", "--num-prototypes", "10", "--queue-length", "0",
                      "--k-fg", "10", "--k-community", "5")
    assert (tmp_path / "out" / "checkpoint.pth").exists() and (tmp_path / "out" / "cluster_maps_after.png").exists()
    assert result["train_data"] == video and result["eval_data"] == os.path.join("runs", "synth")
    for when in ("before", "after"):
        assert {"seg_cluster/k7_hungarian", "seg_linear/miou", "unsup/cd_miou"} <= set(result[when])


def test_one_corrupt_video_is_named_as_such(tmp_path):
    (tmp_path / "broken.mp4").write_bytes(os.urandom(3000))
    import data
    with pytest.raises(data.DataError, match="broken.mp4: corrupt"):
        data.ImagesOrFrames(str(tmp_path / "broken.mp4"), lambda img: img)


# --------------------------------------------------------------------------- resume
def write_images(folder, n=8):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(smooth_image(48, 64, seed=i).permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i}.png"))


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    pytest.importorskip("data")
    import data
    write_images(tmp_path / "images")
    common = ["--data", str(tmp_path / "images"), "--epochs", "2", "--loss-mask", "fg", "--queue-length", "16",
              "--drop-path", "0.1"]
    L.train(tiny_args(*common, "--output-dir", str(tmp_path / "straight")))

    real_save = data.save_checkpoint

    def save_then_crash(state, path):
        real_save(state, path)
        raise KeyboardInterrupt  # the run dies right after its first checkpoint

    monkeypatch.setattr(data, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        L.train(tiny_args(*common, "--output-dir", str(tmp_path / "resumed")))
    monkeypatch.setattr(data, "save_checkpoint", real_save)
    L.train(tiny_args(*common, "--output-dir", str(tmp_path / "resumed"), "--resume"))

    a = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"]
    for part in ("model", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert torch.equal(a["queue"], b["queue"])


def test_initial_weights_are_evaluated_after_training_so_no_rank_waits(tmp_path, monkeypatch):
    """Under torchrun, rank 0's demo evaluation of the initial weights before train() kept the other ranks
    waiting in the rendezvous: both evaluations now follow train(), and "before" is what train() started from."""
    write_images(tmp_path / "images", n=4)
    events, train = [], L.train
    monkeypatch.setattr(L, "train", lambda args: (events.append(("train", None)), train(args))[1])
    monkeypatch.setattr(L, "evaluate_backbone", lambda backbone, args, tag, pictures=False: events.append(
        (tag, backbone.state_dict()["pos_embed"].clone())) or {})
    args = tiny_args("--data", str(tmp_path / "images"), "--epochs", "1", "--output-dir", str(tmp_path / "out"))
    args.demo = True
    L.main(args)
    assert [tag for tag, _ in events] == ["train", "before", "after"]
    torch.manual_seed(args.seed)
    assert torch.equal(events[1][1], L.init_backbone(args).state_dict()["pos_embed"])


def test_fg_mask_drops_small_components_on_the_device_as_scipy_does():
    from scipy import ndimage
    torch.manual_seed(0)
    attn = torch.rand(64, 14, 14) ** 6  # peaky maps: many small components at mass 0.6
    kept = L.foreground_mask(attn, 0.6, 0.6, min_size=1).numpy()
    expected = kept.copy()
    for m in expected:  # the official post-processing: 8-connected components of <= 2 tokens dropped
        labels, n = ndimage.label(m, structure=np.ones((3, 3)))
        m[(np.bincount(labels.ravel(), minlength=n + 1) < 3)[labels] & (labels > 0)] = False
    assert (kept != expected).sum() > 20  # the case matters
    assert np.array_equal(L.foreground_mask(attn, 0.6, 0.6).numpy(), expected)


def test_demo_on_ones_own_photos_in_two_pieces_equals_one_run(tmp_path, monkeypatch):
    # `leopart.py --demo --data my_photos --epochs 2` vs `--stop-after 1` then `--resume`, through main: the demo's
    # DataLoader worker, the evaluations after each piece (stubbed: they draw from every stream); equal weights
    monkeypatch.setattr(data, "demo_eval_root", lambda *a, **k: str(tmp_path))  # the evaluation is stubbed below
    monkeypatch.setattr(L, "evaluate_backbone", draw_from_every_stream)
    straight, pieces = one_run_and_two_pieces(
        L, tmp_path, "--data", own_photos(tmp_path / "photos", n=8), "--global-crops-size", "32",
        "--local-crops-size", "16", "--local-crops-number", "1", "--batch-size-per-gpu", "4", "--proj-hidden-dim", "32",
        "--proj-dim", "16", "--num-prototypes", "10", "--queue-length", "16")
    assert straight["step"] == pieces["step"] == 4
    for part in ("model", "teacher"):
        for k, v in straight[part].items():
            assert torch.equal(v, pieces[part][k]), (part, k)
    assert torch.equal(straight["queue"], pieces["queue"])


def colour_stats(crops):
    """(N, 3, h, w) normalised crops -> (N, 4): mean, spread, gray (channels equal), sharpness (mean |dx|)."""
    x = crops * torch.tensor(L.STD).view(3, 1, 1) + torch.tensor(L.MEAN).view(3, 1, 1)
    gray = (x.std(1).amax((1, 2)) < 2e-3).float()
    return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), gray, (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))], 1)


def test_device_colours_draw_what_the_cpu_path_draws():
    """A GPU run: the loader hands over the uint8 crops (the same boxes, cut the same way) and finish() adds colour
    jitter (0.8, 0.8, 0.8, 0.2; p 0.8), grayscale p 0.2 and blur p 0.5 (σ 0.1-2, the global crops' kernel) on the
    device, batched. Over 200 images each crop's mean, spread, gray and sharpness match the CPU path's (3 sigma)."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 24, 32), generator=g, dtype=torch.uint8).repeat_interleave(2, 1)
    image = image.repeat_interleave(2, 2)  # texture at 2 px: the blur shows
    cpu_tf, device_tf = (L.LeopartCrops(40, 16, 2, 2, on_device=on) for on in (False, True))
    for tf in (cpu_tf, device_tf):  # colours off, the same seed: the same uint8 crops and boxes
        colour, tf.colour = tf.colour, torch.nn.Identity()
        torch.manual_seed(0)
        crops, boxes = tf(image)
        tf.colour = colour
        if tf is cpu_tf:
            cpu_crops, cpu_boxes = crops, boxes
    assert all(torch.equal(boxes[k], cpu_boxes[k]) for k in boxes) and crops[0].dtype == torch.uint8
    assert all(torch.equal(L.TF.normalize(c.float() / 255, L.MEAN, L.STD), d) for c, d in zip(crops, cpu_crops))
    torch.manual_seed(0)
    cpu = [torch.stack(c) for c in zip(*[cpu_tf(image)[0] for _ in range(200)])]
    loaded = [torch.stack(c) for c in zip(*[device_tf(image)[0] for _ in range(200)])]
    device, _ = device_tf.finish((loaded, boxes), torch.device("cpu"))
    for group in (slice(0, 2), slice(2, 4)):  # global crops, local crops
        c, d = colour_stats(torch.cat(cpu[group])), colour_stats(torch.cat(device[group]))
        sigma = ((c.var(0) + d.var(0)) / len(c)).sqrt()
        assert ((c.mean(0) - d.mean(0)).abs() < 3 * sigma + 1e-3).all(), (c.mean(0), d.mean(0))
