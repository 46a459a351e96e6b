"""Schemathesis against a live ``mediamarket serve``, from the server's own ``/openapi.json``.

Every operation, positive and negative data, every check schemathesis has (server errors,
status codes, content types, response schemas and headers, positive data accepted, negative
data rejected, auth enforced, unsupported methods, ...). Bounded and deterministic: a fixed seed,
at most ``MAX_EXAMPLES`` generated cases per operation and phase.

The server runs without a worker, so the jobs that positive cases submit stay queued instead of
rendering videos: what is under test here is the HTTP contract, not the job lifecycle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import Status, events, from_schema

from tests.harness import ADMIN_TOKEN, Server, base_env, free_port
from tests.test_api_contract import RUNWAY, SEEDANCE, WAN

MAX_EXAMPLES = 40
SEED = 20261124
# Rules the schema cannot state, so a request valid by the schema may still be refused:
# the model's own durations and inputs (known from the provider's catalog), the balance, the
# provider's answer to a seller's key, the hosts the operator allows for base_url.
BUSINESS_REFUSALS = {
    "submit_video": ["400", "402", "422", "503"],
    "submit_video_with_minimum_discount": ["400", "402", "422", "503"],
    "create_offer": ["400", "503"],
    "update_offer": ["400", "503"],
    "add_buyer_provider": ["400", "503"],
    # An export range may be empty or reversed (from after to).
    "export_journal": ["400"],
    "export_settlements": ["400"],
    "export_usage": ["400"],
    "get_earnings": ["400"],
    # A deposit_id already used for another amount.
    "create_deposit": ["422"],
    # The cursor must name one of the caller's jobs.
    "list_jobs": ["400"],
    "list_jobs_with_minimum_discount": ["400"],
}
# DELETE on a job cancels it (SPEC 4.3): the job stays readable, in its final state.
CANCELS = ["cancel_job", "cancel_job_with_minimum_discount"]
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    port = free_port()
    server = Server(tmp, base_env(f"sqlite:///{tmp}/data", port), port, ["--no-worker"])
    server.start()
    try:
        yield server
    finally:
        server.kill()


def config_for(buyer_key: str, seller_key: str) -> Any:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # A job's event stream ends only when the job does, and these jobs stay queued:
            # its first event is all there is to check.
            "max-stream-events": 1,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True},
            "auth": {
                "openapi": {
                    "buyerKey": {"bearer": buyer_key},
                    "sellerKey": {"bearer": seller_key},
                    "adminToken": {"bearer": ADMIN_TOKEN},
                }
            },
            "operations": [
                {
                    "include-operation-id": name,
                    "checks": {"positive_data_acceptance": {"expected-statuses": ACCEPTED + extra}},
                }
                for name, extra in BUSINESS_REFUSALS.items()
            ]
            + [
                {"include-operation-id": name, "checks": {"use_after_free": {"enabled": False}}}
                for name in CANCELS
            ],
        }
    )


def test_the_api_keeps_its_contract(live: Server) -> None:
    c = live.client
    _, buyer_key = c.create_buyer(deposit_usdc=10**15)
    _, seller_key = c.create_seller()
    for model in (RUNWAY, SEEDANCE, WAN):
        c.create_offer(seller_key, model)
    schema = schemathesis.openapi.from_url(
        f"{c.base}/openapi.json", config=config_for(buyer_key, seller_key)
    )

    cases: Counter[str] = Counter()
    failures: list[str] = []
    errors: list[str] = []
    finished: Any = None
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases[event.label or "?"] += len(event.recorder.cases)
            for checks in event.recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        failures.append(
                            f"{event.label} [{check.name}] {failure.title}: {failure.message}\n"
                            f"    {check.failure_info.code_sample}"
                        )
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(f"{getattr(event, 'label', '')}: {event.info.format()}")
        elif isinstance(event, events.EngineFinished):
            finished = event
    total = sum(cases.values())
    print(
        f"\nschemathesis {schemathesis.__version__}: {total} cases over {len(cases)} operations "
        f"(at most {max(cases.values())} for one) in {finished.running_time:.1f} s "
        f"(at most {MAX_EXAMPLES} generated per operation and phase, seed {SEED})"
    )
    unique = list(dict.fromkeys(failures))
    assert not unique and not errors, "\n".join(unique[:30] + errors[:10])
    document = c.get("/openapi.json").json()
    operations = {f"{m.upper()} {p}" for p, ops in document["paths"].items() for m in ops}
    # Schemathesis leaves out the document it reads its schema from.
    assert operations - {"GET /openapi.json"} <= set(cases), operations - set(cases)
    assert '"status": 500' not in live.logs(), "a request was answered 500: see the server log"
