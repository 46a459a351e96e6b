"""Venice's ``GET /models?type=video`` read by the Venice adapter (SPEC 5.1): which entries
the market can sell, and the ModelSpec each becomes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.simulator import CREATED, models_payload
from adapters.venice import parse_venice_models
from domain.catalog import ModelSpec


def venice_model(
    model_id: str,
    *,
    name: str | None = None,
    model_type: str = "text-to-video",
    durations: Any = None,
    resolutions: Any = None,
    aspect_ratios: Any = None,
    audio: Any = False,
    audio_configurable: Any = True,
    prompt_character_limit: Any = None,
    offline: Any = None,
) -> dict[str, Any]:
    """One ``ModelResponse`` of Venice's ``GET /models?type=video`` ("Video Model Constraints").

    ``prompt_character_limit`` and ``model_spec.offline`` are left out unless given; to drop any
    other key, delete it from ``constraints_of(item)``.
    """
    constraints: dict[str, Any] = {
        "model_type": model_type,
        "durations": ["5s", "10s"] if durations is None else durations,
        "resolutions": ["720p", "1080p"] if resolutions is None else resolutions,
        "aspect_ratios": ["16:9", "9:16", "1:1"] if aspect_ratios is None else aspect_ratios,
        "audio": audio,
        "audio_configurable": audio_configurable,
    }
    if prompt_character_limit is not None:
        constraints["prompt_character_limit"] = prompt_character_limit
    spec: dict[str, Any] = {
        "name": model_id.title() if name is None else name,
        "privacy": "anonymized",
        "traits": [],
        "constraints": constraints,
    }
    if offline is not None:
        spec["offline"] = offline
    return {
        "id": model_id,
        "object": "model",
        "type": "video",
        "owned_by": "venice.ai",
        "created": CREATED,
        "model_spec": spec,
    }


def constraints_of(item: dict[str, Any]) -> dict[str, Any]:
    constraints: dict[str, Any] = item["model_spec"]["constraints"]
    return constraints


# The simulator's catalog (SPEC 5.2), exactly as its /models?type=video lists it.
SIMULATOR_MODELS: list[dict[str, Any]] = models_payload()["data"]

# Models Venice may list that the simulator doesn't: one that takes neither a resolution nor an
# aspect ratio, one that always generates audio, and two that state their own prompt limits.
BARE = "venice-bare-t2v"
LOUD = "venice-loud-t2v"
TERSE = "venice-terse-t2v"
VERBOSE = "venice-verbose-t2v"
EXTRA_MODELS = [
    venice_model("bare-t2v", resolutions=[], aspect_ratios=[]),
    venice_model("loud-t2v", audio=True, audio_configurable=False),
    venice_model("terse-t2v", prompt_character_limit=1000),
    venice_model("verbose-t2v", prompt_character_limit=20000),
]


def parse_one(item: object) -> ModelSpec | None:
    models = parse_venice_models("venice", [item])  # type: ignore[list-item]
    assert len(models) <= 1
    return models[0] if models else None


def test_the_helper_speaks_the_simulators_shape() -> None:
    [runway] = [m for m in SIMULATOR_MODELS if m["id"] == "runway-gen4-5-text"]
    assert runway == venice_model(
        "runway-gen4-5-text",
        name="Runway Gen-4.5",
        audio=False,
        audio_configurable=False,
        prompt_character_limit=2500,
    )


# parsing the provider's /models


def test_parse_the_documented_example() -> None:
    item = {
        "id": "runway-gen4-5-text",
        "object": "model",
        "type": "video",
        "owned_by": "venice.ai",
        "created": 1_760_000_000,
        "model_spec": {
            "name": "Runway Gen-4.5",
            "privacy": "anonymized",
            "traits": [],
            "constraints": {
                "model_type": "text-to-video",
                "durations": ["5s", "10s"],
                "resolutions": ["720p", "1080p"],
                "aspect_ratios": ["16:9", "9:16", "1:1"],
                "audio": False,
                "audio_configurable": False,
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
            audio_configurable=True,
            prompt_character_limit=2500,
        )
    ]


def test_parse_the_simulator_catalog() -> None:
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
    assert (seedance.audio, seedance.audio_configurable, seedance.default_audio) == (
        True,
        True,
        False,
    )
    assert {m.id: m.image_input for m in models.values()} == {
        "venice-pixverse-c1-t2v": False,
        "venice-runway-gen4-5-text": False,
        "venice-seedance-2-fast-t2v": False,
        "venice-wan-2-5-i2v": True,
    }
    assert {m.id: m.default_resolution for m in models.values()} == {
        "venice-pixverse-c1-t2v": "720p",
        "venice-runway-gen4-5-text": "720p",
        "venice-seedance-2-fast-t2v": "480p",
        "venice-wan-2-5-i2v": "480p",
    }
    for model in models.values():
        assert model.default_aspect_ratio == "16:9"
        assert (model.prompt_character_limit, model.prompt_limit) == (2500, 2000)
        assert model.default_audio is False


def test_parse_sorts_and_dedupes_durations_and_labels() -> None:
    item = venice_model(
        "m", durations=["12s", "4s", "8s", "6s", "4s"], resolutions=["720p", "480p", "720p"]
    )
    model = parse_one(item)
    assert model is not None
    assert model.durations == (4, 6, 8, 12)
    assert model.resolutions == ("720p", "480p")


def test_parse_derives_image_input_from_model_type() -> None:
    i2v = parse_one(venice_model("x-i2v", model_type="image-to-video"))
    t2v = parse_one(venice_model("x-t2v", model_type="text-to-video"))
    assert i2v is not None and i2v.image_input is True
    assert t2v is not None and t2v.image_input is False


def test_parse_ignores_keys_venice_does_not_send() -> None:
    # Venice names no defaults and no image_input for video; stale keys change nothing.
    t2v = venice_model("t2v", resolutions=["720p", "1080p"], aspect_ratios=["9:16", "16:9"])
    constraints_of(t2v).update(
        default_resolution="1080p", default_aspect_ratio="9:16", image_input=True
    )
    i2v = venice_model("i2v", model_type="image-to-video")
    constraints_of(i2v)["image_input"] = False
    models = {m.provider_model: m for m in parse_venice_models("venice", [t2v, i2v])}
    assert (models["t2v"].default_resolution, models["t2v"].default_aspect_ratio) == (
        "720p",
        "16:9",
    )
    assert models["t2v"].image_input is False
    assert models["i2v"].image_input is True


@pytest.mark.parametrize(
    ("resolutions", "aspect_ratios", "default_resolution", "default_aspect_ratio"),
    [
        (["1080p", "4k", "480p"], ["9:16", "16:9"], "480p", "16:9"),
        (["4k", "1080p"], ["9:16", "1:1"], "1080p", "9:16"),
        (["hd", "720p"], ["1:1"], "720p", "1:1"),
        (["hd"], ["21:9", "4:3"], "hd", "21:9"),
    ],
)
def test_parse_defaults_to_the_lowest_resolution_and_16_9(
    resolutions: list[str],
    aspect_ratios: list[str],
    default_resolution: str,
    default_aspect_ratio: str,
) -> None:
    model = parse_one(venice_model("m", resolutions=resolutions, aspect_ratios=aspect_ratios))
    assert model is not None
    assert (model.default_resolution, model.default_aspect_ratio) == (
        default_resolution,
        default_aspect_ratio,
    )


def test_parse_empty_resolutions_and_aspect_ratios_mean_no_such_parameter() -> None:
    model = parse_one(venice_model("m", resolutions=[], aspect_ratios=[]))
    assert model is not None
    assert (model.resolutions, model.aspect_ratios) == ((), ())
    assert (model.default_resolution, model.default_aspect_ratio) == (None, None)
    only_ratios = parse_one(venice_model("m", resolutions=[]))
    assert only_ratios is not None
    assert (only_ratios.default_resolution, only_ratios.default_aspect_ratio) == (None, "16:9")
    only_resolutions = parse_one(venice_model("m", aspect_ratios=[]))
    assert only_resolutions is not None
    assert (only_resolutions.default_resolution, only_resolutions.default_aspect_ratio) == (
        "720p",
        None,
    )


def test_parse_reads_a_lone_string_as_a_one_item_list() -> None:
    model = parse_one(venice_model("m", resolutions="1080p", aspect_ratios="9:16"))
    assert model is not None
    assert (model.resolutions, model.aspect_ratios) == (("1080p",), ("9:16",))
    assert (model.default_resolution, model.default_aspect_ratio) == ("1080p", "9:16")


def test_parse_ignores_durations_that_are_no_fixed_length() -> None:
    durations = ["auto", "5s", "-1", "1 gen", "5", 10, True, None, "10s", "0s", "5.5s", "10000s"]
    model = parse_one(venice_model("m", durations=durations))
    assert model is not None
    assert model.durations == (5, 10)


@pytest.mark.parametrize(
    "durations",
    [
        [],
        ["auto"],
        ["-1"],
        ["auto", "-1"],
        ["1 gen"],
        ["5", "10"],
        [5, 10],
        [True],
        ["0s"],
        ["five"],
        ["5.5s"],
        ["5S"],
        "5s",
        {"5s": True},
    ],
)
def test_parse_skips_a_model_without_a_fixed_duration(durations: object) -> None:
    assert parse_one(venice_model("m", durations=durations)) is None


def test_parse_audio_and_audio_configurable() -> None:
    cases = {
        "loud": venice_model("loud", audio=True, audio_configurable=False),
        "optional": venice_model("optional", audio=True, audio_configurable=True),
        # A model without audio has nothing to switch off, whatever it says.
        "silent": venice_model("silent", audio=False, audio_configurable=False),
        "quiet": venice_model("quiet", audio=False, audio_configurable=True),
    }
    models = {m.provider_model: m for m in parse_venice_models("venice", list(cases.values()))}
    assert {k: (m.audio, m.audio_configurable, m.default_audio) for k, m in models.items()} == {
        "loud": (True, False, True),
        "optional": (True, True, False),
        "silent": (False, True, False),
        "quiet": (False, True, False),
    }


@pytest.mark.parametrize(
    ("declared", "stored", "limit"),
    [
        (None, 2500, 2000),
        (1000, 1000, 1000),
        (1, 1, 1),
        (1999, 1999, 1999),
        (2000, 2000, 2000),
        (20000, 20000, 2000),
        (1500.0, 1500, 1500),
        # Not a usable limit: Venice's default applies.
        (0, 2500, 2000),
        (-5, 2500, 2000),
        (0.5, 2500, 2000),
        (True, 2500, 2000),
        ("1000", 2500, 2000),
        ([1000], 2500, 2000),
    ],
)
def test_parse_prompt_character_limit(declared: object, stored: int, limit: int) -> None:
    model = parse_one(venice_model("m", prompt_character_limit=declared))
    assert model is not None
    assert (model.prompt_character_limit, model.prompt_limit) == (stored, limit)


def test_parse_a_null_prompt_character_limit_is_venices_default() -> None:
    item = venice_model("m")
    constraints_of(item)["prompt_character_limit"] = None
    model = parse_one(item)
    assert model is not None and model.prompt_character_limit == 2500


def without(item: dict[str, Any], *path: str) -> dict[str, Any]:
    """A deep copy of ``item`` with the key at ``path`` removed."""
    copy: dict[str, Any] = json.loads(json.dumps(item))
    node = copy
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return copy


def with_constraint(key: str, value: object) -> dict[str, Any]:
    item = venice_model("m")
    constraints_of(item)[key] = value
    return item


@pytest.mark.parametrize(
    "item",
    [
        "not an object",
        None,
        ["m"],
        {"id": "m", "type": "video"},
        {"id": 7, "type": "video", "model_spec": {"constraints": {}}},
        {"id": "", "type": "video", "model_spec": {"constraints": {}}},
        {**venice_model("m"), "id": 7},
        {**venice_model("m"), "id": ""},
        {**venice_model("m"), "id": "../etc"},
        {**venice_model("m"), "id": "-m"},
        {**venice_model("m"), "type": "image"},
        {**venice_model("m"), "type": None},
        without(venice_model("m"), "type"),
        without(venice_model("m"), "model_spec"),
        {**venice_model("m"), "model_spec": "x"},
        {**venice_model("m"), "model_spec": {"name": "M", "constraints": "x"}},
        without(venice_model("m"), "model_spec", "constraints"),
        # not sellable: video-to-video needs a source video; offline models take no jobs
        venice_model("m", model_type="video"),
        venice_model("m", model_type="text-to-image"),
        venice_model("m", offline=True),
        without(venice_model("m"), "model_spec", "constraints", "model_type"),
        # constraints the market can't do without
        without(venice_model("m"), "model_spec", "constraints", "durations"),
        without(venice_model("m"), "model_spec", "constraints", "resolutions"),
        without(venice_model("m"), "model_spec", "constraints", "aspect_ratios"),
        without(venice_model("m"), "model_spec", "constraints", "audio"),
        without(venice_model("m"), "model_spec", "constraints", "audio_configurable"),
        venice_model("m", durations=["auto", "-1"]),
        venice_model("m", resolutions=[720]),
        venice_model("m", resolutions=[""]),
        venice_model("m", resolutions=""),
        venice_model("m", resolutions=["720p", None]),
        venice_model("m", aspect_ratios=[16]),
        venice_model("m", aspect_ratios={"16:9": True}),
        with_constraint("resolutions", None),
        venice_model("m", audio="yes"),
        venice_model("m", audio=1),
        venice_model("m", audio_configurable="false"),
        venice_model("m", audio_configurable=0),
        venice_model("m", audio=True, audio_configurable=None),
        with_constraint("audio_configurable", None),
    ],
)
def test_parse_skips_unsellable_entries(item: object) -> None:
    good = venice_model("good")
    models = parse_venice_models("venice", [item, good])  # type: ignore[list-item]
    assert [m.id for m in models] == ["venice-good"]


@pytest.mark.parametrize("offline", [False, None, "true", 1])
def test_parse_only_a_true_offline_skips(offline: object) -> None:
    item = venice_model("m")
    if offline is not None:
        item["model_spec"]["offline"] = offline
    assert parse_one(item) is not None


def test_parse_keeps_the_first_duplicate() -> None:
    first = venice_model("dup", durations=["5s"])
    second = venice_model("dup", durations=["10s"])
    models = parse_venice_models("venice", [first, second])
    assert [(m.id, m.durations) for m in models] == [("venice-dup", (5,))]


def test_parse_a_skipped_duplicate_does_not_shadow_a_good_one() -> None:
    offline = venice_model("dup", offline=True)
    online = venice_model("dup", durations=["10s"])
    assert [(m.id, m.durations) for m in parse_venice_models("venice", [offline, online])] == [
        ("venice-dup", (10,))
    ]


def test_parse_of_a_non_list_is_empty() -> None:
    assert parse_venice_models("venice", {"data": []}) == []  # type: ignore[arg-type]
    assert parse_venice_models("venice", None) == []  # type: ignore[arg-type]


# JSON 1e400 reads as infinity, and json.loads accepts NaN and Infinity.
@pytest.mark.parametrize("literal", ["-1e400", "-Infinity", "1e400", "Infinity", "NaN"])
def test_parse_survives_a_non_finite_prompt_limit(literal: str) -> None:
    odd = venice_model("odd", prompt_character_limit=123456789)
    text = json.dumps([odd, venice_model("good")]).replace("123456789", literal)
    models = parse_venice_models("venice", json.loads(text))
    assert "venice-good" in [m.id for m in models]
    assert all(m.prompt_character_limit == 2500 for m in models)
