"""lk-baton: the agent-side adapter for baton (see docs/protocol.md)."""

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

__all__ = [
    "DecodeError",
    "Endpoint",
    "EndpointConfig",
    "ErrorCode",
    "ReceiverConfig",
    "ReceiversConfig",
    "RoomTransport",
    "SenderConfig",
    "TransferError",
    "receive_bundle",
    "send_bundle",
    "transport_for",
]
