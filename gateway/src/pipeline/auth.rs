//! API key authentication: `Authorization: Bearer <key>` or `x-api-key`,
//! checked by SHA-256 digest against every configured key in constant time.

use http::HeaderMap;
use sha2::{Digest, Sha256};

use super::routes::Key;
use crate::error::ProxyError;

const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// The presented key, if any: a Bearer token, else `x-api-key` (an
/// `Authorization` of another scheme, say Basic for a proxy in front,
/// leaves `x-api-key` to carry the key).
fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = crate::http1::find(headers, &http::header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(v[7..].trim_ascii());
        }
    }
    crate::http1::find(headers, &X_API_KEY).map(|v| v.as_bytes().trim_ascii())
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
        return Err(ProxyError::MissingKey);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| {
                (
                    http::HeaderName::from_static(n),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    type Case = (
        &'static [(&'static str, &'static str)],
        Option<&'static [u8]>,
    );

    #[test]
    fn a_key_is_a_bearer_token_or_x_api_key() {
        let cases: [Case; 6] = [
            (&[("authorization", "Bearer sk-a")], Some(b"sk-a")),
            (&[("authorization", "bearer  sk-a ")], Some(b"sk-a")),
            (&[("x-api-key", "sk-b")], Some(b"sk-b")),
            // The Bearer token wins over x-api-key.
            (
                &[("authorization", "Bearer sk-a"), ("x-api-key", "sk-b")],
                Some(b"sk-a"),
            ),
            // Another scheme (a proxy's Basic credentials) leaves x-api-key.
            (
                &[("authorization", "Basic dTpw"), ("x-api-key", "sk-b")],
                Some(b"sk-b"),
            ),
            (&[("authorization", "Basic dTpw")], None),
        ];
        for (pairs, want) in cases {
            assert_eq!(presented(&headers(pairs)), want, "{pairs:?}");
        }
    }

    #[test]
    fn only_a_configured_digest_authenticates() {
        let key = |name: &str, secret: &str| Key::for_test(name, Sha256::digest(secret).into());
        let keys = [key("a", "sk-a"), key("b", "sk-b")];
        let found = authenticate(&headers(&[("x-api-key", "sk-b")]), &keys).unwrap();
        assert_eq!(&*found.name, "b");
        assert!(authenticate(&headers(&[("x-api-key", "sk-c")]), &keys).is_err());
        assert!(authenticate(&headers(&[("x-api-key", "")]), &keys).is_err());
        assert!(authenticate(&headers(&[]), &keys).is_err());
    }
}
