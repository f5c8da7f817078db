//! API key authentication: `Authorization: Bearer <key>` or `x-api-key`,
//! checked by SHA-256 digest against every configured key in constant time.

use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::routes::Key;
use crate::error::ProxyError;

/// The presented key, if any.
fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(v[7..].trim_ascii());
        }
        return None;
    }
    headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii())
}

/// Compares two digests without an early exit.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// The key the request authenticates as.
pub fn authenticate<'a>(headers: &HeaderMap, keys: &'a [Key]) -> Result<&'a Key, ProxyError> {
    let Some(k) = presented(headers).filter(|k| !k.is_empty()) else {
        return Err(ProxyError::Unauthorized);
    };
    let digest: [u8; 32] = Sha256::digest(k).into();
    // Visit every key so timing does not reveal which one matched.
    let mut found = None;
    for key in keys {
        if ct_eq(&digest, &key.digest) {
            found = Some(key);
        }
    }
    found.ok_or(ProxyError::Unauthorized)
}

/// Hex SHA-256 of a key, as `[[keys]].sha256` holds it.
pub fn digest_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
