//! The troubleshooting knowledge base: one entry per error code, kept as data in
//! `knowledge.toml` (symptom, then each cause with the check that tells it apart and its
//! resolution). `docs/errors.md` is generated from it and the code catalogue.

use serde::Deserialize;
use std::sync::OnceLock;
use sysstate_types::{ErrorCode, Level};

/// One cause of an error, how to tell it from the others, and what to do.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cause {
    /// What happened.
    pub cause: String,
    /// What tells this cause apart (what `sysstate doctor` looks at).
    pub tell: String,
    /// What to do.
    pub resolution: String,
}

/// What is known about one error code.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The code's kebab-case name.
    pub code: String,
    /// What the administrator sees.
    pub symptom: String,
    /// Its causes, the likeliest first.
    #[serde(rename = "cause")]
    pub causes: Vec<Cause>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Base {
    entry: Vec<Entry>,
}

/// Every entry, in the file's order.
pub fn entries() -> &'static [Entry] {
    static ENTRIES: OnceLock<Vec<Entry>> = OnceLock::new();
    ENTRIES.get_or_init(|| {
        toml::from_str::<Base>(include_str!("knowledge.toml")).expect("knowledge.toml is valid (tested)").entry
    })
}

/// The entry of `code`.
pub fn entry(code: ErrorCode) -> Option<&'static Entry> {
    entries().iter().find(|e| e.code == code.as_str())
}

/// `docs/errors.md`: the catalogue table, then each code's symptom and causes.
pub fn errors_markdown() -> String {
    let mut out = String::from(
        "# Error codes\n\n\
         Generated from the code catalogue (`crates/sysstate-types/src/code.rs`) and the knowledge base\n\
         (`crates/sysstate-doctor/src/knowledge.toml`); a test fails when this file differs (regenerate\n\
         with `SYSSTATE_UPDATE_DOCS=1 cargo test -p sysstate-doctor`). `sysstate doctor` reads the same\n\
         knowledge base to diagnose failed jobs.\n\n\
         Every failure is printed as `error[CODE]: message`, then `cause:` and `resolution:` lines, and\n\
         ends the command with exit code 2. The message names the object and the culprit; the cause and\n\
         resolution below are the generic ones, replaced by specific ones where the program knows more.\n\n\
         | code | event id | level | cause | resolution |\n|---|---|---|---|---|\n",
    );
    for code in ErrorCode::ALL {
        let level = match code.level() {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        };
        out.push_str(&format!(
            "| `{}` | {} | {level} | {} | {} |\n",
            code.as_str(),
            code.event_id(),
            code.cause(),
            code.resolution()
        ));
    }
    out.push_str("\n## Causes and how to tell them apart\n");
    for code in ErrorCode::ALL {
        let Some(entry) = entry(*code) else { continue };
        out.push_str(&format!("\n### `{}` ({})\n\n{}\n\n", code.as_str(), code.event_id(), entry.symptom));
        for (i, cause) in entry.causes.iter().enumerate() {
            out.push_str(&format!(
                "{}. **{}** How to tell: {} Resolution: {}\n",
                i + 1,
                cause.cause,
                cause.tell,
                cause.resolution
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_entry_with_causes() {
        for code in ErrorCode::ALL {
            let found: Vec<_> = entries().iter().filter(|e| e.code == code.as_str()).collect();
            assert_eq!(found.len(), 1, "{code} needs exactly one entry in knowledge.toml");
            assert!(!found[0].causes.is_empty(), "{code} has no causes");
            assert!(!found[0].symptom.is_empty());
        }
        for entry in entries() {
            assert!(ErrorCode::from_name(&entry.code).is_some(), "knowledge.toml names unknown code {}", entry.code);
        }
    }

    #[test]
    fn docs_errors_md_is_generated_from_the_knowledge_base() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md");
        let generated = errors_markdown();
        if std::env::var_os("SYSSTATE_UPDATE_DOCS").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "docs/errors.md is out of date: run SYSSTATE_UPDATE_DOCS=1 cargo test -p sysstate-doctor"
        );
    }
}
