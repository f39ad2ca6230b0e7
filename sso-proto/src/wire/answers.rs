//! The JSON answers that carry no key material: errors, and the admin answers (rotate,
//! retire, destroy, status, restore, audit verify, health). The server writes each through
//! its type here with `serde_json`; ssoctl and the peer read it back through the same
//! type. Fields are declared in alphabetical order, the order the server's `json!` bodies
//! always had (serde_json sorts an object's keys), so the bytes did not change.

use serde::{Deserialize, Serialize};

/// Every refusal: `{"error": CODE, "message": …}` (docs/operations.md, the error table).
/// The message never holds key material.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The stable error code.
    #[serde(default)]
    pub error: String,
    /// What went wrong and what to do.
    #[serde(default)]
    pub message: String,
}
