//! Proof of possession at enrollment. The control plane hands out a one-time X25519 key
//! (the challenge); the node answers with an HMAC-SHA256 keyed with the Diffie-Hellman
//! result of its WireGuard private key and that one-time key. The control plane gets the
//! same result from its one-time private key and the public key being enrolled, so only a
//! holder of that public key's private key can answer: a holder of an enrollment key
//! cannot register somebody else's public key (and lock that node out).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use x25519_dalek::PublicKey;
pub use x25519_dalek::StaticSecret;

/// Domain separation: an enrollment's MAC means nothing anywhere else, nor a key rotation's.
const CONTEXT: &[u8] = b"wirefence-enroll-v1";
const ROTATE_CONTEXT: &[u8] = b"wirefence-rotate-v1";

/// Why a proof is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PossessionError {
    #[error("the public key is a low-order point (no shared secret)")]
    LowOrder,
    #[error("the proof does not match the public key (the private key is not held)")]
    Mismatch,
    #[error("server_public_key: must be 32 bytes, got {0}")]
    ServerKeyLength(usize),
}

/// Fills `req.challenge_id` and `req.proof` (for `req.hostname`) from a challenge.
pub fn answer(
    req: &mut crate::v1::RegisterRequest,
    private_key: &[u8; 32],
    challenge: &crate::v1::EnrollChallengeReply,
) -> Result<(), PossessionError> {
    let server = server_key(challenge)?;
    req.proof = prove(private_key, &server, &challenge.challenge_id, &req.hostname)?.to_vec();
    req.challenge_id = challenge.challenge_id.clone();
    Ok(())
}

/// The RotateKey request of node `node_id` announcing the public key of `new_private_key`,
/// with its proof of possession under `challenge`.
pub fn rotation(
    new_private_key: &[u8; 32],
    node_id: &str,
    challenge: &crate::v1::EnrollChallengeReply,
) -> Result<crate::v1::RotateKeyRequest, PossessionError> {
    let server = server_key(challenge)?;
    let proof = proof(ROTATE_CONTEXT, new_private_key, &server, &challenge.challenge_id, node_id)?;
    Ok(crate::v1::RotateKeyRequest {
        new_public_key: public_key(new_private_key).to_vec(),
        challenge_id: challenge.challenge_id.clone(),
        proof: proof.to_vec(),
    })
}

/// The control plane's check of a RotateKey proof for node `node_id`.
pub fn verify_rotation(
    server_secret: &StaticSecret,
    new_public_key: &[u8; 32],
    challenge_id: &str,
    node_id: &str,
    proof: &[u8],
) -> Result<(), PossessionError> {
    check(ROTATE_CONTEXT, server_secret, new_public_key, challenge_id, node_id, proof)
}

fn server_key(challenge: &crate::v1::EnrollChallengeReply) -> Result<[u8; 32], PossessionError> {
    challenge
        .server_public_key
        .as_slice()
        .try_into()
        .map_err(|_| PossessionError::ServerKeyLength(challenge.server_public_key.len()))
}

/// The X25519 public key of `private_key`.
pub fn public_key(private_key: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private_key)).to_bytes()
}

fn mac(context: &[u8], shared: &[u8; 32], challenge_id: &str, public_key: &[u8; 32], subject: &str) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(shared).expect("HMAC takes any key length");
    // Length prefixes keep the fields apart (no two field lists give one byte string).
    for part in [context, challenge_id.as_bytes(), public_key, subject.as_bytes()] {
        m.update(&(part.len() as u64).to_be_bytes());
        m.update(part);
    }
    m
}

/// The node's answer at enrollment: `private_key` is its WireGuard private key.
pub fn prove(
    private_key: &[u8; 32],
    server_public_key: &[u8; 32],
    challenge_id: &str,
    hostname: &str,
) -> Result<[u8; 32], PossessionError> {
    proof(CONTEXT, private_key, server_public_key, challenge_id, hostname)
}

/// The control plane's check of an enrollment (constant time in the proof).
pub fn verify(
    server_secret: &StaticSecret,
    public_key: &[u8; 32],
    challenge_id: &str,
    hostname: &str,
    proof: &[u8],
) -> Result<(), PossessionError> {
    check(CONTEXT, server_secret, public_key, challenge_id, hostname, proof)
}

fn proof(
    context: &[u8],
    private_key: &[u8; 32],
    server_public_key: &[u8; 32],
    challenge_id: &str,
    subject: &str,
) -> Result<[u8; 32], PossessionError> {
    let secret = StaticSecret::from(*private_key);
    let public = PublicKey::from(&secret).to_bytes();
    let shared = secret.diffie_hellman(&PublicKey::from(*server_public_key));
    if !shared.was_contributory() {
        return Err(PossessionError::LowOrder);
    }
    Ok(mac(context, shared.as_bytes(), challenge_id, &public, subject).finalize().into_bytes().into())
}

fn check(
    context: &[u8],
    server_secret: &StaticSecret,
    public_key: &[u8; 32],
    challenge_id: &str,
    subject: &str,
    proof: &[u8],
) -> Result<(), PossessionError> {
    let shared = server_secret.diffie_hellman(&PublicKey::from(*public_key));
    if !shared.was_contributory() {
        return Err(PossessionError::LowOrder);
    }
    mac(context, shared.as_bytes(), challenge_id, public_key, subject)
        .verify_slice(proof)
        .map_err(|_| PossessionError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_private_key_holder_can_answer() {
        let server = StaticSecret::from([3u8; 32]);
        let server_pub = PublicKey::from(&server).to_bytes();
        let node = [7u8; 32];
        let node_pub = PublicKey::from(&StaticSecret::from(node)).to_bytes();
        let proof = prove(&node, &server_pub, "c1", "db1").unwrap();
        assert_eq!(verify(&server, &node_pub, "c1", "db1", &proof), Ok(()));
        // Bound to the challenge, the hostname and the key.
        assert_eq!(verify(&server, &node_pub, "c2", "db1", &proof), Err(PossessionError::Mismatch));
        assert_eq!(verify(&server, &node_pub, "c1", "db2", &proof), Err(PossessionError::Mismatch));
        // Someone else's key pair cannot answer for node_pub.
        let other = prove(&[9u8; 32], &server_pub, "c1", "db1").unwrap();
        assert_eq!(verify(&server, &node_pub, "c1", "db1", &other), Err(PossessionError::Mismatch));
        assert_eq!(verify(&server, &node_pub, "c1", "db1", &proof[..31]), Err(PossessionError::Mismatch));
        // A low-order public key gives an all-zero secret anyone could compute.
        assert_eq!(verify(&server, &[0u8; 32], "c1", "db1", &[0; 32]), Err(PossessionError::LowOrder));
    }

    #[test]
    fn a_rotation_proof_is_bound_to_the_node_and_is_no_enrollment_proof() {
        let server = StaticSecret::from([3u8; 32]);
        let challenge = crate::v1::EnrollChallengeReply {
            challenge_id: "c1".into(),
            server_public_key: PublicKey::from(&server).to_bytes().to_vec(),
            expires_in_secs: 30,
        };
        let new = [11u8; 32];
        let req = rotation(&new, "n1", &challenge).unwrap();
        let key: [u8; 32] = req.new_public_key.as_slice().try_into().unwrap();
        assert_eq!(key, public_key(&new));
        assert_eq!(verify_rotation(&server, &key, "c1", "n1", &req.proof), Ok(()));
        assert_eq!(verify_rotation(&server, &key, "c1", "n2", &req.proof), Err(PossessionError::Mismatch));
        assert_eq!(verify_rotation(&server, &key, "c2", "n1", &req.proof), Err(PossessionError::Mismatch));
        // The same fields as an enrollment do not verify: another context.
        assert_eq!(verify(&server, &key, "c1", "n1", &req.proof), Err(PossessionError::Mismatch));
    }
}
