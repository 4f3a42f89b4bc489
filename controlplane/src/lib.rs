//! wirefence-control: the reference control plane.
//!
//! - [`store`]: SQLite persistence (nodes, enrollment keys, policy, version counter, apply status).
//! - [`policy`]: the policy file (parse with positions, compile selectors to prefixes,
//!   evaluate `[[tests]]`).
//! - [`state`]: immutable [`state::GlobalState`] snapshots (one per version) and the history
//!   kept for resuming streams.
//! - [`view`]: one node's view of a global state (addresses, peers, policy) and deltas.
//! - [`peers`]: peer lists shared between views; [`wire`]: the stream's `Update` as sent
//!   (peers encoded once, written by reference); [`grpc`]: the services' server code.
//! - [`registry`]: the node registry, which serializes every change: store, version, publication.
//! - [`server`]: the gRPC services and [`server::serve`] to run them in-process.
//! - [`admin_client`]: connect to the admin service over its Unix socket.
//! - [`credentials`]: the in-memory credential index authentication reads.
//! - [`auth`], [`alloc`], [`certs`]: credentials, overlay address allocation, test PKI.
//! - [`limits`]: what one client may cost (connections, handshakes, streams, rates).
//! - [`flows`]: flow records as kept (checked, and who should have seen the other end).
//! - [`cli`], [`output`]: the command line and its renderings.

pub mod admin_client;
pub mod alloc;
pub mod auth;
pub mod certs;
pub mod change;
pub mod cli;
pub mod credentials;
pub mod election;
pub mod enroll;
pub mod error;
pub mod flows;
pub mod grpc;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod output;
pub mod peers;
pub mod policy;
pub mod registry;
pub mod server;
pub mod state;
pub mod store;
pub mod view;
pub mod wire;

pub use error::Error;
