//! TLS termination with rustls: PEM certificate chain and key from the
//! config, ALPN offering HTTP/2 then HTTP/1.1.

use std::{fs::File, io::BufReader, path::Path, sync::Arc};

use anyhow::{bail, Context as _, Result};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Builds the acceptor; a missing or unreadable file is an error naming it.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor> {
    let certs = read_certs(&cfg.cert)?;
    let key = read_key(&cfg.key)?;
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
}
