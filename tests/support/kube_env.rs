//! A real Kubernetes API server for tests: etcd + kube-apiserver on free loopback ports,
//! token authentication, RBAC, a kubeconfig — torn down when the `KubeEnv` is dropped,
//! including when the test panics. Child processes also get `PR_SET_PDEATHSIG`, so a test
//! process that is killed outright does not leave them running, and temp directories of
//! dead test processes are removed by the next run.
//!
//! Binaries come from `GRASP_SYNC_ETCD` / `GRASP_SYNC_KUBE_APISERVER` / `GRASP_SYNC_KUBECTL`,
//! else `KUBEBUILDER_ASSETS`, else the cache `scripts/test-env.sh` fills. Setting
//! `GRASP_SYNC_TEST_KUBECONFIG` runs the tests against that existing cluster instead
//! (other users are then reached by impersonation rather than by token).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions::is_crd_established};
use kube::{Client, Config};
use tempfile::TempDir;

pub const ADMIN: &str = "grasp-sync-test-admin";
/// Users the local API server knows by token (no groups, so no permissions until a test
/// binds a Role to them).
pub const TEST_USERS: &[&str] = &[
    "grasp-sync-test-worker",
    "grasp-sync-test-controller",
    "grasp-sync-test-nobody",
    // One identity per worker process in the multi-process tests.
    "grasp-sync-test-w0",
    "grasp-sync-test-w1",
    "grasp-sync-test-w2",
    "grasp-sync-test-w3",
    "grasp-sync-test-w4",
    // Workers named as a StatefulSet's pods (`gs`).
    "grasp-sync-test-gs-0",
    "grasp-sync-test-gs-1",
    "grasp-sync-test-gs-2",
    "grasp-sync-test-gs-3",
    "grasp-sync-test-gs-4",
    "grasp-sync-test-gs-5",
    "grasp-sync-test-gs-6",
    "grasp-sync-test-gs-7",
];

const TMP_PREFIX: &str = "grasp-sync-kube-";
const ETCD_READY: Duration = Duration::from_secs(30);
const APISERVER_READY: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error(
        "{component} not found at {path}: set {var} to its path, or run scripts/test-env.sh \
         to install and cache it"
    )]
    BinaryMissing {
        component: &'static str,
        path: PathBuf,
        var: &'static str,
    },
    #[error(
        "{component} could not listen on 127.0.0.1:{port}: the port is already in use by \
         another process. Free the port or let the test environment choose ports itself.\n\
         {component} log (last lines):\n{log}"
    )]
    PortTaken {
        component: &'static str,
        port: u16,
        log: String,
    },
    #[error("{component} exited during start-up ({status}).\n{component} log (last lines):\n{log}")]
    Exited {
        component: &'static str,
        status: String,
        log: String,
    },
    #[error("{component} was not ready within {waited:?}.\n{component} log (last lines):\n{log}")]
    NotReady {
        component: &'static str,
        waited: Duration,
        log: String,
    },
    #[error("test environment set-up failed: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> EnvError + '_ {
    move |e| EnvError::Setup(format!("{what}: {e}"))
}

/// Paths of the binaries the environment runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
}

impl Binaries {
    pub fn from_env() -> Self {
        Binaries {
            etcd: locate("GRASP_SYNC_ETCD", "etcd", Some("/usr/bin/etcd")),
            kube_apiserver: locate("GRASP_SYNC_KUBE_APISERVER", "kube-apiserver", None),
        }
    }
}

/// The cache directory `scripts/test-env.sh` installs into.
pub fn cache_bin_dir() -> PathBuf {
    if let Some(c) = std::env::var_os("GRASP_SYNC_CACHE") {
        return PathBuf::from(c).join("bin");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("grasp-sync").join("bin")
}

/// Resolve a tool: explicit variable, then envtest assets, then our cache, then `fallback`.
/// Returns the cache path when nothing exists, so the error names where it was expected.
pub fn locate(var: &str, name: &str, fallback: Option<&str>) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    if let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS") {
        let p = PathBuf::from(assets).join(name);
        if p.exists() {
            return p;
        }
    }
    let cached = cache_bin_dir().join(name);
    if cached.exists() {
        return cached;
    }
    match fallback {
        Some(f) if Path::new(f).exists() => PathBuf::from(f),
        _ => cached,
    }
}

fn check_binary(component: &'static str, var: &'static str, path: &Path) -> Result<(), EnvError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(EnvError::BinaryMissing {
            component,
            path: path.to_path_buf(),
            var,
        })
    }
}

/// Options for starting a local environment.
#[derive(Debug, Clone)]
pub struct Builder {
    binaries: Binaries,
    etcd_port: Option<u16>,
    apiserver_port: Option<u16>,
}

impl Builder {
    pub fn binaries(mut self, b: Binaries) -> Self {
        self.binaries = b;
        self
    }
    /// Use this etcd client port instead of a free one (to test port conflicts).
    pub fn etcd_port(mut self, port: u16) -> Self {
        self.etcd_port = Some(port);
        self
    }
    pub fn apiserver_port(mut self, port: u16) -> Self {
        self.apiserver_port = Some(port);
        self
    }

    /// Start etcd and kube-apiserver and wait until the API server is ready. Must be
    /// called from the test's own thread (as `#[tokio::test]` bodies are), because the
    /// children are tied to the lifetime of the thread that spawns them.
    pub async fn start(self) -> Result<KubeEnv, EnvError> {
        check_binary("etcd", "GRASP_SYNC_ETCD", &self.binaries.etcd)?;
        check_binary(
            "kube-apiserver",
            "GRASP_SYNC_KUBE_APISERVER",
            &self.binaries.kube_apiserver,
        )?;
        remove_stray_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TMP_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(setup("creating a temp dir"))?;
        let root = dir.path().to_path_buf();

        // Service-account signing key: required by kube-apiserver even though the tests
        // authenticate with static tokens.
        let sa_key = root.join("sa.key");
        let sa_pub = root.join("sa.pub");
        run_quiet(
            Command::new("openssl")
                .args([
                    "ecparam",
                    "-genkey",
                    "-name",
                    "prime256v1",
                    "-noout",
                    "-out",
                ])
                .arg(&sa_key),
        )?;
        run_quiet(
            Command::new("openssl")
                .args(["ec", "-pubout", "-in"])
                .arg(&sa_key)
                .arg("-out")
                .arg(&sa_pub),
        )?;

        let mut tokens = BTreeMap::new();
        let mut csv = String::new();
        for (i, user) in std::iter::once(ADMIN)
            .chain(TEST_USERS.iter().copied())
            .enumerate()
        {
            let token = random_token()?;
            let groups = if user == ADMIN { "system:masters" } else { "" };
            let _ = writeln!(csv, "{token},{user},uid-{i},\"{groups}\"");
            tokens.insert(user.to_string(), token);
        }
        let token_file = root.join("tokens.csv");
        std::fs::write(&token_file, csv).map_err(setup("writing the token file"))?;

        let etcd_port = match self.etcd_port {
            Some(p) => p,
            None => free_port()?,
        };
        let etcd_peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut etcd = Proc::spawn(
            "etcd",
            &root,
            Command::new(&self.binaries.etcd)
                .arg("--data-dir")
                .arg(root.join("etcd"))
                .arg(format!("--listen-client-urls={etcd_url}"))
                .arg(format!("--advertise-client-urls={etcd_url}"))
                .arg(format!(
                    "--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"
                ))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"
                ))
                .arg(format!(
                    "--initial-cluster=default=http://127.0.0.1:{etcd_peer_port}"
                ))
                .arg("--logger=zap")
                .arg("--log-level=warn"),
        )?;
        wait_until(&mut etcd, etcd_port, ETCD_READY, || async {
            etcd_healthy(etcd_port)
        })
        .await?;

        let api_port = match self.apiserver_port {
            Some(p) => p,
            None => free_port()?,
        };
        let certs = root.join("certs");
        let mut api_cmd = Command::new(&self.binaries.kube_apiserver);
        api_cmd
            .arg(format!("--etcd-servers={etcd_url}"))
            .arg("--cert-dir")
            .arg(&certs)
            .arg(format!("--secure-port={api_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--token-auth-file")
            .arg(&token_file)
            .arg("--authorization-mode=RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-account-key-file")
            .arg(&sa_pub)
            .arg("--service-account-signing-key-file")
            .arg(&sa_key)
            .arg("--insecure-port=0")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--enable-priority-and-fairness=false");
        let api_args: Vec<std::ffi::OsString> = api_cmd.get_args().map(|a| a.to_owned()).collect();
        let mut apiserver = Proc::spawn("kube-apiserver", &root, &mut api_cmd)?;

        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = root.join("kubeconfig");
        std::fs::write(&kubeconfig, render_kubeconfig(&server, &tokens))
            .map_err(setup("writing the kubeconfig"))?;

        let admin = load_client(&kubeconfig, None).await?;
        wait_until(&mut apiserver, api_port, APISERVER_READY, || async {
            let req = http::Request::get("/readyz").body(Vec::new());
            match req {
                Ok(req) => matches!(admin.request_text(req).await, Ok(body) if body.trim() == "ok"),
                Err(_) => false,
            }
        })
        .await?;
        Ok(KubeEnv {
            mode: Mode::Local {
                apiserver: Some(apiserver),
                etcd: Some(etcd),
            },
            restart: Some(ApiRestart {
                binary: self.binaries.kube_apiserver.clone(),
                args: api_args,
                port: api_port,
                root,
            }),
            kubeconfig,
            _dir: dir,
        })
    }
}

/// How to start the API server again.
struct ApiRestart {
    binary: PathBuf,
    args: Vec<std::ffi::OsString>,
    port: u16,
    root: PathBuf,
}

enum Mode {
    // Field order is drop order: the API server goes before its etcd.
    Local {
        apiserver: Option<Proc>,
        etcd: Option<Proc>,
    },
    External,
}

/// A running (or borrowed) Kubernetes API server.
pub struct KubeEnv {
    mode: Mode,
    restart: Option<ApiRestart>,
    kubeconfig: PathBuf,
    _dir: TempDir,
}

impl KubeEnv {
    pub fn builder() -> Builder {
        Builder {
            binaries: Binaries::from_env(),
            etcd_port: None,
            apiserver_port: None,
        }
    }

    /// A local environment, or the cluster named by `GRASP_SYNC_TEST_KUBECONFIG`.
    pub async fn start() -> Result<KubeEnv, EnvError> {
        if let Some(path) = std::env::var_os("GRASP_SYNC_TEST_KUBECONFIG") {
            let dir = tempfile::Builder::new()
                .prefix(TMP_PREFIX)
                .tempdir()
                .map_err(setup("creating a temp dir"))?;
            return Ok(KubeEnv {
                mode: Mode::External,
                restart: None,
                kubeconfig: PathBuf::from(path),
                _dir: dir,
            });
        }
        Self::builder().start().await
    }

    /// Process ids of the local etcd and kube-apiserver (empty for an external cluster).
    pub fn pids(&self) -> Vec<u32> {
        match &self.mode {
            Mode::Local { apiserver, etcd } => apiserver
                .iter()
                .chain(etcd.iter())
                .map(|p| p.child.id())
                .collect(),
            Mode::External => Vec::new(),
        }
    }

    /// Stop the API server and start it again on the same port and etcd (local only).
    pub async fn restart_apiserver(&mut self) -> Result<(), EnvError> {
        let (Mode::Local { apiserver, .. }, Some(r)) = (&mut self.mode, &self.restart) else {
            return Err(EnvError::Setup(
                "cannot restart an external API server".into(),
            ));
        };
        drop(apiserver.take());
        let mut cmd = Command::new(&r.binary);
        cmd.args(&r.args);
        let mut proc = Proc::spawn("kube-apiserver", &r.root, &mut cmd)?;
        let admin = load_client(&self.kubeconfig, None).await?;
        wait_until(&mut proc, r.port, APISERVER_READY, || async {
            let req = http::Request::get("/readyz").body(Vec::new());
            match req {
                Ok(req) => matches!(admin.request_text(req).await, Ok(body) if body.trim() == "ok"),
                Err(_) => false,
            }
        })
        .await?;
        *apiserver = Some(proc);
        Ok(())
    }

    pub fn is_external(&self) -> bool {
        matches!(self.mode, Mode::External)
    }

    /// The kubeconfig file (its current context is the admin).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub async fn client(&self) -> Result<Client, EnvError> {
        load_client(&self.kubeconfig, None).await
    }

    /// A client authenticated as `user` (one of [`TEST_USERS`]): by its token on the local
    /// API server, by impersonation on an external cluster.
    pub async fn client_as(&self, user: &str) -> Result<Client, EnvError> {
        match self.mode {
            Mode::Local { .. } => load_client(&self.kubeconfig, Some(user)).await,
            Mode::External => {
                let mut config = load_config(&self.kubeconfig, None).await?;
                config.auth_info.impersonate = Some(user.to_string());
                Client::try_from(config).map_err(setup("building a client"))
            }
        }
    }

    /// Create a fresh namespace for one test.
    pub async fn namespace(&self, prefix: &str) -> Result<String, EnvError> {
        let name = format!("{prefix}-{}", &random_token()?[..8]);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
        }))
        .map_err(setup("namespace object"))?;
        Api::<Namespace>::all(self.client().await?)
            .create(&PostParams::default(), &ns)
            .await
            .map_err(setup("creating a namespace"))?;
        Ok(name)
    }

    /// A `kubectl` command pointed at this environment.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(locate(
            "GRASP_SYNC_KUBECTL",
            "kubectl",
            Some("/usr/bin/kubectl"),
        ));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }
}

async fn load_config(kubeconfig: &Path, context: Option<&str>) -> Result<Config, EnvError> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(setup("reading the kubeconfig"))?;
    let opts = KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    Config::from_custom_kubeconfig(kc, &opts)
        .await
        .map_err(setup("loading the kubeconfig"))
}

async fn load_client(kubeconfig: &Path, context: Option<&str>) -> Result<Client, EnvError> {
    let config = load_config(kubeconfig, context).await?;
    Client::try_from(config).map_err(setup("building a client"))
}

fn render_kubeconfig(server: &str, tokens: &BTreeMap<String, String>) -> String {
    // Loopback only, with the API server's self-signed certificate: skip verification.
    let mut s = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: {ADMIN}\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\ncontexts:\n"
    );
    for user in tokens.keys() {
        let _ = write!(
            s,
            "- name: {user}\n  context:\n    cluster: test\n    user: {user}\n    namespace: default\n"
        );
    }
    s.push_str("users:\n");
    for (user, token) in tokens {
        let _ = write!(s, "- name: {user}\n  user:\n    token: {token}\n");
    }
    s
}

/// A child process whose output goes to a log file, killed on drop.
struct Proc {
    component: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(component: &'static str, dir: &Path, cmd: &mut Command) -> Result<Proc, EnvError> {
        let log = dir.join(format!("{component}.log"));
        let out = std::fs::File::create(&log).map_err(setup("creating a log file"))?;
        let err = out.try_clone().map_err(setup("creating a log file"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| EnvError::Setup(format!("starting {component}: {e}")))?;
        Ok(Proc {
            component,
            child,
            log,
        })
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn exited(&mut self, port: u16) -> Option<EnvError> {
        let status = self.child.try_wait().ok().flatten()?;
        let log = self.log_tail();
        Some(if log.contains("address already in use") {
            EnvError::PortTaken {
                component: self.component,
                port,
                log,
            }
        } else {
            EnvError::Exited {
                component: self.component,
                status: status.to_string(),
                log,
            }
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `ready` until it holds, the process exits, or `deadline` passes.
async fn wait_until<F, Fut>(
    proc: &mut Proc,
    port: u16,
    deadline: Duration,
    ready: F,
) -> Result<(), EnvError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if let Some(e) = proc.exited(port) {
            return Err(e);
        }
        if ready().await {
            return Ok(());
        }
        if start.elapsed() > deadline {
            return Err(EnvError::NotReady {
                component: proc.component,
                waited: deadline,
                log: proc.log_tail(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// etcd's `/health` over plain HTTP. A bare TCP connect is not enough: it also succeeds
/// when some other process holds the port.
fn etcd_healthy(port: u16) -> bool {
    use std::io::Write;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.take(64 * 1024).read_to_end(&mut response);
    String::from_utf8_lossy(&response).contains("\"health\":\"true\"")
}

fn free_port() -> Result<u16, EnvError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(setup("finding a free port"))?;
    Ok(l.local_addr().map_err(setup("finding a free port"))?.port())
}

pub fn random_token() -> Result<String, EnvError> {
    let mut buf = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(setup("reading /dev/urandom"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn run_quiet(cmd: &mut Command) -> Result<(), EnvError> {
    let out = cmd
        .output()
        .map_err(|e| EnvError::Setup(format!("running {cmd:?}: {e} (is openssl installed?)")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(EnvError::Setup(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Remove temp dirs left by test processes that were killed before they could clean up.
fn remove_stray_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TMP_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Install the committed CRD file (the one operators apply) and wait until it is served.
pub async fn install_crd(client: &Client) {
    let yaml = include_str!("../../deploy/crds/relaysync.yaml");
    let crd: CustomResourceDefinition = serde_yaml::from_str(yaml).expect("CRD YAML parses");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("grasp-sync-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &crd.name_any(), is_crd_established()),
    )
    .await
    .expect("CRD established within 30 s")
    .expect("watching the CRD");
}
