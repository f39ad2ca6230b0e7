//! One function per subcommand. Human output is aligned text; `--json` prints one JSON
//! document.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use bytes::Bytes;
use hyper::Method;
use keystore::Store as _;
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use sso_proto::wire::answers::{
    AuditVerifyAnswer, BackupRequest, GapView, KeyChanged, KeyView, RestoreDryRun, RestorePlanView, RestoreRequest,
    Restored, RotateAnswer, RotateRequest, StatusAnswer,
};

use crate::cli::{Audit, AuditVerify, Certs, Cli, Command, Global, Init, Keys};
use crate::online::Online;
use crate::{EX_DATAERR, EX_IOERR, EX_NOINPUT, EX_SOFTWARE, EX_USAGE, Failure};

/// Runs a parsed command line, printing results to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), Failure> {
    let g = &cli.global;
    match cli.command {
        Command::Init(init) => init_store(g, &init, out),
        Command::BackupHint { file } => backup_hint(g, &file, out),
        Command::Certs(certs) => certs_cmd(g, certs, out),
        Command::Audit(Audit::Verify(v)) => audit_verify(g, &v, out),
        Command::Doctor { config } => crate::doctor::doctor(g, config.as_deref(), out),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "ssoctl", out);
            Ok(())
        }
        online => {
            // Check what can be checked before touching the network.
            if let Command::Keys(Keys::Retire { key_id, .. } | Keys::Destroy { key_id, .. }) = &online {
                parse_key_id(key_id)?;
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::new(EX_SOFTWARE, e, ""))?;
            runtime.block_on(run_online(g, online, out))
        }
    }
}

async fn run_online(g: &Global, command: Command, out: &mut dyn Write) -> Result<(), Failure> {
    let conn = Online::connect(g)?;
    match command {
        Command::Rotate { allow_degraded } => {
            let body = serde_json::to_string(&RotateRequest { allow_degraded }).unwrap_or_default();
            let v: RotateAnswer = json(
                &conn
                    .write(
                        "rotate",
                        "/v1/admin/rotate",
                        Bytes::from(body),
                        g.idempotency_key.as_deref(),
                    )
                    .await?,
            )?;
            emit(g, out, &v, || {
                format!(
                    "rotated: new primary {} (generation {}), replication {}\n{}",
                    v.key_id,
                    v.generation,
                    v.replication,
                    "reminder: take a backup now (ssoctl backup --out FILE); the new key is in no backup yet"
                )
            })
        }
        Command::Status => {
            let v: StatusAnswer = json(&conn.call(Method::GET, "/v1/admin/status", Bytes::new()).await?)?;
            emit(g, out, &v, || status_text(&v))
        }
        Command::Keys(Keys::List) => {
            let v: StatusAnswer = json(&conn.call(Method::GET, "/v1/admin/status", Bytes::new()).await?)?;
            emit(g, out, &v.keys, || keys_table(&v.keys))
        }
        Command::Keys(Keys::Retire {
            key_id,
            force_retire_primary,
        }) => {
            let id = parse_key_id(&key_id)?;
            let body = if force_retire_primary {
                Bytes::from_static(b"{\"force_retire_primary\":true}")
            } else {
                Bytes::new()
            };
            let v: KeyChanged = json(
                &conn
                    .write(
                        "retire",
                        &format!("/v1/admin/keys/{id}/retire"),
                        body,
                        g.idempotency_key.as_deref(),
                    )
                    .await?,
            )?;
            emit(g, out, &v, || format!("retired {id} (replication {})", v.replication))
        }
        Command::Keys(Keys::Destroy { key_id, yes }) => {
            let id = parse_key_id(&key_id)?;
            if !yes {
                confirm(
                    &format!(
                        "destroy key {id}? Its material is wiped on every node and data sealed under it can never be opened again. Type the first 8 characters of the key id to confirm: "
                    ),
                    &id.to_string()[..8],
                )?;
            }
            let v: KeyChanged = json(
                &conn
                    .write(
                        "destroy",
                        &format!("/v1/admin/keys/{id}/destroy"),
                        Bytes::new(),
                        g.idempotency_key.as_deref(),
                    )
                    .await?,
            )?;
            emit(g, out, &v, || format!("destroyed {id} (replication {})", v.replication))
        }
        Command::Backup { out: path, hint } => {
            if path.exists() {
                return Err(Failure::new(
                    EX_USAGE,
                    format!("{} exists", path.display()),
                    "choose a new file name; backups are never overwritten",
                ));
            }
            let password = password(g, "SSOCTL_BACKUP_PASSWORD", "backup password: ", true)?;
            let body = secret_body(&BackupRequest {
                password: password.expose_secret(),
                hint: hint.clone(),
            });
            let bytes = conn.call(Method::POST, "/v1/admin/backup", body).await?;
            keystore::fsutil::write_private_new(&path, &bytes)?;
            let info = keystore::backup::read_info(&bytes)?;
            let v = serde_json::json!({"file": path, "bytes": bytes.len(), "hint": info.hint, "node": info.node});
            emit(g, out, &v, || {
                format!(
                    "backup written to {} ({} bytes, from node {})",
                    path.display(),
                    bytes.len(),
                    info.node
                )
            })
        }
        Command::Restore { input, force } => {
            let file = std::fs::read(&input)
                .map_err(|e| Failure::new(EX_NOINPUT, format!("{}: {e}", input.display()), "check the path"))?;
            // Fail early and offline on a damaged or foreign file.
            let info = keystore::backup::read_info(&file)?;
            let password = password(g, "SSOCTL_BACKUP_PASSWORD", "backup password: ", false)?;
            let backup = base64::engine::general_purpose::STANDARD.encode(&file);
            // What the backup would bring back, before anything is written.
            let dry: RestoreDryRun = json(
                &conn
                    .call(
                        Method::POST,
                        "/v1/admin/restore",
                        secret_body(&RestoreRequest {
                            password: password.expose_secret(),
                            backup: backup.clone(),
                            dry_run: true,
                            force: false,
                        }),
                    )
                    .await?,
            )?;
            let plan = &dry.plan;
            let warning = restore_warning(plan, &info);
            let unknown = plan.unknown.len();
            let unchecked = plan.peer_checked == Some(false);
            if !g.json && !warning.is_empty() {
                writeln!(out, "{warning}").map_err(|e| Failure::new(EX_SOFTWARE, e, ""))?;
            }
            if unknown > 0 && !force {
                if g.json {
                    let _ = writeln!(out, "{}", pretty(&dry));
                }
                return Err(Failure::new(
                    EX_USAGE,
                    format!(
                        "not restored: the backup would bring back {} the running pair does not know{}",
                        count(unknown as u64, "key", "keys"),
                        if unchecked {
                            " (and the node cannot reach its peer to learn what the pair destroyed)"
                        } else {
                            ""
                        }
                    ),
                    "check the change records and audit log that none of them was destroyed after the backup was taken; then repeat with --force",
                ));
            }
            let body = secret_body(&RestoreRequest {
                password: password.expose_secret(),
                backup,
                dry_run: false,
                force,
            });
            let v: Restored = json(
                &conn
                    .write("restore", "/v1/admin/restore", body, g.idempotency_key.as_deref())
                    .await?,
            )?;
            emit(g, out, &v, || {
                format!(
                    "restored: {}, {} advanced, {} unchanged",
                    count(v.added as u64, "key added", "keys added"),
                    v.advanced,
                    v.unchanged
                )
            })
        }
        Command::Rewrap { paths, aad } => {
            let tally = crate::rewrap::rewrap(g, &paths, aad.as_bytes()).await?;
            let v = serde_json::json!({
                "rewrapped": tally.rewrapped, "already_current": tally.current, "not_envelopes": tally.not_envelopes,
                "failed": tally.failed, "stale_temporary_files_removed": tally.stale_tmp_removed,
            });
            emit(g, out, &v, || {
                format!(
                    "rewrapped {}, already under the primary {}, not envelopes {}, failed {}{}",
                    tally.rewrapped,
                    tally.current,
                    tally.not_envelopes,
                    tally.failed.len(),
                    if tally.stale_tmp_removed > 0 {
                        format!(" (removed {} leftovers of an interrupted run)", tally.stale_tmp_removed)
                    } else {
                        String::new()
                    }
                )
            })?;
            crate::rewrap::failure_for(&tally).map_or(Ok(()), Err)
        }
        _ => Err(Failure::new(EX_SOFTWARE, "not an online command", "")),
    }
}

/// What an operator must read before a restore: the backup's age, the keys in it that the
/// pair destroyed since (they stay destroyed), the keys the pair does not know, and
/// whether the node could ask its peer. Empty when the backup holds nothing surprising.
fn restore_warning(plan: &RestorePlanView, info: &keystore::BackupInfo) -> String {
    let (destroyed, unknown) = (&plan.destroyed, &plan.unknown);
    let unchecked = plan.peer_checked == Some(false);
    let mut lines = Vec::new();
    if !destroyed.is_empty() || !unknown.is_empty() || unchecked {
        let created = info.created_at.format(&Rfc3339).unwrap_or_default();
        lines.push(format!(
            "backup from node {}, written {}, {} ago",
            info.node,
            created,
            age(&created)
        ));
    }
    if unchecked {
        lines.push(
            "warning: the node cannot reach its peer: it knows only its own keys, not what the pair destroyed"
                .to_owned(),
        );
    }
    if !destroyed.is_empty() {
        lines.push(format!(
            "warning: the backup holds {} the pair has destroyed since; {} destroyed (not restored):",
            count(destroyed.len() as u64, "key", "keys"),
            if destroyed.len() == 1 { "it stays" } else { "they stay" }
        ));
        lines.extend(destroyed.iter().map(|id| format!("  {id}")));
    }
    if !unknown.is_empty() {
        lines.push(format!(
            "warning: the backup holds {} the running pair does not know; restoring brings {} back:",
            count(unknown.len() as u64, "key", "keys"),
            if unknown.len() == 1 { "it" } else { "them" }
        ));
        lines.extend(unknown.iter().map(|id| format!("  {id}")));
    }
    lines.join("\n")
}

/// A request body that carries a password: serialised from borrowed fields (no copy of
/// the password in a JSON value) into a buffer sized up front, and wiped when the HTTP
/// client drops it.
fn secret_body<T: serde::Serialize>(value: &T) -> Bytes {
    let mut size = 0;
    // One dry run to learn the length, into a sink that keeps nothing.
    struct Count<'a>(&'a mut usize);
    impl std::io::Write for Count<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            *self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let _ = serde_json::to_writer(Count(&mut size), value);
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(size));
    let _ = serde_json::to_writer(&mut *buf, value);
    Bytes::from_owner(buf)
}

/// A server's answer through its wire type (`sso_proto::wire`).
fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| {
        Failure::new(
            EX_SOFTWARE,
            format!(
                "unexpected answer from the server: {}",
                sso_proto::json::describe_error(&e)
            ),
            "are client and server the same release?",
        )
    })
}

/// `--json` output: an answer's fields in sorted order (as the server's own bodies), pretty.
fn pretty<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_value(value)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_default()
}

/// "1 key added", "2 keys added".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn emit(
    g: &Global,
    out: &mut dyn Write,
    value: &(impl serde::Serialize + ?Sized),
    human: impl FnOnce() -> String,
) -> Result<(), Failure> {
    let text = if g.json { pretty(value) } else { human() };
    writeln!(out, "{text}").map_err(|e| Failure::new(EX_SOFTWARE, e, ""))
}

fn parse_key_id(text: &str) -> Result<sso_proto::KeyId, Failure> {
    text.parse().map_err(|_| {
        Failure::new(
            EX_USAGE,
            format!("{text:?} is not a key id"),
            "key ids are 32 lowercase hex characters; see `ssoctl keys list`",
        )
    })
}

fn age(rfc: &str) -> String {
    let Ok(t) = OffsetDateTime::parse(rfc, &Rfc3339) else {
        return "?".into();
    };
    let secs = (OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn keys_table(keys: &[KeyView]) -> String {
    let rows: Vec<[String; 5]> = keys
        .iter()
        .map(|k| {
            [
                k.key_id.to_string(),
                k.generation.to_string(),
                k.state.to_string(),
                age(&k.created_at),
                k.origin.clone(),
            ]
        })
        .collect();
    let header = ["KEY ID", "GEN", "STATE", "AGE", "ORIGIN"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(&format!("{c:<w$}"));
        }
        s.trim_end().to_owned()
    };
    let mut out = vec![line(header)];
    out.extend(rows.iter().map(|r| line([&r[0], &r[1], &r[2], &r[3], &r[4]])));
    out.join("\n")
}

fn status_text(v: &StatusAnswer) -> String {
    let mut s = format!(
        "node      {}\nepoch     {}\nprimary   {}\n",
        v.node,
        v.epoch,
        v.primary.map_or_else(|| "(none)".to_owned(), |p| p.to_string())
    );
    match (&v.peer, &v.shared_database) {
        (None, Some(database)) => s.push_str(&format!(
            "cluster   a cluster node; its store is {database}, shared by every node\n"
        )),
        (None, None) => s.push_str("peer      none (standalone)\n"),
        (Some(p), _) => s.push_str(&format!(
            "peer      {} {} ({}), lag {}, last contact {}\n",
            p.node.as_deref().unwrap_or("?"),
            p.state,
            p.url,
            crate::answers::lag_text(p.lag_epochs),
            p.last_contact
                .as_deref()
                .map_or("never".into(), |t| format!("{} ago", age(t))),
        )),
    }
    let uncovered = v.backup.not_backed_up.len();
    let scope = match v.backup.coverage.as_str() {
        "pair" => " (backups through either node)",
        "node_only_peer_unreachable" => " (this node's backups only: the peer did not answer)",
        _ => "",
    };
    s.push_str(&format!(
        "backup    last {}; {}{scope}\n",
        v.backup
            .last_backup_at
            .as_deref()
            .map_or("never".into(), |t| format!("{} ago", age(t))),
        if uncovered == 0 {
            "every key is covered".to_owned()
        } else {
            format!(
                "{} in no backup: run ssoctl backup",
                count(uncovered as u64, "key", "keys")
            )
        }
    ));
    s.push_str(&format!("audit     {} entries, head {}\n\n", v.audit.seq, v.audit.head));
    s.push_str(&keys_table(&v.keys));
    s
}

/// A password from `--password-file`, then `env_var`, then the terminal (asked twice when
/// `confirm`).
fn password(g: &Global, env_var: &str, prompt: &str, confirm_twice: bool) -> Result<SecretString, Failure> {
    let missing = || {
        Failure::new(
            EX_USAGE,
            "no password given",
            format!("pass --password-file FILE, set {env_var}, or run on a terminal"),
        )
    };
    if let Some(path) = &g.password_file {
        keystore::fsutil::check_private(path)?;
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| Failure::new(EX_NOINPUT, format!("{}: {e}", path.display()), "check the path"))?,
        );
        let text = text.strip_suffix('\n').unwrap_or(&text);
        if text.is_empty() {
            return Err(missing());
        }
        return Ok(SecretString::from(text.to_owned()));
    }
    if let Ok(v) = std::env::var(env_var)
        && !v.is_empty()
    {
        return Ok(SecretString::from(v));
    }
    let first = rpassword::prompt_password(prompt).map_err(|_| missing())?;
    if confirm_twice {
        let again = rpassword::prompt_password("again: ").map_err(|_| missing())?;
        if again != first {
            return Err(Failure::new(
                EX_USAGE,
                "the passwords differ",
                "type the same password twice",
            ));
        }
    }
    if first.is_empty() {
        return Err(missing());
    }
    Ok(SecretString::from(first))
}

fn confirm(question: &str, expected: &str) -> Result<(), Failure> {
    use std::io::BufRead;
    let mut err = std::io::stderr().lock();
    let _ = write!(err, "{question}");
    let _ = err.flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::new(EX_USAGE, e, "pass --yes to skip the confirmation"))?;
    if answer.trim() != expected {
        return Err(Failure::new(
            EX_USAGE,
            "not confirmed; nothing was changed",
            "type the first 8 characters of the key id, or pass --yes",
        ));
    }
    Ok(())
}

/// Refuses a store that looks like a URL but is not a PostgreSQL one (a mistyped or
/// capitalised scheme) without echoing it: it may hold a password, and taken for a file
/// it would be named in "no store at ..." (tests/cli.rs
/// `a_store_url_with_a_password_is_never_echoed`).
fn not_a_mistyped_url(store: &Path) -> Result<(), Failure> {
    let text = store.to_string_lossy();
    if text.contains("://") && !keystore::postgres::is_database_url(&text) {
        return Err(Failure::new(
            EX_USAGE,
            "--store looks like a URL but does not start with postgresql:// or postgres:// (lowercase)",
            "write the database as postgresql://USER@HOST:PORT/DATABASE, or give a store file's path",
        ));
    }
    Ok(())
}

fn init_store(g: &Global, init: &Init, out: &mut dyn Write) -> Result<(), Failure> {
    not_a_mistyped_url(&init.store)?;
    if !keystore::validate::is_valid_node_name(&init.node) {
        return Err(Failure::new(
            EX_USAGE,
            format!(
                "--node {:?}: a node name is {}",
                init.node,
                keystore::validate::NODE_NAME_RULE
            ),
            "use the same name as `node` in this server's config",
        ));
    }
    if let Some(b) = &init.backup_out
        && b.exists()
    {
        return Err(Failure::new(
            EX_USAGE,
            format!("{} exists", b.display()),
            "choose a new file for the first backup",
        ));
    }
    let key = match &init.key_file {
        Some(path) if path.exists() => keystore::UnsealKey::key_file(path)?,
        Some(path) => keystore::UnsealKey::generate_key_file(path)?,
        None => {
            let pass = password(
                &Global {
                    password_file: None,
                    ..g.clone()
                },
                "SSOCTL_PASSPHRASE",
                "new store passphrase: ",
                true,
            )?;
            keystore::UnsealKey::passphrase(pass)?
        }
    };
    if let Some(url) = init.store.to_str().filter(|s| keystore::postgres::is_database_url(s)) {
        return init_database(g, init, url, &key, out);
    }
    let mut store = keystore::SealedStore::create(&init.store, &key, &keystore::CreateOptions::new(init.node.clone()))?;
    let Some(backup_out) = init.backup_out.as_ref().filter(|_| !init.join) else {
        let v = serde_json::json!({"store": init.store, "node": init.node, "primary": null});
        return emit(g, out, &v, || {
            format!(
                "created an empty store {} for node {}: it takes its keys from its peer once both servers run",
                init.store.display(),
                init.node
            )
        });
    };
    let first = store.rotate()?;
    let backup_password = password(g, "SSOCTL_BACKUP_PASSWORD", "backup password: ", true)?;
    // The first backup is part of init: until it is written, init has not succeeded.
    if let Err(e) = store.write_backup_file(backup_out, &backup_password, &init.hint, keystore::KdfParams::default()) {
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", init.store.display()));
        }
        return Err(Failure::from(e));
    }
    let v = serde_json::json!({"store": init.store, "node": init.node, "primary": first.key_id, "backup": backup_out});
    emit(g, out, &v, || {
        format!(
            "created {} for node {} with primary {}\nfirst backup written to {}: keep it, and its password, somewhere safe and separate",
            init.store.display(),
            init.node,
            first.key_id,
            backup_out.display()
        )
    })
}

/// `init --store postgresql://...`: the schema, the store and its first key in the
/// database, then the mandatory first backup. Every other node of the cluster opens the
/// same database with the URL and the unseal secret: there is nothing to join.
fn init_database(
    g: &Global,
    init: &Init,
    url: &str,
    key: &keystore::UnsealKey,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let Some(backup_out) = init.backup_out.as_ref().filter(|_| !init.join) else {
        return Err(Failure::new(
            EX_USAGE,
            "--join makes the empty second store of a pair; a PostgreSQL store is shared by every node",
            "init the database once (without --join); the other nodes need only its URL and the unseal secret in their config",
        ));
    };
    let (mut store, first) =
        keystore::postgres::PgStore::init(url, key, &keystore::CreateOptions::new(init.node.clone()))?;
    let database = store.database().to_owned();
    let backup_password = password(g, "SSOCTL_BACKUP_PASSWORD", "backup password: ", true)?;
    // The first backup is part of init. The database cannot be removed like a file, so a
    // failure says what exists and what to do.
    if let Err(e) = store.write_backup_file(backup_out, &backup_password, &init.hint, keystore::KdfParams::default()) {
        return Err(Failure::new(
            EX_IOERR,
            format!(
                "the store was created in {database} with its first key {}, but the first backup could not be written: {e}",
                first.key_id
            ),
            "write a backup now (`ssoctl backup --out FILE` once a server runs on it), before anything else",
        ));
    }
    let v = serde_json::json!({"store": database, "node": init.node, "primary": first.key_id, "backup": backup_out});
    emit(g, out, &v, || {
        format!(
            "created the store in {database} for node {} with primary {}\nfirst backup written to {}: keep it, and its password, somewhere safe and separate\nother nodes: the same URL and unseal secret in their config",
            init.node,
            first.key_id,
            backup_out.display()
        )
    })
}

fn backup_hint(g: &Global, file: &Path, out: &mut dyn Write) -> Result<(), Failure> {
    let info = keystore::backup::read_info_file(file)?;
    let created = info.created_at.format(&Rfc3339).unwrap_or_default();
    let v = serde_json::json!({"hint": info.hint, "node": info.node, "created_at": created, "format_version": info.version});
    emit(g, out, &v, || {
        format!(
            "hint     {}\nnode     {}\ncreated  {} ({} ago)\nformat   {}",
            if info.hint.is_empty() { "(none)" } else { &info.hint },
            info.node,
            created,
            age(&created),
            info.version
        )
    })
}

fn write_pki_file(dir: &Path, name: &str, contents: &str, private: bool) -> Result<(), Failure> {
    let path = dir.join(name);
    if private {
        keystore::fsutil::write_private_new(&path, contents.as_bytes())?;
    } else {
        std::fs::write(&path, contents)
            .map_err(|e| Failure::new(EX_NOINPUT, format!("{}: {e}", path.display()), "check the directory"))?;
    }
    Ok(())
}

fn certs_cmd(g: &Global, certs: Certs, out: &mut dyn Write) -> Result<(), Failure> {
    let gen_err = |e: certs::Error| Failure::new(EX_SOFTWARE, e, "");
    match certs {
        Certs::Init { dir } => {
            if dir.exists() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
                return Err(Failure::new(
                    EX_USAGE,
                    format!("{} exists and is not empty", dir.display()),
                    "choose a new directory; certs init never overwrites",
                ));
            }
            std::fs::create_dir_all(&dir).map_err(|e| Failure::new(EX_NOINPUT, e, "check the path"))?;
            let pki = certs::DevPki::generate().map_err(gen_err)?;
            for f in pki.files() {
                write_pki_file(&dir, f.name, f.contents, f.private)?;
            }
            write_pki_file(&dir, "ca-key.pem", &pki.ca.key_pem(), true)?;
            let v = serde_json::json!({"dir": dir, "files": ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "admin.pem", "admin-key.pem", "client.pem", "client-key.pem"]});
            emit(g, out, &v, || {
                format!(
                    "dev PKI written to {}: CA, server (localhost, 127.0.0.1), admin and client certificates",
                    dir.display()
                )
            })
        }
        Certs::Issue { dir, role, name } => {
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f)).map_err(|e| {
                    Failure::new(
                        EX_NOINPUT,
                        format!("{}: {e}", dir.join(f).display()),
                        "run `ssoctl certs init --dir DIR` first, or point --dir at it",
                    )
                })
            };
            let ca = certs::CertificateAuthority::from_pem(&read("ca.pem")?, &read("ca-key.pem")?).map_err(gen_err)?;
            let mut spec = match role.as_str() {
                "client" | "admin" => certs::LeafSpec::client(&name, 365),
                "server" | "peer" => {
                    let mut s = certs::LeafSpec::server(&name, &["localhost", &name], &[[127, 0, 0, 1].into()], 365);
                    s.usage = certs::LeafUsage::ServerAndClient;
                    s
                }
                other => {
                    return Err(Failure::new(
                        EX_USAGE,
                        format!("unknown role {other:?}"),
                        "roles: client, admin, server, peer",
                    ));
                }
            };
            spec.common_name = name.clone();
            let leaf = ca.issue(&spec).map_err(gen_err)?;
            // Both halves or neither: issuing again for a name renews its pair (doctor's
            // remedy for an expiring certificate), and a failed write must not leave a
            // new certificate beside the old key.
            let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
            keystore::fsutil::replace_together(&[
                keystore::fsutil::Replacement {
                    path: &key,
                    bytes: leaf.key_pem.as_bytes(),
                    private: true,
                },
                keystore::fsutil::Replacement {
                    path: &cert,
                    bytes: leaf.cert_pem.as_bytes(),
                    private: false,
                },
            ])?;
            let v = serde_json::json!({"cert": dir.join(format!("{name}.pem")), "key": dir.join(format!("{name}-key.pem")), "role": role});
            emit(g, out, &v, || {
                format!(
                    "issued {name}.pem and {name}-key.pem in {} (CN {name}); grant it with roles.{role} = [\"cn:{name}\"] in the server config",
                    dir.display()
                )
            })
        }
    }
}

fn audit_verify(g: &Global, v: &AuditVerify, out: &mut dyn Write) -> Result<(), Failure> {
    let given = match (&v.head, v.count) {
        (Some(head), Some(count)) => {
            if head.len() != 64 || !head.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(Failure::new(
                    EX_USAGE,
                    "--head must be 64 hex characters",
                    "copy it from ssoctl status or the metrics",
                ));
            }
            Some(keystore::AuditAnchor {
                count,
                head: head.to_ascii_lowercase(),
            })
        }
        _ => None,
    };
    let online = !g.servers.is_empty() || g.dev.is_some();
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::new(EX_SOFTWARE, e, ""))
    };
    if v.files.is_empty() {
        if !online {
            return Err(Failure::new(
                EX_USAGE,
                "nothing to verify",
                "give the log files (with --store and its unseal secret), or --server/--dev to have the server verify its own log",
            ));
        }
        let path = match &given {
            Some(a) => format!("/v1/admin/audit/verify?head={}&count={}", a.head, a.count),
            None => "/v1/admin/audit/verify".to_owned(),
        };
        let answer: AuditVerifyAnswer = runtime()?.block_on(async {
            let conn = Online::connect(g)?;
            json(&conn.call(Method::GET, &path, Bytes::new()).await?)
        })?;
        let (entries, first_seq, head, gaps) = match &answer {
            AuditVerifyAnswer::Broken {
                file,
                line,
                problem,
                truncated,
                ..
            } => {
                let problem = format!("{file} line {line}: {problem}");
                return Err(verify_failure(problem, *truncated, g, out, &answer));
            }
            AuditVerifyAnswer::Intact {
                entries,
                first_seq,
                head,
                gaps,
                ..
            } => (*entries, *first_seq, head, gaps),
        };
        let gaps: Vec<(u64, u64)> = gaps.iter().map(|x| (x.seq, x.lost)).collect();
        return emit(g, out, &answer, || {
            intact_text(
                entries,
                first_seq,
                head,
                &gaps,
                "checked by the server against its live head",
            )
        });
    }
    if let Some(missing) = v.files.iter().find(|f| !f.exists()) {
        return Err(Failure::new(
            EX_NOINPUT,
            format!("{}: no such file", missing.display()),
            "check the path; rotated logs are verified oldest first (audit.log.1 before audit.log)",
        ));
    }
    let Some(store_path) = &v.store else {
        return Err(Failure::new(
            EX_USAGE,
            "checking files needs the store whose key chains them (--store)",
            "or let the server check its own log: ssoctl audit verify --server URL (or --dev DIR)",
        ));
    };
    not_a_mistyped_url(store_path)?;
    if store_path.to_str().is_some_and(keystore::postgres::is_database_url) {
        return Err(Failure::new(
            EX_USAGE,
            "checking files offline against a PostgreSQL store is not supported: a cluster node's audit anchor is kept in the shared database under its node name",
            "let the node that wrote the log check it: ssoctl audit verify --server https://NODE:PORT",
        ));
    }
    let unseal = match &v.key_file {
        Some(path) => keystore::UnsealKey::key_file(path)?,
        None => keystore::UnsealKey::passphrase(password(g, "SSOCTL_PASSPHRASE", "store passphrase: ", false)?)?,
    };
    let store = keystore::SealedStore::open(store_path, &unseal)?;
    let key = store.audit_key();
    let (anchor, source) = match given {
        Some(a) => (Some(a), "the --head/--count given"),
        None if online => {
            let status: StatusAnswer = runtime()?.block_on(async {
                let conn = Online::connect(g)?;
                json(&conn.call(Method::GET, "/v1/admin/status", Bytes::new()).await?)
            })?;
            let a = keystore::AuditAnchor {
                count: status.audit.seq,
                head: status.audit.head,
            };
            (Some(a), "the head the server reports")
        }
        None => (store.audit_anchor()?, "the anchor in the store"),
    };
    drop(store);
    let start = if v.partial {
        keystore::audit::Start::Any
    } else {
        keystore::audit::Start::Genesis
    };
    match keystore::audit::verify(&v.files, &key, start, anchor.as_ref()) {
        Ok(r) => {
            let gaps: Vec<(u64, u64)> = r.gaps.iter().map(|x| (x.seq, x.lost)).collect();
            let value = AuditVerifyAnswer::Intact {
                anchored: Some(r.anchored),
                entries: r.entries,
                first_seq: r.first_seq,
                gaps: r
                    .gaps
                    .iter()
                    .map(|x| GapView {
                        detail: x.detail.clone(),
                        lost: x.lost,
                        seq: x.seq,
                    })
                    .collect(),
                head: r.head.clone(),
                intact: true,
                last_seq: r.last_seq,
            };
            let against = if anchor.is_some() {
                format!("reaches {source}")
            } else {
                "no anchor to compare with (give --head/--count or --server)".to_owned()
            };
            emit(g, out, &value, || {
                intact_text(r.entries, r.first_seq, &r.head, &gaps, &against)
            })
        }
        Err(e) if e.line == 0 && !e.truncated && e.problem.contains("No such file") => {
            Err(Failure::new(EX_NOINPUT, e, "check the path"))
        }
        Err(e) => {
            let value = AuditVerifyAnswer::Broken {
                file: e.file.display().to_string(),
                intact: false,
                line: e.line,
                problem: e.problem.clone(),
                truncated: e.truncated,
            };
            Err(verify_failure(e.to_string(), e.truncated, g, out, &value))
        }
    }
}

fn intact_text(entries: u64, first_seq: u64, head: &str, gaps: &[(u64, u64)], against: &str) -> String {
    let mut s = format!("audit log intact: {entries} entries from entry {first_seq}, head {head}; {against}");
    if !gaps.is_empty() {
        let lost: u64 = gaps.iter().map(|g| g.1).sum();
        s.push_str(&format!(
            "\nwarning: {} gap record(s): {lost} entries were never written (disk full or queue overflow), at entries {}",
            gaps.len(),
            gaps.iter().map(|g| g.0.to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    s
}

fn verify_failure(
    problem: String,
    truncated: bool,
    g: &Global,
    out: &mut dyn Write,
    value: &AuditVerifyAnswer,
) -> Failure {
    if g.json {
        // One line, sorted keys, as before.
        let _ = writeln!(out, "{}", serde_json::to_value(value).unwrap_or_default());
    }
    Failure::new(
        EX_DATAERR,
        format!("audit log broken: {problem}"),
        if truncated {
            "entries at the end were removed (the log was cut short): keep this copy as evidence"
        } else {
            "the log was edited, truncated, reordered or forged at that line: keep this copy as evidence"
        },
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(super::count(1, "key added", "keys added"), "1 key added");
        assert_eq!(super::count(0, "key added", "keys added"), "0 keys added");
        assert_eq!(super::count(2, "key added", "keys added"), "2 keys added");
    }
}
