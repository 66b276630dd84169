//! Which upstream an event goes to, as Azure SignalR Service decides it: the rules are
//! tried in order and the first whose hub, category and event patterns all match
//! takes it. A pattern is `*` (anything), a name, or names separated by commas;
//! names match exactly (case-sensitive), as in Azure's emulator.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// The two categories of events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// `connected` and `disconnected`.
    Connections,
    /// A client's invocation; the event is its target.
    Messages,
}

impl Category {
    /// As `{category}` and `X-ASRS-Category` say it.
    pub fn name(self) -> &'static str {
        match self {
            Category::Connections => "connections",
            Category::Messages => "messages",
        }
    }
}

/// One upstream setting: where matching events are POSTed (`{hub}`, `{category}` and
/// `{event}` in the template are replaced by the event's, percent-encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRule {
    /// Where events go: `https://backend/api/{hub}/{category}/{event}`.
    pub url_template: String,
    /// The hubs it takes (`*`, a name, names separated by commas).
    pub hub_pattern: String,
    /// The categories it takes: `connections`, `messages`, or `*`.
    pub category_pattern: String,
    /// The events it takes: `connected`, `disconnected`, invocation targets, or `*`.
    pub event_pattern: String,
}

impl UpstreamRule {
    /// A rule that takes every event.
    pub fn any(url_template: impl Into<String>) -> UpstreamRule {
        UpstreamRule {
            url_template: url_template.into(),
            hub_pattern: "*".into(),
            category_pattern: "*".into(),
            event_pattern: "*".into(),
        }
    }

    /// Whether this rule takes an event (the first rule that does, takes it).
    pub fn matches(&self, hub: &str, category: Category, event: &str) -> bool {
        pattern_matches(&self.hub_pattern, hub)
            && pattern_matches(&self.category_pattern, category.name())
            && pattern_matches(&self.event_pattern, event)
    }

    /// The URL of an event of this rule.
    pub fn url(&self, hub: &str, category: Category, event: &str) -> String {
        expand(&self.url_template, hub, category.name(), event)
    }

    /// Why the template cannot make URLs (`None`: it can): it must be an absolute
    /// http(s) URL once its parameters are replaced.
    pub fn problem(&self) -> Option<String> {
        let sample = self.url("hub", Category::Messages, "event");
        let scheme_ok = sample.starts_with("http://") || sample.starts_with("https://");
        match sample.parse::<hyper::Uri>() {
            Ok(uri) if scheme_ok && uri.host().is_some_and(|h| !h.is_empty()) => None,
            _ => Some(format!(
                "'{}' is not an absolute http:// or https:// URL template",
                self.url_template
            )),
        }
    }
}

/// The first rule that takes this event, and its URL.
pub fn route(
    rules: &[UpstreamRule],
    hub: &str,
    category: Category,
    event: &str,
) -> Option<(usize, String)> {
    let index = rules
        .iter()
        .position(|rule| rule.matches(hub, category, event))?;
    Some((index, rules[index].url(hub, category, event)))
}

/// `*` anywhere in the list matches anything; else one of the comma-separated names
/// (trimmed) must be `value`.
pub fn pattern_matches(pattern: &str, value: &str) -> bool {
    pattern
        .split(',')
        .map(str::trim)
        .any(|name| name == "*" || name == value)
}

/// What `Uri.EscapeDataString` leaves as is: the unreserved characters of RFC 3986.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The template with its parameters replaced (unknown `{...}` are left as they are).
pub fn expand(template: &str, hub: &str, category: &str, event: &str) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let value = [("{hub}", hub), ("{category}", category), ("{event}", event)]
            .into_iter()
            .find(|(name, _)| tail.starts_with(name));
        match value {
            Some((name, value)) => {
                out.extend(utf8_percent_encode(value, ESCAPED));
                rest = &tail[name.len()..];
            }
            None => {
                out.push('{');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `X-ASRS-Signature`: `sha256=<HEX>` of the connection id under each access key
/// (HMAC-SHA256 keyed with the key's UTF-8 bytes, upper-case hex as Azure writes it),
/// comma-separated; `None` without keys.
pub fn signature(keys: &[String], connection_id: &str) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    let signatures: Vec<String> = keys
        .iter()
        .map(|key| {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
            let tag = ring::hmac::sign(&key, connection_id.as_bytes());
            let hex: String = tag.as_ref().iter().map(|b| format!("{b:02X}")).collect();
            format!("sha256={hex}")
        })
        .collect();
    Some(signatures.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(url: &str, hubs: &str, categories: &str, events: &str) -> UpstreamRule {
        UpstreamRule {
            url_template: url.into(),
            hub_pattern: hubs.into(),
            category_pattern: categories.into(),
            event_pattern: events.into(),
        }
    }

    #[test]
    fn templates_take_hub_category_and_event_percent_encoded() {
        assert_eq!(
            expand(
                "http://host.com/{hub}/api/{category}/{event}",
                "chat",
                "connections",
                "connected"
            ),
            "http://host.com/chat/api/connections/connected"
        );
        assert_eq!(
            expand("https://h/x?e={event}&h={hub}", "c", "messages", "a b/c?é"),
            "https://h/x?e=a%20b%2Fc%3F%C3%A9&h=c"
        );
        assert_eq!(
            expand("http://h/{other}/{hub", "c", "m", "e"),
            "http://h/{other}/{hub"
        );
        assert!(UpstreamRule::any("http://h:1/{event}").problem().is_none());
        assert!(UpstreamRule::any("ftp://h/{event}").problem().is_some());
        assert!(UpstreamRule::any("/relative/{event}").problem().is_some());
        assert!(UpstreamRule::any("http:///{event}").problem().is_some());
    }

    #[test]
    fn patterns_are_star_a_name_or_a_comma_list() {
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("connected, disconnected", "disconnected"));
        assert!(pattern_matches("a,*", "z"));
        assert!(pattern_matches("broadcast", "broadcast"));
        assert!(!pattern_matches("broadcast", "Broadcast"), "case-sensitive");
        assert!(!pattern_matches("connected, disconnected", "connect"));
        assert!(!pattern_matches("", "x"));
    }

    #[test]
    fn the_first_matching_rule_takes_the_event() {
        let rules = [
            rule("http://a/{event}", "chat", "messages", "broadcast,echo"),
            rule("http://b/{category}", "*", "connections", "*"),
            rule("http://c/{hub}/{event}", "*", "*", "*"),
        ];
        let to = |hub, category, event| route(&rules, hub, category, event);
        assert_eq!(
            to("chat", Category::Messages, "echo"),
            Some((0, "http://a/echo".into()))
        );
        assert_eq!(
            to("chat", Category::Connections, "connected"),
            Some((1, "http://b/connections".into()))
        );
        assert_eq!(
            to("other", Category::Messages, "echo"),
            Some((2, "http://c/other/echo".into()))
        );
        assert_eq!(
            route(&rules[..2], "other", Category::Messages, "echo"),
            None
        );
    }

    #[test]
    fn signatures_are_the_hmac_of_the_connection_id_under_each_key() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), the
        // well-known test vector.
        let fox = "The quick brown fox jumps over the lazy dog";
        let expected = "sha256=F7BC83F430538424B13298E6AA6FB143EF4D59A14946175997479DBC2D1A3CD8";
        assert_eq!(signature(&["key".into()], fox).as_deref(), Some(expected));
        let both = signature(&["key".into(), "other".into()], fox).unwrap();
        let (first, second) = both.split_once(',').unwrap();
        assert_eq!(first, expected);
        assert!(second.starts_with("sha256=") && second.len() == 71 && second != first);
        assert_eq!(signature(&[], fox), None);
    }
}
