//! A throwaway PostgreSQL cluster for tests, from the server binaries of Debian's
//! `postgresql` package: `initdb` in a fresh temporary directory, `pg_ctl start` on a free
//! port of 127.0.0.1 (and a private socket directory), stopped with
//! `pg_ctl stop -m immediate` and removed on drop.
//!
//! - PostgreSQL refuses to run as root: when this process's effective uid is 0, every
//!   server command runs as the `postgres` user (`setpriv`), in a directory that user owns.
//! - A missing PostgreSQL fails the test with a message naming the package; there is no
//!   quiet skip.
//! - A watchdog process stops the cluster and removes its directory when the test process
//!   dies without dropping it (a SIGKILL, or a cluster kept in a `static` for a whole test
//!   binary, which is never dropped).
//! - [`PgCluster::stop`] and [`PgCluster::start_again`] stop and start the same cluster on
//!   the same port, for outage tests.
//!
//! Authentication is `trust` on loopback only: this is a test fixture, never a
//! deployment.
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// How long `pg_ctl` may wait for the server to accept connections.
const READY_SECONDS: u32 = 60;

/// Where Debian installs the server binaries: `/usr/lib/postgresql/<major>/bin`.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// What to install when no server binaries are found.
const MISSING: &str = "PostgreSQL's server binaries (initdb, pg_ctl) were not found under \
/usr/lib/postgresql/*/bin, in $PG_BIN or on PATH: install Debian's `postgresql` package \
(apt-get install postgresql); .ci/run does this when initdb is missing";

static DATABASES: AtomicU32 = AtomicU32::new(0);

/// A running throwaway cluster. Stopped (immediate mode) and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    running: Mutex<bool>,
    watchdog: Mutex<Option<Child>>,
}

impl PgCluster {
    /// Initialises and starts a cluster; panics with a clear message when PostgreSQL is
    /// missing or does not start (its log's tail is in the message).
    pub fn start() -> Self {
        Self::start_inner(None, false)
    }

    /// [`PgCluster::start`] with TLS required: the server presents `cert_pem` (with
    /// `key_pem`), and `pg_hba.conf` rejects every connection that is not TLS, so a client
    /// that connects at all spoke TLS. (The helpers' own psql and pg_dump negotiate TLS by
    /// themselves, without verifying.)
    pub fn start_with_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_inner(Some((cert_pem, key_pem)), false)
    }

    /// [`PgCluster::start_with_tls`] with a server that speaks TLS 1.2 and nothing newer
    /// (`ssl_max_protocol_version = 'TLSv1.2'`), as a PostgreSQL built against an old
    /// OpenSSL or configured so does.
    pub fn start_with_tls12_only(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_inner(Some((cert_pem, key_pem)), true)
    }

    fn start_inner(tls: Option<(&str, &str)>, tls12_only: bool) -> Self {
        let bin = server_bin().unwrap_or_else(|| panic!("{MISSING}"));
        let run_as = if effective_uid() == Some(0) {
            Some(user_ids("postgres").unwrap_or_else(|| {
                panic!("running as root and there is no `postgres` user to run PostgreSQL as: install Debian's `postgresql` package (it creates the user)")
            }))
        } else {
            None
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("pg-throwaway-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("cannot give {} to the postgres user: {e}", dir.display()));
        }
        let mut cluster = Self {
            bin,
            dir,
            port: 0,
            run_as,
            running: Mutex::new(false),
            watchdog: Mutex::new(None),
        };
        cluster.spawn_watchdog();
        let out = cluster
            .server_command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}; {MISSING}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some((cert, key)) = tls {
            cluster.require_tls(cert, key, tls12_only);
        }
        // A port that was free a moment ago may be taken by the time the server binds it:
        // try a few.
        for attempt in 1..=3 {
            cluster.port = free_port();
            cluster.write_settings();
            match cluster.pg_ctl_start() {
                Ok(()) => return cluster,
                Err(e) if attempt == 3 => panic!("{e}"),
                Err(_) => {}
            }
        }
        unreachable!("the loop returns or panics on its last attempt")
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The socket directory (for `host=` in a key-value connection string).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("socket")
    }

    /// A URL for `database` as the superuser `postgres` over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a new, empty database and returns its URL.
    pub fn fresh_database(&self) -> String {
        let name = format!("t{}", DATABASES.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs `sql` in `database` with psql (stops on the first error) and returns its
    /// unaligned, tuples-only output; panics on failure.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.url(database),
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server's log so far (connections and disconnections are logged), for a
    /// failing test to show.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// `pg_dump` of `database`, schema and data, as SQL text.
    pub fn dump(&self, database: &str) -> Vec<u8> {
        let out = Command::new(self.bin.join("pg_dump"))
            .args(["--no-owner", "-d", &self.url(database)])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run pg_dump: {e}"));
        assert!(
            out.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: connections are cut, no
    /// checkpoint), keeping its data for [`Self::start_again`].
    pub fn stop(&self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if *running {
            let out = self
                .server_command("pg_ctl")
                .args(["stop", "-D", "data", "-m", "immediate", "-w", "-t", "30"])
                .output()
                .unwrap_or_else(|e| panic!("cannot run pg_ctl: {e}"));
            assert!(
                out.status.success(),
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            *running = false;
        }
    }

    /// Starts the stopped cluster again on the same port.
    pub fn start_again(&self) {
        if let Err(e) = self.pg_ctl_start() {
            panic!("{e}");
        }
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if *running {
            return Ok(());
        }
        let out = self
            .server_command("pg_ctl")
            .args([
                "start",
                "-D",
                "data",
                "-l",
                "log",
                "-w",
                "-t",
                &READY_SECONDS.to_string(),
            ])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!(
                "PostgreSQL did not start on 127.0.0.1:{} within {READY_SECONDS} s: {}\nlog:\n{}",
                self.port,
                String::from_utf8_lossy(&out.stderr),
                tail.join("\n")
            ));
        }
        *running = true;
        Ok(())
    }

    /// Writes the server's certificate and key (0600, the server's user) and a
    /// `pg_hba.conf` that admits TLS connections only; with `tls12_only`, no TLS above 1.2.
    fn require_tls(&self, cert: &str, key: &str, tls12_only: bool) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.dir.join("data");
        for (name, contents) in [("server.crt", cert), ("server.key", key)] {
            let path = data.join(name);
            std::fs::write(&path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("cannot give {} to the postgres user: {e}", path.display()));
            }
        }
        let hba = data.join("pg_hba.conf");
        std::fs::write(
            &hba,
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n",
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", hba.display()));
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_else(|e| panic!("cannot read {}: {e}", conf.display()));
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        if tls12_only {
            text.push_str("ssl_min_protocol_version = 'TLSv1.2'\nssl_max_protocol_version = 'TLSv1.2'\n");
        }
        std::fs::write(&conf, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
    }

    /// Loopback only, a private socket directory, and no fsync (fast; the operating system
    /// does not crash under a test). Commits stay synchronous: an immediate stop must not
    /// lose an acknowledged commit.
    fn write_settings(&self) {
        let conf = self.dir.join("data/postgresql.auto.conf");
        let settings = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             fsync = off\nfull_page_writes = off\nmax_connections = 200\n\
             log_connections = on\nlog_disconnections = on\n",
            self.port,
            self.socket_dir().display()
        );
        let socket = self.socket_dir();
        if !socket.exists() {
            std::fs::create_dir(&socket).unwrap_or_else(|e| panic!("cannot create {}: {e}", socket.display()));
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&socket, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("cannot give {} to the postgres user: {e}", socket.display()));
            }
        }
        std::fs::write(&conf, settings).unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
    }

    /// `program` from the server binaries, run in the cluster's directory, as the
    /// `postgres` user when this process is root.
    fn server_command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = match self.run_as {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={gid}"),
                    "--clear-groups".into(),
                    "--".into(),
                ])
                .arg(&path);
                c
            }
            None => Command::new(&path),
        };
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    /// A shell that waits for this process to end, then stops the cluster and removes its
    /// directory. Killed on drop (it is our own child, by its PID).
    ///
    /// - It learns of the end through its stdin, a pipe only this process holds open:
    ///   the kernel closes it however the process ends. (Polling `kill -0 PID` never ends
    ///   where nothing reaps the dead process: a zombie still answers.)
    /// - It runs in its own process group, so a kill aimed at the test's group (a
    ///   `timeout`, a cancelled job) does not take it down with the test.
    fn spawn_watchdog(&self) {
        let stop: Vec<String> = {
            let c = self.server_command("pg_ctl");
            std::iter::once(c.get_program().to_string_lossy().into_owned())
                .chain(c.get_args().map(|a| a.to_string_lossy().into_owned()))
                .collect()
        };
        let quoted: Vec<String> = stop.iter().map(|a| shell_quote(a)).collect();
        let script = format!(
            "read _; cd {dir} && {stop} stop -D data -m immediate >/dev/null 2>&1; rm -rf {dir}",
            dir = shell_quote(&self.dir.to_string_lossy()),
            stop = quoted.join(" "),
        );
        let child = Command::new("sh")
            .args(["-c", &script])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the cluster's watchdog: {e}"));
        *self.watchdog.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.watchdog.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if *self.running.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = self
                .server_command("pg_ctl")
                .args(["stop", "-D", "data", "-m", "immediate", "-w", "-t", "30"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `$PG_BIN`, then the newest `/usr/lib/postgresql/<major>/bin`, then `initdb` on PATH.
fn server_bin() -> Option<PathBuf> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN").map(PathBuf::from) {
        return has_initdb(&dir).then_some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_initdb(&bin).then_some((major, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).find(|d| has_initdb(d))
}

/// The effective uid, from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `user`'s uid and gid from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == user).then_some(())?;
        let _password = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// A port of 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
    listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no local address: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_stops_and_starts_again() {
        let cluster = PgCluster::start();
        let url = cluster.fresh_database();
        let db = url.rsplit('/').next().unwrap().to_owned();
        assert_eq!(cluster.psql(&db, "SELECT 1 + 1").trim(), "2");
        cluster.psql(&db, "CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (7)");
        cluster.stop();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", cluster.port())).is_err(),
            "the stopped cluster still accepts connections"
        );
        cluster.start_again();
        assert_eq!(
            cluster.psql(&db, "SELECT v FROM t").trim(),
            "7",
            "data survived the restart"
        );
        let dir = cluster.dir.clone();
        drop(cluster);
        assert!(!dir.exists(), "the cluster's directory outlived it");
    }
}
