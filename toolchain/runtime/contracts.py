"""The typed contracts between the build host and the device: an artifact's manifest, a validation report and
its gates. One Report shape serves decoder, encoder, not-validated and auto reports. No torch.

The nested model card and recipe stay plain mappings here: they are validated by config/schema.py when a run
starts, and the runtime (a leaf) imports nothing above it.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Gate(_Strict):
    gate: str  # min_* gates pass at or above the limit, max_* at or below
    limit: float
    value: float
    passed: bool


class Manifest(_Strict):
    """manifest.json: what the artifact is, where it came from, and the sha256 of every file."""

    def out(self) -> dict:
        """The manifest as JSON-ready data (unset optional fields left out)."""
        return self.model_dump(exclude_none=True)

    format: int = 1
    created: str = ""
    model_card: dict[str, Any]
    recipe: dict[str, Any]
    target: dict[str, Any]
    versions: dict[str, str]
    inputs: dict[str, Any]  # hashes of the base weights and the data
    training: Optional[dict[str, Any]] = None  # method, precision, ranks, ZeRO stage (decoders)
    lineage: list[dict[str, Any]]
    reference: dict[str, Any]  # torch_base, torch_tuned, onnx_fp32 figures
    encoder: Optional[dict[str, Any]] = None  # task, labels, max_length (encoder artifacts only)
    overrides: Optional[list[str]] = None  # the command line's changes to the recipe file (--data, --set ...), KEY=VALUE
    # multi-adapter artifacts only (runtime/adapters.py): the shared base, and per adapter its recipe, rank, file,
    # sha256, the base weights it was trained on and its reference figures
    base: Optional[dict[str, Any]] = None
    adapters: Optional[dict[str, dict[str, Any]]] = None
    files: dict[str, str] = Field(default_factory=dict)  # relative path -> sha256


class Report(_Strict):
    """report.json, what `toolchain validate` returns and `toolchain edge` prints; auto adds its choice."""

    target: str
    # scored: `validate --data`, the user's own file measured with no gates, so neither passed nor missed
    status: Literal["passed", "gates_missed", "not_validated", "scored"]
    validated: bool
    passed: Optional[bool] = None  # absent when scored
    gates: list[Gate] = Field(default_factory=list)
    metric: Optional[str] = None
    artifact: Optional[str] = None
    kind: Optional[Literal["encoder"]] = None  # decoders leave it out, as the reports before this model did
    provider: Optional[str] = None
    ep: Optional[str] = None
    precision: Optional[str] = None
    reason: Optional[str] = None  # not_validated: why not
    data: Optional[str] = None  # what was scored: the shipped eval.jsonl or the user's file
    measured: dict[str, Any] = Field(default_factory=dict)
    reference: dict[str, Any] = Field(default_factory=dict)
    host: Optional[dict[str, Any]] = None
    session: Optional[dict[str, Any]] = None  # decoders: {setting: {"value", "from"}} the run used (runtime/session.py)
    seconds: Optional[float] = None
    figures: Optional[list[str]] = None  # encoders: the task figures reported
    decoding: Optional[str] = None  # with --lookup
    target_gates: Optional[dict[str, float]] = None
    note: Optional[str] = None
    gates_not_applicable: Optional[list[str]] = None
    headline: Optional[dict[str, Any]] = None  # added by `toolchain edge`
    build_stages: Optional[list[dict[str, Any]]] = None  # the manifest's lineage: each stage's wall s and peak RSS
    # multi-adapter artifacts: one report per adapter, the base alone on each recipe's split, switching times
    adapters: Optional[dict[str, dict[str, Any]]] = None
    base: Optional[dict[str, dict[str, Any]]] = None
    switch: Optional[dict[str, Any]] = None
    # auto only
    pick: Optional[str] = None
    qualified: Optional[list[str]] = None
    rejected: Optional[list[dict[str, Any]]] = None
    candidates: Optional[list[dict[str, Any]]] = None
    dropped: Optional[dict[str, str]] = None
    gates_spec: Optional[dict[str, Any]] = None

    def out(self, keep: tuple[str, ...] = ()) -> dict:
        """The report as JSON-ready data: optional fields left out when unset, except those in `keep`."""
        data = self.model_dump(exclude_none=True)
        return {**data, **{k: getattr(self, k) for k in keep if k not in data}}


class SessionOptions(_Strict):
    """device_profile.json's session_options: the only settings a profile may change, with sane values. The keys
    are onnxruntime-genai's (the second is an ONNX Runtime session config entry, a string)."""

    intra_op_num_threads: Optional[StrictInt] = Field(None, ge=1, le=1024)
    allow_spinning: Optional[Literal["0", "1"]] = Field(None, alias="session.intra_op.allow_spinning")

    def out(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class DeviceProfile(_Strict):
    """device_profile.json, written by `toolchain tune` into an artifact: the session settings that decoded fastest
    on that device, what was measured, and on which host. Not in the manifest's hashes (it is per device); read
    strictly instead."""

    session_options: SessionOptions
    measured: list[dict[str, Any]] = Field(default_factory=list)
    host: dict[str, Any] = Field(default_factory=dict)
    created: str = ""

    def out(self) -> dict:
        return {**self.model_dump(exclude={"session_options"}), "session_options": self.session_options.out()}
