//! The `[control]` config section: the agent takes its peers, addresses and policy from a
//! control plane instead of `[[peers]]` and `[policy.rules]`.
//!
//! ```toml
//! [control]
//! endpoints = ["cp.example.net:7443", "[fd00::1]:7443"]  # every resolved address is tried
//! ca_file = "/etc/wirefence/ca.pem"          # or: insecure = true (plaintext, labs only)
//! enrollment_key_file = "/etc/wirefence/enroll.key"  # needed until the node is registered
//! hostname = "gw1"                           # default: the machine's host name
//! advertise_endpoints = ["192.0.2.1:51820"]  # where other nodes reach this one
//! advertise_routes = ["10.88.0.0/24"]        # subnets this node routes for the mesh
//! # A subnet several gateways route (a route group): the control plane sends its traffic to
//! # one healthy member at a time, the highest priority first (see `checks`).
//! [[control.advertise]]
//! prefix = "10.88.1.0/24"
//! priority = 200                             # default 100
//! check = "tcp:10.88.1.5:22"                 # or "none" (default): healthy while connected
//! interval_ms = 500                          # 100..=5000
//! fail_after = 2                             # failed checks in a row before unhealthy
//! recover_after = 3                          # passed checks in a row before healthy again
//! # The local guard (see `guard`): what this node accepts from the control plane.
//! overlay = ["100.64.0.0/10", "fd7a::/48"]   # default: the ranges announced at enrollment
//! accept_routes = ["10.88.0.0/16"]           # peer routes beyond the overlay; default none
//! accept_default_route = false               # true: accept 0.0.0.0/0, ::/0 (exit node)
//! rotate_key_days = 90                       # rotate the WireGuard key when it is this old
//! ```

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::guard::GuardConfig;
use crate::policy::resolve::ResolveError;
use crate::primitives::{parse_prefix, Endpoint};

/// A validated `[control]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlConfig {
    pub endpoints: Vec<Endpoint>,
    pub transport: Transport,
    pub enrollment_key_file: Option<PathBuf>,
    pub hostname: String,
    pub advertise_endpoints: Vec<SocketAddr>,
    pub advertise_routes: Vec<IpNet>,
    /// Every advertised route with its group settings (`advertise_routes` entries with the
    /// defaults), in `advertise_routes` order.
    pub route_checks: Vec<RouteCheck>,
    pub guard: GuardConfig,
    /// Rotate the WireGuard key once it is this old (`rotate_key_days`); `None`: only by hand.
    pub rotate_key_every: Option<Duration>,
}

/// The longest key rotation schedule: ten years.
pub const MAX_ROTATE_KEY_DAYS: u32 = 3650;

/// How this node takes part in a route group for one advertised prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteCheck {
    pub prefix: IpNet,
    /// Higher is preferred as the group's primary.
    pub priority: u32,
    pub check: Check,
    pub interval: Duration,
    pub fail_after: u32,
    pub recover_after: u32,
}

pub const DEFAULT_PRIORITY: u32 = 100;
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
/// The control plane clamps to the same range.
pub const INTERVAL_MS: std::ops::RangeInclusive<u64> = 100..=5000;
pub const DEFAULT_FAIL_AFTER: u32 = 2;
pub const DEFAULT_RECOVER_AFTER: u32 = 3;
/// Upper bound of `fail_after`/`recover_after`: more would make failover slower than its budget.
pub const MAX_STREAK: u32 = 20;

impl RouteCheck {
    fn plain(prefix: IpNet) -> RouteCheck {
        RouteCheck {
            prefix,
            priority: DEFAULT_PRIORITY,
            check: Check::None,
            interval: DEFAULT_INTERVAL,
            fail_after: DEFAULT_FAIL_AFTER,
            recover_after: DEFAULT_RECOVER_AFTER,
        }
    }
}

/// What proves a route healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// Nothing: healthy while the agent is connected.
    None,
    /// A TCP connection to this LAN address completes within the interval.
    Tcp(SocketAddr),
}

impl std::str::FromStr for Check {
    type Err = String;
    fn from_str(s: &str) -> Result<Check, String> {
        if s == "none" {
            return Ok(Check::None);
        }
        match s.strip_prefix("tcp:").map(str::parse::<SocketAddr>) {
            Some(Ok(a)) if a.port() != 0 && !a.ip().is_unspecified() => Ok(Check::Tcp(a)),
            _ => Err(format!("{s:?} is not \"none\" or \"tcp:ip:port\" (\"tcp:[v6]:port\")")),
        }
    }
}

/// What this node tells the control plane about itself at each registration: a reload may
/// change it, and the client registers again on the open connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Advertised {
    pub endpoints: Vec<SocketAddr>,
    pub routes: Vec<IpNet>,
    /// The routes' group settings, which the checks run on (see `checks`).
    pub checks: Vec<RouteCheck>,
}

impl ControlConfig {
    pub fn advertised(&self) -> Advertised {
        Advertised {
            endpoints: self.advertise_endpoints.clone(),
            routes: self.advertise_routes.clone(),
            checks: self.route_checks.clone(),
        }
    }

    /// The settings only a restart may change: all but the advertised ones.
    pub fn restart_settings(&self) -> ControlConfig {
        ControlConfig {
            advertise_endpoints: Vec::new(),
            advertise_routes: Vec::new(),
            route_checks: Vec::new(),
            ..self.clone()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdvertise {
    prefix: Spanned<String>,
    priority: Option<Spanned<u32>>,
    check: Option<Spanned<String>>,
    interval_ms: Option<Spanned<u64>>,
    fail_after: Option<Spanned<u32>>,
    recover_after: Option<Spanned<u32>>,
}

impl RawAdvertise {
    fn resolve(self) -> Result<RouteCheck, ResolveError> {
        let field = |name: &str, m: String| format!("control.advertise.{name}: {m}");
        let prefix = parse_prefix(self.prefix.get_ref()).map_err(|m| err(self.prefix.span(), field("prefix", m)))?;
        let mut c = RouteCheck::plain(prefix);
        if let Some(p) = self.priority {
            c.priority = match *p.get_ref() {
                0 => return Err(err(p.span(), field("priority", "must be at least 1".into()))),
                v => v,
            };
        }
        if let Some(k) = self.check {
            c.check = k.get_ref().parse().map_err(|m| err(k.span(), field("check", m)))?;
        }
        if let Some(i) = self.interval_ms {
            if !INTERVAL_MS.contains(i.get_ref()) {
                let m = format!("{} is outside {}..={}", i.get_ref(), INTERVAL_MS.start(), INTERVAL_MS.end());
                return Err(err(i.span(), field("interval_ms", m)));
            }
            c.interval = Duration::from_millis(*i.get_ref());
        }
        for (name, raw, out) in [
            ("fail_after", self.fail_after, &mut c.fail_after),
            ("recover_after", self.recover_after, &mut c.recover_after),
        ] {
            if let Some(v) = raw {
                if !(1..=MAX_STREAK).contains(v.get_ref()) {
                    return Err(err(v.span(), field(name, format!("{} is outside 1..={MAX_STREAK}", v.get_ref()))));
                }
                *out = *v.get_ref();
            }
        }
        Ok(c)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TLS, trusting only the CA certificates in this PEM file.
    Tls { ca_file: PathBuf },
    /// Plaintext gRPC; chosen only by an explicit `insecure = true`.
    Insecure,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawControl {
    endpoints: Spanned<Vec<Spanned<String>>>,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    insecure: Option<Spanned<bool>>,
    enrollment_key_file: Option<PathBuf>,
    hostname: Option<Spanned<String>>,
    #[serde(default)]
    advertise_endpoints: Vec<Spanned<String>>,
    #[serde(default)]
    advertise_routes: Vec<Spanned<String>>,
    #[serde(default)]
    advertise: Vec<Spanned<RawAdvertise>>,
    overlay: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    accept_routes: Vec<Spanned<String>>,
    #[serde(default)]
    accept_default_route: bool,
    rotate_key_days: Option<Spanned<u32>>,
}

/// Parses a list of prefixes named `field`; a `/0` is refused where `no_default` says why.
fn prefix_list(field: &str, list: &[Spanned<String>], no_default: Option<&str>) -> Result<Vec<IpNet>, ResolveError> {
    let mut out = Vec::new();
    for r in list {
        let net = parse_prefix(r.get_ref()).map_err(|m| err(r.span(), format!("control.{field}: {m}")))?;
        if let (0, Some(why)) = (net.prefix_len(), no_default) {
            return Err(err(r.span(), format!("control.{field}: {net} takes in every address; {why}")));
        }
        out.push(net);
    }
    Ok(out)
}

fn err(span: Range<usize>, message: String) -> ResolveError {
    ResolveError { span, message }
}

impl RawControl {
    pub(crate) fn resolve(self) -> Result<ControlConfig, ResolveError> {
        if self.endpoints.get_ref().is_empty() {
            return Err(err(self.endpoints.span(), "control.endpoints: at least one host:port is needed".into()));
        }
        let mut endpoints = Vec::new();
        for e in self.endpoints.get_ref() {
            endpoints.push(Endpoint::parse(e.get_ref()).map_err(|m| err(e.span(), format!("control.endpoints: {m}")))?);
        }
        let insecure = self.insecure.as_ref().is_some_and(|i| *i.get_ref());
        let transport = match (self.ca_file, insecure) {
            (Some(ca_file), false) => Transport::Tls { ca_file },
            (None, true) => Transport::Insecure,
            (Some(_), true) => {
                let span = self.insecure.expect("insecure is set").span();
                return Err(err(span, "control: ca_file and insecure = true exclude each other".into()));
            }
            (None, false) => {
                return Err(err(
                    self.endpoints.span(),
                    "control: ca_file is required (or insecure = true for plaintext gRPC in a lab)".into(),
                ))
            }
        };
        let hostname = match self.hostname {
            Some(h) if valid_hostname(h.get_ref()) => h.into_inner(),
            Some(h) => {
                return Err(err(
                    h.span(),
                    format!("control.hostname: {:?} is not a host name (letters, digits, '-', up to 63)", h.get_ref()),
                ))
            }
            None => system_hostname(),
        };
        // The control plane checks the same; failing here names the line instead.
        let control_plane: Vec<std::net::IpAddr> = endpoints
            .iter()
            .filter_map(|e| match e {
                Endpoint::Addr(a) => Some(a.ip()),
                Endpoint::Host { .. } => None,
            })
            .collect();
        let mut advertise_endpoints = Vec::new();
        for e in &self.advertise_endpoints {
            let addr = e.get_ref().parse::<SocketAddr>().map_err(|_| {
                err(e.span(), format!("control.advertise_endpoints: {:?} is not ip:port ([v6]:port)", e.get_ref()))
            })?;
            wirefence_proto::endpoint::check(addr, &[], &control_plane)
                .map_err(|p| err(e.span(), format!("control.advertise_endpoints: {addr}: {p}")))?;
            advertise_endpoints.push(addr);
        }
        let mut route_checks: Vec<RouteCheck> =
            prefix_list("advertise_routes", &self.advertise_routes, None)?.into_iter().map(RouteCheck::plain).collect();
        for a in self.advertise {
            let span = a.span();
            let c = a.into_inner().resolve()?;
            if route_checks.iter().any(|o| o.prefix == c.prefix) {
                let m = format!("control.advertise.prefix: {} is advertised twice", c.prefix);
                return Err(err(span, m));
            }
            route_checks.push(c);
        }
        let advertise_routes = route_checks.iter().map(|c| c.prefix).collect();
        let overlay = match &self.overlay {
            None => None,
            Some(list) if list.get_ref().is_empty() => {
                return Err(err(list.span(), "control.overlay: leave it out to use the announced ranges".into()))
            }
            Some(list) => Some(prefix_list("overlay", list.get_ref(), Some("the overlay is a range of the mesh"))?),
        };
        let accept_routes = prefix_list(
            "accept_routes",
            &self.accept_routes,
            Some("a default route is accepted only with accept_default_route = true"),
        )?;
        let guard = GuardConfig { overlay, accept_routes, accept_default_route: self.accept_default_route };
        let rotate_key_every = match self.rotate_key_days {
            None => None,
            Some(d) if !(1..=MAX_ROTATE_KEY_DAYS).contains(d.get_ref()) => {
                let m = format!("control.rotate_key_days: {} is not 1..={MAX_ROTATE_KEY_DAYS} days", d.get_ref());
                return Err(err(d.span(), m));
            }
            Some(d) => Some(Duration::from_secs(u64::from(*d.get_ref()) * 86_400)),
        };
        Ok(ControlConfig {
            endpoints,
            transport,
            enrollment_key_file: self.enrollment_key_file,
            hostname,
            advertise_endpoints,
            advertise_routes,
            route_checks,
            guard,
            rotate_key_every,
        })
    }
}

pub fn valid_hostname(h: &str) -> bool {
    (1..=63).contains(&h.len())
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-')
}

fn system_hostname() -> String {
    let h = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    let first = h.split('.').next().unwrap_or_default().to_owned();
    if valid_hostname(&first) {
        first
    } else {
        "node".into()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(control: &str, extra: &str) -> Result<Config, String> {
        let text = format!("[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\n{extra}\n[control]\n{control}");
        Config::parse(Path::new("a.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_key_rotation_schedule_is_in_whole_days_within_ten_years() {
        let base = "endpoints = [\"cp.example:7443\"]\ninsecure = true\n";
        let every = |extra: &str| parse(&format!("{base}{extra}"), "").map(|c| c.control.unwrap().rotate_key_every);
        assert_eq!(every(""), Ok(None));
        assert_eq!(every("rotate_key_days = 90\n"), Ok(Some(Duration::from_secs(90 * 86_400))));
        for bad in ["0", "3651"] {
            let e = every(&format!("rotate_key_days = {bad}\n")).unwrap_err();
            assert!(e.contains("control.rotate_key_days") && e.contains("1..=3650"), "{e}");
        }
    }

    #[test]
    fn control_section_parses() {
        let c = parse(
            "endpoints = [\"cp.example:7443\", \"[fd00::1]:7443\"]\nca_file = \"/ca.pem\"\nhostname = \"gw1\"\n\
             advertise_endpoints = [\"192.0.2.1:51820\"]\nadvertise_routes = [\"10.88.0.0/24\"]\n",
            "",
        )
        .unwrap();
        let c = c.control.unwrap();
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.transport, Transport::Tls { ca_file: "/ca.pem".into() });
        assert_eq!(c.hostname, "gw1");
        assert_eq!(c.advertise_routes, vec!["10.88.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(c.guard, GuardConfig::default(), "overlay pinned at enrollment, no routes beyond it, no default");
    }

    #[test]
    fn guard_keys_parse_and_refuse_catch_alls() {
        let c = parse(
            "endpoints = [\"cp:1\"]\ninsecure = true\noverlay = [\"100.64.0.0/10\", \"fd7a::/48\"]\n\
             accept_routes = [\"10.88.0.0/16\"]\naccept_default_route = true\n",
            "",
        )
        .unwrap();
        let g = c.control.unwrap().guard;
        assert_eq!(g.overlay.unwrap().len(), 2);
        assert_eq!(g.accept_routes, vec!["10.88.0.0/16".parse::<IpNet>().unwrap()]);
        assert!(g.accept_default_route);
        let e = parse("endpoints = [\"cp:1\"]\ninsecure = true\naccept_routes = [\"0.0.0.0/0\"]\n", "").unwrap_err();
        assert!(e.starts_with("a.toml:8:") && e.contains("accept_default_route = true"), "{e}");
        let e = parse("endpoints = [\"cp:1\"]\ninsecure = true\noverlay = [\"::/0\"]\n", "").unwrap_err();
        assert!(e.contains("control.overlay: ::/0 takes in every address"), "{e}");
        let e = parse("endpoints = [\"cp:1\"]\ninsecure = true\noverlay = []\n", "").unwrap_err();
        assert!(e.contains("control.overlay"), "{e}");
    }

    #[test]
    fn bad_control_sections_name_line_and_field() {
        let e = parse("endpoints = [\"cp:1\"]\n", "").unwrap_err();
        assert!(e.starts_with("a.toml:6:") && e.contains("ca_file is required"), "{e}");
        let e = parse("endpoints = [\"cp:1\"]\nca_file = \"/c\"\ninsecure = true\n", "").unwrap_err();
        assert!(e.starts_with("a.toml:8:") && e.contains("exclude each other"), "{e}");
        let e = parse("endpoints = []\ninsecure = true\n", "").unwrap_err();
        assert!(e.contains("control.endpoints: at least one"), "{e}");
        let e = parse("endpoints = [\"nohostport\"]\ninsecure = true\n", "").unwrap_err();
        assert!(e.starts_with("a.toml:6:") && e.contains("control.endpoints"), "{e}");
        let e = parse("endpoints = [\"cp:1\"]\ninsecure = true\nhostname = \"bad name\"\n", "").unwrap_err();
        assert!(e.starts_with("a.toml:8:") && e.contains("control.hostname"), "{e}");
        let e =
            parse("endpoints = [\"cp:1\"]\ninsecure = true\nadvertise_routes = [\"10.0.0.1/8\"]\n", "").unwrap_err();
        assert!(e.contains("control.advertise_routes"), "{e}");
        for (bad, why) in [
            ("127.0.0.1:51820", "loopback"),
            ("0.0.0.0:51820", "unspecified"),
            ("[ff02::1]:51820", "multicast"),
            ("192.0.2.9:0", "port 0"),
            ("192.0.2.7:51820", "control plane's own address"),
        ] {
            let e = parse(
                &format!("endpoints = [\"192.0.2.7:7443\"]\ninsecure = true\nadvertise_endpoints = [\"{bad}\"]\n"),
                "",
            )
            .unwrap_err();
            assert!(e.contains("control.advertise_endpoints") && e.contains(why), "{bad}: {e}");
        }
        let e = parse("endpoints = [\"cp:1\"]\ninsecure = true\nsecret = 1\n", "").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn advertise_tables_parse_with_defaults_and_name_bad_fields() {
        let base = "endpoints = [\"cp:1\"]\ninsecure = true\nadvertise_routes = [\"10.88.0.0/24\"]\n";
        let c = parse(
            &format!(
                "{base}[[control.advertise]]\nprefix = \"10.88.1.0/24\"\npriority = 200\ncheck = \"tcp:10.88.1.5:22\"\n\
                 interval_ms = 250\nfail_after = 1\n[[control.advertise]]\nprefix = \"fd88::/64\"\n"
            ),
            "",
        )
        .unwrap()
        .control
        .unwrap();
        assert_eq!(c.advertise_routes.len(), 3);
        assert_eq!(c.route_checks[0], RouteCheck::plain("10.88.0.0/24".parse().unwrap()));
        let g = &c.route_checks[1];
        assert_eq!((g.priority, g.interval, g.fail_after, g.recover_after), (200, Duration::from_millis(250), 1, 3));
        assert_eq!(g.check, Check::Tcp("10.88.1.5:22".parse().unwrap()));
        assert_eq!(c.route_checks[2].check, Check::None);
        for (bad, line, what) in [
            ("prefix = \"10.88.1.1/24\"", 10, "control.advertise.prefix"),
            ("prefix = \"10.88.0.0/24\"", 9, "advertised twice"),
            ("prefix = \"10.88.1.0/24\"\ncheck = \"icmp:10.88.1.5\"", 11, "control.advertise.check"),
            ("prefix = \"10.88.1.0/24\"\ncheck = \"tcp:10.88.1.5:0\"", 11, "control.advertise.check"),
            ("prefix = \"10.88.1.0/24\"\ninterval_ms = 60000", 11, "control.advertise.interval_ms"),
            ("prefix = \"10.88.1.0/24\"\nfail_after = 0", 11, "control.advertise.fail_after"),
            ("prefix = \"10.88.1.0/24\"\nrecover_after = 99", 11, "control.advertise.recover_after"),
            ("prefix = \"10.88.1.0/24\"\npriority = 0", 11, "control.advertise.priority"),
        ] {
            let e = parse(&format!("{base}[[control.advertise]]\n{bad}\n"), "").unwrap_err();
            assert!(e.starts_with(&format!("a.toml:{line}:")) && e.contains(what), "{bad}: {e}");
        }
        let e =
            parse(&format!("{base}[[control.advertise]]\nprefix = \"10.88.1.0/24\"\nweight = 1\n"), "").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn control_mode_refuses_static_peers_and_rules() {
        let peer = crate::model::PrivateKey::generate().public_key();
        let e = parse("endpoints = [\"cp:1\"]\ninsecure = true\n", &format!("[[peers]]\npublic_key = \"{peer}\"\n"))
            .unwrap_err();
        assert!(e.contains("the control plane sends the peers"), "{e}");
        let e = parse(
            "endpoints = [\"cp:1\"]\ninsecure = true\n",
            "[[policy.rules]]\nid = \"r\"\nfrom = [\"10.0.0.0/8\"]\nto = [\"10.0.0.0/8\"]\n",
        )
        .unwrap_err();
        assert!(e.contains("the control plane sends the policy"), "{e}");
        assert!(parse("endpoints = [\"cp:1\"]\ninsecure = true\n", "[policy]\npin_dir = \"/sys/fs/bpf/x\"\n").is_ok());
    }

    #[test]
    fn control_mode_refuses_static_groups_and_addresses() {
        let control = "endpoints = [\"cp:1\"]\ninsecure = true\n";
        // A group naming a peer this file cannot have: refused for control mode, not for the name.
        let e = parse(control, "[policy.groups]\ndb = [\"peer:db1\", \"10.1.0.0/16\"]\n").unwrap_err();
        assert!(
            e.starts_with("a.toml:5:1: policy.groups: in control mode ([control]) the control plane sends the groups"),
            "{e}"
        );
        let e = parse(control, "addresses = [\"10.77.0.1/24\"]\n").unwrap_err();
        assert!(
            e.starts_with(
                "a.toml:4:14: interface.addresses: in control mode ([control]) the control plane sends the addresses"
            ),
            "{e}"
        );
        // Without [control] both are what a static config is made of.
        let text = "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\naddresses = [\"10.77.0.1/24\"]\n\
                    [policy.groups]\ndb = [\"10.1.0.0/16\"]\n";
        Config::parse(Path::new("a.toml"), text).unwrap();
    }
}
