//! The snapshot encoding: a magic, the format version, then the state image in MessagePack
//! with named fields (compact, and self-describing so the API types' optional fields and
//! flattened parts read back as written). A snapshot of a format newer than this build's is
//! refused with an error naming it.

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
}

pub fn encode(image: &Image) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(64 << 10);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    rmp_serde::encode::write_named(&mut out, image)?;
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> Result<ClusterState, CodecError> {
    let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or(CodecError::NotASnapshot)?;
    let (format, body) = rest.split_first_chunk::<4>().ok_or(CodecError::NotASnapshot)?;
    let format = u32::from_le_bytes(*format);
    if format > SNAPSHOT_FORMAT {
        return Err(CodecError::NewerFormat(format));
    }
    let image: Image = rmp_serde::from_slice(body)?;
    Ok(image.into())
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
