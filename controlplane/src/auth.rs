//! Bearer secrets: node credentials and enrollment keys share one shape,
//! `<id>.<32 random bytes, base64url without padding>`. Only SHA-256 of the secret part is
//! stored; comparisons are constant-time. Neither the token nor its secret is ever logged
//! (the `Debug` impl shows the id only).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::Error;

pub const SECRET_LEN: usize = 32;

/// An id plus a secret. The id names the node or enrollment key (not secret).
pub struct Token {
    pub id: String,
    secret: [u8; SECRET_LEN],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Token {
    /// A fresh random secret for `id`.
    pub fn generate(id: String) -> Token {
        let mut secret = [0u8; SECRET_LEN];
        rand::rng().fill_bytes(&mut secret);
        Token { id, secret }
    }

    /// Parses `<id>.<secret>`; `None` if malformed.
    pub fn parse(s: &str) -> Option<Token> {
        let (id, secret) = s.trim().split_once('.')?;
        if !valid_id(id) {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(secret).ok()?;
        Some(Token { id: id.to_owned(), secret: bytes.try_into().ok()? })
    }

    /// The string handed out once (`<id>.<secret>`).
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, URL_SAFE_NO_PAD.encode(self.secret))
    }

    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.secret).into()
    }

    /// Whether the secret hashes to `stored` (constant time in the hash bytes).
    pub fn matches(&self, stored: &[u8]) -> bool {
        ct_eq(&self.hash(), stored)
    }
}

/// Ids: 1 to 64 of `[a-z0-9]` (as [`new_id`] makes them).
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A random id: a one-letter kind prefix and 16 hex digits.
pub fn new_id(prefix: char) -> String {
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    let mut s = String::with_capacity(17);
    s.push(prefix);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Equality whose running time depends only on the lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The bearer token from `authorization` metadata: `Ok(None)` when absent, an error when
/// present but malformed.
pub fn bearer(meta: &MetadataMap) -> Result<Option<Token>, Error> {
    let Some(value) = meta.get("authorization") else { return Ok(None) };
    let value = value.to_str().map_err(|_| Error::CredentialMalformed)?;
    let (scheme, rest) = value.split_once(' ').ok_or(Error::CredentialMalformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Error::CredentialMalformed);
    }
    Token::parse(rest).map(Some).ok_or(Error::CredentialMalformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_roundtrip_and_hash() {
        let t = Token::generate(new_id('n'));
        let s = t.expose();
        let back = Token::parse(&s).unwrap();
        assert_eq!(back.id, t.id);
        assert!(back.matches(&t.hash()));
        assert!(!format!("{t:?}").contains(&s[t.id.len() + 1..]), "Debug must not show the secret");
        // A changed secret no longer matches.
        let mut tampered = s.clone().into_bytes();
        let last = tampered.len() - 2;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = Token::parse(std::str::from_utf8(&tampered).unwrap()).unwrap();
        assert!(!tampered.matches(&t.hash()));
    }

    #[test]
    fn malformed_tokens_and_metadata() {
        for bad in ["", "abc", "n1.", ".AAAA", "N1.AAAA", "n1.!!!!", "n1.AAAA"] {
            assert!(Token::parse(bad).is_none(), "{bad}");
        }
        let mut meta = MetadataMap::new();
        assert!(bearer(&meta).unwrap().is_none());
        meta.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(bearer(&meta), Err(Error::CredentialMalformed)));
        let t = Token::generate("n1".into());
        meta.insert("authorization", format!("Bearer {}", t.expose()).parse().unwrap());
        assert_eq!(bearer(&meta).unwrap().unwrap().id, "n1");
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
    }
}
