"""Encode/probe round trips for the assembler's video and image helpers.

Videos are checked twice: with ``probe_video`` (ffmpeg from imageio-ffmpeg) and independently with
OpenCV's own decoder, so a probe that merely echoed container metadata could not pass.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from stream_processors.assembler import video
from stream_processors.assembler.video import VideoInfo, decode_png, encode_image, encode_mp4, probe_video


def gradient_frames(n: int, width: int, height: int) -> list[np.ndarray]:
    """Smooth, clearly distinct frames: a horizontal ramp that slides 12 px a frame, a vertical ramp,
    and a blue level that steps with the frame index."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(n):
        r = ((x + 12 * i) * 255 // (width - 1)) % 256
        g = y * 255 // (height - 1)
        b = np.full_like(x, (40 + 9 * i) % 256)
        frames.append(np.dstack([r, g, b]).astype(np.uint8))
    return frames


def decode_with_cv2(data: bytes, tmp_path: Path) -> list[np.ndarray]:
    path = tmp_path / "decoded.mp4"
    path.write_bytes(data)
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    return out


def mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


@pytest.mark.parametrize(
    ("n", "fps", "width", "height"),
    [
        (16, 8, 64, 64),
        (64, 24, 64, 64),  # moviepy alone drops the last frame here (2.6666666666666656 s * 24 = 63.99)
        (64, 24, 128, 96),
        (7, 3, 64, 64),  # likewise 7 frames at 3 fps
        (1, 1, 32, 16),
        (30, 30, 256, 256),
    ],
)
def test_encode_probe_round_trip(n: int, fps: int, width: int, height: int, tmp_path: Path) -> None:
    frames = gradient_frames(n, width, height)
    data = encode_mp4(frames, fps=fps)

    info = probe_video(data)
    assert info == VideoInfo(
        frames=n, fps=float(fps), duration_ms=round(n * 1000 / fps), width=width, height=height, codec="h264"
    )

    decoded = decode_with_cv2(data, tmp_path)
    assert len(decoded) == n
    for i, (got, want) in enumerate(zip(decoded, frames, strict=True)):
        assert got.shape == (height, width, 3)
        err = mae(got, want)
        assert err < 6.0, f"frame {i} differs from its source by MAE {err:.2f}"
        # Each decoded frame is nearer its own source than its neighbours: no duplicated/shifted frames.
        for j in (i - 1, i + 1):
            if 0 <= j < n:
                assert err < mae(got, frames[j])


def test_mp4_is_yuv420p_with_faststart() -> None:
    data = encode_mp4(gradient_frames(8, 64, 64), fps=8)
    # +faststart puts the index (moov) ahead of the media data (mdat).
    assert 0 <= data.find(b"moov") < data.find(b"mdat")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.mp4"
        path.write_bytes(data)
        err = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
            capture_output=True,
            text=True,
            check=False,
        ).stderr
    stream = next(line for line in err.splitlines() if "Video:" in line)
    assert "h264" in stream
    assert "yuv420p" in stream
    assert "yuva420p" not in stream


def test_crf_changes_quality() -> None:
    frames = gradient_frames(8, 128, 128)
    fine = encode_mp4(frames, fps=8, crf=10)
    coarse = encode_mp4(frames, fps=8, crf=45)
    assert len(coarse) < len(fine)


def test_accepts_numpy_integer_fps() -> None:
    assert probe_video(encode_mp4(gradient_frames(4, 16, 16), fps=np.int64(4))).frames == 4


@pytest.mark.parametrize(
    ("frames", "fps", "match"),
    [
        ([], 8, "no frames"),
        ([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 32, 3), np.uint8)], 8, "frame 1 is 32x64"),
        ([np.zeros((63, 64, 3), np.uint8)], 8, "even"),
        ([np.zeros((64, 65, 3), np.uint8)], 8, "even"),
        ([np.zeros((64, 64, 3), np.uint8)], 0, "fps"),
        ([np.zeros((64, 64, 3), np.uint8)], -5, "fps"),
        ([np.zeros((64, 64, 3), np.uint8)], 2.5, "fps"),
        ([np.zeros((64, 64, 3), np.uint8)], True, "fps"),
        ([np.zeros((64, 64, 3), np.uint8)], 10_000, "fps"),
        ([np.zeros((64, 64, 3), np.float32)], 8, "uint8"),
        ([np.zeros((64, 64, 4), np.uint8)], 8, "HxWx3"),
        ([np.zeros((64, 64), np.uint8)], 8, "HxWx3"),
        ([[[0, 0, 0]]], 8, "numpy array"),
    ],
)
def test_encode_mp4_rejects_bad_input(frames: list[np.ndarray], fps: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_mp4(frames, fps=fps)


def test_encode_mp4_rejects_bad_crf_and_preset() -> None:
    frames = gradient_frames(2, 16, 16)
    with pytest.raises(ValueError, match="crf"):
        encode_mp4(frames, fps=8, crf=99)
    with pytest.raises(ValueError, match="preset"):
        encode_mp4(frames, fps=8, preset="warp-speed")


@pytest.mark.parametrize("data", [b"", b"definitely not a video", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64])
def test_probe_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"no video data|not a decodable video"):
        probe_video(data)


def test_no_temp_files_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmpdir = tmp_path / "tmp"
    cwd = tmp_path / "cwd"
    tmpdir.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.chdir(cwd)

    data = encode_mp4(gradient_frames(16, 64, 64), fps=8)
    assert probe_video(data).frames == 16
    with pytest.raises(ValueError, match="not a decodable video"):
        probe_video(b"garbage")

    assert list(tmpdir.iterdir()) == []
    assert list(cwd.iterdir()) == []


def test_temp_dir_cleaned_when_writing_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moviepy import ImageSequenceClip

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    written: list[Path] = []

    def half_written(self: object, filename: str, *args: object, **kwargs: object) -> None:
        path = Path(filename)
        assert tmpdir in path.parents  # the encoder works inside the (patched) temp dir
        path.write_bytes(b"partial")
        written.append(path)
        raise OSError("ffmpeg died")

    monkeypatch.setattr(ImageSequenceClip, "write_videofile", half_written)
    with pytest.raises(OSError, match="ffmpeg died"):
        encode_mp4(gradient_frames(4, 16, 16), fps=8)
    assert written
    assert list(tmpdir.iterdir()) == []


def test_png_round_trip_is_exact() -> None:
    frame = gradient_frames(3, 96, 64)[2]
    data = encode_image(frame, "PNG")
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    back = decode_png(data)
    assert back.dtype == np.uint8
    assert back.shape == (64, 96, 3)
    np.testing.assert_array_equal(back, frame)


def test_jpeg_round_trip_is_close() -> None:
    frame = gradient_frames(1, 128, 96)[0]
    data = encode_image(frame, "JPEG")
    assert data.startswith(b"\xff\xd8\xff")
    back = decode_png(data)
    assert back.shape == frame.shape
    assert mae(back, frame) < 3.0
    # Quality 92 is well above a low-quality encode of the same frame.
    low = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 30])[1]
    assert len(data) > len(low.tobytes())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_channel_order_is_rgb(fmt: str) -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    # PIL is an independent reader: it must see red, not blue.
    pil = np.asarray(Image.open(io.BytesIO(encode_image(red, fmt))).convert("RGB"))
    assert pil[..., 0].min() > 240
    assert pil[..., 2].max() < 15

    buf = io.BytesIO()
    Image.fromarray(red).save(buf, format=fmt)
    decoded = decode_png(buf.getvalue())
    assert decoded[..., 0].min() > 240
    assert decoded[..., 2].max() < 15


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_decode_png_always_returns_rgb(mode: str) -> None:
    img = Image.new(mode, (10, 6), color=200 if mode == "L" else (10, 20, 30, 128))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = decode_png(buf.getvalue())
    assert out.shape == (6, 10, 3)
    expected = (200, 200, 200) if mode == "L" else (10, 20, 30)
    assert tuple(out[0, 0]) == expected


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_decode_png_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"no image data|cannot decode image"):
        decode_png(data)


def test_encode_image_rejects_bad_input() -> None:
    frame = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="format"):
        encode_image(frame, "GIF")
    with pytest.raises(ValueError, match="uint8"):
        encode_image(frame.astype(np.float64), "PNG")
    with pytest.raises(ValueError, match="HxWx3"):
        encode_image(np.zeros((8, 8), np.uint8), "PNG")


def test_clip_duration_yields_exact_frame_counts() -> None:
    # The float helper behind the "exactly len(frames)" guarantee, over a wide range of counts and rates.
    for fps in (1, 3, 7, 8, 12, 23, 24, 25, 29, 30, 49, 60, 120, 240):
        for n in range(1, 400):
            assert int(video._clip_duration(n, fps) * fps) == n
