//! The schema's migrations, embedded in the binary: one list per database,
//! in order, each file as `NNNN_description.sql` under `migrations/`
//! (`postgres/` and `sqlite/` hold the same names).
//!
//! Listed by hand rather than by `sqlx::migrate!`, whose proc-macro crate
//! builds both database drivers a second time for the compiler; a test
//! checks that the lists are the directories and that the migrator is the
//! one `sqlx::migrate!` makes (same versions, descriptions and checksums,
//! so databases migrated by an earlier drover stay valid). A new migration
//! is a new file in each directory and its name in `lists!` here.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};

type Files = &'static [(&'static str, &'static str)];

/// Both databases' lists from one list of names: each migration is a file
/// of the same name in each directory.
macro_rules! lists {
    ($($name:literal),+ $(,)?) => {
        /// Postgres's migrations, in order.
        pub(crate) const POSTGRES: Files =
            &[$(($name, include_str!(concat!("../../migrations/postgres/", $name, ".sql")))),+];
        /// SQLite's migrations, in order.
        pub(crate) const SQLITE: Files =
            &[$(($name, include_str!(concat!("../../migrations/sqlite/", $name, ".sql")))),+];
    };
}

lists!(
    "0001_core",
    "0002_identity_settings",
    "0003_history",
    "0004_rollup_fold",
    "0005_run_queue",
    "0006_run_outcomes",
    "0007_run_outcomes_filters",
    "0008_environments",
    "0009_spec_versions",
    "0010_run_queue_provider",
    "0011_observer_leases",
    "0012_discovery",
    "0013_router_configs",
    "0014_router_configs_at",
    "0015_ui_sessions",
    "0016_drift",
    "0017_run_events_key",
    "0018_run_events_unreferenced",
    "0019_run_queue_in_place",
);

/// The migrator of a list: each file a simple (not reversible) migration,
/// its version the number before the first `_`, its description the rest
/// with `_` as spaces, run in a transaction unless it starts with
/// `-- no-transaction` (as sqlx reads a migrations directory).
pub(crate) fn migrator(files: Files) -> Migrator {
    let migrations = files
        .iter()
        .map(|(stem, sql)| {
            let (version, description) = stem.split_once('_').expect("NNNN_description");
            Migration::new(
                version.parse().expect("a migration's number"),
                Cow::Owned(description.replace('_', " ")),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                sql.starts_with("-- no-transaction"),
            )
        })
        .collect::<Vec<_>>();
    Migrator { migrations: Cow::Owned(migrations), ignore_missing: false, locking: true, no_tx: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(files: Files, dir: &str, made: Migrator) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations").join(dir);
        let mut on_disk: Vec<String> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter_map(|n| n.strip_suffix(".sql").map(str::to_string))
            .collect();
        on_disk.sort();
        let listed: Vec<&str> = files.iter().map(|(stem, _)| *stem).collect();
        assert_eq!(listed, on_disk, "migrations/{dir}: list every file, in order");
        let ours = migrator(files);
        let key =
            |m: &Migration| (m.version, m.description.to_string(), m.checksum.to_vec(), m.no_tx, m.migration_type);
        assert_eq!(ours.iter().map(key).collect::<Vec<_>>(), made.iter().map(key).collect::<Vec<_>>());
        assert_eq!((ours.ignore_missing, ours.locking, ours.no_tx), (made.ignore_missing, made.locking, made.no_tx));
    }

    #[test]
    fn the_lists_are_the_directories_and_what_sqlx_would_make_of_them() {
        same(POSTGRES, "postgres", sqlx::migrate!("../migrations/postgres"));
        same(SQLITE, "sqlite", sqlx::migrate!("../migrations/sqlite"));
    }
}
