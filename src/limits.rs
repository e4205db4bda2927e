//! The descriptor budget: how many connections fit the process's limit
//! on open files, and what is left for listeners; the thread budget; and
//! the expose side's share of the connection slots (`--max-exposed`,
//! `--max-per-peer`) fitted to the cap in force.

use crate::sys;
use crate::warn;

/// Every descriptor the gateway holds apart from connections and
/// listeners, counted one by one (issue 18: the sock_diag sockets and
/// `ip`'s pipes were left out). This headroom is what keeps `stats.json`
/// writable and `ip` runnable when every connection slot is taken.
pub const FD_ITEMS: [(&str, u64); 17] = [
    ("standard streams", 3),
    ("signal pipe", 2),
    ("state directory", 1),
    ("state lock", 1),
    // a write's temporary file and the file read meanwhile (state.json,
    // stats.json, a note, gateway.log)
    ("state files being written or read", 3),
    ("access log", 1),
    ("reserve descriptor (EMFILE)", 1),
    ("daemon health session", 1),
    ("registry socket", 1),
    ("systemd notify socket", 1),
    // NETLINK_SOCK_DIAG: at most sock_diag::MAX_OPEN lookups at once
    ("sock_diag lookups", crate::sys::sock_diag::MAX_OPEN as u64),
    // Command::output: stdin /dev/null, stdout and stderr pipes (2 each),
    // the exec-error pipe (2); one `ip` at a time (the main thread)
    ("ip child: pipes and /dev/null", 7),
    // /proc reads (liveness, thread count, interfaces) on the main thread
    // while a connection thread reads too
    ("/proc and /etc reads", 2),
    ("a command's daemon session (resolve, trust) during an apply", 1),
    // closing::Closer's Info session, open while anything is closing
    ("close poller's daemon session", 1),
    // registry: a lookup's connection to another gateway's socket, or
    // one accepted from another gateway's lookup (main thread)
    ("registry lookup connection", 1),
    ("slack", 1),
];

/// The sum of [`FD_ITEMS`].
pub const FD_HEADROOM: u64 = {
    let mut sum = 0;
    let mut i = 0;
    while i < FD_ITEMS.len() {
        sum += FD_ITEMS[i].1;
        i += 1;
    }
    sum
};

/// Raises the descriptor limit as far as allowed and returns the
/// `--max-conns` that fits it (2 descriptors per slot: a forwarded
/// connection's client and daemon session, an exposed connection's local
/// socket, or an exposure's daemon session; see `gateway::ExposedSlots`), with a
/// warning when that is lower than asked, and the descriptors left for
/// listeners (one each).
///
/// The rule for listeners: the cap is fitted around the listeners of the
/// mappings given at start; whatever the limit leaves beyond the cap and
/// the headroom is room for listeners, which every mapping brought up
/// later (`map`) must find, or it is refused (see
/// `Gateway::check_listener_room`). So a later `map` never eats the
/// descriptors of the slots or the headroom.
pub fn fit_max_conns(
    max_conns: usize,
    ports: usize,
    mappings: usize,
    warnings: &mut Vec<String>,
) -> (usize, u64) {
    let limit = match sys::proc::raise_nofile_limit() {
        Ok(n) => n,
        Err(e) => {
            warn!("cannot read the descriptor limit: {e}");
            return (max_conns, u64::MAX);
        }
    };
    let room = |conns: u64| limit.saturating_sub(FD_HEADROOM + 2 * conns);
    let listeners = (ports * mappings.max(1)) as u64;
    let fit = (limit.saturating_sub(FD_HEADROOM + listeners) / 2).max(1);
    if fit >= max_conns as u64 {
        return (max_conns, room(max_conns as u64));
    }
    let w = format!(
        "--max-conns {} does not fit the limit of {limit} open files (2 per connection, forwarded or exposed, and per exposure, plus {} for listeners and files): serving at most {fit} at once; raise the limit (ulimit -n, or LimitNOFILE= in systemd) to serve more",
        max_conns,
        FD_HEADROOM + listeners
    );
    warn!("{w}");
    warnings.push(w);
    (fit as usize, room(fit))
}

/// Threads the gateway runs apart from connections and listeners: the
/// main thread, the access-log writer, the daemon health thread, the close
/// poller, and slack for an exposure's session reader and short-lived
/// helpers.
pub const THREAD_HEADROOM: u64 = 8;
/// How many processes [`fit_threads`] looks at, at most.
const PROC_SCAN: usize = 65_536;

/// What [`fit_threads`] found, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Threads {
    /// The RLIMIT_NPROC in force (after lowering it to the user's own).
    pub limit: Option<u64>,
    /// Threads the user's other processes ran at start.
    pub others: u64,
    /// The `--max-conns` that fits (`None`: no limit applies).
    pub fit: Option<usize>,
}

/// RLIMIT_NPROC counts every thread of a uid, ours included, against the
/// limit of the process that starts a thread (uid 0 is exempt). A gateway
/// switched from root kept root's limit while its threads count against
/// its user's; so here, running as `uid`: our limit is lowered to the
/// user's own (the lowest soft limit among their processes, the daemon's
/// among them), and `--max-conns` to what fits beside the threads those
/// processes run (2 threads per connection, 1 per listener, plus
/// [`THREAD_HEADROOM`]), with a warning, as for descriptors.
pub fn fit_threads(
    max_conns: usize,
    listeners: u64,
    uid: u32,
    warnings: &mut Vec<String>,
) -> (usize, Threads) {
    if uid == 0 || !cfg!(target_os = "linux") {
        return (max_conns, Threads::default());
    }
    let (others, theirs) = sys::proc::user_threads_and_nproc(uid, PROC_SCAN);
    let limit = match sys::proc::lower_nproc_limit(theirs) {
        Ok(l) => l,
        Err(e) => {
            warn!("cannot read the process limit: {e}");
            return (max_conns, Threads::default());
        }
    };
    let Some(limit) = limit else {
        return (
            max_conns,
            Threads {
                limit,
                others,
                fit: None,
            },
        );
    };
    let fit = (limit.saturating_sub(others + THREAD_HEADROOM + listeners) / 2).max(1) as usize;
    if fit < max_conns {
        let w = format!(
            "--max-conns {max_conns} does not fit the process limit (RLIMIT_NPROC, ulimit -u) of {limit} threads for uid {uid}, who runs {others} already (2 per connection, plus {} for listeners and the gateway's own): serving at most {fit} at once; raise that user's limit (limits.conf, or LimitNPROC= in systemd) to serve more",
            THREAD_HEADROOM + listeners
        );
        warn!("{w}");
        warnings.push(w);
    }
    (
        max_conns.min(fit),
        Threads {
            limit: Some(limit),
            others,
            fit: Some(fit),
        },
    )
}

/// The expose side's share of `--max-conns` when `--max-exposed` is not
/// given: half. Overlay peers (anyone the daemon lets dial this node) can
/// then never hold more than half of the slots, so local clients keep at
/// least the other half; and an exposure still gets half the budget
/// without any tuning, which serves a gateway used mostly to expose.
pub const DEFAULT_EXPOSED_SHARE: usize = 2;
/// `--max-per-peer` when not given: a tenth of `--max-exposed` (at least
/// 1), so one peer node holds at most a tenth of what peers may hold:
/// at least ten distinct nodes are needed to fill the expose side, while
/// one peer still gets ample concurrency (50 with the default 1000 slots).
pub const DEFAULT_PER_PEER_SHARE: usize = 10;

/// The expose side's budgets in force: `--max-exposed` and `--max-per-peer`
/// as asked (`None`: the defaults, from the cap in force), fitted to the
/// `--max-conns` in force (`max_conns`, which the descriptor and thread
/// limits may have lowered from `requested`). An explicit `--max-exposed`
/// keeps its proportion of the cap (at least 1), so the map side keeps
/// its share too; `--max-per-peer` never exceeds `--max-exposed`.
pub fn fit_exposed(
    max_conns: usize,
    requested: usize,
    max_exposed: Option<usize>,
    max_per_peer: Option<usize>,
) -> (usize, usize) {
    let exposed = match max_exposed {
        None => max_conns / DEFAULT_EXPOSED_SHARE,
        Some(e) if max_conns >= requested => e,
        Some(e) => (e as u128 * max_conns as u128 / requested.max(1) as u128) as usize,
    }
    .clamp(1, max_conns.max(1));
    let per_peer = max_per_peer
        .unwrap_or(exposed / DEFAULT_PER_PEER_SHARE)
        .clamp(1, exposed);
    (exposed, per_peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headroom_counts_every_descriptor_kind() {
        let names: Vec<&str> = FD_ITEMS.iter().map(|(n, _)| *n).collect();
        for kind in [
            "sock_diag lookups",
            "ip child: pipes and /dev/null",
            "registry socket",
            "registry lookup connection",
            "close poller's daemon session",
            "access log",
        ] {
            assert!(names.contains(&kind), "{kind} is not counted");
        }
        let diag = FD_ITEMS
            .iter()
            .find(|(n, _)| *n == "sock_diag lookups")
            .map(|x| x.1);
        assert_eq!(diag, Some(sys::sock_diag::MAX_OPEN as u64));
        assert_eq!(FD_HEADROOM, FD_ITEMS.iter().map(|x| x.1).sum::<u64>());
    }

    #[test]
    fn exposed_budgets_default_to_shares_and_follow_a_lowered_cap() {
        assert_eq!(fit_exposed(1000, 1000, None, None), (500, 50));
        assert_eq!(fit_exposed(10, 10, None, None), (5, 1));
        assert_eq!(fit_exposed(1, 1, None, None), (1, 1));
        assert_eq!(fit_exposed(1000, 1000, Some(800), Some(3)), (800, 3));
        // Lowered from 1000 to 100: the defaults follow the cap in force,
        // an explicit share keeps its proportion, the per-peer cap stays
        // within it.
        assert_eq!(fit_exposed(100, 1000, None, None), (50, 5));
        assert_eq!(fit_exposed(100, 1000, Some(800), Some(300)), (80, 80));
        assert_eq!(fit_exposed(100, 1000, Some(1), None), (1, 1));
        assert_eq!(fit_exposed(3, 1_000_000, Some(1_000_000), Some(7)), (3, 3));
    }
}
