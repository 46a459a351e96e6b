"""Real H.264 MP4s: sizes for a request, a fast synthetic renderer, and a probe.

The simulator renders what it returns and the engine probes what it stores, so both sides
agree on one meaning of "a 1080p 9:16 video of 5 seconds" measured from the file itself.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.video.frame import VideoFrame

BASE_HEIGHTS = {"480p": 480, "720p": 720, "1080p": 1080, "4k": 2160}

# Width over height of the landscape form; portrait forms are the same rectangle turned.
_LANDSCAPE = {"16:9": Fraction(16, 9), "4:3": Fraction(4, 3), "21:9": Fraction(21, 9)}
_PORTRAIT = {"9:16": "16:9", "3:4": "4:3"}

# Few frames keep renders cheap; a second of one colour is still a valid, playable video.
FRAMES_PER_SECOND = 2

# Each second gets the next colour (Y, U, V), so a player visibly advances through the clip.
_PALETTE = (
    (82, 90, 240),
    (145, 54, 34),
    (41, 240, 110),
    (210, 16, 146),
    (107, 202, 222),
    (170, 166, 16),
)


class MediaError(ValueError):
    pass


def _even(n: int) -> int:
    # Rounding up keeps 480p 16:9 at the customary 854 rather than 852.
    return n + (n % 2)


def _round(value: Fraction) -> int:
    # Half-up, not Python's banker's rounding, so sizes don't depend on the parity of a tie.
    return int(value + Fraction(1, 2))


def pixel_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """``(width, height)`` in pixels, both even as H.264 4:2:0 requires."""
    try:
        height = BASE_HEIGHTS[resolution]
    except KeyError:
        raise MediaError(f"unknown resolution: {resolution!r}") from None
    if aspect_ratio == "1:1":
        return height, height
    if aspect_ratio in _PORTRAIT:
        width, tall = pixel_size(resolution, _PORTRAIT[aspect_ratio])
        return tall, width
    ratio = _LANDSCAPE.get(aspect_ratio)
    if ratio is None:
        raise MediaError(f"unknown aspect ratio: {aspect_ratio!r}")
    return _even(_round(height * ratio)), _even(height)


def _solid_frame(width: int, height: int, colour: tuple[int, int, int]) -> VideoFrame:
    frame = VideoFrame(width, height, "yuv420p")
    for plane, value in zip(frame.planes, colour, strict=True):
        # Filling the padded buffer too is harmless and avoids per-row copies.
        plane.update(bytes([value]) * plane.buffer_size)
    return frame


def render_mp4(width: int, height: int, seconds: int) -> bytes:
    """A playable H.264 (yuv420p) MP4 of exactly ``width``x``height`` lasting ``seconds``."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise MediaError(f"H.264 4:2:0 needs positive even sizes, got {width}x{height}")
    if seconds <= 0:
        raise MediaError(f"duration must be positive, got {seconds}")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FRAMES_PER_SECOND)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "stillimage"}
        time_base = Fraction(1, FRAMES_PER_SECOND)
        for second in range(seconds):
            colour = _PALETTE[second % len(_PALETTE)]
            for i in range(FRAMES_PER_SECOND):
                frame = _solid_frame(width, height, colour)
                frame.pts = second * FRAMES_PER_SECOND + i
                frame.time_base = time_base
                container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


@dataclass(frozen=True)
class MediaInfo:
    width: int
    height: int
    duration_seconds: int
    bytes: int
    content_type: str = "video/mp4"


def probe_mp4(path: Path) -> MediaInfo:
    """What the file itself says it is; a provider's claims are not trusted."""
    try:
        size = path.stat().st_size
        with av.open(str(path), "r") as container:
            if "mp4" not in container.format.name.split(","):
                raise MediaError(f"not an MP4 container: {container.format.name}")
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if container.duration is not None:
                duration = Fraction(container.duration, av.time_base)
            elif stream.duration is not None and stream.time_base is not None:
                duration = stream.duration * stream.time_base
            else:
                raise MediaError("the file states no duration")
            # Decoding one frame catches files whose header parses but whose media doesn't.
            if next(container.decode(stream), None) is None:
                raise MediaError("the video stream holds no decodable frame")
    except MediaError:
        raise
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"not a readable video: {e}") from e
    if width <= 0 or height <= 0:
        raise MediaError("the video stream has no picture size")
    return MediaInfo(width=width, height=height, duration_seconds=_round(duration), bytes=size)
