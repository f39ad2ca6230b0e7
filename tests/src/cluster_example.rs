//! `examples/cluster/start.sh` driven as a user drives it: started in its own process
//! group with prebuilt binaries (`SSO_BIN_DIR`) and chosen ports, its banner read for the
//! work directory, the PIDs and the metrics addresses, stopped with Ctrl-C (SIGINT to the
//! whole group, as a terminal sends it). Used by `tests/tests/cluster_example.rs` and by
//! the `sso-cluster-bench` benchmark.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::CertFiles;

/// A running `examples/cluster/start.sh`. Dropped while the script still runs (a failed
/// assertion), it sends SIGTERM to the group and waits, so the script's own cleanup runs.
#[derive(Debug)]
pub struct ClusterExample {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// The nodes' HTTPS addresses, node-1 first.
    pub https: [SocketAddr; 3],
    /// The nodes' metrics addresses (plain HTTP), node-1 first.
    pub metrics: Vec<SocketAddr>,
    /// The script's temporary directory (PKI, unseal key, configs, logs).
    pub work: PathBuf,
    /// The throwaway PostgreSQL's directory and postmaster PID (empty and 0 when the
    /// script used a running PostgreSQL).
    pub pg_dir: PathBuf,
    pub pg_pid: u32,
    /// The database the script created on a running PostgreSQL (`None`: a throwaway one).
    pub database: Option<String>,
    /// What the script printed about the PostgreSQL it chose (and why not a running one).
    pub pg_lines: Vec<String>,
    /// An empty directory given as `PGHOST` so that the probe finds no server; removed
    /// on drop.
    empty_pghost: Option<PathBuf>,
    /// The three nodes' PIDs.
    pub node_pids: Vec<u32>,
}

impl ClusterExample {
    /// Starts the script with the binaries in `bin_dir` on the given HTTPS ports and waits
    /// (up to `limit`) for its banner, with a throwaway PostgreSQL: `PGHOST` names an
    /// empty directory, so the probe for a running server finds none, whatever runs on
    /// this machine. Panics with what the script printed otherwise.
    pub fn start(bin_dir: &Path, ports: [u16; 3], limit: Duration) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let empty = std::env::temp_dir().join(format!("sso-no-pg-{}-{nanos:09}", std::process::id()));
        std::fs::create_dir(&empty).expect("cannot create an empty PGHOST directory");
        let host = empty.to_string_lossy().into_owned();
        let mut me = Self::start_with_env(bin_dir, ports, limit, &[("PGHOST", host.as_str())]);
        me.empty_pghost = Some(empty);
        me
    }

    /// [`ClusterExample::start`] with `env` added to the script's environment (e.g.
    /// `PGHOST`, `PGPORT`, `PGUSER` naming a running PostgreSQL).
    pub fn start_with_env(bin_dir: &Path, ports: [u16; 3], limit: Duration, env: &[(&str, &str)]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster/start.sh");
        let mut child = Command::new("bash")
            .arg(script)
            .env("SSO_BIN_DIR", bin_dir)
            .env("SSO_CLUSTER_PORTS", format!("{} {} {}", ports[0], ports[1], ports[2]))
            .env_remove("SSO_PG_URL")
            .env_remove("SSO_NO_LOCAL_PG")
            .envs(env.iter().copied())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run bash");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let err = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || std::io::read_to_string(err).unwrap_or_default());
        let mut me = Self {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
            https: ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
            metrics: Vec::new(),
            work: PathBuf::new(),
            pg_dir: PathBuf::new(),
            pg_pid: 0,
            database: None,
            pg_lines: Vec::new(),
            empty_pghost: None,
            node_pids: Vec::new(),
        };
        let start = me.seen.len();
        let pg = me.until_any(&["throwaway PostgreSQL in ", "created database "], limit);
        me.pg_lines = me.seen[start..].to_vec();
        if pg.contains("created database ") {
            me.database = after(&pg, "created database ")
                .split_whitespace()
                .next()
                .map(str::to_owned);
        } else {
            me.pg_dir = PathBuf::from(
                after(&pg, "throwaway PostgreSQL in ")
                    .split(" (pid")
                    .next()
                    .unwrap_or(""),
            );
            me.pg_pid = pids_in(&pg).first().copied().unwrap_or(0);
        }
        let running = me.until("cluster running in ", limit);
        me.work = PathBuf::from(after(&running, "cluster running in ").trim());
        let nodes = me.until("node-1 https://", Duration::from_secs(5));
        me.node_pids = pids_in(&nodes);
        let listening = me.until("sso-server listening", Duration::from_secs(5));
        me.metrics = listening
            .split("metrics=")
            .skip(1)
            .filter_map(|s| s.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(me.node_pids.len(), 3, "{nodes}");
        assert_eq!(me.metrics.len(), 3, "{listening}");
        me
    }

    /// A certificate of the script's dev PKI: `client`, `admin` or `server`.
    pub fn cert(&self, name: &str) -> CertFiles {
        CertFiles {
            cert: self.work.join("pki").join(format!("{name}.pem")),
            key: self.work.join("pki").join(format!("{name}-key.pem")),
            serial: Vec::new(),
        }
    }

    /// The dev PKI's CA.
    pub fn ca(&self) -> PathBuf {
        self.work.join("pki/ca.pem")
    }

    /// Reads stdout until a line containing `marker`, or panics after `limit`.
    pub fn until(&mut self, marker: &str, limit: Duration) -> String {
        self.until_any(&[marker], limit)
    }

    /// Reads stdout until a line containing any of `markers`, or panics after `limit`.
    pub fn until_any(&mut self, markers: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if markers.iter().any(|m| line.contains(m)) {
                        return line;
                    }
                }
                Err(_) => {
                    let exit = self.child.try_wait();
                    let stderr = match (exit.as_ref().map(Option::is_some), self.stderr.take()) {
                        (Ok(true), Some(h)) => h.join().unwrap_or_default(),
                        (_, h) => {
                            self.stderr = h;
                            String::from("(still running)")
                        }
                    };
                    panic!(
                        "no {markers:?} from the script within {limit:?}; it printed:\n{}\nexit: {exit:?}\nstderr:\n{stderr}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// The script's process group (its own PID).
    pub fn pgid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`-INT`, `-TERM`) to the script's whole process group.
    pub fn signal_group(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, "--", &format!("-{}", self.child.id())])
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Ctrl-C: SIGINT to the group, then waits up to `limit` for the script to exit;
    /// answers its exit status and its stderr.
    pub fn interrupt(&mut self, limit: Duration) -> (ExitStatus, String) {
        self.signal_group("-INT");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the script did not stop within {limit:?} of Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status, stderr)
    }
}

impl Drop for ClusterExample {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", self.child.id())])
                .status();
            let _ = self.child.wait();
        }
        if let Some(dir) = &self.empty_pghost {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn after<'a>(line: &'a str, marker: &str) -> &'a str {
    line.split_once(marker).map(|(_, rest)| rest).unwrap_or("")
}

/// The numbers after each `(pid ` in `line`.
fn pids_in(line: &str) -> Vec<u32> {
    line.split("(pid ")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

/// Whether `pid` is a live process (a zombie, dead but not yet reaped, is not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
    }
}

/// Live processes (their `/proc/PID/stat` lines) whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        // state ppid pgrp ...
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            found.push(stat);
        }
    }
    found
}
