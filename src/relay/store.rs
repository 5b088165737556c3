//! Where received bundles wait for delivery: the [`BundleStore`] trait and its in-memory
//! implementation, [`MemoryStore`].
//!
//! The relay owns one store per room and is its only user. The trait is what a durable store
//! (a file-backed one that survives a baton restart, or Redis shared by many workers) implements;
//! the contract below is written for those, the memory store keeps it trivially.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use baton_transfer::TransferId;

/// What the store keeps about a bundle besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleInfo {
    /// Server-stamped identity of the agent that sent it.
    pub from: String,
    /// The OPEN's metadata string, as the source sent it (at most
    /// [`MAX_META_LEN`](baton_transfer::frame::MAX_META_LEN) bytes).
    pub meta: String,
    /// Payload size in bytes.
    pub size: u64,
    /// SHA-256 of the payload, verified on receipt.
    pub sha256: [u8; 32],
}

/// A stored bundle: its description and its bytes (shared, so a delivery does not copy them
/// out of the store).
#[derive(Debug, Clone)]
pub struct StoredBundle {
    /// Who sent it and what it is.
    pub info: BundleInfo,
    /// The verified payload.
    pub payload: Arc<[u8]>,
}

/// How full a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUsage {
    /// Payload bytes stored.
    pub bytes: u64,
    /// Most payload bytes the store will hold.
    pub capacity: u64,
    /// Number of stored bundles.
    pub bundles: usize,
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Storing it would exceed the store's byte cap.
    #[error(
        "bundle store full: {used} of {capacity} bytes used, {need} more needed; deliver or remove stored bundles, or raise the store cap"
    )]
    Full {
        /// Bytes in use.
        used: u64,
        /// The cap.
        capacity: u64,
        /// Size of the bundle that did not fit.
        need: u64,
    },
    /// A bundle with this transfer id is already stored.
    #[error("a bundle with transfer id {0} is already stored")]
    Exists(TransferId),
    /// The backing storage failed (disk, network); the text says what the backend reported.
    #[error("bundle store failed: {0}")]
    Backend(String),
}

/// Where received bundles wait for delivery, keyed by the source's transfer id.
///
/// The contract every implementation keeps:
///
/// - **`put` never replaces** and fails with [`StoreError::Exists`] when the id is taken, with
///   [`StoreError::Full`] when the bundle does not fit. When `put` returns `Ok`, the bundle is
///   stored as durably as the store promises: the relay sends the source COMPLETE only after
///   that, so COMPLETE means "stored" (`docs/protocol.md`, section 4.10).
/// - **Reads return `Ok(None)` for an unknown id**; `Err` only when the backend failed. The relay
///   treats a failed read like a missing bundle for that call (the delivery does not start, an
///   OPEN is refused with `buffer_full`), logs it, and tries again on the next call.
/// - **Calls are synchronous and made on the room task**, between data packets: a slow store
///   delays the whole room. A store that does IO must bound each call (a local file write of a
///   bundle; a network round trip with a short timeout), and fail rather than wait.
/// - **One store serves one room.** A backend shared by many rooms (Redis) scopes its keys by
///   room itself.
pub trait BundleStore: Send + fmt::Debug {
    /// Stores a bundle under `id`.
    fn put(&mut self, id: TransferId, bundle: StoredBundle) -> Result<(), StoreError>;
    /// The bundle, with its bytes.
    fn get(&self, id: TransferId) -> Result<Option<StoredBundle>, StoreError>;
    /// The bundle's description, without loading its bytes.
    fn info(&self, id: TransferId) -> Result<Option<BundleInfo>, StoreError>;
    /// Removes a bundle, returning its description (`None` if it was not stored).
    fn remove(&mut self, id: TransferId) -> Result<Option<BundleInfo>, StoreError>;
    /// Bytes used, the cap, and the number of bundles.
    fn usage(&self) -> Result<StoreUsage, StoreError>;
}

/// Bundles in memory, up to a byte cap. Lost when baton stops.
#[derive(Debug)]
pub struct MemoryStore {
    capacity: u64,
    used: u64,
    bundles: HashMap<TransferId, StoredBundle>,
}

impl MemoryStore {
    /// An empty store that holds at most `capacity` payload bytes.
    pub fn new(capacity: u64) -> Self {
        MemoryStore { capacity, used: 0, bundles: HashMap::new() }
    }
}

impl BundleStore for MemoryStore {
    fn put(&mut self, id: TransferId, bundle: StoredBundle) -> Result<(), StoreError> {
        if self.bundles.contains_key(&id) {
            return Err(StoreError::Exists(id));
        }
        let need = bundle.payload.len() as u64;
        if self.used.saturating_add(need) > self.capacity {
            return Err(StoreError::Full { used: self.used, capacity: self.capacity, need });
        }
        self.used += need;
        self.bundles.insert(id, bundle);
        Ok(())
    }

    fn get(&self, id: TransferId) -> Result<Option<StoredBundle>, StoreError> {
        Ok(self.bundles.get(&id).cloned())
    }

    fn info(&self, id: TransferId) -> Result<Option<BundleInfo>, StoreError> {
        Ok(self.bundles.get(&id).map(|b| b.info.clone()))
    }

    fn remove(&mut self, id: TransferId) -> Result<Option<BundleInfo>, StoreError> {
        Ok(self.bundles.remove(&id).map(|b| {
            self.used -= b.payload.len() as u64;
            b.info
        }))
    }

    fn usage(&self) -> Result<StoreUsage, StoreError> {
        Ok(StoreUsage { bytes: self.used, capacity: self.capacity, bundles: self.bundles.len() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(n: usize) -> StoredBundle {
        StoredBundle {
            info: BundleInfo { from: "a".into(), meta: String::new(), size: n as u64, sha256: [0; 32] },
            payload: vec![0u8; n].into(),
        }
    }

    #[test]
    fn memory_store_keeps_its_cap_never_replaces_and_frees_on_remove() {
        let (one, two) = (TransferId::new(1), TransferId::new(2));
        let mut s = MemoryStore::new(10);
        assert_eq!(s.put(one, bundle(8)), Ok(()));
        assert_eq!(s.put(one, bundle(1)), Err(StoreError::Exists(one)));
        assert_eq!(s.put(two, bundle(3)), Err(StoreError::Full { used: 8, capacity: 10, need: 3 }));
        assert_eq!(s.usage(), Ok(StoreUsage { bytes: 8, capacity: 10, bundles: 1 }));
        assert_eq!(s.info(one).unwrap().map(|i| i.size), Some(8));
        assert_eq!(s.get(two).unwrap().map(|b| b.info), None);
        assert_eq!(s.remove(one).unwrap().map(|i| i.size), Some(8));
        assert_eq!(s.remove(one), Ok(None));
        assert_eq!(s.put(two, bundle(10)), Ok(()), "the freed bytes are usable again");
        assert_eq!(s.usage().unwrap().bytes, 10);
    }
}
