//! Event names that cost nothing to clone: a string literal is kept as it is, any other
//! string is shared behind one `Arc`.
//!
//! Building an envelope must not allocate beyond its payload, and most event names are
//! literals (`"ORDER_PLACED"`), so [`Name`] keeps a `&'static str` without copying it.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    Shared(Arc<str>),
}

/// An event name: a string literal kept as is, or a shared string; cheap to clone.
///
/// Converts from `&'static str` without allocating, and from `String`, `&String`,
/// `Arc<str>` and `Box<str>`. For a borrowed `&str` that is not `'static`, use
/// [`Name::new`].
#[derive(Clone)]
pub struct Name(Repr);

impl Name {
    /// A name copied from any string.
    pub fn new(s: &str) -> Name {
        Name(Repr::Shared(s.into()))
    }

    /// A name for a string literal (no allocation).
    pub const fn from_static(s: &'static str) -> Name {
        Name(Repr::Static(s))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(s) => s,
            Repr::Shared(s) => s,
        }
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for Name {}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}
impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&'static str> for Name {
    fn from(s: &'static str) -> Name {
        Name(Repr::Static(s))
    }
}
impl From<String> for Name {
    fn from(s: String) -> Name {
        Name(Repr::Shared(s.into()))
    }
}
impl From<&String> for Name {
    fn from(s: &String) -> Name {
        Name(Repr::Shared(s.as_str().into()))
    }
}
impl From<Arc<str>> for Name {
    fn from(s: Arc<str>) -> Name {
        Name(Repr::Shared(s))
    }
}
impl From<&Arc<str>> for Name {
    fn from(s: &Arc<str>) -> Name {
        Name(Repr::Shared(s.clone()))
    }
}
impl From<Box<str>> for Name {
    fn from(s: Box<str>) -> Name {
        Name(Repr::Shared(s.into()))
    }
}
impl From<&Name> for Name {
    fn from(s: &Name) -> Name {
        s.clone()
    }
}
impl From<Name> for Arc<str> {
    fn from(n: Name) -> Arc<str> {
        match n.0 {
            Repr::Static(s) => s.into(),
            Repr::Shared(s) => s,
        }
    }
}
impl From<Name> for String {
    fn from(n: Name) -> String {
        n.as_str().to_string()
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        let s: Arc<str> = Deserialize::deserialize(d)?;
        Ok(Name(Repr::Shared(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_shared_strings_compare_equal() {
        let a = Name::from("PING");
        let b = Name::from(String::from("PING"));
        assert_eq!(a, b);
        assert_eq!(a, "PING");
        assert_eq!(&*b, "PING");
        let mut h1 = std::collections::hash_map::DefaultHasher::new();
        let mut h2 = std::collections::hash_map::DefaultHasher::new();
        a.hash(&mut h1);
        b.hash(&mut h2);
        assert_eq!(h1.finish(), h2.finish());
        let back: Arc<str> = b.into();
        assert_eq!(&*back, "PING");
    }
}
