//! wirefence-agent: makes a Linux machine a node of a WireGuard mesh by reconciling kernel
//! state (WireGuard device, link, addresses, routes, rules) against a desired state.

pub mod bpf;
pub mod config;
pub mod control;
pub mod daemon;
pub mod desired;
pub mod durable;
pub mod enforce;
pub mod gateway;
pub mod hot_loop;
pub mod keys;
pub mod load;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod ownership;
pub mod passes;
pub mod perms;
pub mod plan;
pub mod policy;
pub mod primitives;
pub mod reconcile;
pub mod report;
pub mod state;
pub mod status;
pub mod supervisor;
pub mod sys;
pub mod wg;
