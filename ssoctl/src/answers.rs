//! The servers' answers read for people, shared by `commands` (status) and `doctor`, so
//! neither imports the other. Imports nothing of this crate.

/// A status answer's `lag_epochs` for people: JSON null (the peer was not reached since
/// this node started) is "unknown", not "null epochs".
pub(crate) fn lag_text(lag: Option<&serde_json::Value>) -> String {
    match lag.and_then(serde_json::Value::as_u64) {
        Some(n) => format!("{n} epochs"),
        None => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    /// Found by attack: after a restart status printed "lag null epochs".
    #[test]
    fn an_unknown_lag_reads_unknown() {
        assert_eq!(super::lag_text(Some(&serde_json::Value::Null)), "unknown");
        assert_eq!(super::lag_text(None), "unknown");
        assert_eq!(super::lag_text(Some(&serde_json::json!(3))), "3 epochs");
    }
}
