//! The `[gateway]` section: forwarding, masquerade and the source of the gateway's own
//! traffic.
//!
//! ```toml
//! [gateway]
//! forward = true                       # true (the families in use) | false | ["ipv4", "ipv6"]
//! masquerade = ["192.168.10.0/24"]     # LAN sources that take the tunnel's address; needs forward
//! own_traffic = "overlay"              # overlay | lan
//! site_prefixes = ["192.168.10.0/24"]  # the site's prefixes; default: [control] advertise_routes
//! ```

use std::collections::BTreeSet;
use std::ops::Range;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::gateway::OwnTraffic;
use crate::model::Family;
use crate::primitives::parse_prefix;

/// Which families' forwarding the agent turns on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Forward {
    /// The agent leaves the sysctls alone (and gives back any value it changed).
    #[default]
    Off,
    /// Every family the node has tunnel addresses or routes in.
    InUse,
    /// Exactly these.
    Families(BTreeSet<Family>),
}

/// A validated `[gateway]` section (its `Default` is the section left out).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayConfig {
    pub forward: Forward,
    pub masquerade: BTreeSet<IpNet>,
    pub own_traffic: OwnTraffic,
    /// The site's prefixes as configured here (`None`: `[control] advertise_routes`).
    pub site_prefixes: Option<BTreeSet<IpNet>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    forward: Option<Spanned<toml::Value>>,
    #[serde(default)]
    masquerade: Vec<Spanned<String>>,
    own_traffic: Option<Spanned<String>>,
    site_prefixes: Option<Vec<Spanned<String>>>,
}

type FieldError = (Range<usize>, String);

/// What the rest of the config tells about the section.
pub(crate) struct Context<'a> {
    /// The section's span (for errors about a missing companion key).
    pub span: Range<usize>,
    /// The families of the configured tunnel addresses; `None` in control mode (the
    /// control plane assigns them).
    pub address_families: Option<BTreeSet<Family>>,
    /// `[control] advertise_routes`, if in control mode.
    pub advertise_routes: Option<&'a [IpNet]>,
}

fn parse_forward(v: &toml::Value) -> Result<Forward, String> {
    let families = match v {
        toml::Value::Boolean(false) => return Ok(Forward::Off),
        toml::Value::Boolean(true) => return Ok(Forward::InUse),
        toml::Value::Array(items) => items,
        other => return Err(format!("{other} is not true, false or a list of \"ipv4\", \"ipv6\"")),
    };
    let mut out = BTreeSet::new();
    for item in families {
        let family = match item.as_str() {
            Some("ipv4") => Family::V4,
            Some("ipv6") => Family::V6,
            _ => return Err(format!("{item} is not \"ipv4\" or \"ipv6\"")),
        };
        if !out.insert(family) {
            return Err(format!("{item} is listed twice"));
        }
    }
    if out.is_empty() {
        return Err("an empty list forwards nothing; write false".into());
    }
    Ok(Forward::Families(out))
}

fn prefixes(field: &str, raw: &[Spanned<String>]) -> Result<BTreeSet<IpNet>, FieldError> {
    let mut out = BTreeSet::new();
    for p in raw {
        let net = parse_prefix(p.get_ref()).map_err(|m| (p.span(), format!("gateway.{field}: {m}")))?;
        if net.prefix_len() == 0 {
            return Err((p.span(), format!("gateway.{field}: {net} takes in every address; list the site's prefixes")));
        }
        if !out.insert(net) {
            return Err((p.span(), format!("gateway.{field}: {net} is listed twice")));
        }
    }
    Ok(out)
}

impl RawGateway {
    pub(crate) fn resolve(self, cx: Context) -> Result<GatewayConfig, FieldError> {
        let forward = match &self.forward {
            None => Forward::Off,
            Some(v) => parse_forward(v.get_ref()).map_err(|m| (v.span(), format!("gateway.forward: {m}")))?,
        };
        let masquerade = prefixes("masquerade", &self.masquerade)?;
        if let Some(first) = self.masquerade.first() {
            let forwarded = |f: Family| match &forward {
                Forward::Off => false,
                Forward::InUse => true,
                Forward::Families(fs) => fs.contains(&f),
            };
            for (raw, net) in self.masquerade.iter().zip(&masquerade) {
                let family = Family::of(net);
                if !forwarded(family) {
                    let span = self.forward.as_ref().map_or(first.span(), |f| f.span());
                    return Err((
                        span,
                        format!(
                            "gateway.masquerade: {net} is LAN traffic the gateway forwards; it needs gateway.forward \
                             = true (or a list with \"{}\")",
                            family.name()
                        ),
                    ));
                }
                if cx.address_families.as_ref().is_some_and(|fs| !fs.contains(&family)) {
                    return Err((
                        raw.span(),
                        format!(
                            "gateway.masquerade: {net} is {} but interface.addresses has no {} address to masquerade to",
                            family.name(),
                            family.name()
                        ),
                    ));
                }
            }
        }
        let site_prefixes = match &self.site_prefixes {
            None => None,
            Some(raw) => Some(prefixes("site_prefixes", raw)?),
        };
        let own_traffic = match &self.own_traffic {
            None => OwnTraffic::Overlay,
            Some(o) => match o.get_ref().as_str() {
                "overlay" => OwnTraffic::Overlay,
                "lan" => OwnTraffic::Lan,
                other => {
                    return Err((o.span(), format!("gateway.own_traffic: {other:?} is not \"overlay\" or \"lan\"")))
                }
            },
        };
        if own_traffic == OwnTraffic::Lan {
            let site = site_prefixes.as_ref().map(|s| !s.is_empty()).or(cx.advertise_routes.map(|r| !r.is_empty()));
            if site != Some(true) {
                let span = self.own_traffic.as_ref().map_or(cx.span.clone(), |o| o.span());
                return Err((
                    span,
                    "gateway.own_traffic: \"lan\" needs the site's prefixes: gateway.site_prefixes, or \
                     [control] advertise_routes"
                        .into(),
                ));
            }
        }
        Ok(GatewayConfig { forward, masquerade, own_traffic, site_prefixes })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use crate::gateway::OwnTraffic;
    use crate::model::Family;
    use std::path::Path;

    use super::Forward;

    fn parse(gateway: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\naddresses = [\"10.77.0.1/24\"]\n\n[gateway]\n{gateway}"
        );
        Config::parse(Path::new("agent.toml"), &text)
    }

    fn err(gateway: &str) -> String {
        parse(gateway).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_values() {
        let g = parse("").unwrap().gateway;
        assert_eq!(g.forward, Forward::Off);
        assert_eq!(g.own_traffic, OwnTraffic::Overlay);
        assert!(g.masquerade.is_empty() && g.site_prefixes.is_none());
        let g = parse("forward = true\nmasquerade = [\"192.168.10.0/24\"]\nown_traffic = \"lan\"\nsite_prefixes = [\"192.168.10.0/24\"]\n")
            .unwrap()
            .gateway;
        assert_eq!(g.forward, Forward::InUse);
        assert_eq!(g.masquerade.len(), 1);
        assert_eq!(g.own_traffic, OwnTraffic::Lan);
        let g = parse("forward = [\"ipv6\", \"ipv4\"]\n").unwrap().gateway;
        assert_eq!(g.forward, Forward::Families([Family::V4, Family::V6].into()));
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let e = err("forward = true\nmasquerade = [\"192.168.10.1/24\"]\n");
        assert!(
            e.starts_with("agent.toml:8:") && e.contains("gateway.masquerade") && e.contains("192.168.10.0/24"),
            "{e}"
        );
        let e = err("masquerade = [\"192.168.10.0/24\"]\n");
        assert!(e.starts_with("agent.toml:7:") && e.contains("needs gateway.forward = true"), "{e}");
        let e = err("forward = [\"ipv6\"]\nmasquerade = [\"192.168.10.0/24\"]\n");
        assert!(e.starts_with("agent.toml:7:") && e.contains("\"ipv4\""), "{e}");
        let e = err("forward = true\nmasquerade = [\"fd10::/64\"]\n");
        assert!(e.starts_with("agent.toml:8:") && e.contains("no ipv6 address"), "{e}");
        let e = err("forward = [\"ipv4\", \"ipx\"]\n");
        assert!(e.starts_with("agent.toml:7:") && e.contains("gateway.forward: \"ipx\""), "{e}");
        let e = err("forward = [\"ipv4\", \"ipv4\"]\n");
        assert!(e.contains("listed twice"), "{e}");
        let e = err("forward = []\n");
        assert!(e.contains("write false"), "{e}");
        let e = err("forward = \"yes\"\n");
        assert!(e.starts_with("agent.toml:7:") && e.contains("gateway.forward"), "{e}");
        let e = err("own_traffic = \"lan\"\n");
        assert!(
            e.starts_with("agent.toml:7:") && e.contains("gateway.own_traffic") && e.contains("site_prefixes"),
            "{e}"
        );
        let e = err("own_traffic = \"wan\"\n");
        assert!(e.starts_with("agent.toml:7:") && e.contains("own_traffic") && e.contains("overlay"), "{e}");
        let e = err("forward = true\nmasquerade = [\"0.0.0.0/0\"]\n");
        assert!(e.contains("takes in every address"), "{e}");
        let e = err("forward = true\nmasquerade = [\"192.168.10.0/24\", \"192.168.10.0/24\"]\n");
        assert!(e.contains("listed twice"), "{e}");
        let e = err("nat = true\n");
        assert!(e.starts_with("agent.toml:7:") && e.contains("unknown field `nat`"), "{e}");
    }

    #[test]
    fn lan_source_may_come_from_advertised_routes_in_control_mode() {
        let text = "[interface]\nname = \"wf0\"\nprivate_key_file = \"/k\"\n\
                    [control]\nendpoints = [\"192.0.2.10:7443\"]\ninsecure = true\nadvertise_routes = [\"10.20.2.0/24\"]\n\
                    [gateway]\nforward = true\nmasquerade = [\"fd10::/64\"]\nown_traffic = \"lan\"\n";
        let c = Config::parse(Path::new("agent.toml"), text).unwrap();
        assert_eq!(c.gateway.own_traffic, OwnTraffic::Lan);
    }
}
