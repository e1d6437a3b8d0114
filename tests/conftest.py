"""Helpers shared by the test files: `from conftest import ...` (pytest puts tests/ on sys.path)."""
import json
import os
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
