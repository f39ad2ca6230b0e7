//! The servers' answers read for people, shared by `commands` (status) and `doctor`, so
//! neither imports the other. Imports nothing of this crate.

/// A status answer's `lag_epochs` for people: JSON null (the peer was not reached since
/// this node started) is "unknown", not "null epochs".
pub(crate) fn lag_text(lag: Option<u64>) -> String {
    match lag {
        Some(n) => format!("{n} epochs"),
        None => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    /// Found by attack: after a restart status printed "lag null epochs".
    #[test]
    fn an_unknown_lag_reads_unknown() {
        let null: sso_proto::wire::answers::PeerView = serde_json::from_value(serde_json::json!({
            "url": "u", "node": null, "state": "down", "last_contact": null, "peer_epoch": null,
            "lag_epochs": null, "last_error": null, "integrity_alarm": null,
        }))
        .unwrap();
        assert_eq!(super::lag_text(null.lag_epochs), "unknown");
        assert_eq!(super::lag_text(None), "unknown");
        assert_eq!(super::lag_text(Some(3)), "3 epochs");
    }
}
