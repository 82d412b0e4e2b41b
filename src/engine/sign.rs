//! Standard Webhooks signing of outgoing requests
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The three headers that carry a signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// `webhook-id`: the delivery id.
    pub id: String,
    /// `webhook-timestamp`: Unix seconds.
    pub timestamp: u64,
    /// `webhook-signature`: `v1,<base64>`.
    pub signature: String,
}

/// The signing key: after a `whsec_` prefix the rest is base64, otherwise the raw bytes.
pub fn key(secret: &str) -> Result<Vec<u8>, String> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("the `whsec_` signing secret is not valid base64: {e}")),
        None => Ok(secret.as_bytes().to_vec()),
    }
}

/// Signs `"{id}.{timestamp}.{body}"` with HMAC-SHA256.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Signature {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| panic!("BUG: HMAC takes keys of any length"));
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    Signature {
        id: id.to_owned(),
        timestamp,
        signature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from the Standard Webhooks specification.
    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        let key = key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("base64");
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.signature,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
