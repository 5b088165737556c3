from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import LiveKitServer


@pytest.fixture(scope="module")
def server() -> Iterator[LiveKitServer]:
    """One real LiveKit server per test module, on free ports."""
    srv = LiveKitServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.log_path.unlink(missing_ok=True)
