//! Files that hold secrets: created 0600, written atomically, checked before they are read.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::Error;

/// Creates `path` with mode 0600, failing if it exists.
pub(crate) fn create_private(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| Error::io(path, source))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// a private temporary file beside it, fsync, rename, fsync of the directory.
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    replace_together(&[Replacement {
        path,
        bytes,
        private: true,
    }])
}

/// One file of [`replace_together`].
#[derive(Clone, Copy)]
pub struct Replacement<'a> {
    /// The file to replace (or create).
    pub path: &'a Path,
    /// Its new contents; never shown by `Debug`, they may be a private key.
    pub bytes: &'a [u8],
    /// Created 0600 (a private key), otherwise 0644.
    pub private: bool,
}

impl std::fmt::Debug for Replacement<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replacement")
            .field("path", &self.path)
            .field("bytes", &format_args!("[{} bytes]", self.bytes.len()))
            .field("private", &self.private)
            .finish()
    }
}

/// Replaces files that only make sense together (a certificate and its private key), so
/// that a failure leaves all of the old ones: each new content is written and synced to a
/// temporary sibling first, and only when every one is written are they renamed into
/// place and the directory synced. A crash between two renames is the only way to mix old
/// and new; a failed write (full disk, file-size limit) changes nothing and leaves no
/// temporary file behind.
pub fn replace_together(files: &[Replacement<'_>]) -> Result<(), Error> {
    let temps: Vec<PathBuf> = files.iter().map(|f| temp_sibling(f.path)).collect();
    let written = files.iter().zip(&temps).try_for_each(|(f, tmp)| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if f.private { 0o600 } else { 0o644 })
            .open(tmp)
            .map_err(|source| Error::io(tmp, source))?;
        file.write_all(f.bytes)
            .and_then(|()| file.sync_all())
            .map_err(|source| Error::io(tmp, source))
    });
    let renamed = written.and_then(|()| {
        files
            .iter()
            .zip(&temps)
            .try_for_each(|(f, tmp)| fs::rename(tmp, f.path).map_err(|source| Error::io(f.path, source)))
    });
    if renamed.is_err() {
        for tmp in &temps {
            let _ = fs::remove_file(tmp);
        }
    }
    renamed?;
    files.iter().try_for_each(|f| sync_parent(f.path))
}

/// Writes a new private file that must not exist yet, durably.
pub fn write_private_new(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = create_private(path)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| Error::io(path, source));
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written?;
    sync_parent(path)
}

/// Refuses a secret-bearing file that its group or others can read or write, as ssh does
/// with private keys: the secret may already have leaked, and the operator should know.
pub fn check_private(path: &Path) -> Result<(), Error> {
    let meta = fs::metadata(path).map_err(|source| Error::io(path, source))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecurePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn temp_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

fn sync_parent(path: &Path) -> Result<(), Error> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| Error::io(parent, source))
}
