//! The services' server code (build.rs), sending [`crate::wire::Update`] on Watch.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/wirefence.v1.rs"));
