//! Errors that decide an outcome: `UsageError` (exit code 2 for the CLI) and
//! `ProxyError`, every way a request can fail, turned into an OpenAI-shaped
//! HTTP response in exactly one place (`ProxyError::response`).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// An error caused by what the operator asked for; exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error chain.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if e.chain()
        .any(|c| c.is::<UsageError>() || c.is::<crate::config::ConfigError>())
    {
        2
    } else {
        1
    }
}

/// Why a request failed. The message is safe to show the client; internal
/// detail goes to the log only.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid API key: pass it as `Authorization: Bearer <key>` or `x-api-key`")]
    Unauthorized,
    #[error("missing API key: pass it as `Authorization: Bearer <key>` or `x-api-key`")]
    MissingKey,
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("could not read the request body")]
    BodyRead,
    #[error("the request body stalled: nothing arrived for {}", crate::config::duration::format(*.0))]
    BodyTimeout(std::time::Duration),
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("request body is not a valid form: {0}")]
    InvalidForm(String),
    #[error("request body must be a JSON object with a \"model\" string")]
    MissingModel,
    #[error("this API key may not use model {0:?}")]
    ModelNotAllowed(String),
    #[error("model {0:?} does not exist (GET /v1/models lists the available ones)")]
    UnknownModel(String),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed on {0}")]
    MethodNotAllowed(String),
    #[error("all backends of model {model:?} are at capacity; retry later")]
    Overloaded {
        model: String,
        retry_after_secs: u32,
    },
    #[error("model {0:?} has no healthy backend; retry later")]
    NoBackend(String),
    #[error("rate limit reached for this API key: {}; retry after {}s", .kind.name(), retry_after_secs(*.retry_after))]
    RateLimited {
        kind: crate::pipeline::limits::Kind,
        retry_after: std::time::Duration,
        headers: crate::pipeline::limits::RateHeaders,
    },
    #[error("request URI is longer than {0} bytes")]
    UriTooLong(usize),

    #[error("the upstream server could not be reached")]
    UpstreamConnect(String),
    #[error("the upstream server sent an invalid response")]
    UpstreamBadResponse(String),
    #[error("the upstream server did not answer in time")]
    UpstreamTimeout(String),
    /// The backend could not be connected to in time (the request never
    /// reached it).
    #[error("the upstream server did not answer in time")]
    ConnectTimeout(String),
    /// The request was sent but its answer's head did not come within
    /// `first_byte` (for a non-stream request: its whole generation).
    #[error("the upstream server did not answer in time")]
    AnswerTimeout(String),
}

impl ProxyError {
    /// Status, OpenAI error `type` and `code`.
    pub fn class(&self) -> (StatusCode, &'static str, &'static str) {
        use ProxyError::*;
        match self {
            Unauthorized | MissingKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
            ),
            BodyTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
            ),
            BodyRead => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_body",
            ),
            BodyTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "request_timeout",
            ),
            InvalidJson(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_json",
            ),
            InvalidForm(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_form",
            ),
            MissingModel => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "missing_model",
            ),
            ModelNotAllowed(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "model_not_allowed",
            ),
            UnknownModel(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
            ),
            Overloaded { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "overloaded",
            ),
            NoBackend(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_backend",
            ),
            RateLimited { kind, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                kind.name(),
                "rate_limit_exceeded",
            ),
            UriTooLong(_) => (
                StatusCode::URI_TOO_LONG,
                "invalid_request_error",
                "uri_too_long",
            ),

            UpstreamConnect(_) => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                "upstream_unreachable",
            ),
            UpstreamBadResponse(_) => (
                StatusCode::BAD_GATEWAY,
                "server_error",
                "bad_upstream_response",
            ),
            UpstreamTimeout(_) | ConnectTimeout(_) | AnswerTimeout(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "upstream_timeout",
            ),
        }
    }

    /// Internal detail for the log (never sent to the client).
    pub fn detail(&self) -> Option<&str> {
        match self {
            ProxyError::UpstreamConnect(d)
            | ProxyError::UpstreamBadResponse(d)
            | ProxyError::UpstreamTimeout(d)
            | ProxyError::ConnectTimeout(d)
            | ProxyError::AnswerTimeout(d) => Some(d),
            _ => None,
        }
    }

    /// The one place a request error becomes an HTTP response.
    pub fn response(&self) -> Response<Bytes> {
        let (status, kind, code) = self.class();
        let mut r = Response::new(error_body(&self.to_string(), kind, code));
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ProxyError::Overloaded {
            retry_after_secs, ..
        } = self
        {
            h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        } else if let ProxyError::RateLimited {
            retry_after,
            headers,
            ..
        } = self
        {
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(*retry_after)),
            );
            for (n, v) in &headers.0 {
                h.insert(n.clone(), v.clone());
            }
        } else if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let ProxyError::MethodNotAllowed(path) = self {
            let allow = if path == "/v1/models" {
                "GET, HEAD"
            } else {
                "POST"
            };
            h.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        r
    }
}

/// Whole seconds for Retry-After, rounded up, at least 1.
fn retry_after_secs(d: std::time::Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// `{"error":{"message":...,"type":...,"param":null,"code":...}}`
/// An upstream error answer in OpenAI's shape, or `None` when it is in it
/// already (`{"error": {...}}`). Backends answer errors in their own
/// shapes: TGI `{"error": "...", "error_type": "..."}`, older vLLM
/// `{"object": "error", "message": ..., "type": ..., "code": ...}`,
/// FastAPI `{"detail": ...}`, a proxy in between an HTML page. The message,
/// type and code are taken from what the body says, else from the status.
pub fn openai_error(status: http::StatusCode, body: &[u8]) -> Option<Bytes> {
    let json: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_slice(body).ok();
    if json
        .as_ref()
        .is_some_and(|m| m.get("error").is_some_and(|e| e.is_object()))
    {
        return None;
    }
    let text = |v: Option<&serde_json::Value>| -> Option<String> {
        match v? {
            serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
            serde_json::Value::Null => None,
            serde_json::Value::String(_) => None,
            other => Some(other.to_string()),
        }
    };
    let get = |k: &str| json.as_ref().and_then(|m| text(m.get(k)));
    let message = get("error")
        .or_else(|| get("message"))
        .or_else(|| get("detail"))
        .or_else(|| {
            let raw = String::from_utf8_lossy(body);
            let raw = raw.trim();
            (!raw.is_empty()).then(|| raw.chars().take(1024).collect())
        })
        .unwrap_or_else(|| {
            format!(
                "the upstream server answered {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            )
            .trim_end()
            .to_owned()
        });
    let kind = get("error_type")
        .or_else(|| get("type"))
        .unwrap_or_else(|| {
            if status.is_client_error() {
                "invalid_request_error".into()
            } else {
                "server_error".into()
            }
        });
    let code = json
        .as_ref()
        .and_then(|m| m.get("code"))
        .filter(|c| c.is_string() || c.is_number())
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let v = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    Some(Bytes::from(serde_json::to_vec(&v).expect("JSON")))
}

pub fn error_body(message: &str, kind: &str, code: &str) -> Bytes {
    let v = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    Bytes::from(serde_json::to_vec(&v).expect("JSON of strings"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_in_other_shapes_are_put_in_openai_s() {
        use http::StatusCode as S;
        let shaped = |s: S, body: &str| -> serde_json::Value {
            serde_json::from_slice(&openai_error(s, body.as_bytes()).expect("rewritten")).unwrap()
        };
        // OpenAI's own shape passes as it is.
        assert_eq!(
            openai_error(
                S::BAD_REQUEST,
                br#"{"error":{"message":"m","type":"t","param":null,"code":"c"}}"#
            ),
            None
        );
        let tgi = shaped(
            S::UNPROCESSABLE_ENTITY,
            r#"{"error":"Input validation error: max_new_tokens too large","error_type":"validation"}"#,
        );
        assert_eq!(
            tgi["error"]["message"],
            "Input validation error: max_new_tokens too large"
        );
        assert_eq!(tgi["error"]["type"], "validation");
        let vllm = shaped(
            S::BAD_REQUEST,
            r#"{"object":"error","message":"context length exceeded","type":"BadRequestError","param":null,"code":400}"#,
        );
        assert_eq!(
            (
                vllm["error"]["message"].clone(),
                vllm["error"]["code"].clone()
            ),
            ("context length exceeded".into(), 400.into())
        );
        let fastapi = shaped(S::NOT_FOUND, r#"{"detail":"Not Found"}"#);
        assert_eq!(fastapi["error"]["message"], "Not Found");
        assert_eq!(fastapi["error"]["type"], "invalid_request_error");
        let html = shaped(S::BAD_GATEWAY, "<html><body>502 Bad Gateway</body></html>");
        assert_eq!(
            html["error"]["message"],
            "<html><body>502 Bad Gateway</body></html>"
        );
        assert_eq!(html["error"]["type"], "server_error");
        let empty = shaped(S::SERVICE_UNAVAILABLE, "");
        assert_eq!(
            empty["error"]["message"],
            "the upstream server answered 503 Service Unavailable"
        );
        assert!(empty["error"]["param"].is_null() && empty["error"]["code"].is_null());
    }

    #[test]
    fn openai_shape_and_headers() {
        let r = ProxyError::Overloaded {
            model: "m".into(),
            retry_after_secs: 2,
        }
        .response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["error"]["code"], "overloaded");
        assert_eq!(v["error"]["type"], "server_error");
        assert!(v["error"]["param"].is_null());
        let r = ProxyError::Unauthorized.response();
        assert_eq!(r.status(), 401);
        let r = ProxyError::MissingKey.response();
        assert_eq!(r.status(), 401);
        let r = ProxyError::MethodNotAllowed("/v1/embeddings".into()).response();
        assert_eq!(
            (r.status().as_u16(), &r.headers()[header::ALLOW]),
            (405, &HeaderValue::from_static("POST"))
        );
        let r = ProxyError::UpstreamConnect("10.0.0.1:80: connection refused".into()).response();
        let body = String::from_utf8_lossy(r.body());
        assert!(
            !body.contains("10.0.0.1"),
            "internal detail must not leak: {body}"
        );
    }
}
