//! Support for L7 tests: an in-process gateway in front of `mock-llm`s,
//! HTTP clients (HTTP/1.1, h2c, TLS with ALPN), and a metrics reader.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use gateway::{config::Config, server::Gateway};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HyperClient},
    rt::TokioExecutor,
};

use crate::TempDir;

/// Keys of the test config: `team-a` may use every model, `team-b` only
/// models matching `other-*`.
pub const KEY_A: &str = "sk-test-team-a";
pub const KEY_B: &str = "sk-test-team-b";

pub fn sha256_hex(s: &str) -> String {
    gateway::pipeline::auth::digest_hex(s)
}

/// A `[[models]]` block with the given backends (`(url, weight, max_connections)`).
pub fn model_toml(name: &str, extra: &str, backends: &[(String, u32, Option<u32>)]) -> String {
    let mut s = format!("[[models]]\nname = \"{name}\"\n{extra}\n");
    for (url, weight, max) in backends {
        s.push_str(&format!(
            "[[models.backends]]\nurl = \"{url}\"\nweight = {weight}\n"
        ));
        if let Some(m) = max {
            s.push_str(&format!("max_connections = {m}\n"));
        }
    }
    s
}

/// An in-process gateway on 127.0.0.1:0 with a metrics listener.
pub struct TestGateway {
    pub gw: Option<Gateway>,
    pub url: String,
    pub metrics_url: String,
    _dir: TempDir,
}

impl TestGateway {
    /// Starts a gateway; `server_extra` goes into `[server]`, `models` after
    /// the keys.
    pub async fn start(server_extra: &str, models: &str) -> TestGateway {
        // Access logs land in the test's captured output, shown on failure.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("info")
            .try_init();
        let dir = TempDir::new("l7");
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nstate_dir = \"{state}\"\n{server_extra}\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\
             [[keys]]\nname = \"team-a\"\nsha256 = \"{a}\"\nmodels = [\"*\"]\n\
             [[keys]]\nname = \"team-b\"\nsha256 = \"{b}\"\nmodels = [\"other-*\"]\n\
             {models}",
            state = dir.0.join("state").display(),
            a = sha256_hex(KEY_A),
            b = sha256_hex(KEY_B),
        );
        let cfg =
            Config::parse(&text).unwrap_or_else(|p| panic!("test config invalid: {p:?}\n{text}"));
        let gw = Gateway::start(&cfg).await.expect("starting the gateway");
        let scheme = if cfg.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        TestGateway {
            url: format!("{scheme}://{}", gw.addrs[0]),
            metrics_url: format!("http://{}/metrics", gw.metrics_addr),
            gw: Some(gw),
            _dir: dir,
        }
    }

    /// The Prometheus text exposition.
    pub async fn metrics(&self) -> String {
        let c = Client::http1();
        let r = c.get(&self.metrics_url, None).await;
        assert_eq!(r.status, 200);
        String::from_utf8(r.body.to_vec()).expect("UTF-8 metrics")
    }
}

/// The value of the sample `name{labels}` (labels in exposition order).
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// A collected response.
pub struct Collected {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub version: http::Version,
    pub body: Bytes,
}

impl Collected {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The OpenAI error code of an error response.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// An HTTP client for tests.
#[derive(Clone)]
pub struct Client(HyperClient<Connector, Full<Bytes>>);

impl Client {
    fn build(tls: Option<rustls::ClientConfig>, h2_only: bool) -> Client {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = tls.unwrap_or_else(|| {
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
        let conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let mut b = HyperClient::builder(TokioExecutor::new());
        b.pool_idle_timeout(Duration::from_secs(30));
        if h2_only {
            b.http2_only(true);
        }
        Client(b.build(conn))
    }

    pub fn http1() -> Client {
        Self::build(None, false)
    }

    /// HTTP/2 with prior knowledge over clear text.
    pub fn h2c() -> Client {
        Self::build(None, true)
    }

    /// TLS trusting `ca_der`; the connector offers h2 and http/1.1 by ALPN.
    pub fn tls(ca_der: &[u8]) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
            .expect("test CA");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self::build(Some(cfg), false)
    }

    /// Sends a request; returns the response with its body unread.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Response<Incoming> {
        self.0
            .request(req)
            .await
            .expect("request to the gateway failed")
    }

    /// The status of a keyless GET, or why the request could not be made
    /// (a TLS handshake the client refused, say).
    pub async fn try_status(&self, url: &str) -> Result<http::StatusCode, String> {
        let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        self.0
            .request(req)
            .await
            .map(|r| r.status())
            .map_err(|e| format!("{e:?}"))
    }

    pub async fn get(&self, url: &str, key: Option<&str>) -> Collected {
        let mut b = Request::get(url);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        collect(self.send(b.body(Full::new(Bytes::new())).unwrap()).await).await
    }

    /// POSTs a body (JSON unless `headers` give a content type) with the
    /// key and extra headers; returns the response with its body unread.
    pub async fn post_raw(
        &self,
        url: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Response<Incoming> {
        let mut b = Request::post(url);
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            b = b.header("content-type", "application/json");
        }
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        self.send(b.body(Full::new(body)).unwrap()).await
    }

    pub async fn post(
        &self,
        url: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> Collected {
        collect(
            self.post_raw(url, key, headers, Bytes::from(body.to_string()))
                .await,
        )
        .await
    }
}

pub async fn collect(r: Response<Incoming>) -> Collected {
    let (parts, body) = r.into_parts();
    // A body that fails is a failure of the test, not an empty body.
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_else(|e| panic!("the response body ({}) failed: {e}", parts.status));
    Collected {
        status: parts.status,
        headers: parts.headers,
        version: parts.version,
        body,
    }
}

/// A chat request body.
pub fn chat(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "tell me about edge gateways"}],
    })
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
