//! What a peer is told about a JSON body that did not parse.
//!
//! serde's syntax messages name only a position, but its data messages quote the value
//! they refused ("invalid type: integer `987654321012`, expected a string"), and in this
//! product that value may be a password or a plaintext. Every JSON body from outside is
//! described through [`describe_error`], which keeps field names and positions and never
//! a value.

/// A message for a body that `serde_json` refused, safe to send back and to log.
pub fn describe_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => format!("malformed JSON body: {e}"),
        Category::Data => {
            let text = e.to_string();
            // Missing and unknown fields quote the field's name, not a value.
            if text.starts_with("missing field") || text.starts_with("unknown field") {
                return format!("malformed JSON body: {text}");
            }
            format!(
                "malformed JSON body: a field has the wrong type or value at line {} column {} \
                 (the value is not repeated: it may be a secret)",
                e.line(),
                e.column(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::describe_error;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        password: String,
        #[serde(default)]
        count: u8,
    }

    fn refused(text: &str) -> String {
        describe_error(&serde_json::from_str::<Body>(text).unwrap_err())
    }

    #[test]
    fn refused_values_are_never_quoted() {
        for body in [
            r#"{"password": 987654321012}"#,
            r#"{"password": [987654321012]}"#,
            r#"{"password": {"987654321012": 1}}"#,
            r#"{"password": "x", "count": 987654321012}"#,
            r#"{"password": "x", "count": "987654321012"}"#,
            r#"{"password": true, "count": 987654321012}"#,
        ] {
            let message = refused(body);
            assert!(!message.contains("987654321012"), "{body}: {message}");
            assert!(message.contains("line 1"), "{body}: {message}");
        }
    }

    #[test]
    fn syntax_missing_and_unknown_fields_keep_serde_s_words() {
        assert!(refused("{not json").contains("key must be a string at line 1"));
        assert!(refused("{}").contains("missing field `password`"));
        assert!(refused(r#"{"password": "x", "other": 1}"#).contains("unknown field `other`"));
    }
}
