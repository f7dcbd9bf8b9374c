//! Our `*`/`#` topic patterns on ZeroMQ's prefix-only subscriptions.
//!
//! A SUB socket filters by byte prefix of the first frame. A pattern is
//! subscribed by its longest literal prefix (the segments before its first
//! wildcard), so the PUB side sends a superset of what matches; the subscriber
//! then matches the whole pattern locally and drops the rest.

/// The longest prefix every topic matching `pattern` starts with.
///
/// - `orders.new` → `orders.new` (also sends `orders.newer`, `orders.new.x`: filtered locally);
/// - `orders.*` → `orders.` (a `*` needs a segment after the dot);
/// - `orders.#` → `orders` (`#` matches zero segments, so `orders` itself matches);
/// - `orders.#.eu` → `orders.` (at least the segment `eu` follows);
/// - `orders.#.#` → `orders` (every `#` may match nothing);
/// - `#`, `*.x` → the empty prefix (every topic).
pub fn literal_prefix(pattern: &str) -> String {
    let segs: Vec<&str> = pattern.split('.').collect();
    let Some(first_wild) = segs.iter().position(|s| *s == "*" || *s == "#") else {
        return pattern.to_string();
    };
    if first_wild == 0 {
        return String::new();
    }
    let mut p = segs[..first_wild].join(".");
    // Only `#`s from here on can all match nothing: then the literal part itself matches.
    let can_end_here = segs[first_wild..].iter().all(|s| *s == "#");
    if !can_end_here {
        p.push('.');
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::TopicPattern;

    #[test]
    fn prefixes_of_each_shape() {
        assert_eq!(literal_prefix("orders.new"), "orders.new");
        assert_eq!(literal_prefix("orders.*"), "orders.");
        assert_eq!(literal_prefix("orders.#"), "orders");
        assert_eq!(literal_prefix("orders.#.eu"), "orders.");
        assert_eq!(literal_prefix("orders.#.#"), "orders");
        assert_eq!(literal_prefix("a.b.*.d"), "a.b.");
        assert_eq!(literal_prefix("#"), "");
        assert_eq!(literal_prefix("*.x"), "");
    }

    /// Every topic a pattern matches starts with its prefix: the PUB side never filters
    /// out a topic the subscriber wants. Checked over every pattern and topic built from
    /// a small alphabet of segments.
    #[test]
    fn the_prefix_never_loses_a_matching_topic() {
        let segs = ["a", "b", "ab", "*", "#"];
        let mut patterns = Vec::new();
        for n in 1..=3 {
            let mut idx = vec![0usize; n];
            loop {
                patterns.push(idx.iter().map(|&i| segs[i]).collect::<Vec<_>>().join("."));
                let mut k = 0;
                while k < n {
                    idx[k] += 1;
                    if idx[k] < segs.len() {
                        break;
                    }
                    idx[k] = 0;
                    k += 1;
                }
                if k == n {
                    break;
                }
            }
        }
        let lits = ["a", "b", "ab", "ba"];
        let mut topics = Vec::new();
        for n in 1..=4 {
            let mut idx = vec![0usize; n];
            loop {
                topics.push(idx.iter().map(|&i| lits[i]).collect::<Vec<_>>().join("."));
                let mut k = 0;
                while k < n {
                    idx[k] += 1;
                    if idx[k] < lits.len() {
                        break;
                    }
                    idx[k] = 0;
                    k += 1;
                }
                if k == n {
                    break;
                }
            }
        }
        let mut matched = 0;
        let mut filtered_locally = 0;
        for p in &patterns {
            let pat = TopicPattern::parse(p).unwrap();
            let prefix = literal_prefix(p);
            for t in &topics {
                if pat.matches(t) {
                    matched += 1;
                    assert!(
                        t.starts_with(&prefix),
                        "`{p}` matches `{t}` but prefix `{prefix}`"
                    );
                } else if t.starts_with(&prefix) {
                    filtered_locally += 1;
                }
            }
        }
        // Both sides of the split happen: prefix passes and the local filter drops.
        assert!(
            matched > 1000 && filtered_locally > 1000,
            "{matched} {filtered_locally}"
        );
    }
}
