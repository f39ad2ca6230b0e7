//! `ssoctl rewrap`: re-seal envelope files under the current primary key.
//!
//! Each file is replaced atomically (a sibling temporary file, fsync, rename, fsync of
//! the directory), so a crash or SIGKILL leaves every file either as it was or fully
//! rewrapped. Files already under the primary are skipped, which is what makes a rerun
//! resume where a killed run stopped; temporary files a killed run left behind are
//! removed first.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sso_proto::EnvelopeRef;

use crate::cli::Global;
use crate::{EX_DATAERR, EX_NOINPUT, EX_SOFTWARE, EX_USAGE, Failure};

const TMP_SUFFIX: &str = ".rewrap-tmp";

/// What a rewrap run did.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub rewrapped: usize,
    pub current: usize,
    pub not_envelopes: usize,
    pub failed: Vec<String>,
    pub stale_tmp_removed: usize,
}

fn collect(path: &Path, out: &mut Vec<PathBuf>, tally: &mut Tally) -> Result<(), Failure> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Failure::new(EX_NOINPUT, format!("{}: {e}", path.display()), "check the path"))?;
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| Failure::new(EX_NOINPUT, format!("{}: {e}", path.display()), "check the permissions"))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            collect(&e, out, tally)?;
        }
    } else if meta.is_file() {
        if path.to_string_lossy().ends_with(TMP_SUFFIX) {
            // Left by a killed run: the original beside it is intact.
            let _ = std::fs::remove_file(path);
            tally.stale_tmp_removed += 1;
        } else {
            out.push(path.to_path_buf());
        }
    }
    Ok(())
}

fn replace_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(TMP_SUFFIX);
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

struct Progress {
    total: usize,
    tty: bool,
    last: Instant,
}

impl Progress {
    fn show(&mut self, done: usize) {
        if done != self.total && self.last.elapsed() < Duration::from_millis(if self.tty { 100 } else { 2000 }) {
            return;
        }
        self.last = Instant::now();
        let width = 30;
        let filled = (done * width).checked_div(self.total).unwrap_or(width);
        let bar = format!(
            "[{}{}] {done}/{}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.total
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{bar}");
            if done == self.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "rewrap {bar}");
        }
    }
}

pub(crate) async fn rewrap(g: &Global, paths: &[PathBuf], aad: &[u8]) -> Result<Tally, Failure> {
    use std::io::IsTerminal;
    if paths.is_empty() {
        return Err(Failure::new(
            EX_USAGE,
            "no files or directories given",
            "ssoctl rewrap DIR-OR-FILE...",
        ));
    }
    let client = crate::online::client(g)?;
    client.refresh().await.map_err(|e| {
        Failure::new(
            crate::EX_UNAVAILABLE,
            e,
            "is the server running? check --server (or --dev DIR)",
        )
    })?;
    let primary = client
        .status()
        .primary
        .ok_or_else(|| Failure::new(EX_SOFTWARE, "the server has no primary key", "rotate first"))?;
    let mut tally = Tally::default();
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files, &mut tally)?;
    }
    let mut progress = Progress {
        total: files.len(),
        tty: std::io::stderr().is_terminal(),
        last: Instant::now() - Duration::from_secs(10),
    };
    for (i, path) in files.iter().enumerate() {
        progress.show(i);
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                tally.failed.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let Ok(parsed) = EnvelopeRef::parse(&bytes) else {
            tally.not_envelopes += 1;
            continue;
        };
        if parsed.key_id == primary {
            tally.current += 1;
            continue;
        }
        let plaintext = match client.open(aad, &bytes).await {
            Ok(p) => zeroize::Zeroizing::new(p),
            Err(e) => {
                tally.failed.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let sealed = client
            .seal(aad, &plaintext)
            .await
            .map_err(|e| Failure::new(crate::EX_UNAVAILABLE, e, "retry; finished files are kept"))?;
        match replace_atomically(path, &sealed) {
            Ok(()) => tally.rewrapped += 1,
            Err(e) => tally.failed.push(format!("{}: {e}", path.display())),
        }
    }
    progress.show(files.len());
    Ok(tally)
}

pub(crate) fn failure_for(tally: &Tally) -> Option<Failure> {
    (!tally.failed.is_empty()).then(|| {
        Failure::new(
            EX_DATAERR,
            format!("{} file(s) could not be rewrapped; first: {}", tally.failed.len(), tally.failed[0]),
            "check --aad and that the keys they were sealed under still exist; rerun to retry (finished files are skipped)",
        )
    })
}
