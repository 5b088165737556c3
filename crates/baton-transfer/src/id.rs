//! The transfer id: one type for the 128-bit number on the wire (`docs/protocol.md`, section 4.2.1)
//! and the 32-hex-digit string in control messages and logs (section 3, "Transfer ids in control
//! messages").

use std::fmt;
use std::str::FromStr;

/// A transfer's id: 128 bits chosen by the sender, unique per receiver.
///
/// On the wire it is 16 big-endian bytes ([`to_be_bytes`](Self::to_be_bytes)); in text
/// (control messages, logs, JSON) it is 32 lowercase hexadecimal digits, most significant
/// first, which is what [`Display`](fmt::Display), [`FromStr`] and serde read and write.
/// A sender picks a fresh one per transfer with 128 random bits, e.g.
/// `TransferId::new(rand::random())`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TransferId(u128);

impl TransferId {
    /// Length of the text form.
    pub const HEX_LEN: usize = 32;

    /// The id whose wire value is `n`.
    pub const fn new(n: u128) -> Self {
        TransferId(n)
    }

    /// The wire value.
    pub const fn get(self) -> u128 {
        self.0
    }

    /// The 16 bytes of the frame header, big-endian.
    pub const fn to_be_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// The id from the 16 bytes of a frame header, big-endian.
    pub const fn from_be_bytes(b: [u8; 16]) -> Self {
        TransferId(u128::from_be_bytes(b))
    }
}

impl From<u128> for TransferId {
    fn from(n: u128) -> Self {
        TransferId(n)
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransferId({self})")
    }
}

/// Why a string is not a [`TransferId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a transfer id is 32 hexadecimal digits, got {got:?}")]
pub struct ParseTransferIdError {
    /// The rejected text, cut to 64 characters.
    pub got: String,
}

impl FromStr for TransferId {
    type Err = ParseTransferIdError;

    /// Exactly 32 hexadecimal digits; upper case is accepted, no sign, prefix or separators.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseTransferIdError { got: s.chars().take(64).collect() };
        if s.len() != Self::HEX_LEN || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        u128::from_str_radix(s, 16).map(TransferId).map_err(|_| err())
    }
}

impl serde::Serialize for TransferId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for TransferId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = TransferId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a transfer id: 32 hexadecimal digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TransferId, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_is_32_lowercase_hex_digits_and_round_trips() {
        let id = TransferId::new(0x0c56_c9f4_e69c_0142_18b8_1a2d_b375_878c);
        assert_eq!(id.to_string(), "0c56c9f4e69c014218b81a2db375878c");
        assert_eq!(TransferId::new(7).to_string(), "00000000000000000000000000000007");
        assert_eq!("0C56C9F4E69C014218B81A2DB375878C".parse(), Ok(id));
        assert_eq!(format!("{id:?}"), "TransferId(0c56c9f4e69c014218b81a2db375878c)");
        assert_eq!(TransferId::from_be_bytes(id.to_be_bytes()), id);
        assert_eq!(id.to_be_bytes()[0], 0x0c, "big-endian: most significant byte first");
    }

    #[test]
    fn anything_but_32_hex_digits_is_refused() {
        for bad in [
            "",
            "7",
            "t-4",
            "0c56c9f4e69c014218b81a2db375878",   // 31
            "0c56c9f4e69c014218b81a2db375878c0", // 33
            "+c56c9f4e69c014218b81a2db375878c",  // from_str_radix would take the sign
            "0x56c9f4e69c014218b81a2db375878c",
            "0c56c9f4e69c0142-8b81a2db375878c",
            "0c56c9f4e69c014218b81a2db375878g",
            "0c56c9f4e69c014218b81a2db37587é",
        ] {
            assert!(bad.parse::<TransferId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn serde_uses_the_text_form() {
        let id = TransferId::new(u128::MAX - 1);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, r#""fffffffffffffffffffffffffffffffe""#);
        assert_eq!(serde_json::from_str::<TransferId>(&json).unwrap(), id);
        let e = serde_json::from_str::<TransferId>(r#""t-4""#).unwrap_err();
        assert!(e.to_string().contains("32 hexadecimal digits"), "{e}");
        assert!(serde_json::from_str::<TransferId>("7").is_err(), "numbers are not ids");
    }
}
