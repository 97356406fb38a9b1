"""Building OCI image layouts on disk, so tests need no docker daemon and no network.

Layers are real gzipped tars and configs carry matching ``diff_ids``, because skopeo, podman and
containerd check those when they pull. Text layers are deterministic (fixed mtimes and owners), so
the same files give the same digest in every image: that is how tests get shared layers to
deduplicate. Size-driven layers hold fresh random bytes and are streamed to disk, so 60 MB layers
cost no memory and never collide with an earlier test's blobs.
"""
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

Platform = Mapping[str, Any]

#: The seed's qnib/bench index: a generic amd64 build, three feature builds and an arm64 build.
BENCH_PLATFORMS: tuple[Platform, ...] = (
    {"os": "linux", "architecture": "amd64"},
    {"os": "linux", "architecture": "amd64", "features": ["cpu:skylake"]},
    {"os": "linux", "architecture": "amd64", "features": ["cpu:broadwell"]},
    {"os": "linux", "architecture": "amd64", "features": ["cpu:broadwell", "nvcap:5.2"]},
    {"os": "linux", "architecture": "arm64", "variant": "v8"},
)


@dataclass(frozen=True)
class Blob:
    """A blob in a layout, described as manifests refer to it."""

    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """A single-platform image: its manifest bytes, digest, config and layers."""

    manifest: bytes
    digest: str
    config: Blob
    layers: list[Blob]
    platform: dict[str, object]

    def descriptor(self) -> dict[str, object]:
        """The entry an index holds for this image, ``platform.features`` included."""
        return {"mediaType": MANIFEST, "digest": self.digest, "size": len(self.manifest),
                "platform": self.platform}


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform index and the images it lists, in order."""

    manifest: bytes
    digest: str
    images: list[Image]


def build_text(platform: Platform) -> bytes:
    """What a bench image's ``build.txt`` says, as the seed's images print it."""
    features = ",".join(platform.get("features") or ["generic"])
    return f"This container is optimised for: {platform['os']}/{platform['architecture']} {features}\n".encode()


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class _Hashing(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: _Writable) -> None:
        super().__init__()
        self.sink = sink
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sha256.update(data)
        self.size += len(data)
        return self.sink.write(data)


class _Random:
    """A readable file of endless random bytes, for tarfile to copy from."""

    def read(self, size: int = 1 << 16, /) -> bytes:
        return os.urandom(size)


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info


class Layout:
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.blobs = path / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        if not (path / "index.json").exists():
            self._write_index([])

    def add_blob(self, data: bytes, media_type: str) -> Blob:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.blobs / digest[7:]).write_bytes(data)
        return Blob(digest, len(data), media_type)

    def add_layer(self, files: Mapping[str, bytes | int]) -> tuple[Blob, str]:
        """A gzipped tar of ``files`` (content, or a size for random content); returns the blob
        and its diff_id (the digest of the uncompressed tar)."""
        # Stored, not compressed (level 0): random bytes do not shrink, and zlib would make 60 MB
        # layers cost seconds. Clients only need valid gzip with the right digests.
        with tempfile.NamedTemporaryFile(dir=self.blobs, delete=False) as out:
            compressed = _Hashing(out)
            with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, compresslevel=0) as gz:
                tar_stream = _Hashing(gz)
                with tarfile.open(fileobj=tar_stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                    for name, content in files.items():
                        if isinstance(content, int):
                            tar.addfile(_tar_member(name, content), _Random())
                        else:
                            tar.addfile(_tar_member(name, len(content)), io.BytesIO(content))
        digest = compressed.sha256.hexdigest()
        os.chmod(out.name, 0o644)
        os.replace(out.name, self.blobs / digest)
        return Blob("sha256:" + digest, compressed.size, LAYER), \
            "sha256:" + tar_stream.sha256.hexdigest()

    def tag(self, descriptor: dict[str, object], tag: str) -> None:
        """Name a manifest or index in ``index.json``, so ``oci:DIR:TAG`` finds it."""
        entries = [entry for entry in self._read_index()
                   if entry.get("annotations", {}).get(REF_NAME) != tag]
        entries.append({**descriptor, "annotations": {REF_NAME: tag}})
        self._write_index(entries)

    def _read_index(self) -> list[dict]:
        return json.loads((self.path / "index.json").read_text())["manifests"]

    def _write_index(self, entries: list[dict]) -> None:
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}
        (self.path / "index.json").write_text(json.dumps(index, indent=2))


def make_image(directory: Path, tag: str | None = None, layers: Sequence[bytes | int] = (),
               platform: Platform | None = None, files: Mapping[str, bytes] | None = None) -> Image:
    """Add an image to the layout in ``directory``; tag it unless it is only meant for an index.

    ``files`` become the first layer; each item of ``layers`` adds one more layer holding a file
    ``layer-N.bin`` with those bytes, or with that many random bytes when it is an int.
    """
    layout = Layout(directory)
    platform = dict(platform or {"os": "linux", "architecture": "amd64"})
    contents: list[Mapping[str, bytes | int]] = [files] if files else []
    contents += [{f"layer-{number}.bin": layer} for number, layer in enumerate(layers)]
    built = [layout.add_layer(content) for content in contents]
    config_json: dict[str, Any] = {key: platform[key] for key in ("os", "architecture", "variant") if key in platform}
    config_json["rootfs"] = {"type": "layers", "diff_ids": [diff_id for _, diff_id in built]}
    # A container config and one history entry per layer, as builders write them: Charliecloud
    # refuses an image config without either.
    config_json["config"] = {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]}
    config_json["history"] = [{"created_by": f"metahub tests: layer {number}"} for number in range(len(built))]
    config = layout.add_blob(json.dumps(config_json).encode(), CONFIG)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST, "config": config.descriptor(),
        "layers": [blob.descriptor() for blob, _ in built]}).encode()
    blob = layout.add_blob(manifest, MANIFEST)
    image = Image(manifest, blob.digest, config, [layer for layer, _ in built], platform)
    if tag is not None:
        layout.tag(image.descriptor(), tag)
    return image


def make_index(directory: Path, tag: str, entries: Sequence[Image]) -> ImageIndex:
    """Tag an index over images already in the layout, entries in the given order."""
    layout = Layout(directory)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": INDEX,
                           "manifests": [image.descriptor() for image in entries]}).encode()
    blob = layout.add_blob(manifest, INDEX)
    layout.tag({"mediaType": INDEX, "digest": blob.digest, "size": blob.size}, tag)
    return ImageIndex(manifest, blob.digest, list(entries))


def make_bench_index(directory: Path, tag: str, layers: Sequence[bytes | int] = (),
                     platforms: Sequence[Platform] = BENCH_PLATFORMS) -> ImageIndex:
    """The qnib/bench shape: one image per platform, each with a ``build.txt`` naming its build
    (and ``layers`` on top, e.g. sizes for large random layers)."""
    images = [make_image(directory, None, layers, platform, {"build.txt": build_text(platform)})
              for platform in platforms]
    return make_index(directory, tag, images)
