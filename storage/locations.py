"""Locations: a local path or a URL, spelled as one string everywhere (``/data/k400``, ``s3://b/k400``).

A string with a ``scheme://`` prefix other than ``file://`` is a URL, read through fsspec; anything else
is a local path. Joining and splitting follow ``/`` for URLs (object stores and HTTP have no other
separator) and ``os.path`` for local paths, so a manifest's relative shard names resolve the same way
under either.
"""
from __future__ import annotations

import os
import posixpath
import re

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def protocol(location: str | os.PathLike) -> str:
    """The fsspec protocol of a location: ``s3``, ``gs``, ``https``, ..., or ``file`` for a local path."""
    match = _SCHEME.match(os.fspath(location))
    return match.group(1).lower() if match else "file"


def is_url(location: str | os.PathLike) -> bool:
    """Whether ``location`` names remote storage (a URL other than ``file://``)."""
    return protocol(location) != "file"


def local_path(location: str | os.PathLike) -> str:
    """A local location as a plain path (``file:///x`` -> ``/x``)."""
    text = os.fspath(location)
    return text[len("file://"):] if text.startswith("file://") else text


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base`` / each of ``parts`` (relative names, ``/``-separated)."""
    base = os.fspath(base)
    if is_url(base):
        return posixpath.join(base.rstrip("/") + "/", *parts) if parts else base
    return os.path.join(local_path(base), *parts)


def parent(location: str | os.PathLike) -> str:
    """The folder or prefix holding ``location``."""
    text = os.fspath(location)
    if is_url(text):
        head, _, _ = text.rstrip("/").rpartition("/")
        return head
    return os.path.dirname(local_path(text))


def name(location: str | os.PathLike) -> str:
    """The last part of ``location`` (a file name or an object key's last segment)."""
    return os.fspath(location).rstrip("/").rpartition("/")[2]
