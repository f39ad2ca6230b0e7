//! `sso-client`: the client library with its in-memory key cache, and the `sso-agent`
//! daemon. Arrives with the client milestone.
#![forbid(unsafe_code)]
