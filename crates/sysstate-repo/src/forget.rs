//! `forget`: which versions a retention policy keeps. Versions are grouped by host and root;
//! within a group, a version is kept when any rule keeps it.

use crate::id::Id;
use crate::version::Version;
use std::collections::{BTreeMap, HashSet};
use sysstate_types::time::civil_from_days;

/// Maps a version to the period it falls in.
type Bucket = Box<dyn Fn(&Version) -> i64>;

/// How many versions to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// The newest N.
    pub last: usize,
    /// The newest of each of the last N days that have versions.
    pub daily: usize,
    /// … weeks (Monday to Sunday, UTC).
    pub weekly: usize,
    /// … months.
    pub monthly: usize,
    /// … years.
    pub yearly: usize,
}

impl Policy {
    /// True when the policy keeps nothing (a mistake, never applied).
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// The versions to keep and to drop, by id.
pub fn plan(versions: &[(Id, Version)], policy: &Policy) -> (Vec<Id>, Vec<Id>) {
    let mut groups: BTreeMap<(&str, &str), Vec<&(Id, Version)>> = BTreeMap::new();
    for entry in versions {
        groups.entry((entry.1.host.as_str(), entry.1.root_path.as_str())).or_default().push(entry);
    }
    let mut keep = HashSet::new();
    for mut group in groups.into_values() {
        group.sort_by_key(|(id, v)| std::cmp::Reverse((v.time_ns, *id)));
        let day = |v: &Version| v.time_ns.div_euclid(86_400 * 1_000_000_000);
        let rules: [(usize, Bucket); 5] = [
            (policy.last, Box::new(|v: &Version| v.time_ns)),
            (policy.daily, Box::new(day)),
            // 1970-01-01 was a Thursday: shifting by 3 days makes weeks start on Monday.
            (policy.weekly, Box::new(move |v: &Version| (day(v) + 3).div_euclid(7))),
            (
                policy.monthly,
                Box::new(move |v: &Version| {
                    let (y, m, _) = civil_from_days(day(v));
                    y * 12 + m
                }),
            ),
            (policy.yearly, Box::new(move |v: &Version| civil_from_days(day(v)).0)),
        ];
        for (count, bucket) in rules.iter() {
            let mut seen = HashSet::new();
            for (id, version) in &group {
                if seen.len() >= *count {
                    break;
                }
                if seen.insert(bucket(version)) {
                    keep.insert(*id);
                }
            }
        }
    }
    versions.iter().map(|(id, _)| *id).partition(|id| keep.contains(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::VersionStats;

    fn version(days: i64, hours: i64) -> (Id, Version) {
        let time_ns = (days * 86_400 + hours * 3600) * 1_000_000_000;
        (
            Id::random(),
            Version {
                time_ns,
                host: "h".into(),
                root_path: "/".into(),
                tree: Id::random(),
                components: vec![],
                parent: None,
                tags: vec![],
                stats: VersionStats::default(),
                program: String::new(),
                shadow: None,
                extra: Default::default(),
            },
        )
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        // Two versions a day for 10 days, from day 20000.
        let versions: Vec<_> = (0..10).flat_map(|d| [version(20_000 + d, 1), version(20_000 + d, 5)]).collect();
        let (keep, drop) = plan(&versions, &Policy { daily: 3, ..Policy::default() });
        assert_eq!(keep.len(), 3);
        assert_eq!(drop.len(), 17);
        for id in &keep {
            let (_, v) = versions.iter().find(|(i, _)| i == id).unwrap();
            assert!(v.time_ns >= (20_007 * 86_400 + 5 * 3600) * 1_000_000_000, "kept an old or early version");
        }
        let (keep, _) = plan(&versions, &Policy { last: 2, daily: 3, ..Policy::default() });
        assert_eq!(keep.len(), 4, "last 2 are both on the newest day, which daily keeps too");
        let (keep, _) = plan(&versions, &Policy { weekly: 10, ..Policy::default() });
        assert_eq!(keep.len(), 2, "ten days span two weeks");
        let (keep, _) = plan(&versions, &Policy { monthly: 5, yearly: 5, ..Policy::default() });
        assert_eq!(keep.len(), 1, "all in one month and year");
    }
}
