//! `sysstate key list|add|remove|passwd`.

use super::{Context, Outcome};
use crate::cli::KeyCommand;
use crate::output::print_json;
use sysstate_engine::ops::keys;
use sysstate_engine::Result;

pub fn key(context: &Context<'_>, command: &KeyCommand) -> Result<Outcome> {
    let repo = context.open(None)?;
    match command {
        KeyCommand::List => {
            let list = keys::list(&repo)?;
            if context.json() {
                print_json(&serde_json::to_value(&list).expect("keys encode"));
            } else {
                for key in &list {
                    crate::outln!(
                        "{} {:<8} {}@{} {}",
                        if key.current { "*" } else { " " },
                        key.short(),
                        key.user,
                        key.host,
                        key.created
                    );
                }
            }
        }
        KeyCommand::Add { new_passphrase_file } => {
            let name = keys::add(&repo, &crate::passphrase::new(new_passphrase_file.as_deref())?)?;
            context.say(format!("added key {}", keys::short(&name)));
        }
        KeyCommand::Remove { id } => {
            keys::remove(&repo, id)?;
            context.say(format!("removed key {id}"));
        }
        KeyCommand::Passwd { new_passphrase_file } => {
            let passphrase = crate::passphrase::new(new_passphrase_file.as_deref())?;
            let (new, old) = keys::change_passphrase(&repo, &passphrase)?;
            context.say(format!("passphrase changed: key {} replaces {}", keys::short(&new), keys::short(&old)));
        }
    }
    Ok(Outcome::Success)
}

/// `sysstate init`: a new repository, with the passphrase given (asked twice on a terminal) or,
/// when none is, a random key kept in the state directory.
pub fn init(context: &Context<'_>) -> Result<Outcome> {
    let global = &context.cli.global;
    let target = &context.target;
    let (passphrase, generated) =
        crate::passphrase::for_backup(target, global.passphrase_file.as_deref(), global.quiet)?;
    let repo = sysstate_engine::ops::init(target, &passphrase)?;
    let key =
        generated.then(|| sysstate_engine::credentials::settle(target, &sysstate_engine::paths::state_dir())).flatten();
    if context.json() {
        print_json(&serde_json::json!({
            "created": target,
            "id": repo.config().id.to_hex(),
            "key-file": key.as_ref().map(|k| k.display().to_string()),
        }));
        return Ok(Outcome::Success);
    }
    context.say(format!("created a new repository at `{target}` (id {})", repo.config().id.short()));
    if let Some(key) = key {
        crate::passphrase::note_generated_key(target, &key);
    }
    Ok(Outcome::Success)
}
