"""lk-baton: the agent-side adapter for baton (see docs/protocol.md)."""

from typing import TYPE_CHECKING

from .frames import DecodeError, ErrorCode
from .transfer import (
    Endpoint,
    EndpointConfig,
    ReceiverConfig,
    ReceiversConfig,
    RoomTransport,
    SenderConfig,
    TransferError,
    receive_bundle,
    send_bundle,
    transport_for,
)

if TYPE_CHECKING:
    from .agents import (
        BatonError,
        BatonLink,
        FloorClient,
        HandoffCancelled,
        HandoffRefused,
        HandoffTicket,
        ReceivedContext,
        SessionEffects,
        build_handoff_bundle,
        chat_items_equal,
        read_bundle,
        seed_agent,
        state_from_dict,
        state_to_dict,
    )

_AGENTS = {
    "BatonError",
    "BatonLink",
    "FloorClient",
    "HandoffCancelled",
    "HandoffRefused",
    "HandoffTicket",
    "ReceivedContext",
    "SessionEffects",
    "build_handoff_bundle",
    "chat_items_equal",
    "read_bundle",
    "seed_agent",
    "state_from_dict",
    "state_to_dict",
}


def __getattr__(name: str) -> object:
    # lk_baton.agents needs livekit-agents; import it only when one of its names is used, so
    # the transfer and bundle modules keep working with the plain `livekit` SDK.
    if name in _AGENTS:
        from . import agents

        return getattr(agents, name)
    raise AttributeError(f"module 'lk_baton' has no attribute {name!r}")


__all__ = [
    "BatonError",
    "BatonLink",
    "DecodeError",
    "Endpoint",
    "EndpointConfig",
    "ErrorCode",
    "FloorClient",
    "HandoffCancelled",
    "HandoffRefused",
    "HandoffTicket",
    "ReceivedContext",
    "ReceiverConfig",
    "ReceiversConfig",
    "RoomTransport",
    "SenderConfig",
    "SessionEffects",
    "TransferError",
    "build_handoff_bundle",
    "chat_items_equal",
    "read_bundle",
    "receive_bundle",
    "seed_agent",
    "send_bundle",
    "state_from_dict",
    "state_to_dict",
    "transport_for",
]
