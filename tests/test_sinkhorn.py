"""Tests for sinkhorn.py: the label step's maths, DDP equivalence, AMP, exact resume, learning."""
import itertools
import os
import socket
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sinkhorn  # noqa: E402
from conftest import (draw_from_every_stream, one_run_and_two_pieces, own_photos,  # noqa: E402
                      own_video_and_tiny_world, run_demo)


# ---------------------------------------------------------------- initialisation
def test_alexnet_init_as_official():
    # official models/alexnet.py _initialize_weights: conv N(0, sqrt(2 / (k k out))), BN 1 and 0,
    # linear N(0, 0.01) (fc6, fc7 and every head), all biases 0
    torch.manual_seed(0)
    net = sinkhorn.SeLaNet(sinkhorn.build_backbone({"arch": "alexnet"}), 2, 3000)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    # 2 / (11 11 96), 2 / (5 5 256), 2 / (3 3 384) twice, 2 / (3 3 256); conv5 was 0.0120 (PyTorch's)
    for m, std in zip(convs, [0.013122, 0.017678, 0.024056, 0.024056, 0.029463], strict=True):
        assert abs(m.weight.std().item() / std - 1) < 0.02 and abs(m.weight.mean().item()) < 0.1 * std
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 and all(abs(m.weight.std().item() / 0.01 - 1) < 0.02 for m in linears)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.weight.eq(1).all()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)):
            assert m.bias.eq(0).all()
    # ResNet keeps torchvision's init and its heads PyTorch's default, as the official resnetv2.py;
    # so does the demo's conv net (no official counterpart)
    for arch in ("resnet18", "convnet_demo"):
        assert not sinkhorn.SeLaNet(sinkhorn.build_backbone({"arch": arch}), 1, 18).heads[0].bias.eq(0).all()


# ---------------------------------------------------------------- Sinkhorn-Knopp maths
def test_offline_sk_meets_both_marginals():
    torch.manual_seed(0)
    log_probs = F.log_softmax(torch.randn(500, 20) * 3, dim=1)
    Q = sinkhorn.sinkhorn_knopp(log_probs, lam=25, tol=1e-6)
    assert torch.allclose(Q.sum(1), torch.full((500,), 1 / 500, dtype=torch.float64), rtol=1e-3)
    assert torch.allclose(Q.sum(0), torch.full((20,), 1 / 20, dtype=torch.float64), rtol=1e-3)
    # hard labels are (nearly) balanced: the point of the equipartition
    counts = torch.bincount(Q.argmax(1), minlength=20)
    assert counts.min() >= 15 and counts.max() <= 35


def test_offline_sk_survives_very_confident_predictions():
    # log-probs of -200 would underflow P**λ in float64; the per-row shift keeps it finite
    log_probs = torch.full((40, 4), -200.0)
    log_probs[torch.arange(40), torch.arange(40) % 4] = 0.0
    Q = sinkhorn.sinkhorn_knopp(log_probs, lam=25, tol=1e-6)
    assert torch.isfinite(Q).all()
    assert torch.equal(Q.argmax(1), torch.arange(40) % 4)


def test_offline_sk_matches_brute_force_optimal_transport():
    # 6 images, 3 clusters, 2 images each: enumerate every balanced labelling
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        log_probs = F.log_softmax(torch.randn(6, 3, generator=g) * 2, dim=1)
        best = max(set(itertools.permutations([0, 0, 1, 1, 2, 2])),
                   key=lambda y: sum(log_probs[i, y[i]].item() for i in range(6)))
        # near-hard optima converge slowly: 1e-5 takes 300k steps
        Q = sinkhorn.sinkhorn_knopp(log_probs, lam=25, tol=1e-3)
        assert tuple(Q.argmax(1).tolist()) == best


def test_online_sk_matches_offline_in_the_limit():
    torch.manual_seed(0)
    log_probs = F.log_softmax(torch.randn(300, 10) * 2, dim=1)
    offline = sinkhorn.sinkhorn_knopp(log_probs, lam=20, tol=1e-10) * 300  # rows sum to 1
    online = sinkhorn.sinkhorn_online(log_probs, eps=1 / 20, iters=2000)
    assert torch.allclose(online.double(), offline, atol=1e-4)
    # and 3 iterations (the per-batch form) already spreads a collapsed batch over clusters
    collapsed = torch.zeros(64, 8)
    collapsed[:, 0] = 1.0
    collapsed += 0.01 * torch.randn(64, 8)
    q = sinkhorn.sinkhorn_online(collapsed, eps=0.05, iters=3)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)
    assert len(q.argmax(1).unique()) > 4


def test_offline_sk_runs_to_tolerance_however_long():
    # no total support in the limit (image 1 all but forbids cluster 0): Sinkhorn-Knopp crawls,
    # 25,561 iterations to tol 1e-5; the old silent cap of 10,000 left columns 2.5e-5 off 1/2
    log_probs = torch.tensor([[0.0, 0.0], [np.log(1e-9) / 25, 0.0]], dtype=torch.float64)
    Q = sinkhorn.sinkhorn_knopp(log_probs, lam=25, tol=1e-5)
    assert torch.allclose(Q.sum(0), torch.full((2,), 0.5, dtype=torch.float64), atol=5e-6, rtol=0)
    # a cluster no image can reach has no equipartition: raise, never loop or return NaN labels
    with pytest.raises(FloatingPointError):
        sinkhorn.sinkhorn_knopp(torch.tensor([[0.0, -np.inf], [0.0, -np.inf]]), lam=25)


def test_label_schedule_as_official_main_py():
    # official main.py, ImageNet (N = 1,281,167), batch 256, --epochs 400, --nopts 100: update k when
    # iteration x 256 >= 401.01 N (k/99)², iterations counted 5005 per epoch (last batch short)
    steps = sinkhorn.label_update_steps(100, epochs=400, num_images=1281167, batch_size=256, steps_per_epoch=5004)
    assert len(steps) == 100 and steps[0] == 0
    assert steps[1] == 205  # 401.01 N / 99² = 52,419.2 images = 204.8 iterations
    assert divmod(steps[-2], 5004) == (392, 4580)  # 401.01 N (98/99)² / 256 = 1,966,539.8 -> 392 x 5005 + 4580
    assert divmod(steps[-1], 5004) == (400, 4879)  # 401.01 N / 256 = 2,006,878.04 -> 2,006,879 = 400 x 5005 + 4879
    assert (np.diff(steps) > 0).all() and np.diff(steps)[0] < np.diff(steps)[-1]  # dense early, sparse late
    # N a multiple of the batch: the count never overshoots, t = 1 (401.01 epochs) lies past the
    # 401 passes and only 99 updates happen, the last at 401.01 (98/99)² = 392.96 -> epoch 393
    steps = sinkhorn.label_update_steps(100, epochs=400, num_images=1000, batch_size=100, steps_per_epoch=10)
    assert len(steps) == 99 and steps[-1] == 3930 and steps[-2] == 3850  # 401.01 (97/99)² = 384.97 -> 385


def test_defaults_as_official():
    # official main.py and scripts/alexnet.sh: lr 0.08 (its help text says 0.05), x0.1 at 150, 300, 350,
    # wd 1e-5, batch 256, 400 epochs, 100 label updates, λ 25, 10 heads x 3000; the demo: cifar.py's 0.05
    a = sinkhorn.get_args(["--data", "unused"])
    assert (a.arch, a.optimizer, a.lr, a.momentum, a.weight_decay) == ("alexnet", "sgd", 0.08, 0.9, 1e-5)
    assert a.lr_milestones == [150, 300, 350]
    assert (a.batch_size_per_gpu, a.epochs, a.num_label_updates) == (256, 400, 100)
    assert (a.lam, a.num_heads, a.num_clusters) == (25, 10, 3000)
    assert sinkhorn.get_args(["--demo", "--data", "unused"]).lr == 0.05


# ---------------------------------------------------------------- training
def _tiny_folder(root, classes=3, per_class=8, size=24):
    """Classes that differ in pattern (stripes vs. checks vs. blobs), colours random."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    patterns = [(xx // 3) % 2, ((xx // 4) + (yy // 4)) % 2, ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 < 40)]
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = np.where(patterns[c][..., None].astype(bool), fg, bg).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"class_{c}", f"{i}.png"))
    return root


def _args(tmp_path, data_root, **kw):
    argv = ["--data", str(data_root), "--output-dir", str(tmp_path / "out"), "--arch", "vit_demo",
            "--patch-size", "8", "--image-size", "24", "--num-heads", "2", "--num-clusters", "3",
            "--epochs", "2", "--batch-size-per-gpu", "8", "--num-label-updates", "3", "--num-workers", "0",
            "--optimizer", "sgd", "--lr", "0.05", "--amp", "none", "--log-every", "1"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([str(v)] if v != "" else [])  # "" = a bare flag
    return sinkhorn.get_args(argv)


def _deterministic(size, scale=None):  # DDP equality needs the same pixels on 1 and 2 processes
    from torchvision.transforms import v2 as T
    return T.Compose([T.Resize((size, size), antialias=True), T.ToDtype(torch.float32, scale=True)])


def _ddp_worker(rank, world, port, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sinkhorn.train_transform = _deterministic
    model, labels, _ = sinkhorn.train(args)
    if rank == 0:
        torch.save({"model": model.state_dict(), "labels": labels.cpu()}, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_equals_one_process(tmp_path):
    root = _tiny_folder(str(tmp_path / "imgs"))
    one = _args(tmp_path / "a", root, epochs=1, batch_size_per_gpu=8)
    two = _args(tmp_path / "b", root, epochs=1, batch_size_per_gpu=4)  # 2 x 4 = the same global batch
    torch.multiprocessing.spawn(_ddp_worker, args=(1, _free_port(), one, str(tmp_path / "one.pt")), nprocs=1)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), two, str(tmp_path / "two.pt")), nprocs=2)
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.equal(a["labels"], b["labels"])
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5), k


def test_bf16_autocast_step_on_cpu(tmp_path):
    root = _tiny_folder(str(tmp_path / "imgs"))
    model, labels, _ = sinkhorn.train(_args(tmp_path, root, epochs=1, amp="bf16"))
    log = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    assert log and all(np.isfinite(__import__("json").loads(line)["loss"]) for line in log)
    assert labels.shape == (2, 24)


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    root = _tiny_folder(str(tmp_path / "imgs"))
    full, _, _ = sinkhorn.train(_args(tmp_path / "full", root, epochs=3))
    save = sinkhorn.data.save_checkpoint

    def save_then_die(state, path):  # the job is killed right after the first checkpoint
        save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(sinkhorn.data, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sinkhorn.train(_args(tmp_path / "cut", root, epochs=3))
    monkeypatch.setattr(sinkhorn.data, "save_checkpoint", save)
    resumed, _, _ = sinkhorn.train(_args(tmp_path / "cut", root, epochs=3, resume=""))
    for k, v in full.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k]), k


def test_demo_on_ones_own_photos_in_two_pieces_equals_one_run(tmp_path, monkeypatch):
    # `sinkhorn.py --demo --data my_photos --epochs 2` vs `--stop-after 1` then `--resume`, through main: the
    # label steps of the second piece and the evaluation after each piece must not change a weight
    monkeypatch.setattr(sinkhorn.data, "demo_eval_root", lambda *a, **k: str(tmp_path))  # evaluation stubbed below
    import evaluate
    monkeypatch.setattr(evaluate, "classification", draw_from_every_stream)
    straight, pieces = one_run_and_two_pieces(sinkhorn, tmp_path, "--data", own_photos(tmp_path / "photos"),
                                              "--image-size", "16", "--batch-size-per-gpu", "4", "--num-heads", "2",
                                              "--num-label-updates", "6")
    assert straight["step"] == pieces["step"] == 12
    for k, v in straight["model"].items():
        assert torch.equal(v, pieces["model"][k]), k
    assert torch.equal(straight["labels"], pieces["labels"])


def test_resume_refuses_a_damaged_checkpoint(tmp_path):
    root = _tiny_folder(str(tmp_path / "imgs"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="checkpoint.pth"):
        sinkhorn.train(_args(tmp_path, root, resume=""))
    assert (out / "checkpoint.pth").read_bytes() == b"not a checkpoint"


# ---------------------------------------------------------------- the demo on one's own video
def test_demo_trains_on_ones_own_video_and_evaluates_on_the_synthetic_world(tmp_path):
    # a newcomer's `sinkhorn.py --demo --data my_walk.mp4`: its frames are the images (once: NotADirectoryError)
    video = own_video_and_tiny_world(tmp_path)
    result = run_demo("sinkhorn", tmp_path, "--data", video, "--output-dir", "out", "--image-size", "32",
                      "--epochs", "1",
                      "--batch-size-per-gpu", "8", "--num-label-updates", "1", "--num-heads", "1",
                      "--num-clusters", "4")
    assert (tmp_path / "out" / "checkpoint.pth").exists() and (tmp_path / "out" / "clusters.png").exists()
    assert result["train_data"] == video and result["eval_data"] == os.path.join("runs", "synth", "objects")
    assert {"init/knn/k20/top1", "sela/knn/k20/top1", "sela/linear/top1"} <= set(result)
    assert not any(k.startswith("sela/nmi") for k in result)  # a video has no classes to score clusters against


def test_cluster_grid_names_the_largest_clusters(tmp_path, monkeypatch):
    from sinkhorn import data
    calls, real = [], data.labelled_grid
    monkeypatch.setattr(data, "labelled_grid", lambda rows, *a: calls.append((rows, a)) or real(rows, *a))
    root = _tiny_folder(str(tmp_path / "imgs"))
    args = _args(tmp_path, root)
    torch.manual_seed(0)
    model = sinkhorn.SeLaNet(sinkhorn.build_backbone(vars(args)), args.num_heads, args.num_clusters)
    sinkhorn.save_cluster_grid(model, root, 24, str(tmp_path / "clusters.png"), clusters=3, per_cluster=4)
    (rows, (path, title, names)), = calls
    counts = [int(n.split("\n")[1].split()[0]) for n in names]  # "cluster k\nN images", largest first
    assert len(rows) == 3 and sum(counts) == 24 and counts == sorted(counts, reverse=True)
    assert [len(r) for r in rows] == [min(c, 4) for c in counts]
    assert all(t.shape == (3, 24, 24) for r in rows for t in r)
    assert "largest clusters" in title and Image.open(path).size[0] > 4 * 24


# ---------------------------------------------------------------- learning (about 2 CPU-minutes)
def test_demo_clusters_beat_random_init_on_nmi(tmp_path, monkeypatch):
    # the demo's settings (conv net, 3 heads x K = 18, λ 10), shortened: 32 px, 40 epochs of the
    # 360 synthetic object crops. The floor is a fresh network's outputs equipartitioned by the
    # label step (nmi_sk): a fresh argmax collapses to 1-2 clusters and would be an unfair floor.
    # Measured margins (seeds 0, 1, 2): +0.76, +2.33, +0.92 NMI points (41 passes, the official schedule);
    # with K = 6 there was none.
    from sinkhorn import data
    world, root = data.SyntheticWorld(0), tmp_path / "objects"
    for label, name in enumerate(world.classes):
        (root / name).mkdir(parents=True)
        for i in range(60):
            Image.fromarray(world.crop(label, i, "train", 64)).save(root / name / f"{i:03d}.png")
    monkeypatch.chdir(tmp_path)  # --demo also sets up its evaluation world, runs/synth: a tiny one here
    data.synth_world("runs/synth", 0, num_videos=1, num_frames=8, num_images=(2, 1), crops_per_class=(1, 1))
    args = sinkhorn.get_args(["--demo", "--data", str(root), "--output-dir", str(tmp_path / "out"),
                              "--image-size", "32",
                              "--epochs", "40", "--lr-milestones", "32", "--seed", "0", "--amp", "none"])
    model, _, _ = sinkhorn.train(args)
    assert args.num_clusters == 18
    torch.manual_seed(0)
    fresh = sinkhorn.SeLaNet(sinkhorn.build_backbone(vars(args)), args.num_heads, args.num_clusters)
    floor = sinkhorn.cluster_quality(fresh, str(root), 32, "cpu", args.lam)["nmi_sk/mean"]
    learned = sinkhorn.cluster_quality(model, str(root), 32, "cpu", args.lam)["nmi_sk/mean"]
    assert learned > floor + 0.5, (floor, learned)
