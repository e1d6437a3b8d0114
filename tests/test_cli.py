"""The command lines as a user meets them (issue 18): no run loses a user's work, and every user
error is one line `error: ...` on stderr with a non-zero exit and no traceback. The refusals come
before any work, so most checks call `data.cli(main, get_args, argv)` in this process (the same
path as `python X.py ...`); two subprocesses check the real entry points."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import data  # noqa: E402

METHODS = ("sinkhorn", "leopart", "timetuning", "dora", "secat")


def run_cli(capsys, module, argv):
    """-> (exit code, stderr) of `python module.py *argv`, run in this process."""
    module = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        data.cli(module.main, module.get_args, [str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code, err, *words):
    assert code not in (0, None) and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(w in err for w in words), err


def fake_checkpoint(path, method="leopart", epoch=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"method": method, "args": {"arch": "vit_demo", "patch_size": 8}, "epoch": epoch, "step": 10,
                "model": {"w": torch.arange(3.0)}}, path)
    return path.read_bytes()


# ------------------------------------------------------------ 1. an existing run is never replaced
@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_in_the_output_dir_needs_resume_or_overwrite(method, tmp_path, capsys):
    ckpt = tmp_path / "out" / "checkpoint.pth"
    before = fake_checkpoint(ckpt, method)
    pretrained = ["--encoder", tmp_path / "e.pth", "--lm", tmp_path / "lm"] if method == "secat" else []  # else refused
    code, err = run_cli(capsys, method, ["--data", tmp_path / "no-data", "--output-dir", tmp_path / "out", *pretrained])
    assert_one_line_error(code, err, str(ckpt), "--resume", "--output-dir", "--overwrite")
    assert ckpt.read_bytes() == before


def test_output_dir_checks_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(data.DataError, match="is a file"):
        data.prepare_output_dir(tmp_path / "file")
    with pytest.raises(data.DataError, match="cannot be written"):
        data.prepare_output_dir(tmp_path / "file" / "below")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    if os.geteuid() == 0:  # root writes anyway: stand in for what a user gets there

        def read_only(dir):
            raise PermissionError(13, "Permission denied", dir)
        monkeypatch.setattr(data.tempfile, "TemporaryFile", read_only)
    with pytest.raises(data.DataError, match="cannot be written"):
        data.prepare_output_dir(tmp_path / "ro")  # an existing read-only folder: refused before training
    assert os.listdir(tmp_path / "ro") == []
    with pytest.raises(data.DataError, match="pick one"):
        data.prepare_output_dir(tmp_path / "new", resume=True, overwrite=True)


def test_overwrite_starts_the_log_afresh_and_resume_drops_replayed_records(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "out" / "checkpoint.pth"
    before = fake_checkpoint(ckpt, "dora", epoch=2)
    records = [{"epoch": 0, "step": 5}, {"epoch": 1, "step": 10}, {"epoch": 2, "step": 15}, {"eval": "final"}]
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 2, "st')
    log, path, state = data.prepare_output_dir(out, resume=True, method="dora")  # killed in epoch 2
    assert state["epoch"] == 2 and path == str(ckpt) and ckpt.read_bytes() == before
    kept = [json.loads(line) for line in open(out / "log.jsonl")]
    resumed = {"resumed_at_epoch": 2, "saved_world_size": "?", "world_size": 1}  # "?": saved before it was recorded
    assert kept == [records[0], records[1], records[3], resumed]  # epoch 2 is replayed and logged again
    log.log({"epoch": 2, "step": 15})
    assert len(open(out / "log.jsonl").readlines()) == 5
    data.prepare_output_dir(out, overwrite=True)
    assert (out / "log.jsonl").read_text() == "" and ckpt.read_bytes() == before  # replaced at the next save


def test_resume_names_the_epochs_its_schedules_span(tmp_path, capsys):
    # `--epochs 1`, then `--epochs 2 --resume` is not one run (the schedules span --epochs): the line says so
    torch.save({"method": "dora", "args": {"epochs": 1}, "epoch": 1, "step": 4}, tmp_path / "checkpoint.pth")
    data.prepare_output_dir(tmp_path, resume=True, method="dora")
    out = capsys.readouterr().out
    assert "at epoch 1 of --epochs 1" in out and "--stop-after" in out and len(out.splitlines()) == 1


# --------------------------------------------- 2. the synthetic world never replaces a user's folder
def test_demo_leaves_a_users_runs_synth_alone(tmp_path, monkeypatch, capsys):
    mine = tmp_path / "runs" / "synth" / "videos" / "my.mp4"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my holiday")
    monkeypatch.chdir(tmp_path)  # --demo writes runs/synth under the current folder
    code, err = run_cli(capsys, "sinkhorn", ["--demo"])
    assert_one_line_error(code, err, os.path.join("runs", "synth"), "not a synthetic world")
    assert mine.read_bytes() == b"my holiday" and sorted(os.listdir(tmp_path / "runs")) == ["synth"]


def test_an_unfinished_world_of_its_own_is_replaced(tmp_path, monkeypatch):
    real = data.synth_world
    monkeypatch.setattr(data, "synth_world", lambda out, seed: real(out, seed, num_videos=1, num_frames=8,
                                                                     num_images=(2, 1), crops_per_class=(1, 1)))
    root = tmp_path / "synth"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "tour_00.mp4").write_bytes(b"half")
    (root / data.SYNTH_MARKER).write_text("")  # synth_world was killed before world.json
    assert data.ensure_synth(root) == str(root) and data._current_world(str(root), 0)
    assert not (root / data.SYNTH_MARKER).exists() and sorted(os.listdir(tmp_path)) == ["synth"]


# ---------------------------------------------------- 3. one entry point, one line per user error
def test_cli_turns_user_errors_into_one_line_and_keeps_tracebacks_for_bugs(tmp_path, capsys):
    code, err = run_cli(capsys, "sinkhorn", ["--data", tmp_path, "--epochs", "many"])
    assert_one_line_error(code, err, "--epochs", "--help")
    code, err = run_cli(capsys, "dora", [])  # get_args' own p.error
    assert_one_line_error(code, err, "--data is required")

    def interrupted(args):
        raise KeyboardInterrupt

    def missing_file(args):
        open(tmp_path / "missing.txt")

    def bug(args):
        return 1 / 0

    for main, words in ((interrupted, ["interrupted", "--resume"]), (missing_file, ["missing.txt"])):
        with pytest.raises(SystemExit) as exit_info:
            data.cli(main, lambda argv: None)
        assert_one_line_error(exit_info.value.code, capsys.readouterr().err, *words)
    with pytest.raises(ZeroDivisionError):
        data.cli(bug, lambda argv: None)


def test_every_command_line_goes_through_data_cli():
    for name in METHODS + ("evaluate", "data"):
        source = open(os.path.join(REPO, name + ".py")).read()
        assert "data.cli(main, get_args)" in source.split('if __name__ == "__main__":')[1] or (
            name == "data" and "cli(main, get_args)" in source.split('if __name__ == "__main__":')[1]), name


def test_real_entry_points_print_one_line(tmp_path):
    (tmp_path / "a_file").write_text("mine")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv in (["data.py", "synth", "--out", tmp_path / "a_file"],
                 ["evaluate.py", "knn", "--data", tmp_path, "--ckpt", tmp_path / "a_file"]):
        done = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *map(str, argv[1:])], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)
        assert_one_line_error(done.returncode, done.stderr, str(tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "mine"


# ------------------------------------------------------------ 4. one checkpoint loader, one line
def test_resume_with_another_methods_checkpoint_says_what_it_holds(tmp_path, capsys):
    ckpt = tmp_path / "out" / "checkpoint.pth"
    before = fake_checkpoint(ckpt, "leopart")
    code, err = run_cli(capsys, "sinkhorn", ["--data", tmp_path / "no-data", "--output-dir", tmp_path / "out",
                                             "--resume"])
    assert_one_line_error(code, err, str(ckpt), "leopart.py", "not a sinkhorn.py")
    assert ckpt.read_bytes() == before
    code, err = run_cli(capsys, "secat", ["--data", tmp_path / "no-data", "--output-dir", tmp_path / "fresh",
                                          "--resume", "--encoder", tmp_path / "e.pth", "--lm", tmp_path / "lm"])
    assert_one_line_error(code, err, "--resume", "no checkpoint")


@pytest.mark.parametrize("method", ["leopart", "timetuning", "dora"])
def test_a_zero_byte_pretrained_file_is_refused_before_any_work(method, tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    code, err = run_cli(capsys, method, ["--data", tmp_path / "no-data", "--output-dir", tmp_path / "out",
                                         "--pretrained", tmp_path / "empty.pth"])
    assert_one_line_error(code, err, "--pretrained", "empty.pth", "0 bytes")  # not "no-data": before the data


def test_pretrained_says_what_a_file_holds(tmp_path, capsys):
    import sinkhorn
    conv = {"method": "sinkhorn", "args": {"arch": "convnet_demo", "patch_size": 16}, "epoch": 3,
            "model": {f"backbone.{k}": v
                      for k, v in sinkhorn.build_backbone({"arch": "convnet_demo"}).state_dict().items()}}
    torch.save(conv, tmp_path / "conv.pth")
    torch.save({"method": "secat", "args": {"encoder_arch": "vit_demo", "patch_size": 8}, "epoch": 6,
                "model": {"backbone.cls_token": torch.zeros(1, 1, 8)}}, tmp_path / "secat.pth")
    (tmp_path / "text.pth").write_text("hello")
    for name, words in (("conv.pth", ["sinkhorn.py checkpoint (convnet_demo", "not ViT weights"]),
                        ("secat.pth", ["secat.py checkpoint", "--encoder"]),
                        ("text.pth", ["not a checkpoint"]), ("missing.pth", ["no such"])):
        code, err = run_cli(capsys, "timetuning", ["--data", tmp_path, "--pretrained", tmp_path / name])
        assert_one_line_error(code, err, "--pretrained", name, *words)


def test_secat_checks_lm_before_extracting_features(tmp_path, capsys):
    (tmp_path / "lm").mkdir()  # a Hugging Face folder whose weights file is empty
    (tmp_path / "lm" / "model.safetensors").write_bytes(b"")
    code, err = run_cli(capsys, "secat", ["--data", tmp_path / "no-images", "--output-dir", tmp_path / "out",
                                          "--lm", tmp_path / "lm", "--encoder", tmp_path / "no-encoder.pth"])
    assert_one_line_error(code, err, "--lm", "lm", "model.safetensors")


def _classes_and_videos(root):
    """root/images/class_<c>/<i>.png (3 classes x 6) and root/videos/vid<v>/<t>.png (3 panning videos x 12)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / "images" / f"class_{c}")
        for i in range(6):
            img = np.clip(rng.normal(80 * c, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / f"class_{c}" / f"{i}.png")
    for v in range(3):
        os.makedirs(root / "videos" / f"vid{v}")
        scene = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
        for t in range(12):
            Image.fromarray(scene[:, 2 * t:2 * t + 40]).save(root / "videos" / f"vid{v}" / f"{t:05d}.png")
    return str(root / "images"), str(root / "videos")


TINY = {  # each method at toy size: one step or a few per epoch on 1, 2 or 3 processes
    "sinkhorn": "--arch vit_demo --patch-size 8 --image-size 24 --num-heads 2 --num-clusters 3 --batch-size-per-gpu 4 "
                "--num-label-updates 3 --optimizer sgd --lr 0.05",
    "leopart": "--arch vit_demo --patch-size 8 --global-crops-size 32 --local-crops-size 16 --proj-hidden-dim 64 "
               "--proj-dim 32 --num-prototypes 20 --queue-length 48 --drop-path 0 --batch-size-per-gpu 2",
    "timetuning": "--arch vit_demo --patch-size 8 --image-size 32 --proj-dims 32 16 --num-prototypes 10 "
                  "--batch-size-per-gpu 2 --clips-per-video 2 --no-eval",
    "dora": "--arch vit_demo --patch-size 8 --out-dim 256 --image-size 32 --precrop-size 40 --frames-per-clip 3 "
            "--step-between-clips 1 --clip-start-every 4 --local-crops-number 2 --batch-size-per-gpu 2 "
            "--warmup-epochs 1 --warmup-teacher-temp-epochs 1 --drop-path 0",
    "secat": "--encoder-arch vit_demo --patch-size 8 --image-size 16 --lm-dim 32 --lm-layers 1 --lm-heads 2 "
             "--context 256 --clusters 3 --max-ways 2 --max-shots 1 --steps-per-epoch 1 --batch-size-per-gpu 2 "
             "--warmup-epochs 1 --lr 1e-3",
}
SHARED = {  # what each rank must hold alike, beside the student: the teachers, DoRA's centre, labels, clusters
    "sinkhorn": ("1",), "leopart": ("1.head.",), "timetuning": ("1.head.",), "dora": ("0.teacher.", "0.loss.center"),
    "secat": ("2", "3.0")}


def test_every_rank_trains_one_model_and_resumes_on_any_number_of_ranks(tmp_path):
    """All five methods as torchrun starts them (gloo): 2 processes, then --resume on 1, then on 3. In every run
    each rank holds the same student and teacher (DoRA's teachers differed from step 0 when each rank seeded its
    own), each train() closes its process group, and the log records each resume with both world sizes."""
    from conftest import assert_ranks_equal, resume_records, train_on_ranks
    images, videos = _classes_and_videos(tmp_path)
    for world, epochs in ((2, 1), (1, 2), (3, 3)):
        jobs = [(m, ["--data", videos if m in ("dora", "timetuning") else images, *TINY[m].split(),
                     "--output-dir", str(tmp_path / m), "--epochs", str(epochs), "--num-workers", "0",
                     "--amp", "none", "--log-every", "1", *(["--resume"] if epochs > 1 else [])]) for m in METHODS]
        ranks = train_on_ranks(jobs, world, tmp_path / f"ranks{world}")
        for m in METHODS:
            assert all(any(k.startswith(s) for k in ranks[m][0]) for s in SHARED[m]), (m, list(ranks[m][0])[:9])
            assert_ranks_equal(ranks[m])
            ckpt = data.load_checkpoint(tmp_path / m / "checkpoint.pth")
            assert ckpt["epoch"] == epochs + (m == "sinkhorn") and ckpt["world_size"] == world, m
    for m in METHODS:
        assert resume_records(tmp_path / m / "log.jsonl") == [(2, 1), (1, 3)], m


@pytest.mark.parametrize("method", METHODS)
def test_demo_settings_are_defaults_that_every_given_flag_beats_abbreviated_too(method, monkeypatch, tmp_path):
    """argparse takes `--epoch 3` for `--epochs 3`; the demo's own epochs must not put theirs back."""
    monkeypatch.setattr(data, "ensure_synth", lambda root="runs/synth", seed=0: str(tmp_path))
    monkeypatch.setattr(data, "demo_eval_root", lambda eval_data=None, needs=(), seed=0: str(tmp_path))
    module = importlib.import_module(method)
    demo = module.get_args(["--demo"])
    assert demo.epochs == module.DEMO["epochs"] != 3
    assert module.get_args(["--demo", "--epoch", "3"]).epochs == 3
    assert module.get_args(["--demo", "--epochs=3"]).epochs == 3
    assert module.get_args(["--epoch", "3", "--demo", "--data", "x"]).epochs == 3
