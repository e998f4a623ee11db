"""The manifest: the YAML file that describes every artifact directory kiln writes.

Schema (version 1), the fields DESIGN.md lists:
    kind, schema_version, kiln_version, created, name,
    parent: {kind, source, digest}    where the artifact came from; digest is the parent manifest's
                                      digest, or a digest over the source files for non-kiln inputs
    spec: {...}                       the resolved options of the stage that wrote it
    model: {...}                      a summary of the model (architecture, sizes, dtype)
    files: [{path, sha256, bytes}]    every file of the artifact except the manifest itself
    extra: {...}                      stage-specific records (quality, calibration, fingerprint, ...)
"""

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from kiln.core.errors import ArtifactError
from kiln.core.hashing import sha256_bytes

MANIFEST_NAME = "manifest.yaml"
SCHEMA_VERSION = 1
ARTIFACT_KINDS = ("checkpoint", "engine", "bench-report")


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact, relative to its directory."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ParentRef:
    """What an artifact was made from."""

    kind: str  # "checkpoint", "engine", "hf-dir", "gguf", "builtin:<name>"
    source: str  # a path or builtin name, for people; the digest is what identifies it
    digest: str  # "sha256:<hex>"


@dataclass(frozen=True)
class Manifest:
    """The parsed content of manifest.yaml."""

    kind: str
    kiln_version: str
    created: str
    name: str
    parent: ParentRef | None
    spec: dict[str, Any]
    model: dict[str, Any]
    files: tuple[FileEntry, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_yaml(self) -> str:
        """Serialise with a stable key order, so equal manifests are equal bytes."""
        data = {
            "kind": self.kind,
            "schema_version": self.schema_version,
            "kiln_version": self.kiln_version,
            "created": self.created,
            "name": self.name,
            "parent": asdict(self.parent) if self.parent else None,
            "spec": self.spec,
            "model": self.model,
            "extra": self.extra,
            "files": [asdict(entry) for entry in self.files],
        }
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for --json output)."""
        return yaml.safe_load(self.to_yaml())

    def file(self, path: str) -> FileEntry | None:
        """The entry for a relative path, if the artifact lists it."""
        return next((entry for entry in self.files if entry.path == path), None)


def manifest_digest(text: str) -> str:
    """The identity of an artifact: the sha256 of its manifest's bytes."""
    return "sha256:" + sha256_bytes(text.encode("utf-8"))


def parse_manifest(text: str, where: str) -> Manifest:
    """Parse and validate manifest text; `where` names the file in error messages."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ArtifactError(f"{where} is not valid YAML ({exc}); the artifact is damaged, rebuild it") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{where} does not hold a manifest mapping; the artifact is damaged, rebuild it")
    _require(data, ("kind", "schema_version", "kiln_version", "created", "files"), where)
    if data["kind"] not in ARTIFACT_KINDS:
        raise ArtifactError(f"{where}: unknown artifact kind {data['kind']!r} (known: {', '.join(ARTIFACT_KINDS)})")
    version = data["schema_version"]
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{where}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{where} has schema version {version}, newer than this kiln understands ({SCHEMA_VERSION}); "
            "upgrade kiln to read it"
        )
    return Manifest(
        kind=data["kind"],
        schema_version=version,
        kiln_version=str(data["kiln_version"]),
        created=str(data["created"]),
        name=str(data.get("name") or ""),
        parent=_parse_parent(data.get("parent"), where),
        spec=dict(data.get("spec") or {}),
        model=dict(data.get("model") or {}),
        files=_parse_files(data["files"], where),
        extra=dict(data.get("extra") or {}),
    )


def _require(data: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise ArtifactError(f"{where} lacks the field(s) {', '.join(missing)}; the artifact is damaged, rebuild it")


def _parse_parent(data: Any, where: str) -> ParentRef | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: 'parent' must be a mapping")
    _require(data, ("kind", "source", "digest"), f"{where} (parent)")
    return ParentRef(kind=str(data["kind"]), source=str(data["source"]), digest=str(data["digest"]))


def _parse_files(data: Any, where: str) -> tuple[FileEntry, ...]:
    if not isinstance(data, list):
        raise ArtifactError(f"{where}: 'files' must be a list")
    entries = []
    for item in data:
        if not isinstance(item, dict) or not {"path", "sha256", "bytes"} <= item.keys():
            raise ArtifactError(f"{where}: every file entry needs path, sha256 and bytes; found {item!r}")
        path = str(item["path"])
        if path.startswith("/") or ".." in path.split("/"):
            raise ArtifactError(f"{where}: file path {path!r} leaves the artifact directory")
        entries.append(FileEntry(path=path, sha256=str(item["sha256"]), bytes=int(item["bytes"])))
    return tuple(entries)
