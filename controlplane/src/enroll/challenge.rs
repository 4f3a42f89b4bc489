//! Proof-of-possession challenges: a one-time X25519 key pair per challenge, kept in
//! memory for a short time, bounded in number, and consumed by the first Register that
//! names it (whatever the outcome), so an answer can never be replayed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;
use x25519_dalek::{PublicKey, StaticSecret};

/// How long a challenge may be answered.
pub const TTL: Duration = Duration::from_secs(60);
/// Outstanding challenges at most (a few MB at worst); beyond, new ones are refused until
/// some expire. The per-source rate limit keeps one client from taking them all quickly.
pub const MAX: usize = 16384;

#[derive(Default)]
pub struct Challenges {
    open: Mutex<HashMap<String, (StaticSecret, Instant)>>,
}

/// A challenge as handed out.
pub struct Issued {
    pub id: String,
    pub server_public_key: [u8; 32],
}

impl Challenges {
    /// A new challenge; `None` when too many are outstanding.
    pub fn issue(&self, now: Instant) -> Option<Issued> {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let secret = StaticSecret::from(bytes);
        let server_public_key = PublicKey::from(&secret).to_bytes();
        let id = crate::auth::new_id('c');
        let mut open = crate::registry::lock(&self.open);
        if open.len() >= MAX {
            open.retain(|_, (_, expires)| *expires > now);
            if open.len() >= MAX {
                return None;
            }
        }
        open.insert(id.clone(), (secret, now + TTL));
        Some(Issued { id, server_public_key })
    }

    /// Removes the challenge; its secret if it had not expired.
    pub fn take(&self, id: &str, now: Instant) -> Option<StaticSecret> {
        let (secret, expires) = crate::registry::lock(&self.open).remove(id)?;
        (expires > now).then_some(secret)
    }

    pub fn len(&self) -> usize {
        crate::registry::lock(&self.open).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_expiring_and_bounded() {
        let c = Challenges::default();
        let t0 = Instant::now();
        let a = c.issue(t0).unwrap();
        assert!(c.take(&a.id, t0).is_some());
        assert!(c.take(&a.id, t0).is_none(), "a challenge is used once");
        let b = c.issue(t0).unwrap();
        assert!(c.take(&b.id, t0 + TTL).is_none(), "expired");
        assert!(c.is_empty());
        for _ in 0..MAX {
            c.issue(t0).unwrap();
        }
        assert!(c.issue(t0).is_none(), "bounded");
        assert!(c.issue(t0 + TTL).is_some(), "expired ones make room");
        assert_eq!(c.len(), 1);
    }
}
