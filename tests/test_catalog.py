"""The catalog (domain) and the submit's validation at the API edge (SPEC 4.1): defaults, every
error code and param, fingerprints. The Venice /models parser is tests/test_venice_models.py."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.venice import parse_venice_models
from api.validation import RequestError, validate_video_request
from domain.catalog import ALIASES, Catalog, VideoRequest
from services.routing import request_data, video_params
from tests.test_venice_models import (
    BARE,
    EXTRA_MODELS,
    LOUD,
    SIMULATOR_MODELS,
    TERSE,
    VERBOSE,
    constraints_of,
    venice_model,
)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog(parse_venice_models("venice", SIMULATOR_MODELS + EXTRA_MODELS))


def validate(catalog: Catalog, body: object, **flags: bool) -> VideoRequest:
    options = {"allow_http_webhooks": False, "allow_private_webhooks": False, **flags}
    return validate_video_request(body, catalog, **options)


def provider_params(request: VideoRequest) -> dict[str, Any]:
    """What the provider's ``/video/quote`` gets for the request (the adapter's wire body)."""
    return video_params(request_data(request)).body()


def queue_params(request: VideoRequest) -> dict[str, Any]:
    return video_params(request_data(request)).queue_body(request.prompt, request.image_url)


# parse_venice_models never raises, whatever the provider sends

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)
plausible_labels = st.sampled_from(["480p", "720p", "1080p", "4k", "hd", "16:9", "9:16", "1:1"])
plausible_durations = st.sampled_from(["5s", "10s", "4s", "8s", "auto", "-1", "1 gen", "5"])
# Values Venice could plausibly send for each constraint (the rest of the time: arbitrary JSON).
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model_type": st.sampled_from(["text-to-video", "image-to-video", "video"]),
    "durations": st.lists(plausible_durations, max_size=4),
    "resolutions": st.lists(plausible_labels, max_size=4)
    | plausible_labels
    | st.sampled_from([[], [""]]),
    "aspect_ratios": st.lists(plausible_labels, max_size=4)
    | plausible_labels
    | st.sampled_from([[], [""]]),
    "audio": st.booleans(),
    "audio_configurable": st.booleans(),
    "prompt_character_limit": st.integers(-5, 30000) | st.floats(-5, 1e300),
    "image_input": st.booleans(),
    "default_resolution": plausible_labels,
}


@st.composite
def near_venice_entries(draw: st.DrawFn) -> object:
    """A Venice entry with a few of its keys dropped, changed, or replaced by arbitrary JSON."""
    item = venice_model(
        draw(st.sampled_from(["m", "seedance-2-fast-t2v", "a.b_c-1", "x y"])),
        model_type=draw(st.sampled_from(["text-to-video", "image-to-video"])),
        audio=draw(st.booleans()),
        audio_configurable=draw(st.booleans()),
    )
    constraints = constraints_of(item)
    for key in draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), unique=True, max_size=4)):
        action = draw(st.sampled_from(["plausible"] * 3 + ["drop", "json"]))
        if action == "drop":
            constraints.pop(key, None)
        else:
            constraints[key] = draw(PLAUSIBLE[key] if action == "plausible" else json_values)
    if draw(st.integers(0, 3)) == 0:
        item["model_spec"]["offline"] = draw(st.booleans() | json_values)
    if draw(st.integers(0, 3)) == 0:
        item["model_spec"]["name"] = draw(json_values)
    if draw(st.integers(0, 5)) == 0:
        item[draw(st.sampled_from(["id", "type", "model_spec"]))] = draw(json_values)
    return item


@settings(max_examples=300, deadline=None)
@given(payload=st.lists(near_venice_entries() | json_values, max_size=6) | json_values)
def test_parse_never_raises_and_every_model_it_keeps_can_be_ordered(payload: Any) -> None:
    models = parse_venice_models("venice", payload)
    assert len({m.id for m in models}) == len(models)
    for model in models:
        assert model.id == f"venice-{model.provider_model}"
        assert model.durations and list(model.durations) == sorted(set(model.durations))
        assert all(isinstance(d, int) and 0 < d < 10_000 for d in model.durations)
        assert all(isinstance(label, str) and label for label in model.resolutions)
        assert all(isinstance(label, str) and label for label in model.aspect_ratios)
        assert model.default_resolution in (model.resolutions or (None,))
        assert model.default_aspect_ratio in (model.aspect_ratios or (None,))
        assert model.audio_configurable or model.audio
        assert 1 <= model.prompt_limit <= 2000
    catalog = Catalog(models)
    for model in models:
        body: dict[str, Any] = {"model": model.id, "prompt": "p"}
        if model.image_input:
            body["image_url"] = "https://img.example.com/a.png"
        request = validate(catalog, body)
        params = provider_params(request)
        assert ("resolution" in params) == bool(model.resolutions)
        assert ("aspect_ratio" in params) == bool(model.aspect_ratios)
        assert ("audio" in params) == model.audio


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
    assert request.max_cost is None


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
        "max_cost_usdc": "250000",
    }
    request = validate(catalog, body)
    assert request.duration_seconds == 12
    assert (request.resolution, request.aspect_ratio, request.audio) == ("1080p", "9:16", True)
    assert request.webhook_url == "https://hooks.example.com/mm?x=1"
    assert request.metadata == body["metadata"]
    assert request.metadata is not body["metadata"]
    assert request.max_cost == 250_000


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
        "max_cost_usdc": None,
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
    # The simulator lists its silent models with audio_configurable false.
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


def test_a_model_without_resolutions_or_aspect_ratios(catalog: Catalog) -> None:
    request = validate(catalog, {"model": BARE, "prompt": "p"})
    assert (request.resolution, request.aspect_ratio) == (None, None)
    nulls = {"model": BARE, "prompt": "p", "resolution": None, "aspect_ratio": None}
    assert validate(catalog, nulls) == request
    assert provider_params(request) == {"model": "bare-t2v", "duration": "5s"}
    assert queue_params(request) == {"model": "bare-t2v", "duration": "5s", "prompt": "p"}
    for field, value in (("resolution", "720p"), ("aspect_ratio", "16:9")):
        with pytest.raises(RequestError) as excinfo:
            validate(catalog, {"model": BARE, "prompt": "p", field: value})
        assert (excinfo.value.code, excinfo.value.param) == ("unsupported_parameter", field)
        assert excinfo.value.message == f"model {BARE} does not take {field}"


def test_a_model_that_always_generates_audio(catalog: Catalog) -> None:
    request = validate(catalog, {"model": LOUD, "prompt": "p"})
    assert request.audio is True
    explicit = validate(catalog, {"model": LOUD, "prompt": "p", "audio": True})
    assert explicit == request and explicit.fingerprint() == request.fingerprint()
    assert provider_params(request) == {
        "model": "loud-t2v",
        "duration": "5s",
        "resolution": "720p",
        "aspect_ratio": "16:9",
        "audio": True,
    }
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, {"model": LOUD, "prompt": "p", "audio": False})
    assert (excinfo.value.code, excinfo.value.param) == ("unsupported_parameter", "audio")
    assert excinfo.value.message == f"model {LOUD} always generates audio"


@pytest.mark.parametrize(
    ("model", "limit"),
    [(RUNWAY, 2000), (TERSE, 1000), (VERBOSE, 2000), (SEEDANCE, 2000)],
)
def test_each_model_has_its_prompt_limit(catalog: Catalog, model: str, limit: int) -> None:
    assert validate(catalog, {"model": model, "prompt": "é" * limit}).prompt == "é" * limit
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, {"model": model, "prompt": "é" * (limit + 1)})
    assert (excinfo.value.code, excinfo.value.param) == ("prompt_too_long", "prompt")
    assert excinfo.value.message == f"prompt must be at most {limit} characters"


@pytest.mark.parametrize("text", ["0", "1", "250000", "1000000000000000"])
def test_max_cost_usdc_accepted(catalog: Catalog, text: str) -> None:
    request = validate(catalog, base(max_cost_usdc=text))
    assert request.max_cost == int(text)
    assert request.canonical()["max_cost_usdc"] == text


# validation: every error code and param


def base(**fields: object) -> dict[str, object]:
    return {"model": RUNWAY, "prompt": "a cat", **fields}


INVALID = "invalid_request"
UNSUPPORTED = "unsupported_parameter"

BAD_CEILINGS = [
    "",
    "01",
    "00",
    "-1",
    "-0",
    "1.5",
    "1.0",
    " 1",
    "1 ",
    "1\n",
    "1e6",
    "+1",
    "1_000",
    "0x10",
    "1000000000000001",
    "99999999999999999999",
    "\u0661\u0662\u0663",  # Arabic-Indic digits
    "\uff11\uff12\uff13",  # full-width digits
    "\u00b2",  # superscript two
]
WRONG_CEILING_TYPES: list[object] = [1, 0, 1.5, True, False, [], ["1"], {"usdc": "1"}]

ERROR_CASES: list[tuple[str, object, str, str | None]] = [
    # body shape
    ("list body", [], INVALID, None),
    ("string body", "model", INVALID, None),
    ("null body", None, INVALID, None),
    ("unknown field", base(seed=1), INVALID, "seed"),
    ("unknown field n", base(n=2), INVALID, "n"),
    ("unknown field max_cost", base(max_cost="1"), INVALID, "max_cost"),
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
    (
        "prompt over a 1000-character model limit",
        base(model=TERSE, prompt="x" * 1001),
        "prompt_too_long",
        "prompt",
    ),
    (
        "prompt over 2000 on a 20000-character model",
        base(model=VERBOSE, prompt="x" * 2001),
        "prompt_too_long",
        "prompt",
    ),
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
    (
        "resolution on a model without resolutions",
        base(model=BARE, resolution="720p"),
        UNSUPPORTED,
        "resolution",
    ),
    (
        "aspect ratio on a model without aspect ratios",
        base(model=BARE, aspect_ratio="16:9"),
        UNSUPPORTED,
        "aspect_ratio",
    ),
    # audio
    ("audio not a boolean", base(model=SEEDANCE, audio="true"), INVALID, "audio"),
    ("audio as 1", base(model=SEEDANCE, audio=1), INVALID, "audio"),
    ("audio on a silent model", base(audio=True), UNSUPPORTED, "audio"),
    ("audio off on an always-audio model", base(model=LOUD, audio=False), UNSUPPORTED, "audio"),
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
    # max_cost_usdc
    *[
        (f"max_cost_usdc {text!r}", base(max_cost_usdc=text), INVALID, "max_cost_usdc")
        for text in BAD_CEILINGS
    ],
    *[
        (f"max_cost_usdc as {value!r}", base(max_cost_usdc=value), INVALID, "max_cost_usdc")
        for value in WRONG_CEILING_TYPES
    ],
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
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, base(model=TERSE, prompt="é" * 1001))
    assert excinfo.value.message == "prompt must be at most 1000 characters"


@pytest.mark.parametrize("value", WRONG_CEILING_TYPES)
def test_max_cost_usdc_of_the_wrong_type_message(catalog: Catalog, value: object) -> None:
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, base(max_cost_usdc=value))
    assert excinfo.value.message == "max_cost_usdc must be a decimal string of microdollars"


def test_max_cost_usdc_out_of_form_message(catalog: Catalog) -> None:
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, base(max_cost_usdc="1.5"))
    assert "max_cost_usdc" in excinfo.value.message
    assert "1000000000000000" in excinfo.value.message


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="0123456789 +-._e\u0661", max_size=18)
    | st.integers(0, 2 * 10**15).map(str)
    | st.text(max_size=6)
)
def test_max_cost_usdc_is_accepted_exactly_in_canonical_form(text: str) -> None:
    catalog = Catalog(parse_venice_models("venice", SIMULATOR_MODELS))
    canonical = text.isascii() and text.isdigit() and str(int(text)) == text
    if canonical and int(text) <= 10**15:
        assert validate(catalog, base(max_cost_usdc=text)).max_cost == int(text)
    else:
        with pytest.raises(RequestError) as excinfo:
            validate(catalog, base(max_cost_usdc=text))
        assert (excinfo.value.code, excinfo.value.param) == (INVALID, "max_cost_usdc")


def test_a_ceiling_of_thousands_of_digits_is_an_invalid_request(catalog: Catalog) -> None:
    with pytest.raises(RequestError) as excinfo:
        validate(catalog, base(max_cost_usdc="9" * 4301))
    assert (excinfo.value.code, excinfo.value.param) == (INVALID, "max_cost_usdc")


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
    assert validate(catalog, base(max_cost_usdc=str(10**15))).max_cost == 10**15


# provider parameters and fingerprints


def test_provider_params(catalog: Catalog) -> None:
    runway = validate(catalog, base(duration_seconds=10, resolution="1080p"))
    assert provider_params(runway) == {
        "model": "runway-gen4-5-text",
        "duration": "10s",
        "resolution": "1080p",
        "aspect_ratio": "16:9",
    }
    seedance = validate(catalog, {"model": "venice-video-gen", "prompt": "p"})
    assert provider_params(seedance) == {
        "model": "seedance-2-fast-t2v",
        "duration": "4s",
        "resolution": "480p",
        "aspect_ratio": "16:9",
        "audio": False,
    }
    loud_seedance = validate(catalog, {"model": SEEDANCE, "prompt": "p", "audio": True})
    assert provider_params(loud_seedance)["audio"] is True
    wan = validate(catalog, {"model": WAN, "prompt": "p", "image_url": "https://x.example/a.png"})
    assert queue_params(wan) == {
        **provider_params(wan),
        "prompt": "p",
        "image_url": "https://x.example/a.png",
    }
    # The buyer's ceiling is the market's business, never the provider's.
    capped = validate(catalog, base(max_cost_usdc="250000"))
    assert queue_params(capped) == queue_params(validate(catalog, base()))


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
        {"max_cost_usdc": "250000"},
        {"max_cost_usdc": "0"},
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


def test_fingerprint_distinguishes_ceilings(catalog: Catalog) -> None:
    absent = validate(catalog, base())
    capped = validate(catalog, base(max_cost_usdc="250000"))
    assert "max_cost_usdc" not in absent.canonical()
    assert capped.canonical() == {**absent.canonical(), "max_cost_usdc": "250000"}
    assert capped.fingerprint() != absent.fingerprint()
    assert capped.fingerprint() == validate(catalog, base(max_cost_usdc="250000")).fingerprint()
    assert capped.fingerprint() != validate(catalog, base(max_cost_usdc="250001")).fingerprint()
    assert validate(catalog, base(max_cost_usdc=None)).fingerprint() == absent.fingerprint()


# Fingerprints computed by the code before max_cost_usdc existed: stored idempotency records
# must still match a retry of the same request.
OLD_FINGERPRINTS = [
    (
        {"model": RUNWAY, "prompt": "a cat"},
        "e8a84c5fdbe77709711db163457f2e32ad2226ebfb40e6c44514d5f453b507b3",
    ),
    (
        {
            "model": "venice-video-gen",
            "prompt": "a cat",
            "metadata": {"order": "42"},
            "webhook_url": "https://example.com/h",
        },
        "6a698d094ba467b7994417ca71581658ab46494e210af63d9c87c031b3d14c1e",
    ),
    (
        {
            "model": WAN,
            "prompt": "é",
            "image_url": "https://x.example/a.png",
            "duration_seconds": 10,
        },
        "b601b8f2dfd7a8ac1a82e1d614ef6ba3aac800e301214087ad89e6c1797a03a4",
    ),
]


@pytest.mark.parametrize(("body", "fingerprint"), OLD_FINGERPRINTS)
def test_fingerprint_without_a_ceiling_is_unchanged(
    catalog: Catalog, body: dict[str, object], fingerprint: str
) -> None:
    request = validate(catalog, body)
    assert request.fingerprint() == fingerprint
    old_canonical = {
        "model": request.model.id,
        "prompt": request.prompt,
        "duration_seconds": request.duration_seconds,
        "resolution": request.resolution,
        "aspect_ratio": request.aspect_ratio,
        "audio": request.audio,
        "image_url": request.image_url,
        "webhook_url": request.webhook_url,
        "metadata": request.metadata,
    }
    text = json.dumps(old_canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(text.encode()).hexdigest() == fingerprint
    assert validate(catalog, {**body, "max_cost_usdc": "250000"}).fingerprint() != fingerprint
