"""What a storage failure means: retry it, replace the sample, or stop with one line naming the URL.

Drivers report the same condition in different types (s3fs turns a 503 SlowDown into an ``OSError``
with ``EBUSY`` whose ``__cause__`` is botocore's ``ClientError``; fsspec's HTTP driver raises aiohttp's
``ClientResponseError``; a refused connection is botocore's ``EndpointConnectionError`` or aiohttp's
``ClientConnectorError``), so the classification walks the exception chain and looks at HTTP status
codes, S3 error codes and connection-level types rather than at one driver's classes.

- transient (retried, ``retry.with_retries``): HTTP 5xx, 408, 429, S3 ``SlowDown`` / ``Throttling``
  / ``RequestTimeout``, reset / refused / dropped connections, timeouts, and ``ShortRead`` (a response
  with fewer bytes than the ``.idx`` promised).
- fatal at start-up (``StorageAccessError``, a ``ValueError``: the CLIs print one line and exit 2):
  missing credentials, a missing bucket, access denied (403), a missing manifest or index (404).
- anything else that survives the retries is ``StorageReadError`` (an ``OSError``): for a member read
  the loaders make it a bad sample, replaced by its spare.
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

# Error codes S3 and S3-compatible stores send for "slow down / try later" (AWS S3 error responses).
_TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                       "InternalError", "ServiceUnavailable", "OperationAborted", "503", "500", "502", "504"}
_DENIED_S3_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                    "AccountProblem", "InvalidToken", "ExpiredToken", "403"}


class ShortRead(OSError):
    """A read returned fewer bytes than asked: a dropped connection or a server that cut it short."""


class StorageReadError(OSError):
    """A request that failed for good (after its retries, or permanently); the message names the URL."""

    def __str__(self) -> str:
        return self.args[0] if self.args else super().__str__()


class StorageAccessError(ValueError):
    """Storage that cannot be used at all (credentials, bucket, permission, missing manifest): one line
    naming the URL, exit 2 through the CLIs' error epilogue.

    ``reason`` is one of ``credentials``, ``bucket``, ``denied``, ``missing``, ``driver``.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _http_status(err: BaseException) -> int | None:
    status = getattr(err, "status", None)                      # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(err, "response", None)                  # botocore.exceptions.ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status if isinstance(status, int) else None
    return None


def _s3_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _type_names(err: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(err).__mro__}


def is_transient(err: BaseException) -> bool:
    """Whether trying the same request again may succeed."""
    for e in _chain(err):
        if isinstance(e, ShortRead):
            return True
        if isinstance(e, (FileNotFoundError, PermissionError, StorageAccessError)):
            return False
        status, code = _http_status(e), _s3_code(e)
        if code in _DENIED_S3_CODES or code in ("NoSuchKey", "NoSuchBucket"):
            return False
        if code in _TRANSIENT_S3_CODES or (status is not None and (status >= 500 or status in (408, 429))):
            return True
        if status is not None:
            return False
        if isinstance(e, (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)):
            return True
        names = _type_names(e)
        # botocore: HTTPClientError covers EndpointConnectionError, ConnectionClosedError, ReadTimeoutError;
        # aiohttp: ClientConnectionError covers refused / reset / ServerDisconnected; ClientPayloadError a
        # body cut off mid-transfer; fsspec's FSTimeoutError a request that hit the timeout.
        if names & {"HTTPClientError", "ClientConnectionError", "ClientPayloadError", "FSTimeoutError",
                    "IncompleteRead", "ResponseStreamingError", "ServerDisconnectedError"}:
            return True
    return False


def access_problem(err: BaseException) -> tuple[str, str] | None:
    """``(reason, why)`` when storage cannot be used at all, else None; ``reason`` is
    ``StorageAccessError.reason`` (credentials, bucket, denied, missing).

    The whole chain is searched for the most specific cause first: s3fs turns botocore's
    ``NoSuchBucket`` into a plain ``FileNotFoundError``, which alone would read as a missing file.
    """
    chain = list(_chain(err))
    for e in chain:
        names = _type_names(e)
        if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
            return "credentials", ("no credentials found (they come from the standard places: AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE and ~/.aws; for gs:// GOOGLE_APPLICATION_CREDENTIALS "
                    "or gcloud's application-default login)")
        if _s3_code(e) == "NoSuchBucket":
            bucket = e.response.get("Error", {}).get("BucketName")
            return "bucket", f"the bucket {bucket!r} does not exist" if bucket else "the bucket does not exist"
    for e in chain:
        code, status = _s3_code(e), _http_status(e)
        if code in _DENIED_S3_CODES or status in (401, 403) or isinstance(e, PermissionError):
            detail = f" ({code})" if code and code != "403" else ""
            return "denied", f"access denied{detail}; check the credentials and the bucket's policy"
    for e in chain:
        if isinstance(e, FileNotFoundError) or _http_status(e) == 404 or _s3_code(e) == "NoSuchKey":
            return "missing", "not found"
    return None


def retries_exhausted(what: str, attempts: int, elapsed: float, err: BaseException) -> StorageReadError:
    return StorageReadError(f"{what}: still failing after {attempts} attempts over {elapsed:.1f} s "
                            f"({describe(err)})")


def describe(err: BaseException) -> str:
    """A short one-line reason for an exception (its type and first line)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:300]
