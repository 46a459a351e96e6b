"""Shapes every module shares: the error document of SPEC 4, money strings, base classes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# SPEC 1: amounts are integer microdollars, written in JSON as decimal strings.
Micros = Annotated[
    str,
    Field(
        pattern=r"^(0|[1-9][0-9]*)$",
        description="An amount in USDC microdollars (1 USD = 1,000,000), as a decimal string",
        examples=["102000"],
    ),
]
# Ledger balances are signed: a credit-normal account reads negative on the debit side.
SignedMicros = Annotated[
    str,
    Field(pattern=r"^(0|-?[1-9][0-9]*)$", description="A signed amount in USDC microdollars"),
]
Percent = Annotated[
    str,
    Field(
        pattern=r"^-?[0-9]+(\.[0-9]+)?$",
        description="An estimated discount against the list price, in percent",
        examples=["20"],
    ),
]
Uuid = Annotated[str, Field(json_schema_extra={"format": "uuid"})]
Day = Annotated[
    str,
    Field(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", description="A UTC day", examples=["2026-01-31"]
    ),
]


class RequestBody(BaseModel):
    """A JSON request body: unknown fields and loose types are refused (SPEC 4.1)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Document(BaseModel):
    """A JSON response: every field it may carry is declared."""

    model_config = ConfigDict(extra="forbid")


class Query(BaseModel):
    """A query string: parameters arrive as text; unknown ones are refused."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(Document):
    message: str = Field(description="What went wrong, for people")
    type: str = Field(
        description="The class of error",
        examples=["invalid_request_error"],
    )
    code: str = Field(description="The machine-readable reason (SPEC 4.5)", examples=["not_found"])
    param: str | None = Field(description="The request field or header at fault, if any")


class ErrorBody(Document):
    """Every error, whatever the status (SPEC 4)."""

    model_config = ConfigDict(title="Error")

    error: ErrorDetail


class Deleted(Document):
    id: str
    object: str
    deleted: Literal[True]
