//! The snapshot's bytes on disk: a stream of chunks, each sealed with the node's data key.
//!
//! Building a snapshot encodes the state straight into this stream and reading one decodes
//! straight out of it, so neither holds the encoded state (let alone a sealed copy of it)
//! in memory. Each chunk is sealed bound to the file's ID (kept in the sealed record that
//! names the file), its position and whether it is the last, so a chunk moved, dropped,
//! repeated or taken from another snapshot, a whole older file copied over this one, or a
//! file cut short, fails to open instead of decoding into a different state.
//!
//! A frame is `[last: u8][sealed length: u32 LE][sealed chunk]`.

use std::io::{self, Read, Write};

use shoal_ca::DataKey;

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 1 << 20;
/// What sealing adds to a chunk (nonce and tag).
const SEAL_OVERHEAD: usize = 12 + 16;

/// What a chunk is sealed bound to.
fn context(file_id: &str, index: u64, last: bool) -> Vec<u8> {
    let mut context = Vec::with_capacity(file_id.len() + 9);
    context.extend_from_slice(file_id.as_bytes());
    context.extend_from_slice(&index.to_le_bytes());
    context.push(last as u8);
    context
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Seals what is written to it chunk by chunk into `out`; `finish` seals the last chunk.
pub struct ChunkWriter<'k, W: Write> {
    out: W,
    key: &'k DataKey,
    file_id: &'k str,
    buf: Vec<u8>,
    index: u64,
}

impl<'k, W: Write> ChunkWriter<'k, W> {
    /// `file_id` must be unique to this file: its reader must be given the same.
    pub fn new(out: W, key: &'k DataKey, file_id: &'k str) -> Self {
        ChunkWriter { out, key, file_id, buf: Vec::with_capacity(CHUNK), index: 0 }
    }

    fn emit(&mut self, last: bool) -> io::Result<()> {
        let context = context(self.file_id, self.index, last);
        let sealed = self.key.seal_bound(&self.buf, &context).map_err(io::Error::other)?;
        self.out.write_all(&[last as u8])?;
        self.out.write_all(&(sealed.len() as u32).to_le_bytes())?;
        self.out.write_all(&sealed)?;
        self.buf.clear();
        self.index += 1;
        Ok(())
    }

    /// Seals what is left as the last chunk (possibly empty) and returns the output, flushed.
    pub fn finish(mut self) -> io::Result<W> {
        self.emit(true)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> Write for ChunkWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // A full chunk is sealed only when more data comes: until then it may be the last.
        if self.buf.len() == CHUNK {
            self.emit(false)?;
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    /// Nothing to do: chunks are written as they fill, and `finish` writes the last.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens what a `ChunkWriter` wrote, chunk by chunk, as one stream of plaintext.
pub struct ChunkReader<'k, R: Read> {
    input: R,
    key: &'k DataKey,
    file_id: &'k str,
    buf: Vec<u8>,
    pos: usize,
    index: u64,
    done: bool,
}

impl<'k, R: Read> ChunkReader<'k, R> {
    pub fn new(input: R, key: &'k DataKey, file_id: &'k str) -> Self {
        ChunkReader { input, key, file_id, buf: Vec::new(), pos: 0, index: 0, done: false }
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let cut_short = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => invalid("the snapshot file is cut short".into()),
            _ => e,
        };
        let mut head = [0u8; 5];
        self.input.read_exact(&mut head).map_err(cut_short)?;
        let last = match head[0] {
            0 => false,
            1 => true,
            other => return Err(invalid(format!("snapshot chunk {} has a bad marker {other}", self.index))),
        };
        let len = u32::from_le_bytes(head[1..].try_into().expect("four bytes")) as usize;
        if len > CHUNK + SEAL_OVERHEAD {
            return Err(invalid(format!("snapshot chunk {} claims {len} bytes", self.index)));
        }
        let mut sealed = vec![0; len];
        self.input.read_exact(&mut sealed).map_err(cut_short)?;
        self.buf = self.key.open_bound(&sealed, &context(self.file_id, self.index, last)).map_err(|_| {
            invalid(format!(
                "snapshot chunk {} does not open with this node's data key: damaged or out of place",
                self.index
            ))
        })?;
        self.pos = 0;
        self.index += 1;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for ChunkReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(data: &[u8], key: &DataKey) -> Vec<u8> {
        let mut writer = ChunkWriter::new(Vec::new(), key, "f1");
        writer.write_all(data).unwrap();
        writer.finish().unwrap()
    }

    fn opened(file: &[u8], key: &DataKey) -> io::Result<Vec<u8>> {
        opened_as(file, key, "f1")
    }

    fn opened_as(file: &[u8], key: &DataKey, file_id: &str) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ChunkReader::new(file, key, file_id).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Offsets of each frame in a sealed file.
    fn frames(file: &[u8]) -> Vec<std::ops::Range<usize>> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < file.len() {
            let len = u32::from_le_bytes(file[at + 1..at + 5].try_into().unwrap()) as usize;
            out.push(at..at + 5 + len);
            at += 5 + len;
        }
        out
    }

    #[test]
    fn round_trips_across_chunk_boundaries() {
        let key = DataKey::generate().unwrap();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let file = sealed(&data, &key);
            assert_eq!(frames(&file).len(), len.div_ceil(CHUNK).max(1));
            assert_eq!(opened(&file, &key).unwrap(), data, "{len} bytes");
        }
    }

    #[test]
    fn a_cut_reordered_or_foreign_file_is_refused() {
        let key = DataKey::generate().unwrap();
        let data: Vec<u8> = (0..2 * CHUNK + 5).map(|i| (i % 7) as u8).collect();
        let file = sealed(&data, &key);
        let frames = frames(&file);
        assert_eq!(frames.len(), 3);

        // Cut at a frame boundary: the last chunk is missing.
        let cut = &file[..frames[2].start];
        assert!(opened(cut, &key).unwrap_err().to_string().contains("cut short"));
        // Cut inside a frame.
        assert!(opened(&file[..file.len() - 3], &key).is_err());
        // Two chunks swapped.
        let swapped = [&file[frames[1].clone()], &file[frames[0].clone()], &file[frames[2].clone()]].concat();
        assert!(opened(&swapped, &key).unwrap_err().to_string().contains("out of place"));
        // A non-last chunk marked last, so that the file would end early.
        let mut early = file[..frames[1].start].to_vec();
        early[0] = 1;
        assert!(opened(&early, &key).is_err());
        // Another node's key.
        assert!(opened(&file, &DataKey::generate().unwrap()).is_err());
        // Another file's: a whole file copied over this one, or a chunk spliced in from it.
        assert!(opened_as(&file, &key, "f2").unwrap_err().to_string().contains("out of place"));
        let mut other = ChunkWriter::new(Vec::new(), &key, "f2");
        other.write_all(&data).unwrap();
        let other = other.finish().unwrap();
        let spliced = [&other[frames[0].clone()], &file[frames[1].clone()], &file[frames[2].clone()]].concat();
        assert!(opened(&spliced, &key).is_err());
        // A length claiming more than a chunk can hold.
        let mut huge = file.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(opened(&huge, &key).unwrap_err().to_string().contains("claims"));
    }
}
