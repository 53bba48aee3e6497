"""Where a sweep keeps Ray's experiment state, its checkpoints and its own state file: a local
folder (one machine, or a shared mount such as NFS at the same path on every node) or a URI
that every node reaches (`s3://bucket/prefix`, also S3-compatible stores such as MinIO or Ceph
through `tune.storage_endpoint` or the standard `AWS_ENDPOINT_URL`).

A URI is never resolved as a local path: Ray gets it as a pyarrow filesystem and a path in it.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from segtune.errors import ConfigError


def is_uri(text: str) -> bool:
    """`s3://...`, `gs://...`: a scheme of two letters or more (not a Windows drive)."""
    scheme = urlsplit(text).scheme
    return len(scheme) > 1 and "://" in text


@dataclass(frozen=True)
class RunStorage:
    """The run storage of a sweep: `location` is an absolute local path or a URI as written."""

    location: str
    endpoint: str | None = None

    @classmethod
    def of(cls, location: str, endpoint: str | None = None) -> RunStorage:
        if is_uri(location):
            return cls(location.rstrip("/"), endpoint)
        if endpoint:
            raise ConfigError(
                f"tune.storage_endpoint {endpoint!r} is set, but tune.storage_path {location!r} "
                "is a local folder; give an s3://bucket/prefix URI or drop the endpoint"
            )
        return cls(str(Path(location).expanduser().resolve()))

    @property
    def is_local(self) -> bool:
        return not is_uri(self.location)

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path of the storage root in it, as Ray takes them."""
        if self.is_local:
            return pafs.LocalFileSystem(), self.location
        parts = urlsplit(self.location)
        if parts.scheme == "s3":
            endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL")
            options: dict[str, object] = {"allow_bucket_creation": True}
            if endpoint:
                # an S3-compatible server: never ask the cloud's metadata service for a region
                options["endpoint_override"] = endpoint
                options["region"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
                if urlsplit(endpoint).scheme == "http":
                    options["scheme"] = "http"
            try:
                fs = pafs.S3FileSystem(**options)
            except (ValueError, OSError) as exc:
                raise ConfigError(f"tune.storage_path {self.location}: {exc}") from None
            return fs, f"{parts.netloc}{parts.path}".rstrip("/")
        if self.endpoint:
            raise ConfigError(
                f"tune.storage_endpoint applies to s3:// storage, not {parts.scheme}://"
            )
        try:
            return pafs.FileSystem.from_uri(self.location)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"tune.storage_path {self.location}: {exc}") from None

    def path(self, *parts: str) -> str:
        """A path under the storage root, in the filesystem's own terms."""
        return posixpath.join(self.filesystem()[1], *parts)

    def read_text(self, *parts: str) -> str | None:
        """A small file's text, or None when it does not exist."""
        fs, _ = self.filesystem()
        path = self.path(*parts)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, text: str, *parts: str) -> None:
        fs, _ = self.filesystem()
        path = self.path(*parts)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())

    def delete(self, *parts: str) -> None:
        fs, _ = self.filesystem()
        path = self.path(*parts)
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)

    def __str__(self) -> str:
        return self.location
