//! The descriptor budget: how many connections fit the process's limit
//! on open files, and what is left for listeners.

use crate::sys;
use crate::warn;

/// Descriptors kept apart from connections: standard streams, the signal
/// pipe, the lock, state and counters files being written, the access log,
/// the reserve descriptor, a daemon health session, and slack. Listeners
/// come on top. This headroom is what keeps `stats.json` writable when
/// every connection slot is taken.
const FD_HEADROOM: u64 = 32;

/// Raises the descriptor limit as far as allowed and returns the
/// `--max-conns` that fits it (2 descriptors per slot: a forwarded
/// connection's client and daemon session, an exposed connection's local
/// socket, or an exposure's daemon session; see `gateway::SharedSlots`), with a
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
