//! The systemd readiness protocol (`sd_notify(3)`): with `Type=notify`,
//! systemd holds `systemctl start` (and units ordered after this one) until
//! the daemon says it serves, and shows its `STATUS=` line. A datagram to
//! the socket named by `$NOTIFY_SOCKET` (a path, or an abstract name
//! starting with `@`); without that variable (not run by systemd) nothing
//! is sent. Failures are logged, never fatal: the daemon serves anyway.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (newline-separated `KEY=value` assignments).
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::warn!(
            "telling systemd {:?} on {}: {e}",
            state.lines().next().unwrap_or_default(),
            path.to_string_lossy()
        );
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::{linux::net::SocketAddrExt as _, unix::ffi::OsStrExt as _};
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}
