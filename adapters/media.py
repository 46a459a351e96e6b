"""Real H.264 MP4s (optionally with AAC audio): sizes for a request, a fast synthetic
renderer, and a probe.

The simulator renders what it returns and the engine probes what it stores, so both sides
agree on one meaning of "a 1080p 9:16 video of 5 seconds" measured from the file itself.
"""

from __future__ import annotations

import contextlib
import io
import math
from array import array
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

# PyAV is imported where a video is rendered or probed, not with this module: every process
# imports it (each CLI tool too), and loading FFmpeg's libraries is a tenth of a start-up.
if TYPE_CHECKING:
    from av.audio.frame import AudioFrame
    from av.audio.stream import AudioStream
    from av.container import InputContainer, OutputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

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


# Mono at a common player rate; one channel halves the encoding work and a test tone needs
# no more.
AUDIO_SAMPLE_RATE = 48_000
_AUDIO_BIT_RATE = 64_000
# About -20 dBFS: clearly audible, never startling.
_TONE_AMPLITUDE = 0.1
# Each second gets the next pitch, like the palette. Whole hertz means every second holds a
# whole number of cycles, so each starts at phase zero and the seams don't click.
_TONES_HZ = (220, 277, 330, 440, 554, 659)


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
    from av.video.frame import VideoFrame

    frame = VideoFrame(width, height, "yuv420p")
    for plane, value in zip(frame.planes, colour, strict=True):
        # Filling the padded buffer too is harmless and avoids per-row copies.
        plane.update(bytes([value]) * plane.buffer_size)
    return frame


@cache
def _tone_second(hz: int) -> bytes:
    # Pure-Python synthesis costs several milliseconds a pitch; renders come in bursts, so
    # each pitch's second is built once per process (a racing duplicate is harmless).
    step = 2 * math.pi * hz / AUDIO_SAMPLE_RATE
    samples = array("f", (_TONE_AMPLITUDE * math.sin(step * n) for n in range(AUDIO_SAMPLE_RATE)))
    return samples.tobytes()


def _tone_frame(second: int) -> AudioFrame:
    from av.audio.frame import AudioFrame

    frame = AudioFrame(format="fltp", layout="mono", samples=AUDIO_SAMPLE_RATE)
    tone = _tone_second(_TONES_HZ[second % len(_TONES_HZ)])
    plane = frame.planes[0]
    # The plane may be padded past the samples for alignment; the padding is never read.
    plane.update(tone + bytes(plane.buffer_size - len(tone)))
    frame.sample_rate = AUDIO_SAMPLE_RATE
    frame.pts = second * AUDIO_SAMPLE_RATE
    frame.time_base = Fraction(1, AUDIO_SAMPLE_RATE)
    return frame


def _add_tone_stream(container: OutputContainer) -> AudioStream:
    stream = container.add_stream("aac", rate=AUDIO_SAMPLE_RATE, layout="mono")
    stream.bit_rate = _AUDIO_BIT_RATE
    return stream


def render_mp4(width: int, height: int, seconds: int, audio: bool = False) -> bytes:
    """A playable H.264 (yuv420p) MP4 of exactly ``width``x``height`` lasting ``seconds``.

    With ``audio`` it also carries one mono AAC-LC track of a quiet tone, as long as the video.
    """
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise MediaError(f"H.264 4:2:0 needs positive even sizes, got {width}x{height}")
    if seconds <= 0:
        raise MediaError(f"duration must be positive, got {seconds}")
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=FRAMES_PER_SECOND)
        video.width = width
        video.height = height
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "ultrafast", "tune": "stillimage"}
        # Every stream must exist before the first packet is muxed, as that writes the header.
        sound = _add_tone_stream(container) if audio else None
        time_base = Fraction(1, FRAMES_PER_SECOND)
        for second in range(seconds):
            colour = _PALETTE[second % len(_PALETTE)]
            for i in range(FRAMES_PER_SECOND):
                frame = _solid_frame(width, height, colour)
                frame.pts = second * FRAMES_PER_SECOND + i
                frame.time_base = time_base
                container.mux(video.encode(frame))
            if sound is not None:
                # Whole seconds go in; PyAV cuts them into the encoder's 1024-sample frames
                # and passes the short last one through on flush, so the track ends with the
                # video rather than up to a frame later.
                container.mux(sound.encode(_tone_frame(second)))
        container.mux(video.encode(None))
        if sound is not None:
            container.mux(sound.encode(None))
    return buf.getvalue()


@dataclass(frozen=True)
class MediaInfo:
    width: int
    height: int
    duration_seconds: int
    bytes: int
    content_type: str = "video/mp4"
    # Whether some audio stream yields decoded sound; a track that only parses doesn't count.
    audio: bool = False


def _decode_first_frames(container: InputContainer, video: VideoStream) -> bool:
    """Decode until the video yields a frame (or fail) and report whether any audio did too."""
    import av

    audio_streams = list(container.streams.audio)
    seen_video = heard = False
    # One pass over the interleaved packets: decoding each stream separately would either
    # skip the other's packets read meanwhile or cost a seek per stream.
    for packet in container.demux(video, *audio_streams):
        if packet.stream.type == "video":
            if not seen_video:
                seen_video = bool(packet.decode())
        elif not heard:
            # Broken sound makes a silent video, not an unusable one; later packets may still
            # decode.
            with contextlib.suppress(av.FFmpegError):
                heard = bool(packet.decode())
        if seen_video and (heard or not audio_streams):
            break
    # Decoding one frame catches files whose header parses but whose media doesn't.
    if not seen_video:
        raise MediaError("the video stream holds no decodable frame")
    return heard


def probe_mp4(path: Path) -> MediaInfo:
    """What the file itself says it is; a provider's claims are not trusted."""
    import av

    try:
        size = path.stat().st_size
        with av.open(str(path), "r") as container:
            if "mp4" not in container.format.name.split(","):
                raise MediaError(f"not an MP4 container: {container.format.name}")
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            # The video's own length comes first: the container's is the longest stream's,
            # and an audio track may run past the picture (encoder padding, a longer take).
            if stream.duration and stream.time_base is not None:
                duration = stream.duration * stream.time_base
            elif container.duration is not None:
                # Some muxers (live, fragmented) leave the track's own length unstated.
                duration = Fraction(container.duration, av.time_base)
            else:
                raise MediaError("the file states no duration")
            audio = _decode_first_frames(container, stream)
    except MediaError:
        raise
    except (av.FFmpegError, OSError) as e:
        raise MediaError(f"not a readable video: {e}") from e
    if width <= 0 or height <= 0:
        raise MediaError("the video stream has no picture size")
    return MediaInfo(
        width=width, height=height, duration_seconds=_round(duration), bytes=size, audio=audio
    )
