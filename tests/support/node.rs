//! A real single-node Kubernetes for the end-to-end test: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, a kubelet on containerd/runc with CNI bridge
//! networking, kube-proxy (iptables) and dnsmasq for Service names.
//!
//! Isolation: the test re-runs itself inside new network, mount and PID namespaces
//! ([`isolate`]). Every packet stays on interfaces created there (a bridge carrying
//! [`NODE_IP`], never the machine's own interface); `/run`, `/var/lib` and `/var/log` are
//! fresh tmpfs mounts, so nothing the kubelet, containerd or the CNI plugins write there
//! reaches the machine; the test process is PID 1 of its namespace, so when it ends, however
//! it ends, the kernel kills every process of the node (containers included) and the
//! namespaces, their mounts and iptables chains vanish with them. What lives outside, the
//! parent puts back after the run: the pods' cgroups, and the global kernel settings the
//! kubelet changes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::kube_env::{locate, random_token};
use super::run;

/// The node's address, on a bridge that exists only inside the test's network namespace.
pub const NODE_IP: &str = "10.213.0.1";
pub const NODE_NAME: &str = "grasp-sync-node";
pub const POD_CIDR: &str = "10.244.0.0/24";
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Fully qualified: the CRI rewrites short names to `docker.io/...`.
const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";

const INSIDE: &str = "GRASP_SYNC_NODE_WORKDIR";
const CGROUP: &str = "GRASP_SYNC_NODE_CGROUP";

/// What a test body gets inside the namespaces.
pub struct Inside {
    pub work: PathBuf,
    cgroup: String,
}

/// Outside the namespaces: run `test` (this test binary's test of that name) inside new
/// network, mount and PID namespaces, clean up what lives outside them, and fail if it
/// failed; returns `None`. Inside: returns where to work.
pub fn isolate(test: &str) -> Option<Inside> {
    if let (Some(work), Some(cgroup)) = (std::env::var_os(INSIDE), std::env::var(CGROUP).ok()) {
        return Some(Inside {
            work: PathBuf::from(work),
            cgroup,
        });
    }
    let work = tempfile::Builder::new()
        .prefix("grasp-sync-node-")
        .tempdir()
        .expect("work dir")
        .keep();
    let cgroup = work
        .file_name()
        .and_then(|n| n.to_str())
        .expect("work dir name")
        .to_string();
    assert_eq!(
        Command::new("stat")
            .args(["-fc", "%T", "/sys/fs/cgroup"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        "tmpfs",
        "the real node runs on cgroup v1 hierarchies (/sys/fs/cgroup/<controller>) only"
    );
    // The kubelet sets a few kernel settings that no namespace isolates: put them back.
    let sysctls = save_global_sysctls();
    let exe = std::env::current_exe().expect("test binary");
    let mut unshare = Command::new("unshare");
    // If this process dies (a harness timeout), the node dies with it.
    unsafe {
        use std::os::unix::process::CommandExt;
        unshare.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = unshare
        // --kill-child: if this process dies, so does the node (its PID 1 first).
        .args([
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--",
        ])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, &work)
        .env(CGROUP, &cgroup)
        .status()
        .expect("unshare (util-linux)");
    // The kernel ended every process of the node with its PID 1; nothing of it may be left
    // running here, nor mounted (its mounts lived in its own mount namespace).
    let survivors = processes_mentioning(&work);
    let mounts = mounts_under(&work);
    let cleaned = remove_cgroups(&cgroup);
    restore_global_sysctls(&sysctls);
    if !status.success() {
        print_log_tails(&work.join("logs"));
    }
    let keep = std::env::var("GRASP_SYNC_KEEP_LOGS").is_ok_and(|v| v == "1");
    if keep {
        eprintln!("node work dir kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    assert!(
        status.success(),
        "the test inside the node's namespaces failed: {status}"
    );
    if let Err(e) = cleaned {
        panic!("cgroups left behind: {e}");
    }
    assert!(
        survivors.is_empty(),
        "node processes left running: {survivors:?}"
    );
    assert!(mounts.is_empty(), "node mounts left behind: {mounts:?}");
    None
}

/// PIDs (and command lines) of processes whose command line names `dir`, killed.
fn processes_mentioning(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(&needle) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            out.push(format!("{pid}: {cmdline}"));
        }
    }
    out
}

/// Mount points under `dir` in this (the parent's) mount namespace.
fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&needle))
        .map(str::to_string)
        .collect()
}

/// The kernel settings the kubelet changes (`setupKernelTunables`) that are global, not
/// per network namespace.
const GLOBAL_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

fn save_global_sysctls() -> Vec<(PathBuf, String)> {
    GLOBAL_SYSCTLS
        .iter()
        .map(|k| Path::new("/proc/sys").join(k))
        .filter_map(|p| Some((p.clone(), std::fs::read_to_string(&p).ok()?)))
        .collect()
}

fn restore_global_sysctls(saved: &[(PathBuf, String)]) {
    for (p, v) in saved {
        if std::fs::read_to_string(p).ok().as_deref() != Some(v.as_str())
            && let Err(e) = std::fs::write(p, v.trim())
        {
            eprintln!("cannot restore {}: {e}", p.display());
        }
    }
}

fn cgroup_dirs(cgroup: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path().join(cgroup))
        .collect()
}

/// Remove the node's cgroups, deepest first, waiting (bounded) for the killed processes to
/// leave them.
fn remove_cgroups(cgroup: &str) -> Result<(), String> {
    fn remove(dir: &Path) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                remove(&e.path())?;
            }
        }
        std::fs::remove_dir(dir)
    }
    let start = Instant::now();
    loop {
        let left: Vec<String> = cgroup_dirs(cgroup)
            .into_iter()
            .filter(|d| d.exists())
            .filter_map(|d| remove(&d).err().map(|e| format!("{}: {e}", d.display())))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            return Err(left.join("; "));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_log_tails(logs: &Path) {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        // The diagnostics in full; of each component, its end.
        let keep = if e.file_name() == "zz-diagnostics.log" {
            400
        } else {
            25
        };
        let tail = lines[lines.len().saturating_sub(keep)..].join("\n");
        eprintln!(
            "---- {} (last {keep} lines) ----\n{tail}",
            e.path().display()
        );
    }
}

/// Paths of everything the node runs (`scripts/test-env.sh` provides them).
pub struct NodeBinaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
    pub scheduler: PathBuf,
    pub kubelet: PathBuf,
    pub proxy: PathBuf,
    pub kubectl: PathBuf,
}

impl NodeBinaries {
    pub fn from_env() -> NodeBinaries {
        NodeBinaries {
            etcd: locate("GRASP_SYNC_ETCD", "etcd", Some("/usr/bin/etcd")),
            apiserver: locate("GRASP_SYNC_KUBE_APISERVER", "kube-apiserver", None),
            controller_manager: locate(
                "GRASP_SYNC_KUBE_CONTROLLER_MANAGER",
                "kube-controller-manager",
                None,
            ),
            scheduler: locate("GRASP_SYNC_KUBE_SCHEDULER", "kube-scheduler", None),
            kubelet: locate("GRASP_SYNC_KUBELET", "kubelet", None),
            proxy: locate("GRASP_SYNC_KUBE_PROXY", "kube-proxy", None),
            kubectl: locate("GRASP_SYNC_KUBECTL", "kubectl", Some("/usr/bin/kubectl")),
        }
    }
}

/// The running node. Its processes die with the test process (PID 1 of their namespace).
pub struct Node {
    pub work: PathBuf,
    pub bins: NodeBinaries,
    procs: Vec<(String, Child)>,
    admin_kubeconfig: PathBuf,
    containerd_socket: PathBuf,
    dns_hosts: PathBuf,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn poll(what: &str, deadline: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Node {
    /// Bring the node up inside the namespaces [`isolate`] made: Ready, with the default
    /// ServiceAccount created.
    pub fn start(inside: &Inside) -> Node {
        let bins = NodeBinaries::from_env();
        let w = inside.work.clone();
        for d in [
            "logs",
            "pki",
            "containerd",
            "cni/net.d",
            "kubelet",
            "img",
            "dns",
        ] {
            std::fs::create_dir_all(w.join(d)).expect("work dirs");
        }
        // What the kubelet, containerd (runc state, pod network namespaces) and the CNI
        // plugins (result cache) write outside their configured directories.
        for d in ["/run", "/var/lib", "/var/log"] {
            run(Command::new("mount").args(["-t", "tmpfs", "tmpfs", d]));
        }
        // The node's interface: a bridge with the node's address (the sandbox has no dummy
        // interfaces), and a default route so that components find a "host" address.
        run(Command::new("ip").args(["link", "set", "lo", "up"]));
        run(Command::new("ip").args(["link", "add", "gsnode0", "type", "bridge"]));
        run(Command::new("ip").args(["addr", "add", &format!("{NODE_IP}/24"), "dev", "gsnode0"]));
        run(Command::new("ip").args(["link", "set", "gsnode0", "up"]));
        run(Command::new("ip").args(["route", "add", "default", "dev", "gsnode0"]));
        write(Path::new("/proc/sys/net/ipv4/ip_forward"), "1");
        // The kubelet requires its cgroup root to exist in every hierarchy.
        for d in cgroup_dirs(&inside.cgroup) {
            std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        }

        let mut node = Node {
            admin_kubeconfig: w.join("pki/admin.kubeconfig"),
            containerd_socket: w.join("containerd/containerd.sock"),
            dns_hosts: w.join("dns/hosts"),
            work: w,
            bins,
            procs: Vec::new(),
        };
        node.start_containerd();
        node.pki();
        node.start_control_plane();
        node.start_kubelet(&inside.cgroup);
        node.start_dns();
        let kubectl = |args: &[&str]| {
            let mut c = node.kubectl();
            c.args(args).stdout(Stdio::piped()).stderr(Stdio::null());
            c.output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        poll("the node Ready", Duration::from_secs(120), || {
            kubectl(&[
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .is_some_and(|s| s == "True")
        });
        poll(
            "the default ServiceAccount",
            Duration::from_secs(60),
            || kubectl(&["get", "serviceaccount", "default"]).is_some(),
        );
        node
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) {
        let log = std::fs::File::create(self.work.join("logs").join(format!("{name}.log")))
            .expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
        self.procs.push((name.to_string(), child));
    }

    /// Fail with the component's log if it has exited.
    pub fn check_running(&mut self) {
        for (name, child) in &mut self.procs {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited: {status}");
            }
        }
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.containerd_socket)
            .args(["--namespace", "k8s.io"]);
        c
    }

    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(&self.bins.kubectl);
        c.arg("--kubeconfig").arg(&self.admin_kubeconfig);
        c
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.admin_kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kubeconfig");
        kube::Client::try_from(config).expect("client")
    }

    /// Import an OCI archive into the CRI's image store as `base:<its tag>`.
    pub fn import_image(&self, archive: &Path, base: &str) {
        run(self
            .ctr()
            .args(["images", "import", "--base-name", base])
            .arg(archive));
    }

    fn start_containerd(&mut self) {
        let w = &self.work;
        let pause = w.join("img/pause");
        write(
            &w.join("img/pause.c"),
            "#include <signal.h>\n#include <stdlib.h>\n#include <unistd.h>\nstatic void h(int s){exit(0);}\nint main(void){signal(SIGINT,h);signal(SIGTERM,h);for(;;)pause();}\n",
        );
        run(Command::new("cc")
            .args(["-static", "-Os", "-o"])
            .arg(&pause)
            .arg(w.join("img/pause.c")));
        let layout = w.join("img/pause-layout");
        let image = format!("{}:3.2", layout.display());
        let bundle = w.join("img/pause-bundle");
        run(Command::new("umoci")
            .args(["init", "--layout"])
            .arg(&layout));
        run(Command::new("umoci").args(["new", "--image", &image]));
        run(Command::new("umoci")
            .args(["unpack", "--image", &image])
            .arg(&bundle));
        std::fs::copy(&pause, bundle.join("rootfs/pause")).expect("pause into rootfs");
        run(Command::new("umoci")
            .args(["repack", "--image", &image])
            .arg(&bundle));
        run(Command::new("umoci").args([
            "config",
            "--image",
            &image,
            "--config.entrypoint",
            "/pause",
            "--config.user",
            "65535:65535",
        ]));
        let archive = w.join("img/pause.tar");
        run(Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout)
            .arg("."));

        let default = run(Command::new("containerd").args(["config", "default"]));
        let root = w.join("containerd/root");
        let state = w.join("containerd/state");
        let mut config = default.clone();
        for (from, to) in [
            (
                "root = \"/var/lib/containerd\"",
                format!("root = \"{}\"", root.display()),
            ),
            (
                "state = \"/run/containerd\"",
                format!("state = \"{}\"", state.display()),
            ),
            (
                "address = \"/run/containerd/containerd.sock\"",
                format!("address = \"{}\"", self.containerd_socket.display()),
            ),
            // Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
            (
                "restrict_oom_score_adj = false",
                "restrict_oom_score_adj = true".into(),
            ),
            (
                "bin_dir = \"/opt/cni/bin\"",
                "bin_dir = \"/usr/lib/cni\"".into(),
            ),
            (
                "conf_dir = \"/etc/cni/net.d\"",
                format!("conf_dir = \"{}\"", w.join("cni/net.d").display()),
            ),
        ] {
            assert!(
                config.contains(from),
                "containerd's default config lacks {from:?}"
            );
            config = config.replacen(from, &to, 1);
        }
        let sandbox = config
            .lines()
            .find(|l| l.trim_start().starts_with("sandbox_image = "))
            .expect("sandbox_image in containerd's config")
            .to_string();
        config = config.replace(&sandbox, &format!("    sandbox_image = \"{PAUSE_IMAGE}\""));
        write(&w.join("containerd/config.toml"), &config);
        write(
            &w.join("cni/net.d/10-bridge.conflist"),
            &serde_json::json!({
                "cniVersion": "0.4.0", "name": "grasp-sync-node",
                "plugins": [
                    {"type": "bridge", "bridge": "gsnode-pods", "isGateway": true, "ipMasq": false,
                     "hairpinMode": true,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                              "routes": [{"dst": "0.0.0.0/0"}],
                              "dataDir": w.join("cni/ipam")}},
                    {"type": "portmap", "capabilities": {"portMappings": true}}
                ]
            })
            .to_string(),
        );
        let cfg = w.join("containerd/config.toml");
        self.spawn("containerd", Command::new("containerd").arg("-c").arg(cfg));
        let socket = self.containerd_socket.clone();
        poll("containerd to answer", Duration::from_secs(30), || {
            Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        self.import_image(&archive, "k8s.gcr.io/pause");
    }

    /// A CA, the API server's certificate (for its node address, the `kubernetes` Service's
    /// ClusterIP and names), the service-account key pair, a token per component.
    fn pki(&mut self) {
        let p = self.work.join("pki");
        let ossl = |args: &[&str]| {
            run(Command::new("openssl").current_dir(&p).args(args));
        };
        ossl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=grasp-sync-node-ca",
        ]);
        write(
            &p.join("san.cnf"),
            &format!(
                "[req]\ndistinguished_name=dn\n[dn]\n[ext]\nsubjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.96.0.1,IP:{NODE_IP}\nextendedKeyUsage=serverAuth,clientAuth\n"
            ),
        );
        ossl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
        ]);
        ossl(&[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "2",
            "-extfile",
            "san.cnf",
            "-extensions",
            "ext",
        ]);
        ossl(&["genrsa", "-out", "sa.key", "2048"]);
        ossl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        let users = [
            ("admin", "admin", "\"system:masters\""),
            (
                "kubelet",
                &*format!("system:node:{NODE_NAME}"),
                "\"system:nodes\"",
            ),
            ("controller-manager", "system:kube-controller-manager", ""),
            ("scheduler", "system:kube-scheduler", ""),
            ("proxy", "system:kube-proxy", ""),
        ];
        let mut tokens = String::new();
        for (i, (file, user, groups)) in users.iter().enumerate() {
            let token = random_token().expect("token");
            tokens.push_str(&format!("{token},{user},{i},{groups}\n"));
            write(
                &p.join(format!("{file}.kubeconfig")),
                &format!(
                    "apiVersion: v1\nkind: Config\nclusters: [{{name: node, cluster: {{server: \"https://{NODE_IP}:6443\", certificate-authority: {}}}}}]\nusers: [{{name: u, user: {{token: {token}}}}}]\ncontexts: [{{name: c, context: {{cluster: node, user: u}}}}]\ncurrent-context: c\n",
                    p.join("ca.crt").display()
                ),
            );
        }
        write(&p.join("tokens.csv"), &tokens);
    }

    fn start_control_plane(&mut self) {
        let w = self.work.clone();
        let p = w.join("pki");
        let f = |n: &str| p.join(n).display().to_string();
        self.spawn(
            "etcd",
            Command::new(&self.bins.etcd)
                .arg("--data-dir")
                .arg(w.join("etcd"))
                .args([
                    "--listen-client-urls=http://127.0.0.1:2379",
                    "--advertise-client-urls=http://127.0.0.1:2379",
                    "--listen-peer-urls=http://127.0.0.1:2380",
                    "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                    "--initial-cluster=default=http://127.0.0.1:2380",
                    "--log-level=warn",
                ]),
        );
        self.spawn(
            "kube-apiserver",
            Command::new(&self.bins.apiserver).args([
                "--etcd-servers=http://127.0.0.1:2379".to_string(),
                "--bind-address=0.0.0.0".into(),
                "--secure-port=6443".into(),
                format!("--advertise-address={NODE_IP}"),
                format!("--tls-cert-file={}", f("apiserver.crt")),
                format!("--tls-private-key-file={}", f("apiserver.key")),
                format!("--client-ca-file={}", f("ca.crt")),
                format!("--token-auth-file={}", f("tokens.csv")),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                format!("--service-account-key-file={}", f("sa.pub")),
                format!("--service-account-signing-key-file={}", f("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--insecure-port=0".into(),
                // The node's name resolves nowhere here (logs, exec): its address does.
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--cert-dir={}", f("apiserver-certs")),
            ]),
        );
        let kubectl = self.kubectl();
        let mut ready = kubectl;
        ready
            .args(["get", "--raw", "/readyz"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        poll("the API server ready", Duration::from_secs(90), || {
            ready.status().is_ok_and(|s| s.success())
        });
        let kc = f("controller-manager.kubeconfig");
        self.spawn(
            "kube-controller-manager",
            Command::new(&self.bins.controller_manager).args([
                format!("--kubeconfig={kc}"),
                format!("--authentication-kubeconfig={kc}"),
                format!("--authorization-kubeconfig={kc}"),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=10257".into(),
                "--port=0".into(),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", f("sa.key")),
                format!("--root-ca-file={}", f("ca.crt")),
                format!("--cluster-signing-cert-file={}", f("ca.crt")),
                format!("--cluster-signing-key-file={}", f("ca.key")),
                format!("--cert-dir={}", f("controller-manager-certs")),
            ]),
        );
        let ks = f("scheduler.kubeconfig");
        self.spawn(
            "kube-scheduler",
            Command::new(&self.bins.scheduler).args([
                format!("--kubeconfig={ks}"),
                format!("--authentication-kubeconfig={ks}"),
                format!("--authorization-kubeconfig={ks}"),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=10259".into(),
                "--port=0".into(),
                "--leader-elect=false".into(),
                format!("--cert-dir={}", f("scheduler-certs")),
            ]),
        );
    }

    fn start_kubelet(&mut self, cgroup: &str) {
        let w = self.work.clone();
        let config = w.join("kubelet/config.yaml");
        write(
            &config,
            &format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
failSwapOn: false
address: {NODE_IP}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
clusterDomain: cluster.local
clusterDNS: [\"{NODE_IP}\"]
evictionHard: {{memory.available: \"100Mi\", nodefs.available: \"1%\", nodefs.inodesFree: \"1%\", imagefs.available: \"1%\"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"
            ),
        );
        let socket = format!("unix://{}", self.containerd_socket.display());
        self.spawn(
            "kubelet",
            Command::new(&self.bins.kubelet).args([
                format!("--config={}", config.display()),
                format!(
                    "--kubeconfig={}",
                    w.join("pki/kubelet.kubeconfig").display()
                ),
                format!("--node-ip={NODE_IP}"),
                "--container-runtime=remote".into(),
                format!("--container-runtime-endpoint={socket}"),
                format!("--image-service-endpoint={socket}"),
                format!("--root-dir={}", w.join("kubelet/root").display()),
                format!("--cert-dir={}", w.join("kubelet/pki").display()),
                format!("--hostname-override={NODE_NAME}"),
                format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            ]),
        );
        self.spawn(
            "kube-proxy",
            Command::new(&self.bins.proxy).args([
                format!("--kubeconfig={}", w.join("pki/proxy.kubeconfig").display()),
                "--proxy-mode=iptables".into(),
                format!("--cluster-cidr={POD_CIDR}"),
                format!("--hostname-override={NODE_NAME}"),
                "--conntrack-max-per-core=0".into(),
                "--metrics-bind-address=127.0.0.1:10249".into(),
                "--healthz-bind-address=127.0.0.1:10256".into(),
            ]),
        );
    }

    /// dnsmasq on the node's address, answering for Service names from a hosts file
    /// ([`Node::refresh_dns`]); every other name under cluster.local does not exist.
    fn start_dns(&mut self) {
        write(&self.dns_hosts, "");
        let hosts = self.dns_hosts.display().to_string();
        self.spawn(
            "dnsmasq",
            Command::new("dnsmasq").args([
                "--keep-in-foreground".to_string(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                format!("--addn-hosts={hosts}"),
                format!("--listen-address={NODE_IP}"),
                "--bind-interfaces".into(),
                "--local=/cluster.local/".into(),
                "--user=root".into(),
                "--log-facility=-".into(),
            ]),
        );
    }

    /// Write every Service's ClusterIP under its `<name>.<namespace>.svc.cluster.local` and
    /// have dnsmasq read them again.
    pub fn refresh_dns(&mut self) {
        let out = run(self.kubectl().args([
            "get",
            "services",
            "--all-namespaces",
            "-o",
            "jsonpath={range .items[*]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.cluster.local{\"\\n\"}{end}",
        ]));
        let hosts: String = out
            .lines()
            .filter(|l| !l.starts_with("None "))
            .map(|l| format!("{l}\n"))
            .collect();
        write(&self.dns_hosts, &hosts);
        let pid = self
            .procs
            .iter()
            .find(|(n, _)| n == "dnsmasq")
            .map(|(_, c)| c.id())
            .expect("dnsmasq");
        run(Command::new("kill").args(["-HUP", &pid.to_string()]));
    }
}

impl Node {
    /// What an operator would look at, written to `logs/zz-diagnostics.log` (printed by the
    /// parent when the test fails): pods, RelaySyncs, events, every pod's log.
    pub fn diagnose(&self) {
        let mut out = String::new();
        let mut get = |args: &[&str]| {
            let o = self.kubectl().args(args).output();
            out.push_str(&format!("$ kubectl {}\n", args.join(" ")));
            if let Ok(o) = o {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
                out.push_str(&String::from_utf8_lossy(&o.stderr));
            }
        };
        get(&["get", "pods", "-A", "-o", "wide"]);
        get(&["get", "relaysyncs", "-A", "-o", "wide", "--show-labels"]);
        get(&["get", "events", "-A", "--sort-by=.lastTimestamp"]);
        let pods = self
            .kubectl()
            .args([
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for p in pods.lines() {
            if let Some((ns, name)) = p.split_once('/') {
                get(&["logs", "-n", ns, name, "--all-containers", "--tail=60"]);
                // In full beside the node's logs (kept with GRASP_SYNC_KEEP_LOGS=1).
                if let Ok(o) = self
                    .kubectl()
                    .args(["logs", "-n", ns, name, "--all-containers"])
                    .output()
                {
                    let _ =
                        std::fs::write(self.work.join(format!("pod-{ns}-{name}.log")), o.stdout);
                }
            }
        }
        let _ = std::fs::write(self.work.join("logs/zz-diagnostics.log"), out);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.diagnose();
        }
        // Reverse order; the namespace's end would kill them anyway.
        while let Some((_, mut child)) = self.procs.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
