//! Topic names and subscription patterns: dot-separated segments, `*` matches one segment, `#` zero or more.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Checks that a topic is publishable: non-empty segments, no wildcards.
pub fn validate_topic(topic: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidPattern {
            pattern: topic.to_string(),
            reason,
        })
    };
    if topic.is_empty() {
        return bad("a topic must not be empty");
    }
    for seg in topic.split('.') {
        if seg.is_empty() {
            return bad("a topic must not have empty segments (`a..b`, leading or trailing `.`)");
        }
        if seg.contains('*') || seg.contains('#') {
            return bad("wildcards `*` and `#` are for subscriptions, not for published topics");
        }
    }
    Ok(())
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    One,
    Many,
}

/// A parsed subscription pattern such as `orders.*.created` or `state.#`.
#[derive(Clone, PartialEq, Eq)]
pub struct TopicPattern {
    text: Arc<str>,
    segments: Box<[Segment]>,
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TopicPattern({})", self.text)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TopicPattern {
    /// Parses a pattern; wildcards must be whole segments and segments must not be empty.
    pub fn parse(pattern: &str) -> Result<TopicPattern> {
        let bad = |reason| {
            Err(Error::InvalidPattern {
                pattern: pattern.to_string(),
                reason,
            })
        };
        if pattern.is_empty() {
            return bad("a pattern must not be empty (use `#` for every topic)");
        }
        let mut segments = Vec::new();
        for seg in pattern.split('.') {
            segments.push(match seg {
                "" => {
                    return bad(
                        "a pattern must not have empty segments (`a..b`, leading or trailing `.`)",
                    );
                }
                "*" => Segment::One,
                "#" => Segment::Many,
                s if s.contains('*') || s.contains('#') => {
                    return bad(
                        "`*` and `#` must stand alone as a whole segment (`a.*`, not `a*`)",
                    );
                }
                s => Segment::Literal(s.into()),
            });
        }
        Ok(TopicPattern {
            text: pattern.into(),
            segments: segments.into_boxed_slice(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic` matches this pattern.
    pub fn matches(&self, topic: &str) -> bool {
        let parts: Vec<&str> = topic.split('.').collect();
        match_segments(&self.segments, &parts)
    }

    /// Whether a topic already split at its dots matches; saves the split when testing many patterns.
    pub fn matches_segments(&self, topic: &[&str]) -> bool {
        match_segments(&self.segments, topic)
    }
}

fn match_segments(pat: &[Segment], topic: &[&str]) -> bool {
    match pat.split_first() {
        None => topic.is_empty(),
        Some((Segment::Many, rest)) => {
            (0..=topic.len()).any(|skip| match_segments(rest, &topic[skip..]))
        }
        Some((seg, rest)) => match topic.split_first() {
            None => false,
            Some((head, tail)) => {
                let ok = match seg {
                    Segment::One => true,
                    Segment::Literal(l) => **l == **head,
                    Segment::Many => unreachable!("handled above"),
                };
                ok && match_segments(rest, tail)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        TopicPattern::parse(p).unwrap().matches(t)
    }

    #[test]
    fn wildcards() {
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.c"));
        assert!(m("a.*", "a.b"));
        assert!(!m("a.*", "a.b.c"));
        assert!(!m("a.*", "a"));
        assert!(m("a.#", "a"));
        assert!(m("a.#", "a.b.c"));
        assert!(m("#", "x.y"));
        assert!(m("a.#.z", "a.z"));
        assert!(m("a.#.z", "a.b.c.z"));
        assert!(!m("a.#.z", "a.b.c"));
        assert!(m("*.b.#", "x.b"));
        assert!(!m("*.b.#", "b"));
    }

    #[test]
    fn invalid_patterns_are_errors() {
        for p in ["", "a..b", ".a", "a.", "a*", "a.b#"] {
            assert!(
                matches!(TopicPattern::parse(p), Err(Error::InvalidPattern { .. })),
                "{p}"
            );
        }
        for t in ["", "a..b", "a.*", "a.#"] {
            assert!(validate_topic(t).is_err(), "{t}");
        }
        assert!(validate_topic("a.b.c").is_ok());
    }
}
