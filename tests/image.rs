//! The runtime image built here without a container engine (`scripts/build-image.sh`,
//! the image the real-node test runs) and the Dockerfile's runtime stage define one image:
//! same user, entrypoint, default command, port and binary path, and the content that the
//! Dockerfile's base (distroless `cc`, `nonroot`) brings: glibc and the libraries the binary
//! links, CA certificates, the non-root user, no shell.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::run;

/// What the Dockerfile's last stage says.
#[derive(Debug, Default)]
struct RuntimeStage {
    base: String,
    user: String,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    expose: Vec<String>,
    binary: String,
}

/// `["a", "b"]` (exec form) or `a b` (shell form: refused, the image has no shell).
fn exec_form(line: &str, what: &str) -> Vec<String> {
    serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("{what} must be in exec form (no shell in the image): {e}"))
}

fn runtime_stage(dockerfile: &str) -> RuntimeStage {
    let last = dockerfile
        .rsplit_once("\nFROM ")
        .map(|(_, s)| format!("FROM {s}"))
        .expect("a multi-stage Dockerfile");
    let mut stage = RuntimeStage::default();
    for line in last.lines().map(str::trim) {
        let (instr, rest) = line.split_once(' ').unwrap_or((line, ""));
        match instr {
            "FROM" => stage.base = rest.trim().to_string(),
            "USER" => stage.user = rest.trim().to_string(),
            "ENTRYPOINT" => stage.entrypoint = exec_form(rest, "ENTRYPOINT"),
            "CMD" => stage.cmd = exec_form(rest, "CMD"),
            "EXPOSE" => {
                stage
                    .expose
                    .extend(rest.split_whitespace().map(|p| match p.contains('/') {
                        true => p.to_string(),
                        false => format!("{p}/tcp"),
                    }))
            }
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                if words.iter().any(|w| w.ends_with("grasp-sync")) {
                    stage.binary = words.last().expect("COPY destination").to_string();
                }
            }
            _ => {}
        }
    }
    stage
}

/// The image's OCI config (`config` object) and its index annotations.
fn image_config(layout: &Path) -> (Value, Value) {
    let read = |p: PathBuf| -> Value {
        serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{p:?}: {e}")))
            .unwrap_or_else(|e| panic!("{p:?}: {e}"))
    };
    let blob = |digest: &Value| {
        let d = digest.as_str().expect("digest");
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index = read(layout.join("index.json"));
    let manifests = index["manifests"].as_array().expect("manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    let manifest = read(blob(&manifests[0]["digest"]));
    let config = read(blob(&manifest["config"]["digest"]));
    (
        config["config"].clone(),
        manifests[0]["annotations"].clone(),
    )
}

#[test]
fn the_built_image_and_the_dockerfile_define_the_same_runtime() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stage = runtime_stage(&std::fs::read_to_string(root.join("Dockerfile")).unwrap());
    assert!(
        stage.base.contains("distroless/cc") && stage.base.ends_with(":nonroot"),
        "the checks below stand for the distroless cc nonroot base; the Dockerfile now says {:?}",
        stage.base
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("image.oci.tar");
    let binary = env!("CARGO_BIN_EXE_grasp-sync");
    run(Command::new(root.join("scripts/build-image.sh"))
        .args(["--binary", binary, "--tag", "0.0.0-test", "--out"])
        .arg(&archive));

    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    let (config, annotations) = image_config(&layout);
    assert_eq!(
        annotations["org.opencontainers.image.ref.name"], "0.0.0-test",
        "the tag `ctr images import --base-name` names the image by"
    );
    assert_eq!(config["User"], stage.user.as_str(), "user");
    assert_eq!(config["Entrypoint"], serde_json::json!(stage.entrypoint));
    assert_eq!(config["Cmd"], serde_json::json!(stage.cmd));
    let ports: Vec<String> = config["ExposedPorts"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(ports, stage.expose, "exposed ports");
    assert_eq!(
        stage.entrypoint.first(),
        Some(&stage.binary),
        "the Dockerfile runs the binary it copies"
    );

    // The files, as a runtime would see them.
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:0.0.0-test", layout.display()))
        .arg(&bundle));
    let rootfs = bundle.join("rootfs");
    let at = |p: &str| rootfs.join(p.trim_start_matches('/'));
    let bin = at(&stage.binary);
    let meta = std::fs::metadata(&bin).unwrap_or_else(|e| panic!("{bin:?}: {e}"));
    assert!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0,
        "the binary is executable"
    );
    let runtime: Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let uid_gid: Vec<&str> = stage.user.split(':').collect();
    assert_eq!(runtime["process"]["user"]["uid"].to_string(), uid_gid[0]);
    assert_eq!(runtime["process"]["user"]["gid"].to_string(), uid_gid[1]);

    // distroless cc: glibc, the loader at the binary's interpreter path, what it links.
    let ldd = run(Command::new("ldd").arg(binary));
    let linked: Vec<&str> = ldd
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some(*path),
                [path, ..] if path.starts_with('/') => Some(*path),
                _ => None,
            }
        })
        .collect();
    assert!(
        linked.iter().any(|l| l.contains("libc.so")),
        "ldd found glibc: {ldd}"
    );
    for lib in &linked {
        assert!(at(lib).exists(), "{lib} (linked by the binary) missing");
    }
    // distroless: CA certificates; nonroot: the user 65532 by that name; no shell.
    let certs = std::fs::read_to_string(at("/etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(
        certs.matches("BEGIN CERTIFICATE").count() > 10,
        "a CA bundle"
    );
    let passwd = std::fs::read_to_string(at("/etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with(&format!("nonroot:x:{}:{}:", uid_gid[0], uid_gid[1]))),
        "the nonroot user: {passwd}"
    );
    for shell in ["/bin/sh", "/bin/bash", "/bin/busybox", "/usr/bin/sh"] {
        assert!(!at(shell).exists(), "{shell} in the image");
    }
    // The binary starts as the image's user with nothing but the image's files.
    let help = run(Command::new("chroot")
        .arg(format!("--userspec={}", stage.user))
        .arg(&rootfs)
        .args(&stage.entrypoint)
        .args(&stage.cmd));
    assert!(help.contains("standalone"), "--help: {help}");
}
