"""Artifact directories: written atomically, loaded with validation.

A stage writes into a hidden temporary directory beside the output and renames it into place only
once every file and the manifest are complete, so a failure (or Ctrl-C) never leaves a half-written
artifact where a later stage could pick it up.
"""

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from kiln.core.errors import ArtifactError, OutputExistsError
from kiln.core.hashing import sha256_bytes, sha256_file
from kiln.core.manifest import MANIFEST_NAME, FileEntry, Manifest, ParentRef, manifest_digest, parse_manifest
from kiln.core.version import __version__

logger = logging.getLogger(__name__)


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty output directory unless --force; call before doing any expensive work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output {out_dir} exists and is not a directory; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise OutputExistsError(f"output directory {out_dir} is not empty; pass --force to replace it")


class ArtifactWriter:
    """Context manager that collects an artifact's files in a temp dir and publishes it atomically."""

    def __init__(self, out_dir: Path, kind: str, force: bool = False) -> None:
        self.out_dir = Path(out_dir).absolute()
        self.kind = kind
        self.force = force
        self.path: Path = Path()  # the temporary directory; set on __enter__
        self.manifest: Manifest | None = None

    def __enter__(self) -> "ArtifactWriter":
        check_output_dir(self.out_dir, self.force)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Same parent directory as the output, so the final rename stays on one filesystem.
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.path.exists():  # not published: an error happened before or during commit
            shutil.rmtree(self.path, ignore_errors=True)

    def commit(
        self,
        *,
        name: str,
        parent: ParentRef | None,
        spec: dict[str, Any],
        model: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Hash every file, write manifest.yaml, and move the directory into place."""
        manifest = Manifest(
            kind=self.kind,
            kiln_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            name=name,
            parent=parent,
            spec=spec,
            model=model,
            files=tuple(_describe_files(self.path)),
            extra=extra or {},
        )
        (self.path / MANIFEST_NAME).write_text(manifest.to_yaml(), encoding="utf-8")
        self._publish()
        self.manifest = manifest
        return manifest

    def _publish(self) -> None:
        check_output_dir(self.out_dir, self.force)  # it may have been filled while we worked
        _apply_umask(self.path)
        old = None
        if self.out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            os.rename(self.out_dir, old / "artifact")
        os.rename(self.path, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("wrote %s artifact %s", self.kind, self.out_dir)


def _apply_umask(root: Path) -> None:
    """mkdtemp makes the directory private (0700) and some writers make 0600 files; published
    artifacts get the permissions any other directory would get."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _describe_files(root: Path) -> list[FileEntry]:
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative == MANIFEST_NAME:
            continue
        entries.append(FileEntry(path=relative, sha256=sha256_file(path), bytes=path.stat().st_size))
    return entries


@dataclass(frozen=True)
class Artifact:
    """A validated artifact directory."""

    path: Path
    manifest: Manifest
    digest: str  # sha256 of manifest.yaml: what children record as their parent


def is_artifact(path: Path) -> bool:
    """Whether a directory carries a kiln manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


def load_artifact(path: Path, kind: str | None = None, verify: bool = False) -> Artifact:
    """Open an artifact: check kind, schema and file sizes; with verify, every file's sha256 too."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory")
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} has no {MANIFEST_NAME}; it is not a kiln artifact")
    text = manifest_path.read_text(encoding="utf-8")
    manifest = parse_manifest(text, str(manifest_path))
    if kind is not None and manifest.kind != kind:
        raise ArtifactError(f"{path} is a {manifest.kind} artifact, but a {kind} is needed here")
    problems = find_file_problems(path, manifest, verify=verify)
    if problems:
        raise ArtifactError(f"{path} is damaged: " + "; ".join(problems) + ". Rebuild or re-copy the artifact")
    return Artifact(path=path, manifest=manifest, digest=manifest_digest(text))


def parent_ref_for(model_dir: Path) -> ParentRef:
    """How a child records a model directory it was made from: a kiln artifact by its manifest
    digest, a plain Hugging Face directory by a digest over its config and weight files."""
    from kiln.core.hf_checkpoint import find_weight_files

    model_dir = Path(model_dir)
    if is_artifact(model_dir):
        artifact = load_artifact(model_dir)
        return ParentRef(kind=artifact.manifest.kind, source=str(model_dir.absolute()), digest=artifact.digest)
    listing = [f"config.json {sha256_file(model_dir / 'config.json')}"]
    listing += [f"{path.name} {sha256_file(path)}" for path in find_weight_files(model_dir)]
    digest = "sha256:" + sha256_bytes("\n".join(listing).encode())
    return ParentRef(kind="hf-dir", source=str(model_dir.absolute()), digest=digest)


def find_file_problems(path: Path, manifest: Manifest, verify: bool) -> list[str]:
    """One message per missing, truncated, resized or (with verify) modified file, naming it."""
    problems = []
    for entry in manifest.files:
        file_path = path / entry.path
        if not file_path.is_file():
            problems.append(f"{entry.path} is missing")
            continue
        size = file_path.stat().st_size
        if size != entry.bytes:
            problems.append(f"{entry.path} has {size} bytes, the manifest says {entry.bytes}")
        elif verify and sha256_file(file_path) != entry.sha256:
            problems.append(f"{entry.path} does not match its sha256 (modified after it was written)")
    return problems
