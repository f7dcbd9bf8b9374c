//! Key and channel names of the transport, all under the namespace, and the translation
//! of topic patterns into Redis glob patterns.
//!
//! | what | name |
//! |---|---|
//! | inbox stream of one machine | `{ns}:in:{machine id}` |
//! | members of a consumer group (hash: member → expiry, ms of server time) | `{ns}:g:{group}:members` |
//! | round-robin counter of a consumer group | `{ns}:g:{group}:next` |
//! | stream of one member of a consumer group | `{ns}:g:{group}:m:{member}` |
//! | channel of one topic | `{ns}:t:{topic}` |
//! | Redis consumer group on every stream | [`GROUP`] |

use switchyard_core::{Error, Result, TopicPattern};

/// The Redis consumer group every stream of the transport is read through.
pub const GROUP: &str = "switchyard";

/// Field of a stream entry that holds the envelope.
pub const FIELD: &str = "e";

/// The names of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    ns: String,
    topic_prefix: String,
}

impl Names {
    pub(crate) fn new(ns: &str) -> Result<Names> {
        if ns.is_empty() || ns.len() > 200 || ns.chars().any(|c| c.is_whitespace()) {
            return Err(Error::Config(format!(
                "Redis namespace `{ns}` must be 1 to 200 bytes long without whitespace"
            )));
        }
        Ok(Names {
            ns: ns.to_string(),
            topic_prefix: format!("{ns}:t:"),
        })
    }

    /// The inbox stream of a machine.
    pub(crate) fn inbox(&self, id: &str) -> String {
        format!("{}:in:{id}", self.ns)
    }

    /// The member hash of a consumer group.
    pub(crate) fn group_members(&self, group: &str) -> String {
        format!("{}:g:{group}:members", self.ns)
    }

    /// The round-robin counter of a consumer group.
    pub(crate) fn group_counter(&self, group: &str) -> String {
        format!("{}:g:{group}:next", self.ns)
    }

    /// The prefix of the member streams of a consumer group (the member name follows).
    pub(crate) fn member_prefix(&self, group: &str) -> String {
        format!("{}:g:{group}:m:", self.ns)
    }

    /// The stream of one member of a consumer group.
    pub(crate) fn member_stream(&self, group: &str, member: &str) -> String {
        format!("{}{member}", self.member_prefix(group))
    }

    /// The channel a topic is published on.
    pub(crate) fn channel(&self, topic: &str) -> String {
        format!("{}{topic}", self.topic_prefix)
    }

    /// The topic of a channel of this namespace.
    pub(crate) fn topic_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        let rest = channel.strip_prefix(self.topic_prefix.as_bytes())?;
        std::str::from_utf8(rest).ok()
    }

    /// The PSUBSCRIBE pattern of a topic pattern (see [`glob`]).
    pub(crate) fn channel_pattern(&self, pattern: &TopicPattern) -> String {
        let mut out = escape(&self.topic_prefix);
        out.push_str(&glob(pattern));
        out
    }
}

/// Escapes the Redis glob characters `* ? [ ] \` of a literal.
pub fn escape(literal: &str) -> String {
    let mut out = String::with_capacity(literal.len());
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Translates a topic pattern into a Redis glob that matches every topic the pattern
/// matches (and possibly more).
///
/// A Redis glob cannot say "one segment" (`*` crosses dots) nor "zero or more segments"
/// (there is no alternation), so the glob is the tightest superset: a literal segment
/// stays (escaped), `*` becomes `*`, and `#` becomes `*` with the dot beside it folded in
/// (`a.#` → `a*`, `#.b` → `*b`, `a.#.b` → `a*b`), since `#` may match no segment at all.
/// The subscriber then checks every message against the exact pattern, so what reaches a
/// machine is exactly what the pattern matches.
pub fn glob(pattern: &TopicPattern) -> String {
    let mut out = String::new();
    // Whether the last thing written is the `*` of a `#`: the next dot folds into it.
    let mut after_many = false;
    for (i, seg) in pattern.as_str().split('.').enumerate() {
        if seg == "#" {
            if !out.ends_with('*') {
                out.push('*');
            }
            after_many = true;
            continue;
        }
        if i > 0 && !after_many {
            out.push('.');
        }
        after_many = false;
        if seg == "*" {
            out.push('*');
        } else {
            out.push_str(&escape(seg));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> String {
        glob(&TopicPattern::parse(p).unwrap())
    }

    #[test]
    fn patterns_become_globs() {
        assert_eq!(g("a.b"), "a.b");
        assert_eq!(g("a.*"), "a.*");
        assert_eq!(g("*.b"), "*.b");
        assert_eq!(g("#"), "*");
        assert_eq!(g("a.#"), "a*");
        assert_eq!(g("#.b"), "*b");
        assert_eq!(g("a.#.b"), "a*b");
        assert_eq!(g("a.#.#"), "a*");
        assert_eq!(g("*.#"), "*");
        assert_eq!(g("a.*.#.c"), "a.*c");
    }

    #[test]
    fn glob_characters_in_literals_are_escaped() {
        assert_eq!(g("a?.[x].b\\c.*"), "a\\?.\\[x\\].b\\\\c.*");
        let n = Names::new("ns*1").unwrap();
        assert_eq!(
            n.channel_pattern(&TopicPattern::parse("x.#").unwrap()),
            "ns\\*1:t:x*"
        );
        assert_eq!(n.channel("x.y"), "ns*1:t:x.y");
        assert_eq!(n.topic_of(b"ns*1:t:x.y"), Some("x.y"));
        assert_eq!(n.topic_of(b"other:t:x.y"), None);
    }

    #[test]
    fn bad_namespaces_are_refused() {
        assert!(Names::new("").is_err());
        assert!(Names::new("a b").is_err());
        assert!(Names::new("ok-1").is_ok());
    }
}
