//! A migration a database has applied must never change: sqlx keeps each applied migration's
//! checksum and refuses to start a server whose file differs ("was previously applied but has
//! been modified"), so an edited migration takes every replica of the next release down on a
//! database the last release migrated, even for a comment. `deploy/migrations.sha384` records
//! each migration's checksum when it is written; changing what a migration does means writing
//! a new one.

use std::{collections::BTreeMap, fs};

use sqlx::migrate::Migrator;

use super::repo;

const LOCK: &str = "deploy/migrations.sha384";

/// The same files the server embeds (`src/store/postgres`).
static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn recorded() -> BTreeMap<i64, String> {
    let text = fs::read_to_string(repo().join(LOCK)).expect("read the migration lock");
    text.lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (version, checksum) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("{LOCK}: `{line}` is not `version checksum`"));
            let version = version
                .parse()
                .unwrap_or_else(|_| panic!("{LOCK}: bad version in `{line}`"));
            (version, checksum.trim().to_owned())
        })
        .collect()
}

#[test]
fn no_migration_changes_once_it_is_written() {
    let recorded = recorded();
    let mut problems = Vec::new();
    for migration in MIGRATOR.iter() {
        let actual = hex(&migration.checksum);
        match recorded.get(&migration.version) {
            None => problems.push(format!(
                "migration {} ({}) is not in {LOCK}: add the line `{} {actual}`",
                migration.version, migration.description, migration.version
            )),
            Some(expected) if *expected != actual => problems.push(format!(
                "migration {} ({}) differs from the one recorded in {LOCK}: a database that \
                 applied it refuses the new file; put the change in a new migration",
                migration.version, migration.description
            )),
            Some(_) => {}
        }
    }
    for version in recorded.keys() {
        if !MIGRATOR.iter().any(|m| m.version == *version) {
            problems.push(format!(
                "{LOCK} records migration {version}, which no longer exists"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
