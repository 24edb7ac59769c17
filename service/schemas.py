"""Pydantic models that *document* the protocol in OpenAPI.

They are not used to parse infer requests (the hot path decodes with ``json`` and
``numpy``, see :mod:`service.protocol`); they describe the bodies for ``/docs``
and for schema-driven clients.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class TensorParameters(BaseModel):
    binary_data_size: int | None = Field(
        None, description="bytes of this tensor after the JSON header (binary extension)"
    )


class InferInputTensor(BaseModel):
    name: Literal["state", "forcings"] = Field(description="'state' (and 'forcings' if any)")
    shape: list[int] = Field(description="[batch, ...grid] as in the model metadata")
    datatype: Literal["FP32", "FP64"]
    parameters: TensorParameters | None = None
    data: list[Any] | None = Field(None, description="row-major values (JSON transport)")


class OutputParameters(BaseModel):
    binary_data: bool = Field(False, description="return this output as raw bytes")


class InferRequestedOutput(BaseModel):
    name: Literal["correction"]
    parameters: OutputParameters | None = None


class InferParameters(BaseModel):
    dt: float | None = Field(
        None, gt=0, description="host time step, in dt_unit (needs one for per-hour models)"
    )
    dt_unit: str | None = Field(
        None,
        description="s, min, h, day or 'model time unit': the correction comes back per it",
    )
    binary_data_output: bool | None = Field(None, description="all outputs as raw bytes")
    degraded_steps: int | None = Field(
        None,
        ge=0,
        le=1000,
        description="steps the client ran uncorrected since its last call (at most 1000)",
    )


class InferRequestDoc(BaseModel):
    id: str | None = Field(None, description="echoed in the response")
    parameters: InferParameters | None = None
    inputs: list[InferInputTensor]
    outputs: list[InferRequestedOutput] | None = None


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferResponseDoc(BaseModel):
    model_name: str
    model_version: str = Field(description="the version that produced this answer")
    id: str | None = None
    parameters: dict[str, Any] = Field(
        description="batch_size, out_of_distribution (bool), out_of_distribution_samples "
        "(comma-separated sample indices), capped_values, dt"
    )
    outputs: list[OutputTensor]


class ErrorBody(BaseModel):
    error: str


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    version: str
    parameters: dict[str, Any]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE"]
    reason: str
    stage: str = "production"


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in [
        (400, "bad request: the message says which field"),
        (401, "missing or invalid API key"),
        (403, "the key lacks the needed scope"),
        (404, "unknown model or version"),
        (413, "body larger than max_body_bytes"),
        (503, "model unavailable or server busy"),
    ]
}
