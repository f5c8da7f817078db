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

/// Listens on `path` until the process ends. A stale socket file from a
/// previous run is replaced; a live one (another daemon) is an error.
pub async fn serve(path: PathBuf, handler: Arc<dyn Handler>) -> Result<()> {
    if StdUnixStream::connect(&path).is_ok() {
        anyhow::bail!(
            "another gateway answers on {} (server.admin_socket); stop it first",
            path.display()
        );
    }
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
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = match serde_json::from_str::<Request>(&line) {
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
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .context("reading the daemon's reply")?;
    Ok(Some(
        serde_json::from_str(&reply).context("the daemon's reply is not valid JSON")?,
    ))
}
