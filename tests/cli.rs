//! The binary's surface: `crd` output equals the committed file, and subcommands that are
//! not built yet say so and fail instead of pretending to run.

use std::process::Command;

fn grasp_sync() -> Command {
    Command::new(env!("CARGO_BIN_EXE_grasp-sync"))
}

#[test]
fn crd_output_matches_the_committed_file() {
    let out = grasp_sync().arg("crd").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = include_str!("../deploy/crds/relaysync.yaml");
    assert!(
        generated == committed,
        "deploy/crds/relaysync.yaml is stale: run `cargo run -- crd > deploy/crds/relaysync.yaml`"
    );
}

#[test]
fn unimplemented_subcommands_fail_loudly() {
    let cases: &[&[&str]] = &[
        &[
            "controller",
            "--local-relay",
            "ws://127.0.0.1:1",
            "--service-domain",
            "git.example",
        ],
        &[
            "worker",
            "--name",
            "w0",
            "--local-relay",
            "ws://127.0.0.1:1",
        ],
        &["demo"],
    ];
    for args in cases {
        let out = grasp_sync().args(*args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} exited 0");
        assert!(stderr.contains("not implemented yet"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_lists_every_subcommand_and_env_vars() {
    let out = grasp_sync().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["crd", "controller", "worker", "standalone", "demo"] {
        assert!(help.contains(sub), "--help lacks {sub}:\n{help}");
    }
    let out = grasp_sync().args(["worker", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "POD_NAME",
        "GRASP_SYNC_LOCAL_RELAY",
        "GRASP_SYNC_STATUS_INTERVAL",
    ] {
        assert!(help.contains(var), "worker --help lacks {var}:\n{help}");
    }
}

#[test]
fn invalid_relay_url_flag_names_the_problem() {
    let out = grasp_sync()
        .args([
            "worker",
            "--name",
            "w0",
            "--local-relay",
            "wss://user:pw@relay.example",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--local-relay") && stderr.contains("credentials"),
        "{stderr}"
    );
}
