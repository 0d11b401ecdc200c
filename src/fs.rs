//! Files: the one capped reader of user files, the one atomic writer, the
//! run-folder lock, and the size caps.
//!
//! Every file a user hands us (checkpoints, model specs and graph files, run configs, a run's
//! `config.toml` and `metrics.jsonl`, JSON beside runs, IDX data) is read
//! through [`read_capped`]: only regular files (a FIFO, `/dev/zero`, a
//! directory or a socket is refused without reading), and never more than a
//! cap, counted while reading (not trusted from the file's metadata). Every
//! file we save goes through [`write_atomic`]: a temporary file created
//! exclusively (`O_CREAT|O_EXCL`, so a planted symlink is never followed) under
//! an unpredictable name, flushed, then renamed over the destination.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::error::{fail, ReadError, Result};

/// Default largest checkpoint accepted (a bound against hostile files;
/// `$PRELU_MAX_FILE_BYTES` overrides it).
pub const MAX_CHECKPOINT_BYTES: u64 = 4 << 30;
/// Default largest text file accepted: model specs, run configs, JSON beside
/// a run (`$PRELU_MAX_FILE_BYTES` overrides it).
pub const MAX_TEXT_BYTES: u64 = 16 << 20;
/// Default largest `metrics.jsonl` accepted (`$PRELU_MAX_FILE_BYTES` overrides it).
pub const MAX_METRICS_BYTES: u64 = 512 << 20;

/// The memory cap for one user file, in bytes: `$PRELU_MAX_FILE_BYTES` if set
/// (and a positive integer), else `default`. Declared sizes above it are
/// refused before anything is allocated.
pub fn file_cap(default: u64) -> u64 {
    std::env::var("PRELU_MAX_FILE_BYTES")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

fn kind_name(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_char_device() {
            return "character device";
        }
        if t.is_block_device() {
            return "block device";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens a user file for reading, only if it is a regular file (checked on
/// the opened descriptor, so it cannot be swapped in between). A FIFO is
/// opened non-blocking, so it cannot hang the open. A dangling symlink is an
/// error of its own, never "not found".
pub fn open_regular(path: &Path) -> std::result::Result<(File, u64), ReadError> {
    let p = || path.display().to_string();
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        oo.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let f = match oo.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok() {
                return Err(ReadError::Dangling { path: p() });
            }
            return Err(ReadError::Io { path: p(), source: e });
        }
        Err(e) => return Err(ReadError::Io { path: p(), source: e }),
    };
    let meta = f.metadata().map_err(|e| ReadError::Io { path: p(), source: e })?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular {
            path: p(),
            kind: kind_name(&meta.file_type()),
        });
    }
    Ok((f, meta.len()))
}

/// Reads a whole user file: a regular file only, at most `cap` bytes (counted
/// while reading; the size in the metadata is only used to refuse early).
pub fn read_capped(path: &Path, cap: u64) -> std::result::Result<Vec<u8>, ReadError> {
    let (f, len) = open_regular(path)?;
    let too_large = || ReadError::TooLarge {
        path: path.display().to_string(),
        cap,
    };
    if len > cap {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(cap.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|e| ReadError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
    if buf.len() as u64 > cap {
        return Err(too_large());
    }
    Ok(buf)
}

/// [`read_capped`] for UTF-8 text, with `$PRELU_MAX_FILE_BYTES` or
/// [`MAX_TEXT_BYTES`] as the cap.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = read_capped(path, crate::fs::file_cap(MAX_TEXT_BYTES)).map_err(anyhow::Error::from)?;
    text_of(path, bytes)
}

fn text_of(path: &Path, bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes).map_err(|_| crate::error::Error::Invalid(format!("{}: not UTF-8 text", path.display())))
}

/// [`read_text`], with `None` when nothing is at the path (a dangling or
/// looping link is an error, not "missing").
pub fn read_text_optional(path: &Path) -> Result<Option<String>> {
    match read_capped(path, crate::fs::file_cap(MAX_TEXT_BYTES)) {
        Ok(b) => text_of(path, b).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).into()),
    }
}

/// True when something (a file, a directory, a link, even a dangling one) is
/// at `path`.
pub fn something_at(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Marks our temporary files: `.NAME.tmp-PID-RANDOM`.
const TMP_MARK: &str = ".tmp-";

/// Creates a fresh temporary file beside `path`, exclusively (`O_CREAT|O_EXCL`:
/// an existing file or a planted symlink at that name makes the create fail,
/// and a new random name is tried), under an unpredictable name.
fn create_temp_beside(path: &Path) -> anyhow::Result<(File, PathBuf)> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file path", path.display()))?;
    let mut last = None;
    for _ in 0..16 {
        let tmp = dir.join(format!(
            ".{}{TMP_MARK}{}-{:016x}",
            name.to_string_lossy(),
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut oo = std::fs::OpenOptions::new();
        oo.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            oo.mode(0o644).custom_flags(libc::O_NOFOLLOW);
        }
        match oo.open(&tmp) {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", tmp.display())),
        }
    }
    Err(last.expect("set in the loop"))
        .with_context(|| format!("cannot create a temporary file beside {}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder
/// (created exclusively under an unpredictable name), flushed to disk, then
/// renamed over `path` (a symlink at `path` is replaced, not followed). On any
/// error `path` keeps its previous content and the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(Into::into))
}

/// [`write_atomic`] with a writer callback, for output produced in pieces.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut File) -> anyhow::Result<()>) -> Result<()> {
    let (mut f, tmp) = create_temp_beside(path)?;
    let result = (|| -> Result<()> {
        fill(&mut f).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("cannot flush {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files a killed process left in `dir` (names
/// `.NAME.tmp-...`; links are removed, never followed). Call it only while
/// holding the folder's [`RunLock`]. Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.contains(TMP_MARK)) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if meta.is_file() || meta.file_type().is_symlink() {
            std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether a directory entry name is ours and not part of a run's content
/// (the lock file, temporary files).
pub fn is_housekeeping(name: &str) -> bool {
    name == LOCK_NAME || (name.starts_with('.') && name.contains(TMP_MARK))
}

/// Name of the lock file in a run folder.
pub const LOCK_NAME: &str = ".lock";

/// An exclusive advisory lock (`flock`) on a run folder, held as long as this
/// value lives; the OS releases it when the process dies, however it dies.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
    path: PathBuf,
}

impl RunLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Locks the run folder `dir` (which must exist) for this process; a second
/// locker, in this process or another, gets a clear error at once.
pub fn lock_run_dir(dir: &Path) -> Result<RunLock> {
    let path = dir.join(LOCK_NAME);
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Never follow a planted link; the descriptor is not inherited.
        oo.mode(0o644).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    }
    let file = oo
        .open(&path)
        .with_context(|| format!("cannot open the run-folder lock {}", path.display()))?;
    if !file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?
        .is_file()
    {
        fail!("{}: the run-folder lock is not a regular file", path.display());
    }
    flock_or_refuse(&file, dir, &path)?;
    Ok(RunLock { _file: file, path })
}

/// Takes the exclusive lock on `file` (the lock of run folder `dir`), or
/// refuses at once when another process holds it.
fn flock_or_refuse(file: &File, dir: &Path, path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                fail!(
                    "run folder {} is in use by another prelu process (it holds {}); wait for it to finish or choose another folder",
                    dir.display(),
                    path.display()
                );
            }
            return Err(e)
                .with_context(|| format!("cannot lock {}", path.display()))
                .map_err(Into::into);
        }
    }
    Ok(())
}

/// Refuses at once when another process holds the lock of run folder `dir`
/// (without creating the lock file): so a folder in use is reported as in
/// use, not as a folder that holds a run.
pub fn refuse_if_locked(dir: &Path) -> Result<()> {
    let path = dir.join(LOCK_NAME);
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        oo.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK);
    }
    match oo.open(&path) {
        Ok(file) if file.metadata().is_ok_and(|m| m.is_file()) => flock_or_refuse(&file, dir, &path),
        _ => Ok(()),
    }
}

/// Refuses to write `out` when it names a file that a run or study folder
/// owns (its config, metrics, checkpoint, study result or lock) in a folder
/// that holds a run or a study: no command's output replaces a run's own
/// files, whether the run is finished or still training.
pub fn refuse_run_file(out: &Path) -> Result<()> {
    use crate::layout::{CHECKPOINT, CONFIG, METRICS, RUN_FILES, STUDY};
    let Some(name) = out.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    let owned = RUN_FILES.contains(&name) || name == LOCK_NAME || name.starts_with(TMP_MARK);
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let is_run = [CONFIG, METRICS, CHECKPOINT, STUDY, LOCK_NAME]
        .iter()
        .any(|f| std::fs::symlink_metadata(parent.join(f)).is_ok());
    if owned && is_run {
        fail!(
            "{} is a file of the run or study in {}; refusing to write over it, choose another output path",
            out.display(),
            parent.display()
        );
    }
    Ok(())
}

/// Refuses to write `out` when it is the same file as `input` (a command must
/// never overwrite the checkpoint it reads).
pub fn refuse_same_file(input: &Path, out: &Path) -> Result<()> {
    let input = if input.is_dir() {
        input.join(crate::layout::CHECKPOINT)
    } else {
        input.to_path_buf()
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(a), Ok(b)) = (std::fs::metadata(&input), std::fs::metadata(out)) {
            if a.dev() == b.dev() && a.ino() == b.ino() {
                fail!(
                    "{} is the checkpoint being read ({}); refusing to overwrite it, choose another output path",
                    out.display(),
                    input.display()
                );
            }
        }
    }
    if let (Ok(a), Some(parent), Some(name)) = (input.canonicalize(), out.parent(), out.file_name()) {
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        if parent.canonicalize().map(|p| p.join(name)).is_ok_and(|b| b == a) {
            fail!(
                "{} is the checkpoint being read; refusing to overwrite it, choose another output path",
                out.display()
            );
        }
    }
    Ok(())
}
