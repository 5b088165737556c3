from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import LiveKitServer, livekit_server


@pytest.fixture(scope="module")
def server() -> Iterator[LiveKitServer]:
    """One real LiveKit server per test module, on free ports."""
    with livekit_server() as srv:
        yield srv
    srv.log_path.unlink(missing_ok=True)
