//! The server's rotation and watch timing, in process under tokio's paused clock
//! (`tests::in_process`): the real `sso_server::run`, a real store in a temp dir, real
//! mTLS on loopback, and a clock that moves only when the test says. Each test runs in
//! well under a second of real time whatever the pauses and deadlines it checks, and
//! every assertion about time is exact.

use std::time::Duration;

use serde_json::{Value, json};
use tests::in_process::InProcessServer;
use tests::{Pki, ServerSetup};
use tokio::time::{Instant, advance};

struct Fixture {
    /// First, so the server's task ends before its store's directory goes.
    server: InProcessServer,
    pki: Pki,
    _dir: tempfile::TempDir,
}

async fn start(edit: impl FnOnce(&mut sso_server::Config) + 'static) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let setup = ServerSetup::builder(&dir.path().join("node"), &pki, "node-a")
        .config(edit)
        .build();
    let server = InProcessServer::start(&setup, &pki).await;
    Fixture { _dir: dir, pki, server }
}

impl Fixture {
    async fn keyring(&self) -> Value {
        let reply = self
            .server
            .call(&self.pki.client("client"), "GET", "/v1/keyring", None)
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.json()
    }

    fn state_of(ring: &Value, key_id: &str) -> String {
        ring["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["key_id"] == key_id)
            .map(|k| k["state"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| format!("absent from {ring}"))
    }

    /// A watch on `epoch`, once the server holds it parked.
    async fn parked_watch(&self, epoch: u64) -> tests::in_process::Request {
        let watch = self.server.request(
            &self.pki.client("client"),
            "GET",
            &format!("/v1/keyring/watch?after={epoch}"),
            None,
        );
        self.server
            .settle("the watch is parked", |m| m.lines().any(|l| l == "sso_watches_open 1"))
            .await;
        watch
    }

    /// Waits (real time, clock still) until the keyring holds a key other than `old`, and
    /// returns its id.
    async fn staged_beside(&self, old: &str) -> String {
        let started = std::time::Instant::now();
        loop {
            let ring = self.keyring().await;
            if let Some(new) = ring["keys"].as_array().unwrap().iter().find(|k| k["key_id"] != old) {
                return new["key_id"].as_str().unwrap().to_owned();
            }
            assert!(
                started.elapsed() < tests::in_process::ANSWER_BOUND,
                "nothing staged: {ring}"
            );
            tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(10)))
                .await
                .unwrap();
        }
    }
}

/// A rotation stages its key, serves it, and promotes it when `rotation.staging_pause_ms`
/// has elapsed on the clock: not a millisecond before. The pause here is 5 s, not the
/// default 250 ms, so a server that ignored the setting would promote at 250 ms.
#[tokio::test(start_paused = true)]
async fn a_rotation_promotes_exactly_when_the_configured_staging_pause_has_elapsed() {
    let pause = Duration::from_millis(5_000);
    let f = start(move |c| c.rotation.staging_pause_ms = 5_000).await;
    let before = f.keyring().await;
    let old = before["primary"].as_str().unwrap().to_owned();

    let started = Instant::now();
    let rotate = f
        .server
        .request(&f.pki.client("admin"), "POST", "/v1/admin/rotate", Some(&json!({})));
    let new = f.staged_beside(&old).await;
    let ring = f.keyring().await;
    assert_eq!(Fixture::state_of(&ring, &new), "staged");
    assert_eq!(ring["primary"], old.as_str());
    assert_eq!(started.elapsed(), Duration::ZERO, "the clock moved by itself");

    // At the default pause, and a millisecond before the configured one: still staged.
    for at in [Duration::from_millis(250), pause - Duration::from_millis(1)] {
        advance(at - started.elapsed()).await;
        let ring = f.keyring().await;
        assert_eq!(Fixture::state_of(&ring, &new), "staged", "at {at:?}");
        assert_eq!(ring["primary"], old.as_str(), "at {at:?}");
        assert!(!rotate.is_answered(), "the rotation answered at {at:?}");
    }

    advance(Duration::from_millis(1)).await;
    let rotated = rotate.answer().await;
    assert_eq!(started.elapsed(), pause);
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    assert_eq!(rotated.json()["key_id"], new.as_str());
    let ring = f.keyring().await;
    assert_eq!(ring["primary"], new.as_str());
    assert_eq!(Fixture::state_of(&ring, &new), "primary");
}

/// A watch with nothing new answers 204 exactly at `limits.watch_max_wait_ms`, holding
/// its slot until then.
#[tokio::test(start_paused = true)]
async fn a_watch_answers_204_exactly_at_its_deadline() {
    let f = start(|c| c.limits.watch_max_wait_ms = 2_000).await;
    let epoch = f.keyring().await["epoch"].as_u64().unwrap();
    let started = Instant::now();
    let watch = f.parked_watch(epoch).await;

    advance(Duration::from_millis(1_999)).await;
    // A full round trip after the advance: the server has run every timer due by now.
    f.keyring().await;
    assert!(!watch.is_answered(), "the watch answered before its deadline");
    assert_eq!(f.server.metric("sso_watches_open").await, 1.0);

    advance(Duration::from_millis(1)).await;
    let answer = watch.answer().await;
    assert_eq!(started.elapsed(), Duration::from_millis(2_000));
    assert_eq!(answer.status, 204, "{:?}", answer.body);
    f.server
        .settle("the watch's slot is released", |m| {
            m.lines().any(|l| l == "sso_watches_open 0")
        })
        .await;
    // A graceful stop: `run` returns Ok once its shutdown future completes.
    f.server.stop().await;
}

/// A parked watch answers at once (no time passes) when a rotation stages a key, with that
/// key in the answer, while the rotation itself still waits out its staging pause.
#[tokio::test(start_paused = true)]
async fn a_watch_answers_at_once_when_a_rotation_stages_a_key() {
    let f = start(|_| {}).await;
    let before = f.keyring().await;
    let (epoch, old) = (
        before["epoch"].as_u64().unwrap(),
        before["primary"].as_str().unwrap().to_owned(),
    );
    let watch = f.parked_watch(epoch).await;

    let started = Instant::now();
    let rotate = f
        .server
        .request(&f.pki.client("admin"), "POST", "/v1/admin/rotate", Some(&json!({})));
    let watched = watch.answer().await;
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(watched.status, 200, "{:?}", watched.body);
    let watched = watched.json();
    assert!(watched["epoch"].as_u64().unwrap() > epoch, "{watched}");
    assert_eq!(watched["primary"], old.as_str(), "promoted before the pause: {watched}");
    let new = f.staged_beside(&old).await;
    assert_eq!(Fixture::state_of(&watched, &new), "staged");
    assert!(!rotate.is_answered());

    // The default staging pause, then the promote.
    advance(Duration::from_millis(250)).await;
    let rotated = rotate.answer().await;
    assert_eq!(rotated.status, 200, "{:?}", rotated.body);
    assert_eq!(f.keyring().await["primary"], new.as_str());
}
