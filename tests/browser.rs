//! The upstream docs' "multi-agent dashboard", as a person would use it: a
//! page served by agent 1 whose script fetches JSON from agent 2, both
//! reached through the gateway, rendered by headless Chromium.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";

const PAGE: &str = r#"<!doctype html>
<html><head><title>fleet dashboard</title></head>
<body>
<h1>Fleet dashboard</h1>
<div id="status">loading</div>
<script>
fetch("http://10.4.0.2/status.json")
  .then(r => r.json())
  .then(s => {
    document.getElementById("status").textContent =
      "agent " + s.agent + " reports " + s.temperature + " degrees, " + s.jobs + " jobs";
  })
  .catch(e => { document.getElementById("status").textContent = "failed: " + e; });
</script>
</body></html>
"#;

/// Reads an HTTP request head and answers with `body` of `kind`.
fn respond(mut c: TcpStream, kind: &str, body: &str) {
    let mut req = Vec::new();
    let mut buf = [0u8; 2048];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let _ = write!(
        c,
        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn dashboard(c: TcpStream) {
    respond(c, "text/html; charset=utf-8", PAGE);
}

fn status(c: TcpStream) {
    respond(
        c,
        "application/json",
        r#"{"agent":"0:0000.0000.0005","temperature":21.5,"jobs":3}"#,
    );
}

#[test]
fn a_dashboard_on_one_agent_shows_data_from_another() {
    if !std::path::Path::new(CHROMIUM).exists() {
        if std::env::var_os("PILOT_GATEWAY_SKIP_BROWSER").is_some() {
            eprintln!("skipped: {CHROMIUM} is not installed (PILOT_GATEWAY_SKIP_BROWSER is set)");
            return;
        }
        panic!("{CHROMIUM} is missing: install Debian's chromium package (.ci/run does), or set PILOT_GATEWAY_SKIP_BROWSER=1");
    }
    netns();
    let dir = TempDir::new("browser");
    let _page = Service::start(8081, dashboard);
    let _data = Service::start(8082, status);
    let devd = Devd::start(
        &dir,
        &[
            "--route",
            "0:0000.0000.0004:80=127.0.0.1:8081",
            "--route",
            "0:0000.0000.0005:80=127.0.0.1:8082",
        ],
    );
    let gw = Gw::new(&dir, &devd.socket);
    let _p = gw.foreground(&dir, &["--ports", "80", A4, A5]);
    let profile = dir.path("chromium-profile");
    let mut c = Command::new(CHROMIUM);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--no-first-run",
        "--virtual-time-budget=10000",
        "--dump-dom",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg("http://10.4.0.1/")
    .stdout(Stdio::piped());
    let mut browser = Proc::spawn(&mut c, dir.path("chromium.log"));
    let mut dom = String::new();
    let mut out = browser.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = out.read_to_string(&mut dom);
        dom
    });
    let start = Instant::now();
    let status = browser.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some(),
        "chromium did not finish within 60 s: {}",
        browser.stderr()
    );
    let dom = reader.join().unwrap();
    assert!(
        dom.contains("Fleet dashboard"),
        "the page came through agent 1 ({:?}): {dom}",
        start.elapsed()
    );
    assert!(
        dom.contains("agent 0:0000.0000.0005 reports 21.5 degrees, 3 jobs"),
        "the script's fetch through agent 2 rendered: {dom}"
    );
    let list = gw.ok(&["list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with("10.4.0.2 → 0:0000.0000.0005"))
        .unwrap_or_default();
    assert!(
        !row.contains("total 0"),
        "agent 2 was reached through the gateway: {list}"
    );
}
