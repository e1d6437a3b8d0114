"""Helpers shared by the test files: `from conftest import ...` (pytest puts tests/ on sys.path)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402


def own_video_and_tiny_world(tmp_path, world="runs/synth"):
    """tmp_path/mine/walk.mp4 (a square crossing a brightening background; no synthetic world beside it),
    and a tiny synthetic world in tmp_path/<world> (runs/synth: where the demo looks; kept, it is current)."""
    frames = np.zeros((24, 48, 64, 3), np.uint8)
    for t in range(24):
        frames[t] = 40 + 3 * t
        frames[t, 10:30, 2 * t:2 * t + 20] = (220, 60, 40)
    data.write_video(tmp_path / "mine" / "walk.mp4", frames)
    data.synth_world(str(tmp_path / world), 0, num_videos=1, num_frames=16, size=64, num_images=(12, 6),
                     crops_per_class=(6, 3), crop_size=32)
    return str(tmp_path / "mine" / "walk.mp4")


def run_demo(method, tmp_path, *argv):
    """`python <method>.py --demo ...` in tmp_path: exit status 0, then the last line of stdout as JSON."""
    run = subprocess.run([sys.executable, os.path.join(REPO, f"{method}.py"), "--demo", *argv], cwd=tmp_path,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _rank_tensors(obj, prefix="") -> dict:
    """Every tensor a train() returns, by a path name: modules' state dicts, tensors, lists of ints (members)."""
    import torch
    if isinstance(obj, torch.nn.Module):
        return {f"{prefix}{k}": v.detach().cpu() for k, v in obj.state_dict().items()}
    if isinstance(obj, torch.Tensor):
        return {prefix.rstrip("."): obj.detach().cpu()}
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in _rank_tensors(item, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(i, int) for i in obj):
        return {prefix.rstrip("."): torch.tensor(obj)}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, item in enumerate(obj) for k, v in _rank_tensors(item, f"{prefix}{i}.").items()}
    return {}


def _train_rank(rank, world, port, jobs, out):
    """One torchrun-like process: the environment torchrun sets, then <method>.train(get_args(argv)) for each
    (method, argv) of jobs in turn (one process for all: importing torch costs seconds)."""
    import importlib
    import torch
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    for n, (method, argv) in enumerate(jobs):
        os.environ["MASTER_PORT"] = str(port + n)
        module = importlib.import_module(method)
        result = module.train(module.get_args(argv))
        assert not torch.distributed.is_initialized(), f"{method}.train() left its process group open"
        torch.save(_rank_tensors(result), os.path.join(out, f"{method}_rank{rank}.pt"))


def train_on_ranks(jobs, world, out) -> dict:
    """Each (method, argv) of jobs trained on `world` gloo processes, as torchrun would start them
    -> {method: [each rank's tensors]}."""
    import socket
    import torch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(out, exist_ok=True)
    torch.multiprocessing.spawn(_train_rank, args=(world, port, list(jobs), str(out)), nprocs=world)
    ranks = {m: [torch.load(os.path.join(out, f"{m}_rank{r}.pt"), weights_only=True) for r in range(world)]
             for m, _ in jobs}
    shutil.rmtree(out)  # the ranks' hand-over only (~100 MB a rank): CI's /tmp keeps three runs of the suite
    return ranks


def assert_ranks_equal(ranks) -> None:
    """Every rank holds exactly rank 0's tensors (students, teachers, centres, prototypes, labels, clusters)."""
    import torch
    for r, tensors in enumerate(ranks[1:], 1):
        assert tensors.keys() == ranks[0].keys()
        for k, v in tensors.items():
            assert torch.equal(v, ranks[0][k]), f"rank {r} differs from rank 0 at {k}"


def resume_records(log_path) -> list:
    """The (saved_world_size, world_size) of each resume that log.jsonl records."""
    records = [json.loads(line) for line in open(log_path)]
    return [(r["saved_world_size"], r["world_size"]) for r in records if "resumed_at_epoch" in r]


# COCO-Stuff / panoptic ids and supercategories as the official JSON files have them (one per supercategory)
STUFF_CATS = [(92, "banner", "textile"), (94, "branch", "plant"), (95, "bridge", "building"),
              (98, "cabinet", "furniture"), (99, "cage", "structural"), (100, "cardboard", "raw-material"),
              (101, "carpet", "floor"),
              (102, "ceiling-other", "ceiling"), (106, "clouds", "sky"), (111, "dirt", "ground"),
              (121, "food-other", "food"), (127, "hill", "solid"), (148, "river", "water"),
              (171, "wall-brick", "wall"), (180, "window-blind", "window"), (183, "other", "other")]
THING_CATS = [(1, "person", "person", 1), (2, "bicycle", "vehicle", 1), (10, "traffic light", "outdoor", 1),
              (16, "bird", "animal", 1), (27, "backpack", "accessory", 1), (35, "skis", "sports", 1),
              (44, "bottle", "kitchen", 1), (52, "banana", "food", 1), (62, "chair", "furniture", 1),
              (72, "tv", "electronic", 1), (78, "microwave", "appliance", 1), (84, "book", "indoor", 1),
              (92, "banner", "textile", 0), (184, "tree-merged", "plant", 0), (200, "rug-merged", "textile", 0)]


def write_coco(root, stuff_maps, thing_maps, layout="leopart"):
    """A COCO root with val2017 images and the given (H, W) id maps, one per image: Leopart's layout
    (annotations/annotations/stuff_annotations, annotations/panoptic_annotations, coco/images) or cocostuff's
    stuffthingmaps (values id - 1) beside val2017/."""
    from PIL import Image
    leopart = layout == "leopart"
    images = os.path.join(root, "coco/images/val2017" if leopart else "val2017")
    stuff = os.path.join(root, "annotations/annotations/stuff_annotations" if leopart else "annotations")
    pan = os.path.join(root, "annotations/panoptic_annotations")
    folders = [images, stuff, os.path.join(stuff, "stuff_val2017_pixelmaps") if leopart else
               os.path.join(root, "stuffthingmaps_trainval2017/val2017"),
               os.path.join(pan, "semantic_segmentation_val2017")]
    for f in folders:
        os.makedirs(f, exist_ok=True)
    json.dump({"categories": [dict(id=i, name=n, supercategory=s) for i, n, s in STUFF_CATS]},
              open(os.path.join(stuff, "stuff_val2017.json"), "w"))
    json.dump({"categories": [dict(id=i, name=n, supercategory=s, isthing=t) for i, n, s, t in THING_CATS]},
              open(os.path.join(pan, "panoptic_val2017.json"), "w"))
    for k, (s, t) in enumerate(zip(stuff_maps, thing_maps)):
        name = f"{k:012d}"
        Image.fromarray(np.full((*np.shape(s), 3), 40 * k % 250, np.uint8)).save(os.path.join(images, name + ".jpg"))
        Image.fromarray(np.asarray(s, np.uint8)).save(os.path.join(folders[2], name + ".png"))
        Image.fromarray(np.asarray(t, np.uint8)).save(os.path.join(folders[3], name + ".png"))
    return root


def write_ytvos(root, videos):
    """A YouTube-VOS train/ root: videos {name: ({instance id: category}, (T, H, W) instance maps)}; frames show
    instance i in grey 60 * i."""
    from PIL import Image
    meta = {"videos": {}}
    for name, (objects, masks) in videos.items():
        meta["videos"][name] = {"objects": {str(i): {"category": c, "frames": []} for i, c in objects.items()}}
        for sub in ("JPEGImages", "Annotations"):
            os.makedirs(os.path.join(root, sub, name), exist_ok=True)
        for t in range(len(masks)):
            frame = Image.fromarray(np.repeat(60 * np.asarray(masks[t], np.uint8)[..., None], 3, 2))  # objects seen
            frame.save(os.path.join(root, "JPEGImages", name, f"{5 * t:05d}.jpg"))
            data.save_mask(os.path.join(root, "Annotations", name, f"{5 * t:05d}.png"), np.asarray(masks[t]))
    json.dump(meta, open(os.path.join(root, "meta.json"), "w"))
    return root


def own_photos(folder, n=16, h=48, w=64):
    """n PNGs unlike the synthetic world (colour gradients under noise), as a user's folder of photographs."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng, y, x = np.random.default_rng(1), *np.mgrid[0:h, 0:w]
    for i in range(n):
        base = np.stack([x * (i + 1) % 256, (3 * y + 7 * i) % 256, 2 * (x + y) % 256], -1)
        noisy = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(f"{folder}/{i}.png")
    return str(folder)


def own_noisy_video(path, num_frames=32, h=48, w=64):
    """An mp4 unlike the synthetic world: a drifting colour gradient under noise (data.write_video)."""
    rng, y, x = np.random.default_rng(2), *np.mgrid[0:h, 0:w]
    frames = [np.stack([(x + 3 * t) % 256, (2 * y + t) % 256, (2 * (x - y) + 5 * t) % 256], -1)
              for t in range(num_frames)]
    noise = rng.normal(0, 20, (num_frames, h, w, 3))
    data.write_video(path, np.clip(np.stack(frames) + noise, 0, 255).astype(np.uint8))
    return str(path)


def draw_from_every_stream(*args, **kwargs):
    """Stands in for a demo's evaluation: it draws from python's, numpy's and torch's global streams, as one may."""
    import random

    import torch
    random.random(), np.random.rand(), torch.rand(3)
    return {}


def one_run_and_two_pieces(module, tmp_path, *argv):
    """`<method>.py --demo --epochs 2 ARGV` through the command line's entry point (data.cli(main)), once straight and
    once in two pieces (--stop-after 1, then --resume) -> the two final checkpoints."""
    for out, pieces in (("straight", [[]]), ("pieces", [["--stop-after", "1"], ["--resume"]])):
        for extra in pieces:
            data.cli(module.main, module.get_args, ["--demo", *argv, "--epochs", "2",
                                                    "--output-dir", str(tmp_path / out), *extra])
    return [data.load_checkpoint(tmp_path / out / "checkpoint.pth") for out in ("straight", "pieces")]
