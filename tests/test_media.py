from array import array
from pathlib import Path

import av
import pytest

from adapters.media import MediaError, MediaInfo, pixel_size, probe_mp4, render_mp4


@pytest.mark.parametrize(
    ("resolution", "aspect_ratio", "size"),
    [
        ("480p", "16:9", (854, 480)),
        ("720p", "16:9", (1280, 720)),
        ("1080p", "16:9", (1920, 1080)),
        ("4k", "16:9", (3840, 2160)),
        ("480p", "9:16", (480, 854)),
        ("1080p", "9:16", (1080, 1920)),
        ("720p", "1:1", (720, 720)),
        ("480p", "4:3", (640, 480)),
        ("1080p", "4:3", (1440, 1080)),
        ("720p", "3:4", (720, 960)),
        ("480p", "21:9", (1120, 480)),
        ("1080p", "21:9", (2520, 1080)),
        ("4k", "21:9", (5040, 2160)),
    ],
)
def test_pixel_size(resolution: str, aspect_ratio: str, size: tuple[int, int]) -> None:
    assert pixel_size(resolution, aspect_ratio) == size


def test_every_pixel_size_is_even() -> None:
    for resolution in ("480p", "720p", "1080p", "4k"):
        for aspect_ratio in ("16:9", "9:16", "1:1", "4:3", "3:4", "21:9"):
            width, height = pixel_size(resolution, aspect_ratio)
            assert width % 2 == 0 and height % 2 == 0


@pytest.mark.parametrize(("resolution", "aspect_ratio"), [("360p", "16:9"), ("720p", "2:1")])
def test_pixel_size_rejects_unknown_values(resolution: str, aspect_ratio: str) -> None:
    with pytest.raises(MediaError):
        pixel_size(resolution, aspect_ratio)


@pytest.mark.parametrize(
    ("width", "height", "seconds"),
    [(854, 480, 5), (1280, 720, 10), (1080, 1920, 4), (1440, 1080, 1), (1120, 480, 12)],
)
def test_render_then_probe_round_trips(
    tmp_path: Path, width: int, height: int, seconds: int
) -> None:
    data = render_mp4(width, height, seconds)
    path = tmp_path / "v.mp4"
    path.write_bytes(data)

    assert probe_mp4(path) == MediaInfo(
        width=width, height=height, duration_seconds=seconds, bytes=len(data)
    )
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        frames = list(container.decode(stream))
    assert frames and all((f.width, f.height) == (width, height) for f in frames)


@pytest.mark.parametrize(("width", "height", "seconds"), [(853, 480, 5), (854, 0, 5), (64, 64, 0)])
def test_render_rejects_impossible_videos(width: int, height: int, seconds: int) -> None:
    with pytest.raises(MediaError):
        render_mp4(width, height, seconds)


def test_probe_rejects_what_is_not_a_video(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    with pytest.raises(MediaError):
        probe_mp4(garbage)
    with pytest.raises(MediaError):
        probe_mp4(tmp_path / "missing.mp4")


def test_probe_rejects_a_truncated_video(tmp_path: Path) -> None:
    data = render_mp4(640, 480, 2)
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(MediaError):
        probe_mp4(path)


def _decoded_samples(path: Path) -> tuple[int, list[float]]:
    """The audio track's sample rate and its first channel, decoded."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        samples: list[float] = []
        for frame in container.decode(stream):
            # FFmpeg's AAC decoder yields planar float; the plane may be padded past the samples.
            assert frame.format.name == "fltp"
            samples.extend(array("f", bytes(frame.planes[0])[: frame.samples * 4]))
    return rate, samples


@pytest.mark.parametrize(("width", "height", "seconds"), [(854, 480, 5), (1080, 1920, 1)])
def test_audio_render_carries_one_real_audio_track(
    tmp_path: Path, width: int, height: int, seconds: int
) -> None:
    path = tmp_path / "a.mp4"
    path.write_bytes(render_mp4(width, height, seconds, audio=True))

    with av.open(str(path)) as container:
        assert len(container.streams.video) == 1
        assert len(container.streams.audio) == 1
        assert len(container.streams) == 2
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert audio.codec_context.profile == "LC"
        assert audio.codec_context.sample_rate in (44_100, 48_000)
        assert audio.codec_context.channels in (1, 2)
        assert audio.duration is not None and audio.time_base is not None
        audio_seconds = audio.duration * audio.time_base
        frame_seconds = 1024 / audio.codec_context.sample_rate
    assert abs(audio_seconds - seconds) <= frame_seconds

    rate, samples = _decoded_samples(path)
    assert len(samples) >= seconds * rate * 0.95
    assert len(samples) <= (seconds + frame_seconds) * rate
    assert max(abs(s) for s in samples) > 0.01


@pytest.mark.parametrize(
    ("width", "height", "seconds"), [(854, 480, 5), (1920, 1080, 12), (720, 720, 1)]
)
def test_probe_tells_audio_from_silent_renders(
    tmp_path: Path, width: int, height: int, seconds: int
) -> None:
    silent, sounding = tmp_path / "silent.mp4", tmp_path / "sounding.mp4"
    silent.write_bytes(render_mp4(width, height, seconds))
    sounding.write_bytes(render_mp4(width, height, seconds, audio=True))

    assert probe_mp4(silent) == MediaInfo(
        width=width, height=height, duration_seconds=seconds, bytes=silent.stat().st_size
    )
    assert probe_mp4(sounding) == MediaInfo(
        width=width,
        height=height,
        duration_seconds=seconds,
        bytes=sounding.stat().st_size,
        audio=True,
    )


def test_probe_takes_the_video_duration_over_a_longer_audio_track(tmp_path: Path) -> None:
    short_video, long_audio = tmp_path / "video.mp4", tmp_path / "audio.mp4"
    short_video.write_bytes(render_mp4(640, 480, 3))
    long_audio.write_bytes(render_mp4(64, 64, 6, audio=True))
    mixed = tmp_path / "mixed.mp4"
    with (
        av.open(str(short_video)) as video_in,
        av.open(str(long_audio)) as audio_in,
        av.open(str(mixed), "w", format="mp4") as out,
    ):
        video_out = out.add_stream_from_template(video_in.streams.video[0])
        audio_out = out.add_stream_from_template(audio_in.streams.audio[0])
        packets: list[av.Packet] = [
            *video_in.demux(video_in.streams.video[0]),
            *audio_in.demux(audio_in.streams.audio[0]),
        ]
        for packet in packets:
            # The demuxer's closing flush packets carry no timestamps and nothing to copy.
            if packet.dts is not None:
                packet.stream = video_out if packet.stream.type == "video" else audio_out
                out.mux(packet)
    with av.open(str(mixed)) as container:
        assert container.duration is not None and container.duration > 5 * av.time_base

    info = probe_mp4(mixed)
    assert (info.width, info.height, info.duration_seconds, info.audio) == (640, 480, 3, True)
