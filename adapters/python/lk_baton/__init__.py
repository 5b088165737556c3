"""lk-baton: the agent-side adapter for baton (see docs/protocol.md).

The package re-exports the public names of five modules, each listed once in its module's
``__all__``:

* :mod:`lk_baton.floor`: the control protocol without any SDK (codec, ``FloorClient``, who may
  speak to an agent, ``FILLER_TRACK_NAME``);
* :mod:`lk_baton.filler`: ``SourceFiller``, the handing-off agent's own filler track (it
  imports ``livekit.rtc`` and numpy on first use only);
* :mod:`lk_baton.transfer`: the chunked transfer (``baton.xfer``) and its ``livekit.rtc`` glue;
* :mod:`lk_baton.launch`: ``ensure_coordinator``, making sure a room has its baton;
* :mod:`lk_baton.agents`: the livekit-agents integration (``BatonLink``, ``seed_agent``, ...),
  imported on first use of one of its names, so the other modules work with the plain
  ``livekit`` SDK alone. ``from lk_baton import *`` does not import it.

:mod:`lk_baton.frames` (the transfer's frame codec) and :mod:`lk_baton.bundle` (the context
bundle) are used as modules; their two error types every caller meets are re-exported here.
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

from . import filler as _filler
from . import floor as _floor
from . import launch as _launch
from . import transfer as _transfer
from .filler import *  # noqa: F403
from .floor import *  # noqa: F403
from .frames import DecodeError, ErrorCode
from .launch import *  # noqa: F403
from .transfer import *  # noqa: F403

__all__ = ["DecodeError", "ErrorCode"]
__all__ += _floor.__all__
__all__ += _filler.__all__
__all__ += _transfer.__all__
__all__ += _launch.__all__

if TYPE_CHECKING:
    from . import agents as _agents
    from .agents import *  # noqa: F403

    __all__ += _agents.__all__


def __getattr__(name: str) -> object:
    # lk_baton.agents needs livekit-agents: import it only when one of its names is used. A
    # submodule's name (``from lk_baton import bundle``) is left to the import system.
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        agents = importlib.import_module(f"{__name__}.agents")
    except ImportError as e:
        raise AttributeError(
            f"module {__name__!r} has no attribute {name!r} (lk_baton.agents, which needs "
            f"livekit-agents, could not be imported: {e})"
        ) from e
    if name not in agents.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(agents, name)
