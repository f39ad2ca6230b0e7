//! Wrapped key delivery against the real server (docs/key-delivery.md): plain answers
//! stay available to curl unless `[delivery] allow_plain = false`, which refuses them with
//! a clear error; sso-client and sso-agent always ask for wrapped keys, so they keep
//! working against such a server; a wrapped answer opens only for its own request.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use secrecy::ExposeSecret;
use sso_proto::delivery::{Binding, HEADER, Recipient};
use sso_proto::wire::agent::{OpenAnswer, SealAnswer};
use sso_proto::{KeyId, KeyState};
use tests::{Pki, ServerSetup, TestAgent, TestServer, bin};

/// The status code and the body's text (read it with `tests::wire`).
fn curl_agent(socket: &Path, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn binding(k: &serde_json::Value) -> Binding {
    Binding {
        key_id: k["key_id"].as_str().unwrap().parse::<KeyId>().unwrap(),
        generation: k["generation"].as_u64().unwrap(),
        state: serde_json::from_value::<KeyState>(k["state"].clone()).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_plain_answers_curl_clearly_and_clients_still_get_keys() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::builder(&dir.path().join("a"), &pki, "node-a")
        .config(|c| c.delivery.allow_plain = false)
        .build();
    let server = TestServer::start(&bin("sso-server"), &setup.config, &dir.path().join("a.log"));
    let cert = pki.client("client");
    let curl = tests::Client::new(server.https, &pki.ca_file, Some(&cert));

    // A plain request (what curl sends) is refused with a clear error, on every key route.
    let ring_reply = curl.get("/v1/keyring").await.unwrap();
    assert_eq!(ring_reply.status, 406, "{:?}", ring_reply.body);
    let v = ring_reply.json();
    assert_eq!(v["error"], "wrapped_delivery_required");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("Sso-Key-Wrap") && message.contains("allow_plain"),
        "{message}"
    );
    assert_eq!(curl.get("/v1/keyring/watch?after=0").await.unwrap().status, 406);

    // A malformed header gets 400 and says what is wrong.
    let bad = curl
        .request_with("GET", "/v1/keyring", None, &[(HEADER, "v2 AAAA")])
        .await
        .unwrap();
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"].as_str().unwrap().contains("v1"), "{:?}", bad.body);

    // A wrapped request is answered, and opens for its own request only.
    let recipient = Recipient::generate(&ring::rand::SystemRandom::new()).unwrap();
    let header = recipient.header_value();
    let reply = curl
        .request_with("GET", "/v1/keyring", None, &[(HEADER, header.as_str())])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    let v = reply.json();
    let k = &v["keys"][0];
    assert!(k.get("key").is_none(), "a wrapped answer carries plain material: {v}");
    let key_id = k["key_id"].as_str().unwrap().to_owned();
    let opener = recipient
        .opener(v["wrap"]["enc"].as_str().unwrap(), "/v1/keyring")
        .unwrap();
    let secret = opener.open(0, &binding(k), k["sealed"].as_str().unwrap()).unwrap();
    // The same answer under another request's context does not open.
    let recipient2 = Recipient::generate(&ring::rand::SystemRandom::new()).unwrap();
    let header2 = recipient2.header_value();
    let reply2 = curl
        .request_with(
            "GET",
            &format!("/v1/keys/{key_id}"),
            None,
            &[(HEADER, header2.as_str())],
        )
        .await
        .unwrap();
    assert_eq!(reply2.status, 200);
    let one = reply2.json();
    let foreign = recipient2
        .opener(one["wrap"]["enc"].as_str().unwrap(), "/v1/keyring")
        .unwrap();
    assert_eq!(
        foreign.open(0, &binding(&one), one["sealed"].as_str().unwrap()).err(),
        Some(sso_proto::Error::UnwrapFailed)
    );
    // Tampered: one character of the sealed text changed.
    let recipient3 = Recipient::generate(&ring::rand::SystemRandom::new()).unwrap();
    let header3 = recipient3.header_value();
    let reply3 = curl
        .request_with(
            "GET",
            &format!("/v1/keys/{key_id}"),
            None,
            &[(HEADER, header3.as_str())],
        )
        .await
        .unwrap();
    let one = reply3.json();
    let mut sealed = one["sealed"].as_str().unwrap().to_owned();
    let flipped = if sealed.starts_with('A') { "B" } else { "A" };
    sealed.replace_range(0..1, flipped);
    let opener = recipient3
        .opener(one["wrap"]["enc"].as_str().unwrap(), &format!("/v1/keys/{key_id}"))
        .unwrap();
    assert_eq!(
        opener.open(0, &binding(&one), &sealed).err(),
        Some(sso_proto::Error::UnwrapFailed)
    );

    // The release path: sso_client::Client gets the keyring, watches a rotation, fetches
    // a key on demand, all wrapped.
    let client = sso_client::Client::builder()
        .endpoint(format!("https://localhost:{}", server.https.port()))
        .ca(&pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .build()
        .unwrap();
    client.refresh().await.unwrap();
    let first = client.primary_key().await.unwrap();
    assert_eq!(first.key_id().to_string(), key_id);
    assert_eq!(first.expose_secret(), secret.expose_secret());
    drop(first);
    let sealed_old = client.seal(b"aad", b"under the first key").await.unwrap();
    let admin = tests::Client::new(server.https, &pki.ca_file, Some(&pki.client("admin")));
    let rotated = admin.post("/v1/admin/rotate", &serde_json::json!({})).await.unwrap();
    assert_eq!(rotated.status, 200);
    let new_id = rotated.json()["key_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.status().primary.map(|k| k.to_string()) != Some(new_id.clone()) {
        assert!(Instant::now() < deadline, "the watch did not bring the rotation");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second client with the watch off fetches the old key on demand (GET /v1/keys/{id}).
    let lazy = sso_client::Client::builder()
        .endpoint(format!("https://localhost:{}", server.https.port()))
        .ca(&pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .watch(false)
        .build()
        .unwrap();
    let handle = lazy.key(key_id.parse().unwrap()).await.unwrap();
    assert_eq!(handle.expose_secret(), secret.expose_secret());
    assert_eq!(lazy.open(b"aad", &sealed_old).await.unwrap(), b"under the first key");

    // sso-agent (the release binary) seals and opens against the same server.
    let agent_config = dir.path().join("agent.toml");
    let config = pki.agent_config(
        "client",
        format!("https://localhost:{}", server.https.port()),
        dir.path().join("agent.sock"),
    );
    std::fs::write(&agent_config, config.to_toml()).unwrap();
    let agent = TestAgent::start(&agent_config, &dir.path().join("agent.log"));
    let seal = [
        "-X",
        "POST",
        "http://agent/v1/seal",
        "-d",
        r#"{"plaintext":"aGVsbG8="}"#,
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    let envelope = loop {
        let (code, body) = curl_agent(&agent.socket, &seal);
        if code == 200 {
            let sealed = tests::wire::<SealAnswer>(&body);
            assert_eq!(sealed.key_id, new_id);
            break sealed.envelope;
        }
        assert!(Instant::now() < deadline, "the agent never sealed: {code} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let open_body = serde_json::json!({ "envelope": envelope }).to_string();
    let (code, body) = curl_agent(
        &agent.socket,
        &["-X", "POST", "http://agent/v1/open", "-d", open_body.as_str()],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(tests::wire::<OpenAnswer>(&body).plaintext.expose_secret())
            .unwrap(),
        b"hello"
    );

    // Keys went out, none of them plain.
    assert!(server.metric("sso_key_fetches_total") >= 4.0);
    assert_eq!(server.metric("sso_plain_key_deliveries_total"), 0.0);
    assert_eq!(
        server.metric("sso_requests_total{endpoint=\"keyring\",status=\"406\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_server_still_answers_curl_in_plain_and_counts_it() {
    let tests::OneServer {
        dir: _dir, pki, server, ..
    } = tests::one_server();
    let cert = pki.client("client");
    let curl = tests::Client::new(server.https, &pki.ca_file, Some(&cert));
    let reply = curl.get("/v1/keyring").await.unwrap();
    assert_eq!(reply.status, 200);
    let v = reply.json();
    let b64 = v["keys"][0]["key"].as_str().unwrap();
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(b64).unwrap().len(), 32);
    assert!(v.get("wrap").is_none());
    assert_eq!(server.metric("sso_plain_key_deliveries_total"), 1.0);

    // sso-client asks for wrapped delivery: the plain counter does not move.
    let client = sso_client::Client::builder()
        .endpoint(format!("https://localhost:{}", server.https.port()))
        .ca(&pki.ca_file)
        .identity(&cert.cert, &cert.key)
        .build()
        .unwrap();
    client.refresh().await.unwrap();
    assert_eq!(
        client.primary_key().await.unwrap().expose_secret().as_slice(),
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap()
            .as_slice()
    );
    assert_eq!(server.metric("sso_plain_key_deliveries_total"), 1.0);
}
