"""diffgen.run.save_result: PNG for images, MP4 for videos, and the frames kept as PNGs when no MP4
writer is installed (a video that took minutes is never lost to a missing package)."""

from types import SimpleNamespace

import imageio.v2 as imageio
import numpy as np
import pytest
from PIL import Image

from diffgen import run


def _video(n=3):
    rng = np.random.default_rng(0)
    return SimpleNamespace(frames=[[rng.random((8, 8, 3)).astype(np.float32) for _ in range(n)]])


def test_image_goes_to_png(tmp_path):
    image = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    path = run.save_result(SimpleNamespace(images=[image]), tmp_path, "x")
    assert path == tmp_path / "x.png" and np.array_equal(np.asarray(Image.open(path)), np.asarray(image))


def test_video_goes_to_mp4(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    path = run.save_result(_video(), tmp_path, "v")
    assert path == tmp_path / "v.mp4" and len(imageio.mimread(path)) == 3


def test_without_an_mp4_writer_the_frames_are_kept_as_pngs(tmp_path, monkeypatch, caplog):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "imageio_ffmpeg" else real(name, *a))
    video = _video()
    path = run.save_result(video, tmp_path, "v")
    assert path == tmp_path / "v_frames"
    files = sorted(path.iterdir())
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    for f, frame in zip(files, video.frames[0]):  # PNG is lossless: the frames' own 8-bit values
        assert np.array_equal(imageio.imread(f), (frame * 255).round().clip(0, 255).astype(np.uint8))
    assert "pip install imageio-ffmpeg" in caplog.text
