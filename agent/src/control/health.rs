//! What the control-plane client knows about its connection, for the metrics: connected or
//! not, the version applied, and the certificate probe's findings per address family. The
//! client writes it; the metrics endpoint only reads it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::connect::Connector;

/// How often the certificate probe runs (a renewed certificate shows within this).
pub const PROBE_EVERY: Duration = Duration::from_secs(300);

/// One address family's probe: how many addresses were tried, how many completed a
/// verified handshake, and the earliest expiry among those.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyProbe {
    pub addresses: usize,
    pub verified: usize,
    /// Unix seconds; `None` when no address of the family verified.
    pub earliest: Option<i64>,
}

impl FamilyProbe {
    /// One address's outcome: its certificate's expiry, or `None` when it failed.
    pub fn record(&mut self, not_after: Option<i64>) {
        self.addresses += 1;
        if let Some(t) = not_after {
            self.verified += 1;
            self.earliest = Some(self.earliest.map_or(t, |e| e.min(t)));
        }
    }
}

/// A certificate probe of every resolved control-plane address, by family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CertProbe {
    pub ipv4: FamilyProbe,
    pub ipv6: FamilyProbe,
}

impl CertProbe {
    /// The family of `ip` (an IPv4-mapped IPv6 address is IPv4 on the wire).
    pub fn family_mut(&mut self, ip: IpAddr) -> &mut FamilyProbe {
        match ip.to_canonical() {
            IpAddr::V4(_) => &mut self.ipv4,
            IpAddr::V6(_) => &mut self.ipv6,
        }
    }

    /// As the control plane is told (0: unknown).
    pub fn report(&self) -> wirefence_proto::v1::CertificateExpiry {
        wirefence_proto::v1::CertificateExpiry {
            ipv4_not_after_unix: self.ipv4.earliest.unwrap_or(0),
            ipv6_not_after_unix: self.ipv6.earliest.unwrap_or(0),
        }
    }
}

/// Shared between the client (writer) and the metrics (reader).
#[derive(Debug, Default)]
pub struct ControlHealth {
    connected: AtomicBool,
    applied_version: AtomicU64,
    certificates: Mutex<Option<CertProbe>>,
}

impl ControlHealth {
    pub fn set_connection(&self, connected: bool, applied_version: u64) {
        self.connected.store(connected, Ordering::Relaxed);
        self.applied_version.store(applied_version, Ordering::Relaxed);
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn applied_version(&self) -> u64 {
        self.applied_version.load(Ordering::Relaxed)
    }

    /// The last probe's findings; `None` before the first probe ends (or in plaintext mode).
    pub fn certificates(&self) -> Option<CertProbe> {
        *self.certificates.lock().expect("not poisoned")
    }

    fn set_certificates(&self, probe: CertProbe) {
        *self.certificates.lock().expect("not poisoned") = Some(probe);
    }
}

/// Probes the control plane's certificates now and every [`PROBE_EVERY`]; runs until aborted.
pub async fn probe_loop(connector: std::sync::Arc<Connector>, health: std::sync::Arc<ControlHealth>) {
    loop {
        if let Some(probe) = connector.probe_certificates().await {
            tracing::debug!(?probe, "control-plane certificates probed");
            health.set_certificates(probe);
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_keeps_its_earliest_verified_expiry() {
        let mut p = CertProbe::default();
        p.family_mut("192.0.2.1".parse().unwrap()).record(Some(2_000_000_000));
        p.family_mut("::ffff:192.0.2.2".parse().unwrap()).record(Some(1_900_000_000));
        p.family_mut("192.0.2.3".parse().unwrap()).record(None);
        p.family_mut("2001:db8::1".parse().unwrap()).record(None);
        assert_eq!(p.ipv4, FamilyProbe { addresses: 3, verified: 2, earliest: Some(1_900_000_000) });
        assert_eq!(p.ipv6, FamilyProbe { addresses: 1, verified: 0, earliest: None });
        let r = p.report();
        assert_eq!((r.ipv4_not_after_unix, r.ipv6_not_after_unix), (1_900_000_000, 0));
    }
}
