"""Tests for timetuning.py (CPU, small tensors): Feature-Forwarder, clip crops, DINO weights,
DDP equality, bf16, resume."""
import argparse
import copy
import os
import random
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import timetuning as tt  # noqa: E402
from conftest import (draw_from_every_stream, one_run_and_two_pieces, own_noisy_video,  # noqa: E402
                      own_video_and_tiny_world, run_demo)


# ----------------------------------------------------------------------------- Feature-Forwarder
def _sliding_clip(shift, frames=4, h=10, w=10, dim=64, seed=0):
    """A textured scene (random feature per position) seen through a window that moves `shift`
    patches right per frame; a 3x3 blob of label 1 lies inside the first window."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.randn(h, w + shift * frames, dim, generator=g)
    labels = torch.zeros(h, w + shift * frames, dtype=torch.long)
    labels[3:6, 5:8] = 1
    feats = torch.stack([scene[:, t * shift:t * shift + w] for t in range(frames)]).reshape(frames, h * w, dim)
    truth = torch.stack([labels[:, t * shift:t * shift + w] for t in range(frames)]).reshape(frames, h * w)
    seen_first = torch.stack([torch.arange(w) + t * shift < w for t in range(frames)])  # scene columns in frame 0
    return feats, truth, seen_first[:, None, :].expand(frames, h, w).reshape(frames, h * w)


def test_forwarder_moves_blob_with_translating_clip():
    feats, truth, seen = _sliding_clip(shift=1)
    first = F.one_hot(truth[0], 2).float()
    out = tt.feature_forwarder(feats[None], first[None], (10, 10), topk=5, radius=6, context=7)[0]
    pred = out[-1].argmax(-1)
    assert not torch.equal(truth[-1], truth[0])  # the blob did move (3 patches left)
    assert torch.equal(pred[seen[-1]], truth[-1][seen[-1]])  # ... and the labels went with it
    blob = (pred * seen[-1]).view(10, 10).nonzero()  # (content entering at the right edge is new)
    assert blob[:, 0].unique().tolist() == [3, 4, 5] and blob[:, 1].unique().tolist() == [2, 3, 4]  # cols 5..7 -> 2..4


def test_forwarder_is_noop_on_static_clip():
    feats, truth, _ = _sliding_clip(shift=0)
    soft = torch.softmax(torch.randn(100, 7, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    out = tt.feature_forwarder(feats[None], soft[None], (10, 10))[0]
    for t in range(1, 4):
        assert torch.equal(out[t].argmax(-1), soft.argmax(-1))
        assert torch.allclose(out[t], soft, atol=0.02)  # only other patches in the top-5 leak in, ~e^-6 each


def test_neighborhood_limits_sources():
    mask = tt.neighborhood_mask(10, 10, 2)
    assert mask.shape == (100, 100) and mask[0].sum() == 9 and mask[55].sum() == 25


# ----------------------------------------------------------------------------- clips, Sinkhorn, loss
def test_clip_crop_identical_across_frames():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    clip = image[None].repeat(4, 1, 1, 1)
    geometry_only = tt.ClipAugmentation(32, jitter_p=0, gray_p=0, blur_p=0)
    for _ in range(5):
        out = geometry_only(clip)
        assert out.shape == (4, 3, 32, 32)
        assert all(torch.equal(out[0], out[t]) for t in range(1, 4))  # one crop and flip for the clip
    jittered = tt.ClipAugmentation(32, jitter_p=1.0, gray_p=0, blur_p=0)
    for _ in range(5):  # official ColorJitter(per_frame=False): one draw for the whole clip
        out = jittered(clip)
        assert all(torch.equal(out[0], out[t]) for t in range(1, 4))
    colours = torch.tensor([[200, 100, 50], [10, 220, 90], [90, 30, 240], [250, 250, 0]], dtype=torch.uint8)
    grey = tt.ClipAugmentation(8, jitter_p=0, gray_p=0.5, blur_p=0)
    flat = colours[:, :, None, None].expand(4, 3, 8, 8)
    counts = {int(_pixels(grey(flat)).std(dim=1).amax(dim=(1, 2)).lt(1e-3).sum()) for _ in range(20)}
    assert counts == {0, 4}  # official RandomGrayscale(per_frame=False): all frames grey or none


def _pixels(out):
    """Normalised clip -> 0..255 values, undoing the official std 0.228 normalisation."""
    mean, std = torch.tensor(tt.MEAN)[:, None, None], torch.tensor((0.228, 0.224, 0.225))[:, None, None]
    return (out * std + mean) * 255


class _Draws:
    """Stands in for `random` in timetuning: every coin lands (0.0), the jitter factors are
    brightness 1.5, contrast 0.5, saturation 0.25, hue 0.1 (the official draw order), and
    `shuffle` orders the official list [brightness, saturation, hue, contrast]."""

    def __init__(self, shuffle):
        self.values, self.shuffle = iter([1.5, 0.5, 0.25, 0.1]), shuffle

    def random(self):
        return 0.0

    def uniform(self, a, b):
        return next(self.values)


def test_clip_jitter_applies_only_the_last_shuffled_adjustment(monkeypatch):
    """Official video_transformations.ColorJitter runs `jittered_img = func(img)` on the original
    frame for each shuffled adjustment, so only the last one acts. A flat (200, 100, 50) clip, grey
    level 0.2989*200 + 0.587*100 + 0.114*50 = 124.18."""
    clip = torch.tensor([200, 100, 50], dtype=torch.uint8)[None, :, None, None].expand(4, 3, 8, 8)
    expected = {  # hand-computed, one adjustment each
        "contrast": (lambda ops: None, [0.5 * 200 + 0.5 * 124, 0.5 * 100 + 0.5 * 124, 0.5 * 50 + 0.5 * 124]),
        "brightness": (lambda ops: ops.reverse(), [255, 150, 75]),  # 300 clamps at 255
        "saturation": (lambda ops: ops.append(ops.pop(1)), [0.25 * 200 + 0.75 * 124.18, 0.25 * 100 + 0.75 * 124.18,
                                                            0.25 * 50 + 0.75 * 124.18]),
    }
    for name, (shuffle, rgb) in expected.items():
        monkeypatch.setattr(tt, "random", _Draws(shuffle))
        out = _pixels(tt.ClipAugmentation(8, jitter_p=0.8, gray_p=0, blur_p=0)(clip))
        expected_rgb = torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand_as(out)
        assert torch.allclose(out, expected_rgb, atol=1.0), name
    black = tt.ClipAugmentation(8, jitter_p=0, gray_p=0, blur_p=0)(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    official_std = torch.tensor([-0.485 / 0.228, -0.456 / 0.224, -0.406 / 0.225])
    assert torch.allclose(black[0, :, 0, 0], official_std)


def test_clip_jitter_acts_at_source_resolution_before_the_resize(monkeypatch):
    """Official frame_transform runs before Resize(224): brightness x1.5 on 0/200 stripes clamps
    them to 0/255, whose 2x downscale is 127.5; jittered after the resize it would be 1.5 * 100 = 150."""
    monkeypatch.setattr(tt, "random", _Draws(lambda ops: ops.reverse()))  # brightness last
    stripes = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    stripes[..., 1::2] = 200
    out = _pixels(tt.ClipAugmentation(32, scale=(1.0, 1.0), jitter_p=0.8, gray_p=0, blur_p=0)(stripes))
    assert out.shape == (4, 3, 32, 32)
    assert (out[..., 4:-4, 4:-4] - 127.5).abs().max() < 1.0


def test_clip_frames_are_sorted_random_frames_of_the_whole_video():
    """Official data_loader.py (UNIFORM): 4 distinct sorted frames, uniform over the video."""
    rng = random.Random(0)
    draws = [tt.sample_frame_indices(100, 4, rng=rng) for _ in range(2000)]
    assert all(d == sorted(set(d)) and len(d) == 4 and 0 <= d[0] and d[-1] < 100 for d in draws)
    assert {i for d in draws for i in d} == set(range(100))  # every frame can be drawn
    # span of 4 of 100 drawn without replacement: E[max - min] = (n + 1)(k - 1)/(k + 1) = 101 * 3/5 = 60.6
    assert abs(np.mean([d[-1] - d[0] for d in draws]) - 60.6) < 1.5  # frames 3 apart: always 9
    assert tt.sample_frame_indices(100, rng=random.Random(7)) == tt.sample_frame_indices(100, rng=random.Random(7))
    short = tt.sample_frame_indices(2, 4, rng=rng)  # shorter than a clip: repeats (random.choices)
    assert short == sorted(short) and set(short) <= {0, 1}
    regular = tt.sample_frame_indices(100, 4, step=3, rng=rng)  # --frame-step: the official Regular mode
    assert np.diff(regular).tolist() == [3, 3, 3]
    assert np.diff(tt.sample_frame_indices(9, 4, step=3, rng=rng)).tolist() == [2, 2, 2]  # 9 // 4


def test_clip_dataset_reads_the_sampled_frames(tmp_path):
    os.makedirs(tmp_path / "vid")
    for t in range(30):  # frame t is a flat grey of value 8 t: the pixels tell which frame was read
        Image.fromarray(np.full((16, 16, 3), 8 * t, np.uint8)).save(tmp_path / "vid" / f"{t:05d}.jpg")
    videos = data.VideoClips(tmp_path, num_frames=1, clip_start_every=None)
    dataset = tt.RandomClipPerVideo(videos, num_frames=4, clips_per_video=3)
    assert len(dataset) == 3
    random.seed(1)
    read = [dataset[i][:, 0].float().mean(dim=(1, 2)).div(8).round().long().tolist() for i in range(3)]
    random.seed(1)
    assert read == [tt.sample_frame_indices(30, 4) for _ in range(3)]


def test_sinkhorn_runs_the_official_ten_iterations():
    """The official training call leaves get_loss at sinkhorn_iterations=10 (my_utils.sinkhorn)."""
    assert _args().sk_iters == 10
    scores = F.normalize(torch.randn(60, 8), dim=1) @ F.normalize(torch.randn(5, 8), dim=1).t()
    Q = torch.exp(scores.double() / 0.05).t()  # my_utils.sinkhorn, written out: (K, B)
    Q /= Q.sum()
    for _ in range(10):
        Q *= (1 / 5 / Q.sum(dim=1)).unsqueeze(1)
        Q *= (1 / 60 / Q.sum(dim=0)).unsqueeze(0)
    official = (Q * 60).t().float()
    assert torch.allclose(tt.sinkhorn_online(scores, 0.05), official, atol=1e-5)
    assert not torch.allclose(tt.sinkhorn_online(scores, 0.05, iters=3), official, atol=1e-3)


def test_sinkhorn_balances_patches_over_prototypes():
    scores = F.normalize(torch.randn(600, 384), dim=1) @ F.normalize(torch.randn(30, 384), dim=1).t()
    q = tt.sinkhorn_online(scores + 0.5 * torch.arange(30) / 30, eps=0.05, iters=3)  # skewed towards high ids
    assert torch.allclose(q.sum(1), torch.ones(600), atol=1e-5)
    assert (q.sum(0) - 20).abs().max() < 4  # ~600/30 per prototype despite the skew


# ----------------------------------------------------------------------------- weights
def _dino_vit_small_state(depth=12, dim=384, patch=16):
    """A state dict with the parameter names and shapes of DINO's ViT-S/16 release, built here
    independently of timetuning's ViT."""
    s = {"cls_token": torch.randn(1, 1, dim), "pos_embed": torch.randn(1, 197, dim),
         "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch), "patch_embed.proj.bias": torch.randn(dim),
         "norm.weight": torch.randn(dim), "norm.bias": torch.randn(dim)}
    for i in range(depth):
        for name, shape in [("norm1", (dim,)), ("norm2", (dim,))]:
            s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"] = torch.randn(shape), torch.randn(shape)
        for name, (o, n) in [("attn.qkv", (3 * dim, dim)), ("attn.proj", (dim, dim)),
                             ("mlp.fc1", (4 * dim, dim)), ("mlp.fc2", (dim, 4 * dim))]:
            s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"] = torch.randn(o, n), torch.randn(o)
    return s


def test_dino_weights_load_strict(tmp_path):
    state = _dino_vit_small_state()
    plain, full, repo = tmp_path / "dino.pth", tmp_path / "dino_full.pth", tmp_path / "repo.pth"
    torch.save(state, plain)  # the released backbone file
    torch.save({"teacher": {**{"backbone." + k: v for k, v in state.items()}, "head.mlp.0.weight": torch.randn(4, 4)},
                "student": {"module.backbone." + k: v for k, v in state.items()}, "epoch": 100}, full)
    torch.save({"method": "dora", "args": {"arch": "vit_small", "patch_size": 16},
                "model": {"backbone." + k: v for k, v in state.items()}, "head.last_layer.weight": torch.randn(2)},
               repo)
    for path in (plain, full, repo):
        vit = tt.build_model(_args(arch="vit_small", patch_size=16, pretrained=path)).backbone  # strict
        assert all(torch.equal(vit.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(data.CheckpointError, match="does not fit"):
        tt.build_model(_args(pretrained=plain))  # vit_demo/8


def test_attention_weights_are_the_ones_forward_mixes_with():
    """Attention.forward (the fused kernel) and Attention.weights (the explicit softmax, for pictures) are one
    attention; get_last_selfattention is the last block's, on its normed input."""
    torch.manual_seed(0)
    vit, x = tt.vit_demo(), torch.randn(2, 3, 32, 32)
    attn, tokens = vit.blocks[-1].attn, torch.randn(2, 17, 192)
    values = attn.qkv(tokens).reshape(2, 17, 3, 3, 64).permute(2, 0, 3, 1, 4)[2]
    mixed = attn.proj((attn.weights(tokens) @ values).transpose(1, 2).reshape(2, 17, 192))
    assert torch.allclose(attn(tokens), mixed, atol=1e-5)
    last = vit.get_last_selfattention(x)
    assert last.shape == (2, 3, 17, 17) and torch.allclose(last.sum(-1), torch.ones(2, 3, 17))
    before_last = vit.prepare_tokens(x)
    for blk in vit.blocks[:-1]:
        before_last = blk(before_last)
    assert torch.equal(last, attn.weights(vit.blocks[-1].norm1(before_last)))


def test_pretrained_checkpoint_of_another_run_brings_its_architecture(tmp_path, capsys):
    """Chaining the demos (`--demo --pretrained runs/dora/checkpoint.pth`): get_args only parses; train() builds the
    checkpoint's ViT, says so, loads its weights and records the architecture for evaluate.py."""
    torch.manual_seed(1)
    vit = tt.vit_demo(patch_size=8)
    torch.save({"method": "dora", "args": {"arch": "vit_demo", "patch_size": 8},
                "model": {"backbone." + k: v for k, v in vit.state_dict().items()}}, tmp_path / "demo.pth")
    root = _frame_folders(tmp_path / "frames", videos=1, frames=8)
    args = _args(tmp_path, root, epochs=1, arch="vit_small", patch_size=16, pretrained=tmp_path / "demo.pth")
    assert (args.arch, args.patch_size) == ("vit_small", 16)
    student = tt.train(args)[0]
    assert f"--pretrained {tmp_path / 'demo.pth'}: using its architecture vit_demo/8" in capsys.readouterr().out
    assert all(torch.equal(v, student.backbone.state_dict()[k]) for k, v in vit.state_dict().items()
               if not k.startswith(("blocks.2", "blocks.3")))  # the last two blocks trained
    saved = data.load_checkpoint(tmp_path / "out" / "checkpoint.pth")["args"]
    assert (saved["arch"], saved["patch_size"]) == ("vit_demo", 8)


# ----------------------------------------------------------------------------- training steps
def test_teacher_update_is_the_official_one():
    """time_tuning.py, update_momentum_teacher: teacher <- (1 - m) teacher + m student. train_step at m 0.995 with a
    zero learning rate (the student stays put): the teacher's head moves 99.5 % of the way to the student's."""
    args = _args(proj_dims=2, num_prototypes=2)
    student, teacher = _models(args)
    with torch.no_grad():
        for net, w, protos in ((teacher, 1.0, [[1.0, 0.0], [0.0, 1.0]]), (student, 3.0, [[0.0, 1.0], [1.0, 0.0]])):
            net.head.mlp[0].weight.fill_(w)
            net.head.mlp[0].bias.fill_(w)
            net.head.prototypes.copy_(torch.tensor(protos))
    official, paper = copy.deepcopy(teacher), copy.deepcopy(teacher)

    def step(teacher, paper_ema):
        optimizer = torch.optim.SGD(tt.param_groups(student, args), lr=0.0)
        tt.train_step(student, teacher, _batch(2), optimizer, data.make_scaler("none", "cpu"), 0.995,
                      argparse.Namespace(**{**vars(args), "paper_ema": paper_ema}), nullcontext())

    step(official, paper_ema=False)
    assert torch.allclose(official.head.mlp[0].weight, torch.full((2, 192), 0.005 * 1 + 0.995 * 3))  # 2.99
    n = (0.005 ** 2 + 0.995 ** 2) ** 0.5  # prototypes mixed, then re-normalised
    assert torch.allclose(official.head.prototypes, torch.tensor([[0.005, 0.995], [0.995, 0.005]]) / n)
    step(paper, paper_ema=True)  # --paper-ema
    assert torch.allclose(paper.head.mlp[0].bias, torch.full((2,), 0.995 * 1 + 0.005 * 3))  # 1.01
    assert torch.allclose(paper.head.prototypes, torch.tensor([[0.995, 0.005], [0.005, 0.995]]) / n)


def _args(tmp_path=None, data_root=None, **kw):
    argv = ["--data", str(data_root or "unused"), "--arch", "vit_demo", "--patch-size", "8", "--image-size", "32",
            "--proj-dims", "32", "16", "--num-prototypes", "10", "--batch-size-per-gpu", "2", "--num-workers", "0",
            "--clips-per-video", "2", "--epochs", "2", "--no-eval", "--log-every", "1"]
    if tmp_path is not None:
        argv += ["--output-dir", str(tmp_path / "out")]
    for k, v in kw.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return tt.get_args(argv)


def _models(args, seed=0):
    torch.manual_seed(seed)
    student = tt.build_model(args)
    tt.freeze_backbone(student.backbone, args.train_blocks)
    return student, copy.deepcopy(student).requires_grad_(False)


def _one_step(student, teacher, clips, args, autocast=nullcontext(), sgd=False):
    """The loop body of train() (tt.train_step: loss, backward, step, prototype re-normalisation, teacher update at
    m 0.9) -> (loss, the gradients stepped with). (SGD for exact comparisons: Adam's first step is lr*sign(g), which
    turns float noise in zero gradients, e.g. of the key biases, into lr-sized differences.)"""
    raw = student.module if isinstance(student, torch.nn.parallel.DistributedDataParallel) else student
    groups = tt.param_groups(raw, args)
    optimizer = torch.optim.SGD(groups, lr=0.5) if sgd else torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.04)
    grads = {}
    optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in raw.named_parameters() if p.grad is not None}))
    stats = tt.train_step(student, teacher, clips, optimizer, data.make_scaler("none", "cpu"), 0.9, args, autocast)
    return torch.tensor(stats["loss"]), grads


def _batch(n=4):
    return torch.randn(n, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _ddp_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    args = _args()
    student, teacher = _models(args)
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    clips = _batch()[rank::world]  # the same global batch, split between the ranks
    loss, grads = _one_step(ddp, teacher, clips, args, sgd=True)
    torch.distributed.all_reduce(loss)
    if rank == 0:
        torch.save({"model": student.state_dict(), "teacher": teacher.state_dict(), "grads": grads,
                    "loss": loss / world}, os.path.join(out_dir, "ddp.pth"))
    torch.distributed.destroy_process_group()


def test_cluster_pictures_name_rows_and_frames(tmp_path, monkeypatch):
    world = data.synth_world(str(tmp_path / "synth"), num_videos=1, num_frames=6, size=64, num_images=(2, 2),
                             crops_per_class=(1, 1), crop_size=32)
    calls, real = [], data.labelled_grid
    monkeypatch.setattr(data, "labelled_grid", lambda rows, *a, **k: calls.append((rows, a, k)) or real(rows, *a, **k))
    torch.manual_seed(0)
    model = tt.build_model(_args())
    tt.save_cluster_pictures(model.backbone, os.path.join(world, "davis"), str(tmp_path), 32, "cpu", k=3, columns=3,
                             tag="_init")
    *gif, (rows, (path, title, names, cols), _) = calls
    assert len(gif) == 6 and gif[2][2]["col_names"] == ["frame 2", "k-means, k=3"]  # one GIF frame per frame
    assert [[t.shape for t in r] for r in rows] == [[(3, 32, 32)] * 3] * 2  # the frames, their clusters
    assert names == ["tour_00:\nframes", "tour_00:\nclusters"] and cols == ["frame 0", "frame 2", "frame 5"]
    assert "init" in title and Image.open(path).size[1] > 2 * 32
    assert Image.open(tmp_path / "clusters_init_tour_00.gif").n_frames == 6


def test_ddp_two_processes_equal_one(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    args = _args()
    student, teacher = _models(args)
    clips = _batch()
    loss, grads = _one_step(student, teacher, torch.cat([clips[0::2], clips[1::2]]), args, sgd=True)
    ddp = torch.load(tmp_path / "ddp.pth", weights_only=True)
    assert torch.allclose(ddp["loss"], loss.detach(), atol=1e-6)
    assert grads.keys() == ddp["grads"].keys()
    for k, g in grads.items():
        assert torch.allclose(ddp["grads"][k], g, rtol=1e-4, atol=1e-7), f"grad {k}"
    for name, state in (("model", student.state_dict()), ("teacher", teacher.state_dict())):
        for k, v in state.items():
            assert torch.allclose(ddp[name][k], v, rtol=1e-4, atol=1e-6), f"{name}.{k}"
    assert not torch.equal(ddp["model"]["head.prototypes"], _models(args)[0].state_dict()["head.prototypes"])


def test_bf16_autocast_step():
    args = _args()
    student, teacher = _models(args)
    before = copy.deepcopy(student.state_dict())
    loss, _ = _one_step(student, teacher, _batch(), args, data.autocast(torch.device("cpu"), "bf16"))
    assert torch.isfinite(loss)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "head.prototypes" in changed and any(k.startswith("backbone.blocks.3") for k in changed)
    assert not any(k.startswith("backbone.blocks.0") for k in changed)  # official: only the last 2 blocks train


# ----------------------------------------------------------------------------- the demo on one's own video
def test_demo_trains_on_ones_own_video_and_evaluates_on_the_synthetic_world(tmp_path):
    # `timetuning.py --demo --data my_walk.mp4` once trained and then skipped its evaluation silently
    video = own_video_and_tiny_world(tmp_path)
    result = run_demo("timetuning", tmp_path, "--data", video, "--output-dir", "out", "--image-size", "32",
                      "--epochs", "1", "--batch-size-per-gpu", "2", "--clips-per-video", "2", "--num-frames", "2",
                      "--num-workers", "0",
                      "--proj-dims", "32", "16", "--num-prototypes", "10", "--eval-benches", "propagate")
    assert (tmp_path / "out" / "checkpoint.pth").exists()
    assert result["train_data"] == video and result["eval_data"] == os.path.join("runs", "synth")
    for when in ("init", "timet"):
        assert {"video_kmeans/clip_wise_miou", "davis/J&F"} <= set(result[when])


def test_demo_checks_the_eval_data_layout_before_training(tmp_path):
    (tmp_path / "mine" / "voc").mkdir(parents=True)
    with pytest.raises(data.DataError, match="mine/davis: no such folder"):
        tt.get_args(["--demo", "--data", "unused", "--eval-data", str(tmp_path / "mine"),
                     "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- resume
def _frame_folders(root, videos=2, frames=12, size=40):
    """YouTube-VOS layout: root/<video>/<00000.jpg ...>; a texture drifting right."""
    rng = np.random.default_rng(0)
    for v in range(videos):
        scene = rng.integers(0, 256, (size, size + frames * 2, 3), dtype=np.uint8)
        os.makedirs(root / f"vid{v}")
        for t in range(frames):
            Image.fromarray(scene[:, 2 * t:2 * t + size]).save(root / f"vid{v}" / f"{t:05d}.jpg")
    return root


class Interrupted(Exception):
    pass


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    root = _frame_folders(tmp_path / "frames")
    tt.train(_args(tmp_path / "a", root))
    save = data.save_checkpoint

    def save_then_die(state, path):  # the job is killed right after the checkpoint of epoch 1
        save(state, path)
        raise Interrupted

    monkeypatch.setattr(data, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        tt.train(_args(tmp_path / "b", root))
    monkeypatch.setattr(data, "save_checkpoint", save)
    args = _args(tmp_path / "b", root)
    args.resume = True
    tt.train(args)
    a = data.load_checkpoint(tmp_path / "a" / "out" / "checkpoint.pth")
    b = data.load_checkpoint(tmp_path / "b" / "out" / "checkpoint.pth")
    assert a["step"] == b["step"] == 4
    for name in ("model", "teacher"):
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}.{k}"
    assert len(open(tmp_path / "a" / "out" / "log.jsonl").read().splitlines()) == 4


def test_initial_weights_are_evaluated_after_training_so_no_rank_waits(tmp_path, monkeypatch):
    """Under torchrun, rank 0's evaluation of the initial weights before train() kept the other ranks waiting in
    the rendezvous (hours at full scale, past the group's timeout): both evaluations now follow train()."""
    root = _frame_folders(tmp_path / "frames", videos=1, frames=8)
    events, train = [], tt.train
    monkeypatch.setattr(tt, "train", lambda args: (events.append("train"), train(args))[1])
    monkeypatch.setattr(tt, "evaluate_backbone", lambda backbone, args, device, tag: events.append(tag) or {})
    args = _args(tmp_path, root, epochs=1, clips_per_video=2)
    args.no_eval, args.eval_data = False, str(tmp_path)
    tt.main(args)
    assert events == ["train", "_init", ""]


def test_demo_on_ones_own_video_in_two_pieces_equals_one_run(tmp_path, monkeypatch):
    # `timetuning.py --demo --data my_walk.mp4 --epochs 2` vs `--stop-after 1` then `--resume`, through main: the
    # demo's 2 DataLoader workers and their per-clip draws, the evaluations after each piece; equal weights
    monkeypatch.setattr(data, "demo_eval_root", lambda *a, **k: str(tmp_path))  # the evaluation is stubbed below
    monkeypatch.setattr(tt, "evaluate_backbone", draw_from_every_stream)
    tiny = "--image-size 32 --batch-size-per-gpu 2 --clips-per-video 4 --proj-dims 32 16 --num-prototypes 10".split()
    straight, pieces = one_run_and_two_pieces(tt, tmp_path, "--data", own_noisy_video(tmp_path / "walk.mp4"), *tiny)
    assert straight["step"] == pieces["step"] == 4
    for part in ("model", "teacher"):
        for k, v in straight[part].items():
            assert torch.equal(v, pieces[part][k]), (part, k)


def test_device_path_draws_what_the_cpu_path_draws():
    """A GPU run: the loader only decodes and hands over the uint8 clips (a list: videos differ in size); finish()
    runs the same steps on the device (the official noise acts at source resolution, before the resize), drawing on
    the host. Seeded alike, the two paths give the same clips; the batch's clips of two sizes each get their own."""
    clips = [torch.randint(0, 256, (4, 3, 40, 56), dtype=torch.uint8), torch.randint(0, 256, (4, 3, 48, 48),
                                                                                      dtype=torch.uint8)]
    cpu_aug, device_aug = tt.ClipAugmentation(16), tt.ClipAugmentation(16, on_device=True)
    assert device_aug(clips[0]) is clips[0] and device_aug.collate(clips) == clips
    outs = []
    for seed in range(20):
        random.seed(seed)
        torch.manual_seed(seed)
        cpu = cpu_aug.finish(cpu_aug.collate([cpu_aug(c) for c in clips]), torch.device("cpu"))
        random.seed(seed)
        torch.manual_seed(seed)
        device = device_aug.finish(device_aug.collate([device_aug(c) for c in clips]), torch.device("cpu"))
        assert device.shape == cpu.shape == (2, 4, 3, 16, 16) and torch.equal(device, cpu)
        outs.append(device)
    assert not torch.equal(outs[0], outs[1])
