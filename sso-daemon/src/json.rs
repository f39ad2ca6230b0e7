//! The JSON side of the daemons' HTTP services: `sso-server`'s API (SPEC §5) and
//! `sso-agent`'s socket.
//!
//! - [`JsonError`]: a refused request, answered as `{"error": CODE, "message": …}`.
//! - [`reply`] / [`reply_answer`]: a JSON answer (`Content-Type: application/json`,
//!   `Cache-Control: no-store`); [`reply_answer`] writes a wire type (`sso_proto::wire`)
//!   with its keys sorted, as both daemons always have. There is no untyped answer: a body
//!   is a wire type, or bytes a `sso_proto::wire` writer made.
//! - [`parse`]: a request body into a type; a refused value is never repeated (it may be
//!   a password or a plaintext: [`sso_proto::json::describe_error`]).
//! - [`read_body`]: the request body within a size and a time limit, into a
//!   [`Zeroizing`] buffer.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, header};
use zeroize::Zeroizing;

/// The response body type of every JSON answer.
pub type Body = Full<Bytes>;

/// A refused or failed request, as the caller sees it: status, a stable code, a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable error code (docs/operations.md, the error table).
    pub code: &'static str,
    /// What went wrong and what to do; never key material.
    pub message: String,
}

impl JsonError {
    /// A refusal with its status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A 500 `internal`: the details are in the log, never in the answer.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the server log",
        )
    }

    /// The body alone: `{"error": CODE, "message": …}` (kept as is for a replay, or sent
    /// with other headers).
    pub fn body(&self) -> Bytes {
        let body = sso_proto::wire::ErrorBody {
            error: self.code.into(),
            message: self.message.clone(),
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The answer: `{"error": CODE, "message": …}` with the status.
    pub fn response(&self) -> Response<Body> {
        reply(self.status, self.body())
    }
}

/// A JSON answer with `body` already serialised.
pub fn reply(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    resp
}

/// A JSON answer from its wire type (`sso_proto::wire`): through a `serde_json::Value`, so
/// its keys come out sorted, as every `json!` body of both daemons' did (the server's
/// answers are pinned by `sso-proto/src/wire/tests.rs`, the agent's by
/// `the_agent_answers_are_the_bytes_it_wrote_before`). A value that cannot be written is
/// logged and answered 500 `internal`.
pub fn reply_answer<T: serde::Serialize>(status: StatusCode, answer: &T) -> Response<Body> {
    match serde_json::to_value(answer) {
        Ok(value) => reply(status, Bytes::from(serde_json::to_vec(&value).unwrap_or_default())),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise an answer");
            JsonError::internal().response()
        }
    }
}

/// Parses a request body; a refusal names the field and position, never the value.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, JsonError> {
    serde_json::from_slice(body).map_err(|e| JsonError::bad_request(sso_proto::json::describe_error(&e)))
}

/// The bounds of one request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest body accepted, in bytes (413 `payload_too_large` beyond).
    pub max_bytes: usize,
    /// Time for the whole body to arrive (408 `timeout` beyond).
    pub timeout: Duration,
}

/// 413 for a body over `limit` bytes.
pub fn too_large(limit: usize) -> JsonError {
    JsonError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request bodies are limited to {limit} bytes"),
    )
}

/// Reads the request body within `limits` into a buffer that is wiped when dropped
/// (admin bodies carry passwords, the agent's carry plaintexts).
///
/// No copy is left behind in memory this function controls: the output grows by moving
/// into a larger `Zeroizing` buffer (the old one is wiped as it drops, where `Vec`'s own
/// growth would free it unwiped), and each frame is wiped once copied when this is its
/// only owner. A frame still shared with hyper's read buffer cannot be wiped from here;
/// hyper reuses that buffer for the connection's next reads. On a timeout or an error the
/// partial buffer is wiped too. Test: `sso-daemon/tests/body_wipe.rs` scans every heap
/// block freed while a multi-frame body is read.
pub async fn read_body<B>(req: Request<B>, limits: BodyLimits) -> Result<Zeroizing<Vec<u8>>, JsonError>
where
    B: hyper::body::Body<Data = Bytes>,
{
    let limit = limits.max_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let read = async {
        // A declared length sizes the buffer, up to 64 KiB before any byte has arrived.
        let mut out = Zeroizing::new(Vec::with_capacity(declared.unwrap_or(0).min(64 << 10)));
        let mut body = std::pin::pin!(req.into_body());
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| JsonError::bad_request("could not read the request body"))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers carry nothing we read
            };
            let appended = append(&mut out, &data, limit);
            wipe(data);
            appended?;
        }
        Ok(out)
    };
    tokio::time::timeout(limits.timeout, read).await.map_err(|_| {
        JsonError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request body arrived too slowly",
        )
    })?
}

/// Appends `data` to `out` within `limit`, growing `out` by moving it into a larger
/// wiped-on-drop buffer, never by `Vec`'s reallocation (which frees the old block as is).
fn append(out: &mut Zeroizing<Vec<u8>>, data: &[u8], limit: usize) -> Result<(), JsonError> {
    let need = out
        .len()
        .checked_add(data.len())
        .filter(|&n| n <= limit)
        .ok_or_else(|| too_large(limit))?;
    if need > out.capacity() {
        let mut grown = Zeroizing::new(Vec::with_capacity(
            need.max(out.capacity().saturating_mul(2)).min(limit),
        ));
        grown.extend_from_slice(out);
        *out = grown; // the old buffer is wiped as it drops
    }
    out.extend_from_slice(data); // within capacity: no reallocation
    Ok(())
}

/// Wipes a frame's bytes when we are their only owner.
fn wipe(data: Bytes) {
    use zeroize::Zeroize;
    if let Ok(mut owned) = data.try_into_mut() {
        owned[..].zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_keeps_within_the_limit_and_refuses_beyond() {
        let mut out = Zeroizing::new(Vec::new());
        append(&mut out, &[1; 10], 16).unwrap();
        append(&mut out, &[2; 6], 16).unwrap();
        assert_eq!(out.len(), 16);
        assert!(out.capacity() <= 16);
        assert_eq!(append(&mut out, &[3], 16).unwrap_err().code, "payload_too_large");
    }

    fn limits(max_bytes: usize) -> BodyLimits {
        BodyLimits {
            max_bytes,
            timeout: Duration::from_secs(1),
        }
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let req = Request::builder()
            .header(header::CONTENT_LENGTH, "17")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let e = read_body(req, limits(16)).await.unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"));
    }

    #[tokio::test]
    async fn an_undeclared_body_over_the_limit_is_refused() {
        let req = Request::new(Full::new(Bytes::from(vec![0u8; 17])));
        let e = read_body(req, limits(16)).await.unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        let req = Request::new(Full::new(Bytes::from(vec![7u8; 16])));
        assert_eq!(&read_body(req, limits(16)).await.unwrap()[..], &[7u8; 16]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_times_out() {
        struct Never;
        impl hyper::body::Body for Never {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
                std::task::Poll::Pending
            }
        }
        let e = read_body(Request::new(Never), limits(16)).await.unwrap_err();
        assert_eq!((e.status, e.code), (StatusCode::REQUEST_TIMEOUT, "timeout"));
    }

    #[test]
    fn errors_are_the_json_error_body() {
        let resp = JsonError::bad_request("no").response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    }

    async fn body_of(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Both daemons' answers come out with sorted keys, whatever the type's field order.
    #[tokio::test]
    async fn an_answer_is_written_with_sorted_keys() {
        #[derive(serde::Serialize)]
        struct Out {
            zulu: u8,
            alpha: &'static str,
            mike: Option<u8>,
        }
        let resp = reply_answer(
            StatusCode::CREATED,
            &Out {
                zulu: 1,
                alpha: "a",
                mike: None,
            },
        );
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(body_of(resp).await, r#"{"alpha":"a","mike":null,"zulu":1}"#);
    }

    /// An answer that cannot be written is a 500 `internal`, not an empty 200.
    #[tokio::test]
    async fn an_answer_that_cannot_be_written_is_an_internal_error() {
        struct Broken;
        impl serde::Serialize for Broken {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        let resp = reply_answer(StatusCode::OK, &Broken);
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            body_of(resp).await,
            r#"{"error":"internal","message":"internal error; see the server log"}"#
        );
    }

    #[test]
    fn a_refused_value_is_not_repeated() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct R {
            password: String,
        }
        let e = parse::<R>(br#"{"password": 123456789}"#).unwrap_err();
        assert!(!e.message.contains("123456789"), "{}", e.message);
    }
}
