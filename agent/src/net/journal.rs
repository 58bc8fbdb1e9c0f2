//! The applied desired state on disk: a snapshot (the whole spec and its sequence number) and
//! a journal of the change batches applied since, each synced before it is acknowledged.
//!
//! At start the snapshot plus the journal give back the last acknowledged state and its
//! sequence, so the source resends only what came after. A torn last line (a crash mid-write)
//! was never acknowledged and is ignored.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use shoal_api::dataplane::{ChangeBatch, DataplaneSpec};
use tracing::warn;

/// A journal this long is folded into a new snapshot (a snapshot of 10,000 services is
/// ~3 MiB; batches are a few hundred bytes).
const COMPACT_AT: u64 = 16 << 20;

/// The snapshot file: the state at `sequence`. Files of earlier versions hold a bare
/// `DataplaneSpec` and read as sequence 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Snapshot {
    pub sequence: u64,
    pub spec: DataplaneSpec,
}

/// What was saved: the snapshot and the batches applied after it, in order.
#[derive(Debug, Default)]
pub struct Saved {
    pub snapshot: Snapshot,
    pub batches: Vec<ChangeBatch>,
}

pub struct Journal {
    snapshot: PathBuf,
    file: File,
    bytes: u64,
    /// A failed append could not be cut off: nothing more is appended until a snapshot.
    poisoned: bool,
    /// Setting aside failed half-way: `file` is not the journal, nothing is written.
    lost: bool,
}

impl Journal {
    /// Opens the journal beside `snapshot` (`<snapshot>.journal`) and reads what was saved.
    pub fn open(snapshot: &Path) -> std::io::Result<(Journal, Option<Saved>)> {
        let path = snapshot.with_extension("journal");
        let (saved, valid) = read(snapshot, &path)?;
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        // A torn tail goes, or the next line would be glued to it.
        if file.metadata()?.len() > valid {
            file.set_len(valid)?;
        }
        let bytes = valid;
        let journal = Journal { snapshot: snapshot.to_owned(), file, bytes, poisoned: false, lost: false };
        Ok((journal, saved))
    }

    /// Appends `batch` (its sequence set) and syncs it to disk.
    pub fn append(&mut self, batch: &ChangeBatch) -> std::io::Result<()> {
        if self.lost {
            return Err(std::io::Error::other("the journal could not be opened again"));
        }
        if self.poisoned {
            return Err(std::io::Error::other("the journal needs a snapshot first"));
        }
        let mut line = serde_json::to_vec(batch)?;
        line.push(b'\n');
        let written = self.file.write_all(&line).and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.bytes += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut a partial line off, or the next one would be glued to it and lost; and
                // make the cut durable, or a crash could bring back a batch reported failed.
                if self.file.set_len(self.bytes).and_then(|()| self.file.sync_all()).is_err() {
                    self.poisoned = true;
                }
                Err(e)
            }
        }
    }

    /// Renames the snapshot and the journal to `*.unrestorable` (what a start could not
    /// restore, kept for a look) and starts an empty journal.
    pub fn set_aside(&mut self) -> std::io::Result<()> {
        let path = self.snapshot.with_extension("journal");
        for file in [&self.snapshot, &path] {
            let aside = PathBuf::from(format!("{}.unrestorable", file.display()));
            match std::fs::rename(file, &aside) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        // Until the new journal is open, nothing may be written: `file` is the one set aside.
        self.lost = true;
        self.file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.lost = false;
        self.bytes = 0;
        self.poisoned = false;
        Ok(())
    }

    /// True when the next write should be a snapshot.
    pub fn wants_snapshot(&self) -> bool {
        self.poisoned || self.bytes >= COMPACT_AT
    }

    /// Saves the whole state at `sequence` and empties the journal. A crash between the two
    /// leaves batches the snapshot holds already; reading skips them by sequence.
    pub fn snapshot(&mut self, snapshot: &Snapshot) -> std::io::Result<()> {
        if self.lost {
            return Err(std::io::Error::other("the journal could not be opened again"));
        }
        crate::daemon::save_json(&self.snapshot, snapshot)?;
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.bytes = 0;
        self.poisoned = false;
        Ok(())
    }
}

/// What was saved, and how many bytes of the journal are whole lines.
fn read(snapshot: &Path, journal: &Path) -> std::io::Result<(Option<Saved>, u64)> {
    let snapshot = match std::fs::read(snapshot) {
        Ok(bytes) => match serde_json::from_slice::<Snapshot>(&bytes) {
            Ok(snapshot) => Some(snapshot),
            Err(_) => Some(Snapshot {
                sequence: 0,
                spec: serde_json::from_slice(&bytes)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut batches = Vec::new();
    let mut valid = 0u64;
    let bytes = match std::fs::read(journal) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut rest = &bytes[..];
    let mut last = 0u64;
    while !rest.is_empty() {
        // The last line may be torn (a crash mid-write: never acknowledged, even if a page
        // with its newline reached the disk before an earlier one); a line before it that
        // does not read is damage, or a newer version's, and said so.
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            warn!(bytes = rest.len(), "ignoring a torn last journal line");
            break;
        };
        let batch = match serde_json::from_slice::<ChangeBatch>(&rest[..end]) {
            Ok(batch) => batch,
            Err(e) if end + 1 == rest.len() => {
                warn!(error = %e, "ignoring a torn last journal line");
                break;
            }
            Err(e) => {
                let message = format!("journal at byte {valid}: {e}");
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, message));
            }
        };
        let sequence = batch.sequence.unwrap_or(0);
        if sequence <= last {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("journal at byte {valid}: batch {sequence} after batch {last}"),
            ));
        }
        last = sequence;
        batches.push(batch);
        valid += end as u64 + 1;
        rest = &rest[end + 1..];
    }
    if snapshot.is_none() && batches.is_empty() {
        return Ok((None, valid));
    }
    let snapshot = snapshot.unwrap_or_default();
    batches.retain(|b| b.sequence.is_some_and(|s| s > snapshot.sequence));
    Ok((Some(Saved { snapshot, batches }), valid))
}

#[cfg(test)]
mod tests {
    use shoal_api::dataplane::{Change, OverlayNetwork};

    use super::*;

    fn batch(sequence: u64, name: &str) -> ChangeBatch {
        let net = OverlayNetwork::new(name, 4097, "10.78.0.0/24".parse().unwrap());
        ChangeBatch { sequence: Some(sequence), changes: vec![Change::AddNetwork(net)] }
    }

    #[test]
    fn batches_after_the_snapshot_come_back_and_a_torn_tail_is_ignored() {
        let dir = std::env::temp_dir().join(format!("shoal-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("dataplane.json");
        let (mut journal, saved) = Journal::open(&file).unwrap();
        assert!(saved.is_none());
        journal.append(&batch(1, "a")).unwrap();
        journal.snapshot(&Snapshot { sequence: 1, spec: DataplaneSpec::default() }).unwrap();
        journal.append(&batch(2, "b")).unwrap();
        journal.append(&batch(3, "c")).unwrap();
        drop(journal);
        let mut raw = OpenOptions::new().append(true).open(dir.join("dataplane.journal")).unwrap();
        raw.write_all(b"{\"Sequence\":4,\"Chan").unwrap();

        let (mut journal, saved) = Journal::open(&file).unwrap();
        let saved = saved.unwrap();
        assert_eq!(saved.snapshot.sequence, 1);
        assert_eq!(saved.batches.iter().map(|b| b.sequence).collect::<Vec<_>>(), [Some(2), Some(3)]);
        // The torn tail was cut off: the next batch reads back whole.
        journal.append(&batch(4, "d")).unwrap();
        drop(journal);
        let (_, saved) = Journal::open(&file).unwrap();
        assert_eq!(saved.unwrap().batches.len(), 3);

        // A line that does not read before the last is damage, not a torn tail (the last one
        // is torn, whole or not); so is a batch that does not come after the one before.
        let journal_file = dir.join("dataplane.journal");
        let good = std::fs::read(&journal_file).unwrap();
        let garbled = b"{\"Sequence\":9,\"Changes\":[{\"Op\":\"Reboot\"}]}\n";
        let mut torn = good.clone();
        torn.extend_from_slice(garbled);
        std::fs::write(&journal_file, &torn).unwrap();
        assert_eq!(Journal::open(&file).unwrap().1.unwrap().batches.len(), 3, "a garbled last line is torn");
        let mut damaged = good.clone();
        damaged.extend_from_slice(garbled);
        damaged.extend_from_slice(&serde_json::to_vec(&batch(10, "f")).unwrap());
        damaged.push(b'\n');
        std::fs::write(&journal_file, &damaged).unwrap();
        assert_eq!(Journal::open(&file).err().map(|e| e.kind()), Some(std::io::ErrorKind::InvalidData));
        let mut backwards = good.clone();
        backwards.extend_from_slice(&serde_json::to_vec(&batch(3, "e")).unwrap());
        backwards.push(b'\n');
        std::fs::write(&journal_file, &backwards).unwrap();
        assert_eq!(Journal::open(&file).err().map(|e| e.kind()), Some(std::io::ErrorKind::InvalidData));
        std::fs::write(&journal_file, &good).unwrap();

        // A bare spec, as earlier versions saved it, reads as sequence 0.
        std::fs::write(&file, b"{\"Networks\":[]}").unwrap();
        std::fs::remove_file(dir.join("dataplane.journal")).unwrap();
        let (_, saved) = Journal::open(&file).unwrap();
        assert_eq!(saved.unwrap().snapshot.sequence, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
