//! The set of workflows `serve` runs, and how a reload replaces it: a file that
//! fails validation keeps its last good version, a name belongs to the file that
//! had it first, and the new set is built whole before it is swapped in.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::store::{Millis, now_millis, rfc3339};
use crate::workflow::{self, Diagnostic, Loaded};

/// One workflow in the set.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The loaded (current or last good) version.
    pub loaded: Arc<Loaded>,
    /// When this version was loaded.
    pub loaded_at: Millis,
    /// The current load error of its file, when the last good version is kept.
    pub error: Option<String>,
}

/// What a reload changed, one per workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new workflow.
    Added {
        /// Name.
        name: String,
        /// Version hash.
        hash: String,
    },
    /// A new version of a workflow.
    Changed {
        /// Name.
        name: String,
        /// The previous version hash.
        from: String,
        /// The new version hash.
        to: String,
    },
    /// A workflow whose file is gone (or lost its name).
    Removed {
        /// Name.
        name: String,
        /// The version that stopped taking new runs.
        hash: String,
    },
    /// A file that failed; its workflow keeps the last good version.
    KeptLastGood {
        /// Name.
        name: String,
        /// The version still running.
        hash: String,
    },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |h: &str| h.chars().take(12).collect::<String>();
        match self {
            Change::Added { name, hash } => {
                write!(f, "workflow `{name}` added (version {})", short(hash))
            }
            Change::Changed { name, from, to } => {
                write!(
                    f,
                    "workflow `{name}` changed (version {} → {})",
                    short(from),
                    short(to)
                )
            }
            Change::Removed { name, hash } => {
                write!(f, "workflow `{name}` removed (version {})", short(hash))
            }
            Change::KeptLastGood { name, hash } => write!(
                f,
                "workflow `{name}` failed to load; keeping its last good version {}",
                short(hash)
            ),
        }
    }
}

/// The workflows currently loaded.
#[derive(Debug, Default)]
pub struct Registry {
    /// Every workflow, current or last good, in file order.
    pub entries: Vec<Entry>,
    /// Event name → enabled workflows triggered by it.
    pub by_event: HashMap<String, Vec<Arc<Loaded>>>,
    /// Enabled workflows with a schedule.
    pub schedules: Vec<Arc<Loaded>>,
    /// Every error from the last load, located.
    pub errors: Vec<Diagnostic>,
    /// Files that failed with no last good version to keep: file → first error.
    pub failed_files: Vec<(String, String)>,
}

/// A workflow as `GET /workflows` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowView {
    /// Name (absent for a file that never loaded).
    pub name: Option<String>,
    /// The file.
    pub file: String,
    /// Version hash of the version running.
    pub version: Option<String>,
    /// Whether it takes new runs.
    pub enabled: bool,
    /// Its trigger: `event:NAME` or `schedule:CRON`.
    pub trigger: Option<String>,
    /// When the running version was loaded (RFC 3339).
    pub loaded_at: Option<String>,
    /// The file's current load error, if any.
    pub error: Option<String>,
}

impl Registry {
    /// Loads every workflow under `dir`.
    pub fn load(dir: &Path) -> workflow::Result<Self> {
        Ok(Self::reload(&Registry::default(), dir)?.0)
    }

    /// Builds the next set from `dir`, keeping last good versions from `prev`.
    pub fn reload(prev: &Registry, dir: &Path) -> workflow::Result<(Self, Vec<Change>)> {
        let files = workflow::discover(&[dir.to_path_buf()])?;
        let mut results = Vec::with_capacity(files.len());
        for path in &files {
            // A file deleted between listing and reading is simply gone.
            match workflow::load_file(path) {
                Ok(r) => results.push((path.display().to_string(), r)),
                Err(e) => tracing::debug!("{e}"),
            }
        }
        Ok(Self::merge(prev, results, now_millis()))
    }

    /// Merges per-file load results into the next set.
    pub fn merge(
        prev: &Registry,
        results: Vec<(String, Result<Loaded, Vec<Diagnostic>>)>,
        now: Millis,
    ) -> (Self, Vec<Change>) {
        let prev_by_file: HashMap<&str, &Entry> = prev
            .entries
            .iter()
            .map(|e| (e.loaded.file.as_str(), e))
            .collect();
        let prev_owner: HashMap<&str, &str> = prev
            .entries
            .iter()
            .map(|e| (e.loaded.workflow.name.as_str(), e.loaded.file.as_str()))
            .collect();

        let mut errors = Vec::new();
        let mut failed_files = Vec::new();
        // Candidates: a fresh version, or the last good one of a file that now fails.
        let mut candidates: Vec<Entry> = Vec::new();
        for (file, result) in results {
            match result {
                Ok(loaded) => {
                    let loaded_at = prev_by_file
                        .get(file.as_str())
                        .filter(|e| e.loaded.hash == loaded.hash)
                        .map_or(now, |e| e.loaded_at);
                    candidates.push(Entry {
                        loaded: Arc::new(loaded),
                        loaded_at,
                        error: None,
                    });
                }
                Err(diags) => {
                    let first = diags
                        .first()
                        .map(|d| format!("{}:{}:{}: {}", d.file, d.line, d.column, d.message));
                    let first = first.unwrap_or_else(|| "the file failed to load".to_owned());
                    match prev_by_file.get(file.as_str()) {
                        Some(old) => candidates.push(Entry {
                            error: Some(first),
                            ..(*old).clone()
                        }),
                        None => failed_files.push((file.clone(), first)),
                    }
                    errors.extend(diags);
                }
            }
        }

        // The file that had a name before keeps it; otherwise the first in file order.
        let keeps = |e: &Entry| {
            prev_owner.get(e.loaded.workflow.name.as_str()) == Some(&e.loaded.file.as_str())
        };
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by_key(|&i| !keeps(&candidates[i]));
        let mut taken: HashMap<String, String> = HashMap::new();
        let mut accepted = vec![false; candidates.len()];
        for i in order {
            let c = &candidates[i];
            let name = &c.loaded.workflow.name;
            if let Some(owner) = taken.get(name) {
                let d = workflow::duplicate_name(&c.loaded, owner);
                failed_files.push((c.loaded.file.clone(), d.message.clone()));
                errors.push(d);
            } else {
                taken.insert(name.clone(), c.loaded.file.clone());
                accepted[i] = true;
            }
        }
        let entries: Vec<Entry> = candidates
            .into_iter()
            .zip(accepted)
            .filter_map(|(c, ok)| ok.then_some(c))
            .collect();

        let mut changes = Vec::new();
        let prev_by_name: HashMap<&str, &Entry> = prev
            .entries
            .iter()
            .map(|e| (e.loaded.workflow.name.as_str(), e))
            .collect();
        let mut seen = HashSet::new();
        for e in &entries {
            let name = e.loaded.workflow.name.clone();
            seen.insert(name.clone());
            let hash = e.loaded.hash.clone();
            match prev_by_name.get(name.as_str()) {
                None => changes.push(Change::Added { name, hash }),
                Some(old) if old.loaded.hash != hash => changes.push(Change::Changed {
                    name,
                    from: old.loaded.hash.clone(),
                    to: hash,
                }),
                // Said once when the file breaks, not at every reload while it stays broken.
                Some(old) if e.error.is_some() && old.error.is_none() => {
                    changes.push(Change::KeptLastGood { name, hash });
                }
                Some(_) => {}
            }
        }
        for old in &prev.entries {
            if !seen.contains(&old.loaded.workflow.name) {
                changes.push(Change::Removed {
                    name: old.loaded.workflow.name.clone(),
                    hash: old.loaded.hash.clone(),
                });
            }
        }

        let mut by_event: HashMap<String, Vec<Arc<Loaded>>> = HashMap::new();
        let mut schedules = Vec::new();
        for e in &entries {
            let wf = &e.loaded.workflow;
            if !wf.enabled {
                continue;
            }
            if let Some(event) = &wf.trigger.event {
                by_event
                    .entry(event.clone())
                    .or_default()
                    .push(Arc::clone(&e.loaded));
            }
            if wf.trigger.schedule.is_some() {
                schedules.push(Arc::clone(&e.loaded));
            }
        }
        let registry = Registry {
            entries,
            by_event,
            schedules,
            errors,
            failed_files,
        };
        (registry, changes)
    }

    /// Every workflow and every failing file, for `GET /workflows`.
    pub fn view(&self) -> Vec<WorkflowView> {
        let mut out: Vec<WorkflowView> = self
            .entries
            .iter()
            .map(|e| {
                let wf = &e.loaded.workflow;
                WorkflowView {
                    name: Some(wf.name.clone()),
                    file: e.loaded.file.clone(),
                    version: Some(e.loaded.hash.clone()),
                    enabled: wf.enabled,
                    trigger: wf
                        .trigger
                        .event
                        .as_ref()
                        .map(|ev| format!("event:{ev}"))
                        .or_else(|| {
                            wf.trigger
                                .schedule
                                .as_ref()
                                .map(|s| format!("schedule:{s}"))
                        }),
                    loaded_at: Some(rfc3339(e.loaded_at)),
                    error: e.error.clone(),
                }
            })
            .collect();
        for (file, error) in &self.failed_files {
            out.push(WorkflowView {
                name: None,
                file: file.clone(),
                version: None,
                enabled: false,
                trigger: None,
                loaded_at: None,
                error: Some(error.clone()),
            });
        }
        out.sort_by(|a, b| a.file.cmp(&b.file));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(file: &str, name: &str, msg: &str) -> (String, Result<Loaded, Vec<Diagnostic>>) {
        let src = format!("name: {name}\ntrigger:\n  event: e\nactions:\n  - log: {msg}\n");
        (file.to_owned(), workflow::load_str(file, &src))
    }

    fn broken(file: &str) -> (String, Result<Loaded, Vec<Diagnostic>>) {
        (file.to_owned(), workflow::load_str(file, "name: [oops\n"))
    }

    #[test]
    fn a_broken_file_keeps_its_last_good_version() {
        let (r1, c1) = Registry::merge(&Registry::default(), vec![wf("a.yaml", "a", "one")], 1);
        assert_eq!(c1.len(), 1);
        let hash = r1.entries[0].loaded.hash.clone();
        let (r2, c2) = Registry::merge(&r1, vec![broken("a.yaml")], 2);
        assert_eq!(r2.entries.len(), 1);
        assert_eq!(r2.entries[0].loaded.hash, hash);
        assert!(r2.entries[0].error.is_some());
        assert_eq!(r2.by_event["e"].len(), 1);
        assert_eq!(
            c2,
            vec![Change::KeptLastGood {
                name: "a".into(),
                hash
            }]
        );
    }

    #[test]
    fn the_file_that_had_a_name_keeps_it() {
        let (r1, _) = Registry::merge(&Registry::default(), vec![wf("b.yaml", "same", "b")], 1);
        // a.yaml sorts first but arrived later: b.yaml keeps the name.
        let (r2, _) = Registry::merge(
            &r1,
            vec![wf("a.yaml", "same", "a"), wf("b.yaml", "same", "b")],
            2,
        );
        assert_eq!(r2.entries.len(), 1);
        assert_eq!(r2.entries[0].loaded.file, "b.yaml");
        assert_eq!(r2.failed_files[0].0, "a.yaml");
    }

    #[test]
    fn deleted_files_are_removed_and_changes_are_reported() {
        let (r1, _) = Registry::merge(
            &Registry::default(),
            vec![wf("a.yaml", "a", "one"), wf("b.yaml", "b", "x")],
            1,
        );
        let (r2, changes) = Registry::merge(&r1, vec![wf("a.yaml", "a", "two")], 2);
        assert_eq!(r2.entries.len(), 1);
        assert!(matches!(&changes[0], Change::Changed { name, .. } if name == "a"));
        assert!(matches!(&changes[1], Change::Removed { name, .. } if name == "b"));
        assert_eq!(r2.entries[0].loaded_at, 2);
    }
}
