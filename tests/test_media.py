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
