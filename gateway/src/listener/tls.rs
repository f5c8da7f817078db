//! TLS termination with rustls: PEM certificate chain and key from the
//! config, ALPN offering HTTP/2 then HTTP/1.1, and session resumption.

use std::{
    fs::File,
    io::BufReader,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
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

/// A certificate and key loaded for serving.
pub struct Loaded {
    pub acceptor: TlsAcceptor,
    /// The certificate chain's validity; `None` when a certificate's could
    /// not be read (rustls serves the chain all the same).
    pub validity: Option<Validity>,
}

/// When a certificate, or a chain of them, is valid: clients refuse a
/// chain before its latest start or after its earliest end (an expired
/// intermediate as much as an expired leaf).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Position in the chain of the certificate that ends first (0: the
    /// server's own).
    pub ends_first: usize,
}

/// Within this of its end a certificate is warned about, as the renewal
/// that should have happened by then (ACME clients renew 30 days ahead)
/// has not.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

impl Validity {
    /// The validity of a DER certificate, if it parses as X.509.
    pub fn of(cert: &[u8]) -> Option<Validity> {
        use x509_cert::der::Decode as _;
        let c = x509_cert::Certificate::from_der(cert).ok()?;
        let v = &c.tbs_certificate.validity;
        Some(Validity {
            not_before: v.not_before.to_system_time(),
            not_after: v.not_after.to_system_time(),
            ends_first: 0,
        })
    }

    /// The validity of a chain (the server's certificate first), if every
    /// certificate in it parses.
    pub fn of_chain(certs: &[rustls::pki_types::CertificateDer<'_>]) -> Option<Validity> {
        let mut chain: Option<Validity> = None;
        for (i, c) in certs.iter().enumerate() {
            let v = Validity::of(c)?;
            chain = Some(match chain {
                None => v,
                Some(a) => Validity {
                    not_before: a.not_before.max(v.not_before),
                    not_after: a.not_after.min(v.not_after),
                    ends_first: if v.not_after < a.not_after {
                        i
                    } else {
                        a.ends_first
                    },
                },
            });
        }
        chain
    }

    /// Seconds since the Unix epoch at which it ends (the metric).
    pub fn not_after_unix(&self) -> i64 {
        self.not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

/// What an operator must hear about `cert`'s validity at `now`: expired,
/// not valid yet, or ending within [`EXPIRY_WARNING`]; `None` when it is
/// fine. Clients refuse a certificate outside its validity, so the gateway
/// would serve TLS that no client accepts; it still loads it (a renewal
/// may be on its way, and plain listeners and the rest keep working).
pub fn validity_warning(
    cert: &Path,
    validity: Option<Validity>,
    now: SystemTime,
) -> Option<String> {
    let at = |t: SystemTime| httpdate::fmt_http_date(t);
    let Some(v) = validity else {
        return Some(format!(
            "server.tls.cert: the validity of {} could not be read; its expiry is not checked",
            cert.display()
        ));
    };
    // The certificate that ends first, if not the server's own.
    let ending = match v.ends_first {
        0 => cert.display().to_string(),
        i => format!("certificate {} in the chain of {}", i + 1, cert.display()),
    };
    if let Ok(ago) = now.duration_since(v.not_after) {
        return Some(format!(
            "server.tls.cert: {ending} expired {} ago ({}); clients refuse it until it is renewed",
            span(ago),
            at(v.not_after)
        ));
    }
    if let Ok(until) = v.not_before.duration_since(now) {
        return Some(format!(
            "server.tls.cert: {} is not valid for another {} ({}); clients refuse it until then",
            cert.display(),
            span(until),
            at(v.not_before)
        ));
    }
    let left = v.not_after.duration_since(now).unwrap_or_default();
    (left < EXPIRY_WARNING).then(|| {
        format!(
            "server.tls.cert: {ending} expires in {} ({}); renew it",
            span(left),
            at(v.not_after)
        )
    })
}

impl Loaded {
    /// Publishes the certificate's end as a metric, and logs and returns
    /// what the operator must hear about its validity (see
    /// [`validity_warning`]).
    pub fn report(&self, cfg: &TlsConfig, metrics: &crate::metrics::Metrics) -> Option<String> {
        metrics
            .tls_cert_expiry
            .set(self.validity.map_or(0, |v| v.not_after_unix()));
        let warning = validity_warning(&cfg.cert, self.validity, SystemTime::now())?;
        tracing::warn!("{warning}");
        Some(warning)
    }
}

/// A duration in whole days, or hours under two days.
fn span(d: Duration) -> String {
    let hours = d.as_secs() / 3600;
    match hours {
        0 => "less than an hour".into(),
        1..=47 => format!("{hours} h"),
        _ => format!("{} days", hours / 24),
    }
}

/// Builds the acceptor; a missing or unreadable file is an error naming it.
pub fn acceptor(cfg: &TlsConfig) -> Result<Loaded> {
    let certs = read_certs(&cfg.cert)?;
    let validity = Validity::of_chain(&certs);
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
    Ok(Loaded {
        acceptor: TlsAcceptor::from(Arc::new(sc)),
        validity,
    })
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

    /// A certificate valid through 2026 (2027-01-01T00:00:00Z is
    /// 1,798,761,600), and its key.
    fn dated() -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2026, 1, 1);
        p.not_after = rcgen::date_time_ymd(2027, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        (p.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn validity_is_read_and_warned_about() {
        let v = Validity::of(dated().0.der()).expect("an X.509 certificate");
        assert_eq!(v.not_after_unix(), 1_798_761_600);
        let end = UNIX_EPOCH + Duration::from_secs(1_798_761_600);
        let (day, hour) = (Duration::from_secs(86_400), Duration::from_secs(3600));
        let path = Path::new("/etc/gateway/tls/cert.pem");
        let warn = |now| validity_warning(path, Some(v), now);
        // Well inside, and just outside the warning's reach: nothing.
        assert_eq!(warn(end - 200 * day), None);
        assert_eq!(warn(end - 15 * day), None);
        let w = warn(end - 3 * day - hour).expect("ends soon");
        assert!(
            w.contains("/etc/gateway/tls/cert.pem expires in 3 days")
                && w.contains("Fri, 01 Jan 2027 00:00:00 GMT"),
            "{w}"
        );
        let w = warn(end - 5 * hour).expect("ends soon");
        assert!(w.contains("expires in 5 h"), "{w}");
        let w = warn(end - hour / 2).expect("ends soon");
        assert!(w.contains("expires in less than an hour"), "{w}");
        let w = warn(end + 40 * day).expect("expired");
        assert!(
            w.contains("expired 40 days ago") && w.contains("refuse"),
            "{w}"
        );
        let w = warn(end - 366 * day).expect("not valid yet");
        assert!(
            w.contains("not valid for another 24 h") && w.contains("Thu, 01 Jan 2026"),
            "{w}"
        );
        let w = validity_warning(path, None, end).expect("unread");
        assert!(w.contains("could not be read"), "{w}");
        assert_eq!(Validity::of(b"not a certificate"), None);
    }

    /// A chain ends with its first certificate to end: an intermediate
    /// that expires before the server's certificate is the one named.
    #[test]
    fn a_chain_is_valid_until_its_first_certificate_ends() {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.not_before = rcgen::date_time_ymd(2025, 1, 1);
        ca.not_after = rcgen::date_time_ymd(2027, 1, 1);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca.self_signed(&ca_key).unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        leaf.not_before = rcgen::date_time_ymd(2026, 1, 1);
        leaf.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();

        let dir = std::env::temp_dir().join(format!("gw-tls-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = TlsConfig {
            cert: dir.join("chain.crt"),
            key: dir.join("chain.key"),
        };
        std::fs::write(&cfg.cert, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        std::fs::write(&cfg.key, key.serialize_pem()).unwrap();
        let v = acceptor(&cfg).unwrap().validity.expect("read");
        assert_eq!((v.not_after_unix(), v.ends_first), (1_798_761_600, 1));
        // 2026-01-01, the leaf's start and the chain's.
        let start = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        assert_eq!(v.not_before, start);
        let later = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let w = validity_warning(&cfg.cert, Some(v), later).expect("expired");
        assert!(
            w.contains("certificate 2 in the chain of") && w.contains("expired"),
            "{w}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An expired certificate still loads (clients will refuse it; the
    /// operator is told), with its validity read from the file.
    #[test]
    fn an_expired_certificate_loads_with_its_validity() {
        let dir = std::env::temp_dir().join(format!("gw-tls-dated-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = dated();
        let cfg = TlsConfig {
            cert: dir.join("old.crt"),
            key: dir.join("old.key"),
        };
        std::fs::write(&cfg.cert, cert.pem()).unwrap();
        std::fs::write(&cfg.key, key.serialize_pem()).unwrap();
        let loaded = acceptor(&cfg).unwrap();
        assert_eq!(
            loaded.validity.map(|v| v.not_after_unix()),
            Some(1_798_761_600)
        );
        let metrics = crate::metrics::Metrics::new();
        loaded.report(&cfg, &metrics);
        assert_eq!(metrics.tls_cert_expiry.get(), 1_798_761_600);
        let later = UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        assert!(validity_warning(&cfg.cert, loaded.validity, later)
            .is_some_and(|w| w.contains("expired")));
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
        let first = acceptor(&one).unwrap().acceptor;
        // A reload that reads the same pair again: returning clients resume.
        let reloaded = acceptor(&one).unwrap().acceptor;
        // A new pair: its sessions start anew.
        let renewed = acceptor(&two).unwrap().acceptor;
        assert_eq!(
            handshakes(&[&first, &first, &reloaded, &renewed], &[&one, &two]),
            vec![Full, Resumed, Resumed, Full]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
