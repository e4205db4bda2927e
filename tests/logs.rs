//! Logs an operator can use: the access log (one line per finished
//! connection, text or JSON, reopened on SIGUSR1) and the event log.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use pilot_gateway::json::{self, Value};

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn access_log_records_every_outcome_and_reopens_on_sigusr1() {
    netns();
    let dir = TempDir::new("access");
    let _svc = Service::start(8080, echo_once);
    let devd = Devd::start(
        &dir,
        &["--route", "0:0000.0000.0004=127.0.0.1", "--untrusted", A5],
    );
    let gw = Gw::new(&dir, &devd.socket);
    let log = dir.path("access.log");
    let p = gw.foreground(
        &dir,
        &[
            "--ports",
            "8080",
            "--max-conns",
            "1",
            "--idle-timeout",
            "1",
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-format",
            "json",
            A4,
            A5,
        ],
    );
    let settle = || {
        let idle = || {
            let out = gw.ok(&["--json", "status"]);
            json::parse(out.trim())
                .unwrap()
                .get("data")
                .unwrap()
                .get("active")
                .and_then(Value::as_u64)
                == Some(0)
        };
        assert!(wait_until(Duration::from_secs(5), idle));
    };
    assert!(short_exchange("10.4.0.1:8080"));
    settle();
    assert!(
        reset_soon("10.4.0.2:8080", Duration::from_secs(2)),
        "untrusted: dial fails"
    );
    settle();
    // Hold the only slot with a silent client; the next one is refused.
    let mut held = connect("10.4.0.1:8080");
    std::thread::sleep(Duration::from_millis(200));
    assert!(reset_soon("10.4.0.1:8080", Duration::from_secs(2)));
    assert!(sees_reset(&mut held, Duration::from_secs(5)), "idle limit");
    let want = ["ok", "dial_failed", "refused", "reset"];
    assert!(
        wait_until(Duration::from_secs(5), || lines(&log).len() >= 4),
        "{:?}",
        lines(&log)
    );
    let entries: Vec<Value> = lines(&log).iter().map(|l| json::parse(l).unwrap()).collect();
    let outcomes: Vec<&str> = entries
        .iter()
        .map(|e| e.get("outcome").and_then(Value::as_str).unwrap())
        .collect();
    for w in want {
        assert!(
            outcomes.contains(&w)
                || (w == "reset" && outcomes.contains(&"idle_timeout"))
                // The client closes right after its reply, racing the
                // agent's close: either is a normal end.
                || (w == "ok" && outcomes.contains(&"client_closed")),
            "{w} in {outcomes:?}"
        );
    }
    let ok = entries
        .iter()
        .find(|e| {
            matches!(
                e.get("outcome").and_then(Value::as_str),
                Some("ok" | "client_closed")
            )
        })
        .unwrap();
    for k in [
        "time",
        "client",
        "local_ip",
        "port",
        "pilot_addr",
        "bytes_up",
        "bytes_down",
        "duration_ms",
    ] {
        assert!(ok.get(k).is_some(), "{k} in {ok}");
    }
    assert_eq!(ok.get("bytes_up").and_then(Value::as_u64), Some(5));
    assert_eq!(ok.get("bytes_down").and_then(Value::as_u64), Some(5));
    let failed = entries
        .iter()
        .find(|e| e.get("outcome").and_then(Value::as_str) == Some("dial_failed"))
        .unwrap();
    assert!(
        failed
            .get("reason")
            .and_then(Value::as_str)
            .unwrap()
            .contains("trust"),
        "{failed}"
    );
    // Rotation: move the file away, SIGUSR1, and the next line goes to a new file.
    let rotated = dir.path("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let before = lines(&rotated).len();
    assert!(before >= 4, "{:?}", lines(&rotated));
    p.signal(libc::SIGUSR1);
    // The signal is taken by the gateway's signal thread, the file reopened
    // before the next line: exchanges until one lands in the new file
    // (bounded), since a loaded machine may take a while to do the first.
    let mut made = 0;
    let reopened = wait_until(Duration::from_secs(10), || {
        if made < 20 && lines(&log).is_empty() {
            assert!(short_exchange("10.4.0.1:8080"));
            made += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        !lines(&log).is_empty()
    });
    assert!(reopened, "no line in the reopened file after {made} exchanges");
    // Every line went to one file or the other, none was lost.
    assert!(
        wait_until(Duration::from_secs(5), || lines(&log).len()
            + lines(&rotated).len()
            == before + made),
        "{made} exchanges: {:?} / {:?}",
        lines(&log),
        lines(&rotated)
    );
}

#[test]
fn text_access_log_and_event_log_lines() {
    netns();
    let dir = TempDir::new("textlog");
    let _svc = Service::start(8080, echo_once);
    let devd = Devd::start(&dir, &["--route", "0:0000.0000.0004=127.0.0.1"]);
    let gw = Gw::new(&dir, &devd.socket);
    let _p = gw.foreground(
        &dir,
        &[
            "--ports",
            "8080",
            "--access-log",
            "-",
            "--log-level",
            "info",
            A4,
            A6,
        ],
    );
    let mut s = connect("10.4.0.1:8080");
    s.write_all(b"abc").unwrap();
    let mut b = Vec::new();
    s.read_to_end(&mut b).unwrap();
    assert!(reset_soon("10.4.0.2:8080", Duration::from_secs(2)));
    let stderr = || std::fs::read_to_string(dir.path("gateway.log")).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(5), || stderr()
        .contains("outcome=ok")
        && stderr().contains("outcome=dial_failed")));
    let log = stderr();
    let ok = log.lines().find(|l| l.contains("outcome=ok")).unwrap();
    for part in [
        "client=10.4.0.1:",
        "local=10.4.0.1:8080",
        "pilot=0:0000.0000.0004:8080",
        "up=3",
        "down=3",
        "duration_ms=",
    ] {
        assert!(ok.contains(part), "{part} in {ok}");
    }
    // The event log: startup, mappings, the failed dial with the daemon's reason.
    for part in [
        "INFO  mapped 10.4.0.1 → 0:0000.0000.0004",
        "gateway running",
        "WARN  dial 0:0000.0000.0006 port 8080",
        "registry",
    ] {
        assert!(log.contains(part), "{part} in {log}");
    }
}
