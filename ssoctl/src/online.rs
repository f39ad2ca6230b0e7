//! The mTLS connection to the servers, built from the global flags.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sso_proto::wire::ErrorBody;
use sso_proto::wire::answers::StatusAnswer;
use sso_proto::{KeyId, KeyState};
use sso_transport::Transport;
use zeroize::Zeroizing;

use crate::cli::Global;
use crate::{EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_NOPERM, EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, EX_USAGE, Failure};

/// The connection settings as `(servers, ca, cert, key)`, from flags or `--dev DIR`.
pub(crate) fn settings(global: &Global) -> Result<(Vec<String>, PathBuf, PathBuf, PathBuf), Failure> {
    let dev = global.dev.as_ref();
    let pick = |explicit: &Option<PathBuf>, dev_file: &str, what: &str| -> Result<PathBuf, Failure> {
        explicit
            .clone()
            .or_else(|| dev.map(|d| d.join(dev_file)))
            .ok_or_else(|| usage(format!("no {what} given")))
    };
    // The server first: with nothing configured, that is what is missing.
    let servers = match (global.servers.is_empty(), dev) {
        (false, _) => global.servers.clone(),
        (true, Some(dir)) => vec![sso_devdir::dev_endpoint(dir).map_err(usage)?],
        (true, None) => return Err(usage("no server given (--server URL or SSOCTL_SERVER)")),
    };
    let ca = pick(&global.ca, sso_devdir::CA_CERT, "CA (--ca)")?;
    let cert = pick(&global.cert, sso_devdir::ADMIN_CERT, "client certificate (--cert)")?;
    let key = pick(&global.key, sso_devdir::ADMIN_KEY, "client key (--key)")?;
    Ok((servers, ca, cert, key))
}

/// A key-caching client with the same settings (for rewrap: keys stay in its zeroized
/// cache, in this process only).
pub(crate) fn client(global: &Global) -> Result<sso_client::Client, Failure> {
    let (servers, ca, cert, key) = settings(global)?;
    let mut b = sso_client::Client::builder().ca(ca).identity(cert, key).watch(false);
    for s in servers {
        b = b.endpoint(s);
    }
    b.build().map_err(usage)
}

/// A connection to one server or a pair.
pub(crate) struct Online {
    transport: Transport,
    /// The same TLS settings over HTTP/1.1, for diagnosing a refused connection.
    probe: Arc<rustls::ClientConfig>,
    servers: Vec<String>,
}

fn usage(message: impl std::fmt::Display) -> Failure {
    Failure::new(
        EX_USAGE,
        message,
        "pass --server URL with --ca, --cert and --key, or --dev DIR",
    )
}

/// The certificate and key were read but cannot be used together: a key that belongs to
/// another certificate, or a key type rustls does not support. Not "not found".
fn identity_err(cert: &Path, key: &Path, e: &rustls::Error) -> Failure {
    let what = match e {
        rustls::Error::InconsistentKeys(_) => "the client key does not belong to the client certificate".to_owned(),
        other => format!("the client certificate and key cannot be used: {other}"),
    };
    Failure::new(
        EX_USAGE,
        format!("{what} (--cert {}, --key {})", cert.display(), key.display()),
        "pass the key file issued with that certificate (ECDSA P-256/P-384, Ed25519 or RSA)",
    )
}

impl Online {
    pub(crate) fn connect(global: &Global) -> Result<Self, Failure> {
        let (servers, ca, cert, key) = settings(global)?;
        let file_err = |path: &PathBuf, e: &dyn std::fmt::Display| {
            Failure::new(
                EX_NOINPUT,
                format!("{}: {e}", path.display()),
                "check the path; --dev DIR expects the files sso-server --dev made",
            )
        };
        let tls_err = |e: sso_tls::TlsError| match e {
            sso_tls::TlsError::File { path, reason } => file_err(&path, &reason),
            sso_tls::TlsError::Identity(e) => identity_err(&cert, &key, &e),
            other => Failure::new(EX_SOFTWARE, other, ""),
        };
        let mut config = sso_tls::ClientTls::trusting(sso_tls::load_roots(&ca).map_err(tls_err)?)
            .identity_files(&cert, &key)
            .map_err(tls_err)?
            .build()
            .map_err(tls_err)?;
        let mut probe = config.clone();
        probe.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.alpn_protocols = vec![b"h2".to_vec()];
        let transport = Transport::new(&servers, Arc::new(config), Duration::from_secs(2)).map_err(usage)?;
        Ok(Self {
            transport,
            probe: Arc::new(probe),
            servers,
        })
    }

    /// Why a server dropped us, if it was the TLS layer refusing our certificate. In TLS
    /// 1.3 that refusal arrives as an alert after the handshake; over HTTP/2 the client
    /// writes first and sees only a broken pipe. Over HTTP/1.1 the server says nothing
    /// first, so a read right after the handshake returns the alert.
    async fn diagnose(&self) -> Option<String> {
        use tokio::io::AsyncReadExt;
        for url in &self.servers {
            let authority = url.trim_start_matches("https://").trim_end_matches('/').to_owned();
            let host = authority
                .rsplit_once(':')
                .map_or(authority.as_str(), |(h, _)| h)
                .to_owned();
            let Ok(name) = rustls_pki_types::ServerName::try_from(host) else {
                continue;
            };
            let attempt = async {
                let tcp = tokio::net::TcpStream::connect(&authority).await.ok()?;
                let mut tls = match tokio_rustls::TlsConnector::from(self.probe.clone())
                    .connect(name, tcp)
                    .await
                {
                    Ok(t) => t,
                    Err(e) => return Some(e.to_string()),
                };
                let mut buf = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(500), tls.read(&mut buf)).await {
                    Ok(Err(e)) => Some(e.to_string()),
                    _ => None,
                }
            };
            if let Ok(Some(reason)) = tokio::time::timeout(Duration::from_secs(3), attempt).await {
                return Some(reason);
            }
        }
        None
    }

    /// The server URLs, in the order given.
    pub(crate) fn servers(&self) -> &[String] {
        &self.servers
    }

    /// One GET to server `idx` only (no failover): for checks that must hear each node.
    pub(crate) async fn get_on(
        &self,
        idx: usize,
        path: &str,
        timeout: Duration,
    ) -> Result<sso_transport::Reply, String> {
        self.transport.get_on(idx, path, timeout).await
    }

    /// The leaf certificate (DER) server `idx` presents, from a TLS handshake of its own.
    pub(crate) async fn server_certificate(&self, idx: usize) -> Result<Vec<u8>, String> {
        let url = self.servers.get(idx).ok_or("no such server")?;
        let authority = url.trim_start_matches("https://").trim_end_matches('/').to_owned();
        let host = authority
            .rsplit_once(':')
            .map_or(authority.as_str(), |(h, _)| h)
            .to_owned();
        let name = rustls_pki_types::ServerName::try_from(host).map_err(|e| e.to_string())?;
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(&authority)
                .await
                .map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(self.probe.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| c.to_vec())
                .ok_or_else(|| "the server presented no certificate".to_owned())
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .unwrap_or_else(|_| Err("no TLS handshake within 5 s".to_owned()))
    }

    /// An admin write (rotate, retire, destroy, restore), with an `Idempotency-Key`.
    ///
    /// Sent to the servers in order, but passed to the next one only when it certainly did
    /// not reach the previous one's handler (no connection, or a stream refused
    /// unprocessed). If a server took the request and then did not answer (hung, link
    /// lost, timeout), the write may have happened there: sending it to the other node,
    /// which does not know this key, could do it twice. ssoctl then stops, names that
    /// server, says what the other servers show now, and prints the key to repeat with.
    pub(crate) async fn write(
        &self,
        what: &str,
        path: &str,
        body: Bytes,
        key: Option<&str>,
    ) -> Result<Zeroizing<Vec<u8>>, Failure> {
        let key = match key {
            Some(k) if valid_idempotency_key(k) => k.to_owned(),
            Some(_) => {
                return Err(Failure::new(
                    EX_USAGE,
                    "--idempotency-key must be 1 to 128 visible ASCII characters",
                    "use letters, digits and punctuation, no spaces",
                ));
            }
            None => new_idempotency_key()?,
        };
        let value = hyper::header::HeaderValue::from_str(&key)
            .map_err(|e| Failure::new(EX_USAGE, format!("--idempotency-key: {e}"), ""))?;
        let headers = [(hyper::header::HeaderName::from_static("idempotency-key"), value)];
        let timeout = Duration::from_secs(60);
        let mut not_reached = Vec::new();
        for idx in self.transport.order() {
            let url = self.transport.url(idx).to_owned();
            match self
                .transport
                .write_on(idx, hyper::Method::POST, path, &headers, body.clone(), timeout)
                .await
            {
                Ok(reply) => return answer(reply.status, reply.body),
                Err(f) if !f.reached => not_reached.push(format!("{url}: {}", f.message)),
                Err(f) => return Err(self.hung_write(what, &url, idx, &f.message, &key).await),
            }
        }
        // No server took the request: the same diagnosis as any other call.
        self.unreachable(&not_reached.join("; ")).await
    }

    /// The failure for a write that server `idx` took and did not answer.
    async fn hung_write(&self, what: &str, url: &str, idx: usize, error: &str, key: &str) -> Failure {
        let mut others = Vec::new();
        for other in (0..self.transport.len()).filter(|i| *i != idx) {
            let other_url = self.transport.url(other);
            let seen = match self
                .transport
                .get_on(other, "/v1/admin/status", Duration::from_secs(5))
                .await
            {
                Ok(r) if r.status == 200 => match serde_json::from_slice::<StatusAnswer>(&r.body) {
                    Ok(v) => describe_keys(&v),
                    Err(_) => "an answer that is not a status".to_owned(),
                },
                Ok(r) => format!("answered status {} to a status request", r.status),
                Err(e) => format!("did not answer a status request either ({e})"),
            };
            others.push(format!("{other_url} shows {seen}"));
        }
        let others = if others.is_empty() {
            String::new()
        } else {
            format!(" Now {}.", others.join("; "))
        };
        Failure::new(
            EX_UNAVAILABLE,
            format!(
                "{url} took the {what} request and then did not answer ({error}): the {what} may have happened there. ssoctl did not send it to another node, which could do it twice.{others}"
            ),
            format!(
                "check with `ssoctl status` against {url}; once it answers, repeat the same command with --idempotency-key {key} --server {url} to get its answer (nothing is done twice)"
            ),
        )
    }

    /// The failure when no server answered: a TLS refusal if the probe finds one.
    async fn unreachable<T>(&self, e: &str) -> Result<T, Failure> {
        let lower = e.to_lowercase();
        if lower.contains("certificate") || lower.contains("alert") || lower.contains("unknownissuer") {
            return Err(refused(e));
        }
        if !lower.contains("refused")
            && let Some(reason) = self.diagnose().await
        {
            return Err(refused(&reason));
        }
        Err(Failure::new(
            EX_UNAVAILABLE,
            format!("no server answered: {e}"),
            "is the server running? check --server (or --dev DIR)",
        ))
    }

    /// Sends a request to the first server that answers; maps transport failures and
    /// error statuses to failures with hints. For reads only: writes go through
    /// [`Online::write`].
    pub(crate) async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<Zeroizing<Vec<u8>>, Failure> {
        let timeout = Duration::from_secs(60);
        match self.transport.request(method, path, body, timeout).await {
            Ok((_, reply)) => answer(reply.status, reply.body),
            Err(e) => self.unreachable(&e).await,
        }
    }
}

fn refused(e: &str) -> Failure {
    Failure::new(
        EX_NOPERM,
        format!("TLS refused: {e}"),
        "check --ca, --cert and --key: the server must trust your certificate and you must trust the server's CA",
    )
}

/// Checks an idempotency key as the server does: 1 to 128 visible ASCII characters.
fn valid_idempotency_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 128 && key.bytes().all(|b| b.is_ascii_graphic())
}

/// A random idempotency key (128 bits, hex).
fn new_idempotency_key() -> Result<String, Failure> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| Failure::new(EX_SOFTWARE, "no randomness for an idempotency key", ""))?;
    Ok(hex::encode(bytes))
}

/// "primary K (generation G)", plus staged keys, from an admin status.
fn describe_keys(v: &StatusAnswer) -> String {
    let generation_of = |id: KeyId| {
        v.keys
            .iter()
            .find(|k| k.key_id == id)
            .map_or_else(|| "?".to_owned(), |k| k.generation.to_string())
    };
    let mut text = match v.primary {
        Some(p) => format!("primary {p} (generation {})", generation_of(p)),
        None => "no primary".to_owned(),
    };
    let staged: Vec<String> = v
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Staged)
        .map(|k| format!("{} (generation {})", k.key_id, k.generation))
        .collect();
    if !staged.is_empty() {
        text.push_str(&format!(", staged {}", staged.join(", ")));
    }
    text
}

/// A server's answer: the body on 2xx, else a failure with a hint.
fn answer(status: u16, body: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>, Failure> {
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let refusal: Option<ErrorBody> = serde_json::from_slice(&body).ok();
    let code = refusal.as_ref().map_or("", |e| e.error.as_str());
    let message = refusal
        .as_ref()
        .filter(|e| !e.message.is_empty())
        .map_or_else(|| format!("the server answered {status}"), |e| e.message.clone());
    Err(match (status, code) {
        (403, "wrong_password") => Failure::new(
            EX_NOPERM,
            message,
            "check the backup password; `ssoctl backup-hint FILE` shows its hint",
        ),
        (403, _) => Failure::new(
            EX_NOPERM,
            message,
            "use a certificate that holds the admin role (roles.admin in the server config)",
        ),
        (404, _) => Failure::new(EX_NOINPUT, message, "check the key id with `ssoctl keys list`"),
        (409, "integrity") => Failure::new(
            EX_DATAERR,
            message,
            "an integrity alarm: compare both nodes' keys before anything else",
        ),
        (409, "rotation_busy" | "rotation_refused") => Failure::new(
            EX_TEMPFAIL,
            message,
            "nothing was acknowledged: run the rotation again (when the message names a newer key another node promoted, that key is the primary already)",
        ),
        (409, "in_progress") => Failure::new(
            EX_TEMPFAIL,
            message,
            "the same request is still running: wait, then repeat it",
        ),
        (409, _) => Failure::new(EX_USAGE, message, "see the message: states only move forward"),
        (422, _) => Failure::new(
            EX_DATAERR,
            message,
            "the backup is damaged or not a backup: use another copy",
        ),
        (503, "store_unavailable") if keystore::StoreFault::message_is_database_outage(&message) => Failure::new(
            EX_UNAVAILABLE,
            message,
            "nothing was changed; the server's database is down or unreachable from it: retry once the database is back (the nodes reconnect by themselves; /v1/health says `ok` again)",
        ),
        (503, "store_unavailable") => Failure::new(
            EX_IOERR,
            message,
            "nothing was changed; fix the server's disk as the message says, then retry (its /v1/health says `ok` again once the store can be written)",
        ),
        (503, _) => Failure::new(
            EX_UNAVAILABLE,
            message,
            "bring the peer back, or pass --allow-degraded to rotate on one node",
        ),
        (400 | 413, _) => Failure::new(EX_USAGE, message, "see the message"),
        (500, "integrity") => Failure::new(EX_DATAERR, message, "an integrity error on the server: check its log"),
        _ => Failure::new(EX_SOFTWARE, message, "see the server log"),
    })
}
