"""Tests for evaluate.py with known answers: matching and mIoU, J and F, k-NN / linear probe,
k-means, segmentation probes, label propagation, icl, viz, load_backbone round-trips."""
import json
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate as E  # noqa: E402

torch.set_num_threads(1)



def vit_demo(patch_size=8):  # evaluate.py's own DINO ViT
    return E.build_arch("vit_demo", patch_size)


# ------------------------------------------------------------------ helpers
def blobs(n, num_classes=10, dim=32, seed=0, spread=6.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * spread
    y = torch.randint(0, num_classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


@pytest.fixture
def grids(monkeypatch):
    """What each picture writer hands data.labelled_grid: tile sizes (w, h) per row, and the labels."""
    import data
    calls, real = [], data.labelled_grid

    def spy(rows, path=None, title="", row_names=None, col_names=None, **kw):
        calls.append(dict(sizes=[[data._as_pil(t).size for t in r] for r in rows], title=title,
                          row_names=row_names, col_names=col_names, path=path))
        return real(rows, path, title, row_names, col_names, **kw)

    monkeypatch.setattr(data, "labelled_grid", spy)
    return calls


# ------------------------------------------------------------------ matching, mIoU, NMI, accuracy
def test_miou_by_hand_and_ignore():
    pred, true = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 1, 1, 1, 255])
    conf = E.confusion(pred, true, 2, 2)
    assert conf.tolist() == [[1, 1], [0, 2]]  # the 255 pixel is not counted
    assert E.miou(conf) == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_perfect_and_permuted_predictions_score_100_after_matching():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 6, (4, 32, 32), generator=g)
    true[:, :2] = 255
    perm = torch.randperm(6, generator=g)
    pred = perm[true.clamp(max=5)]
    pred[:, :2] = torch.randint(0, 6, (4, 2, 32), generator=g)  # garbage where the truth is ignored
    assert E.miou(E.confusion(true.clamp(max=5), true, 6, 6)) == pytest.approx(100)
    conf = E.confusion(pred, true, 6, 6)
    assert E.miou(conf) < 50  # unmatched: the permutation is wrong almost everywhere
    mapping = E.match_clusters(conf)
    assert torch.equal(mapping[perm], torch.arange(6))
    assert E.miou(conf, mapping) == pytest.approx(100)


def test_many_to_one_overclustering():
    g = torch.Generator().manual_seed(1)
    true = torch.randint(0, 4, (5000,), generator=g)
    pred = true * 3 + torch.randint(0, 3, (5000,), generator=g)  # every class split over 3 clusters
    conf = E.confusion(pred, true, 12, 4)
    assert E.miou(conf, E.match_clusters(conf, many_to_one=True)) == pytest.approx(100)
    one_to_one = E.miou(conf, E.match_clusters(conf))  # only one of 3 clusters per class counts
    assert 25 < one_to_one < 40


def test_hungarian_maximises_iou_not_overlap():
    # clusters c0 (2 px), c1 (7 px) x classes A (2 px), B (7 px). Overlap: c0->A, c1->B (0 + 5 > 2 + 2);
    # IoU: c0->B, c1->A (2/7 + 2/7 = .571 > 0 + 5/9 = .556), as Leopart's and TimeT's PredsmIoU choose
    conf = torch.tensor([[0, 2], [2, 5]])
    assert E.match_clusters(conf).tolist() == [1, 0]
    assert E.miou(conf, E.match_clusters(conf)) == pytest.approx(100 * 2 / 7)  # overlap's choice: 100 * 5 / 18


def test_unmatched_clusters_go_to_background():
    conf = torch.tensor([[3, 0], [0, 3], [1, 1]])  # cluster 2 is left over by the one-to-one matching
    assert E.match_clusters(conf).tolist() == [0, 1, 0]
    # class 0 gets cluster 2's pixels: IoU 4/5 and 3/4 (a miss instead would give 3/4 and 3/4)
    assert E.miou(conf, E.match_clusters(conf)) == pytest.approx(100 * (4 / 5 + 3 / 4) / 2)


def test_classes_absent_from_both_maps_score_zero():
    pred = true = torch.tensor([0, 0, 1, 1])
    conf = E.confusion(pred, true, 3, 3)  # class 2 in neither map
    assert E.miou(conf) == pytest.approx(100 * 2 / 3)  # Leopart: mean over all classes
    assert E.miou(conf, gt_classes_only=True) == pytest.approx(100)  # TimeT: classes of the ground truth
    conf = E.confusion(torch.tensor([0, 2, 1, 1]), true, 3, 3)  # class 2 predicted but not in the truth
    assert E.miou(conf) == pytest.approx(100 * (1 / 2 + 1 + 0) / 3)
    assert E.miou(conf, gt_classes_only=True) == pytest.approx(100 * (1 / 2 + 1) / 2)


def test_nmi_and_cluster_accuracy():
    g = torch.Generator().manual_seed(2)
    true = torch.randint(0, 5, (2000,), generator=g)
    assert E.nmi((true + 2) % 5, true) == pytest.approx(100)
    assert E.cluster_accuracy((true + 2) % 5, true) == pytest.approx(100)
    assert E.nmi(torch.randint(0, 5, (2000,), generator=g), true) < 2
    assert E.cluster_accuracy(torch.randint(0, 5, (2000,), generator=g), true) < 30


def test_kmeans_recovers_separated_blobs():
    x, y = blobs(600, num_classes=5, dim=16, spread=10)
    labels, centroids = E.kmeans(x, 5, restarts=3)
    assert centroids.shape == (5, 16)
    assert E.cluster_accuracy(labels, y) == pytest.approx(100)
    assert E.kmeans(x, 1000)[1].shape[0] == 600  # k is capped at the number of points


def test_faiss_kmeans_and_standardise_and_pca():
    x, y = blobs(600, num_classes=5, dim=16, spread=10)
    labels, centroids = E.faiss_kmeans(x, 5, niter=20, nredo=3, seed=0, max_points_per_centroid=50)
    assert centroids.shape == (5, 16) and E.cluster_accuracy(labels, y) == pytest.approx(100)  # fit on 250
    z = E.standardise_and_pca(x, dim=4)
    assert z.shape == (600, 4)
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-4)
    variances = z.var(0, unbiased=False)
    assert (variances[:-1] >= variances[1:]).all()  # principal axes in decreasing variance
    std = (x - x.mean(0)) / x.std(0, unbiased=False)  # StandardScaler: ddof 0
    top = torch.linalg.eigvalsh(std.T.double() @ std.double() / 600)[-4:].flip(0)
    assert torch.allclose(variances.double(), top, rtol=1e-4)


def test_seg_cluster_standardises_before_clustering():
    # a loud noise channel (std 100) beside two quiet channels that carry the class (+-1, noise .05):
    # on L2-normalised raw tokens k-means splits the noise; standardised, the class channels win
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 2, (20, 1, 4, 4), generator=g)
    sign = 2 * cls.float() - 1
    feats = torch.cat([sign + 0.05 * torch.randn(20, 2, 4, 4, generator=g),
                       100 * torch.randn(20, 1, 4, 4, generator=g)], dim=1)
    masks = F.interpolate(cls.float(), scale_factor=8, mode="nearest")[:, 0].to(torch.uint8)
    res = E.seg_cluster(feats, masks, num_classes=2, ks=(), seeds=2, restarts=2, iters=20, foreground=False)
    assert res["seg_cluster/k2_hungarian"] == pytest.approx(100)


def test_pixel_kmeans_fits_the_upsampled_pixels():
    feats = torch.tensor([[0.0, 10.0], [0.0, 10.0]]).view(1, 2, 2, 1)
    # bilinear 2 -> 4 (align_corners False): columns 0, 2.5, 7.5, 10; two clusters split them in the middle
    labels = E.pixel_kmeans(feats, 2, 4, niter=10, nredo=2)
    assert labels.shape == (1, 4, 4) and (labels == labels[0, :1]).all()
    a, b = labels[0, 0, 0].item(), labels[0, 0, 3].item()
    assert a != b and labels[0, 0].tolist() == [a, a, b, b]


# ------------------------------------------------------------------ J and F
def test_j_on_hand_built_masks():
    gt = torch.zeros(40, 40, dtype=torch.bool)
    gt[10:20, 10:20] = True
    pred = torch.zeros_like(gt)
    pred[10:20, 15:25] = True
    assert E.j_measure(gt, gt) == 1.0
    assert E.j_measure(pred, gt) == pytest.approx(50 / 150)
    assert E.j_measure(torch.zeros_like(gt), torch.zeros_like(gt)) == 1.0
    void = torch.zeros_like(gt)
    void[:, 20:] = True  # the part of pred outside gt is void: perfect
    assert E.j_measure(pred, gt, void) == pytest.approx(50 / 100)


def test_boundary_map_follows_the_davis_toolkit():
    m = torch.zeros(5, 5, dtype=torch.bool)
    m[2, 2] = True  # a pixel is boundary if it differs from its right, lower or lower-right neighbour
    assert sorted(map(tuple, E.boundary_map(m).nonzero().tolist())) == [(1, 1), (1, 2), (2, 1), (2, 2)]


def test_f_on_hand_built_masks():
    gt = torch.zeros(60, 60, dtype=torch.bool)
    gt[20:40, 20:40] = True
    shifted = torch.roll(gt, 1, dims=1)
    far = torch.roll(gt, 30, dims=0)
    assert E.f_measure(gt, gt) == 1.0
    assert E.f_measure(shifted, gt) == 1.0  # tolerance ceil(0.008 * 84.9) = 1 pixel
    assert E.f_measure(torch.roll(gt, 3, dims=1), gt) < 0.8
    assert E.f_measure(torch.roll(gt, 3, dims=1), gt, bound_th=3) == 1.0  # bound_th >= 1: pixels
    assert E.f_measure(far, gt) == 0.0
    empty = torch.zeros_like(gt)
    assert E.f_measure(empty, gt) == 0.0 and E.f_measure(empty, empty) == 1.0


# ------------------------------------------------------------------ k-NN and linear probe
def test_knn_and_linear_on_separable_blobs():
    x, y = blobs(800)
    xt, yt = blobs(300, seed=1)
    res = E.knn(x, y, xt, yt)
    assert set(res) == {f"knn/k{k}/top{t}" for k in (10, 20, 100, 200) for t in (1, 5)}
    assert res["knn/k20/top1"] > 99 and res["knn/k20/top5"] == 100
    assert E.linear(x, y, xt, yt, epochs=30)["linear/top1"] > 99


def test_knn_and_linear_on_shuffled_labels_are_at_chance():
    x, y = blobs(800)
    xt, yt = blobs(300, seed=1)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert E.knn(x, shuffled, xt, yt)["knn/k20/top1"] < 25  # chance: 10%
    assert E.linear(x, shuffled, xt, yt, epochs=30)["linear/top1"] < 25


def test_knn_weights_votes_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05]])  # 3 of 5 neighbours are class 1, but far: weighted vote says 0
    assert E.knn(train, labels, test, torch.tensor([0]), ks=(5,))["knn/k5/top1"] == 100


# ------------------------------------------------------------------ segmentation probes
def segmentation_set(n, seed, num_classes=4, noise=0.3):
    """Patch tokens that encode their class (one-hot + noise) and the masks they came from."""
    g = torch.Generator().manual_seed(seed)  # two regions per image (top, bottom): few boundary pixels
    small = torch.randint(0, num_classes, (n, 2, 1), generator=g).repeat_interleave(3, 1).expand(n, 6, 6)
    feats = F.one_hot(small, 8).permute(0, 3, 1, 2).float() + noise * torch.randn(n, 8, 6, 6, generator=g)
    masks = F.interpolate(small[:, None].float(), scale_factor=4, mode="nearest")[:, 0].to(torch.uint8)
    masks[:, :, 0] = 255
    return feats.half(), masks


def test_seg_linear_learns_a_linearly_decodable_map():
    tx, ty = segmentation_set(40, 0)
    vx, vy = segmentation_set(20, 1)
    res = E.seg_linear(tx, ty, vx, vy, num_classes=4, epochs=60)
    assert res["seg_linear/miou"] > 90 and res["seg_linear/pixel_acc"] > 95


def test_seg_cluster_hungarian_overclustering_and_foreground():
    vx, vy = segmentation_set(30, 2, noise=0.1)
    res = E.seg_cluster(vx, vy, num_classes=4, ks=(12,), restarts=2)
    assert res["seg_cluster/k4_hungarian"] == pytest.approx(100)
    assert res["seg_cluster/k12_many_to_one"] == pytest.approx(100)
    assert res["seg_cluster/fg_k3_hungarian"] == pytest.approx(100)


# ------------------------------------------------------------------ label propagation
def translating_video(num_frames=8, height=64, width=96, step=8):
    """Textured grey background, a red and a blue 16-px square moving right by `step` px per frame
    (patch-aligned for patches of 4 or 8 px when step is 8)."""
    yy = torch.arange(height)[:, None].expand(height, width)
    frames = torch.zeros(num_frames, 3, height, width, dtype=torch.uint8)
    masks = torch.zeros(num_frames, height, width, dtype=torch.int64)
    for t in range(num_frames):
        img = (110 + 10 * torch.sin(yy / 3.0)).expand(3, height, width).clone()
        for obj, (top, left, colour) in enumerate([(8, 0, (220, 40, 40)), (40, 16, (40, 60, 220))], start=1):
            sl = (slice(top, top + 16), slice(left + step * t, left + step * t + 16))
            img[(slice(None), *sl)] = torch.tensor(colour, dtype=torch.float)[:, None, None]
            masks[t][sl] = obj
        frames[t] = img.to(torch.uint8)
    return dict(name="translate", frames=frames, masks=masks, palette=None)


def test_davis_frames_as_dino_reads_them():
    row = torch.tensor([0, 100, 200, 255], dtype=torch.uint8).view(1, 1, 4)
    # cv2 INTER_LINEAR halving: source x = 0.5 and 2.5, no antialiasing: (0+100)/2, (200+255)/2 rounded up
    assert E.cv2_resize(row, (1, 2)).flatten().tolist() == [50, 228]
    red = E.davis_frame(torch.zeros(3, 2, 2, dtype=torch.uint8), (2, 2))[0, 0, 0]
    assert red.item() == pytest.approx(-0.485 / 0.228)  # DINO's color_normalize: std 0.228 (sic) for red


def test_label_propagation_follows_a_translating_object(tmp_path):
    video = translating_video()
    res = E.propagate(E.RawPixels(4), [video], out_dir=str(tmp_path), short_side=64, multiple=4)
    assert res["davis/J"] > 95 and res["davis/F"] > 95  # only the squares' corners round off
    assert res["davis/J&F"] == pytest.approx((res["davis/J"] + res["davis/F"]) / 2)
    assert len(os.listdir(tmp_path / "translate")) == 8
    # the first mask copied to every frame loses the moving objects
    j_still = sum(E.j_measure(video["masks"][0] == 1, video["masks"][t] == 1) for t in range(1, 7)) / 6
    assert j_still < 0.4
    # sub-patch motion: labels live on the patch grid, so they are close but not exact
    res = E.propagate(E.RawPixels(4), [translating_video(step=3)], short_side=64, multiple=4)
    assert res["davis/J"] > 75


def test_davis_size_matches_dino():
    assert E.davis_size(480, 854) == (480, 832)  # long side floored to a multiple of 64
    assert E.davis_size(1080, 720, 480) == (704, 480)


# ------------------------------------------------------------------ icl
class TinyFolder:
    classes = ["striped ring", "dotted box", "wavy star", "hatched cross", "checkered moon"]

    def __init__(self, per_class=8):
        self.samples = [(None, c) for c in range(len(self.classes)) for _ in range(per_class)]

    def __getitem__(self, i):
        label = self.samples[i][1]
        return torch.full((3, 4, 4), label, dtype=torch.uint8), label


def test_icl_with_right_and_wrong_stub_generators():
    ds, seen = TinyFolder(), []

    def right(images, texts):
        seen.append((len(images), texts))
        return ds.classes[int(images[-1][0, 0, 0])].title() + ". And more."

    def wrong(images, texts):  # names another class of the episode, read from the support captions
        answer = ds.classes[int(images[-1][0, 0, 0])]
        return next(t[len("This is a "):-1] for t in texts[:-1] if t[len("This is a "):-1] != answer)

    res = E.icl(right, ds, ways=(2, 5), shots=(1, 3), episodes=20, seed=0)
    assert res["icl/2way_1shot"] == 100 and res["icl/5way_3shot"] == 100
    assert res["icl/2way_1shot_chance"] == 50 and res["icl/5way_1shot_chance"] == 20
    assert res["icl/2way_1shot_ci95"] == 0 and res["icl/5way_3shot_in_context"] == 100
    assert seen[0][0] == 3 and seen[0][1][-1] == "What is this? This is a"
    assert all(t.startswith("This is a ") and t.endswith(".") for t in seen[0][1][:-1])
    assert {n for n, _ in seen} == {3, 7, 6, 16}  # ways * shots + 1 images
    res = E.icl(wrong, ds, ways=2, shots=1, episodes=20)
    assert res["icl/2way_1shot"] == 0 and res["icl/2way_1shot_in_context"] == 100  # wrong, but a context name
    res = E.icl(lambda im, t: "zebra", ds, ways=2, shots=1, episodes=20)
    assert res["icl/2way_1shot"] == 0 and res["icl/2way_1shot_in_context"] == 0
    # fixed episode seeds: the same episodes every time
    first, again = [], []
    E.icl(lambda im, t: first.append(t) or "", ds, ways=2, shots=1, episodes=5, seed=3)
    E.icl(lambda im, t: again.append(t) or "", ds, ways=2, shots=1, episodes=5, seed=3)
    assert first == again


def test_icl_picture_draws_one_strip_and_answers_truthfully(tmp_path, grids):
    from PIL import Image
    ds = TinyFolder()
    seen = []
    answer, truth = E.icl_picture(lambda im, t: seen.append((im, t)) or "dotted box", ds, tmp_path / "e.png",
                                  ways=3, shots=1, size=16)
    (images, texts), = seen
    assert answer == "dotted box" and truth == ds.classes[int(images[-1][0, 0, 0])]
    assert len(images) == 4 and texts[-1] == "What is this? This is a"
    (grid,) = grids
    assert grid["sizes"] == [[(16, 16)] * 4]  # 3 supports + the query, one strip
    assert grid["col_names"][0] == f"support 1:\n{texts[0]}" and grid["col_names"][-1] == "query:\n-> dotted box"
    assert truth in grid["title"]
    w, h = Image.open(tmp_path / "e.png").size
    assert w >= 4 * 16 + 5 * 2 and h > 16 + 2 * 14  # the tiles under a title and the captions


def test_icl_on_the_command_line_points_a_secat_checkpoint_to_secat_py(tmp_path, capsys):
    """Answering needs secat.py's model, which evaluate.py does not import: one error line says what scores it."""
    torch.save({"method": "secat", "args": {"encoder_arch": "convnet_demo", "patch_size": 16}, "model": {}},
               tmp_path / "secat.pth")
    torch.save({"method": "dora", "args": {"arch": "vit_demo", "patch_size": 8}, "model": {}}, tmp_path / "dora.pth")
    ckpt = str(tmp_path / "secat.pth")
    for argv in (["icl", "--ckpt", ckpt], ["icl", "--ckpt", ckpt, "--data", "d"]):
        with pytest.raises(SystemExit) as e:
            data.cli(E.main, E.get_args, argv)
        assert e.value.code == 1 and capsys.readouterr().err == (
            f"error: --ckpt {ckpt}: a SeCAt checkpoint; score it with: python secat.py --eval-only {ckpt} "
            "--eval-data DIR\n")
    with pytest.raises(data.CheckpointError, match="a dora.py checkpoint .*icl needs .*language model"):
        E.main(E.get_args(["icl", "--ckpt", str(tmp_path / "dora.pth")]))
    with pytest.raises(SystemExit):  # the other benchmarks need --data
        E.get_args(["knn", "--ckpt", ckpt])


def test_icl_answer_normalisation():
    assert E.normalise_answer("  Striped-Ring!\nmore") == "stripedring"
    assert E.normalise_answer("striped  ring. This is") == "striped ring"


# ------------------------------------------------------------------ backbones
def test_raw_pixels_backbone_has_dinos_interface():
    net = E.RawPixels(8)
    x = torch.randn(2, 3, 32, 48)
    tokens = net.get_intermediate_layers(x, 4)[-1]
    assert tokens.shape == (2, 1 + 4 * 6, 192)
    assert torch.equal(tokens[0, 1], x[0, :, :8, :8].flatten())
    assert torch.allclose(net(x), tokens[:, 1:].mean(1))


def test_load_backbone_repo_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    teacher, student = vit_demo(patch_size=8), vit_demo(patch_size=8)
    ckpt = {"method": "dora", "args": {"arch": "vit_demo", "patch_size": 8}, "epoch": 1, "step": 3,
            "teacher": {**{"backbone." + k: v for k, v in teacher.state_dict().items()}, "head.w": torch.ones(2)},
            "model": {"backbone." + k: v for k, v in student.state_dict().items()}}
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    x = torch.randn(2, 3, 32, 32)
    net = E.load_backbone(str(tmp_path / "checkpoint.pth"))
    assert not net.training
    assert torch.allclose(net(x), teacher.eval()(x), atol=1e-6)  # the teacher when there is one
    del ckpt["teacher"]
    torch.save(ckpt, tmp_path / "student.pth")
    assert torch.allclose(E.load_backbone(str(tmp_path / "student.pth"))(x), student.eval()(x), atol=1e-6)
    fresh = E.load_backbone(str(tmp_path / "checkpoint.pth"), random_init=True)
    assert not torch.allclose(fresh(x), teacher(x), atol=1e-3)


def test_repo_checkpoints_are_built_from_their_stored_args(tmp_path):
    """sinkhorn.py's: a ViT arch takes the ViT path, convnet_demo its conv net; secat.py's: its frozen encoder
    (another checkpoint's backbone, or its demo's own conv net), from the `backbone.` keys of its model."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    dora_args = {"arch": "vit_demo", "patch_size": 8}
    for method, args, net in [("sinkhorn", dora_args, vit_demo(8)),
                              ("sinkhorn", {"arch": "convnet_demo"}, E.build_arch("convnet_demo")),
                              ("secat", {"encoder_method": "dora", "encoder_args": dora_args,
                                         "encoder_arch": "vit_small", "patch_size": 16}, vit_demo(8)),
                              ("secat", {"encoder_arch": "convnet_demo", "patch_size": 16},
                               E.stored_backbone("secat", {"encoder_arch": "convnet_demo"}))]:
        torch.save({"method": method, "args": args, "model": {"backbone." + k: v for k, v in net.state_dict().items()}},
                   tmp_path / "c.pth")
        loaded = E.load_backbone(str(tmp_path / "c.pth"))
        assert type(loaded) is type(net) and torch.equal(loaded(x), net.eval()(x)), (method, args)
    assert E.stored_backbone("secat", {"encoder_arch": "convnet_demo"}).out_dim == 128


def test_evaluate_imports_no_method_file():
    import re
    source = open(E.__file__).read()
    assert "importlib" not in source
    assert not re.search(r"^\s*(import|from) (dora|leopart|timetuning|sinkhorn|secat)\b", source, re.M)


def test_load_backbone_official_dino_files(tmp_path):
    torch.manual_seed(0)
    vit = vit_demo(patch_size=8).eval()
    x = torch.randn(1, 3, 32, 32)
    plain = vit.state_dict()
    wrapped = {"teacher": {**{"module.backbone." + k: v for k, v in plain.items()},
                           "module.head.mlp.0.weight": torch.ones(3)}, "epoch": 100}
    for i, state in enumerate([plain, wrapped, {"model": plain}]):
        torch.save(state, tmp_path / f"dino{i}.pth")
        net = E.load_backbone(str(tmp_path / f"dino{i}.pth"), arch="vit_demo", patch_size=8)
        assert torch.allclose(net(x), vit(x), atol=1e-6)
    with pytest.raises(ValueError, match="--arch"):
        E.load_backbone(str(tmp_path / "dino0.pth"), arch="vit_huge", patch_size=8)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(data.CheckpointError, match="broken.pth"):
        E.load_backbone(str(tmp_path / "broken.pth"), arch="vit_demo", patch_size=8)
    assert isinstance(E.load_backbone(arch="pixels", patch_size=8), E.RawPixels)


# ------------------------------------------------------------------ pictures and the suite
def test_viz_writes_grid_and_gif(tmp_path, grids):
    torch.manual_seed(0)
    frames = torch.randint(0, 255, (3, 3, 35, 40), dtype=torch.uint8)
    paths = E.viz(vit_demo(patch_size=8).eval(), frames, str(tmp_path), name="clip", ks=(2, 3))
    from PIL import Image
    grid = Image.open(paths[0])
    assert grids[0]["sizes"] == [[(40, 32)] * 3] * 4  # frames, attention, 2 cluster maps; cropped to 32 x 40
    assert grids[0]["col_names"] == ["frame 0", "frame 1", "frame 2"] and len(grids[0]["row_names"]) == 4
    assert "heads 0, 1, 2" in grids[0]["row_names"][1] and "k=3" in grids[0]["row_names"][3]
    assert grid.size[0] > 3 * 40 + 4 * 2 and grid.size[1] > 4 * 32 + 5 * 2  # and the labels
    gif = Image.open(paths[1])
    assert gif.n_frames == 3 and grids[1]["sizes"] == [[(40, 32)] * 4] and grids[1]["col_names"][0] == "frame 0"
    paths = E.viz(E.RawPixels(8), frames, str(tmp_path), name="pix", ks=(2,))  # no attention row
    assert grids[4]["sizes"] == [[(40, 32)] * 3] * 2 and grids[4]["row_names"][0] == "frame"


def test_save_cluster_maps_columns(tmp_path, grids):
    torch.manual_seed(0)
    images, masks = torch.randn(3, 3, 32, 32), torch.randint(0, 4, (3, 32, 32))
    E.save_cluster_maps(vit_demo(patch_size=8).eval(), images, masks, masks, 4, str(tmp_path / "m.png"), "before")
    (grid,) = grids
    assert grid["sizes"] == [[(32, 32)] * 4] * 3 and grid["row_names"] == ["val 0", "val 1", "val 2"]
    assert grid["col_names"][1] == "k-means of patch tokens (K=4)" and grid["title"].startswith("before")
    assert os.path.getsize(tmp_path / "m.png") > 0


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    data = pytest.importorskip("data")
    return data.synth_world(str(tmp_path_factory.mktemp("synth")), num_videos=1, num_frames=6, size=64,
                            num_images=(12, 6), crops_per_class=(6, 3), crop_size=32)


def test_run_suite_on_a_small_synthetic_world(small_world, capsys):
    torch.manual_seed(0)
    start = time.process_time()  # CPU time: the wall clock depends on what else the machine runs
    res = E.run_suite(vit_demo(patch_size=8), small_world, device="cpu", image_size=32)
    assert time.process_time() - start < 20
    for key in ("knn/k20/top1", "linear/top1", "seg_linear/miou", "seg_cluster/k7_hungarian",
                "seg_cluster/k100_many_to_one", "davis/J&F"):
        assert 0 <= res[key] <= 100
    assert "davis/J&F" in capsys.readouterr().out


def test_cli_prints_a_table_then_one_json_line(small_world, tmp_path, capsys):
    common = ["--patch-size", "8", "--num-workers", "0", "--output-dir", str(tmp_path)]
    E.main(E.get_args(["knn", "--data", os.path.join(small_world, "objects"), "--arch", "pixels",
                       "--image-size", "32", *common]))
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.split()[0] == "knn/k20/top1" for line in lines[:-1])
    assert json.loads(lines[-1])["knn/k20/top1"] >= 0
    E.main(E.get_args(["propagate", "--data", os.path.join(small_world, "davis"), "--arch", "vit_demo",
                       "--random-init", "--short-side", "64", *common]))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"davis/J", "davis/F", "davis/J&F", "protocol"}
    assert printed["protocol"].startswith("DINO eval_video_segmentation.py")  # the JSON names its protocol
    assert len(os.listdir(tmp_path / "tour_00")) == 6  # the palette PNGs
    E.main(E.get_args(["viz", "--data", os.path.join(small_world, "videos"), "--arch", "vit_demo",
                       "--random-init", "--frames", "3", "--image-size", "32", *common]))
    assert os.path.exists(tmp_path / "video0.gif")


def test_cli_video_kmeans_names_timets_protocol(small_world, tmp_path, capsys):
    davis = os.path.join(small_world, "davis")
    args = ["video-kmeans", "--data", davis, "--arch", "vit_demo", "--random-init", "--patch-size", "8",
            "--image-size", "32", "--output-dir", str(tmp_path)]
    E.main(E.get_args(args + ["--clip-frames", "3"]))  # the 6-frame tour: 2 clips
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"video_kmeans/clip_wise_miou", "video_kmeans/dataset_wise_miou", "protocol"}
    assert printed["protocol"] == E.PROTOCOLS["video-kmeans"]
    assert 0 < printed["video_kmeans/dataset_wise_miou"] <= 100
    with pytest.raises(data.DataError, match="no val video has 16 frames"):  # TimeT's 16-frame clips
        E.main(E.get_args(args))


# ------------------------------------------------------------------ Leopart's and TimeT's other tables (#28)
def test_cluster_miou_is_timets_predsmiou():
    """Only the ids present compete (255 dropped); Hungarian 7 -> 0, 2 -> 5, the unmatched 9 -> background:
    IoU 4/5 and 3/4; many-to-one (precision) sends 9 to class 5: perfect."""
    truth = torch.tensor([0, 0, 0, 0, 5, 5, 5, 5, 255])
    pred = torch.tensor([7, 7, 7, 7, 2, 2, 2, 9, 3])
    assert abs(E.cluster_miou(pred, truth) - 77.5) < 1e-9
    assert E.cluster_miou(pred, truth, many_to_one=True) == 100.0
    assert E.cluster_miou(torch.tensor([1, 1, 2, 2]), torch.tensor([3, 3, 4, 4])) == 100.0  # no background


def test_video_kmeans_frame_clip_dataset_on_youtube_vos(tmp_path, capsys):
    """TimeT's modes on a YouTube-VOS root whose frames show the instances: raw pixels recover them; the split
    is written beside the results and is data.YouTubeVOS's; category maps score dataset-wise."""
    from conftest import write_ytvos
    quads = torch.tensor([[0, 1], [2, 0]]).repeat_interleave(32, 0).repeat_interleave(32, 1)
    videos = {f"v{i}": ({1: "ant", 2: ("bee", "cow")[i % 2]}, torch.stack([quads, quads.flip(1), quads, quads]))
              for i in range(10)}  # ant = 1, bee = 2, cow = 3: no id is rewritten twice (data's test has that)
    root = write_ytvos(str(tmp_path / "train"), videos)
    args = ["video-kmeans", "--data", root, "--arch", "pixels", "--patch-size", "8", "--image-size", "64",
            "--clip-frames", "2", "--sampling", "timet", "--mode", "frame", "clip", "dataset", "--output-dir",
            str(tmp_path / "out"), "--seed", "3"]
    E.main(E.get_args(args))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {f"video_kmeans/{m}_wise_miou" for m in ("frame", "clip", "dataset")} < set(printed)
    assert printed["video_kmeans/frame_wise_miou"] > 85 and printed["video_kmeans/clip_wise_miou"] > 85  # edges blur
    split = json.load(open(tmp_path / "out" / "ytvos_split.json"))
    assert split["seed"] == 3 and split["val"] == data.YouTubeVOS(root, "val", seed=3).names and len(split["val"]) == 2
    E.main(E.get_args(args + ["--k", "10", "--many-to-one"]))  # TimeT's fixed K, overclustering
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["video_kmeans/frame_wise_miou_many_to_one"] > 85 and "--k 10" in printed["protocol"]


def test_fcn_head_is_leopart_s():
    head = E.FCNHead(384, 21)
    assert [k for k in head.state_dict()] == ["convs.0.conv.weight", "convs.0.conv.bias", "convs.1.conv.weight",
                                              "convs.1.conv.bias", "conv_cat.conv.weight", "conv_cat.conv.bias",
                                              "conv_seg.weight", "conv_seg.bias"]
    assert head.conv_cat.conv.weight.shape == (512, 384 + 512, 3, 3) and not head.convs[0].conv.bias.any()
    assert abs(head.convs[1].conv.weight.std().item() - (2 / (512 * 9)) ** 0.5) < 1e-3  # kaiming fan_out
    assert head.eval()(torch.randn(2, 384, 5, 5)).shape == (2, 21, 5, 5)


def test_seg_augment_crops_image_and_mask_alike():
    torch.manual_seed(0)
    mask = torch.arange(4).repeat_interleave(16)[None].expand(64, 64)  # 4 vertical stripes
    img = (60 * mask).to(torch.uint8)[None].expand(3, 64, 64)
    flips = set()
    for _ in range(8):
        x, m = E.seg_augment(img, mask, 32)
        assert x.shape == (3, 32, 32) and m.shape == (32, 32) and m.dtype == torch.uint8
        grey = ((x[0] * E.STD[0] + E.MEAN[0]) * 255 / 60).round()
        assert (grey == m).float().mean() > 0.9  # one crop for both (bilinear vs nearest at the edges)
        flips.add(int(m[0, 0]) > int(m[0, -1]))
    assert flips == {True, False}


def test_seg_linear_leopart_recipe_learns_and_steps_at_drop_at(monkeypatch):
    """Class-coded tokens are linearly decodable; SGD(0.01, momentum 0.9, wd 1e-4) and StepLR x 0.1 at drop_at."""
    from test_evaluate_unsup import ClassTokens
    seen = []
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a: seen.append(dict(self.defaults,
                        lr=self.param_groups[0]["lr"])) or real_step(self, *a))
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (24, 4, 4), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
    images = torch.stack([masks + 1, torch.zeros_like(masks), torch.zeros_like(masks)], 1)
    net, train = ClassTokens(3, 1, 0.05), list(zip(images.float(), masks))  # it reads the codes painted
    val_x, val_y = E.extract(net, [(images.float(), masks)], "cpu", patch_tokens=True)
    res = E.seg_linear_leopart(net, train, val_x, val_y, 3, epochs=3, drop_at=2, lr=1.0, batch_size=8,
                               train_size=32, eval_size=32)
    assert res["seg_linear/miou"] > 85  # tokens upsampled bilinearly blur the 8-pixel squares' edges
    assert [s["lr"] for s in seen[::3]] == [1.0, 1.0, 0.1] and seen[0]["momentum"] == 0.9
    assert seen[0]["weight_decay"] == 1e-4


def test_segmentation_reads_coco_stuff_and_thing(tmp_path):
    from conftest import write_coco
    g = torch.Generator().manual_seed(0)
    stuff = [torch.tensor([92, 106, 183, 0])[torch.randint(0, 4, (4, 4), generator=g)] for _ in range(6)]
    thing = [torch.tensor([0, 1, 2, 62])[torch.randint(0, 4, (4, 4), generator=g)] for _ in range(6)]
    root = write_coco(str(tmp_path / "coco"), stuff, thing)
    for labels, classes in (("stuff", 15), ("thing", 12)):
        res = E.segmentation(E.RawPixels(8), root, "cpu", ("seg-cluster",), image_size=16, ks=(4,), restarts=1,
                             seeds=1, labels=labels)
        assert f"seg_cluster/k{classes}_hungarian" in res and "seg_cluster/k4_many_to_one" in res


def test_saved_foreground_reads_the_folder_at_once_and_names_a_file_that_is_no_tensor(tmp_path):
    (tmp_path / "attn_dino_train.pt").write_text("not a tensor")
    torch.save(torch.ones(2, 1, 4, 4), tmp_path / "attn_dino_val.pt")
    with pytest.raises(data.DataError, match="attn_dino_train.pt: not a tensor saved by torch.save"):
        E.saved_foreground(str(tmp_path))  # before any feature is computed
    torch.save({"maps": 1}, tmp_path / "attn_dino_train.pt")
    with pytest.raises(data.DataError, match="attn_dino_train.pt: not a tensor"):
        E.saved_foreground(str(tmp_path))
    with pytest.raises(data.DataError, match="no such file"):
        E.saved_foreground(str(tmp_path / "nope"))
    torch.save(torch.zeros(1, 1, 4, 4), tmp_path / "attn_dino_train.pt")
    fg = E.saved_foreground(str(tmp_path))(torch.rand(3, 2, 2))  # train's map, then val's two
    assert fg.tolist() == [[[False] * 2] * 2] + [[[True] * 2] * 2] * 2


def test_video_kmeans_k_below_two_is_a_usage_error(capsys):
    for k in ("0", "1"):
        with pytest.raises(SystemExit):
            E.get_args(["video-kmeans", "--data", "x", "--k", k])
        assert "--k " + k + ": video-kmeans needs at least 2 clusters" in capsys.readouterr().err
    assert E.get_args(["video-kmeans", "--data", "x", "--k", "2"]).k == 2


def test_a_root_of_another_layout_names_its_kind_and_what_the_benchmark_reads(tmp_path):
    from conftest import write_ytvos
    root = write_ytvos(str(tmp_path / "train"), {"v0": ({1: "person"}, torch.ones(2, 8, 8, dtype=torch.long))})
    with pytest.raises(data.DataError, match="train: laid out as youtube-vos .*; seg-\\* reads voc or coco"):
        E.segmentation(E.RawPixels(8), root, "cpu", ("seg-cluster",), image_size=16)
    with pytest.raises(data.DataError, match="laid out as youtube-vos .*; unsup-seg reads voc"):
        E.unsupervised_segmentation_voc(E.RawPixels(8), root, 16, E.attention_foreground, 2, 2)
    os.makedirs(tmp_path / "voc" / "ImageSets" / "Segmentation")
    with pytest.raises(data.DataError, match="laid out as voc .*; video-kmeans reads davis or youtube-vos"):
        E.video_kmeans_miou(E.RawPixels(8), str(tmp_path / "voc"), 16, "cpu")


# ------------------------------------------------------------------ released weights as the papers' code reads them
def test_released_vit_layouts_load_like_dinos_file(tmp_path):
    """Key layouts of each official saving/loading code: Leopart's README strips 1 level (model.* after
    teacher.*), TimeT's 2 (teacher.backbone.* after the student's); DoRA's main.py saves DINO's dict."""
    import argparse
    torch.manual_seed(0)
    vit, decoy = vit_demo(patch_size=8).eval(), vit_demo(patch_size=8)
    x = torch.randn(1, 3, 32, 32)
    plain, other = vit.state_dict(), decoy.state_dict()
    leopart = {**{"teacher." + k: v for k, v in other.items()}, **{"model." + k: v for k, v in plain.items()},
               "model.head.0.weight": torch.ones(2), "model.prototypes.weight": torch.ones(3, 2)}
    timet = {"prototypes": torch.ones(3, 2), **{"feature_extractor.backbone." + k: v for k, v in other.items()},
             "feature_extractor.head.0.weight": torch.ones(2), **{"teacher.backbone." + k: v for k, v in plain.items()}}
    full = {"student": {"module.backbone." + k: v for k, v in other.items()}, "epoch": 100, "dino_loss": {},
            "teacher": {**{"backbone." + k: v for k, v in plain.items()}, "head.last_layer.weight_g": torch.ones(2)}}
    dora = {**full, "args": argparse.Namespace(arch="vit_small", frame_per_clip=8)}
    for name, state, what in [("leopart", leopart, "Leopart's release"), ("timet", timet, "TimeT's release"),
                              ("dino", full, "DINO's full checkpoint"), ("dora", dora, "DoRA's checkpoint"),
                              ("plain", plain, "DINO-style weights")]:
        torch.save(state, tmp_path / f"{name}.pth")
        assert data.describe_checkpoint(state).startswith(what) and "width 192, 4 blocks, patch 8" in \
            data.describe_checkpoint(state)
        assert torch.equal(E.load_backbone(str(tmp_path / f"{name}.pth"), "vit_demo", 8)(x), vit(x))
        assert data.read_pretrained(str(tmp_path / f"{name}.pth"))[0].keys() == plain.keys()  # --pretrained too


def test_sela_releases_load_into_sinkhorns_backbones(tmp_path):
    """SeLa's AlexNet (models/alexnet.py: features.*, classifier.*, top_layer{i}) and torchvision ResNets
    ({'state_dict', 'labels'}: *_pp.pth; DINO's ResNet-50 without fc) give the official network's features."""
    import torchvision
    torch.manual_seed(0)
    ours = E.alexnet_bn()
    ours.train()(torch.randn(4, 3, 64, 64))  # non-trivial BN statistics
    official = {k.replace("trunk.", "features.").replace("mlp.", "classifier."): v
                for k, v in ours.state_dict().items()}
    official.update({f"top_layer{i}.{p}": torch.zeros(3) for i in range(10) for p in ("weight", "bias")})
    torch.save(official, tmp_path / "alexnet-10x3k-wRot.pth")
    x = torch.randn(2, 3, 64, 64)
    net = E.load_backbone(str(tmp_path / "alexnet-10x3k-wRot.pth"))
    assert torch.equal(net(x), ours.eval()(x)) and net(x).shape == (2, 4096)  # fc7, as SeLa's kNN reads it
    assert data.describe_checkpoint(official) == "SeLa's AlexNet release"
    tv = torchvision.models.resnet18(num_classes=30)
    tv.train()(torch.randn(4, 3, 64, 64))
    torch.save({"state_dict": tv.state_dict(), "labels": torch.zeros(5, dtype=torch.long)}, tmp_path / "r18.pth")
    tv.fc = torch.nn.Identity()
    assert torch.allclose(E.load_backbone(str(tmp_path / "r18.pth"))(x), tv.eval()(x), atol=1e-6)
    assert data.describe_checkpoint(torch.load(tmp_path / "r18.pth")) == "SeLa's ResNet release"
    torch.save({"features.0.weight": torch.ones(64, 3, 7, 7), "features.2.0.bn1.weight": torch.ones(64)},
               tmp_path / "resnet-10x3k.pth")
    with pytest.raises(data.CheckpointError, match="pre-activation"):
        E.load_backbone(str(tmp_path / "resnet-10x3k.pth"))


# ------------------------------------------------------------------ SeLa's and DINO's remaining protocols
def test_adjusted_nmi_and_ari_by_hand():
    """[0,1,0,1] vs [0,0,1,1]: MI 0, E[MI] = log(2)/3 (n_ij = 2 w.p. 1/6 in each of 4 cells), H = log 2 each:
    AMI = -(1/3)/(2/3); ARI: no pair together in both, expected 2/3 of (1+1)/2 = 1 -> -0.5 (sklearn agrees)."""
    assert E.adjusted_nmi([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-50)
    assert E.ari([0, 1, 0, 1], [0, 0, 1, 1]) == pytest.approx(-50)
    assert E.ari([0, 0, 1, 2], [0, 0, 0, 1]) == pytest.approx(100 / 3)  # pairs 1, rows 1, cols 3 of 6: (1-.5)/(2-.5)
    assert E.adjusted_nmi([3, 3, 7, 7], [1, 1, 0, 0]) == E.ari([3, 3, 7, 7], [1, 1, 0, 0]) == 100  # same partition
    assert E.adjusted_nmi([0, 0, 0], [1, 1, 1]) == E.ari([0, 0, 0], [1, 1, 1]) == 100  # sklearn's one-cluster cases
    assert E.nmi([0, 0, 1, 2], [0, 0, 0, 1]) == pytest.approx(70.201688, abs=1e-5)  # sklearn 1.9


def test_sela_knn_cifar_and_cluster_heads(tmp_path, capsys):
    """SeLa's kNN (cifar.py: K 10, sigma 0.1) on CIFAR-10's python files, its CIFAR transform, JSON naming it."""
    import pickle
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[250, 10, 10], [10, 250, 10]], dtype=torch.uint8)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = [j % 2 for j in range(4)]
        noise = torch.randint(0, 5, (4, 3, 1024), generator=g, dtype=torch.uint8)
        rows = colours[labels][:, :, None].expand(4, 3, 1024) + noise
        (folder / name).write_bytes(pickle.dumps({"data": rows.reshape(4, -1).numpy(), "labels": labels}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["red", "green"] + list("cdefghij")}))
    E.main(E.get_args(["knn", "--data", str(folder), "--arch", "pixels", "--patch-size", "8", "--knn-protocol", "sela",
                       "--image-size", "32", "--num-workers", "0", "--device", "cpu"]))
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["knn/k10/top1"] == 100 and "k20" not in str(out) and out["protocol"].startswith("SeLa cifar_utils.kNN")
    x = E.sela_cifar_transform(torch.full((3, 32, 32), 255, dtype=torch.uint8), 224)
    assert x.shape == (3, 224, 224) and x[0, 0, 0].item() == pytest.approx((1 - 0.4914) / 0.2023)
    torch.save({"model": {"backbone.x": torch.ones(1), "heads.0.weight": torch.ones(3, 2),
                          "heads.0.bias": torch.zeros(3), "heads.1.weight": torch.ones(4, 2),
                          "heads.1.bias": torch.zeros(4)}}, tmp_path / "sela.pth")
    assert [w.shape[0] for w, _ in E.cluster_heads(str(tmp_path / "sela.pth"))] == [3, 4]
    torch.save({"features.0.weight": torch.ones(1), "top_layer0.weight": torch.ones(2, 1),
                "top_layer0.bias": torch.ones(2)}, tmp_path / "alexnet.pth")
    assert len(E.cluster_heads(str(tmp_path / "alexnet.pth"))) == 1
    with pytest.raises(data.CheckpointError, match="no clustering heads"):
        E.cluster_heads(None)  # nmi without --ckpt


def test_linear_probes_and_augmented_linear_run_as_specified(tmp_path):
    """SeLa's AlexNet probes: 5 probes of conv1-conv5 pooled to 9600/9216/9600/9600/9216 dims; DINO's augmented probe
    on a ViT: per-epoch cosine from lr x batch / 256, best of the per-epoch val scores."""
    torch.manual_seed(0)
    net = E.alexnet_bn().eval()
    images = torch.randint(0, 255, (4, 3, 40, 40), dtype=torch.uint8)

    class Set(torch.utils.data.Dataset):
        classes = ["a", "b"]

        def __init__(self, transform):
            self.transform = transform

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return self.transform(images[i]), i % 2
    train, val = Set(lambda x: E.random_crop_transform(x, 224)), Set(lambda x: E.ten_crop_transform(x, 224))
    seen = []
    real = E._train_probes
    E._train_probes = lambda probes, *a, **k: seen.append([sum(p.numel() for p in m[2].parameters()) for m in probes]) \
        or real(probes, *a, **k)
    try:
        out = E.linear_probes(net, train, val, "cpu", epochs=1, batch_size=2, num_workers=0)
    finally:
        E._train_probes = real
    assert seen == [[2 * d + 2 for d in (9600, 9216, 9600, 9600, 9216)]]  # the official sizes, 2 classes
    assert list(out) == [f"probe/conv{i}/top1" for i in range(1, 6)] and all(0 <= v <= 100 for v in out.values())
    vit = vit_demo(patch_size=8).eval()
    train, val = Set(lambda x: E.random_crop_transform(x, 32)), Set(lambda x: E.classify_transform(x, 32))
    lrs = []
    real_sgd = torch.optim.SGD.step
    torch.optim.SGD.step = lambda self, *a, **k: lrs.append(self.param_groups[0]["lr"]) or real_sgd(self, *a, **k)
    try:
        out = E.linear_augmented(vit, train, val, "cpu", epochs=3, lr=0.01, batch_size=2, num_workers=0)
    finally:
        torch.optim.SGD.step = real_sgd
    base = 0.01 * 2 / 256
    assert lrs == pytest.approx([base] * 2 + [base * 0.75] * 2 + [base * 0.25] * 2)  # CosineAnnealingLR(3) per epoch
    assert out["linear/top1"] >= out["linear/top1_last"]
