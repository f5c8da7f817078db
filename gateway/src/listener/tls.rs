//! TLS termination with rustls: PEM certificate chain and key from the
//! config, ALPN offering HTTP/2 then HTTP/1.1, and session resumption.

use std::{
    fs::File,
    io::BufReader,
    path::Path,
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context as _, Result};
use rustls::server::{ProducesTickets, StoresServerSessions};
use sha2::Digest as _;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// TLS 1.2 sessions kept by id (TLS 1.3 and most TLS 1.2 clients resume
/// from tickets, which the server does not store).
const SESSION_CACHE: usize = 16 * 1024;

/// What lets a returning client skip the full handshake: the ticket keys
/// (rotated every 6 hours by rustls; a ticket lives as long) and the TLS
/// 1.2 session cache. Shared by the acceptors a reload builds for the same
/// certificate and key, so reloading the config does not cost every client
/// a full handshake; made anew for a different pair, so that sessions of a
/// replaced (perhaps compromised) key end with it.
struct Resumption {
    /// SHA-256 over the certificate chain and the key.
    pair: [u8; 32],
    tickets: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
}

static RESUMPTION: Mutex<Option<Resumption>> = Mutex::new(None);

fn resumption(
    certs: &[rustls::pki_types::CertificateDer<'_>],
    key: &rustls::pki_types::PrivateKeyDer<'_>,
) -> Result<(Arc<dyn ProducesTickets>, Arc<dyn StoresServerSessions>)> {
    let mut h = sha2::Sha256::new();
    for c in certs {
        h.update((c.len() as u64).to_be_bytes());
        h.update(c.as_ref());
    }
    h.update(key.secret_der());
    let pair: [u8; 32] = h.finalize().into();
    let mut g = RESUMPTION.lock().unwrap_or_else(|p| p.into_inner());
    match g.as_ref() {
        Some(r) if r.pair == pair => {}
        _ => {
            *g = Some(Resumption {
                pair,
                tickets: rustls::crypto::ring::Ticketer::new()
                    .context("making the TLS session ticket keys")?,
                sessions: rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE),
            })
        }
    }
    let r = g.as_ref().expect("set above");
    Ok((Arc::clone(&r.tickets), Arc::clone(&r.sessions)))
}

/// Builds the acceptor; a missing or unreadable file is an error naming it.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor> {
    let certs = read_certs(&cfg.cert)?;
    let key = read_key(&cfg.key)?;
    let (tickets, sessions) = resumption(&certs, &key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("configuring TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "server.tls: {} and {} do not form a usable pair",
                cfg.cert.display(),
                cfg.key.display()
            )
        })?;
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    sc.ticketer = tickets;
    sc.session_storage = sessions;
    Ok(TlsAcceptor::from(Arc::new(sc)))
}

fn open(path: &Path, what: &str) -> Result<BufReader<File>> {
    File::open(path)
        .map(BufReader::new)
        .with_context(|| format!("server.tls.{what}: cannot open {}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(path, "cert")?)
        .collect::<Result<_, _>>()
        .with_context(|| format!("server.tls.cert: {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "server.tls.cert: {} holds no PEM certificate",
            path.display()
        );
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut open(path, "key")?)
        .with_context(|| format!("server.tls.key: {} is not valid PEM", path.display()))?
        .with_context(|| format!("server.tls.key: {} holds no private key", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_bad_files_name_the_path() {
        let cfg = TlsConfig {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let e = format!("{:#}", acceptor(&cfg).err().expect("must fail"));
        assert!(
            e.contains("server.tls.cert") && e.contains("/nonexistent/cert.pem"),
            "{e}"
        );
        let dir = std::env::temp_dir().join(format!("gw-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, "not pem at all\n").unwrap();
        let cfg = TlsConfig {
            cert: cert.clone(),
            key: dir.join("missing-key.pem"),
        };
        let e = format!("{:#}", acceptor(&cfg).err().expect("must fail"));
        assert!(
            e.contains("holds no PEM certificate") && e.contains(&cert.display().to_string()),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pair written to a directory of its own.
    fn pair(dir: &Path, name: &str) -> TlsConfig {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
        TlsConfig { cert, key }
    }

    /// Full handshakes of a client against `acceptor`, in memory; returns
    /// how each went. The client keeps its sessions across them.
    fn handshakes(acceptors: &[&TlsAcceptor], trust: &[&TlsConfig]) -> Vec<rustls::HandshakeKind> {
        let mut roots = rustls::RootCertStore::empty();
        for t in trust {
            for c in read_certs(&t.cert).unwrap() {
                roots.add(c).unwrap();
            }
        }
        let client = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        acceptors
            .iter()
            .map(|a| {
                let mut c = rustls::ClientConnection::new(
                    Arc::clone(&client),
                    "localhost".try_into().unwrap(),
                )
                .unwrap();
                let mut s = rustls::ServerConnection::new(Arc::clone(a.config())).unwrap();
                // Enough rounds for the handshake and the tickets after it.
                for _ in 0..6 {
                    let mut wire = Vec::new();
                    c.write_tls(&mut wire).unwrap();
                    s.read_tls(&mut &wire[..]).unwrap();
                    s.process_new_packets().unwrap();
                    wire.clear();
                    s.write_tls(&mut wire).unwrap();
                    c.read_tls(&mut &wire[..]).unwrap();
                    c.process_new_packets().unwrap();
                }
                assert!(!c.is_handshaking());
                c.handshake_kind().unwrap()
            })
            .collect()
    }

    #[test]
    fn sessions_resume_across_a_reload_of_the_same_pair_only() {
        use rustls::HandshakeKind::{Full, Resumed};
        let dir = std::env::temp_dir().join(format!("gw-tls-resume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (one, two) = (pair(&dir, "one"), pair(&dir, "two"));
        let first = acceptor(&one).unwrap();
        // A reload that reads the same pair again: returning clients resume.
        let reloaded = acceptor(&one).unwrap();
        // A new pair: its sessions start anew.
        let renewed = acceptor(&two).unwrap();
        assert_eq!(
            handshakes(&[&first, &first, &reloaded, &renewed], &[&one, &two]),
            vec![Full, Resumed, Resumed, Full]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
