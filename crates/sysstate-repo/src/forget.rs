//! `forget`: which versions a retention policy keeps. Versions are grouped (by default by host,
//! root and the set of components they hold, so a backup of one component never pushes out the
//! full system-state versions); within a group, a version is kept when any rule keeps it.
//! Protected versions are always kept.

use crate::id::Id;
use crate::version::Version;
use std::collections::{BTreeMap, HashSet};
use sysstate_types::time::civil_from_days;

/// Maps a version to the period it falls in.
type Bucket = Box<dyn Fn(&Version) -> i64>;

/// Which versions to keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// Every version taken within this many nanoseconds before the group's newest.
    pub within_ns: Option<i64>,
    /// Every version with one of these tags.
    pub tags: Vec<String>,
}

impl Policy {
    /// True when the policy keeps nothing (a mistake, never applied).
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// What puts two versions in one group (each group gets the policy on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupBy {
    /// The host.
    pub host: bool,
    /// The root (`/`, or the folder that stood for it).
    pub root: bool,
    /// The set of components.
    pub components: bool,
    /// The set of tags.
    pub tags: bool,
}

impl Default for GroupBy {
    fn default() -> Self {
        GroupBy { host: true, root: true, components: true, tags: false }
    }
}

impl GroupBy {
    /// Parses `host,root,components,tags` (any of them, comma-separated; empty: one group).
    pub fn parse(text: &str) -> Result<GroupBy, String> {
        let mut group = GroupBy { host: false, root: false, components: false, tags: false };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "host" => group.host = true,
                "root" => group.root = true,
                "components" => group.components = true,
                "tags" => group.tags = true,
                other => {
                    return Err(format!(
                        "`{other}` is not something versions can be grouped by: give host, root, components or tags, comma-separated"
                    ))
                }
            }
        }
        Ok(group)
    }

    /// The group of `version`.
    fn key(&self, version: &Version) -> (String, String, Vec<String>, Vec<String>) {
        let sorted = |names: Vec<String>| {
            let mut names = names;
            names.sort();
            names.dedup();
            names
        };
        (
            if self.host { version.host.clone() } else { String::new() },
            if self.root { version.root_path.clone() } else { String::new() },
            if self.components {
                sorted(version.components.iter().map(|c| c.name.clone()).collect())
            } else {
                Vec::new()
            },
            if self.tags { sorted(version.tags.clone()) } else { Vec::new() },
        )
    }
}

/// Which versions a command looks at: those of one of `hosts`, with one of `tags`, holding
/// every one of `components` (an empty list does not filter).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Hosts.
    pub hosts: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Components.
    pub components: Vec<String>,
}

impl Filter {
    /// True when `version` passes.
    pub fn matches(&self, version: &Version) -> bool {
        (self.hosts.is_empty() || self.hosts.contains(&version.host))
            && (self.tags.is_empty() || version.tags.iter().any(|t| self.tags.contains(t)))
            && self.components.iter().all(|c| version.components.iter().any(|h| &h.name == c))
    }
}

/// The versions to keep and to drop, by id. `protected` versions are kept whatever the policy.
pub fn plan(
    versions: &[(Id, Version)],
    policy: &Policy,
    group_by: GroupBy,
    protected: &HashSet<Id>,
) -> (Vec<Id>, Vec<Id>) {
    let mut groups: BTreeMap<_, Vec<&(Id, Version)>> = BTreeMap::new();
    for entry in versions {
        groups.entry(group_by.key(&entry.1)).or_default().push(entry);
    }
    let mut keep: HashSet<Id> = protected.clone();
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
        let newest = group.first().map(|(_, v)| v.time_ns).unwrap_or(0);
        for (id, version) in &group {
            let within = policy.within_ns.is_some_and(|within| newest - version.time_ns <= within);
            let tagged = version.tags.iter().any(|t| policy.tags.contains(t));
            if within || tagged {
                keep.insert(*id);
            }
        }
    }
    versions.iter().map(|(id, _)| *id).partition(|id| keep.contains(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(days: i64, hours: i64) -> (Id, Version) {
        let time_ns = (days * 86_400 + hours * 3600) * 1_000_000_000;
        (Id::random(), Version::at(time_ns))
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day() {
        // Two versions a day for 10 days, from day 20000.
        let versions: Vec<_> = (0..10).flat_map(|d| [version(20_000 + d, 1), version(20_000 + d, 5)]).collect();
        let none = HashSet::new();
        let by = GroupBy::default();
        let (keep, drop) = plan(&versions, &Policy { daily: 3, ..Policy::default() }, by, &none);
        assert_eq!(keep.len(), 3);
        assert_eq!(drop.len(), 17);
        for id in &keep {
            let (_, v) = versions.iter().find(|(i, _)| i == id).unwrap();
            assert!(v.time_ns >= (20_007 * 86_400 + 5 * 3600) * 1_000_000_000, "kept an old or early version");
        }
        let (keep, _) = plan(&versions, &Policy { last: 2, daily: 3, ..Policy::default() }, by, &none);
        assert_eq!(keep.len(), 4, "last 2 are both on the newest day, which daily keeps too");
        let (keep, _) = plan(&versions, &Policy { weekly: 10, ..Policy::default() }, by, &none);
        assert_eq!(keep.len(), 2, "ten days span two weeks");
        let (keep, _) = plan(&versions, &Policy { monthly: 5, yearly: 5, ..Policy::default() }, by, &none);
        assert_eq!(keep.len(), 1, "all in one month and year");
    }

    fn holding(mut version: (Id, Version), components: &[&str], tags: &[&str]) -> (Id, Version) {
        version.1.components = components
            .iter()
            .map(|name| crate::version::ComponentRecord {
                name: name.to_string(),
                paths: vec![],
                missing: vec![],
                generated: vec![],
            })
            .collect();
        version.1.tags = tags.iter().map(|t| t.to_string()).collect();
        version
    }

    #[test]
    fn groups_by_component_set_within_tags_and_protection_keep_what_they_say() {
        let full = holding(version(20_000, 1), &["config", "boot"], &[]);
        let older_full = holding(version(19_990, 1), &["config", "boot"], &["before-upgrade"]);
        let small = holding(version(20_001, 1), &["config"], &[]);
        let versions = vec![older_full.clone(), full.clone(), small.clone()];
        let none = HashSet::new();
        let last = Policy { last: 1, ..Policy::default() };
        // By component set: the newest of each set is kept; one small backup does not push the
        // full version out.
        let (keep, _) = plan(&versions, &last, GroupBy::default(), &none);
        assert_eq!(keep, vec![full.0, small.0]);
        // One group: only the newest.
        let (keep, _) = plan(&versions, &last, GroupBy::parse("").unwrap(), &none);
        assert_eq!(keep, vec![small.0]);
        assert!(GroupBy::parse("host,colour").is_err());
        // Within 2 days of the group's newest; and by tag.
        let within = Policy { within_ns: Some(2 * 86_400 * 1_000_000_000), ..Policy::default() };
        assert_eq!(plan(&versions, &within, GroupBy::default(), &none).0, vec![full.0, small.0]);
        let tagged = Policy { tags: vec!["before-upgrade".into()], ..Policy::default() };
        assert_eq!(plan(&versions, &tagged, GroupBy::default(), &none).0, vec![older_full.0]);
        // Protected: kept whatever the policy.
        let protected: HashSet<Id> = [older_full.0].into();
        assert_eq!(plan(&versions, &last, GroupBy::default(), &protected).0, vec![older_full.0, full.0, small.0]);
        // Filters.
        let filter = Filter { components: vec!["boot".into()], ..Filter::default() };
        assert!(filter.matches(&full.1) && !filter.matches(&small.1));
        let filter = Filter { tags: vec!["before-upgrade".into()], hosts: vec!["h".into()], ..Filter::default() };
        assert!(filter.matches(&older_full.1) && !filter.matches(&full.1));
    }
}
