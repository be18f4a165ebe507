//! Reading what is stored and what is here: `versions`, `items`, `components`.

use super::{Context, Outcome};
use crate::output::{bytes, print_json};
use serde_json::json;
use sysstate_engine::ops::read;
use sysstate_engine::Result;

pub fn versions(context: &Context<'_>, filter: &sysstate_repo::forget::Filter) -> Result<Outcome> {
    let repo = context.open(None)?;
    let protected = repo.protected()?;
    super::require_known_components(&context.config, &repo, &filter.components)?;
    let versions: Vec<_> = read::versions(&repo)?.into_iter().filter(|(_, v)| filter.matches(v)).collect();
    if context.json() {
        let list: Vec<_> = versions
            .iter()
            .map(|(id, v)| {
                let mut value = serde_json::to_value(v).expect("versions encode");
                value["id"] = json!(id.to_hex());
                value["time"] = json!(sysstate_types::time::format_utc(v.time_ns));
                value["protected"] = json!(protected.contains(id));
                value
            })
            .collect();
        print_json(&json!(list));
        return Ok(context.outcome());
    }
    crate::outln!("{:<10} {:<21} {:<16} {:>10}  components", "version", "time (UTC)", "host", "size");
    for (id, v) in &versions {
        let names: Vec<_> = v.components.iter().map(|c| c.name.as_str()).collect();
        crate::outln!(
            "{:<10} {:<21} {:<16} {:>10}  {}{}",
            id.short(),
            sysstate_types::time::format_utc(v.time_ns),
            v.host,
            bytes(v.stats.bytes_total),
            names.join(", "),
            if protected.contains(id) { "  (protected)" } else { "" }
        );
    }
    Ok(context.outcome())
}

pub fn items(context: &Context<'_>, version: &str, components: &[String]) -> Result<Outcome> {
    let repo = context.open(None)?;
    super::require_known_components(&context.config, &repo, components)?;
    let items = read::items(&repo, version, components)?;
    if context.json() {
        print_json(&serde_json::to_value(&items).expect("items encode"));
        return Ok(context.outcome());
    }
    for component in &items.components {
        crate::outln!("component {}: {}", component.name, component.paths.join(", "));
    }
    for entry in &items.entries {
        crate::outln!(
            "{} {:>6o} {:>5}:{:<5} {:>10} {}",
            entry.kind,
            entry.mode,
            entry.uid,
            entry.gid,
            entry.size,
            entry.path
        );
    }
    Ok(context.outcome())
}

pub fn components(context: &Context<'_>) -> Result<Outcome> {
    let served = sysstate_engine::shadow::served_components(&context.config);
    let report = sysstate_engine::components::report(&context.config, &context.cli.global.root(), &served)?;
    if context.json() {
        print_json(&serde_json::to_value(&report).expect("components encode"));
        return Ok(Outcome::Success);
    }
    for component in &report {
        crate::outln!("{}{}", component.name, if component.builtin { "" } else { " (from the config)" });
        if component.paths.is_empty() {
            crate::outln!("   not on this machine (looked for {})", component.missing.join(", "));
            continue;
        }
        crate::outln!("   paths: {}", component.paths.join(", "));
        crate::outln!(
            "   size: {} in {} files, on {}",
            bytes(component.size),
            component.files,
            component.filesystem.as_deref().unwrap_or("?")
        );
        if !component.writers.is_empty() {
            crate::outln!("   writers: {}", component.writers.join(", "));
        }
        crate::outln!("   lock state: {}", component.lock_state);
    }
    Ok(Outcome::Success)
}

/// `sysstate config show`: the effective configuration, as TOML (or JSON).
pub fn config_show(context: &Context<'_>) -> Result<Outcome> {
    let effective = sysstate_engine::effective::effective(&context.config, &sysstate_engine::paths::state_dir())?;
    if context.json() {
        print_json(&serde_json::to_value(&effective).expect("the configuration encodes"));
        return Ok(Outcome::Success);
    }
    let sources = match effective.sources.as_slice() {
        [] => "no config file: the embedded defaults".to_string(),
        files => format!("read from {}", files.join(", ")),
    };
    // The text is a config file that means the same: what is not a key (where it was read
    // from, what is built in) goes into comments.
    let mut value = serde_json::to_value(&effective).expect("the configuration encodes");
    value.as_object_mut().expect("an object").remove("sources");
    let mut built_in = Vec::new();
    for section in ["component", "writer"] {
        for item in value[section].as_array_mut().into_iter().flatten() {
            let item = item.as_object_mut().expect("an object");
            if item.remove("built-in") == Some(serde_json::Value::Bool(true)) {
                built_in.push(format!("{section} `{}`", item["name"].as_str().unwrap_or("")));
            }
        }
    }
    crate::outln!("# the effective configuration ({sources}; defaults filled in)");
    crate::outln!("# built in: {}", built_in.join(", "));
    crate::outln!("{}", toml::to_string_pretty(&value).expect("the configuration encodes as TOML"));
    Ok(Outcome::Success)
}
