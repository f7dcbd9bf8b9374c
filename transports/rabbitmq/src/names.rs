//! Exchange, queue and routing-key names, all under the namespace, and the translation of
//! topic patterns into AMQP binding keys.
//!
//! | what | name |
//! |---|---|
//! | direct exchange for machine-addressed events | `{ns}.machines` (routing key: machine id) |
//! | queue of one machine | `{ns}.m.{machine id}` |
//! | topic exchange for publishes | `{ns}.topics` (routing key: the topic) |
//! | queue of one session's topic subscriptions | `{ns}.s.{session tag}` |
//! | direct exchange for consumer groups | `{ns}.groups` (routing key: group name) |
//! | queue of one consumer group (shared by its members) | `{ns}.g.{group}` |

use lapin::types::ShortString;
use switchyard_core::{Error, Result, TopicPattern};

/// The names of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    ns: String,
    pub(crate) machines: ShortString,
    pub(crate) topics: ShortString,
    pub(crate) groups: ShortString,
}

pub(crate) fn short(s: String, what: &'static str) -> Result<ShortString> {
    let len = s.len();
    ShortString::try_new(s).map_err(|_| Error::InvalidName {
        name: format!("({len} bytes)"),
        reason: match what {
            "machine" => "a machine id used over RabbitMQ must fit in an AMQP name (255 bytes with the namespace)",
            "group" => "a group name used over RabbitMQ must fit in an AMQP name (255 bytes with the namespace)",
            "topic" => "a topic or pattern used over RabbitMQ must fit in an AMQP routing key (255 bytes)",
            _ => "a name used over RabbitMQ must fit in an AMQP short string (255 bytes)",
        },
    })
}

impl Names {
    pub(crate) fn new(ns: &str) -> Result<Names> {
        if ns.is_empty() || ns.len() > 100 {
            return Err(Error::Config(format!(
                "RabbitMQ namespace `{ns}` must be 1 to 100 bytes long"
            )));
        }
        Ok(Names {
            ns: ns.to_string(),
            machines: short(format!("{ns}.machines"), "namespace")?,
            topics: short(format!("{ns}.topics"), "namespace")?,
            groups: short(format!("{ns}.groups"), "namespace")?,
        })
    }

    pub(crate) fn namespace(&self) -> &str {
        &self.ns
    }

    pub(crate) fn machine_queue(&self, id: &str) -> Result<ShortString> {
        short(format!("{}.m.{id}", self.ns), "machine")
    }

    pub(crate) fn session_queue(&self, tag: &str) -> Result<ShortString> {
        short(format!("{}.s.{tag}", self.ns), "namespace")
    }

    pub(crate) fn group_queue(&self, group: &str) -> Result<ShortString> {
        short(format!("{}.g.{group}", self.ns), "group")
    }
}

/// The AMQP routing key of a published topic: the topic itself (dot-separated words).
pub fn topic_key(topic: &str) -> Result<ShortString> {
    short(topic.to_string(), "topic")
}

/// The AMQP binding key of a subscription pattern.
///
/// Both sides split on `.` and read `*` as exactly one word and `#` as zero or more words,
/// so the wildcards map one to one. Nothing needs escaping: our patterns accept `*` and
/// `#` only as whole segments (`a*` is rejected by [`TopicPattern::parse`]) and published
/// topics contain neither, which are the only characters AMQP topic matching treats
/// specially. What remains is the length limit of a routing key.
pub fn binding_key(pattern: &TopicPattern) -> Result<ShortString> {
    short(pattern.as_str().to_string(), "topic")
}

/// AMQP names are short strings: at most 255 bytes.
#[cfg(test)]
pub(crate) const fn max_name() -> usize {
    255
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_namespace() {
        let n = Names::new("ns1").unwrap();
        assert_eq!(n.machines.as_str(), "ns1.machines");
        assert_eq!(n.machine_queue("a").unwrap().as_str(), "ns1.m.a");
        assert_eq!(n.group_queue("g").unwrap().as_str(), "ns1.g.g");
        assert!(Names::new("").is_err());
    }

    #[test]
    fn over_long_names_are_errors_not_panics() {
        let n = Names::new("ns").unwrap();
        let long = "x".repeat(max_name());
        assert!(matches!(
            n.machine_queue(&long),
            Err(Error::InvalidName { .. })
        ));
        assert!(topic_key(&long).is_ok());
        assert!(topic_key(&format!("{long}y")).is_err());
    }

    #[test]
    fn patterns_translate_word_for_word() {
        for p in ["a.b", "a.*", "a.#", "#", "*.b.#", "a.#.z"] {
            let tp = TopicPattern::parse(p).unwrap();
            assert_eq!(binding_key(&tp).unwrap().as_str(), p);
        }
    }
}
