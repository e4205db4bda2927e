//! `make install` honours PREFIX and DESTDIR, installs the static binary
//! (the glibc build with DYNAMIC=1) and the /etc/default example without
//! overwriting one, and `make uninstall` removes exactly what it installed.

mod common;

use std::path::Path;
use std::process::Command;

fn files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn make(stage: &Path, target: &str, extra: &[&str]) {
    let out = Command::new("make")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["--no-print-directory", target, "PREFIX=/opt/pg"])
        .arg(format!("DESTDIR={}", stage.display()))
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_and_uninstall() {
    let host = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
    // Built first (as `make install` would: here it finds it up to date).
    let built = common::static_binary(&host);
    let stage = std::env::temp_dir().join(format!("pgw-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    make(&stage, "install", &[]);
    make(&stage, "install-pilotctl-link", &[]);
    assert_eq!(
        files(&stage),
        [
            "etc/default/pilot-gateway",
            "opt/pg/bin/pilot-gateway",
            "opt/pg/bin/pilotctl",
            "opt/pg/lib/systemd/system/pilot-gateway.service",
            "opt/pg/share/man/man8/pilot-gateway.8",
        ]
    );
    // The static binary, byte for byte.
    let installed = std::fs::read(stage.join("opt/pg/bin/pilot-gateway")).unwrap();
    assert!(
        installed == std::fs::read(&built).unwrap(),
        "not {}",
        built.display()
    );
    let unit =
        std::fs::read_to_string(stage.join("opt/pg/lib/systemd/system/pilot-gateway.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/pg/bin/pilot-gateway start --foreground"),
        "{unit}"
    );
    assert!(!unit.contains("@BINDIR@"));
    let mode = std::fs::metadata(stage.join("opt/pg/bin/pilot-gateway")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o755
    );
    let defaults = stage.join("etc/default/pilot-gateway");
    assert!(std::fs::read_to_string(&defaults)
        .unwrap()
        .contains("PILOT_GATEWAY_ARGS="));
    // An operator's default file survives a new install and uninstall.
    std::fs::write(&defaults, "PILOT_GATEWAY_ARGS=\"--ports 80 0:0000.0000.0004\"\n").unwrap();
    make(&stage, "install", &[]);
    assert_eq!(
        std::fs::read_to_string(&defaults).unwrap(),
        "PILOT_GATEWAY_ARGS=\"--ports 80 0:0000.0000.0004\"\n"
    );
    make(&stage, "uninstall", &[]);
    assert_eq!(files(&stage), ["etc/default/pilot-gateway"]);
    // The unchanged example goes with uninstall; a pilotctl that is not
    // our link stays.
    std::fs::remove_file(&defaults).unwrap();
    make(&stage, "install", &[]);
    make(&stage, "uninstall", &[]);
    assert!(files(&stage).is_empty(), "left behind: {:?}", files(&stage));
    std::fs::write(stage.join("opt/pg/bin/pilotctl"), "someone else's").unwrap();
    make(&stage, "uninstall", &[]);
    assert_eq!(files(&stage), ["opt/pg/bin/pilotctl"]);

    // DYNAMIC=1: the glibc build (here the test build stands in for it).
    let _ = std::fs::remove_dir_all(&stage);
    let gw = env!("CARGO_BIN_EXE_pilot-gateway");
    make(
        &stage,
        "install",
        &["DYNAMIC=1", "CARGO=true", &format!("GATEWAY_BIN={gw}")],
    );
    assert!(std::fs::read(stage.join("opt/pg/bin/pilot-gateway")).unwrap() == std::fs::read(gw).unwrap());
    let _ = std::fs::remove_dir_all(&stage);
}
