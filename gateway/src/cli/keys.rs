//! `gateway keys new`: a fresh random API key, shown once, and the
//! `[[keys]]` entry that stores only its SHA-256.

use anyhow::{bail, Result};

use crate::pipeline::auth::digest_hex;

/// Prefix that makes gateway keys recognisable (e.g. by secret scanners).
const PREFIX: &str = "sk-gw-";

pub fn new(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        bail!(crate::error::UsageError(format!(
            "--name {name:?}: use letters, digits, '-', '_' or '.' (it becomes a metrics label)"
        )));
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw)
        .map_err(|e| anyhow::anyhow!("reading the system's random source: {e}"))?;
    let key = format!(
        "{PREFIX}{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    eprintln!(
        "New API key for {name:?}. It is shown only now; the config keeps only its SHA-256.\n"
    );
    println!("{key}\n");
    println!(
        "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\nmodels = [\"*\"]",
        digest_hex(&key)
    );
    Ok(())
}
