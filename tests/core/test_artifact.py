"""Manifests and artifact directories: round trip, atomic writes, tamper detection by file name."""

import hashlib
from pathlib import Path

import pytest
import yaml

from kiln.core.artifact import ArtifactWriter, load_artifact
from kiln.core.errors import ArtifactError, OutputExistsError
from kiln.core.manifest import MANIFEST_NAME, ParentRef, manifest_digest, parse_manifest
from kiln.core.version import __version__

PARENT = ParentRef(kind="hf-dir", source="/models/x", digest="sha256:" + "ab" * 32)


def write_artifact(out: Path, files: dict[str, bytes], force: bool = False) -> Path:
    with ArtifactWriter(out, kind="checkpoint", force=force) as writer:
        for name, data in files.items():
            (writer.path / name).parent.mkdir(parents=True, exist_ok=True)
            (writer.path / name).write_bytes(data)
        writer.commit(name="demo", parent=PARENT, spec={"stage": "convert", "dtype": "bf16"}, model={"num_layers": 2})
    return out


def test_manifest_round_trip(tmp_path: Path) -> None:
    out = write_artifact(tmp_path / "a", {"weights.safetensors": b"x" * 100, "sub/config.json": b"{}"})
    artifact = load_artifact(out, kind="checkpoint", verify=True)
    manifest = artifact.manifest
    assert manifest.kind == "checkpoint" and manifest.schema_version == 1 and manifest.kiln_version == __version__
    assert manifest.parent == PARENT and manifest.spec == {"stage": "convert", "dtype": "bf16"}
    assert [(f.path, f.bytes) for f in manifest.files] == [("sub/config.json", 2), ("weights.safetensors", 100)]
    assert manifest.file("weights.safetensors").sha256 == hashlib.sha256(b"x" * 100).hexdigest()
    text = (out / MANIFEST_NAME).read_text()
    assert parse_manifest(text, "m") == manifest
    assert parse_manifest(manifest.to_yaml(), "m").to_yaml() == text
    assert artifact.digest == manifest_digest(text)


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, kind="checkpoint") as writer:
            (writer.path / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory either


def test_refuses_non_empty_output_without_force(tmp_path: Path) -> None:
    out = write_artifact(tmp_path / "a", {"w": b"1"})
    with pytest.raises(OutputExistsError, match="--force"):
        write_artifact(out, {"w": b"2"})
    assert (out / "w").read_bytes() == b"1"
    write_artifact(out, {"w2": b"2"}, force=True)
    assert not (out / "w").exists() and (out / "w2").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_empty_existing_output_is_fine(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    write_artifact(tmp_path / "a", {"w": b"1"})
    assert load_artifact(tmp_path / "a").manifest.file("w") is not None


@pytest.mark.parametrize(
    ("damage", "verify", "message"),
    [
        (lambda p: p.write_bytes(b"y" * 100), True, "weights.safetensors does not match its sha256"),
        (lambda p: p.write_bytes(b"x" * 50), False, "weights.safetensors has 50 bytes, the manifest says 100"),
        (lambda p: p.unlink(), False, "weights.safetensors is missing"),
    ],
    ids=["tampered", "truncated", "missing"],
)
def test_damage_is_reported_by_file_name(tmp_path: Path, damage, verify: bool, message: str) -> None:
    out = write_artifact(tmp_path / "a", {"weights.safetensors": b"x" * 100, "config.json": b"{}"})
    damage(out / "weights.safetensors")
    with pytest.raises(ArtifactError, match=message):
        load_artifact(out, verify=verify)


def test_tampering_needs_verify_to_be_seen(tmp_path: Path) -> None:
    out = write_artifact(tmp_path / "a", {"weights.safetensors": b"x" * 100})
    (out / "weights.safetensors").write_bytes(b"y" * 100)
    load_artifact(out)  # sizes still match: only --verify reads the content


def test_kind_and_schema_are_checked(tmp_path: Path) -> None:
    out = write_artifact(tmp_path / "a", {"w": b"1"})
    with pytest.raises(ArtifactError, match="is a checkpoint artifact, but a engine is needed"):
        load_artifact(out, kind="engine")
    data = yaml.safe_load((out / MANIFEST_NAME).read_text())
    data["schema_version"] = 99
    (out / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match="schema version 99, newer than this kiln understands"):
        load_artifact(out)
    data["schema_version"], data["kind"] = 1, "mystery"
    (out / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(ArtifactError, match="unknown artifact kind 'mystery'"):
        load_artifact(out)
    (out / MANIFEST_NAME).write_text("kind: [unclosed")
    with pytest.raises(ArtifactError, match="not valid YAML"):
        load_artifact(out)


def test_file_paths_cannot_escape(tmp_path: Path) -> None:
    out = write_artifact(tmp_path / "a", {"w": b"1"})
    data = yaml.safe_load((out / MANIFEST_NAME).read_text())
    data["files"][0]["path"] = "../../etc/passwd"
    with pytest.raises(ArtifactError, match="leaves the artifact directory"):
        parse_manifest(yaml.safe_dump(data), "m")


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no manifest.yaml"):
        load_artifact(tmp_path)
