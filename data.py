"""Data for every method and benchmark in this repo, plus the run plumbing they share.

Everything a method file reads comes through here, and the synthetic world the demos and tests run on.

Sections:
  run plumbing    distributed set-up, AMP, seeding, cosine schedules, atomic checkpoints (one loader for every
                  checkpoint read), the output folder, JSONL logs, the CLI entry point
  images          load_image / load_mask, ImageFolder, UnlabelledImages (also video frames), VOCSegmentation, DAVIS,
                  COCOSegmentation (COCO-Stuff / -Thing), YouTubeVOS
  videos          probe_video, read_frames (PyAV: decodes only what the frames need, seeking at keyframes;
                  decode-time resize; decoder threads shared by a node's ranks and workers), extract (a video
                  to a frame folder), find_videos, VideoClips (one item per clip start; DDP/worker safe), ImagesOrFrames
  augmentation    batched on the training device: color_jitter, random_grayscale, gaussian_blur, random_boxes,
                  resized_crops (RandomResizedCrop's boxes; F.interpolate's crops as matrix products)
  LM files        ByteTokenizer, BPETokenizer (GPT-2's byte-level BPE, `tokenizers`), read_hf_folder
  synthetic world SyntheticWorld (in memory), synth_world / ensure_synth (writes the layouts), demo_eval_root
  pictures        labelled_grid: every picture of the repo, with a title strip and row/column names
  inspect         dataset_kind, what the loaders see at a path (printed, and a contact sheet), --bench;
                  bench_train: a method's --bench N (loader and step rates, memory, MFU, one JSON line)
  command line    python data.py synth --out runs/synth [--seed 0]
                  python data.py inspect PATH [--bench] [--sheet sheet.png]
                  python data.py extract VIDEO --out DIR [--short-side 640] [--workers N]

Bad input raises DataError("<path>: <what is wrong>"), printed by cli() as one line `error: ...`; inside a dataset
an unreadable file is skipped with a warning and counted in `.num_skipped`.
"""
from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import contextlib
import functools
import glob
import io
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass

import av
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".3gp", ".mpg", ".mpeg", ".mts", ".m2ts", ".wmv", ".flv")


class DataError(ValueError):
    """A bad input; the message is one line naming the path and what is wrong."""


class Unreadable(DataError):
    """A single file that cannot be decoded; datasets skip these (with a warning)."""


class CheckpointError(RuntimeError):
    """A missing, truncated or foreign checkpoint file; the file itself is left alone."""


# =============================================================================== run plumbing
@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def init_distributed() -> Dist:
    """Read torchrun's environment; one process (no process group) when WORLD_SIZE is unset or 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, device, rank == 0)


def broadcast_module(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer set to rank 0's in place, as DDP does for the student: for teachers."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, 0)
    return module


def finish_distributed() -> None:
    """End of train(): the ranks meet, the group closes; rank 0's evaluation then keeps no rank waiting."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def resume_step(ckpt: dict | None, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step) a run starts from: (0, 0), or after the checkpoint's (epoch-end) epochs, the step recounted
    with this run's steps per epoch, so a run continues on any other number of processes."""
    epoch = ckpt["epoch"] if ckpt is not None else 0
    return epoch, epoch * steps_per_epoch


def resolve_amp(amp: str | None, device) -> str:
    """None picks the best: bf16 on CUDA that supports it, fp16 on older CUDA, none on CPU."""
    device = torch.device(device)
    if amp is None:
        return "none" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp not in ("bf16", "fp16", "none"):
        raise DataError(f"--amp {amp!r}: expected bf16, fp16 or none")
    if amp == "fp16" and device.type != "cuda":
        raise DataError("--amp fp16 needs a CUDA device; use bf16 or none on CPU")
    return amp


def autocast(device, amp: str):  # the one-line AMP context (nanoGPT style): a no-op for 'none'
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_scaler(amp: str, device):  # scales only for fp16 (bf16 has fp32's range and needs none)
    return torch.amp.GradScaler(torch.device(device).type, enabled=(amp == "fp16"))


def seed_everything(seed: int, rank: int = 0) -> None:  # python, numpy and torch: per-rank streams, reproducible
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def host_stats(stats: dict) -> dict:
    """{name: 0-d tensor} -> {name: float}: the step's one host sync; a non-finite "loss" stops the run."""
    values = dict(zip(stats, torch.stack([v.detach().float() for v in stats.values()]).tolist()))
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"loss is {values['loss']}; try --amp none or a lower --lr")
    return values


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over the student's tensors that train (DINO)."""
    pairs = [(t, s) for s, t in zip(student.parameters(), teacher.parameters()) if s.requires_grad]
    torch._foreach_mul_([t for t, _ in pairs], momentum)
    torch._foreach_add_([t for t, _ in pairs], [s for _, s in pairs], alpha=1 - momentum)


def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, start_warmup=0.0) -> np.ndarray:
    """One value per step: linear warm-up from start_warmup to base, then cosine to final (DINO)."""
    warmup_steps = int(warmup_epochs * steps_per_epoch)
    warmup = np.linspace(start_warmup, base, warmup_steps)
    steps = np.arange(epochs * steps_per_epoch - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    return np.concatenate([warmup, cosine])


def save_checkpoint(state: dict, path) -> None:
    """Write to path.tmp, flush to disk, then rename: a crash never leaves a half-written path."""
    path, tmp = str(path), f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C inside torch.save surfaces as a zip-writer error
            raise KeyboardInterrupt from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, method: str | None = None, flag: str = "") -> dict:
    """torch.load on CPU, weights_only; anything wrong is a one-line CheckpointError naming `flag` and
    the file. method: refuse a checkpoint of another method file, saying what the file holds."""
    path, where = str(path), f"{flag} {path}".strip()
    if os.path.isdir(path):
        raise CheckpointError(f"{where}: is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{where}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{where}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        if f.read(2)[:1] not in (b"P", b"\x80"):  # torch.save writes a zip (PK), or (legacy) a pickle
            raise CheckpointError(f"{where}: not a checkpoint (not a file that torch.save writes)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO's full checkpoints store their args
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, text, foreign objects: all the same to the user
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: holds a {type(state).__name__}, expected a checkpoint dict")
    if method and state.get("method") != method:
        raise CheckpointError(f"{where}: holds {describe_checkpoint(state)}, not a {method}.py checkpoint")
    return state


def describe_checkpoint(state: dict) -> str:
    """What a loaded checkpoint holds, for one-line messages, e.g. 'a dora.py checkpoint (vit_demo/8, epoch 2)'."""
    if "method" in state:
        args = state.get("args") or {}
        arch = args.get("arch") or "encoder " + str(args.get("encoder_arch", "?"))  # secat.py: a frozen encoder
        return (f"a {state['method']}.py checkpoint ({arch}/{args.get('patch_size', '?')}, "
                f"epoch {state.get('epoch', '?')})")
    what, weights = backbone_weights(state)
    return (f"{what} (ViT {vit_shape(weights)})" if "cls_token" in weights else what if "ResNet" in what or
            "AlexNet" in what else f"a dict of {len(state)} entries")


# (release, its backbone's key prefix): READMEs strip 1 (Leopart) or 2 (TimeT) levels, the last duplicate winning
RELEASES = (("TimeT's release", "teacher.backbone."), ("TimeT's release", "feature_extractor.backbone."),
            ("Leopart's release", "model."), ("a DINO-style checkpoint", "backbone."), ("DINO-style weights", ""))


def backbone_weights(state: dict) -> tuple[str, dict]:
    """(which release, its backbone's tensors): a ViT under DINO's names (of teacher, else student / model), SeLa's
    AlexNet, torchvision ResNets under their own names; `module.` (DDP) and heads dropped."""
    top = state
    for key in ("teacher", "student", "model", "state_dict"):
        if isinstance(state.get(key), dict) and state[key]:
            state = state[key]
            break
    state = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for what, prefix in RELEASES:
        weights = {k[len(prefix):]: v for k, v in state.items()
                   if k.startswith(prefix) and not k[len(prefix):].startswith(("head.", "prototypes"))}
        if {"cls_token", "conv1.weight", "features.0.weight"} & set(weights) or not prefix:
            break
    if "dino_loss" in top:  # DoRA's main.py saves DINO's checkpoint dict; its args have the clip options
        what = "DoRA's checkpoint" if hasattr(top.get("args"), "frame_per_clip") else "DINO's full checkpoint"
    conv = ("SeLa's AlexNet release" if "classifier.1.weight" in weights else  # named as models/alexnet.py
            "SeLa's pre-activation ResNet-50 (resnetv2, not built here; its torchvision release *_pp.pth is)"
            if "features.2.0.bn1.weight" in weights else ("SeLa's ResNet release" if "labels" in top else
                                                          "a torchvision ResNet (DINO's ResNet-50)")
            if "layer1.0.conv1.weight" in weights else None)  # evaluate.conv_weights renames them for sinkhorn.py
    return conv or what, weights


def vit_shape(weights: dict) -> str:
    """'width 384, 12 blocks, patch 16' from a ViT state dict in DINO's key names."""
    depth = 1 + max((int(k.split(".")[1]) for k in weights if k.startswith("blocks.")), default=-1)
    patch = weights["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in weights else "?"
    return f"width {weights['cls_token'].shape[-1]}, {depth} blocks, patch {patch}"


def read_pretrained(path, flag: str = "--pretrained") -> tuple[dict, dict | None]:
    """-> (ViT state dict in DINO's key names, a repo checkpoint's stored args or None) from DINO's weights or
    checkpoints or a repo checkpoint with a ViT backbone; anything else is one CheckpointError."""
    state = load_checkpoint(path, flag=flag)
    if state.get("method") == "secat":  # its ViT is the frozen --encoder it was given: nothing learned there
        raise CheckpointError(f"{flag} {path}: holds {describe_checkpoint(state)}, a frozen image encoder plus a "
                              "language model; pass the file it took as --encoder instead")
    weights = backbone_weights(state)[1]
    if "cls_token" not in weights:
        raise CheckpointError(f"{flag} {path}: holds {describe_checkpoint(state)}, not ViT weights "
                              "(DINO's key names: cls_token, blocks.*)")
    return weights, (state.get("args") if "method" in state else None)


def load_pretrained(backbone: torch.nn.Module, path, flag: str = "--pretrained") -> dict | None:
    """Strict load of read_pretrained(path) into backbone; -> the stored args of a repo checkpoint or None."""
    weights, stored = read_pretrained(path, flag)
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError:
        ours = backbone.state_dict()
        ours = vit_shape(ours) if "cls_token" in ours else type(backbone).__name__
        raise CheckpointError(f"{flag} {path}: holds a ViT of {vit_shape(weights)}, which does not fit this run's "
                              f"({ours}): set --arch/--patch-size to match") from None
    return stored


def check_output_dir(path, resume=False, overwrite=False, method=None) -> dict | None:
    """prepare_output_dir's checks of the checkpoint there, writing nothing (for work before train());
    -> the checkpoint to continue from (--resume, checked to be of `method`) or None."""
    ckpt_path = os.path.join(str(path), "checkpoint.pth")
    if resume and overwrite:
        raise DataError("--resume and --overwrite: pick one (continue the run there, or start it over)")
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"--output-dir {path}: is a file, not a folder; pick another --output-dir")
    if resume and not os.path.exists(ckpt_path):
        raise CheckpointError(f"--resume: no checkpoint at {ckpt_path}; drop --resume to start a run there")
    if not resume and os.path.exists(ckpt_path) and not overwrite:
        raise DataError(f"{ckpt_path}: an earlier run's checkpoint is there; continue it with --resume, or pick "
                        "another --output-dir (--overwrite starts over and replaces it)")
    return load_checkpoint(ckpt_path, method, "--resume") if resume else None


def prepare_output_dir(path, resume=False, overwrite=False, is_main=True, method=None, world_size=1):
    """check_output_dir, make it, check it is writable (main process) -> (JsonlLogger of log.jsonl, checkpoint path,
    checkpoint to continue or None). --overwrite starts log.jsonl afresh, --resume drops the replayed epochs'."""
    ckpt = check_output_dir(path, resume, overwrite, method)
    ckpt_path, log_path = os.path.join(str(path), "checkpoint.pth"), os.path.join(str(path), "log.jsonl")
    if is_main:
        try:  # fail now, not at the first log line or checkpoint of a long run
            os.makedirs(path, exist_ok=True)
            with tempfile.TemporaryFile(dir=path), open(log_path, "w" if overwrite else "a"):
                pass
        except OSError as e:
            raise DataError(f"--output-dir {path}: cannot be written ({e.strerror}); "
                            "pick another --output-dir") from None
        if ckpt is not None:
            _drop_replayed(log_path, ckpt["epoch"])
            saved = ckpt.get("world_size", "?")  # checkpoints before the world size was saved say "?"
            epochs = ckpt.get("args", {}).get("epochs", "?")  # the schedules span it
            print(f"resumed from {ckpt_path} at epoch {ckpt['epoch']} of --epochs {epochs} (saved by {saved} "
                  f"process(es), now {world_size}; another --epochs is no single run's, --stop-after N splits one)")
            JsonlLogger(log_path).log({"resumed_at_epoch": ckpt["epoch"], "saved_world_size": saved,
                                       "world_size": world_size})
    return JsonlLogger(log_path, is_main), ckpt_path, ckpt


def _drop_replayed(log_path, epoch: int) -> None:
    """Keep the log records of epochs < epoch (and unparsable half lines out): the resumed run logs the rest again."""
    kept = []
    for line in open(log_path):
        with contextlib.suppress(ValueError, AttributeError):
            if json.loads(line).get("epoch", -1) < epoch:
                kept.append(line)
    with open(log_path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(log_path + ".tmp", log_path)


def parse_args(p: argparse.ArgumentParser, argv, demo, workers=8, log_every=10) -> argparse.Namespace:
    """The run flags every method shares, added to p; then argv parsed with the demo's values (a dict, or a function
    of the flags given) as the defaults when --demo is given: every flag the user gives, abbreviated too, still wins."""
    p.add_argument("--num-workers", type=int, default=workers, help="loader processes per GPU")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"], help="default: bf16 on capable GPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pth")
    p.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds a checkpoint")
    p.add_argument("--stop-after", type=int, default=0, help="leave after N epochs; --resume ends as one run would")
    p.add_argument("--log-every", type=int, default=log_every, help="steps between JSON log lines")
    p.add_argument("--bench", type=int, default=0, help="time the loader and N steps (JSON line), train nothing")
    given = p.parse_known_args(argv)[0]
    if given.demo:
        p.set_defaults(**(demo(given) if callable(demo) else demo))
    return p.parse_args(argv)


def cli(main, get_args, argv=None) -> None:
    """Every command line's entry point: DataError, CheckpointError, OSError, a bad flag, SystemExit(message) become
    one line `error: <file or flag>: <what>` on stderr, exit 1 (flag 2, Ctrl-C 130); others keep their traceback."""
    def fail(message, code=1):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(code)

    program = os.path.basename(sys.argv[0])
    captured = io.StringIO()  # argparse prints its usage block, then "prog: error: message", and exits 2
    try:
        with contextlib.redirect_stderr(captured):
            args = get_args(argv)
        sys.stderr.write(captured.getvalue())
        main(args)
    except (DataError, CheckpointError) as e:
        fail(str(e))
    except OSError as e:
        if e.filename is None:
            raise
        fail(f"{e.filename}: {e.strerror or e}")
    except KeyboardInterrupt:
        fail(f"{program}: interrupted; a training run continues from its last checkpoint with --resume", 130)
    except SystemExit as e:
        usage = captured.getvalue().strip().splitlines()[-1:]
        if e.code == 2 and usage and "error: " in usage[0]:
            fail(f"{program}: {usage[0].split('error: ', 1)[1]} (see {program} --help)", 2)
        if isinstance(e.code, str) and not e.code.startswith("error:"):
            fail(e.code.splitlines()[0])
        raise
    finally:  # a run that failed before train()'s end leaves its group open
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class JsonlLogger:
    """`.log(dict)` appends one JSON line to path (only where enabled, i.e. on rank 0)."""

    def __init__(self, path, enabled: bool = True):
        self.path, self.enabled = str(path), enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        plain = {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(plain) + "\n")


# ===================================================================================== images
def _need(path, what="path") -> str:
    path = parent = str(path)
    if not os.path.exists(path):
        while parent and not os.path.exists(parent):  # x.mp4/train: a file given where a folder is expected
            parent = os.path.dirname(parent)
        raise DataError(f"{parent}: is a file, not a folder (looking for {path})" if os.path.isfile(parent)
                        else f"{path}: no such {what}")
    if what.endswith("folder") and not os.path.isdir(path):
        raise DataError(f"{path}: is a file, not a {what}")
    if what in ("image", "mask", "split file") and os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a{'n' if what == 'image' else ''} {what}")
    return path


def _to_rgb(img: Image.Image) -> Image.Image:  # 16/32-bit grey is rescaled (PIL's own convert would clip it at 255)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.round(arr / top * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.asarray(img).clip(0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "RGB":
        img.load()  # (convert would copy it)
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning about palette transparency
    return img.convert("RGB")


def _open_image(path, short_side=None) -> Image.Image:
    path = _need(path, "image")
    try:
        with Image.open(path) as img:
            if not short_side:
                return _to_rgb(img)
            w, h = _resized_size(img.height, img.width, short_side)[::-1]
            img.draft("RGB", (w, h))  # JPEG decodes at 1/2, 1/4, 1/8 scale: big frames never decoded full size
            return _to_rgb(img).resize((w, h), Image.BILINEAR)
    except (OSError, SyntaxError, ValueError) as e:
        raise Unreadable(f"{path}: unreadable image ({e})") from None


def load_image(path) -> torch.Tensor:
    """-> uint8 (3, H, W) RGB, whatever the file's mode (grey, RGBA, palette, 16-bit); channels-last in memory (PIL's
    (H, W, 3) array, as read_frames)."""
    return torch.from_numpy(np.array(_open_image(path))).permute(2, 0, 1)


def load_mask(path) -> torch.Tensor:
    """-> int64 (H, W) class or instance ids from a palette or greyscale PNG; 255 (ignore) kept."""
    path = _need(path, "mask")
    try:
        with Image.open(path) as img:
            mode, ids = img.mode, np.asarray(img).astype(np.int64)
    except (OSError, SyntaxError, ValueError) as e:
        raise Unreadable(f"{path}: unreadable mask ({e})") from None
    if mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(f"{path}: mask has mode {mode}; save masks as palette (P) or greyscale (L) PNGs")
    return torch.from_numpy(ids)


def voc_palette() -> list[int]:
    """The 256-colour palette of Pascal VOC and DAVIS masks, flat [r0, g0, b0, r1, ...]."""
    # bit 3 * level + channel of an index is bit 7 - level of that channel: R, G, B, most significant first
    return [sum(((i >> (3 * lv + c)) & 1) << (7 - lv) for lv in range(8)) for i in range(256) for c in range(3)]


def save_mask(path, mask) -> None:
    """Write int ids (H, W) < 256 as a palette PNG, as VOC and DAVIS ship them."""
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path)


def _list_images(folder, recursive=True, exts=IMAGE_EXTS) -> list[str]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(parent, f) for f in sorted(files) if f.lower().endswith(exts)]
        if not recursive:
            break
    return found


def _skip_bad(paths, load, single) -> tuple[list, list[str]]:
    """-> ([(path, load(path)) that loaded], [the others' errors, warned]); `single`: its DataError is raised."""
    good, problems = [], []
    for path in paths:
        try:
            good.append((path, load(path)))
        except DataError as e:
            if single:
                raise
            warnings.warn(f"skipping {e}")
            problems.append(str(e))
    return good, problems


def _first_problem(problems) -> str:
    return f"; first problem: {problems[0]}" if problems else ""


def _split_ids(list_file) -> list[str]:  # the non-empty lines of a VOC / DAVIS split file
    ids = [line.strip() for line in open(_need(list_file, "split file")) if line.strip()]
    if not ids:
        raise DataError(f"{list_file}: empty split file")
    return ids


def read_json(path, key):  # path's JSON object's `key` entry, or a DataError naming the file
    with open(_need(path, "file")) as f:
        try:
            return json.load(f)[key]
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataError(f"{path}: not a JSON file with {key!r} ({type(e).__name__}: {str(e)[:100]})") from None


def _first(root, *names, what="folder") -> str:  # the first root/<name> that exists (names may hold '*')
    for name in names:
        found = sorted(glob.glob(os.path.join(glob.escape(root), name)))
        if found:
            return found[0]
    raise DataError(f"{root}: no {what} {' or '.join(names)}")


class _SkipUnreadable:
    """Mixin: on an unreadable file, warn once, count it, and serve the next readable sample."""

    def _robust(self, index, load):
        n = len(self)
        for k in range(n):
            j = (index + k) % n
            try:
                return load(j)
            except Unreadable as e:
                if j not in self._bad:
                    self._bad.add(j)
                    warnings.warn(f"skipping {e}", stacklevel=3)
        raise DataError(f"{self.root}: none of its {n} files is readable")

    @property
    def num_skipped(self) -> int:
        return len(self._bad)


class UnlabelledImages(_SkipUnreadable, Dataset):
    """Every image under root (recursive), then every `frame_step`-th frame of every video there (or root: an image
    or a video), item = (transform(uint8 (3,H,W)), -1). Unreadable videos among several are skipped (a warning)."""

    def __init__(self, root, transform=None, frame_step=1):
        root = self.root = _need(root, "image folder or video")
        self.transform, self._bad, self._jpegs = transform, set(), {}
        listed = _list_images(root, exts=IMAGE_EXTS + VIDEO_EXTS) if os.path.isdir(root) else [root]
        if not all(p.lower().endswith(IMAGE_EXTS + VIDEO_EXTS) for p in listed):
            raise DataError(f"{root}: is a file but neither an image nor a video (by its extension)")
        videos = [p for p in listed if p.lower().endswith(VIDEO_EXTS)]
        self.samples = [(p, -1) for p in listed if p.lower().endswith(IMAGE_EXTS)]
        decoded, self.skipped_videos = _skip_bad(videos, lambda v: video_frames_as_jpeg(v, frame_step),
                                                 videos == [root])
        for video, frames in decoded:
            for t, jpeg in frames:
                self._jpegs[len(self.samples)] = jpeg
                self.samples.append((f"{video} frame {t}", -1))
        if not self.samples:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) or readable videos "
                            f"({', '.join(VIDEO_EXTS)}) found{_first_problem(self.skipped_videos)}")

    def __len__(self):
        return len(self.samples)

    def _load(self, j):
        if j in self._jpegs:
            with Image.open(io.BytesIO(self._jpegs[j])) as img:
                return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)  # as load_image
        return load_image(self.samples[j][0])

    def __getitem__(self, i):
        img = self._robust(i, self._load)
        return (self.transform(img) if self.transform else img), -1


class ImageFolder(_SkipUnreadable, Dataset):
    """root/<class_name>/**/*.jpg; `.classes` are folder names with `_` read as a space."""

    def __init__(self, root, transform=None):
        self.root, self.transform, self._bad = _need(root, "folder"), transform, set()
        folders = sorted(d.name for d in os.scandir(root) if d.is_dir())
        per_class = [(f, files) for f in folders if (files := _list_images(os.path.join(root, f)))]
        if not per_class:
            raise DataError(f"{root}: no class folders with images (expected root/<class>/<image>)")
        self.classes = [f.replace("_", " ") for f, _ in per_class]
        self.samples = [(p, label) for label, (_, files) in enumerate(per_class) for p in files]
        self.targets = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img, label = self._robust(i, lambda j: (load_image(self.samples[j][0]), self.samples[j][1]))
        return (self.transform(img) if self.transform else img), label


def _unpickle_numpy(path) -> dict:
    """A pickled dict of numpy arrays and lists (CIFAR's batches); any other class is refused, not run."""
    class NumpyOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if module.split(".")[0] != "numpy":
                raise pickle.UnpicklingError(f"holds {module}.{name}")
            return super().find_class(module, name)
    with open(_need(path, "file"), "rb") as f:
        try:
            return NumpyOnly(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise DataError(f"{path}: not a CIFAR python batch ({e})") from None


class SmallImages(Dataset):
    """CIFAR-10/100 as downloaded (the folders cifar-10-batches-py, cifar-100-python) or SVHN's *_32x32.mat
    (label 10 = digit 0, as torchvision); split train or test (val). item = (transform(uint8 (3, 32, 32)), label)."""

    def __init__(self, root, split="train", transform=None):
        root, self.transform, split = _need(root, "folder"), transform, "train" if split == "train" else "test"
        if os.path.exists(os.path.join(root, f"{split}_32x32.mat")):
            mat = __import__("scipy.io").io.loadmat(os.path.join(root, f"{split}_32x32.mat"))
            self.images, self.classes = torch.from_numpy(mat["X"].transpose(3, 2, 0, 1).copy()), list("0123456789")
            self.targets = [int(y) % 10 for y in mat["y"].flatten()]
            return
        ten = os.path.exists(os.path.join(root, "batches.meta"))
        names = ([f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]) if ten else [split]
        *batches, meta = [_unpickle_numpy(os.path.join(root, n)) for n in names + ["batches.meta" if ten else "meta"]]
        self.images = torch.from_numpy(np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32))
        self.targets = [int(y) for b in batches for y in b["labels" if ten else "fine_labels"]]
        self.classes = meta["label_names" if ten else "fine_label_names"]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return (self.transform(self.images[i]) if self.transform else self.images[i]), self.targets[i]


class ADE20K(_SkipUnreadable, Dataset):
    """ADEChallengeData2016: images/{training,validation}/*.jpg, annotations/<same>/*.png; ids 0 -> 255 (ignored),
    1..150 -> 0..149 (mmseg's reduce_zero_label, as iBOT runs ADE20K). Splits and items as VOCSegmentation's."""

    def __init__(self, root, split="train", transform=None):
        self.root, self.transform, self._bad = _need(root, "folder"), transform, set()
        sub = "training" if split == "train" else "validation"
        self.images = _list_images(_need(os.path.join(root, "images", sub), "folder"), recursive=False)
        self.masks = [os.path.join(root, "annotations", sub, os.path.basename(p)[:-4] + ".png") for p in self.images]
        self.class_names, self.num_classes = [str(i) for i in range(1, 151)], 150  # objectInfo150.txt's ids

    def __len__(self):
        return len(self.images)

    def _load(self, j):
        return load_image(self.images[j]), (load_mask(self.masks[j]) - 1) % 256  # 0 ('other') -> 255

    def __getitem__(self, i):
        img, mask = self._robust(i, self._load)
        return self.transform(img, mask) if self.transform else (img, mask)


VOC_CLASSES = ("background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
               "motorbike person pottedplant sheep sofa train tvmonitor").split()


class VOCSegmentation(_SkipUnreadable, Dataset):
    """Pascal VOC layout: JPEGImages/<id>.jpg, SegmentationClass/<id>.png, ImageSets/Segmentation/<split>.txt
    ("trainaug": SegmentationClassAug/ in root or beside it); item = transform(uint8 (3,H,W), mask (H,W), 255 = ignore);
    classes: root/classes.txt (line index = id) if present, else VOC's 21."""

    def __init__(self, root, split="train", transform=None):
        self.root, self.transform, self._bad = _need(root, "folder"), transform, set()
        ids = _split_ids(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"))
        self.images = [os.path.join(root, "JPEGImages", i + ".jpg") for i in ids]
        masks = os.path.join(root, "SegmentationClass")
        if split == "trainaug":  # Leopart's linear probe: SBD's masks, in root or beside it (VOCdevkit/)
            masks = _first(root, "SegmentationClassAug", os.path.join("..", "SegmentationClassAug"))
        self.masks = [os.path.join(masks, i + ".png") for i in ids]
        names_file = os.path.join(root, "classes.txt")
        self.class_names = ([n.strip() for n in open(names_file) if n.strip()] if os.path.exists(names_file)
                            else list(VOC_CLASSES))
        self.num_classes = len(self.class_names)

    def __len__(self):
        return len(self.images)

    def _load(self, j):
        img, mask = load_image(self.images[j]), load_mask(self.masks[j])
        if img.shape[1:] != mask.shape:
            raise DataError(f"{self.masks[j]}: mask is {tuple(mask.shape)} but its image is {tuple(img.shape[1:])}")
        return img, mask

    def __getitem__(self, i):
        img, mask = self._robust(i, self._load)
        return self.transform(img, mask) if self.transform else (img, mask)


class DAVIS(Dataset):
    """DAVIS-2017 layout: JPEGImages/<res>/<seq>/*.jpg, Annotations/<res>/<seq>/*.png, ImageSets/2017/<split>.txt.
    item = dict(name, frames uint8 (T,3,H,W), masks int64 (T,H,W) (0 = background, 255: no annotation), palette)."""

    def __init__(self, root, split="val", resolution="480p"):
        self.root = _need(root, "folder")
        self.names = _split_ids(os.path.join(root, "ImageSets", "2017", f"{split}.txt"))
        self.frame_dirs = [os.path.join(root, "JPEGImages", resolution, n) for n in self.names]
        self.mask_dirs = [os.path.join(root, "Annotations", resolution, n) for n in self.names]

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        frame_paths = _list_images(_need(self.frame_dirs[i], "sequence folder"), recursive=False)
        if not frame_paths:
            raise DataError(f"{self.frame_dirs[i]}: no frames")
        frames = torch.stack([load_image(p) for p in frame_paths])
        masks = torch.full((len(frame_paths), *frames.shape[2:]), 255, dtype=torch.int64)
        palette = None
        for t, p in enumerate(frame_paths):
            mask_path = os.path.join(self.mask_dirs[i], os.path.splitext(os.path.basename(p))[0] + ".png")
            if os.path.exists(mask_path):
                mask = load_mask(mask_path)
                if mask.shape != frames.shape[2:]:
                    raise DataError(f"{mask_path}: mask is {tuple(mask.shape)} but its frame is "
                                    f"{tuple(frames.shape[2:])}")
                masks[t] = mask
                if palette is None:
                    with Image.open(mask_path) as img:
                        palette = img.getpalette()
        return dict(name=self.names[i], frames=frames, masks=masks, palette=palette)


class COCOSegmentation(VOCSegmentation):
    """COCO 2017 as Leopart's COCOSegmentation (coco_data_module.py), classes = supercategories sorted by name.
    labels "stuff": 15, of stuff_<split>2017_pixelmaps (0 = things, 183 = "other" -> 255) or of cocostuff's
    stuffthingmaps*/<split>2017 (id - 1); "thing": 12, of panopticapi's semantic_segmentation_<split>2017 (stuff
    -> 255). Images <split>2017/ in root, images/ or coco/images/; fraction: a seeded sample (Leopart: 10 %)."""

    def __init__(self, root, split="val", transform=None, labels="stuff", fraction=1.0, seed=0):
        self.root, self.transform, self._bad = _need(root, "folder"), transform, set()
        deep = ["", "*/", "*/*/", "*/*/*/"]
        names = ((f"stuff_{split}2017_pixelmaps", f"stuffthingmaps*/{split}2017", "stuff_val2017.json") if labels
                 == "stuff" else (f"semantic_segm*_{split}2017", "panoptic_val2017.json"))
        maps = _first(root, *[d + n for n in names[:-1] for d in deep], what=f"{labels} maps")
        categories = read_json(_first(root, *[d + names[-1] for d in deep], what="file"), "categories")
        keep = [c for c in categories if (c["supercategory"] != "other" if labels == "stuff" else c["isthing"])]
        self.class_names = sorted({c["supercategory"] for c in keep})
        self.num_classes = len(self.class_names)
        self.lut = torch.full((257,), 255, dtype=torch.int64)  # Leopart's cat_id_map
        self.lut[[c["id"] for c in keep]] = torch.tensor([self.class_names.index(c["supercategory"]) for c in keep])
        self.offset = int("stuffthingmaps" in maps)  # stuffthingmaps hold id - 1, 255 = unlabelled
        folder = _first(root, f"{split}2017", f"images/{split}2017", f"coco/images/{split}2017")
        if not (images := _list_images(folder, False)):
            raise DataError(f"{folder}: no images")
        keep = sorted(random.Random(seed).sample(range(len(images)), max(1, int(len(images) * fraction))))
        self.images = images if fraction >= 1 else [images[i] for i in keep]
        self.masks = [os.path.join(maps, os.path.splitext(os.path.basename(p))[0] + ".png") for p in self.images]

    def _load(self, j):
        img, mask = super()._load(j)
        return img, self.lut[(mask + self.offset).clamp(0, 256)]


class YouTubeVOS(DAVIS):
    """YouTube-VOS train/ layout (JPEGImages/, Annotations/, meta.json) split 80/20 as TimeT's train1/val1 (unseeded
    there; here random.Random(seed)). Items as DAVIS's plus `objects` (meta.json: id -> category)."""

    def __init__(self, root, split="val", seed=0, train_fraction=0.8):
        self.root = _need(root, "folder")
        self.meta = read_json(os.path.join(root, "meta.json"), "videos")
        names = sorted(d.name for d in os.scandir(_need(os.path.join(root, "JPEGImages"), "folder")) if d.is_dir())
        random.Random(seed).shuffle(names)
        self.split = {"train": sorted(names[:(cut := int(len(names) * train_fraction))]), "val": sorted(names[cut:])}
        self.names = self.split[split]
        self.frame_dirs = [os.path.join(root, "JPEGImages", n) for n in self.names]
        self.mask_dirs = [os.path.join(root, "Annotations", n) for n in self.names]
        # make_categories_dict: every category of meta.json, sorted, 1-based (0 = background)
        self.categories = sorted({o["category"] for v in self.meta.values() for o in v["objects"].values()})

    def __getitem__(self, i):
        item, objects = super().__getitem__(i), self.meta.get(self.names[i], {}).get("objects", {})
        missing = set(item["masks"].unique().tolist()) - {0, 255} - {int(k) for k in objects}
        if missing:  # TimeT's map_instances would fail with a KeyError
            raise DataError(f"{os.path.join(self.root, 'meta.json')}: no object {min(missing)} under video "
                            f"{self.names[i]}, whose masks hold it")
        return dict(item, objects=objects)

    def category_map(self, masks, objects) -> torch.Tensor:
        """TimeT's map_instances on one clip (T, H, W): the clip's instance ids, ascending, each replaced in
        place by its category's index, so that an index equal to a later id is replaced again (as officially)."""
        out = masks.clone()
        for obj in out.unique().tolist():
            if obj not in (0, 255):
                out[out == obj] = self.categories.index(objects[str(obj)]["category"]) + 1
        return out


# ===================================================================================== videos
@dataclass
class VideoInfo:
    path: str
    num_frames: int
    fps: float  # 0.0 for a frame folder (no timing stored)
    height: int
    width: int


def _resized_size(height, width, short_side) -> tuple[int, int]:  # min(H', W') = short_side, the aspect ratio kept
    if not short_side:
        return height, width
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


@functools.lru_cache(maxsize=4096)
def _frame_files(folder) -> tuple[str, ...]:
    return tuple(_list_images(folder, recursive=False))


def probe_video(path) -> VideoInfo:
    """Frame count, fps and size of a video file or a frame folder, without decoding the video."""
    path = _need(path, "video")
    if os.path.isdir(path):
        files = _frame_files(path)
        if not files:
            raise DataError(f"{path}: folder has no frames ({', '.join(IMAGE_EXTS)})")
        try:
            with Image.open(files[0]) as img:
                width, height = img.size
        except OSError as e:
            raise Unreadable(f"{files[0]}: unreadable frame ({e})") from None
        return VideoInfo(path, len(files), 0.0, height, width)
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise Unreadable(f"{path}: no video stream (zero frames?)")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            num_frames = stream.frames
            if not num_frames and stream.duration and fps:  # mkv/webm store no count: estimate from duration
                num_frames = int(round(stream.duration * stream.time_base * fps))
            elif not num_frames and container.duration and fps:
                num_frames = int(round(container.duration / av.time_base * fps))
            height, width = stream.codec_context.height, stream.codec_context.width
    except av.FFmpegError as e:
        raise Unreadable(f"{path}: corrupt or unreadable video ({e})") from None
    if not num_frames or not width:
        raise Unreadable(f"{path}: video has zero frames")
    return VideoInfo(path, int(num_frames), fps, height, width)


DECODED = {"frames": 0}  # frames the decoder has handed out in this process: what the tests and --bench count


def decoder_threads() -> int:
    """PyAV threads per decoder: this node's cores shared out over its ranks (LOCAL_WORLD_SIZE) and their workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    worker = torch.utils.data.get_worker_info()
    return max(1, cores // (int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * (worker.num_workers if worker else 1)))


_KEYFRAMES: dict = {}


def _keyframes(path, stream, fps, start) -> list[int]:
    """Frame indices of the keyframes in the container's index (mp4: every sample in decode order, so a closed
    GOP's keyframe at position i shows frame i; mkv: cues, by time); empty without an index."""
    key = (path, os.stat(path).st_mtime_ns, os.stat(path).st_size)  # a rewritten file is read again
    if key not in _KEYFRAMES:
        entries, tb = stream.index_entries, float(stream.time_base)
        full = len(entries) >= (stream.frames or 1 << 62)
        _KEYFRAMES[key] = [i if full else round((e.timestamp - start) * tb * fps)
                           for i, e in enumerate(entries) if e.is_keyframe]
    return _KEYFRAMES[key]


def _decode_file(path, indices, short_side):
    """Decode only what the wanted frames need: keep decoding forward to the next wanted frame unless a keyframe lies
    between, then seek to that keyframe (decord seeks for every frame, the old loader decoded the whole span)."""
    wanted, need, got = sorted(set(indices)), set(indices), {}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "AUTO", decoder_threads()
        fps = float(stream.average_rate or stream.guessed_rate)
        tb, start = float(stream.time_base), stream.start_time or 0
        height, width = _resized_size(stream.codec_context.height, stream.codec_context.width, short_side)
        keys = _keyframes(path, stream, fps, start)

        def seek(frame_index):  # by presentation time: mp4's index holds decode times, which land a GOP early
            container.seek(start + int(round(frame_index / fps / tb)), stream=stream, backward=True)
            return container.decode(stream)
        frames, position, fresh = None, -1, False
        for f in wanted:
            k = bisect.bisect_right(keys, f) - 1  # the last keyframe at or before f
            if frames is None or (k >= 0 and keys[k] > position):
                frames, fresh = seek(keys[k] if k >= 0 else f), True
            while position < f:
                frame = next(frames, None)
                if frame is None:  # the end: frames past a mis-counted end repeat the last one decoded
                    break
                if frame.pts is None:
                    continue
                index = int(round((frame.pts - start) * tb * fps))
                if fresh and index > f:  # the seek overshot (no index, odd timestamps): one keyframe back
                    k -= 1
                    frames, fresh, position = seek(keys[k] if k >= 0 else 0), k >= 0, -1
                    continue
                fresh, position = False, index
                DECODED["frames"] += 1
                if index in need and index not in got:
                    got[index] = frame.to_ndarray(format="rgb24", width=width, height=height)  # decode-time resize
    if not got:
        raise Unreadable(f"{path}: no frames decoded at {wanted[0]}..{wanted[-1]} (corrupt, or shorter than probed)")
    frames, previous = [], got[min(got)]
    for i in indices:
        previous = got.get(i, previous)
        frames.append(previous)
    return np.stack(frames)


def _read_jpeg(path) -> torch.Tensor:  # libjpeg-turbo straight to (3, H, W): PIL's pixels without PIL's copies
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)  # torchvision 0.29: per call
    try:
        return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise Unreadable(f"{path}: unreadable image ({e})") from None


def read_frames(path, indices, short_side=None) -> torch.Tensor:
    """-> uint8 (T, 3, H', W') for the given frame indices (video file or frame folder), channels-last in memory (the
    decoders' (T, H', W', 3) arrays, no transposing copy: `.contiguous()` where a copy-paster needs one). short_side
    resizes at decode time (PyAV's swscale, PIL's JPEG draft mode): a 4K frame is never held at full size."""
    path, indices = _need(path, "video"), [int(i) for i in indices]
    if os.path.isdir(path):
        files = _frame_files(path)
        if not files or max(indices) >= len(files) or min(indices) < 0:
            raise DataError(f"{path}: asked for frames {min(indices)}..{max(indices)} of {len(files)}")
        if not short_side and all(files[i].lower().endswith((".jpg", ".jpeg")) for i in indices):
            array = np.stack([_read_jpeg(files[i]).permute(1, 2, 0).numpy() for i in indices])
        else:
            array = np.stack([np.asarray(_open_image(files[i], short_side)) for i in indices])
    else:
        try:
            array = _decode_file(path, indices, short_side)
        except av.FFmpegError as e:
            raise Unreadable(f"{path}: corrupt video ({e})") from None
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _extract_part(path, out, first, stop, short_side, quality) -> int:
    """Decode frames first..stop-1 (first is a keyframe) into out/<index>.jpg; -> frames written."""
    written = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps, tb, start = float(stream.average_rate or stream.guessed_rate), float(stream.time_base), stream.start_time
        h, w, start = stream.codec_context.height, stream.codec_context.width, start or 0
        height, width = _resized_size(h, w, min(short_side, h, w))  # never enlarged
        container.seek(start + int(round(first / fps / tb)), stream=stream, backward=True)
        for frame in container.decode(stream):
            index = int(round((frame.pts - start) * tb * fps)) if frame.pts is not None else -1
            if index >= stop:
                break
            if index >= first:
                image = Image.fromarray(frame.to_ndarray(format="rgb24", width=width, height=height))
                image.save(os.path.join(out, f"{index:06d}.jpg"), quality=quality)
                written += 1
    return written


def extract(path, out, short_side=640, workers=None, quality=95) -> int:
    """A video, decoded once (split at keyframes over `workers` processes) -> frame folder out/000000.jpg ...; count"""
    info = probe_video(path)
    with av.open(info.path) as container:
        stream = container.streams.video[0]
        keys = _keyframes(info.path, stream, info.fps, stream.start_time or 0) or [0]
    workers = workers or len(os.sched_getaffinity(0))
    cuts = [keys[round(i * len(keys) / workers)] for i in range(workers)] + [1 << 62]
    parts = sorted(set(zip(cuts[:-1], cuts[1:])))
    os.makedirs(out, exist_ok=True)
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(parts))) as pool:
        jobs = [pool.submit(_extract_part, info.path, out, a, b, short_side, quality) for a, b in parts if a < b]
        return sum(job.result() for job in jobs)


def find_videos(root) -> list[str]:
    """A video file, a frame folder, or a folder holding either (searched recursively), sorted."""
    root = _need(root, "video path")
    if os.path.isfile(root):
        if not root.lower().endswith(VIDEO_EXTS):
            raise DataError(f"{root}: is a file but not a video ({', '.join(VIDEO_EXTS)}); "
                            "expected a video file, a frame folder or a folder of either")
        return [root]
    found = []
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        if any(f.lower().endswith(IMAGE_EXTS) for f in files):
            found.append(parent)  # a frame folder: its images are one video, do not descend
            dirs.clear()
        found += [os.path.join(parent, f) for f in sorted(files) if f.lower().endswith(VIDEO_EXTS)]
    if not found:
        raise DataError(f"{root}: no videos ({', '.join(VIDEO_EXTS)}) or frame folders found")
    return found


VIDEO_FRAME_SHORT_SIDE = 256  # frames used as images: the short side ImageNet pipelines resize to before a 224 crop
VIDEO_FRAMES_MAX = 10000  # per video, about 250 MB of JPEGs in memory; longer videos give one frame every few


@functools.lru_cache(maxsize=8)  # a method builds its image set more than once (training, evaluation, pictures)
def video_frames_as_jpeg(path, step=1, short_side=VIDEO_FRAME_SHORT_SIDE) -> tuple[tuple[int, bytes], ...]:
    """Every step-th frame (at most VIDEO_FRAMES_MAX) as (index, JPEG bytes), decoded once, resized; cached."""
    info = probe_video(path)  # names a corrupt file or one with no video stream
    height, width = _resized_size(info.height, info.width, min(short_side, info.height, info.width))
    if info.num_frames > VIDEO_FRAMES_MAX * step:
        step = math.ceil(info.num_frames / VIDEO_FRAMES_MAX)
        warnings.warn(f"{path}: {info.num_frames} frames; one every {step} used as an image "
                      f"(at most {VIDEO_FRAMES_MAX})")
    frames, t = [], -1
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type, stream.codec_context.thread_count = "AUTO", decoder_threads()
            for t, frame in enumerate(container.decode(stream)):
                if t % step == 0:
                    buffer = io.BytesIO()
                    Image.fromarray(frame.to_ndarray(format="rgb24", width=width, height=height)).save(
                        buffer, "JPEG", quality=90)
                    frames.append((t, buffer.getvalue()))
    except av.FFmpegError as e:
        if not frames:
            raise Unreadable(f"{path}: corrupt video ({e})") from None
        warnings.warn(f"{path}: corrupt after frame {t}, using the {len(frames)} frames before ({e})")
    if not frames:
        raise Unreadable(f"{path}: video has zero frames")
    return tuple(frames)


class VideoClips(_SkipUnreadable, Dataset):
    """One item per clip start: frames 0, s, 2s, ... of every video (s = clip_start_every; None: one per video), a
    clip num_frames frames `frame_gap` apart, item = transform(uint8 (T,3,H,W)); samplers shuffle the starts.
    `read(v, indices)` reads any frames of video v. Bad or short videos among several are skipped (a warning)."""

    def __init__(self, root_or_paths, num_frames=8, frame_gap=1, clip_start_every=1, short_side=None, transform=None):
        given = [root_or_paths] if isinstance(root_or_paths, (str, os.PathLike)) else list(root_or_paths)
        paths = [video for path in given for video in find_videos(path)]  # entries may be folders of videos
        self.root = str(given[0]) if len(given) == 1 else f"<{len(given)} video paths>"
        self.num_frames, self.frame_gap, self.step = num_frames, frame_gap, clip_start_every or 2 ** 62
        self.short_side, self.transform, self._bad = short_side, transform, set()
        span = (num_frames - 1) * frame_gap + 1

        def probe(p):
            info = probe_video(p)
            if info.num_frames < span:
                raise DataError(f"{p}: video has {info.num_frames} frames, shorter than one clip "
                                f"({num_frames} frames, {frame_gap} apart: {span})")
            return info
        usable, self.skipped_videos = _skip_bad(paths, probe, len(paths) == 1)
        if not usable:
            raise DataError(f"{self.root}: no usable video among {len(paths)}{_first_problem(self.skipped_videos)}")
        self.videos, self.infos = [p for p, _ in usable], [info for _, info in usable]
        self.cumulative = np.cumsum([(info.num_frames - span) // self.step + 1 for info in self.infos]).tolist()

    def __len__(self):
        return self.cumulative[-1]

    def clip_index(self, i) -> tuple[int, int]:
        """Item i -> (video index, start frame)."""
        video = bisect.bisect_right(self.cumulative, i)
        before = self.cumulative[video - 1] if video else 0
        return video, (i - before) * self.step

    def _load(self, i):
        video, start = self.clip_index(i)
        indices = range(start, start + self.num_frames * self.frame_gap, self.frame_gap)
        return read_frames(self.videos[video], indices, self.short_side)

    def __getitem__(self, i):
        frames = self._robust(i, self._load)
        return self.transform(frames) if self.transform else frames

    def read(self, video: int, pick) -> torch.Tensor:
        """transform(the frames pick(number of frames) of video `video`), with clip_start_every=None (an item per
        video); an unreadable video is skipped for the next readable one, which picks its own frames."""
        frames = self._robust(video, lambda v: read_frames(self.videos[v], pick(self.infos[v].num_frames),
                                                           self.short_side))
        return self.transform(frames) if self.transform else frames


class ImagesOrFrames(Dataset):
    """Training images -> transform(uint8 (3, H, W)): a VOC root's train split, else UnlabelledImages(root)."""

    def __init__(self, root, transform, frame_step=30):
        self.transform, self.kind = transform, "images"
        if os.path.exists(os.path.join(root, "ImageSets", "Segmentation", "train.txt")):
            self.items, self.kind = VOCSegmentation(root, "train"), "voc"
        else:  # images, and video frames as images
            self.items = UnlabelledImages(root, frame_step=frame_step)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(self.items[i][0])


def write_video(path, frames, fps=24, crf=18, gop=12) -> None:
    """Encode uint8 (T, H, W, 3) RGB frames (even H, W) as H.264 yuv420p with a keyframe every `gop`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    frames = np.asarray(frames)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf), "g": str(gop)})
        stream.height, stream.width, stream.pix_fmt = *frames.shape[1:3], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


# =============================================================================== augmentation
# Batched on the training device: x (B, 3, H, W) float in [0, 1], each image with its own draw, the same
# distributions as torchvision's per-image ColorJitter, RandomGrayscale and GaussianBlur (tests pin them).
def _gray(x):  # (B, 1, H, W): ITU-R 601-2 luma, as torchvision
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def color_jitter(x, brightness, contrast, saturation, hue, p=1.0):
    """ColorJitter with probability p per image: factors uniform in [1-f, 1+f] (hue [-h, h]), random order."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
    B, dev = len(x), x.device
    u = lambda f, *shape: torch.empty(B, *shape, device=dev).uniform_(max(0, 1 - f), 1 + f)  # noqa: E731
    factors = [u(brightness, 1, 1, 1), u(contrast, 1, 1, 1), u(saturation, 1, 1, 1), u(hue, 1, 1) - 1]  # hue: [-h, h]
    order, apply = torch.rand(B, 4, device=dev).argsort(1), torch.rand(B, device=dev) < p
    for k in range(4):  # each op at each place, kept where the image's order puts it there
        for op, f in enumerate(factors):
            if op == 3:
                h, s, v = _rgb_to_hsv(x).unbind(1)
                y = _hsv_to_rgb(torch.stack(((h + f) % 1.0, s, v), 1))
            else:  # brightness, contrast, saturation: a blend with black, the mean gray, the gray image
                y = (x * f + [0, _gray(x).mean((1, 2, 3), True), _gray(x)][op] * (1 - f)).clamp(0, 1)
            x = torch.where(((order[:, k] == op) & apply).view(B, 1, 1, 1), y, x)
    return x


def random_grayscale(x, p):
    return torch.where((torch.rand(len(x), device=x.device) < p).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def gaussian_blur(x, sigma, kernel_size, p=1.0, max_kernel=None):
    """Blur image b with probability p by sigma[b] (B,) or (B, 2) (rows, columns) and its odd kernel_size[b] (of the
    same shape, or one int), reflect-padded as torchvision; kernels zero-padded to max_kernel (no host sync)."""
    (B, C, H, W), R = x.shape, (max_kernel or int(kernel_size)) // 2
    sizes = torch.as_tensor(kernel_size, device=x.device).reshape(B if torch.is_tensor(kernel_size) else 1, -1)
    taps = torch.arange(-R, R + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma.reshape(B, -1, 1).to(x)) ** 2) * (taps.abs() <= (sizes[..., None] - 1) / 2)
    kernel = (kernel / kernel.sum(-1, keepdim=True)).expand(B, 2, -1).repeat_interleave(C, 0)  # (B*C, 2, 2R+1)
    y = torch.nn.functional.pad(x.reshape(1, B * C, H, W), (R, R, R, R), mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel[:, 0].reshape(B * C, 1, -1, 1), groups=B * C)
    y = torch.nn.functional.conv2d(y, kernel[:, 1].reshape(B * C, 1, 1, -1), groups=B * C).view(B, C, H, W)
    return torch.where((torch.rand(B, device=x.device) < p).view(B, 1, 1, 1), y, x)


def random_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), device=None):
    """RandomResizedCrop.get_params n times at once (10 tries, then its fallback) -> (n, 4) float: top, left, h, w"""
    opts = dict(dtype=torch.float64, device=device)
    aspect = torch.exp(torch.empty(n, 10, **opts).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    target = height * width * torch.empty(n, 10, **opts).uniform_(*scale)
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()
    fallback = min(width, round(height * max(ratio))), min(height, round(width / min(ratio)))
    w, h = torch.cat([w, w.new_full((n, 1), fallback[0])], 1), torch.cat([h, h.new_full((n, 1), fallback[1])], 1)
    first = ((w > 0) & (w <= width) & (h > 0) & (h <= height)).float().argmax(1, keepdim=True)  # the first that fits
    w, h, fell, u = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], first[:, 0] == 10, torch.rand(n, 2, **opts)
    top = torch.where(fell, (height - h) // 2, (u[:, 0] * (height - h + 1)).floor())
    left = torch.where(fell, (width - w) // 2, (u[:, 1] * (width - w + 1)).floor())
    return torch.stack([top, left, h, w], 1).float()


def _resize_weights(start, length, size, in_size, antialias):
    """(n, size, in_size): F.interpolate's weights resizing each window [start, start + length) of n crops to size"""
    start, length = start[:, None, None], length[:, None, None]
    pos = torch.arange(in_size, device=start.device, dtype=torch.float64) - start  # input pixel in crop coordinates
    centre = length / size * (torch.arange(size, device=start.device, dtype=torch.float64)[:, None] + 0.5)
    if not antialias:  # the two neighbours of the source position, clamped at the crop's edges
        src = (centre - 0.5).clamp(min=0)
        i0, i1 = src.floor(), torch.minimum(src.floor() + 1, length - 1)
        return ((1 - src + i0) * (pos == i0) + (src - i0) * (pos == i1)).float()
    stretch = (length / size).clamp(min=1)  # the kernel's support (2 px) grows when downscaling
    lo, hi = (centre - 2 * stretch + 0.5).floor().clamp(min=0), torch.minimum((centre + 2 * stretch + 0.5).floor(),
                                                                              length)
    t = ((pos - centre + 0.5) / stretch).abs()
    w = torch.where(t < 1, (1.5 * t - 2.5) * t * t + 1, torch.where(t < 2, ((-0.5 * t + 2.5) * t - 4) * t + 2, 0))
    w = w * ((pos >= lo) & (pos < hi))
    return (w / w.sum(-1, keepdim=True)).float()


def resized_crops(x, boxes, size, antialias=False):
    """TF.resized_crop of box b (top, left, h, w) of x[b] (n, C, H, W) to size, bilinear or antialiased bicubic"""
    rows = _resize_weights(boxes[:, 0].double(), boxes[:, 2].double(), size, x.shape[-2], antialias)
    cols = _resize_weights(boxes[:, 1].double(), boxes[:, 3].double(), size, x.shape[-1], antialias)
    return rows[:, None] @ x.float() @ cols[:, None].transpose(-1, -2)


# ============================================================================ language-model files
# What secat.py's language side reads.
class ByteTokenizer:
    """One id per UTF-8 byte (0-255), <eos> 256, <pad> 257: an LM from scratch spells any name ("Ærø", "狐")."""
    eos, pad, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:  # specials dropped; a cut multi-byte character becomes U+FFFD
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """A GPT-2-family byte-level BPE (`tokenizers`; vocab.json + merges.txt, else tokenizer.json), GPT-2's ids.
    <|endoftext|> is <eos> and <pad>, also where the text spells it out; decode drops special tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos = self.pad = tokenizer.token_to_id("<|endoftext|>")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_folder(cls, folder) -> BPETokenizer:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        vocab, merges, path = (os.path.join(folder, f) for f in ("vocab.json", "merges.txt", "tokenizer.json"))
        if os.path.exists(vocab) and os.path.exists(merges):  # GPT-2's own files: its tokenizer, built
            tok = Tokenizer(models.BPE.from_file(vocab, merges))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        elif os.path.exists(path):
            try:
                tok = Tokenizer.from_file(path)
            except Exception as e:  # the library's own message names what it could not read
                raise DataError(f"{path}: not a tokenizer file that `tokenizers` reads ({str(e)[:120]})") from None
            if type(tok.model).__name__ != "BPE" or "ByteLevel" not in str(tok.pre_tokenizer):
                raise DataError(f"{path}: not a byte-level BPE tokenizer (GPT-2 family); "
                                "other tokenizers are not supported")
        else:
            raise DataError(f"{folder}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json); a pretrained "
                            "LM must read its own tokens, the byte tokenizer is only for an LM from scratch")
        if tok.token_to_id("<|endoftext|>") is None:
            raise DataError(f"{folder}: its vocabulary has no <|endoftext|> (GPT-2's end of text)")
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])  # spelled out, it is that one token
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:  # special tokens dropped; a cut multi-byte character becomes U+FFFD
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def read_hf_folder(folder, flag="") -> tuple[dict, dict]:
    """A Hugging Face model folder -> (state dict of model.safetensors or pytorch_model.bin (no shards), config.json
    as a dict, {} if absent). Errors name the folder after `flag`, the option that gave it."""
    where = f"{flag} {folder}".strip()
    if not os.path.isdir(folder):
        raise DataError(f"{where}: not a folder; give the model's folder "
                        "(config.json, model.safetensors, tokenizer files)")
    config = os.path.join(folder, "config.json")
    config = json.load(open(config)) if os.path.exists(config) else {}
    if os.path.exists(path := os.path.join(folder, "model.safetensors")):
        import safetensors.torch
        try:
            return safetensors.torch.load_file(path), config
        except (OSError, ValueError, KeyError, safetensors.SafetensorError) as e:  # an empty, truncated or foreign file
            raise CheckpointError(f"{where}: model.safetensors is not readable ({type(e).__name__}: {e})") from None
    if os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        return load_checkpoint(os.path.join(folder, "pytorch_model.bin"), flag=flag), config
    raise DataError(f"{where}: no model.safetensors or pytorch_model.bin")


# ============================================================================ synthetic world
# A procedural "walking tour": a camera pans and zooms over an endless world of textured stuff (sky with
# clouds, brick wall, tiled ground) while objects move, scale, spin and occlude each other; pixels are rendered
# analytically from world coordinates (exact instance masks, vectorised numpy). Classes differ in shape and
# texture only: every colour comes from one palette shared by all classes and the stuff, so a colour histogram
# cannot tell them apart. The stuff is hazy (contrast STUFF_CONTRAST around its mean) so that objects stand out.
SYNTH_VERSION = 3  # bump whenever the generator's output changes: ensure_synth then rewrites old worlds
# sorted, so that ImageFolder's label k (folders sorted by name) is VOC/DAVIS class k + 1
CLASS_NAMES = ("checkered_box", "dotted_ring", "gridded_cross", "hatched_crescent", "striped_star", "wavy_triangle")
STUFF_CONTRAST = 0.3
PALETTE_RGB = np.array([[200, 60, 50], [60, 150, 70], [50, 90, 200], [220, 190, 60], [150, 70, 170],
                        [60, 180, 190], [230, 130, 50], [120, 120, 120], [235, 235, 230], [90, 60, 40]], float)


def _hash(a, b):  # deterministic pseudo-random value in [0, 1) per integer cell (a, b)
    return np.modf(np.abs(np.sin(a * 12.9898 + b * 78.233) * 43758.5453))[0]


def _triangle(u, v):  # three half-planes: an equilateral triangle with inradius 0.5 and circumradius 1
    return np.all([u * np.cos(a) + v * np.sin(a) < 0.5 for a in -np.pi / 2 + 2 * np.pi * np.arange(3) / 3], axis=0)


# inside-masks of unit shapes in object coordinates (u, v): radius about 1
SHAPES = {
    "star": lambda u, v: np.hypot(u, v) < 0.55 + 0.4 * np.cos(5 * np.arctan2(v, u)),
    "ring": lambda u, v: (np.hypot(u, v) > 0.55) & (np.hypot(u, v) < 0.95),
    "box": lambda u, v: np.maximum(np.abs(u), np.abs(v)) < 0.75,
    "triangle": _triangle,
    "crescent": lambda u, v: (np.hypot(u, v) < 0.95) & (np.hypot(u - 0.45, v + 0.15) > 0.7),
    "cross": lambda u, v: (np.minimum(np.abs(u), np.abs(v)) < 0.28) & (np.maximum(np.abs(u), np.abs(v)) < 0.95),
}
# where an instance's second colour shows, in object coordinates (the texture moves with the object)
TEXTURES = {
    "striped": lambda u, v: np.sin(u * 10) > 0,
    "dotted": lambda u, v: np.hypot(u * 3.5 - np.round(u * 3.5), v * 3.5 - np.round(v * 3.5)) < 0.28,
    "checkered": lambda u, v: (np.floor(u * 2.5) + np.floor(v * 2.5)) % 2 == 1,
    "wavy": lambda u, v: np.sin(v * 9 + 2.5 * np.sin(u * 6)) > 0,
    "hatched": lambda u, v: np.sin((u + v) * 12) > 0.4,
    "gridded": lambda u, v: (np.abs(u * 3 - np.round(u * 3)) < 0.12) | (np.abs(v * 3 - np.round(v * 3)) < 0.12),
}


class SyntheticWorld:
    """In-memory generator; every item depends only on (seed, item key), not on call order.
    video(i) -> dict(frames uint8 (T,H,W,3), instances int64 (T,H,W) 0 = none, labels int64 (N,) class per instance)
    image(i, split) -> (uint8 (H,W,3), semantic int64 (H,W): 0 stuff, 1..C classes, 255 object borders)
    crop(label, i, split) -> uint8 (H,W,3) centred on one object of class `label`"""

    def __init__(self, seed=0, classes=CLASS_NAMES):
        self.seed, self.classes = int(seed), tuple(classes)

    def _rng(self, *key):
        return np.random.default_rng([self.seed, *key])

    def _colours(self, rng, n):
        picks = rng.choice(len(PALETTE_RGB), size=n, replace=False)
        return (PALETTE_RGB[picks] + rng.uniform(-25, 25, (n, 3))).clip(0, 255)

    def _stuff(self, rng):
        return dict(sky=self._colours(rng, 2), wall=self._colours(rng, 1)[0], mortar=rng.uniform(150, 220),
                    ground=self._colours(rng, 2), phase=rng.uniform(0, 2 * np.pi),
                    horizon=rng.uniform(-45, -20), ground_line=rng.uniform(15, 40))

    def render(self, height, width, camera, stuff, objects):
        """Draw one frame. camera = (x, y, zoom in world units per pixel); objects, back to front, are (label, x, y,
        radius, angle, colours (2,3)) -> (uint8 (H,W,3), instances int64 (H,W): k+1 where objects[k] shows)."""
        cx, cy, zoom = camera
        X = cx + (np.arange(width)[None, :] - width / 2 + 0.5) * zoom + np.zeros((height, 1))
        Y = cy + (np.arange(height)[:, None] - height / 2 + 0.5) * zoom + np.zeros((1, width))
        sky_line = stuff["horizon"] + 12 * np.sin(X / 45 + stuff["phase"])
        ground_line = stuff["ground_line"] + 8 * np.sin(X / 31 + 2 * stuff["phase"])
        t = np.clip((Y + 90) / 90, 0, 1)[..., None]
        sky = stuff["sky"][0] * (1 - t) + stuff["sky"][1] * t
        clouds = (np.sin(X / 17 + np.sin(Y / 9)) * np.sin(Y / 7 + X / 41) > 0.35)[..., None]
        sky = np.where(clouds, 0.5 * sky + 120, sky)
        row = np.floor(Y / 7)
        brick_x = X + 7 * (row % 2)  # alternate rows shift by half a brick
        mortar = ((Y % 7) < 1.2) | ((brick_x % 14) < 1.2)
        wall = stuff["wall"] * (0.8 + 0.35 * _hash(row, np.floor(brick_x / 14)))[..., None]
        wall = np.where(mortar[..., None], stuff["mortar"], wall)
        tile = _hash(np.floor(X / 11), np.floor(Y / 11))[..., None]
        ground = stuff["ground"][0] * tile + stuff["ground"][1] * (1 - tile)
        ground = ground * np.where(np.sin((X - Y) * 0.9) > 0.6, 0.8, 1.0)[..., None]
        img = np.where((Y < sky_line)[..., None], sky, np.where((Y < ground_line)[..., None], wall, ground))
        haze = np.mean([*stuff["sky"], stuff["wall"], *stuff["ground"]], axis=0)
        img = haze + STUFF_CONTRAST * (img - haze)
        instances = np.zeros((height, width), np.int64)
        for k, (label, ox, oy, radius, angle, colours) in enumerate(objects):
            # only the pixels of the object's bounding box (shapes reach at most 1.06 radii) are touched
            reach, row, col = 1.1 * radius / zoom, (oy - cy) / zoom + height / 2, (ox - cx) / zoom + width / 2
            i0, i1 = int(max(0, row - reach)), int(min(height, row + reach + 1))
            j0, j1 = int(max(0, col - reach)), int(min(width, col + reach + 1))
            if i1 <= i0 or j1 <= j0:
                continue
            dx, dy = (X[i0:i1, j0:j1] - ox) / radius, (Y[i0:i1, j0:j1] - oy) / radius
            u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
            texture, shape = self.classes[label].split("_")
            inside = SHAPES[shape](u, v)
            paint = np.where(TEXTURES[texture](u, v)[..., None], colours[1], colours[0])
            paint = paint * (0.9 + 0.1 * u)[..., None]  # soft light from the right: a hint of 3-D
            img[i0:i1, j0:j1][inside] = paint[inside]
            instances[i0:i1, j0:j1][inside] = k + 1
        return img.clip(0, 255).astype(np.uint8), instances

    def video(self, index, num_frames=96, size=128, num_objects=4):
        rng = self._rng(1, index)
        stuff, t = self._stuff(rng), np.arange(num_frames)
        # camera: walks sideways at a steady pace, bobs up and down, zooms in and out
        cam_x = rng.uniform(0, 5000) + rng.choice([-1, 1]) * rng.uniform(0.8, 2.0) * t
        cam_y = rng.uniform(-8, 8) + 4 * np.sin(t / rng.uniform(8, 16))
        zoom = rng.uniform(0.8, 1.05) * (1 + 0.2 * np.sin(2 * np.pi * t / rng.uniform(60, 140) + rng.uniform(0, 6)))
        zoom = zoom * (128 / size)  # any size shows the same scene as 128 px, just sharper or coarser

        def objects_at(f):
            return [(lab, x[f], y[f], r[f], a[f], col) for lab, x, y, r, a, col, _ in tracks]

        for _ in range(50):  # DAVIS defines the objects in frame 0: redraw until each shows there
            tracks = []  # objects move relative to the camera, so they also move against the background
            for label in rng.integers(0, len(self.classes), num_objects):
                # place relative to the camera, wander (radians per frame), size and its pulse, spin
                offset_x, offset_y, swing_x, swing_y, speed, phase, base_radius, pulse, angle, spin = rng.uniform(
                    [-35, -20, 5, 3, 0.02, 0, 11, 0, 0, -0.05], [35, 30, 22, 12, 0.08, 6, 22, 6, 6, 0.05])
                x = cam_x + offset_x + swing_x * np.sin(speed * t + phase)
                y = cam_y + offset_y + swing_y * np.cos(0.7 * speed * t + phase)
                radius = base_radius * (1 + 0.3 * np.sin(1.3 * speed * t + pulse))
                tracks.append((int(label), x, y, radius, angle + spin * t, self._colours(rng, 2), base_radius))
            tracks.sort(key=lambda track: track[-1])  # larger objects are nearer: drawn last, they occlude
            first = self.render(size, size, (cam_x[0], cam_y[0], zoom[0]), stuff, objects_at(0))[1]
            if np.bincount(first.ravel(), minlength=num_objects + 1)[1:].min() >= 30:
                break
        labels = np.array([track[0] for track in tracks])
        frames = np.zeros((num_frames, size, size, 3), np.uint8)
        instances = np.zeros((num_frames, size, size), np.int64)
        for f in range(num_frames):
            frames[f], instances[f] = self.render(size, size, (cam_x[f], cam_y[f], zoom[f]), stuff, objects_at(f))
        return dict(frames=frames, instances=instances, labels=labels)

    def image(self, index, split="train", size=128):
        rng = self._rng(2, ["train", "val"].index(split), index)
        camera = (rng.uniform(0, 5000), rng.uniform(-10, 10), rng.uniform(0.7, 1.3) * (128 / size))
        n = int(rng.integers(1, 5))
        objects = [(int(rng.integers(len(self.classes))), camera[0] + rng.uniform(-45, 45),
                    camera[1] + rng.uniform(-40, 40), rng.uniform(10, 28), rng.uniform(0, 6.3),
                    self._colours(rng, 2)) for _ in range(n)]
        objects.sort(key=lambda o: o[3])
        img, instances = self.render(size, size, camera, self._stuff(rng), objects)
        semantic = np.concatenate([[0], [o[0] + 1 for o in objects]])[instances]
        # VOC marks object outlines as "ignore": a 1-pixel band where the label changes
        edge = np.zeros_like(semantic, bool)
        edge[:, 1:] |= semantic[:, 1:] != semantic[:, :-1]
        edge[1:, :] |= semantic[1:, :] != semantic[:-1, :]
        semantic[edge & (instances > 0)] = 255
        return img, semantic

    def crop(self, label, index, split="train", size=64):
        rng = self._rng(3, ["train", "val"].index(split), label, index)
        zoom = rng.uniform(0.7, 1.3)
        camera = (rng.uniform(0, 5000), rng.uniform(-30, 30), zoom)
        objects = []
        if rng.random() < 0.5:  # a partly hidden distractor of another class behind the subject
            other = (label + rng.integers(1, len(self.classes))) % len(self.classes)
            corner = rng.choice([-1, 1], 2) * size * zoom * 0.45
            objects.append((int(other), camera[0] + corner[0], camera[1] + corner[1], size * zoom * 0.25,
                            rng.uniform(0, 6.3), self._colours(rng, 2)))
        objects.append((int(label), camera[0] + rng.uniform(-3, 3), camera[1] + rng.uniform(-3, 3),
                        size * zoom * rng.uniform(0.3, 0.45), rng.uniform(0, 6.3), self._colours(rng, 2)))
        return self.render(size, size, camera, self._stuff(rng), objects)[0]


def synth_world(out_dir, seed=0, num_videos=4, num_frames=96, size=128, num_images=(160, 60),
                crops_per_class=(60, 20), crop_size=64) -> str:
    """Write the synthetic world under out_dir and return it: videos/tour_XX.mp4; davis/ (same frames, masks, splits);
    voc/ (semantic masks, classes.txt); objects/{train,val}/<class>/; world.json (written last)."""
    started, world = time.time(), SyntheticWorld(seed)
    _refuse_foreign(out_dir, "so it is left alone; move it away or pick another --out")
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, SYNTH_MARKER), "w").close()
    davis = os.path.join(out_dir, "davis")
    names = [f"tour_{i:02d}" for i in range(num_videos)]
    for i, name in enumerate(names):
        tour = world.video(i, num_frames, size)
        write_video(os.path.join(out_dir, "videos", name + ".mp4"), tour["frames"])
        frame_dir, mask_dir = [os.path.join(davis, kind, "480p", name) for kind in ("JPEGImages", "Annotations")]
        for folder in (frame_dir, mask_dir, os.path.join(davis, "ImageSets", "2017")):
            os.makedirs(folder, exist_ok=True)
        for t in range(num_frames):
            Image.fromarray(tour["frames"][t]).save(os.path.join(frame_dir, f"{t:05d}.jpg"), quality=95, subsampling=0)
            save_mask(os.path.join(mask_dir, f"{t:05d}.png"), tour["instances"][t])
    for split in ("train", "val"):  # the tours are unlabelled training data and the propagation benchmark
        with open(os.path.join(davis, "ImageSets", "2017", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    voc = os.path.join(out_dir, "voc")
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(voc, sub), exist_ok=True)
    for split, count in zip(("train", "val"), num_images):
        ids = [f"{split}_{i:04d}" for i in range(count)]
        for i, image_id in enumerate(ids):
            img, semantic = world.image(i, split, size)
            Image.fromarray(img).save(os.path.join(voc, "JPEGImages", image_id + ".jpg"), quality=95, subsampling=0)
            save_mask(os.path.join(voc, "SegmentationClass", image_id + ".png"), semantic)
        with open(os.path.join(voc, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(voc, "classes.txt"), "w") as f:
        f.write("\n".join(("background",) + world.classes) + "\n")
    for split, count in zip(("train", "val"), crops_per_class):
        for label, name in enumerate(world.classes):
            folder = os.path.join(out_dir, "objects", split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                crop = world.crop(label, i, split, crop_size)
                Image.fromarray(crop).save(os.path.join(folder, f"{name}_{i:04d}.jpg"), quality=95, subsampling=0)
    meta = dict(version=SYNTH_VERSION, seed=seed, classes=list(world.classes), videos=names,
                frames_per_video=num_frames, size=size,
                voc_images=dict(zip(("train", "val"), num_images)), crop_size=crop_size,
                crops_per_class=dict(zip(("train", "val"), crops_per_class)), seconds=round(time.time() - started, 2))
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.remove(os.path.join(out_dir, SYNTH_MARKER))  # world.json is the licence from now on
    return str(out_dir)


SYNTH_MARKER = "UNFINISHED_SYNTHETIC_WORLD"  # written first by synth_world: its own unfinished world may be replaced


def _refuse_foreign(root, hint) -> None:
    """Refuse a file, or a folder holding files but neither the world.json nor the marker that synth_world writes."""
    if os.path.exists(root) and not (os.path.isdir(root) and (not os.listdir(root) or any(
            os.path.exists(os.path.join(root, f)) for f in ("world.json", SYNTH_MARKER)))):
        raise DataError(f"{root}: exists and is not a synthetic world (no world.json), {hint}")


def _current_world(root, seed) -> bool:
    try:
        meta = json.load(open(os.path.join(root, "world.json")))
    except (OSError, ValueError):
        return False
    return meta.get("version") == SYNTH_VERSION and meta.get("seed") == seed


def ensure_synth(root="runs/synth", seed=0) -> str:
    """Write the synthetic world to root unless a current one is there (local rank 0 writes aside and renames, the
    rest wait); an older or unfinished world is replaced, anything else there is the user's (_refuse_foreign)."""
    root = os.path.normpath(str(root))
    writer = int(os.environ.get("LOCAL_RANK", 0)) == 0  # one per machine: LOCAL_RANK is set before the group exists
    if not _current_world(root, seed) and writer:
        _refuse_foreign(root, "so --demo leaves it alone; move it away, or run from another folder")
        print(f"writing the synthetic world to {root} (seed {seed}) ...", flush=True)
        partial, old = f"{root}.partial{os.getpid()}", f"{root}.old{os.getpid()}"
        synth_world(partial, seed)
        with contextlib.suppress(OSError):
            os.rename(root, old)
        try:
            os.rename(partial, root)
        except OSError:  # another process got there first with the same bytes
            shutil.rmtree(partial)
        shutil.rmtree(old, ignore_errors=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    while not writer and not _current_world(root, seed):  # torchrun, process group not yet up
        time.sleep(0.5)
    return root


BENCH_PART = {"knn": "objects", "linear": "objects", "seg-linear": "voc", "seg-cluster": "voc", "propagate": "davis"}


def demo_eval_root(eval_data=None, needs=("objects", "voc", "davis"), seed=0) -> str:
    """Where a --demo evaluates: the synthetic world (runs/synth, written on first use), or eval_data once it holds
    the parts `needs` names (objects, voc, davis, or run_suite benchmarks) laid out as the world lays them out."""
    if eval_data is None:
        return ensure_synth("runs/synth", seed=seed)
    root = _need(eval_data, "folder")
    checks = {"objects": lambda: [ImageFolder(os.path.join(root, "objects", s)) for s in ("train", "val")],
              "voc": lambda: [VOCSegmentation(os.path.join(root, "voc"), s) for s in ("train", "val")],
              "davis": lambda: DAVIS(os.path.join(root, "davis"), "val")}
    for part in dict.fromkeys(BENCH_PART.get(n, n) for n in needs):
        try:
            checks[part]()
        except DataError as e:
            raise DataError(f"{root}: not laid out like the synthetic world (objects/{{train,val}}/<class>/, voc/, "
                            f"davis/ as VOC and DAVIS; `python data.py synth --out DIR` writes one): {e}") from None
    return root


# =================================================================================== pictures
def _as_pil(tile) -> Image.Image:  # uint8 or [0, 1] float (3, H, W) tensor, (H, W, 3) uint8 array, PIL image -> RGB
    if isinstance(tile, torch.Tensor):
        if tile.is_floating_point():  # as torchvision's save_image rounds
            tile = (tile * 255 + 0.5).clamp(0, 255)
        tile = tile.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return tile.convert("RGB") if isinstance(tile, Image.Image) else Image.fromarray(np.asarray(tile, np.uint8))


def labelled_grid(rows, path=None, title="", row_names=None, col_names=None, pad=2):
    """The repo's pictures: rows of tiles (_as_pil) on white, `pad` px apart, a title strip, `col_names` over the
    columns, `row_names` left of rows (wrapped at spaces, "\n" breaks); saved as PNG at path if given -> PIL image"""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=13)  # Pillow's own font: no file to ship
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = lambda text: measure.multiline_textbbox((0, 0), text, font=font)[2:] if text else (0, 0)  # noqa: E731

    def wrap(text, width):  # at spaces, to about `width` pixels (the font's letters average 6 px)
        return "\n".join(textwrap.fill(part, max(4, width // 7)) for part in text.split("\n"))

    rows = [[_as_pil(t) for t in row] for row in rows]
    n = max(len(r) for r in rows)
    col_w = [max(r[c].width for r in rows if c < len(r)) for c in range(n)]
    cols, names = [wrap(t, w) for t, w in zip(col_names or [""] * n, col_w)], row_names or [""] * len(rows)
    left = max(size(t)[0] for t in names) + 2 * pad * bool(row_names)
    width = left + sum(col_w) + pad * (n + 1)
    title = wrap(title, width - 4 * pad)
    top = size(title)[1] + 3 * pad + max(size(t)[1] for t in cols) + 4 * pad * bool(col_names)
    row_h = [max([t.height for t in r] + [size(name)[1]]) for r, name in zip(rows, names)]
    sheet = Image.new("RGB", (width, top + sum(row_h) + pad * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.multiline_text((2 * pad, pad), title, fill="black", font=font)
    xs = [left + pad + sum(col_w[:c]) + pad * c for c in range(n)]
    for x, w, text in zip(xs, col_w, cols):
        draw.multiline_text((x + w // 2, top - pad), text, fill="black", font=font, anchor="md", align="center")
    for r, (row, y) in enumerate(zip(rows, np.cumsum([top] + [h + pad for h in row_h]).tolist())):
        draw.multiline_text((pad, y + row_h[r] // 2), names[r], fill="black", font=font, anchor="lm")
        for x, tile in zip(xs, row):
            sheet.paste(tile, (x, y))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        sheet.save(path)
    return sheet


# ==================================================================================== inspect
def _numbered(files) -> bool:  # frame folders name their images by number (00000.jpg); class folders do not
    return all(os.path.splitext(os.path.basename(f))[0].isdigit() for f in files[:5])


def dataset_kind(path) -> str:
    """Which loader fits path: video, image, frame folder, videos, images, image folder, voc, davis, synthetic world,
    ade20k, cifar, svhn, coco, youtube-vos."""
    path = _need(path)
    if os.path.isfile(path):
        if path.lower().endswith(VIDEO_EXTS + IMAGE_EXTS):
            return "video" if path.lower().endswith(VIDEO_EXTS) else "image"
        raise DataError(f"{path}: neither a video ({', '.join(VIDEO_EXTS)}) nor an image")
    for kind, marker in (("ade20k", "annotations/validation"), ("svhn", "test_32x32.mat"), ("cifar", "batches.meta"),
                         ("cifar", "meta"), ("synthetic world", "world.json"), ("voc", "ImageSets/Segmentation"),
                         ("davis", "ImageSets/2017"), ("coco", "annotations/panoptic_annotations"),
                         ("coco", "annotations/*_val2017.json"), ("youtube-vos", "meta.json"),
                         ("youtube-vos", "Annotations/*/*.png")):  # meta.json missing: YouTubeVOS says so
        if glob.glob(os.path.join(glob.escape(path), marker)):
            return kind
    if _frame_files(path):
        return "frame folder" if _numbered(_frame_files(path)) else "images"
    with_images = [d for d in sorted(e.path for e in os.scandir(path) if e.is_dir()) if _frame_files(d)]
    if (with_images and _numbered(_frame_files(with_images[0]))
            or any(f.lower().endswith(VIDEO_EXTS) for _, _, files in os.walk(path) for f in files)):
        return "videos"
    if with_images:
        return "image folder"
    if _list_images(path):
        return "images"
    raise DataError(f"{path}: empty folder (no videos, frame folders or images found)")


def _overlay(img, mask):  # uint8 (3,H,W) image with its (H,W) mask's palette colours blended over labelled pixels
    colours = torch.tensor(voc_palette(), dtype=torch.float32).view(256, 3)[mask.clamp(0, 255)].permute(2, 0, 1)
    labelled = ((mask > 0) & (mask != 255)).unsqueeze(0)
    return torch.where(labelled, 0.45 * img + 0.55 * colours, img.float()).to(torch.uint8)


def _describe(path, kind, num_frames, stride):
    """Print what the loaders see at path; return a few images for the contact sheet."""
    if kind in ("video", "frame folder", "videos"):
        clips = VideoClips(path, num_frames, stride, clip_start_every=num_frames * stride)
        total = sum(i.num_frames for i in clips.infos)
        print(f"{path}: {kind}, {len(clips.videos)} video(s), {total} frames, {len(clips)} clips of "
              f"{num_frames} frames (stride {stride}) back to back, {len(clips.skipped_videos)} skipped")
        for info in clips.infos[:8]:
            seconds = f"{info.num_frames / info.fps:.1f} s at {info.fps:.2f} fps" if info.fps else "no fps (frames)"
            print(f"  {os.path.basename(info.path)}: {info.num_frames} frames, {info.width}x{info.height}, {seconds}")
        return [read_frames(clips.videos[v], [round(t)], short_side=128)[0] for v, info in enumerate(clips.infos[:4])
                for t in np.linspace(0, info.num_frames - 1, 6)]
    if kind == "image":
        with Image.open(path) as pil:
            print(f"{path}: image, {pil.width}x{pil.height}, mode {pil.mode}")
        return [load_image(path)]
    if kind == "images":
        ds = UnlabelledImages(path)
        print(f"{path}: unlabelled images, {len(ds)} files; first is {tuple(ds[0][0].shape)}")
        return [ds[i][0] for i in range(min(12, len(ds)))]
    if kind == "image folder":
        ds = ImageFolder(path)
        counts = np.bincount(ds.targets)
        print(f"{path}: image folder, {len(ds.classes)} classes, {len(ds)} images ({counts.min()}-{counts.max()} "
              f"per class), first {tuple(ds[0][0].shape)}: {', '.join(ds.classes[:8])}")
        return [ds[ds.targets.index(c)][0] for c in range(min(12, len(ds.classes)))]
    if kind == "voc":
        shown = []
        for split in ("train", "trainaug", "val"):
            if not os.path.exists(os.path.join(path, "ImageSets", "Segmentation", f"{split}.txt")):
                continue
            ds = VOCSegmentation(path, split)
            ids = torch.cat([ds[i][1].unique() for i in range(min(20, len(ds)))]).unique().tolist()
            print(f"{path} [{split}]: voc segmentation, {len(ds)} images, {ds.num_classes} classes, "
                  f"first {ds[0][0].shape[2]}x{ds[0][0].shape[1]}, ids in the first 20 masks: {ids}")
            shown += [_overlay(*ds[i]) for i in range(min(6, len(ds)))]
        return shown
    if kind == "coco":  # val only: listing train2017 is slow
        shown = []
        for labels in ("stuff", "thing"):
            ds = COCOSegmentation(path, "val", labels=labels)
            print(f"{path} [val]: coco-{labels}, {len(ds)} images, {ds.num_classes} classes: {ds.class_names}")
            shown += [_overlay(*ds[i]) for i in range(min(3, len(ds)))]
        return shown
    if kind == "youtube-vos":
        ds = YouTubeVOS(path)
        print(f"{path}: youtube-vos, {len(ds.meta)} videos in meta.json, {len(ds.categories)} categories; "
              f"split (seed 0) {len(ds.split['train'])} train / {len(ds.split['val'])} val videos")
        seq = ds[0]
        return [_overlay(seq["frames"][t], ds.category_map(seq["masks"], seq["objects"])[t]) for t in (0, -1)]
    if kind == "davis":
        ds = DAVIS(path)
        shown = []
        for seq in (ds[i] for i in range(min(4, len(ds)))):
            print(f"{path} [{seq['name']}]: davis, {len(seq['frames'])} frames {seq['frames'].shape[3]}x"
                  f"{seq['frames'].shape[2]}, ids in frame 0: {seq['masks'][0].unique().tolist()}")
            shown += [_overlay(seq["frames"][t], seq["masks"][t]) for t in (0, len(seq["frames"]) // 2, -1)]
        print(f"{path}: davis, {len(ds)} sequences in val")
        return shown
    if kind in ("cifar", "svhn", "ade20k"):
        ds = ADE20K(path, "val") if kind == "ade20k" else SmallImages(path, "test")
        print(f"{path}: {kind}, {len(ds)} test/val images, {len(getattr(ds, 'classes', ds.class_names))} classes")
        return [_overlay(*ds[i]) if kind == "ade20k" else ds[i][0] for i in range(min(12, len(ds)))]
    raise DataError(f"{path}: cannot describe kind {kind}")


def _plain_decode(path, indices, height, width):  # --bench's baseline: PyAV by hand (open, seek, decode, convert)
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps, tb, start = float(stream.average_rate), float(stream.time_base), stream.start_time or 0
        container.seek(start + int(indices[0] / fps / tb), stream=stream)
        frames = []
        for frame in container.decode(stream):
            index = round((frame.pts - start) * tb * fps)
            if index in indices:
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
            if index >= indices[-1]:
                return frames


def bench(path, num_frames=8, stride=1, short_side=None, max_clips=64, rounds=3) -> dict:
    """Clips/s and frames/s of VideoClips against plain PyAV decoding the same clips (random order)."""
    clips = VideoClips(path, num_frames, stride, clip_start_every=num_frames * stride, short_side=short_side)
    if any(os.path.isdir(v) for v in clips.videos):
        raise DataError(f"{path}: --bench compares against PyAV, so it needs video files, not frame folders")
    order = np.random.default_rng(0).permutation(len(clips))[:max_clips]
    jobs = [(clips.videos[v], list(range(t, t + num_frames * stride, stride)),
             *_resized_size(clips.infos[v].height, clips.infos[v].width, short_side))
            for v, t in map(clips.clip_index, order)]
    best = dict(loader=math.inf, plain=math.inf)
    for _ in range(rounds):  # interleaved rounds, best of each: the machine is shared
        for key, run, items in (("loader", clips.__getitem__, order), ("plain", lambda job: _plain_decode(*job), jobs)):
            started = time.perf_counter()
            for item in items:
                run(item)
            best[key] = min(best[key], time.perf_counter() - started)
    return dict(clips=len(order), loader_clips_per_s=len(order) / best["loader"],
                plain_clips_per_s=len(order) / best["plain"], ratio=best["plain"] / best["loader"])


PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12, "A10": 125e12}


def bench_train(loader, step, steps, device, images_per_item=1) -> dict:
    """A method's --bench N: the loader's items/s on one core (max(N, 8) batches after a first one, no workers, one
    decoder thread), the step's time on the device alone (N steps on one batch, after one FLOP-counted), images/s, peak
    memory, on CUDA the MFU (dense bf16 peak); prints them and one JSON line, ratio = loader rate x workers / step rate
    (< 1: input-bound)."""
    from torch.utils.flop_counter import FlopCounterMode
    workers, threads = max(1, getattr(loader, "num_workers", 1)), torch.get_num_threads()
    if isinstance(loader, torch.utils.data.DataLoader):
        loader = torch.utils.data.DataLoader(loader.dataset, loader.batch_size, sampler=loader.sampler,
                                             collate_fn=loader.collate_fn, drop_last=True)
    torch.set_num_threads(1)
    os.environ["LOCAL_WORLD_SIZE"] = str(os.cpu_count())  # one decoder thread: the rate of one core
    batches, started = iter(loader), time.perf_counter()
    batch = next(batches)  # the first opens files and warms caches: timed only when it is the only one
    first, started = time.perf_counter() - started, time.perf_counter()
    items = getattr(loader, "batch_size", None) or len(batch)
    loaded = sum(1 for _, _ in zip(range(max(steps, 8)), batches))
    loader_rate = items * max(loaded, 1) / ((time.perf_counter() - started) if loaded else first)
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as counter:
        step(batch)  # also the warm-up
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step(batch)
    sync()
    step_s = (time.perf_counter() - started) / steps
    peak = PEAK_BF16.get(next((k for k in PEAK_BF16 if k in torch.cuda.get_device_name(device)), ""), 0) \
        if device.type == "cuda" else 0
    memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024
    flops = counter.get_total_flops()
    result = dict(loader_items_per_s_per_worker=loader_rate, workers=workers, step_s=step_s,
                  images_per_s=items * images_per_item / step_s, peak_memory_gib=memory / 2 ** 30,
                  flops_per_step=flops, mfu=flops / step_s / peak if peak else None,
                  ratio=loader_rate * workers / (items / step_s))
    print(f"loader {loader_rate:.2f} items/s per worker ({items} a batch, x{images_per_item} images); step "
          f"{step_s * 1e3:.0f} ms on {device} ({result['images_per_s']:.1f} images/s), peak memory "
          f"{result['peak_memory_gib']:.2f} GiB, {result['flops_per_step'] / 1e12:.2f} TFLOP/step"
          + (f", MFU {result['mfu']:.1%}" if peak else "") + f"; loader x {workers} workers / step = "
          f"{result['ratio']:.2f}")
    print(json.dumps(result))
    return result


def inspect(path, sheet=None, do_bench=False, num_frames=8, stride=1, short_side=None) -> None:
    kind = dataset_kind(path)
    if kind == "synthetic world":
        meta = json.load(open(os.path.join(path, "world.json")))
        print(f"{path}: synthetic world, seed {meta['seed']}, classes {', '.join(meta['classes'])}")
        parts = [(os.path.join(path, sub), k) for sub, k in
                 (("videos", "videos"), ("davis", "davis"), ("voc", "voc"), ("objects/train", "image folder"))]
    else:
        parts = [(path, kind)]
    shown = []
    for part, part_kind in parts:
        how = {"voc": "train, then val;\nmasks overlaid", "davis": "first, middle, last\nframe a sequence;\nmasks "
               "overlaid", "image folder": "one image a class", "image": "", "images": ""}.get(part_kind,
                                                                                            "6 frames a video")
        name = os.path.basename(os.path.normpath(part))
        name += "" if name == part_kind else f" ({part_kind})"
        shown.append((f"{name}\n{how}", _describe(part, part_kind, num_frames, stride)))
    sheet = sheet or os.path.join("runs", "inspect", os.path.basename(os.path.normpath(path)) + ".png")
    rows, names = [], []  # the contact sheet: 6 images a row, 96 px high; a group starts a row named after it
    for name, images in shown:
        thumbs = [(t := _as_pil(img)).resize((max(1, round(t.width * 96 / t.height)), 96), Image.BILINEAR)
                  for img in images]
        rows += [thumbs[k:k + 6] for k in range(0, len(thumbs), 6)]
        names += [name] + [""] * ((len(thumbs) - 1) // 6)
    labelled_grid(rows, sheet, f"data.py inspect {path}: what the loaders read from each part", names)
    print(f"contact sheet: {sheet}")
    if do_bench:
        result = bench(parts[0][0], num_frames, stride, short_side)
        print(f"bench {parts[0][0]} ({result['clips']} random clips of {num_frames} frames, stride {stride}, "
              f"short side {short_side or 'native'}, PyAV threads auto on {os.cpu_count()} cores):")
        for name, rate in (("VideoClips", result["loader_clips_per_s"]), ("plain PyAV", result["plain_clips_per_s"])):
            print(f"  {name}  {rate:8.1f} clips/s {rate * num_frames:8.1f} frames/s")
        print(f"  ratio loader / plain = {result['ratio']:.2f} (target >= 0.8)")


# =============================================================================== command line
def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser("synth", help="write the synthetic world")
    synth.add_argument("--out", default="runs/synth")
    synth.add_argument("--seed", type=int, default=0)
    look = commands.add_parser("inspect", help="what the loaders see at PATH, plus a contact sheet")
    look.add_argument("path")
    look.add_argument("--sheet", default=None, help="contact-sheet PNG (default runs/inspect/<name>.png)")
    look.add_argument("--bench", action="store_true", help="time the clip sampler against plain PyAV decoding")
    look.add_argument("--num-frames", type=int, default=8)
    look.add_argument("--stride", type=int, default=1)
    look.add_argument("--short-side", type=int, default=None)
    ex = commands.add_parser("extract", help="decode a video once into a frame folder (in parallel, split at "
                                             "keyframes)")
    ex.add_argument("video")
    ex.add_argument("--out", required=True, help="frame folder to write (000000.jpg ...); VideoClips reads it")
    ex.add_argument("--short-side", type=int, default=640, help="resize at decode time (never enlarged)")
    ex.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    return parser.parse_args(argv)


def main(args):
    started = time.time()
    if args.command == "synth":
        synth_world(args.out, args.seed)
        print(f"wrote the synthetic world (seed {args.seed}) to {args.out} in {time.time() - started:.1f} s")
    elif args.command == "extract":
        if args.short_side < 1 or os.path.isdir(args.video):
            raise DataError(f"{args.video}: extract needs a video file and --short-side >= 1")
        count = extract(args.video, args.out, args.short_side, args.workers)
        print(f"wrote {count} frames of {args.video} to {args.out} in {time.time() - started:.1f} s")
    else:
        inspect(args.path, args.sheet, args.bench, args.num_frames, args.stride, args.short_side)


if __name__ == "__main__":
    cli(main, get_args)
