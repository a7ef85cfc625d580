//! The layering rule of ARCHITECTURE.md, checked on the source: a room imports only from
//! the rooms below it. `modes` wires processes and may import anything; `controller` and
//! `worker` never import each other; the shared rooms (`store`, `coordination`, `relay`,
//! `observability`) import only the pure ones (`crd`, `nostr`); `nostr` imports nothing of
//! the crate, and neither pure room uses an I/O library.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Room → the rooms it may import from.
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    const SHARED: &[&str] = &["crd", "nostr"];
    const HALF: &[&str] = &[
        "store",
        "coordination",
        "relay",
        "observability",
        "crd",
        "nostr",
    ];
    BTreeMap::from([
        (
            "modes",
            &[
                "controller",
                "worker",
                "store",
                "coordination",
                "relay",
                "observability",
                "crd",
                "nostr",
                "testing",
            ][..],
        ),
        ("controller", HALF),
        ("worker", HALF),
        ("store", SHARED),
        ("coordination", SHARED),
        ("relay", SHARED),
        ("observability", SHARED),
        ("testing", SHARED),
        ("crd", &["nostr"][..]),
        ("nostr", &[][..]),
    ])
}

/// Libraries that do I/O: the pure rooms must not use them.
const IO_CRATES: &[&str] = &[
    "tokio",
    "tokio_tungstenite",
    "reqwest",
    "hyper",
    "hyper_util",
];

/// The crate rooms a source text imports (`crate::room`, `crate::{room, …}`).
fn imported_rooms(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = source;
    while let Some(i) = rest.find("crate::") {
        // `grasp_sync::` never appears inside the library; skip `some_crate::`.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group, up to its closing brace.
            let mut depth = 0;
            let mut name = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        push_name(&mut out, &name);
                        name.clear();
                    }
                    _ if depth == 0 => name.push(c),
                    _ => {}
                }
            }
            push_name(&mut out, &name);
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            push_name(&mut out, &name);
        }
    }
    out
}

fn push_name(out: &mut BTreeSet<String>, segment: &str) {
    let name: String = segment
        .trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !name.is_empty() && name != "self" {
        out.insert(name);
    }
}

/// Code lines of a file (comment lines dropped, so prose may name any room).
fn code(source: &str) -> String {
    source
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source tree") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every violation in the tree under `src`.
fn violations(src: &Path) -> Vec<String> {
    let rules = allowed();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut out = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let room = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_string();
        // The binary's edge (main.rs, cli.rs) and lib.rs sit above every layer.
        let Some(may) = rules.get(room.as_str()) else {
            continue;
        };
        let text = code(&std::fs::read_to_string(&file).expect("readable source"));
        for imported in imported_rooms(&text) {
            if imported != room && !may.contains(&imported.as_str()) {
                out.push(format!(
                    "{}: `{room}` imports `crate::{imported}`",
                    rel.display()
                ));
            }
        }
        if room == "nostr" || room == "crd" {
            for lib in IO_CRATES {
                if text.contains(&format!("{lib}::")) {
                    out.push(format!(
                        "{}: pure room `{room}` uses the I/O library `{lib}`",
                        rel.display()
                    ));
                }
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_room_imports_only_from_the_rooms_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&src);
    assert!(
        found.is_empty(),
        "layering violations (see ARCHITECTURE.md):\n{}",
        found.join("\n")
    );
}

#[test]
fn every_room_of_the_crate_has_a_rule() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rules = allowed();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let room = path.file_name().unwrap().to_str().unwrap().to_string();
            assert!(
                rules.contains_key(room.as_str()),
                "src/{room}/ is a room without a layering rule: add it to ARCHITECTURE.md and here"
            );
        }
    }
}

#[test]
fn the_checker_sees_upward_sideways_and_grouped_imports() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |rel: &str, text: &str| {
        let p = src.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write(
        "controller/a.rs",
        "use crate::worker::status::x;\nuse crate::store::Y;\n",
    );
    write(
        "worker/b.rs",
        "use crate::{nostr::RelayUrl, controller::Z};\n",
    );
    write(
        "nostr/c.rs",
        "use crate::relay::tls;\nfn f() { tokio::spawn(g()); }\n",
    );
    write(
        "relay/d.rs",
        "// crate::worker is named in prose only\nuse crate::nostr::X;\n",
    );
    write("modes/e.rs", "use crate::{controller::A, worker::B};\n");
    assert_eq!(
        violations(src),
        vec![
            "controller/a.rs: `controller` imports `crate::worker`".to_string(),
            "nostr/c.rs: `nostr` imports `crate::relay`".to_string(),
            "nostr/c.rs: pure room `nostr` uses the I/O library `tokio`".to_string(),
            "worker/b.rs: `worker` imports `crate::controller`".to_string(),
        ]
    );
}
