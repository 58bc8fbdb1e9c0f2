//! The snapshot encoding: a magic, the format version, then the state image in MessagePack
//! with named fields (compact, and self-describing so the API types' optional fields and
//! flattened parts read back as written). A snapshot of a format newer than this build's is
//! refused with an error naming it. Both ways run as a stream: a snapshot is never held
//! encoded in memory on its way to or from disk.

use std::io::{Read, Write};

use crate::state::{ClusterState, Image};

const MAGIC: &[u8; 8] = b"SHOALSNP";
/// The snapshot format this build writes and the newest it reads.
pub const SNAPSHOT_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not a shoal snapshot")]
    NotASnapshot,
    #[error("snapshot format {0} is newer than this shoald understands (up to {SNAPSHOT_FORMAT}): upgrade it")]
    NewerFormat(u32),
    #[error("encoding the snapshot: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding the snapshot: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `image` into `out` as it goes (no copy of the encoding in memory).
pub fn encode_into<W: Write + ?Sized>(out: &mut W, image: &Image) -> Result<(), CodecError> {
    out.write_all(MAGIC)?;
    out.write_all(&SNAPSHOT_FORMAT.to_le_bytes())?;
    rmp_serde::encode::write_named(out, image)?;
    Ok(())
}

#[cfg(test)]
pub fn encode(image: &Image) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    encode_into(&mut out, image)?;
    Ok(out)
}

/// Decodes a snapshot as it reads it.
pub fn decode_from<R: Read>(mut input: R) -> Result<ClusterState, CodecError> {
    let mut head = [0u8; MAGIC.len() + 4];
    input.read_exact(&mut head).map_err(|_| CodecError::NotASnapshot)?;
    let (magic, format) = head.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(CodecError::NotASnapshot);
    }
    let format = u32::from_le_bytes(format.try_into().expect("four bytes"));
    if format > SNAPSHOT_FORMAT {
        return Err(CodecError::NewerFormat(format));
    }
    let image: Image = rmp_serde::from_read(input)?;
    Ok(image.into())
}

/// Decodes a snapshot held in memory.
pub fn decode(bytes: &[u8]) -> Result<ClusterState, CodecError> {
    decode_from(bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use shoal_api::{
        node::{ManagerStatus, Node, NodeRole},
        task::{Task, TaskState},
    };

    use super::*;

    fn sample() -> ClusterState {
        let mut node = Node { id: "n1".into(), ..Default::default() };
        node.description.hostname = "mgr1".into();
        node.spec.role = NodeRole::Manager;
        node.spec.annotations.labels = HashMap::from([("zone".into(), "a".into())]);
        node.manager_status = Some(ManagerStatus { addr: "10.0.0.1:2377".into(), ..Default::default() });
        node.meta.version.index = 7;
        let task = Task {
            id: "t1".into(),
            service_id: "s1".into(),
            slot: 3,
            node_id: "n1".into(),
            desired_state: TaskState::Running,
            ..Default::default()
        };
        let mut state = ClusterState::default();
        state.nodes.insert(node.into());
        state.tasks.insert(task.into());
        state.removed_nodes.insert("gone".into());
        state
    }

    #[test]
    fn the_state_round_trips_with_its_indexes() {
        let state = sample();
        let bytes = encode(&Image::from(&state)).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.tasks.count(crate::Index::Slot, "s1/3"), 1, "indexes are rebuilt");
        assert_eq!(back.managers().count(), 1);
    }

    #[test]
    fn newer_or_foreign_snapshots_are_refused_by_name() {
        let mut bytes = encode(&Image::from(&sample())).unwrap();
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert!(decode(&bytes).unwrap_err().to_string().contains("format 7 is newer"));
        assert!(matches!(decode(b"{\"json\":1}"), Err(CodecError::NotASnapshot)));
    }
}
