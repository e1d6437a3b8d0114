"""Tests for evaluate.py's Leopart fully unsupervised segmentation (fully_unsup_seg.py): skimage's
co-occurrence offsets, Infomap communities, per-image foreground IoU, the per-pixel weighting of
the foreground k-means, IoU matching, PCA, and the pipeline on class-coded tokens."""
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate as E  # noqa: E402

torch.set_num_threads(1)


def test_glcm_offsets_are_skimages_for_the_official_angles():
    """greycomatrix(distances=[1, 2], angles=[0, pi/4, pi/2, 3pi/4, pi, 4pi/3, 3pi/2, 7pi/4]) rounds
    (sin, cos) * d: the distance-2 diagonals fall on (+-1, +-1) and 4pi/3 on a knight's move."""
    assert E.glcm_offsets() == [(0, 1), (0, 2), (1, 1), (1, 1), (1, 0), (2, 0), (1, -1), (1, -1),
                                (0, -1), (0, -2), (-1, -1), (-2, -1), (-1, 0), (-2, 0), (-1, 1), (-1, 1)]


def test_cooccurrence_on_a_hand_made_map():
    """1 and 2 in opposite corners of a 3x3 map of 0s: true distance-2 neighbours (the diagonal (2, 2))
    would link them, skimage's offsets do not. Each corner sees 6 pixels of 0; 0 sees 6 of each."""
    clusters = torch.tensor([[[1, 0, 0], [0, 0, 0], [0, 0, 2]]])
    co = E.cooccurrence(clusters, 3)
    assert np.array_equal(co, [[0, 0.5, 0.5], [1, 0, 0], [1, 0, 0]])
    stripes = torch.arange(3).repeat_interleave(3)[None, None].expand(1, 9, 9)  # 0 | 1 | 2, 3 columns each
    co = E.cooccurrence(stripes, 3)  # 1 -> 0: 40 + 18 pairs, 1 -> 2: 41 + 18 (the offsets are not symmetric)
    assert co[0, 2] == 0 and co[0, 1] == 1 and abs(co[1, 0] - 58 / 117) < 1e-12 and abs(co[1, 2] - 59 / 117) < 1e-12


def test_infomap_finds_the_two_cliques_and_leaves_out_unlinked_nodes():
    co = np.zeros((9, 9))
    for group in (range(4), range(4, 8)):
        for i in group:
            co[i, list(group)] = 0.3
    np.fill_diagonal(co, 0)
    co[3, 4] = co[4, 3] = 0.1  # a weak bridge, above the 0.09 threshold
    co[0, 5], co[5, 0] = 0.5, 0.05  # one direction below the threshold: no edge
    co[8, 0], co[0, 8] = 0.5, 0.08  # node 8's only edge is cut: unlinked
    module = E.infomap_communities(co, edge_threshold=0.09, markov_time=2.0, modules=2, seed=1)
    assert sorted(module) == list(range(8))
    assert len({module[i] for i in range(4)}) == 1 and len({module[i] for i in range(4, 8)}) == 1
    assert module[0] != module[4] and min(module.values()) == 1


def test_foreground_iou_is_per_image_with_the_boundary_as_foreground():
    """2x2 tokens shown at 4x4. Image 0: class 5 on the top-left token and VOC's 255 boundary on two
    pixels beside it; predicted: the two top tokens -> 6 / 8. Image 1: all object, predicted nothing
    -> 0. Mean 37.5 % (pooled over pixels: 25 %; boundary dropped: 25 % and 16.7 %)."""
    gt = torch.zeros(2, 4, 4, dtype=torch.long)
    gt[0, :2, :2], gt[0, :2, 2], gt[1] = 5, 255, 1
    inside, sizes = E._token_blocks(E._pixel_tokens(2, 2, 4), gt.flatten(1) != 0, 4)
    fg = torch.tensor([[True, True, False, False], [False] * 4])
    assert E._foreground_iou(fg, inside, sizes) == 37.5


def test_foreground_kmeans_weights_tokens_by_their_pixels():
    """28x28 tokens shown at 100x100 cover 9, 12 or 16 pixels. In the k-means a token counts once
    per pixel: the same labels as on explicitly repeated rows, and the middle point of 0, 5, 10 goes
    with whichever end weighs less."""
    sizes = torch.bincount(E._pixel_tokens(28, 28, 100))
    assert sizes.sum() == 10000 and set(sizes.tolist()) == {9, 12, 16}
    x = torch.tensor([[0.0], [5.0], [10.0]])
    assert E.faiss_kmeans(x, 2, copies=torch.tensor([1, 1, 9]))[0].tolist() in ([0, 0, 1], [1, 1, 0])
    assert E.faiss_kmeans(x, 2, copies=torch.tensor([9, 1, 1]))[0].tolist() in ([0, 1, 1], [1, 0, 0])
    g = torch.Generator().manual_seed(0)
    x, copies = torch.randn(300, 5, generator=g), torch.randint(1, 17, (300,), generator=g)
    rows = x.repeat_interleave(copies, 0)  # 2 500 rows > 8 * 256: faiss's subsample is drawn too
    expanded = E.faiss_kmeans(rows, 8, seed=3, niter=10, nredo=2)[0]
    assert torch.equal(E.faiss_kmeans(x, 8, seed=3, niter=10, nredo=2, copies=copies)[0],
                       expanded[copies.cumsum(0) - 1])


def test_spherical_kmeans_assigns_by_inner_product_with_unit_centroids():
    """Rows along two directions at very different lengths: spherical k-means splits by direction
    (Euclidean k-means would split by length)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1.0, 100.0]).repeat(50)[:, None]
    x = torch.cat([lengths * torch.tensor([1.0, 0.1]), lengths * torch.tensor([0.1, 1.0])])
    x = x + 0.01 * torch.randn(x.shape, generator=g)
    labels = E.faiss_kmeans(x, 2, spherical=True)[0]
    assert len(set(labels[:100].tolist())) == 1 and len(set(labels[100:].tolist())) == 1 and labels[0] != labels[100]
    assert len(set(E.faiss_kmeans(x, 2)[0][:100].tolist())) == 2


def test_iou_matching_scores_absent_classes_zero_and_unmatched_ids_background():
    """ids 0, 1, 2 against classes 0, 1, 2 (class 2 never occurs); id 3 >= num_pred is left unmatched
    and becomes background. Overlap would match id 1 to class 0; IoU matches it to class 1."""
    gt = torch.tensor([0, 0, 0, 0, 1, 1, 255])
    pred = torch.tensor([0, 1, 1, 3, 1, 1, 2])
    miou, mapping = E.iou_matched_miou(pred, gt, num_pred=3, num_gt=3)
    assert mapping.tolist()[:2] == [0, 1] and mapping[3] == 0
    assert abs(miou - 100 * (2 / 4 + 2 / 4 + 0) / 3) < 1e-9  # class 0: {0, 3} of 4; class 1: 2 of {1,1,1,1}


def test_pca_is_exact_and_ignores_the_global_generator():
    x = torch.randn(200, 6) * torch.tensor([5.0, 1, 1, 1, 1, 0.1])
    torch.manual_seed(1)
    a = E.standardise_and_pca(x, 3)
    torch.manual_seed(2)
    assert torch.equal(a, E.standardise_and_pca(x, 3))
    full = E.standardise_and_pca(x, 6)  # all components: a rotation of the standardised data
    z = (x - x.mean(0)) / x.std(0, unbiased=False)  # sklearn's StandardScaler: population std, no epsilon
    assert torch.allclose(full.norm(dim=1), z.norm(dim=1), atol=1e-4)
    var = full.var(0)
    assert (var[:-1] >= var[1:] - 1e-5).all()  # components by decreasing variance
    cov = torch.cov(full.T)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-4  # uncorrelated


class ClassTokens(nn.Module):
    """A 'ViT' whose patch tokens are one-hot codes (plus noise) of what is painted on each 8x8 patch:
    an object class (channel 0: 1..C) or else a kind of stuff (channel 1: 1..S); its [CLS] attends
    to the object patches. From such tokens the pipeline should recover the classes."""

    def __init__(self, num_objects, num_stuff, noise):
        super().__init__()
        self.patch_embed, self.dims, self.noise = types.SimpleNamespace(patch_size=8), num_objects + num_stuff, noise
        self.num_objects, self.unused = num_objects, nn.Parameter(torch.zeros(1))  # gives the pipeline a device

    def _codes(self, x):  # (B, 3, H, W) -> (B, N) code per patch, and whether it is an object
        obj, stuff = [F.avg_pool2d(x[:, i:i + 1], 8).flatten(1).round().long() for i in (0, 1)]
        return torch.where(obj > 0, obj - 1, self.num_objects + stuff - 1), obj > 0

    def get_intermediate_layers(self, x, n=1):
        code, _ = self._codes(x)
        tokens = F.one_hot(code, self.dims).float() + self.noise * torch.randn(*code.shape, self.dims)
        return [torch.cat([torch.zeros(len(x), 1, self.dims), tokens], 1)]

    def get_last_selfattention(self, x):
        _, is_object = self._codes(x)
        attn = torch.zeros(len(x), 2, 1 + is_object.shape[1], 1 + is_object.shape[1])
        attn[:, :, 0, 1:] = (is_object.float() + 0.01)[:, None]
        return attn


def test_unsupervised_segmentation_recovers_classes_from_part_tokens():
    """Objects of 8 classes, each painted as 2 parts (left and right half: 16 codes), on one of 3
    stuffs; the [CLS] attends to the objects. The foreground is found (IoU ~91 %: the official
    6 -> 100 -> 48 px nearest resizes shift token borders by a pixel) and community detection merges
    clusters into objects, the background's edges (it touches 16 parts) mostly staying below 0.09.
    (Equidistant codes trap k-means with random starts, so not every class is recovered.)"""
    torch.manual_seed(0)
    n, s, num_classes = 32, 48, 9  # 6x6 tokens of 8 px; a 4x4-token object
    images, masks = torch.zeros(n, 3, s, s), torch.zeros(n, s, s, dtype=torch.long)
    for i in range(n):
        c, (y, x) = i % 8, (8 * t for t in torch.randint(0, 3, (2,)).tolist())
        images[i, 1] = 1 + (i // 8) % 3
        masks[i, y:y + 32, x:x + 32] = 1 + c
        images[i, 0, y:y + 32, x:x + 16], images[i, 0, y:y + 32, x + 16:x + 32] = 1 + 2 * c, 2 + 2 * c
    fg = lambda attn: attn > 0.5  # noqa: E731
    run = lambda noise: E.unsupervised_segmentation(ClassTokens(16, 3, noise), images[:16], images[16:],  # noqa: E731
                                                    num_classes, fg, masks[:16], masks[16:], k_fg=40, k_community=16,
                                                    infomap_runs=2, cbfe_runs=2)
    maps, scores = run(0.05)
    assert maps.shape == masks[16:].shape and scores["protocol"].startswith("leopart fully_unsup_seg.py")
    assert scores["cbfe_fg_iou"] > 85 and scores["cd_miou"] > 60, scores
    assert (maps == masks[16:]).float().mean() > 0.7
    _, noisy = run(5.0)  # tokens that say nothing
    assert noisy["cbfe_fg_iou"] < 60 and noisy["cd_miou"] < scores["cd_miou"] - 40, noisy


def test_faiss_kmeans_splits_empty_clusters_with_tensors_on_the_features_device():
    """Duplicate rows leave clusters empty, and faiss's split_clusters branch runs; every tensor it makes
    names the features' device (a CPU-made sign vector met CUDA centroids there)."""
    import torch.overrides
    made = []

    class Factories(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.tensor, torch.zeros, torch.ones, torch.full) and "device" not in (kwargs or {}):
                made.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat_interleave(8, 0)  # 3 distinct rows, 24 rows
    splits = 0
    real_rand = torch.rand

    def counting_rand(*a, **k):  # the split draws through torch.rand(generator=g) only
        nonlocal splits
        splits += 1
        return real_rand(*a, **k)

    torch.rand = counting_rand
    try:
        with Factories():
            labels, centroids = E.faiss_kmeans(x, 6, niter=5, nredo=2, seed=1)
    finally:
        torch.rand = real_rand
    assert splits > 0 and made == []
    assert labels.shape == (24,) and torch.isfinite(centroids).all()
    assert all(len(set(labels[8 * i:8 * i + 8].tolist())) == 1 for i in range(3))  # equal rows, one cluster


# ------------------------------------------------------------------ unsup-seg on the command line (#28)
def test_attention_foreground_is_leopart_s_official_rule():
    """The official process_attentions (ascending cumulative mass > 1 - 0.65, components <= 2 dropped) equals
    leopart.py's foreground_mask at the CBFE's mass."""
    import leopart
    attn = torch.rand(6, 9, 9) ** 4
    assert torch.equal(E.attention_foreground(attn), leopart.foreground_mask(attn, 0.65, 0.6))
    lone = torch.zeros(1, 9, 9)
    lone[0, 0, 0], lone[0, 4:7, 4:7] = 5.0, 1.0  # a 1-token peak is dropped, the 3x3 block kept
    fg = E.attention_foreground(lone, mass=0.99, sigma=0.01)
    assert not fg[0, 0, 0] and fg[0, 4:7, 4:7].all()


def test_unsup_seg_cli_reads_dinos_saved_maps(tmp_path, capsys):
    import json
    import pytest
    import data
    world = data.synth_world(str(tmp_path / "w"), num_videos=1, num_frames=4, size=64, num_images=(12, 6),
                             crops_per_class=(2, 1), crop_size=32)
    voc = os.path.join(world, "voc")
    n_train, n_val = (len(data.VOCSegmentation(voc, s)) for s in ("train", "val"))
    for split, n in (("train", n_train), ("val", n_val)):  # all foreground: every cluster is kept by CBFE
        torch.save(torch.ones(n, 1, 4, 4), tmp_path / f"attn_dino_{split}.pt")
    args = ["unsup-seg", "--data", voc, "--arch", "vit_demo", "--random-init", "--patch-size", "8",
            "--image-size", "32"]
    E.main(E.get_args(args + ["--attention", str(tmp_path)]))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["foreground"] == str(tmp_path) and printed["cbfe_fg_fraction"] == 100.0
    assert 0 <= printed["cd_miou"] <= 100 and printed["protocol"].startswith("leopart fully_unsup_seg.py")
    torch.save(torch.ones(n_val + 1, 1, 4, 4), tmp_path / "attn_dino_val.pt")
    with pytest.raises(data.DataError, match="hold"):
        E.main(E.get_args(args + ["--attention", str(tmp_path)]))
