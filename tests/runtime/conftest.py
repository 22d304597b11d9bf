"""Runtime + Worker on the memory broker and memory results."""

from __future__ import annotations

import pytest

from runtime import Runtime


@pytest.fixture
def rt() -> Runtime:
    """A fresh runtime on the memory broker and memory result store."""
    return Runtime()
