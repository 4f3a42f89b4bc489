//! What one client may cost the control plane. The agent listener faces the network, so
//! every resource an unauthenticated or misbehaving peer can hold is bounded here: TCP
//! connections (per source and in total), the time to finish a TLS handshake, HTTP/2
//! streams and resets per connection, message and header sizes, the time a request may
//! take; and per authenticated node: Watch streams, report messages, flow records stored,
//! and how often a re-registration may change what every other node sees.
//!
//! The defaults are generous for a real agent (one connection, one Watch, a report every
//! few seconds) and small for an attacker; [`Limits`] is part of
//! [`crate::server::ServeConfig`] so tests and operators can change them.

use std::time::Duration;

/// A TCP connection must finish its TLS handshake (or, in plaintext, send its first byte)
/// within this time, or it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections from one source (an IPv4 address, an IPv6 /64). Agents behind one NAT
/// share it, so it is a flag (`--max-connections-per-source`).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 64;
/// Open connections in total (accepted or still handshaking).
pub const MAX_CONNECTIONS: usize = 16_384;
/// Concurrent HTTP/2 streams per connection (an agent uses three: Register, Watch, Report).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Streams a client may reset before the server accepted them (HTTP/2 rapid reset,
/// CVE-2023-44487) before the connection gets a GOAWAY.
pub const MAX_PENDING_RESET_STREAMS: usize = 20;
/// Streams the server may reset because of client errors before the connection gets a
/// GOAWAY (hyper's "MadeYouReset" limit).
pub const MAX_LOCAL_ERROR_RESETS: usize = 64;
/// A unary call (Register) or the opening of a stream (authentication, first snapshot)
/// must finish within this time. Generous: under a burst of enrollments, calls queue for
/// the store, and a refused one is retried by its agent.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message accepted from an agent. The largest legitimate one is a statistics
/// report of 4,096 peers (about 300 KiB).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest HTTP/2 header list accepted.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Open Watch streams per node; a reconnecting agent briefly has two.
pub const MAX_WATCHES_PER_NODE: usize = 4;
/// A re-registration that changes endpoints or routes is applied at most once per this
/// interval per node; changes in between are coalesced (the latest wins).
pub const REREGISTER_INTERVAL: Duration = Duration::from_secs(5);
/// Sustained report messages per second per node, and the burst allowed above it.
pub const REPORTS_PER_SEC: u32 = 20;
pub const REPORT_BURST: u32 = 100;
/// Flow records stored per node per second, and the burst allowed above it: one node's
/// flood cannot push out everyone else's records (retention counts all of them). What is
/// over is counted, not stored.
pub const FLOWS_PER_SEC: u32 = 100;
pub const FLOW_BURST: u32 = 2_000;

/// The limits of one control plane; `Default` gives the constants above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub handshake_timeout: Duration,
    pub max_connections_per_source: usize,
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub max_pending_reset_streams: usize,
    pub max_local_error_resets: usize,
    pub request_timeout: Duration,
    pub max_message: usize,
    pub max_header_list: u32,
    pub max_watches_per_node: usize,
    pub reregister_interval: Duration,
    pub reports_per_sec: u32,
    pub report_burst: u32,
    pub flows_per_sec: u32,
    pub flow_burst: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_connections_per_source: MAX_CONNECTIONS_PER_SOURCE,
            max_connections: MAX_CONNECTIONS,
            max_streams_per_connection: MAX_STREAMS_PER_CONNECTION,
            max_pending_reset_streams: MAX_PENDING_RESET_STREAMS,
            max_local_error_resets: MAX_LOCAL_ERROR_RESETS,
            request_timeout: REQUEST_TIMEOUT,
            max_message: MAX_MESSAGE,
            max_header_list: MAX_HEADER_LIST,
            max_watches_per_node: MAX_WATCHES_PER_NODE,
            reregister_interval: REREGISTER_INTERVAL,
            reports_per_sec: REPORTS_PER_SEC,
            report_burst: REPORT_BURST,
            flows_per_sec: FLOWS_PER_SEC,
            flow_burst: FLOW_BURST,
        }
    }
}
