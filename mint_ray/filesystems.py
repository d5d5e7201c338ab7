"""Where a URI lives: a local path or ``s3://bucket/prefix``, the pyarrow filesystem that
serves it, and what S3's refusals mean (``_explain``), credentials redacted.

S3 goes through pyarrow with the endpoint from ``AWS_ENDPOINT_URL``, so any
S3-compatible store works. Callers use ``mint_ray.storage``, which re-exports these.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from mint_ray.errors import StorageError

# Ceph's gateway (and other S3 stores) answer 411 to the AWS SDK's default
# streaming checksums; "when_required" restores plain Content-Length uploads.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")


def redact(message: str) -> str:
    """Remove any credential held in the environment from ``message``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            message = message.replace(value, "***")
    return re.sub(r"(?i)(secret[_-]?(access[_-]?)?key\s*[=:]\s*)\S+", r"\1***", message)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (also for local paths)."""
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        scheme, _, rest = endpoint.partition("://")
        kwargs.update(endpoint_override=rest or scheme, scheme=scheme if rest else "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    # Short timeouts and few retries: an unreachable endpoint must fail in
    # seconds with a clear message, not hang a job.
    return pafs.S3FileSystem(connect_timeout=5, request_timeout=60,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
                             **kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        return _s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().absolute())


# The IAM action S3 checks for each request pyarrow names in its errors ("during X operation").
_OPERATION_ACTIONS = {
    "HeadBucket": "s3:ListBucket", "ListObjects": "s3:ListBucket", "ListObjectsV2": "s3:ListBucket",
    "HeadObject": "s3:GetObject", "GetObject": "s3:GetObject", "PutObject": "s3:PutObject",
    "CreateMultipartUpload": "s3:PutObject", "UploadPart": "s3:PutObject",
    "CompleteMultipartUpload": "s3:PutObject", "CopyObject": "s3:GetObject + s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload", "DeleteObject": "s3:DeleteObject",
    "DeleteObjects": "s3:DeleteObject",
}
_BUCKET_ACTIONS = {"s3:ListBucket"}


def credential_source() -> str:
    """Who this process is to S3: an access key from the environment, or a role."""
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "the access key in AWS_ACCESS_KEY_ID"
    if os.environ.get("AWS_ROLE_ARN"):
        return f"the role {os.environ['AWS_ROLE_ARN']} (service account, IRSA)"
    return "this node's role (instance profile or pod identity)"


def denied_hint(uri: str, text: str, action: str | None = None) -> str:
    """What was refused, on which resource, and for whom: the S3 action and the ARN (from
    pyarrow's message when it names the request), worded for keys or for roles."""
    m = re.search(r"during (\w+) operation", text)
    operation = m.group(1) if m else None
    action = _OPERATION_ACTIONS.get(operation or "", action) or "the request"
    bucket = bucket_of(uri)
    km = re.search(r"key '([^']*)' in bucket '([^']*)'", text)
    key = km.group(1) if km else uri[len("s3://"):].split("/", 1)[1] if "/" in uri[len("s3://"):] else ""
    bucket = km.group(2) if km else bucket
    if action in _BUCKET_ACTIONS:
        resource = f"arn:aws:s3:::{bucket}" + (f" (prefix {key!r})" if key and operation != "HeadBucket" else "")
    else:
        resource = f"arn:aws:s3:::{bucket}/{key}"
    what = f"{action} on {resource}" + (f" ({operation})" if operation else "")
    note = (" (S3 answers 403, not 404, for a missing key where s3:ListBucket is not allowed)"
            if operation == "HeadObject" else "")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return (f"S3 refused the credentials or the permission: {what}, for the access key in "
                "AWS_ACCESS_KEY_ID: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and that the key's "
                f"policy allows {action} there{note}")
    return (f"S3 denied {what} to {credential_source()}: the role's policy must allow {action} there "
            f"(infra/terraform/iam.tf: stage_prefixes read/write, input_prefixes read){note}")


def _explain(uri: str, err: Exception, action: str | None = None) -> StorageError:
    text = str(err)
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "the default AWS endpoint")
    if "NETWORK_CONNECTION" in text or "Couldn't connect" in text or "curlCode: 7" in text:
        hint = f"cannot reach the S3 endpoint {endpoint}: check AWS_ENDPOINT_URL and that the server is up"
    elif "NoSuchBucket" in text or "NO_SUCH_BUCKET" in text:
        hint = f"bucket {bucket_of(uri)!r} does not exist: create it first"
    elif "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        hint = ("S3 refused the credentials: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                if os.environ.get("AWS_ACCESS_KEY_ID") else
                f"S3 refused the credentials of {credential_source()}: check the role and the clock")
    elif "ACCESS_DENIED" in text or "AccessDenied" in text:
        hint = denied_hint(uri, text, action)
    else:
        hint = text.splitlines()[0] if text else type(err).__name__
    return StorageError(redact(f"{uri}: {hint}"))


def absolute(uri: str) -> str:
    """``uri`` with a local path made absolute (Ray workers run in other directories)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", uri) and not uri.startswith("file:/"):
        return uri  # s3://..., models:/...
    return filesystem(uri)[1]


def bucket_of(uri: str) -> str:
    return uri[len("s3://"):].split("/", 1)[0] if is_s3(uri) else ""
