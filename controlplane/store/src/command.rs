//! What a raft entry carries: a `Command`, stamped with its proposer's clock and the format
//! it was written in. Its body is a transaction — a batch of mutations over any kinds,
//! validated and applied all or nothing (placing a thousand tasks is one entry, one fsync) —
//! or the whole state restored by `swarm init --force-new-cluster`.
//!
//! A replica that meets a format newer than it knows keeps the entry as it came (so its log
//! still matches the leader's byte for byte) and refuses to apply it, naming the format,
//! instead of guessing at its meaning.

use serde::{de::Error as _, Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    objects::{Kind, Object},
    state::{ClusterState, CommandError},
};

/// The command format this build writes and the newest it can apply. Bump it whenever a
/// `Body` or `Mutation` variant is added or changes meaning.
pub const FORMAT: u32 = 1;

/// Mutations one transaction may carry (a larger change is split by its writer).
pub const MAX_BATCH: usize = 5000;
/// The most a transaction may weigh in the log (JSON), so that every entry fits in one raft
/// message (`network::MAX_MESSAGE`) with room to spare.
pub const MAX_ENTRY_BYTES: usize = crate::network::MAX_MESSAGE / 4;

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub format: u32,
    /// RFC 3339 time of the proposal (replicas never read their own clocks while applying).
    pub at: String,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// One transaction.
    Batch(Vec<Mutation>),
    /// The first entry of a cluster re-created from a surviving manager's state
    /// (`swarm init --force-new-cluster`): everything as it was.
    Restore(Box<ClusterState>),
    /// A body of a format newer than `FORMAT`, kept verbatim; never applied.
    #[serde(skip)]
    Unsupported(serde_json::Value),
}

/// One change in a transaction. `version` is the object's version the writer read: the
/// mutation is refused (`update out of sequence`) if the object has changed since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Mutation {
    Create(Object),
    Update { object: Object, version: u64 },
    Delete { kind: Kind, id: String, version: Option<u64> },
}

impl Command {
    pub fn batch(at: String, mutations: Vec<Mutation>) -> Self {
        Command { format: FORMAT, at, body: Body::Batch(mutations) }
    }

    pub fn restore(at: String, state: ClusterState) -> Self {
        Command { format: FORMAT, at, body: Body::Restore(Box::new(state)) }
    }

    /// Whether the leader may put this command in the log. Checked where the entry is
    /// proposed, also for commands forwarded by other managers: an entry of a format this
    /// build cannot apply would, once committed, stop every replica that cannot either
    /// (a newer follower's write forwarded to an older leader during an upgrade).
    pub fn admissible(&self) -> Result<(), CommandError> {
        if self.format != FORMAT || matches!(self.body, Body::Unsupported(_)) {
            return Err(CommandError::UnsupportedFormat(self.format));
        }
        let Body::Batch(mutations) = &self.body else { return Ok(()) };
        if mutations.len() > MAX_BATCH {
            return Err(CommandError::Invalid(format!(
                "a transaction may change at most {MAX_BATCH} objects ({} asked)",
                mutations.len()
            )));
        }
        // Small transactions cannot come near the bound; weigh only the big ones.
        if mutations.len() > 64 {
            let mut weight = Weight(0);
            serde_json::to_writer(&mut weight, self).map_err(|e| CommandError::Invalid(e.to_string()))?;
            if weight.0 > MAX_ENTRY_BYTES {
                return Err(CommandError::Invalid(format!(
                    "a transaction may weigh at most {MAX_ENTRY_BYTES} bytes ({} asked): split it",
                    weight.0
                )));
            }
        }
        Ok(())
    }
}

/// Counts the bytes written to it.
struct Weight(usize);

impl std::io::Write for Weight {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A transaction under construction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch(pub Vec<Mutation>);

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }

    pub fn create(mut self, object: impl Into<Object>) -> Self {
        self.0.push(Mutation::Create(object.into()));
        self
    }

    /// Replaces the object with `object`'s ID if its version is still `version`.
    pub fn update(mut self, object: impl Into<Object>, version: u64) -> Self {
        self.0.push(Mutation::Update { object: object.into(), version });
        self
    }

    /// Deletes the object if it is still at `version` (any version when `None`).
    pub fn delete(mut self, kind: Kind, id: impl Into<String>, version: Option<u64>) -> Self {
        self.0.push(Mutation::Delete { kind, id: id.into(), version });
        self
    }

    pub fn push(&mut self, mutation: Mutation) {
        self.0.push(mutation);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Serialize)]
struct WireOut<'a, B> {
    format: u32,
    at: &'a str,
    body: B,
}

#[derive(Deserialize)]
struct WireIn {
    format: u32,
    at: String,
    body: serde_json::Value,
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.body {
            Body::Unsupported(raw) => WireOut { format: self.format, at: &self.at, body: raw }.serialize(s),
            body => WireOut { format: self.format, at: &self.at, body }.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = WireIn::deserialize(d)?;
        let body = if wire.format > FORMAT {
            Body::Unsupported(wire.body)
        } else {
            // A known format that does not decode is damage, not a newer writer.
            Body::deserialize(wire.body).map_err(D::Error::custom)?
        };
        Ok(Command { format: wire.format, at: wire.at, body })
    }
}

#[cfg(test)]
mod tests {
    use shoal_api::node::Node;

    use super::*;

    #[test]
    fn a_newer_format_is_kept_verbatim_and_marked_unsupported() {
        let newer = r#"{"format":99,"at":"2026-12-01T00:00:00Z","body":{"Teleport":{"to":"mars"}}}"#;
        let command: Command = serde_json::from_str(newer).unwrap();
        assert_eq!(command.format, 99);
        assert!(matches!(command.body, Body::Unsupported(_)));
        // Written back unchanged: the log stays identical to the leader's.
        let again: serde_json::Value = serde_json::to_value(&command).unwrap();
        assert_eq!(again, serde_json::from_str::<serde_json::Value>(newer).unwrap());
    }

    #[test]
    fn known_formats_round_trip_and_damage_is_an_error() {
        let command = Command::batch("t".into(), Batch::new().create(Node { id: "n1".into(), ..Default::default() }).0);
        let text = serde_json::to_string(&command).unwrap();
        assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), command);
        let damaged = r#"{"format":1,"at":"t","body":{"Teleport":{}}}"#;
        assert!(serde_json::from_str::<Command>(damaged).is_err());
    }
}
