"""Encode rendered frames into images and H.264 MP4 videos, and probe what was encoded.

Frames are ``HxWx3`` ``uint8`` RGB arrays. Videos are written with moviepy (which drives the ffmpeg
binary shipped by imageio-ffmpeg) and probed by decoding every frame with that same binary, so the
frame count we record is the number of frames a player will actually show, not what a container
header claims.
"""

from __future__ import annotations

import math
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["VideoInfo", "decode_png", "encode_image", "encode_mp4", "probe_video"]

MAX_FPS = 240
JPEG_QUALITY = 92
_PRESETS = frozenset(
    {"ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"}
)
_PROBE_TIMEOUT_S = 120

# `ffmpeg -i` stderr: "Stream #0:0[0x1](und): Video: h264 (High) (avc1 / ...), yuv420p(...), 64x64, ..."
_VIDEO_STREAM_RE = re.compile(r"Stream #\d+:\d+.*?: Video: (?P<codec>[A-Za-z0-9_]+)(?P<rest>.*)")
_SIZE_RE = re.compile(r"(?:^|[ ,])(?P<w>\d{1,5})x(?P<h>\d{1,5})(?=[ ,\[]|$)")
_FPS_RE = re.compile(r"(?P<fps>\d+(?:\.\d+)?)(?P<k>k?) fps")
_FRAME_RE = re.compile(r"frame=\s*(?P<n>\d+)")
_CODEC_ALIASES = {"avc1": "h264", "avc": "h264", "x264": "h264", "libx264": "h264", "h264": "h264"}


@dataclass(frozen=True)
class VideoInfo:
    """What an encoded video really holds: decoded frame count, frame rate, duration, size, codec."""

    frames: int
    fps: float
    duration_ms: int
    width: int
    height: int
    codec: str


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def _check_frame(frame: object, what: str) -> NDArray[np.uint8]:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"{what} is a {type(frame).__name__}, not a numpy array")
    if frame.dtype != np.uint8:
        raise ValueError(f"{what} has dtype {frame.dtype}, expected uint8")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{what} has shape {frame.shape}, expected HxWx3 RGB")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"{what} is empty ({frame.shape})")
    return frame


def _clip_duration(n_frames: int, fps: int) -> float:
    """The smallest duration for which moviepy iterates exactly ``n_frames`` frames.

    moviepy's ``iter_frames`` yields ``int(duration * fps)`` frames, and ``ImageSequenceClip``
    sets ``duration = sum([1 / fps] * n)``, which can land one ulp short (64 frames at 24 fps
    gives 2.6666666666666656 s, i.e. 63 frames: the last frame is silently dropped).
    """
    duration = n_frames / fps
    while int(duration * fps) < n_frames:
        duration = math.nextafter(duration, math.inf)
    if int(duration * fps) != n_frames:  # pragma: no cover - float arithmetic cannot get here
        raise AssertionError(f"cannot represent {n_frames} frames at {fps} fps")
    return duration


def encode_mp4(frames: Sequence[np.ndarray], fps: int, crf: int = 20, preset: str = "veryfast") -> bytes:
    """Encode RGB frames to an H.264 (yuv420p, faststart) MP4 of exactly ``len(frames)`` frames at ``fps``."""
    if isinstance(fps, bool) or not isinstance(fps, int | np.integer) or not 1 <= int(fps) <= MAX_FPS:
        raise ValueError(f"fps must be an integer in [1, {MAX_FPS}], got {fps!r}")
    fps = int(fps)
    if isinstance(crf, bool) or not isinstance(crf, int | np.integer) or not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be an integer in [0, 51], got {crf!r}")
    if preset not in _PRESETS:
        raise ValueError(f"unknown x264 preset {preset!r}")
    if len(frames) == 0:
        raise ValueError("cannot encode a video with no frames")
    checked = [_check_frame(f, f"frame {i}") for i, f in enumerate(frames)]
    height, width = checked[0].shape[:2]
    for i, frame in enumerate(checked):
        if frame.shape[:2] != (height, width):
            raise ValueError(f"frame {i} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is {width}x{height}")
    if width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")

    from moviepy import ImageSequenceClip

    clip = ImageSequenceClip([np.ascontiguousarray(f) for f in checked], fps=fps)
    clip.duration = clip.end = _clip_duration(len(checked), fps)
    try:
        with tempfile.TemporaryDirectory(prefix="aigc-video-") as tmp:
            out = Path(tmp) / "video.mp4"
            clip.write_videofile(
                str(out),
                fps=fps,
                codec="libx264",
                preset=preset,
                audio=False,
                threads=None,
                logger=None,
                # moviepy 2.1 appends its own "-pix_fmt yuva420p" for even-sized libx264 output; x264
                # has no alpha, so ffmpeg falls back to yuv420p, which is what we ask for anyway.
                ffmpeg_params=["-crf", str(int(crf)), "-pix_fmt", "yuv420p", "-movflags", "+faststart"],
            )
            return out.read_bytes()
    finally:
        clip.close()


def decode_png(data: bytes) -> NDArray[np.uint8]:
    """Decode PNG or JPEG bytes to an ``HxWx3`` ``uint8`` RGB array (alpha dropped, grey expanded)."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise ValueError("no image data")
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ValueError(f"cannot decode image: {exc}") from exc
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise ValueError("cannot decode image: not a PNG or JPEG cv2 can read")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


def encode_image(frame: np.ndarray, fmt: str) -> bytes:
    """Encode an ``HxWx3`` ``uint8`` RGB frame as ``"PNG"`` (lossless) or ``"JPEG"`` (quality 92)."""
    rgb = _check_frame(frame, "frame")
    kind = fmt.upper() if isinstance(fmt, str) else fmt
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if kind == "PNG":
        ok, buf = cv2.imencode(".png", bgr)
    elif kind in ("JPEG", "JPG"):
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        raise ValueError(f"unsupported image format {fmt!r}; expected 'PNG' or 'JPEG'")
    if not ok:
        raise ValueError(f"cv2 could not encode a {rgb.shape} frame as {kind}")
    return bytes(buf.tobytes())


def probe_video(data: bytes) -> VideoInfo:
    """Decode every frame of ``data`` with ffmpeg and report what is really there.

    The frame count comes from the decoder, not from the container; fps, size and codec come from
    the video stream header. ``duration_ms`` is ``round(frames * 1000 / fps)``.
    """
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise ValueError("no video data")
    with tempfile.TemporaryDirectory(prefix="aigc-probe-") as tmp:
        path = Path(tmp) / "probe.bin"
        path.write_bytes(bytes(data))
        cmd = [
            _ffmpeg_exe(),
            "-hide_banner",
            "-nostdin",
            "-i",
            str(path),
            "-map",
            "0:v:0",
            "-fps_mode",
            "passthrough",
            "-an",
            "-sn",
            "-f",
            "null",
            "-",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=_PROBE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ValueError(f"ffmpeg took more than {_PROBE_TIMEOUT_S}s to decode the video") from exc
    err = proc.stderr.decode("utf-8", "replace")
    stream = _VIDEO_STREAM_RE.search(err)
    if proc.returncode != 0 or stream is None:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise ValueError(f"not a decodable video (ffmpeg exit {proc.returncode}): {tail}")

    codec = stream.group("codec").lower()
    codec = _CODEC_ALIASES.get(codec, codec)
    rest = stream.group("rest")
    size = _SIZE_RE.search(rest)
    fps_match = _FPS_RE.search(rest)
    if size is None or fps_match is None:
        raise ValueError(f"cannot read size and fps from the video stream: {stream.group(0)!r}")
    fps = float(fps_match.group("fps")) * (1000.0 if fps_match.group("k") else 1.0)
    counts = _FRAME_RE.findall(err)
    if not counts:
        raise ValueError("ffmpeg reported no decoded frame count")
    frames = int(counts[-1])
    if frames <= 0 or fps <= 0:
        raise ValueError(f"video has {frames} decodable frames at {fps} fps")
    return VideoInfo(
        frames=frames,
        fps=fps,
        duration_ms=round(frames * 1000 / fps),
        width=int(size.group("w")),
        height=int(size.group("h")),
        codec=codec,
    )
