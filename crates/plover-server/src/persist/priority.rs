//! The store's background threads run at a lower CPU priority than the message path.
//!
//! fjall's worker (memtable flushes and compactions) and our memtable reaper do work that can
//! wait; the shards, the commit thread and the connection tasks cannot. On two cores shared
//! with a load generator, a flush that takes a core for milliseconds made every queue of the
//! message path wait for it: `bench direct --users 200 --rate 5000`, e2e p99 median 6.5 ms with
//! those threads at nice 19 against 12.7 ms at nice 0, three runs each in one sitting
//! (BENCHMARKS.md, "Background threads at low priority"). RocksDB lowers its
//! compaction pool's priority the same way (`Env::LowerThreadPoolCPUPriority`).
//!
//! The nice value is per thread on Linux and inherited by the threads a thread spawns, so
//! fjall's workers get it by being spawned from a thread that lowered its own (fjall starts
//! them when the database opens). Elsewhere nothing is changed: there `nice` applies to the
//! whole process.

/// The nice value of the background threads: the lowest priority. When the cores are idle they
/// run as fast as before; they only yield to the message path.
pub(super) const BACKGROUND_NICE: i32 = 19;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`]. Best effort: a refusal is
/// logged and changes nothing else.
pub(crate) fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        // `nice` adds to the current value; raising it needs no privilege.
        let current = rustix::process::getpriority_process(None).unwrap_or(0);
        let by = BACKGROUND_NICE.saturating_sub(current);
        if by > 0
            && let Err(e) = rustix::process::nice(by)
        {
            tracing::debug!(error = %e, "background thread keeps its priority");
        }
    }
}

/// Runs `f` on a new thread at [`BACKGROUND_NICE`] and returns its result, so that the threads
/// `f` starts inherit that priority while the caller keeps its own. Fails only if the OS
/// refuses a thread.
pub(super) fn spawned_low<T: Send>(f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("plover-open".into())
            .spawn_scoped(scope, move || {
                lower_this_thread();
                f()
            })?;
        Ok(handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    })
}

#[cfg(test)]
#[cfg(target_os = "linux")]
mod tests {
    /// Each thread of this process named `name`: its id and its nice value (`/proc`, field
    /// 19).
    fn nice_of(name: &str) -> Vec<(String, i32)> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            // A thread may end between the listing and this read.
            let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
                continue;
            };
            // Fields after the command's closing parenthesis start at field 3.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let nice: i32 = rest.split(' ').nth(19 - 3).unwrap().parse().unwrap();
            let id = dir.file_name().unwrap().to_string_lossy().into_owned();
            found.push((id, nice));
        }
        found
    }

    #[test]
    fn the_stores_background_threads_run_at_low_priority_and_the_caller_does_not() {
        let dir = tempfile::tempdir().unwrap();
        // Other tests of this process open and close fjall databases of their own at the
        // same time (the reaper's at nice 0): look for threads that appear when this store
        // opens, at the background priority, rather than count them.
        let ids = |name| -> std::collections::HashSet<String> {
            nice_of(name).into_iter().map(|(id, _)| id).collect()
        };
        let appeared_low = |name, before: &std::collections::HashSet<String>| {
            nice_of(name)
                .iter()
                .any(|(id, nice)| !before.contains(id) && *nice == super::BACKGROUND_NICE)
        };
        let (workers, reapers) = (ids("fjall:worker"), ids("plover-reaper"));
        let before = rustix::process::getpriority_process(None).unwrap();
        let store =
            crate::persist::Store::open(dir.path(), crate::config::Durability::Sync).unwrap();
        assert!(appeared_low("fjall:worker", &workers));
        assert!(appeared_low("plover-reaper", &reapers));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
        drop(store);
    }
}
