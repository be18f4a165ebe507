//! The agent's schedules (`[schedule]`): when it backs up, prunes and checks.
//!
//! Backup times are given as the seed's agent takes them — times of day (up to three), every day
//! or on chosen weekdays — and everything else as calendar expressions in cron's syntax, parsed
//! by `croner` (five fields, or six with seconds first; `@daily` and the like). A backup entry may
//! be a calendar expression too, for what times of day cannot say. Times are local, as cron's.
//!
//! The config is parsed here rather than in the agent so that every command (`config show`, the
//! doctor) refuses the same typo when the config loads.

use chrono::{DateTime, Local, NaiveTime, Weekday};
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use std::time::Duration;

/// What a schedule runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScheduledWork {
    /// A system state backup of the config's components (then the retention policy).
    Backup,
    /// A prune of what forgotten versions left.
    Prune,
    /// A check of the repository's structure.
    Check,
    /// A check that also reads a sample of the data (`[schedule] read-data-sample`).
    CheckReadData,
}

impl ScheduledWork {
    /// Its key in `[schedule]`.
    pub fn key(self) -> &'static str {
        match self {
            ScheduledWork::Backup => "backup",
            ScheduledWork::Prune => "prune",
            ScheduledWork::Check => "check",
            ScheduledWork::CheckReadData => "check-read-data",
        }
    }

    /// Every kind, in the order the agent shows them.
    pub const ALL: [ScheduledWork; 4] =
        [ScheduledWork::Backup, ScheduledWork::Prune, ScheduledWork::Check, ScheduledWork::CheckReadData];
}

/// One calendar entry: the text as written and the expression it stands for.
#[derive(Debug, Clone)]
pub struct Calendar {
    /// As written in the config.
    pub text: String,
    cron: Cron,
}

/// The most times of day a backup schedule takes, as the seed's agent (more: a calendar
/// expression).
pub const MAX_BACKUP_TIMES: usize = 3;

fn parser() -> CronParser {
    CronParser::builder().seconds(Seconds::Optional).build()
}

impl Calendar {
    /// A calendar expression (`0 4 * * sun`, `*/5 * * * * *` with seconds, `@daily`).
    pub fn expression(text: &str) -> Result<Calendar, String> {
        let cron = parser().parse(text.trim()).map_err(|error| {
            format!(
                "`{text}` is not a calendar expression ({error}): use cron's five fields `minute hour day-of-month month day-of-week` (`0 4 * * sun`), or six with seconds first"
            )
        })?;
        Ok(Calendar { text: text.to_string(), cron })
    }

    /// A time of day (`02:00`, `14:30:15`) on `days` (every day when empty).
    pub fn time_of_day(text: &str, days: &[Weekday]) -> Result<Calendar, String> {
        let time = NaiveTime::parse_from_str(text.trim(), "%H:%M:%S")
            .or_else(|_| NaiveTime::parse_from_str(text.trim(), "%H:%M"))
            .map_err(|_| format!("`{text}` is not a time of day: write `HH:MM` (`02:00`, `14:30`)"))?;
        use chrono::Timelike;
        let days = match days {
            [] => "*".to_string(),
            days => days.iter().map(|d| d.num_days_from_sunday().to_string()).collect::<Vec<_>>().join(","),
        };
        let pattern = format!("{} {} {} * * {days}", time.second(), time.minute(), time.hour());
        let cron = parser().parse(&pattern).map_err(|error| format!("`{text}`: {error}"))?;
        Ok(Calendar { text: text.to_string(), cron })
    }

    /// The first time after `after` (strictly) this entry names.
    pub fn next_after(&self, after: &DateTime<Local>) -> Option<DateTime<Local>> {
        self.cron.find_next_occurrence(after, false).ok()
    }

    /// The last time at or before `at` this entry names.
    pub fn previous_at(&self, at: &DateTime<Local>) -> Option<DateTime<Local>> {
        self.cron.find_previous_occurrence(at, true).ok()
    }
}

/// One kind of work and when it runs.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// What runs.
    pub work: ScheduledWork,
    /// When (the earliest of its entries).
    pub entries: Vec<Calendar>,
}

impl Schedule {
    /// The first time after `after` any entry names.
    pub fn next_after(&self, after: &DateTime<Local>) -> Option<DateTime<Local>> {
        self.entries.iter().filter_map(|entry| entry.next_after(after)).min()
    }

    /// The last time at or before `at` any entry names.
    pub fn previous_at(&self, at: &DateTime<Local>) -> Option<DateTime<Local>> {
        self.entries.iter().filter_map(|entry| entry.previous_at(at)).max()
    }
}

/// A string, or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match serde::Deserialize::deserialize(deserializer).map_err(|_: D::Error| {
        serde::de::Error::custom("`backup` takes a time of day or calendar expression, or a list of them")
    })? {
        OneOrMany::One(one) => Ok(vec![one]),
        OneOrMany::Many(many) => Ok(many),
    }
}

/// `[schedule]` in the config.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScheduleSection {
    /// Backup times: times of day (`"02:00"`, up to three) or calendar expressions; one may be
    /// written without the brackets (`backup = "02:00"`), as `prune` and `check` are.
    #[serde(default, deserialize_with = "one_or_many")]
    pub backup: Vec<String>,
    /// The weekdays the backup times apply to (`["sun", "wed"]`); every day when absent.
    #[serde(default)]
    pub backup_days: Vec<String>,
    /// When to prune.
    pub prune: Option<String>,
    /// When to check the repository's structure.
    pub check: Option<String>,
    /// When to check and read a sample of the data.
    pub check_read_data: Option<String>,
    /// How much of the data a scheduled read checks (`"5%"`, the default; `"100%"`: all).
    pub read_data_sample: Option<String>,
    /// Each scheduled run waits a random time up to this (`"10m"`; none by default).
    pub random_delay: Option<String>,
}

impl ScheduleSection {
    /// The schedules the section names, checked. Each error names the key.
    pub fn schedules(&self) -> Result<Vec<Schedule>, (String, String)> {
        let days = self
            .backup_days
            .iter()
            .map(|day| {
                day.parse::<Weekday>().map_err(|_| {
                    ("schedule.backup-days".to_string(), format!("`{day}` is not a weekday: use mon, tue, … sun"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = |work: ScheduledWork| format!("schedule.{}", work.key());
        let mut schedules = Vec::new();
        let mut times = 0;
        let mut backup = Vec::new();
        for text in &self.backup {
            let is_time = text.trim().chars().all(|c| c.is_ascii_digit() || c == ':');
            let entry = if is_time {
                times += 1;
                Calendar::time_of_day(text, &days)
            } else {
                Calendar::expression(text)
            };
            backup.push(entry.map_err(|e| (key(ScheduledWork::Backup), e))?);
        }
        if times > MAX_BACKUP_TIMES {
            return Err((
                key(ScheduledWork::Backup),
                format!(
                    "{times} times of day: the agent takes at most {MAX_BACKUP_TIMES}, as the seed's does; write a calendar expression for more (`0 */4 * * *`: every four hours)"
                ),
            ));
        }
        if !days.is_empty() && times == 0 {
            return Err((
                "schedule.backup-days".to_string(),
                "applies to the times of day in `schedule.backup`, and it has none".to_string(),
            ));
        }
        if !backup.is_empty() {
            schedules.push(Schedule { work: ScheduledWork::Backup, entries: backup });
        }
        for (work, text) in [
            (ScheduledWork::Prune, &self.prune),
            (ScheduledWork::Check, &self.check),
            (ScheduledWork::CheckReadData, &self.check_read_data),
        ] {
            if let Some(text) = text {
                let entry = Calendar::expression(text).map_err(|e| (key(work), e))?;
                schedules.push(Schedule { work, entries: vec![entry] });
            }
        }
        self.read_data_sample().map_err(|e| ("schedule.read-data-sample".to_string(), e))?;
        self.random_delay().map_err(|e| ("schedule.random-delay".to_string(), e))?;
        Ok(schedules)
    }

    /// `read-data-sample` in percent (1–100; 5 by default).
    pub fn read_data_sample(&self) -> Result<u8, String> {
        self.read_data_sample.as_deref().map_or(Ok(5), parse_percent)
    }

    /// `random-delay` (zero by default).
    pub fn random_delay(&self) -> Result<Duration, String> {
        match &self.random_delay {
            None => Ok(Duration::ZERO),
            Some(text) => crate::shadow::parse_duration(text),
        }
    }
}

/// A percentage from `1%` to `100%`.
pub fn parse_percent(text: &str) -> Result<u8, String> {
    text.trim()
        .strip_suffix('%')
        .and_then(|n| n.trim().parse::<u8>().ok())
        .filter(|n| (1..=100).contains(n))
        .ok_or_else(|| format!("`{text}`: give a percentage from `1%` to `100%`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Local> {
        Local.with_ymd_and_hms(2026, 12, 2, h, m, s).unwrap() // a Wednesday
    }

    #[test]
    fn one_backup_time_needs_no_brackets() {
        let section = |text: &str| toml::from_str::<ScheduleSection>(text);
        assert_eq!(section("backup = \"* * * * *\"").unwrap().backup, ["* * * * *"]);
        assert_eq!(section("backup = [\"02:00\", \"14:00\"]").unwrap().backup, ["02:00", "14:00"]);
        let error = section("backup = 2").unwrap_err().to_string();
        assert!(error.contains("a time of day or calendar expression, or a list of them"), "{error}");
    }

    #[test]
    fn times_of_day_run_daily_or_on_the_days_named() {
        let section = ScheduleSection { backup: vec!["02:00".into(), "14:30".into()], ..Default::default() };
        let schedules = section.schedules().unwrap();
        assert_eq!(schedules[0].next_after(&at(3, 0, 0)), Some(at(14, 30, 0)));
        assert_eq!(schedules[0].previous_at(&at(3, 0, 0)), Some(at(2, 0, 0)));
        let weekly = ScheduleSection {
            backup: vec!["02:00".into()],
            backup_days: vec!["sun".into(), "Thu".into()],
            ..Default::default()
        };
        let next = weekly.schedules().unwrap()[0].next_after(&at(3, 0, 0)).unwrap();
        assert_eq!(next, Local.with_ymd_and_hms(2026, 12, 3, 2, 0, 0).unwrap(), "Thursday, not Wednesday");
    }

    #[test]
    fn expressions_take_seconds_and_every_mistake_names_its_key() {
        let section = ScheduleSection {
            backup: vec!["*/5 * * * * *".into()],
            prune: Some("0 4 * * sun".into()),
            ..Default::default()
        };
        let schedules = section.schedules().unwrap();
        assert_eq!(schedules[0].next_after(&at(3, 0, 1)), Some(at(3, 0, 5)));
        assert_eq!(schedules[1].work, ScheduledWork::Prune);
        for (section, key) in [
            (ScheduleSection { backup: vec!["25:00".into()], ..Default::default() }, "schedule.backup"),
            (
                ScheduleSection {
                    backup: vec!["01:00".into(), "02:00".into(), "03:00".into(), "04:00".into()],
                    ..Default::default()
                },
                "schedule.backup",
            ),
            (
                ScheduleSection {
                    backup: vec!["01:00".into()],
                    backup_days: vec!["someday".into()],
                    ..Default::default()
                },
                "schedule.backup-days",
            ),
            (ScheduleSection { prune: Some("every sunday".into()), ..Default::default() }, "schedule.prune"),
            (
                ScheduleSection { read_data_sample: Some("150%".into()), ..Default::default() },
                "schedule.read-data-sample",
            ),
            (ScheduleSection { random_delay: Some("soon".into()), ..Default::default() }, "schedule.random-delay"),
        ] {
            assert_eq!(section.schedules().unwrap_err().0, key);
        }
    }
}

/// How fast replication to the vault may send (`[vault] bandwidth`, `work-hours`,
/// `work-hours-bandwidth`, `work-days`), as the seed's agent throttles: one limit in work hours,
/// another (or none) outside them. Times are local.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bandwidth {
    /// Bytes per second outside work hours (`None`: no limit).
    pub outside: Option<u64>,
    /// Work hours: from, until, on which days, and the bytes per second then.
    pub work: Option<(NaiveTime, NaiveTime, Vec<Weekday>, Option<u64>)>,
}

/// Work days when `work-days` is not given.
pub const DEFAULT_WORK_DAYS: [Weekday; 5] = [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri];

/// `20MiB` or `20MiB/s` as bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let bytes = text.trim().trim_end_matches("/s");
    match sysstate_shadow::storage::MaxSize::parse(bytes) {
        Ok(sysstate_shadow::storage::MaxSize::Bytes(rate)) if rate > 0 => Ok(rate),
        _ => Err(format!("`{text}` is not a rate: give bytes per second (`20MiB`, `500KiB/s`)")),
    }
}

impl Bandwidth {
    /// Parses the settings; `work_hours` is `HH:MM-HH:MM` (past midnight when the end comes
    /// first: `22:00-06:00`).
    pub fn parse(
        outside: Option<&str>,
        work_hours: Option<&str>,
        work_days: Option<&[String]>,
        in_work_hours: Option<&str>,
    ) -> Result<Bandwidth, (String, String)> {
        let rate = |key: &str, text: Option<&str>| {
            text.map(parse_rate).transpose().map_err(|detail| (format!("vault.{key}"), detail))
        };
        let outside = rate("bandwidth", outside)?;
        let during = rate("work-hours-bandwidth", in_work_hours)?;
        let work = match work_hours {
            None if during.is_some() || work_days.is_some() => {
                return Err((
                    "vault.work-hours".into(),
                    "`work-hours-bandwidth` and `work-days` need `work-hours` (`08:00-18:00`)".into(),
                ))
            }
            None => None,
            Some(text) => {
                let bad = || ("vault.work-hours".to_string(), format!("`{text}` is not `HH:MM-HH:MM` (`08:00-18:00`)"));
                let (from, until) = text.split_once('-').ok_or_else(bad)?;
                let from = NaiveTime::parse_from_str(from.trim(), "%H:%M").map_err(|_| bad())?;
                let until = NaiveTime::parse_from_str(until.trim(), "%H:%M").map_err(|_| bad())?;
                let days = match work_days {
                    None => DEFAULT_WORK_DAYS.to_vec(),
                    Some(days) => days
                        .iter()
                        .map(|day| {
                            day.parse::<Weekday>().map_err(|_| {
                                (
                                    "vault.work-days".to_string(),
                                    format!("`{day}` is not a weekday: use mon, tue, … sun"),
                                )
                            })
                        })
                        .collect::<Result<_, _>>()?,
                };
                Some((from, until, days, during))
            }
        };
        Ok(Bandwidth { outside, work })
    }

    /// The limit in force at `at` (bytes per second; `None`: no limit).
    pub fn limit_at(&self, at: &DateTime<Local>) -> Option<u64> {
        use chrono::Datelike;
        let Some((from, until, days, during)) = &self.work else { return self.outside };
        let time = at.time();
        // A span past midnight belongs to the day it starts on.
        let (inside, day) = if from <= until {
            (time >= *from && time < *until, at.weekday())
        } else if time >= *from {
            (true, at.weekday())
        } else {
            (time < *until, at.weekday().pred())
        };
        if inside && days.contains(&day) {
            *during
        } else {
            self.outside
        }
    }

    /// True when no limit is ever in force.
    pub fn is_unlimited(&self) -> bool {
        self.outside.is_none() && self.work.as_ref().is_none_or(|(_, _, _, during)| during.is_none())
    }
}

#[cfg(test)]
mod bandwidth_tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn work_hours_have_their_own_limit_on_work_days() {
        let days = ["mon".to_string(), "tue".into(), "wed".into(), "thu".into(), "fri".into()];
        let bandwidth = Bandwidth::parse(Some("20MiB"), Some("08:00-18:00"), Some(&days), Some("2MiB/s")).unwrap();
        let wednesday = |h, m| Local.with_ymd_and_hms(2026, 12, 2, h, m, 0).unwrap();
        assert_eq!(bandwidth.limit_at(&wednesday(9, 0)), Some(2 << 20));
        assert_eq!(bandwidth.limit_at(&wednesday(18, 0)), Some(20 << 20));
        assert_eq!(bandwidth.limit_at(&wednesday(7, 59)), Some(20 << 20));
        let saturday = Local.with_ymd_and_hms(2026, 12, 5, 9, 0, 0).unwrap();
        assert_eq!(bandwidth.limit_at(&saturday), Some(20 << 20));
        // A night shift: Friday 22:00 to Saturday 06:00 is Friday's.
        let night = Bandwidth::parse(None, Some("22:00-06:00"), None, Some("1MiB")).unwrap();
        assert_eq!(night.limit_at(&Local.with_ymd_and_hms(2026, 12, 5, 3, 0, 0).unwrap()), Some(1 << 20));
        assert_eq!(night.limit_at(&Local.with_ymd_and_hms(2026, 12, 6, 3, 0, 0).unwrap()), None);
        assert!(Bandwidth::parse(None, None, None, None).unwrap().is_unlimited());
        assert_eq!(Bandwidth::parse(Some("fast"), None, None, None).unwrap_err().0, "vault.bandwidth");
        assert_eq!(Bandwidth::parse(None, Some("8-18"), None, None).unwrap_err().0, "vault.work-hours");
        assert_eq!(Bandwidth::parse(None, None, None, Some("1MiB")).unwrap_err().0, "vault.work-hours");
    }
}
