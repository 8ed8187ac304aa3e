//! The file a part is written to, around the page cache where the system
//! allows it.
//!
//! A recording writes hundreds of megabytes per thousand steps that nobody
//! reads until training is over. Written through the page cache, every
//! byte is first copied into freshly allocated cache pages by the writer
//! thread (the kernel's `copy_folio_from_iter_atomic`), and the trace
//! pushes the training data's own pages out of the cache. On Linux a
//! [`PartFile`] of a large table is opened with `O_DIRECT`: the bytes are
//! gathered in an aligned buffer of [`BLOCK_BUFFER`] bytes and each full
//! buffer goes to the device as it is, without a copy into the cache. The
//! tail that does not fill an aligned block is written through a second,
//! ordinary handle when the file is finished ([`PartFile::finish`]), before
//! the fsync of the commit protocol, which is unchanged.
//!
//! Where direct I/O is refused — a file system without it, a device whose
//! blocks are larger than the alignment, other systems than Linux — the
//! file is an ordinary buffered one: from the open when `O_DIRECT` is
//! refused there, or from the first direct write the system refuses
//! (`EINVAL`) or takes only in part, whose rest goes through the page cache.
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Alignment of the buffer, of every direct write's length and of its file
/// offset: 4096 covers devices with 512- and 4096-byte logical blocks.
const ALIGN: usize = 4096;

/// Bytes gathered before a direct write (a multiple of [`ALIGN`]).
pub(crate) const BLOCK_BUFFER: usize = 1 << 20;

/// A part file being written, directly to the device or through the page
/// cache (module documentation).
pub(crate) struct PartFile {
    file: File,
    path: PathBuf,
    /// `Some` while writing directly: the aligned blocks being gathered.
    direct: Option<Blocks>,
}

/// An aligned buffer of [`BLOCK_BUFFER`] bytes inside `raw`, from `start`.
struct Blocks {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Blocks {
    fn new() -> Self {
        let raw = vec![0u8; BLOCK_BUFFER + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
        Self { raw, start, len: 0 }
    }

    fn filled(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl PartFile {
    /// Creates (truncates) `path`; `direct` asks for writes around the page
    /// cache (honoured on Linux where the file system allows it).
    pub(crate) fn create(path: &Path, direct: bool) -> io::Result<Self> {
        let plain = || {
            Ok(Self {
                file: File::create(path)?,
                path: path.to_owned(),
                direct: None,
            })
        };
        if !direct {
            return plain();
        }
        match open_direct(path) {
            Ok(file) => Ok(Self {
                file,
                path: path.to_owned(),
                direct: Some(Blocks::new()),
            }),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
                ) =>
            {
                plain()
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the file is still being written directly.
    #[cfg(test)]
    pub(crate) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The open file (for `sync_all` and `metadata` once finished).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Writes the bytes still gathered (the unaligned tail, through an
    /// ordinary handle, which replaces the direct one); afterwards the file
    /// holds everything written and only needs its fsync, and later writes
    /// go through the page cache.
    pub(crate) fn finish(&mut self) -> io::Result<()> {
        let Some(blocks) = self.direct.as_ref() else {
            return Ok(());
        };
        let aligned = blocks.len / ALIGN * ALIGN;
        let done = write_direct(&mut self.file, &blocks.filled()[..aligned])?;
        self.through_cache(done)
    }

    /// Writes the gathered blocks (all of them full) directly; what the
    /// device does not take goes through the page cache, for good.
    fn write_blocks(&mut self) -> io::Result<()> {
        let Some(blocks) = self.direct.as_mut() else {
            return Ok(());
        };
        let done = write_direct(&mut self.file, blocks.filled())?;
        if done == blocks.len {
            blocks.len = 0;
            return Ok(());
        }
        tracing::debug!(
            "{}: direct writes refused; writing through the page cache",
            self.path.display()
        );
        self.through_cache(done)
    }

    /// Ends direct writing: the gathered bytes from `from` on go to the end
    /// of the file through an ordinary handle, which replaces the direct one.
    fn through_cache(&mut self, from: usize) -> io::Result<()> {
        let Some(blocks) = self.direct.take() else {
            return Ok(());
        };
        let mut plain = OpenOptions::new().write(true).open(&self.path)?;
        plain.seek(SeekFrom::End(0))?;
        plain.write_all(&blocks.filled()[from..])?;
        self.file = plain;
        Ok(())
    }
}

/// Writes `data` (aligned, from an aligned offset) to a direct handle;
/// returns how much of it was written, which falls short when the system
/// refuses a direct write (`EINVAL`) or writes part of one that leaves the
/// offset unaligned: the caller writes the rest through the page cache.
fn write_direct(file: &mut File, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match file.write(&data[done..]) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => {
                done += n;
                if !done.is_multiple_of(ALIGN) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl Write for PartFile {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let Some(blocks) = self.direct.as_mut() else {
            return self.file.write(data);
        };
        let n = data.len().min(BLOCK_BUFFER - blocks.len);
        let at = blocks.start + blocks.len;
        blocks.raw[at..at + n].copy_from_slice(&data[..n]);
        blocks.len += n;
        if blocks.len == BLOCK_BUFFER {
            self.write_blocks()?;
        }
        Ok(n)
    }

    /// Full blocks are written as they fill and the tail by
    /// [`PartFile::finish`], so this flushes the page-cache path only
    /// (Parquet's writer flushes after every column chunk).
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<File> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Bytes of every length around the block size come back as written,
    /// in the temporary directory and on tmpfs where there is one.
    #[test]
    fn what_is_written_reads_back() {
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            dirs.push(shm);
        }
        for dir in &dirs {
            for (i, total) in [
                0,
                1,
                ALIGN - 1,
                ALIGN,
                BLOCK_BUFFER - 1,
                BLOCK_BUFFER,
                BLOCK_BUFFER + 1,
                3 * BLOCK_BUFFER + 12_345,
            ]
            .into_iter()
            .enumerate()
            {
                let want: Vec<u8> = (0..total).map(|j| (j * 31 + i) as u8).collect();
                let path = dir.path().join(format!("f{i}"));
                let mut f = PartFile::create(&path, true).unwrap();
                // Uneven pieces, as Parquet's writer hands them over.
                for piece in want.chunks(7919) {
                    f.write_all(piece).unwrap();
                    f.flush().unwrap();
                }
                f.finish().unwrap();
                f.file().sync_all().unwrap();
                assert_eq!(f.file().metadata().unwrap().len(), total as u64);
                assert!(std::fs::read(&path).unwrap() == want, "{total} bytes");
            }
        }
    }

    /// Writes after `finish` go on at the end, through the page cache.
    #[test]
    fn writes_after_finish_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = PartFile::create(&path, true).unwrap();
        f.write_all(&[1u8; BLOCK_BUFFER + 5]).unwrap();
        f.finish().unwrap();
        assert!(!f.is_direct());
        f.write_all(&[2u8; 3]).unwrap();
        f.flush().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), BLOCK_BUFFER + 8);
        assert_eq!(&got[BLOCK_BUFFER + 4..], &[1, 2, 2, 2]);
    }
}
