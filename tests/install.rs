//! `make install` honours PREFIX and DESTDIR, and `make uninstall` removes
//! exactly what it installed.

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

#[test]
fn install_and_uninstall() {
    let stage = std::env::temp_dir().join(format!("pgw-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&stage);
    let make = |target: &str| {
        let out = Command::new("make")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--no-print-directory", target, "PREFIX=/opt/pg", "CARGO=true"])
            .arg(format!("DESTDIR={}", stage.display()))
            .arg(format!("GATEWAY_BIN={}", env!("CARGO_BIN_EXE_pilot-gateway")))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "make {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    make("install");
    make("install-pilotctl-link");
    assert_eq!(
        files(&stage),
        [
            "opt/pg/bin/pilot-gateway",
            "opt/pg/bin/pilotctl",
            "opt/pg/lib/systemd/system/pilot-gateway.service",
            "opt/pg/share/man/man8/pilot-gateway.8",
        ]
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
    // A pilotctl that is not our link is left alone by uninstall.
    make("uninstall");
    assert!(files(&stage).is_empty(), "left behind: {:?}", files(&stage));
    std::fs::write(stage.join("opt/pg/bin/pilotctl"), "someone else's").unwrap();
    make("uninstall");
    assert_eq!(files(&stage), ["opt/pg/bin/pilotctl"]);
    let _ = std::fs::remove_dir_all(&stage);
}
