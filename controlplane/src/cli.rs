//! The command line (clap derive; doc comments are the help text).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// The Debian unit's StateDirectory (packaging/control/); the agent has /var/lib/wirefence.
pub const DEFAULT_DB: &str = "/var/lib/wirefence-control/control.db";
/// The Debian unit's RuntimeDirectory: the admin commands find the packaged server there.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/wirefence-control/control.sock";

/// wirefence reference control plane: enrolls nodes, compiles the access policy and
/// streams each node its peers and policy.
#[derive(Debug, Parser)]
#[command(name = "wirefence-control", version)]
pub struct Cli {
    /// The admin socket: `serve` creates it (0600), the other commands connect to it.
    #[arg(long, global = true, default_value = DEFAULT_ADMIN_SOCKET, env = "WIREFENCE_ADMIN_SOCKET")]
    pub admin_socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane.
    Serve(ServeArgs),
    /// Apply or show the access policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// List, show and remove nodes.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Create enrollment keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Generate a CA and a server certificate for the agent listener.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// The flow records agents reported, oldest first, each marked with whether the node at
    /// the other end reported the flow too (PAIRED), reported nothing of it (ONE-SIDED:
    /// lost or suppressed there, or another path), or none was expected (-).
    Flows(FlowsArgs),
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Only this node's records (node id or hostname).
    #[arg(long)]
    pub node: Option<String>,
    /// Only records of this last while (seconds, or a number with s, m, h or d).
    #[arg(long, value_parser = parse_duration_nonzero)]
    pub since: Option<u64>,
    /// Only allowed or only denied flows.
    #[arg(long, value_enum)]
    pub verdict: Option<VerdictArg>,
    /// Only records of this rule.
    #[arg(long)]
    pub rule: Option<String>,
    /// Only records whose other end is a node that reported nothing of the flow.
    #[arg(long)]
    pub one_sided: bool,
    /// At most this many records, the newest (at most 100000).
    #[arg(long, default_value_t = crate::registry::flows::DEFAULT_LIMIT)]
    pub limit: u32,
    /// Output JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum VerdictArg {
    Allow,
    Deny,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The database: a SQLite file (created 0600; a path or sqlite:PATH) or PostgreSQL
    /// (postgres://user@host/db, or postgres:///db?host=/run/postgresql for its socket).
    /// One server per SQLite file; any number of replicas on one PostgreSQL database.
    #[arg(long, default_value = DEFAULT_DB)]
    pub db: crate::store::DbLocation,
    /// Address for agents, e.g. 0.0.0.0:7443 or [::]:7443; repeat for several.
    #[arg(long, required = true)]
    pub listen: Vec<SocketAddr>,
    /// PEM certificate (chain) of the agent listener.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the agent listener.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often the certificate and key files are checked; when they changed (`certs
    /// renew`, another tool) new connections get the new pair, open ones keep theirs.
    /// SIGHUP reloads at once. A pair that does not load is refused and the current kept.
    #[arg(long, default_value = "5s", value_parser = parse_duration_nonzero)]
    pub tls_reload_interval: u64,
    /// Serve agents over plaintext HTTP/2 (testing only; loopback addresses only).
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (nodes by state, streams, versions,
    /// enrollments by outcome, push latency, the certificate's expiry). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// With --insecure: also serve plaintext on non-loopback addresses (credentials cross
    /// the network in the clear; labs only).
    #[arg(long, requires = "insecure", conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure_allow_remote: bool,
    /// Open agent connections allowed per source (IPv4 address or IPv6 /64); raise it for
    /// many agents behind one NAT.
    #[arg(long, default_value_t = crate::limits::MAX_CONNECTIONS_PER_SOURCE)]
    pub max_connections_per_source: usize,
    /// IPv4 overlay range node addresses are allocated from.
    #[arg(long, default_value = "10.77.0.0/16")]
    pub overlay_v4: Ipv4Net,
    /// IPv6 overlay range node addresses are allocated from.
    #[arg(long, default_value = "fd77::/64")]
    pub overlay_v6: Ipv6Net,
    /// How many versions are kept for resuming agent streams with a delta.
    #[arg(long, default_value_t = crate::registry::DEFAULT_HISTORY)]
    pub history: usize,
    /// Enrollment attempts allowed in a burst, per source address and per enrollment key.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub enroll_burst: u32,
    /// One more enrollment attempt is allowed per source address and per key every this
    /// long (seconds, or a number with s, m, h or d).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub enroll_refill: u64,
    /// How long a recovered route group member of higher priority must stay healthy before
    /// it takes its prefix back from the current primary (seconds, or a number with s, m,
    /// h or d): a member whose link flaps never moves the traffic back and forth.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub route_hold_down: u64,
    /// Every peer's persistent keepalive (seconds, or a number with s, m or h; 1s to 65535s).
    /// Besides keeping NAT mappings open it bounds how long a dead tunnel goes unnoticed:
    /// a route group member whose peers receive nothing from it for three of these is
    /// failed over.
    #[arg(long, default_value = "25s", value_parser = parse_keepalive)]
    pub persistent_keepalive: u16,
    /// How long flow records are kept (seconds, or a number with s, m, h or d).
    #[arg(long, default_value = "7d", value_parser = parse_duration_nonzero)]
    pub flow_retention: u64,
    /// How many flow records are kept at most (the oldest go first).
    #[arg(long, default_value_t = 1_000_000)]
    pub flow_max_records: u64,
    /// Flow records stored per node per second (a burst of 20 seconds' worth is allowed);
    /// what a node reports above it is counted, not stored.
    #[arg(long, default_value_t = crate::limits::FLOWS_PER_SEC, value_parser = clap::value_parser!(u32).range(1..))]
    pub flow_rate: u32,
}

impl ServeArgs {
    pub fn enroll_limits(&self) -> crate::enroll::EnrollLimits {
        let rate =
            crate::enroll::Rate { burst: self.enroll_burst, every: std::time::Duration::from_secs(self.enroll_refill) };
        crate::enroll::EnrollLimits { per_source: rate, per_key: rate }
    }
}

/// How the agent listener is secured.
#[derive(Debug, PartialEq, Eq)]
pub enum TlsMode {
    Tls { cert: PathBuf, key: PathBuf },
    Insecure,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("give --tls-cert and --tls-key, or --insecure to serve agents without TLS")]
pub struct TlsChoiceError;

impl ServeArgs {
    /// Exactly one of TLS (cert and key) or `--insecure`.
    pub fn tls_mode(&self) -> Result<TlsMode, TlsChoiceError> {
        match (&self.tls_cert, &self.tls_key, self.insecure) {
            (Some(cert), Some(key), false) => Ok(TlsMode::Tls { cert: cert.clone(), key: key.clone() }),
            (None, None, true) => Ok(TlsMode::Insecure),
            _ => Err(TlsChoiceError),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file (syntax, references, satisfiability, its tests) and apply it.
    Apply {
        /// The policy file (TOML).
        file: PathBuf,
        /// Apply nothing: validate the file, then replay the flows recorded in a window
        /// against it and print those whose verdict would change, by deciding rule.
        #[arg(long)]
        dry_run: bool,
        /// The window a dry run replays (seconds, or a number with s, m, h or d).
        #[arg(long, requires = "dry_run", value_parser = parse_duration_nonzero, default_value = "24h")]
        since: u64,
        /// Output JSON (a dry run's findings).
        #[arg(long, requires = "dry_run")]
        json: bool,
    },
    /// Print the current policy file and the version it was applied at.
    Show {
        /// Output JSON.
        #[arg(long)]
        json: bool,
        /// Instead: each rule with what the nodes' rule counters counted under it in a
        /// window (summed over nodes: a packet between two nodes counts at both ends),
        /// and the rules that matched nothing.
        #[arg(long)]
        usage: bool,
        /// The window of --usage (seconds, or a number with s, m, h or d).
        #[arg(long, requires = "usage", value_parser = parse_duration_nonzero, default_value = "24h")]
        since: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List the nodes: whether each runs its current view (APPLIED: the version, "in sync"
    /// or how many updates it lacks).
    List {
        /// Also removed nodes (kept for the names and addresses they reserve), marked.
        #[arg(long)]
        all: bool,
        /// Output JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one node (a removed one too: by id, or by the hostname it had).
    Show {
        /// Node id or hostname.
        node: String,
        /// Output JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node: its credential stops working and it leaves every other node's view.
    /// A name it owned stays reserved (see `nodes release`).
    Remove {
        /// Node id or hostname.
        node: String,
    },
    /// Let a node enrolled with an unbound key own its hostname, so `node:<hostname>`
    /// selectors match it.
    Approve {
        /// Node id (unapproved nodes may share a hostname).
        node: String,
    },
    /// Free the hostname a removed node still reserves, so another node may own it.
    Release { hostname: String },
    /// Ask a node to rotate its credential (done at its next registration with the control plane).
    RotateCredential {
        /// Node id or hostname.
        node: String,
    },
    /// A single-use key that re-enrolls a node which lost its state (key pair, credential):
    /// the node enrolled with it (as a new node would, with this key as its enrollment key
    /// and the same hostname) keeps the id, overlay addresses, name, tags and route grants;
    /// the old key and credential stop working. Printed once, on stdout.
    Reenroll {
        /// Node id or hostname.
        node: String,
        /// How long the key is good for: 90s, 30m, 2h, 1d (default 1h).
        #[arg(long, value_parser = parse_duration_nonzero)]
        expires_in: Option<u64>,
    },
    /// Change a node's tags and/or hostname in one version; the node need not enroll or
    /// register again. A new hostname is owned by the node (`node:<hostname>` matches it).
    #[command(arg_required_else_help = true)]
    Set {
        /// Node id or hostname.
        node: String,
        /// The node's tags from now on (replacing all); repeatable.
        #[arg(long = "tag", value_name = "TAG", conflicts_with = "no_tags")]
        tags: Vec<String>,
        /// Take every tag away.
        #[arg(long)]
        no_tags: bool,
        /// The node's hostname from now on.
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Widen or narrow the subnets a node may route for the mesh (its grant, from its
    /// enrollment key). What it advertises inside the new grant comes into effect, and what
    /// falls outside goes, at once: the node need not register or restart.
    #[command(arg_required_else_help = true)]
    Routes {
        /// Node id or hostname.
        node: String,
        /// Add a prefix to the grant (at least /8 for IPv4, /16 for IPv6); repeatable.
        #[arg(long, value_name = "PREFIX")]
        grant: Vec<IpNet>,
        /// Take a granted prefix out of the grant; repeatable.
        #[arg(long, value_name = "PREFIX")]
        revoke: Vec<IpNet>,
    },
}

/// A key's lifetime as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiresIn {
    Secs(u64),
    Never,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an enrollment key (printed once; only its hash is stored). By default it
    /// enrolls one node and expires in 1 hour.
    Create {
        /// The key enrolls one node (the default; kept for scripts).
        #[arg(long, conflicts_with_all = ["reusable", "max_uses"])]
        single_use: bool,
        /// The key enrolls any number of nodes.
        #[arg(long, conflicts_with = "max_uses")]
        reusable: bool,
        /// The key enrolls at most N nodes.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_uses: Option<u32>,
        /// Lifetime: seconds, or a number with s, m, h or d (e.g. 30m, 7d), or `never`.
        /// Default: 1h. Zero is refused.
        #[arg(long, value_parser = parse_expires_in)]
        expires_in: Option<ExpiresIn>,
        /// Bind the key to this hostname: the node enrolled with it owns the name, so
        /// `node:<hostname>` selectors match it. Without it, the enrolled node's hostname
        /// is a label until `nodes approve`. A bound key enrolls one node.
        #[arg(long, conflicts_with_all = ["reusable", "max_uses"])]
        hostname: Option<String>,
        /// Tag given to nodes enrolled with the key (policy selector tag:<name>); repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Subnet nodes enrolled with the key may advertise routes within (at least /8 for
        /// IPv4, /16 for IPv6); repeatable. Without it, such nodes may advertise no routes.
        #[arg(long = "route")]
        routes: Vec<IpNet>,
        /// Output JSON ({"key_id", "key", "expires_unix"}).
        #[arg(long)]
        json: bool,
    },
    /// List enrollment keys (id, hostname, tags, routes, uses left, expiry, created; never the secret).
    List {
        /// Output JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an enrollment key: it enrolls no more nodes (enrolled nodes stay).
    Revoke {
        /// The key id (the part before the dot).
        key_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write ca.pem, ca.key, server.pem and server.key into a directory.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Subject alternative name of the server certificate (DNS name or IP); repeatable.
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
    },
    /// Replace server.pem and server.key in a directory with a new key and a certificate
    /// (one year) from the CA there; a running `serve` using them picks them up (within
    /// --tls-reload-interval, or at once on SIGHUP). Agents need nothing: the CA is the same.
    Renew {
        /// The directory `certs init` wrote.
        #[arg(long)]
        dir: PathBuf,
        /// Subject alternative names of the new certificate (repeatable); default: those
        /// of the current one.
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

/// [`parse_duration`], or `never`; zero is refused (it would never mean "forever").
pub fn parse_expires_in(s: &str) -> Result<ExpiresIn, String> {
    if s.trim() == "never" {
        return Ok(ExpiresIn::Never);
    }
    match parse_duration(s)? {
        0 => Err(format!("{s:?}: a key that expires at once is useless (for no expiry say `never`)")),
        n => Ok(ExpiresIn::Secs(n)),
    }
}

/// [`parse_duration`], not zero.
fn parse_duration_nonzero(s: &str) -> Result<u64, String> {
    match parse_duration(s)? {
        0 => Err(format!("{s:?}: must be at least 1s")),
        n => Ok(n),
    }
}

fn parse_keepalive(s: &str) -> Result<u16, String> {
    match parse_duration(s)? {
        0 => Err(format!("{s:?}: must be at least 1s")),
        n => u16::try_from(n).map_err(|_| format!("{s:?}: WireGuard's keepalive is at most 65535s")),
    }
}

/// `3600`, `45s`, `30m`, `1h`, `7d` -> seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 3600, 30m, 1h, 7d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h or d)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3600"), Ok(3600));
        assert_eq!(parse_duration("45s"), Ok(45));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("7d"), Ok(604800));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn keepalives_are_between_one_second_and_what_wireguard_takes() {
        assert_eq!(parse_keepalive("25s"), Ok(25));
        assert_eq!(parse_keepalive("1"), Ok(1));
        assert_eq!(parse_keepalive("19h"), Err("\"19h\": WireGuard's keepalive is at most 65535s".into()));
        assert_eq!(parse_keepalive("0s"), Err("\"0s\": must be at least 1s".into()));
    }

    #[test]
    fn zero_lifetimes_are_refused_never_is_explicit() {
        for zero in ["0", "0s", "0d", "0m"] {
            assert!(parse_expires_in(zero).is_err(), "{zero}");
        }
        assert_eq!(parse_expires_in("never"), Ok(ExpiresIn::Never));
        assert_eq!(parse_expires_in("2h"), Ok(ExpiresIn::Secs(7200)));
        let create = |args: &[&str]| {
            let mut v = vec!["wirefence-control", "keys", "create"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        assert!(create(&["--expires-in", "0"]).is_err());
        assert!(create(&["--reusable", "--max-uses", "3"]).is_err());
        assert!(create(&["--hostname", "db1", "--reusable"]).is_err());
        assert!(create(&["--max-uses", "0"]).is_err());
        assert!(create(&["--hostname", "db1", "--expires-in", "7d"]).is_ok());
    }

    #[test]
    fn serve_needs_exactly_one_of_tls_or_insecure() {
        let parse = |args: &[&str]| {
            let mut v = vec!["wirefence-control", "serve", "--listen", "127.0.0.1:7443"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        let mode = |args: &[&str]| match parse(args).unwrap().command {
            Command::Serve(s) => s.tls_mode(),
            _ => unreachable!("serve"),
        };
        assert_eq!(mode(&["--insecure"]), Ok(TlsMode::Insecure));
        assert_eq!(
            mode(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]),
            Ok(TlsMode::Tls { cert: "c.pem".into(), key: "k.pem".into() })
        );
        assert_eq!(mode(&[]), Err(TlsChoiceError));
        assert!(parse(&["--tls-cert", "c.pem"]).is_err());
        assert!(parse(&["--insecure", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).is_err());
        assert!(parse(&["--insecure-allow-remote", "--tls-cert", "c.pem", "--tls-key", "k.pem"]).is_err());
        assert!(parse(&["--insecure", "--insecure-allow-remote"]).is_ok());
        let Command::Serve(s) = parse(&["--insecure", "--listen", "[::1]:7443"]).unwrap().command else {
            unreachable!("serve")
        };
        assert_eq!(s.listen.len(), 2);
        assert_eq!(s.db, crate::store::DbLocation::Sqlite(PathBuf::from(DEFAULT_DB)));
        assert_eq!(s.overlay_v4.to_string(), "10.77.0.0/16");
        assert_eq!(s.overlay_v6.to_string(), "fd77::/64");
        assert_eq!(s.enroll_limits(), crate::enroll::EnrollLimits::default());
    }
}
