//! The library's error type and its one mapping to gRPC statuses.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use tonic::{Code, Status};
use wirefence_proto::{Escaped, WireError};

use crate::policy::PolicyError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Change(#[from] crate::change::ChangeError),

    // Request validation (the message names the field).
    #[error("{field}: {source}")]
    Wire {
        field: String,
        #[source]
        source: WireError,
    },
    #[error("public_key: must be 32 bytes, got {0}")]
    PublicKeyLength(usize),
    #[error("public_key: the all-zero key is not a public key")]
    PublicKeyZero,
    #[error("public_key: already enrolled as a live node; re-register with the node's credential")]
    PublicKeyEnrolled,
    #[error("public_key: node {0} was removed; its key pair cannot enroll again (generate a new one)")]
    PublicKeyRemoved(String),
    #[error("{0}: a registered node cannot change it (remove the node and enroll a new one)")]
    Immutable(&'static str),
    #[error("public_key: neither this node's key nor the key it announced (`wirefence-agent rotate-key` announces a new key first)")]
    KeyNotAnnounced,
    #[error("new_public_key: is the node's key already")]
    KeyUnchanged,
    #[error("hostname: {0:?} is not a hostname (dot-separated labels of A-Z a-z 0-9 -, at most 63 each)")]
    Hostname(String),
    #[error("hostname: {0:?} is already used by another node")]
    HostnameTaken(String),
    #[error("routes[{index}]: {route} overlaps the overlay {overlay}")]
    RouteOverlapsOverlay { index: usize, route: IpNet, overlay: IpNet },
    #[error("routes[{index}]: {route} is broader than /{min} (refused as a route)")]
    RouteTooBroad { index: usize, route: IpNet, min: u8 },
    #[error("revoke: {route} is not granted to node {node} (granted: {})", crate::model::prefix_list(.granted))]
    NotGranted { route: IpNet, node: String, granted: Vec<IpNet> },
    #[error("{field}: at most {max} entries")]
    TooMany { field: &'static str, max: usize },
    #[error("tags: {0:?} is not {chars}", chars = wirefence_proto::policy::NAME_CHARS)]
    Tag(String),

    // Enrollment.
    #[error("an enrollment key is required to register a new node")]
    EnrollmentKeyMissing,
    #[error("unknown enrollment key")]
    EnrollmentKeyUnknown,
    #[error("enrollment key {id} has no uses left (used {uses} of {max_uses})")]
    EnrollmentKeyExhausted { id: String, uses: u32, max_uses: u32 },
    #[error("enrollment key {0} has expired")]
    EnrollmentKeyExpired(String),
    #[error("enrollment key {0} was revoked")]
    EnrollmentKeyRevoked(String),
    #[error("too many enrollment attempts from this address; retry later")]
    EnrollRateSource,
    #[error("too many enrollments with enrollment key {0}; retry later")]
    EnrollRateKey(String),
    #[error("too many open enrollment challenges; retry later")]
    ChallengesBusy,
    #[error("challenge_id: enrollment needs a challenge (call EnrollChallenge) and its proof")]
    ChallengeMissing,
    #[error("challenge_id: unknown, used or expired challenge (get a new one)")]
    ChallengeUnknown,
    #[error("proof: {0}")]
    Proof(#[from] wirefence_proto::possession::PossessionError),
    #[error("endpoints[{index}]: {addr}: {problem}")]
    Endpoint { index: usize, addr: SocketAddr, problem: wirefence_proto::endpoint::EndpointProblem },
    #[error("hostname: {name:?} is bound to enrollment key {key}; {wanted:?} cannot enroll with it")]
    HostnameNotBound { name: String, key: String, wanted: String },
    #[error("hostname: {name:?} belongs to node {node}{}", if *.removed { " (removed; `nodes release` frees the name)" } else { "" })]
    HostnameOwned { name: String, node: String, removed: bool },

    // Node authentication.
    #[error("missing credential (metadata `authorization: Bearer <credential>`)")]
    CredentialMissing,
    #[error("malformed credential")]
    CredentialMalformed,
    #[error("invalid credential")]
    CredentialInvalid,
    #[error("node {0} has been removed")]
    NodeRemoved(String),

    // Abuse limits (see crate::limits).
    #[error("node {node} already has {max} open Watch streams")]
    TooManyWatches { node: String, max: usize },
    #[error("node {node} sends more than {per_sec} report messages a second (burst {burst})")]
    ReportRate { node: String, per_sec: u32, burst: u32 },
    #[error("{0} took longer than the request timeout")]
    RequestTimeout(&'static str),

    // Administration.
    #[error("no node {0:?} (give a node id or a hostname)")]
    UnknownNode(String),
    #[error("the overlay {0} has no free address left")]
    PoolExhausted(IpNet),
    #[error("no enrollment key {0:?}")]
    UnknownKey(String),
    #[error("expires_in: 0 would expire at once; give a lifetime, or never_expires (--expires-in never)")]
    ExpiresInZero,
    #[error("{0} and {1} cannot be combined")]
    KeyOptionsConflict(&'static str, &'static str),
    #[error("hostname: a key bound to a hostname enrolls one node (no max_uses or reusable)")]
    BoundKeyReusable,
    #[error("no removed node reserves the name {0:?}")]
    NameNotReserved(String),
    #[error("verdict: {0} is neither allow (1) nor deny (2) (0 for both)")]
    FlowVerdict(i32),
    #[error("rule_id: {0:?} is not a rule id ({chars})", chars = wirefence_proto::policy::NAME_CHARS)]
    FlowRuleId(String),
    #[error("limit: {limit} is above {max}")]
    FlowLimit { limit: u32, max: u32 },

    // Serving.
    #[error("the control plane is shutting down")]
    ShuttingDown,
    #[error("blocking task failed: {0}")]
    Task(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing plaintext (--insecure) on {0}, which is not a loopback address; use TLS, or add \
         --insecure-allow-remote to send credentials in the clear on purpose"
    )]
    InsecureRemote(SocketAddr),
    #[error("TLS {what}: {source}")]
    TlsPem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS: no {0} in the PEM file")]
    TlsMissing(&'static str),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("admin socket {0} is in use by a running control plane")]
    AdminSocketInUse(PathBuf),
    #[error("admin socket directory {path}: {why}; use a directory only its owner (or root) can write")]
    AdminSocketDir { path: PathBuf, why: String },
    #[error("{0}: refusing to overwrite an existing file")]
    Exists(PathBuf),
    #[error("certificate {path}: {why}")]
    CertFile { path: PathBuf, why: String },
    #[error("database {db} is in use by another control plane ({}lock {lock}); run one `serve` per database", match pid { Some(p) => format!("pid {p} holds "), None => String::new() })]
    DatabaseInUse { db: PathBuf, lock: PathBuf, pid: Option<u32> },
    /// A database directory or TLS key another user owns or can write (a key: read).
    #[error("{path}: {why}; refusing to use it")]
    NotPrivate { path: PathBuf, why: String },
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { what, path, source }
    }

    pub fn wire(field: impl Into<String>) -> impl FnOnce(WireError) -> Error {
        let field = field.into();
        move |source| Error::Wire { field, source }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::Policy(_)
            | Error::Wire { .. }
            | Error::PublicKeyLength(_)
            | Error::PublicKeyZero
            | Error::Hostname(_)
            | Error::RouteOverlapsOverlay { .. }
            | Error::RouteTooBroad { .. }
            | Error::TooMany { .. }
            | Error::Tag(_)
            | Error::ChallengeMissing
            | Error::Endpoint { .. }
            | Error::ExpiresInZero
            | Error::KeyOptionsConflict(..)
            | Error::BoundKeyReusable
            | Error::NotGranted { .. }
            | Error::KeyUnchanged
            | Error::FlowVerdict(_)
            | Error::FlowRuleId(_)
            | Error::FlowLimit { .. } => Code::InvalidArgument,
            Error::PublicKeyEnrolled | Error::HostnameTaken(_) | Error::HostnameOwned { .. } => Code::AlreadyExists,
            Error::EnrollmentKeyMissing
            | Error::EnrollmentKeyUnknown
            | Error::CredentialMissing
            | Error::CredentialMalformed
            | Error::CredentialInvalid
            | Error::ChallengeUnknown
            | Error::Proof(_) => Code::Unauthenticated,
            Error::EnrollmentKeyExhausted { .. }
            | Error::EnrollmentKeyRevoked(_)
            | Error::HostnameNotBound { .. }
            | Error::EnrollmentKeyExpired(_)
            | Error::NodeRemoved(_)
            | Error::PublicKeyRemoved(_)
            | Error::Immutable(_)
            | Error::KeyNotAnnounced => Code::PermissionDenied,
            Error::UnknownNode(_) | Error::UnknownKey(_) | Error::NameNotReserved(_) => Code::NotFound,
            Error::PoolExhausted(_)
            | Error::EnrollRateSource
            | Error::EnrollRateKey(_)
            | Error::ChallengesBusy
            | Error::TooManyWatches { .. }
            | Error::ReportRate { .. } => Code::ResourceExhausted,
            Error::RequestTimeout(_) => Code::DeadlineExceeded,
            Error::ShuttingDown | Error::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            // Another server's change won a race on a unique name or address: try again.
            Error::Store(StoreError::Conflict(_)) => Code::Aborted,
            Error::Store(_)
            | Error::Change(_)
            | Error::Task(_)
            | Error::Io { .. }
            | Error::Bind { .. }
            | Error::Transport(_)
            | Error::InsecureRemote(_)
            | Error::TlsPem { .. }
            | Error::TlsMissing(_)
            | Error::Tls(_)
            | Error::Cert(_)
            | Error::Reflection(_)
            | Error::AdminSocketInUse(_)
            | Error::AdminSocketDir { .. }
            | Error::Exists(_)
            | Error::CertFile { .. }
            | Error::DatabaseInUse { .. }
            | Error::NotPrivate { .. } => Code::Internal,
        }
    }
}

/// The one place library errors become gRPC statuses. Internal details are logged, not
/// sent.
impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = e.code();
        if code == Code::Internal {
            tracing::error!(error = %Escaped(&e.to_string()), "internal error");
            return Status::internal("internal error (see the control plane's log)");
        }
        Status::new(code, e.to_string())
    }
}
