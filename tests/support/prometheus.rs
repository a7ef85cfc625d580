//! A real Prometheus for the tests: scrapes given targets, loads the alert rules, answers
//! queries; and the checks that the dashboard and the alerts only use exported metrics and
//! that every panel returns data.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;
use super::kube_env::locate;

pub struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    pub fn start(dir: &Path, targets: &[String], rules: &Path) -> Prometheus {
        let port = free_port();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: grasp-sync\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        );
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).expect("prometheus config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new(locate(
            "GRASP_SYNC_PROMETHEUS",
            "prometheus",
            Some("/usr/bin/prometheus"),
        ))
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start prometheus (scripts/test-env.sh provides it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn get(&self, path: &str, query: &[(&str, &str)]) -> Option<serde_json::Value> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), query).ok()?;
        let resp = reqwest::get(url).await.ok()?;
        serde_json::from_str(&resp.text().await.ok()?).ok()
    }

    /// Instant query → `Ok(series)`, or Prometheus's error.
    pub async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let body = self
            .get("/api/v1/query", &[("query", expr)])
            .await
            .ok_or("no answer")?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

/// Every `ngit_sync_*` / `grasp_sync_*` name in a text.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("_sync_") {
        let start = text[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|p| p + 1)
            .unwrap_or(0);
        let end = text[i..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(|p| i + p)
            .unwrap_or(text.len());
        let name = &text[start..end];
        if name.starts_with("ngit_sync_") || name.starts_with("grasp_sync_") {
            out.insert(name.to_string());
        }
    }
    out
}

/// Every metric the dashboard and the alert rules use is one that the processes at `addrs`
/// export on /metrics.
pub async fn dashboard_and_rules_use_exported_metrics(addrs: &[&String]) {
    let mut exposed = String::new();
    for addr in addrs {
        exposed.push_str(
            &reqwest::get(format!("http://{addr}/metrics"))
                .await
                .expect("metrics")
                .text()
                .await
                .expect("metrics"),
        );
    }
    let exposed_names = metric_names(&exposed);
    let mut used = metric_names(include_str!(
        "../../deploy/prometheus/grasp-sync-rules.yaml"
    ));
    for (_, expr) in dashboard_queries() {
        used.extend(metric_names(&expr));
    }
    let dead: Vec<&String> = used.difference(&exposed_names).collect();
    assert!(
        dead.is_empty(),
        "dashboard/alerts use metrics nobody exports: {dead:?}"
    );
}

/// (panel title, query) of every dashboard target, `$__rate_interval` as 1m.
pub fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/grasp-sync.json")).unwrap();
    let mut queries = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            queries.push((
                p["title"].as_str().unwrap().to_string(),
                expr.replace("$__rate_interval", "1m"),
            ));
        }
    }
    queries
}

/// Every panel query evaluates and returns a series (no dead panels). Series of the second
/// target may need one more scrape: each query is polled with a deadline.
pub async fn every_panel_returns_data(prom: &Prometheus) {
    // Two scrapes at least, so that rate() has samples.
    let start = std::time::Instant::now();
    loop {
        let r = prom.query("rate(ngit_sync_events_total[1m])").await;
        if r.is_ok_and(|r| !r.is_empty()) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "rate() has no samples"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (title, expr) in &dashboard_queries() {
        let start = std::time::Instant::now();
        loop {
            let series = prom
                .query(expr)
                .await
                .unwrap_or_else(|e| panic!("panel {title:?}: {expr} fails: {e}"));
            if !series.is_empty() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "panel {title:?}: {expr} returns nothing"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
