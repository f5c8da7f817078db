//! The admin API: a Unix socket (`server.admin_socket`, mode 0600) that
//! the CLI talks to while the daemon runs. One JSON request per line, one
//! JSON reply per line. It runs on the daemon's control runtime, never on
//! the proxy's workers.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream as StdUnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// The longest admin request line (a CLI command line in JSON).
const MAX_REQUEST: u64 = 1 << 20;
/// How long the daemon waits for a connected client's next request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the CLI waits for the daemon's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the CLI asks the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Re-read and apply the config file (like SIGHUP).
    Reload,
    /// Every backend with its load and state.
    Backends,
    /// Take a backend out of rotation (`on = true`) or back in.
    Drain { url: String, on: bool },
    /// A kernel-policy CLI command (block, allow, limits, stats, top), run
    /// by the daemon: `args` is the command line after `gateway`.
    Cli { args: Vec<String> },
}

/// The daemon's answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    /// What went wrong, one problem per entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Reply {
    pub fn ok(data: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            errors: Vec::new(),
            data,
        }
    }

    pub fn failed(errors: Vec<String>) -> Reply {
        Reply {
            ok: false,
            errors,
            data: serde_json::Value::Null,
        }
    }
}

/// What answers requests: the daemon.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request) -> Reply;
}

/// A usage error (exit 2) when a daemon answers on `path` already.
pub fn refuse_if_answering(path: &Path) -> Result<()> {
    if StdUnixStream::connect(path).is_ok() {
        return Err(crate::error::UsageError(format!(
            "another gateway answers on {} (server.admin_socket); stop it first",
            path.display()
        ))
        .into());
    }
    Ok(())
}

/// Listens on `path` until the process ends. A stale socket file from a
/// previous run is replaced; a live one (another daemon) is an error.
pub async fn serve(path: PathBuf, handler: Arc<dyn Handler>) -> Result<()> {
    refuse_if_answering(&path)?;
    let _ = std::fs::remove_file(&path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&path).with_context(|| {
        format!(
            "binding the admin socket {} (server.admin_socket)",
            path.display()
        )
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("admin socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = tokio::io::BufReader::new(r);
                let mut line = String::new();
                loop {
                    line.clear();
                    // One request per line, each within a minute and a
                    // bounded size: a client that sends nothing, or no end
                    // of line, holds nothing for long.
                    let mut limited = tokio::io::AsyncReadExt::take(&mut r, MAX_REQUEST + 1);
                    match tokio::time::timeout(REQUEST_TIMEOUT, limited.read_line(&mut line)).await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                        Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST => {
                            let _ = w
                                .write_all(
                                    b"{\"ok\":false,\"errors\":[\"admin request too large\"]}\n",
                                )
                                .await;
                            break;
                        }
                        Ok(Ok(_)) => {}
                    }
                    let reply = match serde_json::from_str::<Request>(line.trim_end()) {
                        Ok(req) => {
                            let h = Arc::clone(&handler);
                            tokio::task::spawn_blocking(move || h.handle(req))
                                .await
                                .unwrap_or_else(|e| {
                                    Reply::failed(vec![format!("the handler failed: {e}")])
                                })
                        }
                        Err(e) => Reply::failed(vec![format!("bad admin request: {e}")]),
                    };
                    let mut out = serde_json::to_vec(&reply).expect("replies encode");
                    out.push(b'\n');
                    if w.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Sends one request to the daemon. `Ok(None)`: no daemon listens there.
pub fn call(path: &Path, req: &Request) -> Result<Option<Reply>> {
    let mut stream = match StdUnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "connecting to the admin socket {} (permission?)",
                    path.display()
                )
            })
        }
    };
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    match BufReader::new(stream).read_line(&mut reply) {
        Ok(0) => anyhow::bail!(
            "the daemon closed the admin connection without answering (did it exit? see its log)"
        ),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            anyhow::bail!(
                "the daemon did not answer within {} s; the command may still take effect \
                 (see `gateway status` and the daemon's log)",
                REPLY_TIMEOUT.as_secs()
            )
        }
        Err(e) => return Err(e).context("reading the daemon's reply"),
    }
    Ok(Some(
        serde_json::from_str(&reply).context("the daemon's reply is not valid JSON")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Handler for Echo {
        fn handle(&self, req: Request) -> Reply {
            Reply::ok(serde_json::to_value(&req).unwrap())
        }
    }

    fn socket(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gw-admin-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("admin.sock")
    }

    #[tokio::test]
    async fn requests_are_answered_and_oversized_ones_refused() {
        let path = socket("sizes");
        serve(path.clone(), Arc::new(Echo)).await.unwrap();
        let p = path.clone();
        let reply = tokio::task::spawn_blocking(move || call(&p, &Request::Backends))
            .await
            .unwrap()
            .unwrap()
            .expect("the daemon answers");
        assert!(reply.ok, "{reply:?}");
        // A second daemon on the same socket is refused before it serves.
        let e = refuse_if_answering(&path).unwrap_err();
        assert!(e.is::<crate::error::UsageError>(), "{e:#}");
        // A line longer than any request, with no end: refused, and the
        // connection closed, without reading on.
        let p = path.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let mut s = StdUnixStream::connect(&p).unwrap();
            let _ = s.write_all(&vec![b'x'; (MAX_REQUEST + 4096) as usize]);
            let mut out = String::new();
            let _ = std::io::Read::read_to_string(&mut s, &mut out);
            out
        })
        .await
        .unwrap();
        assert!(answer.contains("admin request too large"), "{answer}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn a_daemon_that_closes_without_answering_is_said_so() {
        let path = socket("closes");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line).unwrap();
        });
        let e = call(&path, &Request::Reload).unwrap_err();
        assert!(
            format!("{e:#}").contains("closed the admin connection without answering"),
            "{e:#}"
        );
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
