"""Tests for data.py: video decoding and clip sampling, every layout, bad inputs, run plumbing."""
import io
import json
import math
import os
import sys
import threading

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402


def moving_square_frames(num_frames, height=48, width=64):
    """uint8 (T,H,W,3): a bright square that moves 2 px a frame on a background that brightens."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frames[t] = (4 * t) % 200
        frames[t, 8:24, 2 * t % (width - 16):2 * t % (width - 16) + 16] = (250, 40, 40)
    return frames


def write_mp4(path, frames, fps=10, gop=5):
    """The test's own H.264 writer (independent of data.write_video)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "12", "g": str(gop)})
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_frame_folder(folder, values, size=8):
    """A frame folder whose frame t is a flat image of value values[t] (lossless PNG)."""
    os.makedirs(folder, exist_ok=True)
    for t, value in enumerate(values):
        Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(os.path.join(folder, f"{t:05d}.png"))


# ------------------------------------------------------------------------------------- videos
def test_mp4_decodes_to_the_frames_written(tmp_path):
    frames = moving_square_frames(40)
    path = tmp_path / "square.mp4"
    write_mp4(path, frames)
    info = data.probe_video(path)
    assert (info.num_frames, info.fps, info.height, info.width) == (40, 10.0, 48, 64)
    indices = [0, 7, 23, 24, 31, 39]
    decoded = data.read_frames(path, indices)
    assert decoded.dtype == torch.uint8 and decoded.shape == (6, 3, 48, 64)
    original = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    for k, t in enumerate(indices):
        errors = (decoded[k].float() - original).abs().mean(dim=(1, 2, 3))
        assert errors[t] < 3 and errors.argmin() == t  # the right frame, not a neighbour
    small = data.read_frames(path, [30, 31], short_side=24)
    assert small.shape == (2, 3, 24, 32)


def test_read_frames_seeks_instead_of_decoding_from_the_start(tmp_path, monkeypatch):
    path = tmp_path / "long.mp4"
    write_mp4(path, moving_square_frames(60), gop=5)
    decoded_pts = []
    real_open = av.open

    class Spy:  # counts the frames the decoder hands out
        def __init__(self, *a, **k):
            self.container = real_open(*a, **k)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def decode(self, *a, **k):
            for frame in self.container.decode(*a, **k):
                decoded_pts.append(frame.pts)
                yield frame

    monkeypatch.setattr(data.av, "open", Spy)
    clip = data.read_frames(path, [50, 51, 52])
    assert clip.shape[0] == 3
    assert len(decoded_pts) <= 10  # keyframe every 5: at most ~5 frames before 50, not 50


def test_clips_cover_videos_and_split_over_workers_and_ranks_without_overlap(tmp_path):
    write_frame_folder(tmp_path / "a", range(22))  # frame value = (video, frame) identity
    write_frame_folder(tmp_path / "b", range(100, 116))
    clips = data.VideoClips(tmp_path, num_frames=4, frame_gap=2, clip_start_every=1)
    assert len(clips) == 16 + 10  # (22 - 7 + 1) + (16 - 7 + 1) clip starts
    assert clips.clip_index(0) == (0, 0) and clips.clip_index(15) == (0, 15) and clips.clip_index(16) == (1, 0)
    assert clips[17][:, 0, 0, 0].tolist() == [101, 103, 105, 107]
    covered = {int(v) for i in range(len(clips)) for v in clips[i][:, 0, 0, 0]}
    assert covered == set(range(22)) | set(range(100, 116))

    seen = []
    for rank in range(2):
        sampler = DistributedSampler(clips, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(clips, batch_size=3, sampler=sampler, num_workers=2)
        seen += [int(v) for batch in loader for v in batch[:, 0, 0, 0, 0]]
    firsts = [int(clips[i][0, 0, 0, 0]) for i in range(len(clips))]
    assert sorted(seen) == sorted(firsts)  # every clip exactly once over 2 ranks x 2 workers


def test_clips_from_mp4_and_decode_time_resize(tmp_path):
    write_mp4(tmp_path / "v.mp4", moving_square_frames(20))
    clips = data.VideoClips(tmp_path / "v.mp4", num_frames=4, frame_gap=2, clip_start_every=3, short_side=24)
    assert len(clips) == 5 and clips.clip_index(4) == (0, 12)
    assert clips[4].shape == (4, 3, 24, 32)
    assert data.find_videos(tmp_path) == [str(tmp_path / "v.mp4")]


def gliding_blob_frames(num_frames, height=48, width=64):
    """uint8 (T,H,W,3): a soft blob gliding 0.4 px a frame (no scene cuts, so x264 keeps the GOP it is given)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([np.exp(-((x - 8 - 0.4 * t) ** 2 + (y - 24) ** 2) / 60) * 200 + 30, y * 4.0,
                               np.full_like(x, 128.0)], -1) for t in range(num_frames)]).astype(np.uint8)


def test_a_clip_decodes_only_the_frames_it_needs(tmp_path):
    frames = gliding_blob_frames(120)
    data.write_video(tmp_path / "g40.mp4", frames, gop=40)
    data.write_video(tmp_path / "g1000.mp4", frames, gop=1000)
    with av.open(str(tmp_path / "g40.mp4")) as container:
        assert [i for i, f in enumerate(container.decode(video=0)) if f.key_frame] == [0, 40, 80]
        container.seek(0)
        everything = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    def decoded(name, indices):
        before = data.DECODED["frames"]
        clip = data.read_frames(tmp_path / name, indices)
        if name == "g40.mp4":  # the right frames, bit-exact
            assert np.array_equal(clip.permute(0, 2, 3, 1).numpy(), np.stack([everything[i] for i in indices]))
        return data.DECODED["frames"] - before
    assert decoded("g40.mp4", [0, 40, 80]) == 3  # frames decoded == frames asked: a seek to each keyframe
    assert decoded("g40.mp4", [5, 45, 85]) == 3 * 6  # keyframe .. frame, three times (the old loader: 86)
    assert decoded("g40.mp4", [10, 70, 110]) == 11 + 31 + 31  # from 40 to 70 no keyframe between: decode on
    assert decoded("g40.mp4", list(range(50, 58))) == 18  # consecutive frames: one seek, as before
    assert decoded("g1000.mp4", [10, 70, 110]) == 111  # one GOP: decoding on beats seeking back to frame 0


def test_extract_writes_a_frame_folder_that_reads_like_the_video(tmp_path):
    data.write_video(tmp_path / "v.mp4", gliding_blob_frames(90), gop=20)
    data.main(data.get_args(["extract", str(tmp_path / "v.mp4"), "--out", str(tmp_path / "f"), "--short-side", "24",
                             "--workers", "3"]))
    assert sorted(os.listdir(tmp_path / "f")) == [f"{i:06d}.jpg" for i in range(90)]
    assert data.dataset_kind(tmp_path / "f") == "frame folder" and data.probe_video(tmp_path / "f").num_frames == 90
    from_folder = data.VideoClips(tmp_path / "f", num_frames=3, frame_gap=30)[5].float()
    from_video = data.read_frames(tmp_path / "v.mp4", [5, 35, 65], short_side=24).float()
    assert from_folder.shape == from_video.shape == (3, 3, 24, 32)
    assert (from_folder - from_video).abs().mean() < 3  # JPEG quality 95


def test_frames_and_images_keep_the_decoders_layout_and_pils_pixels(tmp_path):
    """read_frames and load_image hand over the decoders' (H, W, 3) memory as (3, H, W) views, channels-last: no
    transposing copy in the loader (TimeT's 720p clips spent half their loader time in it); the pixels are PIL's."""
    os.makedirs(tmp_path / "f")
    frames = gliding_blob_frames(4)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / "f" / f"{t:06d}.jpg", quality=90)
    pil = np.stack([np.asarray(Image.open(tmp_path / "f" / f"{t:06d}.jpg").convert("RGB")) for t in (0, 2, 3)])
    data.write_video(tmp_path / "v.mp4", frames, gop=2)
    for x in (data.read_frames(tmp_path / "f", [0, 2, 3]), data.read_frames(tmp_path / "f", [0, 2], short_side=24),
              data.read_frames(tmp_path / "v.mp4", [1, 3]), data.load_image(tmp_path / "f" / "000002.jpg")[None]):
        assert x.dtype == torch.uint8 and x.is_contiguous(memory_format=torch.channels_last), x.stride()
    assert torch.equal(data.read_frames(tmp_path / "f", [0, 2, 3]), torch.from_numpy(pil).permute(0, 3, 1, 2))
    assert torch.equal(data.load_image(tmp_path / "f" / "000002.jpg"), torch.from_numpy(pil[1]).permute(2, 0, 1))


def test_decoder_threads_are_shared_by_the_ranks_of_a_node(monkeypatch):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data.decoder_threads() == 2
    monkeypatch.setattr(data.torch.utils.data, "get_worker_info", lambda: type("W", (), {"num_workers": 4}))
    assert data.decoder_threads() == 1


# ------------------------------------------------------------------------------------- images
def test_every_image_mode_comes_out_rgb_uint8(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((3, 4, 4), 200, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    pal = Image.fromarray(np.full((3, 4), 1, np.uint8), "P")
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.fromarray(np.full((3, 4), 65535, np.uint16)).save(tmp_path / "deep.png")
    for name in ("grey", "rgba", "pal", "deep"):
        img = data.load_image(tmp_path / f"{name}.png")
        assert img.dtype == torch.uint8 and img.shape == (3, 3, 4), name
    assert data.load_image(tmp_path / "grey.png")[:, 2, 3].tolist() == [220] * 3
    assert data.load_image(tmp_path / "pal.png")[:, 0, 0].tolist() == [10, 20, 30]
    assert data.load_image(tmp_path / "deep.png").min() == 255  # 16-bit white stays white, not clipped noise
    data.save_mask(tmp_path / "m.png", np.array([[0, 3], [255, 1]]))
    assert data.load_mask(tmp_path / "m.png").tolist() == [[0, 3], [255, 1]]


def test_a_video_serves_as_images_one_frame_every_step(tmp_path):
    # frame t is flat grey 20 t: a phone video given to an image method is its frames, not one "image"
    frames = np.stack([np.full((32, 48, 3), 20 * t, np.uint8) for t in range(10)])
    write_mp4(tmp_path / "walk.mp4", frames)
    images = data.UnlabelledImages(tmp_path / "walk.mp4")
    assert len(images) == 10 and images[0][0].shape == (3, 32, 48) and images[4][1] == -1
    assert [round(images[i][0].float().mean().item() / 20) for i in range(10)] == list(range(10))
    every_third = data.UnlabelledImages(tmp_path / "walk.mp4", frame_step=3)
    assert [round(every_third[i][0].float().mean().item() / 20) for i in range(4)] == [0, 3, 6, 9]
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "broken.mp4").write_bytes(os.urandom(3000))
    with pytest.warns(UserWarning, match="broken.mp4"):  # in a folder: images first, then frames; bad videos skipped
        mixed = data.UnlabelledImages(tmp_path, frame_step=5)
    assert len(mixed) == 3 and mixed[0][0].shape == (3, 8, 8) and len(mixed.skipped_videos) == 1


# ----------------------------------------------------------------------------- synthetic world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world"))
    data.synth_world(root, seed=0, num_videos=2, num_frames=24, num_images=(10, 6), crops_per_class=(4, 2))
    return root


def test_synth_writes_every_layout_and_world_json(world):
    meta = json.load(open(os.path.join(world, "world.json")))
    assert meta["classes"] == list(data.CLASS_NAMES) and meta["videos"] == ["tour_00", "tour_01"]
    objects = data.ImageFolder(os.path.join(world, "objects", "train"))
    assert objects.classes == [c.replace("_", " ") for c in data.CLASS_NAMES]  # sorted: label k = VOC class k+1
    assert len(objects) == 4 * 6 and objects[0][0].shape == (3, 64, 64)
    assert data.dataset_kind(world) == "synthetic world"
    assert data.dataset_kind(os.path.join(world, "objects", "val")) == "image folder"


def test_voc_round_trip_is_exact(world):
    voc = data.VOCSegmentation(os.path.join(world, "voc"), "val")
    assert len(voc) == 6 and voc.num_classes == 7 and voc.class_names[1:] == list(data.CLASS_NAMES)
    generator = data.SyntheticWorld(0)
    for i in range(len(voc)):
        img, mask = voc[i]
        rendered, semantic = generator.image(i, "val")
        assert torch.equal(mask, torch.from_numpy(semantic))  # palette PNG: lossless
        assert (img.float() - torch.from_numpy(rendered).permute(2, 0, 1).float()).abs().mean() < 4  # JPEG 4:4:4
        assert set(mask.unique().tolist()) <= set(range(7)) | {255}


def test_davis_and_videos_round_trip(world):
    davis = data.DAVIS(os.path.join(world, "davis"))
    tour = data.SyntheticWorld(0).video(1, num_frames=24)
    seq = davis[1]
    assert seq["name"] == "tour_01" and seq["frames"].shape == (24, 3, 128, 128)
    assert torch.equal(seq["masks"], torch.from_numpy(tour["instances"]))
    assert set(seq["masks"][0].unique().tolist()) == set(range(len(tour["labels"]) + 1))  # all objects in frame 0
    assert seq["palette"][3:6] == [128, 0, 0]
    clips = data.VideoClips(os.path.join(world, "videos"), num_frames=8, frame_gap=1, clip_start_every=8)
    assert len(clips) == 2 * 3
    decoded = clips[4].float()  # tour_01 frames 8..15
    original = torch.from_numpy(tour["frames"]).permute(0, 3, 1, 2).float()
    errors = [(decoded - original[start:start + 8]).abs().mean() for start in (7, 8, 9)]
    assert errors[1] < 12 and errors[1] < 0.7 * min(errors[0], errors[2])  # yuv420p costs colour detail


def test_generator_is_deterministic_and_moves(world):
    a, b, c = data.SyntheticWorld(0), data.SyntheticWorld(0), data.SyntheticWorld(1)
    assert np.array_equal(a.image(3)[0], b.image(3)[0]) and not np.array_equal(a.image(3)[0], c.image(3)[0])
    assert np.array_equal(a.crop(2, 5), b.crop(2, 5))
    tour = a.video(0, num_frames=12)
    assert not np.array_equal(tour["frames"][0], tour["frames"][11])  # the camera and the objects move
    mtime = os.path.getmtime(os.path.join(world, "world.json"))
    assert data.ensure_synth(world) == world and os.path.getmtime(os.path.join(world, "world.json")) == mtime


def test_ensure_synth_replaces_an_old_world_and_spares_other_folders(tmp_path, monkeypatch):
    real = data.synth_world
    monkeypatch.setattr(data, "synth_world", lambda out, seed: real(out, seed, num_videos=1, num_frames=8,
                                                                     num_images=(2, 1), crops_per_class=(1, 1)))
    root = tmp_path / "synth"
    (root / "videos").mkdir(parents=True)
    (root / "world.json").write_text(json.dumps({"seed": 0, "version": data.SYNTH_VERSION - 1}))
    assert data.ensure_synth(root) == str(root)
    assert json.load(open(root / "world.json"))["version"] == data.SYNTH_VERSION
    assert sorted(os.listdir(tmp_path)) == ["synth"]  # nothing left aside
    assert len(data.VideoClips(root / "videos", num_frames=8)) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(data.DataError, match="not a synthetic world"):
        data.ensure_synth(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_ensure_synth_other_ranks_wait_for_the_writer(tmp_path, monkeypatch):
    # torchrun starts N processes that call ensure_synth before the process group exists:
    # only local rank 0 writes; the others wait until its world is complete
    real, root = data.synth_world, tmp_path / "synth"
    small = lambda out, seed: real(out, seed, num_videos=1, num_frames=8, num_images=(2, 1), crops_per_class=(1, 1))
    monkeypatch.setattr(data, "synth_world", lambda out, seed: pytest.fail("a rank other than 0 wrote the world"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    writer = threading.Timer(1.0, lambda: small(str(root), 0))
    writer.start()
    assert data.ensure_synth(root) == str(root)
    writer.join()
    assert data._current_world(str(root), 0) and sorted(os.listdir(tmp_path)) == ["synth"]


def test_demo_eval_root_is_the_synthetic_world_or_a_checked_folder(tmp_path, monkeypatch):
    real = data.synth_world
    monkeypatch.setattr(data, "synth_world", lambda out, seed: real(out, seed, num_videos=1, num_frames=8,
                                                                     num_images=(2, 1), crops_per_class=(1, 1)))
    monkeypatch.chdir(tmp_path)
    assert data.demo_eval_root() == os.path.join("runs", "synth")  # written on first use, beside no user data
    assert data._current_world("runs/synth", 0)
    assert data.demo_eval_root("runs/synth", ["knn", "seg-cluster", "propagate"]) == "runs/synth"
    os.makedirs("mine/objects")
    for needs, missing in ((["objects"], "objects/{train,val}"), (["seg-linear"], "voc/"), (["propagate"], "davis/")):
        with pytest.raises(data.DataError) as e:
            data.demo_eval_root("mine", needs)
        assert missing in one_line_error(e, "mine")
    write_mp4(tmp_path / "walk.mp4", moving_square_frames(4))
    with pytest.raises(data.DataError, match="walk.mp4: is a file, not a folder"):
        data.demo_eval_root(str(tmp_path / "walk.mp4"))


def test_classes_are_not_separable_by_colour():
    # mean colour of each object region -> nearest class centroid: should be near chance (1/6)
    generator = data.SyntheticWorld(0)
    features, labels = [], []
    for i in range(60):
        img, semantic = generator.image(i)
        for c in set(np.unique(semantic).tolist()) - {0, 255}:
            features.append(img[semantic == c].mean(0))
            labels.append(c)
    features, labels = np.array(features), np.array(labels)
    half = len(labels) // 2
    centroids = np.stack([features[:half][labels[:half] == c].mean(0) for c in range(1, 7)])
    predicted = 1 + np.linalg.norm(features[half:, None] - centroids[None], axis=2).argmin(1)
    assert (predicted == labels[half:]).mean() < 0.4


def test_inspect_prints_the_world_and_writes_a_contact_sheet(world, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    data.main(data.get_args(["inspect", world, "--sheet", str(sheet)]))
    out = capsys.readouterr().out
    assert "synthetic world" in out and "2 video(s)" in out and "6 classes" in out
    assert Image.open(sheet).size[0] > 0
    result = data.bench(os.path.join(world, "videos"), max_clips=4, rounds=1)
    assert result["clips"] == 4 and result["ratio"] > 0


def test_labelled_grid_adds_a_title_strip_and_names_around_unchanged_tiles(tmp_path):
    colour = lambda i: torch.tensor([20 + 40 * i, 7, 200], dtype=torch.uint8)  # noqa: E731  (not a text grey)
    tiles = [[colour(3 * r + c)[:, None, None].expand(3, 10, 12) for c in range(3)] for r in range(2)]
    bare = np.asarray(data.labelled_grid(tiles))  # no labels: the tiles 2 px apart, 6 px above
    assert bare.shape == (6 + 2 * (10 + 2), 2 + 3 * (12 + 2), 3)
    assert (bare[18:28, 30:42] == colour(5).numpy()).all() and (bare[6:16, 2:14] == colour(0).numpy()).all()
    path = tmp_path / "sub" / "grid.png"
    data.labelled_grid(tiles, str(path), "A title", ["row one", "row two"], ["a", "b", "c"])
    grid = np.asarray(Image.open(path).convert("RGB"))
    H, W = grid.shape[:2]
    assert H > bare.shape[0] + 20 and W > bare.shape[1] + 30  # a title strip, column names, row names
    ys, xs = np.nonzero((grid == colour(5).numpy()).all(-1))  # the last tile, unchanged, at the right edge
    assert len(ys) == 10 * 12 and (xs.min(), xs.max()) == (W - 14, W - 3) and ys.max() - ys.min() == 9
    assert (grid[:15, :60] < 100).any()  # the title is drawn (dark text on white)
    assert (grid[ys.min():, :W - 3 * 14 - 2] < 100).any()  # the last row's name, left of its tiles


# --------------------------------------------------------------------------------- bad inputs
def one_line_error(exc_info, path):
    message = str(exc_info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_path_and_empty_folder(tmp_path):
    missing = tmp_path / "nope"
    for make in (data.VideoClips, data.ImageFolder, data.UnlabelledImages, data.load_image, data.probe_video):
        with pytest.raises(data.DataError) as e:
            make(missing)
        assert "no such" in one_line_error(e, missing)
    (tmp_path / "empty").mkdir()
    for make in (data.VideoClips, data.ImageFolder, data.UnlabelledImages, data.dataset_kind):
        with pytest.raises(data.DataError) as e:
            make(tmp_path / "empty")
        one_line_error(e, tmp_path / "empty")


def test_corrupt_zero_frame_and_too_short_videos(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(4000))
    with pytest.raises(data.DataError) as e:
        data.VideoClips(tmp_path / "corrupt.mp4")
    assert "corrupt" in one_line_error(e, tmp_path / "corrupt.mp4")
    container = av.open(str(tmp_path / "zero.mp4"), "w")
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
    container.start_encoding()
    container.close()
    with pytest.raises(data.DataError) as e:
        data.probe_video(tmp_path / "zero.mp4")
    assert "zero frames" in one_line_error(e, tmp_path / "zero.mp4")
    write_mp4(tmp_path / "short.mp4", moving_square_frames(5))
    with pytest.raises(data.DataError) as e:
        data.VideoClips(tmp_path / "short.mp4", num_frames=8)
    assert "shorter than one clip" in one_line_error(e, tmp_path / "short.mp4")
    with pytest.raises(data.DataError, match="no usable video among 3"), pytest.warns(UserWarning):
        data.VideoClips(tmp_path, num_frames=8)  # nothing readable in the folder
    write_mp4(tmp_path / "good.mp4", moving_square_frames(10))
    with pytest.warns(UserWarning, match="corrupt"):  # among several, bad videos are skipped and counted
        clips = data.VideoClips(tmp_path, num_frames=8)
    assert clips.videos == [str(tmp_path / "good.mp4")] and len(clips.skipped_videos) == 3


def test_a_file_where_a_folder_is_expected_and_the_reverse_are_named(tmp_path):
    write_mp4(tmp_path / "walk.mp4", moving_square_frames(4))
    (tmp_path / "notes.txt").write_text("not data")
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(3000))
    cases = [(lambda: data.ImageFolder(tmp_path / "walk.mp4"), "walk.mp4", "is a file, not a folder"),
             (lambda: data.VOCSegmentation(tmp_path / "walk.mp4" / "voc"), "walk.mp4", "is a file, not a folder"),
             (lambda: data.load_image(tmp_path), tmp_path, "is a folder, not an image"),
             (lambda: data.UnlabelledImages(tmp_path / "notes.txt"), "notes.txt", "neither an image nor a video"),
             (lambda: data.find_videos(tmp_path / "notes.txt"), "notes.txt", "is a file but not a video"),
             (lambda: data.UnlabelledImages(tmp_path / "corrupt.mp4"), "corrupt.mp4", "corrupt")]
    for make, path, what in cases:
        with pytest.raises(data.DataError) as e:
            make()
        message = one_line_error(e, tmp_path / path if isinstance(path, str) else path)
        assert what in message, message


def test_unreadable_images_are_skipped_and_counted_until_none_is_left(tmp_path):
    folder = tmp_path / "cls_a"
    folder.mkdir()
    (folder / "0_bad.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(data.DataError) as e:
        data.load_image(folder / "0_bad.jpg")
    assert "unreadable image" in one_line_error(e, folder / "0_bad.jpg")
    with pytest.raises(data.DataError, match="none of its 1 files is readable"), pytest.warns(UserWarning):
        data.ImageFolder(tmp_path)[0]
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(folder / "1_good.jpg")
    images = data.UnlabelledImages(tmp_path)
    with pytest.warns(UserWarning, match="0_bad.jpg"):
        img, label = images[0]
    assert img.shape == (3, 5, 5) and label == -1 and images.num_skipped == 1


def test_mask_whose_size_differs_from_its_image(tmp_path):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "JPEGImages" / "x.jpg")
    data.save_mask(tmp_path / "SegmentationClass" / "x.png", np.zeros((10, 12)))
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("x\n")
    with pytest.raises(data.DataError) as e:
        data.VOCSegmentation(tmp_path)[0]
    assert "(10, 12)" in one_line_error(e, tmp_path / "SegmentationClass" / "x.png")


# ------------------------------------------------------------------------------- run plumbing
def test_checkpoint_save_is_atomic_and_bad_files_raise_checkpoint_error(tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.pth"
    state = {"model": {"w": torch.arange(1000.0)}, "epoch": 3}
    data.save_checkpoint(state, path)
    assert os.listdir(path.parent) == ["checkpoint.pth"]  # no .tmp left behind
    assert torch.equal(data.load_checkpoint(path)["model"]["w"], state["model"]["w"])
    with pytest.raises(Exception):  # a failing save must not touch the previous checkpoint
        data.save_checkpoint({"model": lambda: 0}, path)
    assert data.load_checkpoint(path)["epoch"] == 3 and os.listdir(path.parent) == ["checkpoint.pth"]

    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(data.CheckpointError) as e:
        data.load_checkpoint(path)
    one_line_error(e, path)
    assert path.read_bytes() == full[: len(full) // 2]  # left in place for the user to look at
    path.write_bytes(b"hello")
    with pytest.raises(data.CheckpointError):
        data.load_checkpoint(path)
    torch.save(torch.zeros(2), path)
    with pytest.raises(data.CheckpointError, match="expected a checkpoint dict"):
        data.load_checkpoint(path)
    with pytest.raises(data.CheckpointError, match="no such"):
        data.load_checkpoint(tmp_path / "missing.pth")


def test_ctrl_c_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    # Ctrl-C while torch.save writes used to surface as the zip writer's RuntimeError
    path = tmp_path / "checkpoint.pth"
    data.save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    class InterruptedFile(io.FileIO):  # the signal lands after 10 kB of the new checkpoint
        def write(self, chunk):
            if self.tell() + len(chunk) > 10_000:
                raise KeyboardInterrupt
            return super().write(chunk)

    monkeypatch.setattr(data, "open", lambda p, mode: InterruptedFile(p, "w"), raising=False)
    with pytest.raises(KeyboardInterrupt):
        data.save_checkpoint({"epoch": 2, "model": {"w": torch.zeros(10_000)}}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["checkpoint.pth"]


def test_schedule_logger_amp_and_seeding(tmp_path):
    values = data.cosine_schedule(1.0, 0.1, epochs=4, steps_per_epoch=5, warmup_epochs=1, start_warmup=0.0)
    assert len(values) == 20 and values[0] == 0.0 and values[4] == 1.0 and values[5] == 1.0
    assert np.all(np.diff(values[5:]) < 0) and 0.1 < values[-1] < 0.12
    logger = data.JsonlLogger(tmp_path / "log.jsonl")
    logger.log({"loss": torch.tensor(0.5), "step": 1})
    logger.log({"loss": 0.25, "step": 2})
    data.JsonlLogger(tmp_path / "other.jsonl", enabled=False).log({"x": 1})
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert lines == [{"loss": 0.5, "step": 1}, {"loss": 0.25, "step": 2}]
    assert not (tmp_path / "other.jsonl").exists()
    assert data.resolve_amp(None, "cpu") == "none" and data.resolve_amp("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError):
        data.resolve_amp("fp16", "cpu")
    with data.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not data.make_scaler("bf16", "cpu").is_enabled()
    data.seed_everything(5, rank=1)
    first = torch.rand(3)
    data.seed_everything(6, rank=0)
    assert torch.equal(first, torch.rand(3))  # seed + rank
    dist = data.init_distributed()
    assert dist.world_size == 1 and dist.is_main


# ------------------------------------------------------------------ COCO-Stuff / COCO-Thing, YouTube-VOS (#28)
def test_coco_stuff_and_thing_are_leopart_supercategories(tmp_path):
    from conftest import write_coco
    stuff = [[[0, 92, 106, 183]] * 4, [[180, 95, 148, 111]] * 4]  # things (0) and "other" (183) -> 255
    thing = [[[0, 1, 2, 62]] * 4, [[200, 92, 84, 78]] * 4]  # unlabelled (0) and stuff (92, 200) -> 255
    root = write_coco(str(tmp_path / "coco"), stuff, thing)
    assert data.dataset_kind(root) == "coco"
    s, t = data.COCOSegmentation(root, "val", labels="stuff"), data.COCOSegmentation(root, "val", labels="thing")
    assert s.num_classes == 15 and s.class_names[:3] == ["building", "ceiling", "floor"]
    assert "other" not in s.class_names
    assert t.num_classes == 12 and t.class_names == ["accessory", "animal", "appliance", "electronic", "food",
                                                     "furniture", "indoor", "kitchen", "outdoor", "person", "sports",
                                                     "vehicle"]
    assert s[0][1][0].tolist() == [255, 11, 8, 255] and s[1][1][0].tolist() == [14, 0, 13, 5]
    assert t[0][1][0].tolist() == [255, 9, 11, 5] and t[1][1][0].tolist() == [255, 255, 6, 2]
    # cocostuff's stuffthingmaps (id - 1, 255 unlabelled) give the same classes
    other = write_coco(str(tmp_path / "cocostuff"), [[[255, 91, 105, 0]] * 4], thing[:1], layout="stuffthingmaps")
    assert data.COCOSegmentation(other, "val", labels="stuff")[0][1][0].tolist() == [255, 11, 8, 255]
    assert len(data.COCOSegmentation(root, "val", labels="stuff", fraction=0.5, seed=3)) == 1
    with pytest.raises(data.DataError, match="thing maps"):
        data.COCOSegmentation(other, "train", labels="thing")


def test_youtube_vos_split_and_timet_category_maps(tmp_path):
    from conftest import write_ytvos
    m = torch.tensor([[[0, 1], [2, 3]]]).repeat_interleave(4, 1).repeat_interleave(4, 2)  # (1, 8, 8)
    videos = {f"v{i}": ({1: "person", 2: "dog", 3: "ape"}, m.repeat(2, 1, 1)) for i in range(10)}
    root = write_ytvos(str(tmp_path / "train"), videos)
    assert data.dataset_kind(root) == "youtube-vos"
    val, train = data.YouTubeVOS(root, "val", seed=1), data.YouTubeVOS(root, "train", seed=1)
    assert len(val) == 2 and len(train) == 8 and not set(val.names) & set(train.names)
    assert data.YouTubeVOS(root, "val", seed=1).names == val.names != data.YouTubeVOS(root, "val", seed=2).names
    assert val.categories == ["ape", "dog", "person"]  # make_categories_dict: sorted, 1-based
    item = val[0]
    assert item["frames"].shape == (2, 3, 8, 8) and item["masks"][0, ::4, ::4].tolist() == [[0, 1], [2, 3]]
    # map_instances: 1 -> person (3), then 3 -> ape (1) also rewrites the former instance 1 (as officially)
    assert val.category_map(item["masks"], item["objects"])[0, ::4, ::4].tolist() == [[0, 1], [2, 1]]


def test_voc_trainaug_reads_segmentation_class_aug_beside_voc2012(tmp_path, monkeypatch):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(voc / sub)
    os.makedirs(tmp_path / "VOCdevkit" / "SegmentationClassAug")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(voc / "JPEGImages" / "a.jpg")
    data.save_mask(tmp_path / "VOCdevkit" / "SegmentationClassAug" / "a.png", np.full((4, 4), 7))
    (voc / "ImageSets/Segmentation/trainaug.txt").write_text("a\n")
    monkeypatch.chdir(tmp_path)  # a relative root
    assert data.VOCSegmentation("VOCdevkit/VOC2012", "trainaug")[0][1].unique().tolist() == [7]


# ------------------------------------------------------------------------------- augmentation
def test_batched_blur_is_torchvisions_per_image_blur():
    import torchvision.transforms.v2.functional as TF
    x = torch.rand(5, 3, 20, 20)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0])
    sizes = 2 * torch.ceil(3 * sigma).long() + 1  # DoRA's kernel sizes: 3, 5, 7, 11, 13
    out = data.gaussian_blur(x, sigma, sizes, max_kernel=13)
    for b in range(5):
        assert torch.allclose(out[b], TF.gaussian_blur(x[b], [int(sizes[b])] * 2, [float(sigma[b])] * 2), atol=1e-6)


def test_batched_colour_ops_draw_torchvisions_distributions():
    torch.manual_seed(0)
    x = torch.rand(2000, 3, 4, 4) * 0.5 + 0.25
    factor = (data.color_jitter(x, 0.4, 0, 0, 0) / x).mean((1, 2, 3))  # brightness alone: uniform [0.6, 1.4]
    assert factor.min() > 0.6 - 1e-4 and factor.max() < 1.4 + 1e-4 and abs(factor.mean() - 1) < 0.02
    assert abs(factor.std() - 0.8 / 12 ** 0.5) < 0.01
    moved = (data.color_jitter(x, 0.4, 0.4, 0.2, 0.1, p=0.8) - x).abs().amax((1, 2, 3)) > 1e-6
    assert abs(moved.float().mean() - 0.8) < 0.03
    gray = data.random_grayscale(x, 0.2)
    is_gray = (gray.std(1).amax((1, 2)) < 1e-6).float()
    assert abs(is_gray.mean() - 0.2) < 0.03
    luma = 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(gray[is_gray.bool()][:, 0], luma[is_gray.bool()])


def test_batched_resized_crops_are_torchvisions_one_by_one():
    """resized_crops: F.interpolate's weights as matrices: bilinear (DoRA's clip crops) and antialiased bicubic (PIL's
    kernel: DoRA's local crops), up and down; a per-axis blur is torchvision's with two sigmas."""
    import torchvision.transforms.v2 as T
    import torchvision.transforms.v2.functional as TF
    torch.manual_seed(0)
    x, boxes = torch.rand(40, 3, 40, 30), data.random_boxes(40, 40, 30, (0.05, 1.0))
    for antialias, mode in ((False, T.InterpolationMode.BILINEAR), (True, T.InterpolationMode.BICUBIC)):
        for size in (12, 64):
            ours = data.resized_crops(x, boxes, size, antialias)
            for b in range(40):
                box = [int(v) for v in boxes[b]]
                assert torch.allclose(ours[b], TF.resized_crop(x[b], *box, [size, size], mode, antialias=antialias),
                                      atol=1e-5)
    sigma = torch.tensor([[0.3, 1.5], [2.0, 0.1]])
    out = data.gaussian_blur(x[:2], sigma, 2 * torch.ceil(3 * sigma).long() + 1, max_kernel=13)
    for b in range(2):
        assert torch.allclose(out[b], TF.gaussian_blur(x[b], [int(2 * math.ceil(3 * s) + 1) for s in sigma[b].flip(0)],
                                                       sigma[b].flip(0).tolist()), atol=1e-6)


def test_random_boxes_draw_what_random_resized_crop_draws():
    """random_boxes: RandomResizedCrop.get_params, batched: the same box statistics, the same fallback."""
    import torchvision.transforms.v2 as T
    torch.manual_seed(0)
    for (H, W), scale in (((300, 300), (0.05, 0.4)), ((60, 80), (0.2, 1.0)), ((100, 300), (0.5, 1.0))):
        ours = data.random_boxes(3000, H, W, scale)
        ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, H, W), scale, (3 / 4, 4 / 3))
                            for _ in range(3000)]).float()
        assert ((ours.mean(0) - ref.mean(0)).abs() < 0.05 * H).all(), (ours.mean(0), ref.mean(0))
        assert ((ours.std(0) - ref.std(0)).abs() < 0.05 * H).all()
        assert (ours[:, :2] + ours[:, 2:] <= torch.tensor([H, W])).all()
    assert data.random_boxes(5, 100, 300, (0.5, 1.0)).tolist() == [[0, 83, 100, 133]] * 5  # no try fits: the centre


def test_youtube_vos_meta_json_mistakes_are_one_line_errors_naming_it(tmp_path):
    from conftest import write_ytvos
    m = torch.tensor([[[0, 1], [2, 0]]]).repeat_interleave(4, 1).repeat_interleave(4, 2)  # (1, 8, 8), objects 1, 2
    root = write_ytvos(str(tmp_path / "train"), {"v0": ({1: "person"}, m)})  # object 2 missing from meta.json
    meta = os.path.join(root, "meta.json")
    with pytest.raises(data.DataError, match=f"{meta}: no object 2 under video v0"):
        data.YouTubeVOS(root, "val", train_fraction=0)[0]
    open(meta, "w").write('{"videos": ')
    with pytest.raises(data.DataError, match=f"{meta}: not a JSON file with 'videos'"):
        data.YouTubeVOS(root)
    os.remove(meta)  # still named a YouTube-VOS root, so that the error names the missing meta.json
    with pytest.raises(data.DataError, match=f"{meta}: no such file"):
        data.inspect(root)


def test_coco_ten_percent_of_a_few_images_keeps_one_and_an_empty_folder_is_an_error(tmp_path):
    from conftest import write_coco
    root = write_coco(str(tmp_path / "coco"), [[[92, 94]]] * 3, [[[1, 2]]] * 3)
    assert len(data.COCOSegmentation(root, "val", fraction=0.1)) == 1  # int(0.3) = 0 would leave nothing to train on
    for f in os.listdir(os.path.join(root, "coco/images/val2017")):
        os.remove(os.path.join(root, "coco/images/val2017", f))
    with pytest.raises(data.DataError, match="val2017: no images"):
        data.COCOSegmentation(root, "val")


# ------------------------------------------------------------------ CIFAR, SVHN, ADE20K as downloaded
def test_cifar_svhn_ade20k_readers(tmp_path):
    import pickle
    import scipy.io
    from PIL import Image
    rng = np.random.default_rng(0)
    ten = tmp_path / "cifar-10-batches-py"  # torchvision's layout: pickled dicts, rows of 3 x 32 x 32 (R, G, B planes)
    ten.mkdir()
    rows = rng.integers(0, 256, (7, 3072), dtype=np.uint8)
    for i in range(1, 6):
        (ten / f"data_batch_{i}").write_bytes(pickle.dumps({"data": rows[i - 1:i], "labels": [i], "filenames": []}))
    (ten / "test_batch").write_bytes(pickle.dumps({"data": rows[5:7], "labels": [3, 9]}))
    (ten / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    train, test = data.SmallImages(str(ten), "train"), data.SmallImages(str(ten), "val")
    assert (len(train), train.targets, test.targets, train.classes[9]) == (5, [1, 2, 3, 4, 5], [3, 9], "c9")
    assert torch.equal(test[1][0][2, 0, :4], torch.from_numpy(rows[6, 2048:2052]))  # blue plane, first row
    hundred = tmp_path / "cifar-100-python"
    hundred.mkdir()
    (hundred / "test").write_bytes(pickle.dumps({"data": rows[:2], "fine_labels": [42, 7], "coarse_labels": [1, 2]}))
    (hundred / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)]}))
    assert data.SmallImages(str(hundred), "test").targets == [42, 7] and data.dataset_kind(str(hundred)) == "cifar"
    (hundred / "train").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle naming os.system is refused, not run
    with pytest.raises(data.DataError, match="train: not a CIFAR python batch"):
        data.SmallImages(str(hundred), "train")
    svhn = tmp_path / "svhn"
    svhn.mkdir()
    x = rng.integers(0, 256, (32, 32, 3, 2), dtype=np.uint8)
    scipy.io.savemat(svhn / "test_32x32.mat", {"X": x, "y": np.array([[10], [4]], np.uint8)})
    ds = data.SmallImages(str(svhn), "test")
    assert ds.targets == [0, 4] and torch.equal(ds[1][0], torch.from_numpy(x[..., 1]).permute(2, 0, 1))
    assert data.dataset_kind(str(svhn)) == "svhn"
    ade = tmp_path / "ADEChallengeData2016"
    for sub in ("images/validation", "annotations/validation"):
        (ade / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(ade / "images/validation/ADE_val_00000001.jpg")
    ids = np.array([[0, 1, 150, 7, 7, 7]] * 4, np.uint8)
    Image.fromarray(ids).save(ade / "annotations/validation/ADE_val_00000001.png")
    assert data.dataset_kind(str(ade)) == "ade20k"
    img, mask = data.ADE20K(str(ade), "val")[0]
    assert img.shape == (3, 4, 6) and mask[0].tolist() == [255, 0, 149, 6, 6, 6]  # 0 = 'other' -> ignored


def test_ema_update_moves_only_what_trains_and_host_stats_stops_a_nan_loss():
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    student.bias.requires_grad_(False)  # a frozen tensor: the teacher's copy stays where it is
    weight, bias = teacher.weight.clone(), teacher.bias.clone()
    data.ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, 0.9 * weight + 0.1 * student.weight) and torch.equal(teacher.bias, bias)
    assert data.host_stats({"loss": torch.tensor(1.5), "n": torch.tensor(2)}) == {"loss": 1.5, "n": 2.0}
    with pytest.raises(FloatingPointError, match="loss is nan"):
        data.host_stats({"loss": torch.tensor(float("nan"))})
