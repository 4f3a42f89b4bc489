//! `Debug` for the messages that carry secrets (enrollment keys, credentials): the secret
//! shows as `<redacted>` (or `<empty>`), so a `{:?}` in a log line cannot leak it.

use std::fmt;

use crate::v1::{CreateEnrollmentKeyReply, RegisterRequest, RegisterResponse, RotateCredentialReply};

struct Redacted<'a>(&'a str);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "<empty>" } else { "<redacted>" })
    }
}

impl fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("public_key", &self.public_key)
            .field("hostname", &self.hostname)
            .field("endpoints", &self.endpoints)
            .field("enrollment_key", &Redacted(&self.enrollment_key))
            .field("routes", &self.routes)
            .field("challenge_id", &self.challenge_id)
            .field("proof", &self.proof)
            .finish()
    }
}

impl fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("node_id", &self.node_id)
            .field("credential", &Redacted(&self.credential))
            .field("addresses", &self.addresses)
            .field("rotate_credential", &self.rotate_credential)
            .field("overlay", &self.overlay)
            .finish()
    }
}

impl fmt::Debug for CreateEnrollmentKeyReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateEnrollmentKeyReply")
            .field("key_id", &self.key_id)
            .field("key", &Redacted(&self.key))
            .field("expires_unix", &self.expires_unix)
            .finish()
    }
}

impl fmt::Debug for RotateCredentialReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateCredentialReply").field("credential", &Redacted(&self.credential)).finish()
    }
}
