//! Identity and group authorization (contract section 3): HS256 JWTs with `exp` and
//! `nbf` checked (with a leeway for clock skew), the user id from `sub`, group access from the `groups` patterns or the
//! admin role. The user-id provider and group authorizer are traits so an embedding
//! server can replace the rules.
//!
//! Azure SignalR Service's access keys (contract section 11) are checked here too:
//! [`AccessKeys`] verifies tokens signed with one of them for one audience, a URL.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use thiserror::Error;

/// The claims ringhub reads from a token; the others are kept in `other` (an upstream
/// is told them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Claims {
    /// The subject: the user id by default (see [`UserIdProvider`]); a token without
    /// one connects as no user. An access-key token's `nameid` (or `asrs.s.uid`) is
    /// put here, as Azure reads the user id from them.
    #[serde(default)]
    pub sub: Option<String>,
    /// Group patterns: exact names, or prefixes ending in `*`.
    #[serde(default)]
    pub groups: Vec<String>,
    /// `admin` may join every group and so send to any; other roles mean nothing to
    /// ringhub.
    #[serde(default)]
    pub role: Option<String>,
    /// Every other claim of the token (`exp`, `aud`, an app's own), as it was.
    #[serde(flatten, default)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// Whether the token carries `role: "admin"`.
    pub fn is_admin(&self) -> bool {
        self.role.as_deref() == Some("admin")
    }
}

/// Why a token was refused (each answers HTTP 401).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// No token (neither `Authorization: Bearer` nor `access_token` in the query), or
    /// an empty one.
    #[error("an access token is required")]
    MissingToken,
    /// A bad signature, another algorithm, an expired or not yet valid token, or claims
    /// of the wrong type; the text is `jsonwebtoken`'s.
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

    /// The claims of a valid token; the token as the request carried it, `None` when
    /// it carried none.
    pub fn verify(&self, token: Option<&str>) -> Result<Claims, AuthError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))
    }
}

/// The claims that carry the user id in tokens made for Azure SignalR Service, in the
/// order it reads them: the Management SDK's system claim, then the name identifier
/// (`nameid` as .NET's token handler writes it, or its full claim type).
const AZURE_USER_ID_CLAIMS: [&str; 3] = [
    "asrs.s.uid",
    "nameid",
    "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier",
];

/// Which URL an access-key token must be made for (its `aud`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience<'a> {
    /// A REST call: the request's URL without its query (`path` as the request has it).
    Rest {
        /// The request's path, as the request has it.
        path: &'a str,
    },
    /// A client connection: the client endpoint of a hub, `<scheme>://<host>/client/?hub=<hub>`.
    Client {
        /// The `hub` of the client's URL (matched case-insensitively, as Azure names
        /// hubs).
        hub: &'a str,
    },
}

/// Azure SignalR Service access keys (`--access-key`; two during a rotation): tokens
/// are HS256 with a key's UTF-8 bytes, `exp` (and `nbf`) checked with the leeway, and
/// made for one URL (`aud`). The keys themselves stay here for whoever signs with them
/// (`:generateToken`, upstream signatures).
#[derive(Clone)]
pub struct AccessKeys {
    keys: Vec<(String, DecodingKey)>,
    validation: Validation,
}

impl std::fmt::Debug for AccessKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessKeys({} keys)", self.keys.len())
    }
}

impl AccessKeys {
    /// `None` without keys.
    pub fn new(keys: &[String], leeway: std::time::Duration) -> Option<AccessKeys> {
        if keys.is_empty() {
            return None;
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway.as_secs();
        validation.validate_nbf = true;
        // Checked below: Azure's audience is a URL, compared by its parts.
        validation.validate_aud = false;
        Some(AccessKeys {
            keys: keys
                .iter()
                .map(|key| (key.clone(), DecodingKey::from_secret(key.as_bytes())))
                .collect(),
            validation,
        })
    }

    /// The keys, the first one the primary (tokens ringhub makes are signed with it).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(key, _)| key.as_str())
    }

    /// Verifies a token with any of the keys, made for `audience` as reached through
    /// one of `hosts` (the request's `Host`, and `X-Forwarded-Host` behind a proxy).
    /// The user id of Azure's claims (`asrs.s.uid`, `nameid`) becomes `sub`.
    pub fn verify(
        &self,
        token: Option<&str>,
        audience: Audience<'_>,
        hosts: &[&str],
    ) -> Result<Claims, AuthError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MissingToken)?;
        let mut last_error = None;
        for (_, key) in &self.keys {
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation) {
                Ok(data) => {
                    let mut claims = data.claims;
                    if !audiences(&claims).any(|aud| audience_matches(aud, audience, hosts)) {
                        return Err(AuthError::InvalidToken(format!(
                            "the token's audience (aud) is not this URL ({})",
                            match audience {
                                Audience::Rest { path } => path.to_owned(),
                                Audience::Client { hub } => format!("/client/?hub={hub}"),
                            }
                        )));
                    }
                    let azure_user = AZURE_USER_ID_CLAIMS
                        .iter()
                        .find_map(|name| claims.other.get(*name)?.as_str());
                    if let Some(user) = azure_user {
                        claims.sub = Some(user.to_owned());
                    }
                    return Ok(claims);
                }
                // Another key (a rotation) may have signed it.
                Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    last_error = Some(e)
                }
                Err(e) => return Err(AuthError::InvalidToken(e.to_string())),
            }
        }
        Err(AuthError::InvalidToken(
            last_error.map_or_else(String::new, |e| e.to_string()),
        ))
    }

    /// A token signed with the primary key: `claims` as given (`aud`, `exp` included).
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let (key, _) = &self.keys[0];
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        // HMAC signing of a JSON value cannot fail.
        .unwrap_or_default()
    }
}

/// The token's `aud`: one string, or a list of them.
fn audiences(claims: &Claims) -> impl Iterator<Item = &str> {
    let aud = claims.other.get("aud");
    let one = aud.and_then(|a| a.as_str());
    let many = aud
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str());
    one.into_iter().chain(many)
}

/// Whether `aud`, a URL, names what the request reached. Its host must be the one the
/// client used (the `Host` header, or `X-Forwarded-Host` behind a proxy); its scheme
/// may be either (a proxy may end TLS), and its path may carry a prefix that a proxy
/// strips (`https://example.com/signalr/api/v1/hubs/chat` for `/api/v1/hubs/chat`).
/// Paths are compared percent-decoded, without a trailing `/`, ignoring ASCII case (hub
/// names are case-insensitive there).
pub fn audience_matches(aud: &str, audience: Audience<'_>, hosts: &[&str]) -> bool {
    let Some((scheme, rest)) = aud.split_once("://") else {
        return false;
    };
    if !matches!(
        scheme.to_ascii_lowercase().as_str(),
        "http" | "https" | "ws" | "wss"
    ) {
        return false;
    }
    let (authority, path_and_query) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    // Host names only: Azure's SDKs sign `aud` without the port (its service listens on
    // the scheme's), and some clients (signalrcore) send `Host` without it too; the key's
    // signature is what authenticates, the audience only keeps a token to its service.
    let host_name = |authority: &str| -> String {
        let authority = authority.trim().to_ascii_lowercase();
        match authority.rsplit_once(':') {
            // Not the colon of a bracketed IPv6 address.
            Some((name, port)) if !port.contains(']') => name.to_owned(),
            _ => authority,
        }
    };
    let authority = host_name(authority);
    if !hosts.iter().any(|host| host_name(host) == authority) {
        return false;
    }
    let decoded = |path: &str| -> String {
        percent_encoding::percent_decode_str(path)
            .decode_utf8_lossy()
            .trim_end_matches('/')
            .to_ascii_lowercase()
    };
    let aud_path = decoded(path);
    // `expected` starts with `/`: a suffix match ends at a segment boundary.
    let ends_with = |expected: &str| expected.starts_with('/') && aud_path.ends_with(expected);
    match audience {
        Audience::Rest { path } => ends_with(&decoded(path)),
        Audience::Client { hub } => {
            ends_with("/client")
                && form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                    .any(|(name, value)| name == "hub" && value.eq_ignore_ascii_case(hub))
        }
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

    fn keys(list: &[&str]) -> AccessKeys {
        let list: Vec<String> = list.iter().map(|k| k.to_string()).collect();
        AccessKeys::new(&list, std::time::Duration::from_secs(30)).unwrap()
    }

    const BROADCAST: Audience<'static> = Audience::Rest {
        path: "/api/hubs/chat/:send",
    };

    #[test]
    fn access_keys_check_signature_audience_and_expiry() {
        let k = keys(&["key-one"]);
        let host = ["ringhub.test:5000"];
        let aud = "http://ringhub.test:5000/api/hubs/chat/:send";
        let good = token(
            Algorithm::HS256,
            b"key-one",
            json!({"aud": aud, "exp": in_an_hour()}),
        );
        assert!(k.verify(Some(&good), BROADCAST, &host).is_ok());
        // Another operation, another host, another key, expired, missing: refused.
        let other_path = Audience::Rest {
            path: "/api/hubs/chat/users/ann/:send",
        };
        assert!(k.verify(Some(&good), other_path, &host).is_err());
        assert!(k
            .verify(Some(&good), BROADCAST, &["evil.test:5000"])
            .is_err());
        let wrong_key = token(
            Algorithm::HS256,
            b"key-two",
            json!({"aud": aud, "exp": in_an_hour()}),
        );
        assert!(k.verify(Some(&wrong_key), BROADCAST, &host).is_err());
        let now = jsonwebtoken::get_current_timestamp();
        let expired = token(
            Algorithm::HS256,
            b"key-one",
            json!({"aud": aud, "exp": now - 60}),
        );
        let refused = k.verify(Some(&expired), BROADCAST, &host);
        assert!(
            matches!(&refused, Err(AuthError::InvalidToken(e)) if e.contains("Expired")),
            "{refused:?}"
        );
        let within_leeway = token(
            Algorithm::HS256,
            b"key-one",
            json!({"aud": aud, "exp": now - 10}),
        );
        assert!(k.verify(Some(&within_leeway), BROADCAST, &host).is_ok());
        let no_aud = token(Algorithm::HS256, b"key-one", json!({"exp": in_an_hour()}));
        assert!(k.verify(Some(&no_aud), BROADCAST, &host).is_err());
        assert_eq!(
            k.verify(None, BROADCAST, &host),
            Err(AuthError::MissingToken)
        );
    }

    #[test]
    fn a_rotation_accepts_either_key_and_signs_with_the_first() {
        let k = keys(&["new-key", "old-key"]);
        let aud = "https://ringhub.test/api/hubs/chat/:send";
        for key in [&b"new-key"[..], b"old-key"] {
            let t = token(
                Algorithm::HS256,
                key,
                json!({"aud": aud, "exp": in_an_hour()}),
            );
            assert!(k.verify(Some(&t), BROADCAST, &["ringhub.test"]).is_ok());
        }
        let made = k.sign(&json!({"aud": aud, "exp": in_an_hour()}));
        let only_new = keys(&["new-key"]);
        assert!(only_new
            .verify(Some(&made), BROADCAST, &["ringhub.test"])
            .is_ok());
        assert_eq!(k.keys().collect::<Vec<_>>(), ["new-key", "old-key"]);
    }

    #[test]
    fn audiences_compare_by_host_and_path_as_a_proxy_may_change_them() {
        let rest = |path| Audience::Rest { path };
        // Default ports, scheme changed by a TLS-ending proxy, trailing slash, escapes, case.
        assert!(audience_matches(
            "https://Ringhub.test:443/api/v1/hubs/chat/",
            rest("/api/v1/hubs/chat"),
            &["ringhub.test"]
        ));
        assert!(audience_matches(
            "http://ringhub.test/api/hubs/chat/groups/ward%3A4b/:send",
            rest("/api/hubs/chat/groups/ward:4b/:send"),
            &["ringhub.test:80"]
        ));
        assert!(audience_matches(
            "http://ringhub.test/api/hubs/chat/:send",
            rest("/api/hubs/Chat/:send"),
            &["ringhub.test"]
        ));
        // A prefix the proxy strips, at a segment boundary only.
        assert!(audience_matches(
            "https://example.com/signalr/api/v1/hubs/chat",
            rest("/api/v1/hubs/chat"),
            &["internal:5000", "example.com"]
        ));
        assert!(!audience_matches(
            "https://example.com/x/api/v1/hubs/xchat",
            rest("/api/v1/hubs/chat"),
            &["example.com"]
        ));
        // Ports do not count: Azure's SDKs sign without one, signalrcore sends none.
        assert!(audience_matches(
            "http://ringhub.test/api/v1/hubs/chat",
            rest("/api/v1/hubs/chat"),
            &["ringhub.test:8080"]
        ));
        assert!(audience_matches(
            "http://[::1]:8080/api/v1/hubs/chat",
            rest("/api/v1/hubs/chat"),
            &["[::1]"]
        ));
        assert!(!audience_matches(
            "http://other.test:8080/api/v1/hubs/chat",
            rest("/api/v1/hubs/chat"),
            &["ringhub.test:8080"]
        ));
        assert!(!audience_matches(
            "ftp://ringhub.test/api/v1/hubs/chat",
            rest("/api/v1/hubs/chat"),
            &["ringhub.test"]
        ));
        assert!(!audience_matches(
            "not a url",
            rest("/api/v1/hubs/chat"),
            &["ringhub.test"]
        ));
        let client = |hub| Audience::Client { hub };
        assert!(audience_matches(
            "http://ringhub.test/client/?hub=chat",
            client("chat"),
            &["ringhub.test"]
        ));
        assert!(audience_matches(
            "http://ringhub.test/client/?hub=Chat&asrs.op=%2Fchat",
            client("chat"),
            &["ringhub.test"]
        ));
        assert!(!audience_matches(
            "http://ringhub.test/client/?hub=other",
            client("chat"),
            &["ringhub.test"]
        ));
        assert!(!audience_matches(
            "http://ringhub.test/api/v1/hubs/chat",
            client("chat"),
            &["ringhub.test"]
        ));
    }

    #[test]
    fn azure_user_id_claims_become_sub_and_other_claims_are_kept() {
        let k = keys(&["key"]);
        let aud = "http://h/client/?hub=chat";
        let verify = |claims: serde_json::Value| {
            let t = token(Algorithm::HS256, b"key", claims);
            k.verify(Some(&t), Audience::Client { hub: "chat" }, &["h"])
                .unwrap()
        };
        let sdk = verify(
            json!({"aud": aud, "exp": in_an_hour(), "asrs.s.uid": "ann", "nameid": "x", "sub": "y"}),
        );
        assert_eq!(sdk.sub.as_deref(), Some("ann"));
        let documented =
            verify(json!({"aud": aud, "exp": in_an_hour(), "nameid": "bob", "tenant": "t1"}));
        assert_eq!(documented.sub.as_deref(), Some("bob"));
        assert_eq!(documented.other["tenant"], "t1");
        let plain = verify(json!({"aud": aud, "exp": in_an_hour(), "sub": "cy"}));
        assert_eq!(plain.sub.as_deref(), Some("cy"));
        let anonymous = verify(json!({"aud": aud, "exp": in_an_hour()}));
        assert_eq!(anonymous.sub, None);
    }
}
