//! Authenticated ingest: the bearer token, and per-workflow signature checks
//! over the raw body (`trigger.verify`), all compared in constant time.

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::workflow::model::{Verify, VerifyScheme};

/// Standard Webhooks: a timestamp further than this from now is refused.
pub const TOLERANCE_SECS: u64 = 5 * 60;

/// Whether `headers` carry `Authorization: Bearer <token>`.
pub fn bearer_ok(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    bool::from(given.trim().as_bytes().ct_eq(token.as_bytes()))
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| panic!("BUG: HMAC takes keys of any length"));
    for p in parts {
        mac.update(p);
    }
    mac
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("missing header `{name}`"))
}

/// Checks the signature `verify` asks for; `secret` is its rendered secret.
///
/// `now` is Unix seconds. The error says what was wrong, never the expected value.
pub fn check(
    verify: &Verify,
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    now: u64,
) -> Result<(), String> {
    match verify.scheme {
        VerifyScheme::Shopify => {
            let given = STANDARD
                .decode(header(headers, "x-shopify-hmac-sha256")?.trim())
                .map_err(|_| "`X-Shopify-Hmac-Sha256` is not base64".to_owned())?;
            mac(secret.as_bytes(), &[body])
                .verify_slice(&given)
                .map_err(|_| "the `X-Shopify-Hmac-Sha256` signature does not match".to_owned())
        }
        VerifyScheme::StandardWebhooks => {
            let id = header(headers, "webhook-id")?;
            let ts = header(headers, "webhook-timestamp")?;
            let sigs = header(headers, "webhook-signature")?;
            let ts_num: u64 = ts
                .trim()
                .parse()
                .map_err(|_| "`webhook-timestamp` is not Unix seconds".to_owned())?;
            if ts_num.abs_diff(now) > TOLERANCE_SECS {
                return Err("`webhook-timestamp` is more than 5 minutes from now".to_owned());
            }
            let key = crate::engine::sign::key(secret)?;
            let expected = mac(
                &key,
                &[id.as_bytes(), b".", ts.trim().as_bytes(), b".", body],
            )
            .finalize()
            .into_bytes();
            // Several space-separated `v1,<base64>` signatures may be given (key rotation).
            let ok = sigs
                .split_whitespace()
                .filter_map(|s| s.strip_prefix("v1,"))
                .filter_map(|b64| STANDARD.decode(b64).ok())
                .any(|given| bool::from(given.as_slice().ct_eq(expected.as_slice())));
            if ok {
                Ok(())
            } else {
                Err("no `webhook-signature` matches".to_owned())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn standard_webhooks_reference_vector_verifies() {
        let v = Verify {
            scheme: VerifyScheme::StandardWebhooks,
            secret: String::new(),
        };
        let body = br#"{"test": 2432232314}"#;
        let h = headers(&[
            ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
            ("webhook-timestamp", "1614265330"),
            (
                "webhook-signature",
                "v1,bm9ldHZhbGlk v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            ),
        ]);
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        assert_eq!(check(&v, secret, &h, body, 1_614_265_330), Ok(()));
        assert!(
            check(&v, secret, &h, body, 1_614_265_330 + 301).is_err(),
            "expired"
        );
        assert!(check(&v, secret, &h, b"tampered", 1_614_265_330).is_err());
    }

    #[test]
    fn bearer_needs_the_exact_token() {
        assert!(bearer_ok(
            &headers(&[("authorization", "Bearer s3cret")]),
            "s3cret"
        ));
        assert!(!bearer_ok(
            &headers(&[("authorization", "Bearer s3cre")]),
            "s3cret"
        ));
        assert!(!bearer_ok(&headers(&[]), "s3cret"));
    }
}
