//! Identity and group authorization (contract section 3): HS256 JWTs with `exp` and
//! `nbf` checked (with a leeway for clock skew), the user id from `sub`, group access from the `groups` patterns or the
//! admin role. The user-id provider and group authorizer are traits so an embedding
//! server can replace the rules.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thiserror::Error;

/// The claims ringhub reads from a token; others are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub sub: Option<String>,
    /// Group patterns: exact names, or prefixes ending in `*`.
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub role: Option<String>,
}

impl Claims {
    pub fn is_admin(&self) -> bool {
        self.role.as_deref() == Some("admin")
    }
}

/// Why a token was refused (each answers HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("an access token is required")]
    MissingToken,
    #[error("invalid access token: {0}")]
    InvalidToken(String),
}

/// Verifies HS256 tokens; every other algorithm, `none` included, is refused.
#[derive(Clone)]
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtVerifier(HS256)")
    }
}

impl JwtVerifier {
    /// Tokens signed with `secret`; `exp` and `nbf` may be off by `leeway` (clock skew
    /// between the token's issuer and this node).
    pub fn hs256(secret: &[u8], leeway: std::time::Duration) -> JwtVerifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = false;
        JwtVerifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn verify(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))
    }
}

/// Where a connection's user id comes from (ASP.NET's `IUserIdProvider`).
pub trait UserIdProvider: Send + Sync + 'static {
    /// `None`: the connection belongs to no user and user targeting skips it.
    fn user_id(&self, claims: Option<&Claims>) -> Option<String>;
}

/// The default: the `sub` claim.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubClaimUserId;

impl UserIdProvider for SubClaimUserId {
    fn user_id(&self, claims: Option<&Claims>) -> Option<String> {
        claims.and_then(|c| c.sub.clone())
    }
}

/// Decides whether a connection may join (and so send to) a group.
pub trait GroupAuthorizer: Send + Sync + 'static {
    /// `claims` is `None` when the server runs without authentication.
    fn may_join(&self, claims: Option<&Claims>, group: &str) -> bool;
}

/// The contract's rules: anonymous servers allow every group; otherwise the admin role
/// or a matching `groups` pattern is needed.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClaimPatterns;

impl GroupAuthorizer for ClaimPatterns {
    fn may_join(&self, claims: Option<&Claims>, group: &str) -> bool {
        match claims {
            None => true,
            Some(c) => c.is_admin() || c.groups.iter().any(|p| pattern_matches(p, group)),
        }
    }
}

/// `alert:*` matches every name starting with `alert:` (the empty rest included); any
/// other pattern matches only itself. Case-sensitive.
pub fn pattern_matches(pattern: &str, group: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => group.starts_with(prefix),
        None => pattern == group,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn token(alg: Algorithm, secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn in_an_hour() -> u64 {
        jsonwebtoken::get_current_timestamp() + 3600
    }

    #[test]
    fn accepts_good_tokens_and_refuses_the_rest() {
        let v = JwtVerifier::hs256(b"secret", std::time::Duration::ZERO);
        let good = token(
            Algorithm::HS256,
            b"secret",
            json!({"sub": "ann", "exp": in_an_hour(), "groups": ["a"]}),
        );
        assert_eq!(v.verify(Some(&good)).unwrap().sub.as_deref(), Some("ann"));
        let bad_sig = token(
            Algorithm::HS256,
            b"other",
            json!({"sub": "ann", "exp": in_an_hour()}),
        );
        assert!(v.verify(Some(&bad_sig)).is_err());
        let expired = token(
            Algorithm::HS256,
            b"secret",
            json!({"sub": "ann", "exp": 1_000}),
        );
        assert!(v.verify(Some(&expired)).is_err());
        let no_exp = token(Algorithm::HS256, b"secret", json!({"sub": "ann"}));
        assert!(v.verify(Some(&no_exp)).is_err());
        let hs384 = token(
            Algorithm::HS384,
            b"secret",
            json!({"sub": "ann", "exp": in_an_hour()}),
        );
        assert!(v.verify(Some(&hs384)).is_err());
        // alg "none": header {"alg":"none"}, no signature.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                json!({"sub": "ann", "exp": in_an_hour()}).to_string()
            )
        );
        assert!(v.verify(Some(&none)).is_err());
        assert_eq!(v.verify(None), Err(AuthError::MissingToken));
    }

    #[test]
    fn exp_and_nbf_are_checked_with_the_leeway_on_both_edges() {
        let v = JwtVerifier::hs256(b"secret", std::time::Duration::from_secs(30));
        let now = jsonwebtoken::get_current_timestamp();
        let with =
            |claims: serde_json::Value| v.verify(Some(&token(Algorithm::HS256, b"secret", claims)));
        let later = now + 3600;
        assert!(
            with(json!({"exp": later, "nbf": now + 20})).is_ok(),
            "within the leeway"
        );
        let early = with(json!({"exp": later, "nbf": now + 40}));
        assert!(
            matches!(&early, Err(AuthError::InvalidToken(e)) if e.contains("ImmatureSignature")),
            "valid only in 40 s: {early:?}"
        );
        assert!(
            with(json!({"exp": later, "nbf": now + 3600})).is_err(),
            "valid in an hour"
        );
        assert!(
            with(json!({"exp": now - 20})).is_ok(),
            "expired within the leeway"
        );
        assert!(
            with(json!({"exp": now - 40})).is_err(),
            "expired past the leeway"
        );
    }

    #[test]
    fn patterns_follow_the_contract() {
        assert!(pattern_matches("alert:*", "alert:"));
        assert!(pattern_matches("alert:*", "alert:fire"));
        assert!(!pattern_matches("alert:*", "Alert:fire"));
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("ward:4b", "ward:4b"));
        assert!(!pattern_matches("ward:4b", "ward:4b2"));
        let user = Claims {
            groups: vec!["ward:*".into()],
            ..Claims::default()
        };
        assert!(ClaimPatterns.may_join(Some(&user), "ward:1"));
        assert!(!ClaimPatterns.may_join(Some(&user), "alert:1"));
        let admin = Claims {
            role: Some("admin".into()),
            ..Claims::default()
        };
        assert!(ClaimPatterns.may_join(Some(&admin), "alert:1"));
        assert!(ClaimPatterns.may_join(None, "alert:1"));
    }
}
