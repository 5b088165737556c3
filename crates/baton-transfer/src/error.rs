//! Error codes shared by the wire (CANCEL/ERROR frames) and the local API.

use std::fmt;

/// A stable error code. On the wire it is a `u16`; in logs, JSON and the Python adapter it is
/// the snake_case string from [`ErrorCode::as_str`]. Numbers and strings never change meaning;
/// new codes only get new numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1: bytes that are not a valid frame.
    BadFrame,
    /// 2: frame version this build does not speak.
    UnsupportedVersion,
    /// 3: frame names a transfer this side does not know (never opened, or long finished).
    UnknownTransfer,
    /// 4: bundle larger than the receiver's maximum (declared, or found on decompression).
    TooLarge,
    /// 5: the sender already has the maximum number of transfers in flight to this receiver.
    TooManyTransfers,
    /// 6: accepting the transfer would exceed the receiver's total buffer budget.
    BufferFull,
    /// 7: the reassembled payload's SHA-256 differs from the one announced in OPEN.
    HashMismatch,
    /// 8: the deflate stream is corrupt or does not inflate to the announced size.
    DecompressionFailed,
    /// 9: the deadline passed (sender) or the sender went silent for too long (receiver).
    TimedOut,
    /// 10: the application cancelled the transfer.
    Cancelled,
    /// 11: a second OPEN with the same id announced different parameters.
    ConflictingOpen,
    /// 12: a well-formed frame that breaks the transfer's rules (chunk index out of range,
    /// wrong chunk length, COMPLETE with a different hash).
    ProtocolViolation,
    /// 13: the sender is not allowed to send bundles here (baton accepts them only from the
    /// agents in its configuration).
    NotAuthorized,
    /// 14: baton refused a checkpoint (`purpose: "checkpoint"`); the reason starts with why
    /// (`out_of_sequence`, `no_base`, `wrong_agent`, `bad_checkpoint`, `stale_sender`). The
    /// sender's next checkpoint is a base.
    CheckpointRejected,
    /// 15: baton takes bundles only from the agent holding the floor and from the source of
    /// the handoff under way; the sender is neither (an agent released after a handoff, or a
    /// standby that never held the floor).
    NotFloorHolder,
    /// Any other number: a code from a newer implementation; kept so it can be logged and forwarded.
    Other(u16),
}

impl ErrorCode {
    /// All codes this version defines, in wire order.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadFrame,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownTransfer,
        ErrorCode::TooLarge,
        ErrorCode::TooManyTransfers,
        ErrorCode::BufferFull,
        ErrorCode::HashMismatch,
        ErrorCode::DecompressionFailed,
        ErrorCode::TimedOut,
        ErrorCode::Cancelled,
        ErrorCode::ConflictingOpen,
        ErrorCode::ProtocolViolation,
        ErrorCode::NotAuthorized,
        ErrorCode::CheckpointRejected,
        ErrorCode::NotFloorHolder,
    ];

    /// Wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::BadFrame => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::UnknownTransfer => 3,
            ErrorCode::TooLarge => 4,
            ErrorCode::TooManyTransfers => 5,
            ErrorCode::BufferFull => 6,
            ErrorCode::HashMismatch => 7,
            ErrorCode::DecompressionFailed => 8,
            ErrorCode::TimedOut => 9,
            ErrorCode::Cancelled => 10,
            ErrorCode::ConflictingOpen => 11,
            ErrorCode::ProtocolViolation => 12,
            ErrorCode::NotAuthorized => 13,
            ErrorCode::CheckpointRejected => 14,
            ErrorCode::NotFloorHolder => 15,
            ErrorCode::Other(n) => n,
        }
    }

    /// From the wire value; unknown numbers become [`ErrorCode::Other`].
    pub fn from_u16(n: u16) -> ErrorCode {
        ErrorCode::ALL.into_iter().find(|c| c.to_u16() == n).unwrap_or(ErrorCode::Other(n))
    }

    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownTransfer => "unknown_transfer",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooManyTransfers => "too_many_transfers",
            ErrorCode::BufferFull => "buffer_full",
            ErrorCode::HashMismatch => "hash_mismatch",
            ErrorCode::DecompressionFailed => "decompression_failed",
            ErrorCode::TimedOut => "timed_out",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::ConflictingOpen => "conflicting_open",
            ErrorCode::ProtocolViolation => "protocol_violation",
            ErrorCode::NotAuthorized => "not_authorized",
            ErrorCode::CheckpointRejected => "checkpoint_rejected",
            ErrorCode::NotFloorHolder => "not_floor_holder",
            ErrorCode::Other(_) => "unknown_code",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "unknown_code({n})"),
            c => f.write_str(c.as_str()),
        }
    }
}

/// Why a transfer failed, as reported to the application.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct TransferError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail, including what to do next where there is something to do.
    pub reason: String,
    /// Whether the error was reported by the other end of the transfer (true) or detected locally
    /// (false).
    pub remote: bool,
}

impl TransferError {
    pub(crate) fn local(code: ErrorCode, reason: impl Into<String>) -> Self {
        TransferError { code, reason: reason.into(), remote: false }
    }
    pub(crate) fn remote(code: ErrorCode, reason: impl Into<String>) -> Self {
        TransferError { code, reason: reason.into(), remote: true }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_names_unique() {
        let mut names = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c.to_u16()), c);
            assert!(names.insert(c.as_str()));
        }
        assert_eq!(ErrorCode::from_u16(0), ErrorCode::Other(0));
        assert_eq!(ErrorCode::from_u16(500).to_string(), "unknown_code(500)");
    }
}
