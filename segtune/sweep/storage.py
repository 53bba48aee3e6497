"""Where a sweep keeps Ray's experiment state, its checkpoints and its own state file: a local
folder (one machine, or a shared mount such as NFS at the same path on every node) or a URI
that every node reaches (`s3://bucket/prefix`, also S3-compatible stores such as MinIO or Ceph
through `tune.storage_endpoint` or the standard `AWS_ENDPOINT_URL`).

A URI is never resolved as a local path: Ray gets it as a pyarrow filesystem and a path in it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
from collections.abc import Iterator
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

    @functools.cached_property
    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem and the path of the storage root in it, as Ray takes them.

        Built once, on the driver: the node checks and the trials get this very object
        (pickled with its endpoint and region), not one of their own making.
        """
        if self.is_local:
            return pafs.LocalFileSystem(), self.location
        parts = urlsplit(self.location)
        if parts.scheme == "s3":
            return self._s3(parts.netloc), f"{parts.netloc}{parts.path}".rstrip("/")
        if self.endpoint:
            raise ConfigError(
                f"tune.storage_endpoint applies to s3:// storage, not {parts.scheme}://"
            )
        try:
            return pafs.FileSystem.from_uri(self.location)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"tune.storage_path {self.location}: {exc}") from None

    def _s3(self, bucket: str) -> pafs.S3FileSystem:
        """S3, or an S3-compatible server at the endpoint. Never the cloud's metadata service
        for a server of one's own; a bucket is created there when missing, never on AWS."""
        endpoint = self.endpoint or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        options: dict[str, object] = {}
        try:
            if endpoint:
                os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
                options.update(endpoint_override=endpoint, allow_bucket_creation=True)
                options["region"] = region or "us-east-1"
                if urlsplit(endpoint).scheme == "http":
                    options["scheme"] = "http"
            else:
                options["region"] = region or pafs.resolve_s3_region(bucket)
            return pafs.S3FileSystem(**options)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"tune.storage_path {self.location}: {exc}") from None

    def path(self, *parts: str) -> str:
        """A path under the storage root, in the filesystem's own terms."""
        return posixpath.join(self.filesystem[1], *parts)

    def read_text(self, *parts: str) -> str | None:
        """A small file's text, or None when it does not exist."""
        data = self.read_bytes(*parts)
        return None if data is None else data.decode()

    def read_bytes(self, *parts: str) -> bytes | None:
        """A small file's bytes, or None when it does not exist."""
        fs, path = self.filesystem[0], self.path(*parts)
        with self._errors("read"):
            if fs.get_file_info(path).type != pafs.FileType.File:
                return None
            with fs.open_input_stream(path) as stream:
                return stream.read()

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """A small file written whole: a local one under a partial name, then renamed into place
        (a driver killed meanwhile leaves the old file, never half a new one); an object store
        writes an object whole by itself."""
        fs, path = self.filesystem[0], self.path(*parts)
        target = f"{path}.partial-{os.getpid()}" if self.is_local else path
        with self._errors("write"):
            fs.create_dir(posixpath.dirname(path), recursive=True)
            with fs.open_output_stream(target) as stream:
                stream.write(data)
            if target != path:
                fs.move(target, path)

    def delete(self, *parts: str) -> None:
        fs, path = self.filesystem[0], self.path(*parts)
        with self._errors("delete"):
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """A storage that cannot be reached is the user's key to fix, not a traceback."""
        try:
            yield
        except OSError as exc:
            raise ConfigError(
                f"tune.storage_path {self.location}: cannot {action} there ({exc}); check the "
                "path or bucket, tune.storage_endpoint and the AWS credentials of this machine"
            ) from None

    def __str__(self) -> str:
        return self.location
