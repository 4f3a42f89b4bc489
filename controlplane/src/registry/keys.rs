//! Enrollment keys: safe by default (one use, one hour), anything broader asked for
//! explicitly; listed without secrets; revocable.

use std::num::{NonZeroU32, NonZeroU64};

use ipnet::IpNet;
use wirefence_proto::policy::valid_name;
use wirefence_proto::v1::{self, CreateEnrollmentKeyRequest, IpPrefix};

use super::admin::NewKey;
use super::register::check_route;
use super::Registry;
use crate::auth::{self, Token};
use crate::model::{now_unix, valid_hostname};
use crate::store::KeyRow;
use crate::Error;

/// The lifetime of a key created without one.
pub const DEFAULT_LIFETIME_SECS: u64 = 3600;

/// How many nodes a key may enroll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uses {
    Limited(NonZeroU32),
    Unlimited,
}

/// How long a key is good for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    Secs(NonZeroU64),
    Never,
}

/// What an enrollment key gives the nodes enrolled with it (validated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySpec {
    pub uses: Uses,
    pub lifetime: Lifetime,
    pub tags: Vec<String>,
    /// The prefixes such nodes may advertise routes within.
    pub routes: Vec<IpNet>,
    /// The hostname the enrolled node owns (the key then enrolls one node).
    pub hostname: Option<String>,
    /// A re-enrollment key of this node (id): single use, nothing else granted.
    pub node: Option<String>,
}

impl Default for KeySpec {
    /// One use, one hour, nothing granted.
    fn default() -> KeySpec {
        KeySpec {
            uses: Uses::Limited(NonZeroU32::MIN),
            lifetime: Lifetime::Secs(NonZeroU64::new(DEFAULT_LIFETIME_SECS).expect("not zero")),
            tags: vec![],
            routes: vec![],
            hostname: None,
            node: None,
        }
    }
}

impl KeySpec {
    /// From the wire: absent fields take the safe defaults; contradictions and a zero
    /// lifetime are refused (never read as "forever").
    pub fn from_request(r: CreateEnrollmentKeyRequest) -> Result<KeySpec, Error> {
        let uses = match (r.reusable, NonZeroU32::new(r.max_uses)) {
            (true, Some(_)) => return Err(Error::KeyOptionsConflict("reusable", "max_uses")),
            (true, None) => Uses::Unlimited,
            (false, n) => Uses::Limited(n.unwrap_or(NonZeroU32::MIN)),
        };
        let lifetime = match (r.never_expires, r.expires_in_secs) {
            (true, Some(_)) => return Err(Error::KeyOptionsConflict("never_expires", "expires_in")),
            (true, None) => Lifetime::Never,
            (false, None) => KeySpec::default().lifetime,
            (false, Some(s)) => Lifetime::Secs(NonZeroU64::new(s).ok_or(Error::ExpiresInZero)?),
        };
        let routes = r
            .routes
            .iter()
            .enumerate()
            .map(|(i, p)| IpNet::try_from(p).map_err(Error::wire(format!("routes[{i}]"))))
            .collect::<Result<_, _>>()?;
        let hostname = Some(r.hostname).filter(|h| !h.is_empty());
        if let Some(h) = &hostname {
            if !valid_hostname(h) {
                return Err(Error::Hostname(h.clone()));
            }
            if uses != Uses::Limited(NonZeroU32::MIN) {
                return Err(Error::BoundKeyReusable);
            }
        }
        Ok(KeySpec { uses, lifetime, tags: r.tags, routes, hostname, node: None })
    }
}

impl Registry {
    pub async fn create_enrollment_key(&self, spec: KeySpec) -> Result<NewKey, Error> {
        let KeySpec { uses, lifetime, mut tags, mut routes, hostname, node } = spec;
        if let Some(bad) = tags.iter().find(|t| !valid_name(t)) {
            return Err(Error::Tag(bad.clone()));
        }
        tags.sort();
        tags.dedup();
        for (index, route) in routes.iter().enumerate() {
            check_route(index, *route, &self.overlay)?;
        }
        routes.sort();
        routes.dedup();
        let now = now_unix();
        let expires_unix = match lifetime {
            Lifetime::Never => 0,
            Lifetime::Secs(s) => now.saturating_add(i64::try_from(s.get()).unwrap_or(i64::MAX)),
        };
        let token = Token::generate(auth::new_id('k'));
        let row = KeyRow {
            id: token.id.clone(),
            hash: token.hash().to_vec(),
            max_uses: match uses {
                Uses::Limited(n) => n.get(),
                Uses::Unlimited => 0,
            },
            uses: 0,
            revoked: false,
            expires: expires_unix,
            created: now,
            tags,
            routes,
            hostname,
            node,
        };
        self.store().await.insert_key(&row).await?;
        tracing::info!(
            key = %row.id, max_uses = row.max_uses, expires_unix, routes = ?row.routes, hostname = ?row.hostname,
            reenroll_node = ?row.node, "enrollment key created"
        );
        Ok(NewKey { key_id: row.id, key: token.expose(), expires_unix })
    }

    /// Every key, without secrets.
    pub async fn list_enrollment_keys(&self) -> Result<Vec<v1::EnrollmentKey>, Error> {
        Ok(self
            .store()
            .await
            .keys()
            .await?
            .into_iter()
            .map(|k| v1::EnrollmentKey {
                key_id: k.id,
                tags: k.tags,
                routes: k.routes.iter().map(|r| IpPrefix::from(*r)).collect(),
                max_uses: k.max_uses,
                uses: k.uses,
                expires_unix: k.expires,
                created_unix: k.created,
                revoked: k.revoked,
                hostname: k.hostname.unwrap_or_default(),
                reenroll_node: k.node.unwrap_or_default(),
            })
            .collect())
    }

    /// A re-enrollment key for the live node `sel` (an admin's approval that a new key pair
    /// takes over its identity): single use, `expires_in_secs` or an hour.
    pub async fn reenroll_key(&self, sel: &str, expires_in_secs: Option<u64>) -> Result<(NewKey, String), Error> {
        let rows = self.store().await.nodes().await?;
        let row = match super::admin::find(rows.clone(), sel) {
            Ok(row) => row,
            Err(e) => match super::admin::find_removed(rows, sel) {
                Some(removed) => return Err(Error::NodeRemoved(removed.rec.id)),
                None => return Err(e),
            },
        };
        let lifetime = match expires_in_secs {
            None => KeySpec::default().lifetime,
            Some(s) => Lifetime::Secs(NonZeroU64::new(s).ok_or(Error::ExpiresInZero)?),
        };
        let spec = KeySpec { lifetime, node: Some(row.rec.id.clone()), ..KeySpec::default() };
        Ok((self.create_enrollment_key(spec).await?, row.rec.id))
    }

    /// Revokes a key: it enrolls nobody from now on.
    pub async fn revoke_enrollment_key(&self, id: &str) -> Result<(), Error> {
        if !self.store().await.revoke_key(id).await? {
            return Err(Error::UnknownKey(id.to_owned()));
        }
        tracing::info!(key = %id, "enrollment key revoked");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(f: impl FnOnce(&mut CreateEnrollmentKeyRequest)) -> Result<KeySpec, Error> {
        let mut r = CreateEnrollmentKeyRequest::default();
        f(&mut r);
        KeySpec::from_request(r)
    }

    #[test]
    fn keys_are_single_use_and_short_lived_unless_asked() {
        assert_eq!(spec(|_| {}).unwrap(), KeySpec::default());
        assert_eq!(KeySpec::default().lifetime, Lifetime::Secs(NonZeroU64::new(3600).unwrap()));
        assert_eq!(spec(|r| r.reusable = true).unwrap().uses, Uses::Unlimited);
        assert_eq!(spec(|r| r.max_uses = 5).unwrap().uses, Uses::Limited(NonZeroU32::new(5).unwrap()));
        assert_eq!(spec(|r| r.never_expires = true).unwrap().lifetime, Lifetime::Never);
        assert!(matches!(spec(|r| r.expires_in_secs = Some(0)), Err(Error::ExpiresInZero)));
        assert!(matches!(
            spec(|r| {
                r.reusable = true;
                r.max_uses = 2
            }),
            Err(Error::KeyOptionsConflict(..))
        ));
        assert!(matches!(
            spec(|r| {
                r.never_expires = true;
                r.expires_in_secs = Some(5)
            }),
            Err(Error::KeyOptionsConflict(..))
        ));
        assert!(matches!(
            spec(|r| {
                r.hostname = "db1".into();
                r.reusable = true
            }),
            Err(Error::BoundKeyReusable)
        ));
        assert!(matches!(spec(|r| r.hostname = "not a host".into()), Err(Error::Hostname(_))));
    }
}
