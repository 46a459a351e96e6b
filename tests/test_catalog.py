from __future__ import annotations

from typing import Any

import pytest

from domain.catalog import (
    ALIASES,
    Catalog,
    ModelSpec,
    RequestError,
    VideoRequest,
    parse_venice_models,
    validate_video_request,
)


def venice_model(
    model_id: str,
    *,
    model_type: str = "text-to-video",
    durations: list[Any] | None = None,
    resolutions: list[str] | None = None,
    aspect_ratios: list[str] | None = None,
    audio: bool = False,
    image_input: bool | None = None,
    default_resolution: str | None = None,
    default_aspect_ratio: str | None = "16:9",
) -> dict[str, Any]:
    constraints: dict[str, Any] = {
        "model_type": model_type,
        "durations": durations if durations is not None else ["5s", "10s"],
        "resolutions": resolutions if resolutions is not None else ["720p", "1080p"],
        "aspect_ratios": aspect_ratios if aspect_ratios is not None else ["16:9", "9:16", "1:1"],
        "audio": audio,
    }
    if image_input is not None:
        constraints["image_input"] = image_input
    if default_resolution is not None:
        constraints["default_resolution"] = default_resolution
    if default_aspect_ratio is not None:
        constraints["default_aspect_ratio"] = default_aspect_ratio
    return {
        "id": model_id,
        "object": "model",
        "type": "video",
        "model_spec": {"name": model_id.title(), "constraints": constraints},
    }


# The simulator's catalog (SPEC 5.2), as its /models would list it.
SIMULATOR_MODELS = [
    venice_model("runway-gen4-5-text", default_resolution="720p"),
    venice_model(
        "seedance-2-fast-t2v",
        durations=["12s", "4s", "8s", "6s"],
        resolutions=["480p", "720p", "1080p"],
        audio=True,
        default_resolution="480p",
    ),
    venice_model("pixverse-c1-t2v", durations=["5s", "8s"], audio=True, default_resolution="720p"),
    venice_model(
        "wan-2-5-i2v",
        model_type="image-to-video",
        resolutions=["480p", "720p", "1080p"],
        image_input=True,
        default_resolution="480p",
    ),
]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog(parse_venice_models("venice", SIMULATOR_MODELS))


def validate(catalog: Catalog, body: object, **flags: bool) -> VideoRequest:
    options = {"allow_http_webhooks": False, "allow_private_webhooks": False, **flags}
    return validate_video_request(body, catalog, **options)


# parsing the provider's /models


def test_parse_the_documented_example() -> None:
    item = {
        "id": "runway-gen4-5-text",
        "object": "model",
        "type": "video",
        "model_spec": {
            "name": "Runway Gen-4.5",
            "constraints": {
                "model_type": "text-to-video",
                "durations": ["5s", "10s"],
                "resolutions": ["720p", "1080p"],
                "aspect_ratios": ["16:9", "9:16", "1:1"],
                "audio": False,
                "image_input": False,
                "default_resolution": "720p",
                "default_aspect_ratio": "16:9",
            },
        },
    }
    assert parse_venice_models("venice", [item]) == [
        ModelSpec(
            id="venice-runway-gen4-5-text",
            provider="venice",
            provider_model="runway-gen4-5-text",
            name="Runway Gen-4.5",
            image_input=False,
            durations=(5, 10),
            resolutions=("720p", "1080p"),
            aspect_ratios=("16:9", "9:16", "1:1"),
            audio=False,
            default_resolution="720p",
            default_aspect_ratio="16:9",
            aliases=(),
        )
    ]


def test_parse_sorts_durations_and_fills_aliases_and_image_input() -> None:
    models = {m.id: m for m in parse_venice_models("venice", SIMULATOR_MODELS)}
    assert sorted(models) == [
        "venice-pixverse-c1-t2v",
        "venice-runway-gen4-5-text",
        "venice-seedance-2-fast-t2v",
        "venice-wan-2-5-i2v",
    ]
    seedance = models["venice-seedance-2-fast-t2v"]
    assert seedance.durations == (4, 6, 8, 12)
    assert seedance.aliases == ("venice-video-gen",)
    assert seedance.audio is True
    assert models["venice-wan-2-5-i2v"].image_input is True


def test_parse_derives_image_input_from_model_type() -> None:
    [model] = parse_venice_models("venice", [venice_model("x-i2v", model_type="image-to-video")])
    assert model.image_input is True


def test_parse_falls_back_to_lowest_resolution_and_16_9() -> None:
    item = venice_model(
        "m",
        resolutions=["1080p", "4k", "480p"],
        aspect_ratios=["9:16", "16:9"],
        default_resolution="8k",
        default_aspect_ratio=None,
    )
    [model] = parse_venice_models("venice", [item])
    assert (model.default_resolution, model.default_aspect_ratio) == ("480p", "16:9")


def test_parse_accepts_integer_and_bare_durations() -> None:
    [model] = parse_venice_models("venice", [venice_model("m", durations=[10, "5"])])
    assert model.durations == (5, 10)


@pytest.mark.parametrize(
    "item",
    [
        "not an object",
        None,
        {"id": "m", "type": "video"},
        {"id": 7, "model_spec": {"constraints": {}}},
        {"id": "", "model_spec": {"constraints": {}}},
        {"id": "../etc", "model_spec": {"constraints": {}}},
        {**venice_model("m"), "type": "image"},
        {**venice_model("m"), "model_spec": {"name": "M", "constraints": "x"}},
        venice_model("m", durations=[]),
        venice_model("m", durations=["five"]),
        venice_model("m", durations=["5.5s"]),
        venice_model("m", durations=[True]),
        venice_model("m", durations=[0]),
        venice_model("m", resolutions=[]),
        venice_model("m", resolutions=[720]),  # type: ignore[list-item]
        venice_model("m", aspect_ratios=[]),
    ],
)
def test_parse_skips_malformed_entries(item: object) -> None:
    good = venice_model("good")
    models = parse_venice_models("venice", [item, good])  # type: ignore[list-item]
    assert [m.id for m in models] == ["venice-good"]


def test_parse_skips_non_boolean_audio_and_keeps_the_first_duplicate() -> None:
    bad_audio = venice_model("m")
    bad_audio["model_spec"]["constraints"]["audio"] = "yes"
    first = venice_model("dup", durations=["5s"])
    second = venice_model("dup", durations=["10s"])
    models = parse_venice_models("venice", [bad_audio, first, second])
    assert [(m.id, m.durations) for m in models] == [("venice-dup", (5,))]


def test_parse_of_a_non_list_is_empty() -> None:
    assert parse_venice_models("venice", {"data": []}) == []  # type: ignore[arg-type]


# the catalog


def test_catalog_resolves_ids_and_the_alias(catalog: Catalog) -> None:
    assert ALIASES == {"venice-video-gen": "venice-seedance-2-fast-t2v"}
    seedance = catalog.resolve("venice-seedance-2-fast-t2v")
    assert seedance is not None
    assert catalog.resolve("venice-video-gen") == seedance
    assert catalog.resolve("seedance-2-fast-t2v") is None
    assert catalog.resolve("VENICE-VIDEO-GEN") is None
    assert catalog.resolve("nope") is None


def test_catalog_lists_models_sorted_with_aliases(catalog: Catalog) -> None:
    models = catalog.models()
    assert [m.id for m in models] == sorted(m.id for m in models)
    assert {m.id: m.aliases for m in models}["venice-seedance-2-fast-t2v"] == ("venice-video-gen",)


def test_catalog_drops_an_alias_whose_target_is_missing() -> None:
    catalog = Catalog(parse_venice_models("venice", [venice_model("runway-gen4-5-text")]))
    assert catalog.resolve("venice-video-gen") is None


def test_catalog_prefers_a_model_id_over_an_alias_of_the_same_name() -> None:
    models = parse_venice_models("venice", [venice_model("a"), venice_model("b")])
    catalog = Catalog(models, aliases={"venice-a": "venice-b", "short": "venice-b"})
    a = catalog.resolve("venice-a")
    assert a is not None and a.id == "venice-a"
    b = catalog.resolve("short")
    assert b is not None and b.id == "venice-b" and b.aliases == ("short",)


# validation: success and defaults

RUNWAY = "venice-runway-gen4-5-text"
SEEDANCE = "venice-seedance-2-fast-t2v"
WAN = "venice-wan-2-5-i2v"


def test_defaults_are_applied(catalog: Catalog) -> None:
    request = validate(catalog, {"model": "venice-video-gen", "prompt": "a cat"})
    assert request.model.id == SEEDANCE
    assert request.duration_seconds == 4
    assert (request.resolution, request.aspect_ratio, request.audio) == ("480p", "16:9", False)
    assert (request.image_url, request.webhook_url, request.metadata) == (None, None, {})


def test_every_field_is_taken(catalog: Catalog) -> None:
    body = {
        "model": SEEDANCE,
        "prompt": "a cat",
        "duration_seconds": 12,
        "resolution": "1080p",
        "aspect_ratio": "9:16",
        "audio": True,
        "webhook_url": "https://hooks.example.com/mm?x=1",
        "metadata": {"order": "42", "n": 3, "ok": True, "ratio": 0.5, "none": None},
    }
    request = validate(catalog, body)
    assert request.duration_seconds == 12
    assert (request.resolution, request.aspect_ratio, request.audio) == ("1080p", "9:16", True)
    assert request.webhook_url == "https://hooks.example.com/mm?x=1"
    assert request.metadata == body["metadata"]
    assert request.metadata is not body["metadata"]


def test_null_optional_fields_count_as_omitted(catalog: Catalog) -> None:
    body = {
        "model": RUNWAY,
        "prompt": "p",
        "duration_seconds": None,
        "resolution": None,
        "aspect_ratio": None,
        "audio": None,
        "image_url": None,
        "webhook_url": None,
        "metadata": None,
    }
    request = validate(catalog, body)
    assert request == validate(catalog, {"model": RUNWAY, "prompt": "p"})


def test_image_model_takes_an_image(catalog: Catalog) -> None:
    for url in ("https://img.example.com/a.png", "http://img.example.com/a.png"):
        assert validate(catalog, {"model": WAN, "prompt": "p", "image_url": url}).image_url == url
    data_url = "data:image/png;base64,iVBORw0KGgo="
    assert validate(catalog, {"model": WAN, "prompt": "p", "image_url": data_url}).image_url


def test_prompt_lengths_count_characters(catalog: Catalog) -> None:
    assert validate(catalog, {"model": RUNWAY, "prompt": "é" * 2000}).prompt == "é" * 2000
    assert validate(catalog, {"model": RUNWAY, "prompt": " x "}).prompt == " x "


def test_audio_false_is_fine_on_a_silent_model(catalog: Catalog) -> None:
    assert validate(catalog, {"model": RUNWAY, "prompt": "p", "audio": False}).audio is False


@pytest.mark.parametrize(
    ("webhook_url", "flags"),
    [
        ("https://example.com/hook", {}),
        ("https://8.8.8.8/hook", {}),
        ("https://[2606:4700::1111]/hook", {}),
        ("http://example.com/hook", {"allow_http_webhooks": True}),
        ("https://localhost/hook", {"allow_private_webhooks": True}),
        (
            "http://127.0.0.1:8080/hook",
            {"allow_http_webhooks": True, "allow_private_webhooks": True},
        ),
        ("https://192.168.1.5/hook", {"allow_private_webhooks": True}),
        ("https://user:secret@example.com:8443/hook", {}),
    ],
)
def test_webhook_urls_accepted(catalog: Catalog, webhook_url: str, flags: dict[str, bool]) -> None:
    body = {"model": RUNWAY, "prompt": "p", "webhook_url": webhook_url}
    assert validate(catalog, body, **flags).webhook_url == webhook_url


# validation: every error code and param


def base(**fields: object) -> dict[str, object]:
    return {"model": RUNWAY, "prompt": "a cat", **fields}


INVALID = "invalid_request"
UNSUPPORTED = "unsupported_parameter"

ERROR_CASES: list[tuple[str, object, str, str | None]] = [
    # body shape
    ("list body", [], INVALID, None),
    ("string body", "model", INVALID, None),
    ("null body", None, INVALID, None),
    ("unknown field", base(seed=1), INVALID, "seed"),
    ("unknown field n", base(n=2), INVALID, "n"),
    # model
    ("missing model", {"prompt": "p"}, INVALID, "model"),
    ("null model", {"model": None, "prompt": "p"}, INVALID, "model"),
    ("model not a string", {"model": 3, "prompt": "p"}, INVALID, "model"),
    ("unknown model", base(model="venice-nope"), "model_not_found", "model"),
    (
        "provider id is not a marketplace id",
        base(model="runway-gen4-5-text"),
        "model_not_found",
        "model",
    ),
    # prompt
    ("missing prompt", {"model": RUNWAY}, INVALID, "prompt"),
    ("null prompt", {"model": RUNWAY, "prompt": None}, INVALID, "prompt"),
    ("prompt not a string", base(prompt=["a"]), INVALID, "prompt"),
    ("empty prompt", base(prompt=""), INVALID, "prompt"),
    ("blank prompt", base(prompt=" \n\t "), INVALID, "prompt"),
    ("prompt too long", base(prompt="x" * 2001), "prompt_too_long", "prompt"),
    # duration
    ("duration as string", base(duration_seconds="5"), INVALID, "duration_seconds"),
    ("duration as float", base(duration_seconds=5.0), INVALID, "duration_seconds"),
    ("duration as bool", base(duration_seconds=True), INVALID, "duration_seconds"),
    ("duration not offered", base(duration_seconds=7), UNSUPPORTED, "duration_seconds"),
    ("duration zero", base(duration_seconds=0), UNSUPPORTED, "duration_seconds"),
    # resolution, aspect ratio
    ("resolution not a string", base(resolution=720), INVALID, "resolution"),
    ("resolution not offered", base(resolution="480p"), UNSUPPORTED, "resolution"),
    ("resolution wrong case", base(resolution="720P"), UNSUPPORTED, "resolution"),
    ("aspect ratio not a string", base(aspect_ratio=1.77), INVALID, "aspect_ratio"),
    ("aspect ratio not offered", base(aspect_ratio="21:9"), UNSUPPORTED, "aspect_ratio"),
    # audio
    ("audio not a boolean", base(model=SEEDANCE, audio="true"), INVALID, "audio"),
    ("audio as 1", base(model=SEEDANCE, audio=1), INVALID, "audio"),
    ("audio on a silent model", base(audio=True), UNSUPPORTED, "audio"),
    # image_url
    (
        "image_url on a text model",
        base(image_url="https://x.example/a.png"),
        UNSUPPORTED,
        "image_url",
    ),
    ("image_url missing", base(model=WAN), INVALID, "image_url"),
    ("image_url not a string", base(model=WAN, image_url={"url": "x"}), INVALID, "image_url"),
    ("image_url ftp", base(model=WAN, image_url="ftp://x.example/a.png"), INVALID, "image_url"),
    ("image_url relative", base(model=WAN, image_url="/a.png"), INVALID, "image_url"),
    ("image_url without host", base(model=WAN, image_url="https:///a.png"), INVALID, "image_url"),
    (
        "image_url bad port",
        base(model=WAN, image_url="https://x.example:99999/a"),
        INVALID,
        "image_url",
    ),
    (
        "image_url data not an image",
        base(model=WAN, image_url="data:text/plain,hi"),
        INVALID,
        "image_url",
    ),
    (
        "image_url data empty",
        base(model=WAN, image_url="data:image/png;base64,"),
        INVALID,
        "image_url",
    ),
    (
        "image_url too long",
        base(model=WAN, image_url="https://x.example/" + "a" * 2048),
        INVALID,
        "image_url",
    ),
    # webhook_url
    ("webhook not a string", base(webhook_url=1), INVALID, "webhook_url"),
    ("webhook http", base(webhook_url="http://example.com/h"), INVALID, "webhook_url"),
    ("webhook ftp", base(webhook_url="ftp://example.com/h"), INVALID, "webhook_url"),
    ("webhook no scheme", base(webhook_url="example.com/h"), INVALID, "webhook_url"),
    ("webhook no host", base(webhook_url="https:///h"), INVALID, "webhook_url"),
    ("webhook bad port", base(webhook_url="https://example.com:0x50/h"), INVALID, "webhook_url"),
    ("webhook localhost", base(webhook_url="https://localhost/h"), INVALID, "webhook_url"),
    ("webhook LOCALHOST.", base(webhook_url="https://LOCALHOST./h"), INVALID, "webhook_url"),
    ("webhook sub.localhost", base(webhook_url="https://a.localhost/h"), INVALID, "webhook_url"),
    ("webhook loopback", base(webhook_url="https://127.0.0.1/h"), INVALID, "webhook_url"),
    ("webhook private 10/8", base(webhook_url="https://10.1.2.3/h"), INVALID, "webhook_url"),
    ("webhook private 172.16/12", base(webhook_url="https://172.16.0.1/h"), INVALID, "webhook_url"),
    (
        "webhook private 192.168/16",
        base(webhook_url="https://192.168.0.1/h"),
        INVALID,
        "webhook_url",
    ),
    ("webhook link-local", base(webhook_url="https://169.254.169.254/h"), INVALID, "webhook_url"),
    ("webhook unspecified", base(webhook_url="https://0.0.0.0/h"), INVALID, "webhook_url"),
    ("webhook CGNAT", base(webhook_url="https://100.64.0.1/h"), INVALID, "webhook_url"),
    ("webhook v6 loopback", base(webhook_url="https://[::1]/h"), INVALID, "webhook_url"),
    ("webhook v6 ULA", base(webhook_url="https://[fd00::1]/h"), INVALID, "webhook_url"),
    ("webhook v6 link-local", base(webhook_url="https://[fe80::1]/h"), INVALID, "webhook_url"),
    (
        "webhook v4-mapped loopback",
        base(webhook_url="https://[::ffff:127.0.0.1]/h"),
        INVALID,
        "webhook_url",
    ),
    ("webhook short v4", base(webhook_url="https://127.1/h"), INVALID, "webhook_url"),
    ("webhook integer v4", base(webhook_url="https://2130706433/h"), INVALID, "webhook_url"),
    ("webhook hex v4", base(webhook_url="https://0x7f.0.0.1/h"), INVALID, "webhook_url"),
    (
        "webhook too long",
        base(webhook_url="https://example.com/" + "a" * 2048),
        INVALID,
        "webhook_url",
    ),
    # metadata
    ("metadata not an object", base(metadata=["a"]), INVALID, "metadata"),
    ("metadata as string", base(metadata="{}"), INVALID, "metadata"),
    ("metadata 17 keys", base(metadata={f"k{i}": "v" for i in range(17)}), INVALID, "metadata"),
    ("metadata long key", base(metadata={"k" * 41: "v"}), INVALID, "metadata"),
    ("metadata empty key", base(metadata={"": "v"}), INVALID, "metadata"),
    ("metadata non-string key", base(metadata={1: "v"}), INVALID, "metadata"),
    ("metadata long value", base(metadata={"k": "v" * 501}), INVALID, "metadata"),
    ("metadata nested object", base(metadata={"k": {"a": 1}}), INVALID, "metadata"),
    ("metadata list value", base(metadata={"k": [1]}), INVALID, "metadata"),
    ("metadata NaN", base(metadata={"k": float("nan")}), INVALID, "metadata"),
    ("metadata Infinity", base(metadata={"k": float("inf")}), INVALID, "metadata"),
    ("metadata huge int", base(metadata={"k": 2**53}), INVALID, "metadata"),
]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_validation_errors(catalog: Catalog, body: object, code: str, param: str | None) -> None:
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, body)
    assert (excinfo.value.code, excinfo.value.param) == (code, param)
    assert excinfo.value.message == str(excinfo.value)
    assert excinfo.value.message


def test_prompt_too_long_message_is_exact(catalog: Catalog) -> None:
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, base(prompt="é" * 2001))
    assert excinfo.value.message == "prompt must be at most 2000 characters"


def test_unsupported_duration_lists_the_allowed_values(catalog: Catalog) -> None:
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, base(model=SEEDANCE, duration_seconds=5))
    assert "4, 6, 8, 12" in excinfo.value.message


def test_unknown_field_is_reported_before_anything_else(catalog: Catalog) -> None:
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, {"model": "nope", "prompt": "", "extra": 1})
    assert (excinfo.value.code, excinfo.value.param) == (INVALID, "extra")


def test_the_limits_themselves_are_accepted(catalog: Catalog) -> None:
    metadata = {f"{i:02d}" + "k" * 38: "v" * 500 for i in range(16)}
    request = validate(catalog, base(metadata=metadata, prompt="x" * 2000))
    assert len(request.metadata) == 16
    assert validate(catalog, base(metadata={"k": 2**53 - 1, "j": -(2**53 - 1)})).metadata


# provider parameters and fingerprints


def test_provider_params(catalog: Catalog) -> None:
    runway = validate(catalog, base(duration_seconds=10, resolution="1080p"))
    assert runway.provider_params() == {
        "model": "runway-gen4-5-text",
        "duration": "10s",
        "resolution": "1080p",
        "aspect_ratio": "16:9",
    }
    seedance = validate(catalog, {"model": "venice-video-gen", "prompt": "p"})
    assert seedance.provider_params() == {
        "model": "seedance-2-fast-t2v",
        "duration": "4s",
        "resolution": "480p",
        "aspect_ratio": "16:9",
        "audio": False,
    }
    wan = validate(catalog, {"model": WAN, "prompt": "p", "image_url": "https://x.example/a.png"})
    assert wan.queue_params() == {
        **wan.provider_params(),
        "prompt": "p",
        "image_url": "https://x.example/a.png",
    }


def test_fingerprint_is_stable_and_normalised(catalog: Catalog) -> None:
    body = base(metadata={"b": "2", "a": "1"}, webhook_url="https://example.com/h")
    first = validate(catalog, body).fingerprint()
    assert len(first) == 64 and int(first, 16) >= 0
    assert validate(catalog, dict(reversed(body.items()))).fingerprint() == first
    assert (
        validate(
            catalog, base(metadata={"a": "1", "b": "2"}, webhook_url="https://example.com/h")
        ).fingerprint()
        == first
    )
    # Spelling out the defaults, or the alias, is the same request.
    assert (
        validate(
            catalog, base(duration_seconds=5, resolution="720p", aspect_ratio="16:9", audio=False)
        ).fingerprint()
        == validate(catalog, base()).fingerprint()
    )
    assert (
        validate(catalog, {"model": "venice-video-gen", "prompt": "p"}).fingerprint()
        == validate(catalog, {"model": SEEDANCE, "prompt": "p"}).fingerprint()
    )


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a dog"},
        {"prompt": "a cat "},
        {"duration_seconds": 10},
        {"resolution": "1080p"},
        {"aspect_ratio": "1:1"},
        {"model": "venice-pixverse-c1-t2v"},
        {"webhook_url": "https://example.com/h"},
        {"metadata": {"a": "1"}},
        {"metadata": {"a": 1}},
        {"metadata": {"a": True}},
    ],
)
def test_fingerprint_differs_for_different_requests(
    catalog: Catalog, change: dict[str, object]
) -> None:
    assert (
        validate(catalog, base(**change)).fingerprint() != validate(catalog, base()).fingerprint()
    )


def test_fingerprint_distinguishes_audio_and_image(catalog: Catalog) -> None:
    silent = validate(catalog, {"model": SEEDANCE, "prompt": "p"})
    loud = validate(catalog, {"model": SEEDANCE, "prompt": "p", "audio": True})
    assert silent.fingerprint() != loud.fingerprint()
    one = validate(catalog, {"model": WAN, "prompt": "p", "image_url": "https://x.example/1.png"})
    two = validate(catalog, {"model": WAN, "prompt": "p", "image_url": "https://x.example/2.png"})
    assert one.fingerprint() != two.fingerprint()
