//! What a node keeps of its swarm membership under `<data-root>/swarm/`: who it is
//! (`state.json`), its certificate and key, and on managers the data key and the raft
//! database. The whole directory is the node's part of the cluster: copy it while the
//! daemon is stopped to back a manager up.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use shoal_api::node::NodeRole;
use shoal_ca::{tls::TlsMaterial, DataKey, UnlockKey};

use crate::SwarmError;

/// Who this node is in its swarm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    pub node_id: String,
    pub cluster_id: String,
    pub role: NodeRole,
    /// This node's address as others reach it (no port).
    pub advertise_addr: String,
    /// `IP:port` the cluster port listens on (managers).
    pub listen_addr: String,
    /// Cluster ports of the managers this node knows, the first one tried first.
    pub managers: Vec<String>,
    /// Raft member ID while a manager.
    #[serde(default)]
    pub raft_id: Option<u64>,
    /// The incarnation of the swarm this node belongs to (`StoreConfig::generation`): new
    /// at `swarm init` and `--force-new-cluster`, learnt at join and from heartbeats.
    #[serde(default)]
    pub generation: String,
    /// The swarm's VXLAN port (`DataPathPort`, chosen at `swarm init`); 0 when not known (a
    /// manager that did not say), and then the node keeps its own `--vxlan-port`.
    #[serde(default)]
    pub data_path_port: u16,
}

impl Membership {
    /// The UDP port overlays of this swarm use, if known.
    pub fn data_path_port(&self) -> Option<u16> {
        (self.data_path_port != 0).then_some(self.data_path_port)
    }
}

/// The data key as stored: plain, or wrapped by the unlock key under autolock.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredDataKey {
    wrapped: bool,
    key: String,
}

#[derive(Clone)]
pub struct SwarmDir {
    dir: PathBuf,
}

impl SwarmDir {
    pub fn new(data_root: &Path) -> Self {
        SwarmDir { dir: data_root.join("swarm") }
    }

    pub fn raft_dir(&self) -> PathBuf {
        self.dir.join("raft")
    }

    pub fn membership(&self) -> Result<Option<Membership>, SwarmError> {
        read_json(&self.dir.join("state.json"))
    }

    pub fn save_membership(&self, membership: &Membership) -> Result<(), SwarmError> {
        write_json(&self.dir.join("state.json"), membership)
    }

    /// The node's root, certificate and key, all three from one generation (see `save_tls`).
    pub fn tls(&self) -> Result<TlsMaterial, SwarmError> {
        let certs = self.dir.join("certs");
        // Resolved once: a renewal switching generations between two reads must not give a
        // certificate from one and a key from the other. Without the link (a crash while a
        // node from before generations moved over), the newest whole generation.
        let generation = match std::fs::canonicalize(&certs) {
            Ok(generation) => generation,
            Err(e) => self.newest_generation().ok_or_else(|| SwarmError::io("reading certs".into(), e))?,
        };
        let read = |name: &str| {
            std::fs::read_to_string(generation.join(name))
                .map_err(|e| SwarmError::io(format!("reading certs/{name}"), e))
        };
        Ok(TlsMaterial { root_pem: read("root.crt")?, cert_pem: read("node.crt")?, key_pem: read("node.key")? })
    }

    /// The highest-numbered `certs-<n>` holding all three files.
    fn newest_generation(&self) -> Option<PathBuf> {
        let complete = |dir: &Path| ["root.crt", "node.crt", "node.key"].iter().all(|f| dir.join(f).is_file());
        std::fs::read_dir(&self.dir)
            .ok()?
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.strip_prefix("certs-")?.parse::<u64>().ok()?, e.path())))
            .filter(|(_, path)| complete(path))
            .max_by_key(|(n, _)| *n)
            .map(|(_, path)| path)
    }

    /// Replaces root, certificate and key together: all three go into a new directory
    /// (`certs-<n>`, each file and the directory synced), then the `certs` symlink is
    /// switched to it in one rename. A crash at any point leaves `certs` on a complete
    /// generation, old or new, never a key without its certificate.
    pub fn save_tls(&self, tls: &TlsMaterial) -> Result<(), SwarmError> {
        let io = |what: &str, e| SwarmError::io(format!("{what} the node certificate"), e);
        let link = self.dir.join("certs");
        let current = std::fs::read_link(&link).ok();
        let n = current
            .as_ref()
            .and_then(|t| t.file_name()?.to_str()?.strip_prefix("certs-")?.parse::<u64>().ok())
            .unwrap_or(0);
        let generation = self.dir.join(format!("certs-{}", n + 1));
        // One left by a crash before its switch was never in use.
        if generation.exists() {
            std::fs::remove_dir_all(&generation).map_err(|e| io("clearing", e))?;
        }
        write_file(&generation.join("node.key"), tls.key_pem.as_bytes())?;
        write_file(&generation.join("root.crt"), tls.root_pem.as_bytes())?;
        write_file(&generation.join("node.crt"), tls.cert_pem.as_bytes())?;
        // A node from before generations keeps a plain directory; it becomes generation 0.
        if link.is_dir() && current.is_none() {
            std::fs::rename(&link, self.dir.join("certs-0")).map_err(|e| io("moving", e))?;
        }
        let staged = self.dir.join("certs.next");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(generation.file_name().expect("a generation has a name"), &staged)
            .map_err(|e| io("linking", e))?;
        std::fs::rename(&staged, &link).map_err(|e| io("switching", e))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing", e))?;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io("listing", e))?.flatten() {
            let name = entry.file_name();
            let old = name.to_str().is_some_and(|n| n.starts_with("certs-"))
                && name != generation.file_name().unwrap_or_default();
            if old {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }

    /// The data key: `Ok(None)` when it is wrapped and `unlock` is absent (locked).
    pub fn data_key(&self, unlock: Option<&UnlockKey>) -> Result<Option<DataKey>, SwarmError> {
        let stored: StoredDataKey = read_json(&self.dir.join("dek.json"))?
            .ok_or_else(|| SwarmError::Internal("the data key is missing".into()))?;
        let bytes = STANDARD.decode(&stored.key).map_err(|_| SwarmError::Internal("the data key is corrupt".into()))?;
        match (stored.wrapped, unlock) {
            (false, _) => {
                let raw: [u8; 32] =
                    bytes.try_into().map_err(|_| SwarmError::Internal("the data key is corrupt".into()))?;
                Ok(Some(DataKey::from_bytes(raw)))
            }
            (true, None) => Ok(None),
            (true, Some(kek)) => DataKey::unwrap_with(&bytes, kek).map(Some).map_err(|_| SwarmError::InvalidUnlockKey),
        }
    }

    pub fn is_locked(&self) -> Result<bool, SwarmError> {
        Ok(read_json::<StoredDataKey>(&self.dir.join("dek.json"))?.is_some_and(|k| k.wrapped))
    }

    /// Stores the data key, wrapped by `unlock` when autolock is on.
    pub fn save_data_key(&self, key: &DataKey, unlock: Option<&UnlockKey>) -> Result<(), SwarmError> {
        let stored = match unlock {
            Some(kek) => StoredDataKey {
                wrapped: true,
                key: STANDARD.encode(key.wrap(kek).map_err(|e| SwarmError::Internal(e.to_string()))?),
            },
            None => StoredDataKey { wrapped: false, key: STANDARD.encode(key.to_bytes()) },
        };
        write_json(&self.dir.join("dek.json"), &stored)
    }

    /// Forgets the swarm: everything under `swarm/`.
    pub fn remove(&self) -> Result<(), SwarmError> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(SwarmError::io("removing the swarm state".into(), e))
            }
            _ => Ok(()),
        }
    }

    /// Removes only the raft data (a demoted manager).
    pub fn remove_manager_data(&self) -> Result<(), SwarmError> {
        for path in [self.raft_dir(), self.dir.join("dek.json")] {
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            if let Err(e) = removed {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(SwarmError::io(format!("removing {}", path.display()), e));
                }
            }
        }
        Ok(())
    }
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, SwarmError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SwarmError::Internal(format!("{} is corrupt: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SwarmError::io(format!("reading {}", path.display()), e)),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SwarmError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| SwarmError::Internal(e.to_string()))?;
    write_file(path, &bytes)
}

/// Atomic and durable: temp file (owner-only), fsync, rename, fsync directory.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SwarmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e| SwarmError::io(format!("writing {}", path.display()), e);
    let dir = path.parent().ok_or_else(|| SwarmError::Internal("path without directory".into()))?;
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn material(tag: &str) -> TlsMaterial {
        TlsMaterial { root_pem: format!("root {tag}"), cert_pem: format!("cert {tag}"), key_pem: format!("key {tag}") }
    }

    #[test]
    fn certificate_and_key_are_replaced_together() {
        let root = tempfile::tempdir().unwrap();
        let dir = SwarmDir::new(root.path());
        dir.save_tls(&material("one")).unwrap();
        dir.save_tls(&material("two")).unwrap();
        let tls = dir.tls().unwrap();
        assert_eq!((tls.cert_pem.as_str(), tls.key_pem.as_str()), ("cert two", "key two"));

        // A crash half-way through the next renewal: a generation written but not switched
        // to (here with only its key). The node still reads a whole pair, the old one.
        let next = root.path().join("swarm/certs-3");
        std::fs::create_dir_all(&next).unwrap();
        std::fs::write(next.join("node.key"), "key three").unwrap();
        let tls = dir.tls().unwrap();
        assert_eq!((tls.cert_pem.as_str(), tls.key_pem.as_str()), ("cert two", "key two"));
        dir.save_tls(&material("four")).unwrap();
        assert_eq!(dir.tls().unwrap().key_pem, "key four");
        let left: Vec<_> =
            std::fs::read_dir(root.path().join("swarm")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.iter().filter(|n| n.to_string_lossy().starts_with("certs-")).count(), 1, "{left:?}");
    }

    #[test]
    fn a_crash_while_moving_over_leaves_the_pair_readable() {
        let root = tempfile::tempdir().unwrap();
        let dir = SwarmDir::new(root.path());
        // The old directory renamed to generation 0, the link not made yet.
        let moved = root.path().join("swarm/certs-0");
        std::fs::create_dir_all(&moved).unwrap();
        for (name, text) in [("root.crt", "root old"), ("node.crt", "cert old"), ("node.key", "key old")] {
            std::fs::write(moved.join(name), text).unwrap();
        }
        assert_eq!(dir.tls().unwrap().key_pem, "key old");
        dir.save_tls(&material("new")).unwrap();
        assert_eq!(dir.tls().unwrap().key_pem, "key new");
    }

    #[test]
    fn a_node_from_before_generations_moves_over() {
        let root = tempfile::tempdir().unwrap();
        let certs = root.path().join("swarm/certs");
        std::fs::create_dir_all(&certs).unwrap();
        for (name, text) in [("root.crt", "root old"), ("node.crt", "cert old"), ("node.key", "key old")] {
            std::fs::write(certs.join(name), text).unwrap();
        }
        let dir = SwarmDir::new(root.path());
        assert_eq!(dir.tls().unwrap().key_pem, "key old");
        dir.save_tls(&material("new")).unwrap();
        assert_eq!(dir.tls().unwrap().cert_pem, "cert new");
    }
}
