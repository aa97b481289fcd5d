//! The admin listener as an operator meets it: after a real flip through the pipeline, the
//! metrics, readiness and the status page (opened in headless Chromium) tell the truth; the
//! public listener exposes none of it; the shipped Grafana dashboard queries only metrics a
//! real scrape declares.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use secrecy::SecretString;

use crate::support::{Backend, Options, TENANT, TestApp, eventually};

const CONVERGE: Duration = Duration::from_secs(15);

/// Admin checks every 200 ms, so depths and readiness follow the test quickly.
async fn start(
    name: &str,
    backend: Backend,
    adjust: impl FnOnce(&mut flagrelay::config::Config),
) -> TestApp {
    TestApp::start_with(
        name,
        Options {
            backend,
            ..Options::default()
        },
        |c| {
            c.admin.check_every = Duration::from_millis(200);
            adjust(c);
        },
    )
    .await
}

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// `GET` until `check` accepts the answer (the probe runs on an interval).
async fn get_until(url: &str, check: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let mut last = (0, String::new());
    for _ in 0..100 {
        last = get(url).await;
        if check(last.0, &last.1) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{url} never answered as expected; last: {} {}",
        last.0, last.1
    );
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Put a message signed with someone else's key on the bus: the worker dead-letters it.
async fn forge(t: &TestApp, user_id: &str) {
    t.app
        .queue
        .publish(&crate::support::forged_change(user_id))
        .await
        .unwrap();
}

#[tokio::test]
async fn after_a_flip_the_admin_listener_shows_metrics_readiness_and_the_decision() {
    let t = start("admin", Backend::Rabbit, |_| {}).await;
    let admin = t.admin_url().await;
    let alice = t.sandbox.seed_user("alice", true, "end_user");
    t.sandbox.set_enabled(&alice, false);
    assert!(eventually(CONVERGE, || t.sandbox.is_active(&alice) == Some(false)).await);
    forge(&t, &alice.id).await;

    // Readiness: every check named, all passing; the public listener agrees on the broker.
    let (_, ready) = get_until(&format!("{admin}/readyz"), |s, _| s == 200).await;
    for line in ["broker: ok", "graph: ok", "proofpoint: ok"] {
        assert!(ready.contains(line), "{ready}");
    }
    assert_eq!(get(&format!("{}/readyz", t.url)).await.0, 200);

    // Metrics: the decision, the latency from receipt, the dead letter; none on the public side.
    let (_, scrape) = get_until(&format!("{admin}/metrics"), |_, body| {
        sample(body, "flagrelay_dead_letter_depth") == Some(1.0)
    })
    .await;
    let applied = r#"flagrelay_messages_processed_total{outcome="applied",decision="deactivate"}"#;
    assert!(sample(&scrape, applied) >= Some(1.0), "{scrape}");
    assert!(
        sample(
            &scrape,
            r#"flagrelay_latency_from_receipt_seconds_count{origin="notification"}"#
        ) >= Some(1.0),
        "{scrape}"
    );
    assert!(
        sample(&scrape, "flagrelay_notifications_enqueued_total") >= Some(1.0),
        "{scrape}"
    );
    assert!(
        sample(&scrape, "flagrelay_publish_confirm_seconds_count") >= Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, "flagrelay_breaker_tripped"),
        Some(0.0),
        "{scrape}"
    );
    assert_eq!(sample(&scrape, "flagrelay_leader"), Some(1.0), "{scrape}");
    for path in ["/metrics", "/"] {
        assert_eq!(
            get(&format!("{}{path}", t.url)).await.0,
            404,
            "the public listener serves no {path}"
        );
    }

    // The status page, as a person sees it in a browser.
    let text = visible_text(&chromium_dump_dom(&format!("{admin}/")).await);
    // (Later duplicates of the notification add `no_change` rows above it.)
    let row = text
        .rows
        .iter()
        .find(|r| r.contains(&alice.address) && r.contains(" applied "))
        .unwrap_or_else(|| panic!("no applied row for {}: {:#?}", alice.address, text.rows));
    for expected in ["deactivate", "the default rule \"default\"", " ms "] {
        assert!(
            row.contains(expected),
            "{expected:?} missing in the row: {row}"
        );
    }
    for expected in [
        "Dead letters: 1",
        "Breaker: closed",
        "broker ok",
        "Leader: yes",
    ] {
        assert!(
            text.all.contains(expected),
            "{expected:?} missing in: {}",
            text.all
        );
    }
    t.stop().await;
}

#[tokio::test]
async fn readyz_names_the_check_that_fails() {
    let t = start("unready", Backend::Embedded, |c| {
        c.proofpoint.password = Some(SecretString::from("not the password".to_owned()));
    })
    .await;
    let admin = t.admin_url().await;
    let (status, body) = get_until(&format!("{admin}/readyz"), |_, body| {
        body.contains("proofpoint:")
    })
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("broker: ok"), "{body}");
    assert!(body.contains("graph: ok"), "{body}");
    assert!(
        body.contains("proofpoint: FAIL (org contoso.test: proofpoint refused the credentials"),
        "{body}"
    );
    assert!(
        !body.contains("not the password"),
        "no secret in the answer: {body}"
    );
    let (_, scrape) = get(&format!("{admin}/metrics")).await;
    assert_eq!(
        sample(&scrape, r#"flagrelay_ready{check="proofpoint"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&scrape, r#"flagrelay_ready{check="broker"}"#),
        Some(1.0)
    );
    // The public listener only cares about the broker: load balancers keep sending traffic.
    assert_eq!(get(&format!("{}/readyz", t.url)).await.0, 200);
    t.stop().await;
}

#[tokio::test]
async fn the_grafana_dashboard_queries_only_metrics_a_real_scrape_declares() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("valid JSON");
    assert!(dashboard["title"].is_string() && dashboard["panels"].is_array());
    let datasource_var = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .expect("a Prometheus datasource variable");
    let var = format!("${{{}}}", datasource_var["name"].as_str().unwrap());

    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"],
            var.as_str(),
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            assert_eq!(
                target["datasource"]["uid"],
                var.as_str(),
                "{}",
                panel["title"]
            );
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }

    // A real process after a real flip, managing its own subscription (so the leader's
    // subscription metrics exist too).
    let t = TestApp::start_with(
        "dashboard",
        Options {
            backend: Backend::Embedded,
            subscribe: false,
            public_url: true,
            ..Options::default()
        },
        |c| c.admin.check_every = Duration::from_millis(200),
    )
    .await;
    assert!(
        eventually(CONVERGE, || !t
            .sandbox
            .graph
            .subscriptions(TENANT)
            .is_empty())
        .await,
        "the leader created the subscription"
    );
    let admin = t.admin_url().await;
    let bob = t.sandbox.seed_user("bob", true, "end_user");
    t.sandbox.set_enabled(&bob, false);
    assert!(eventually(CONVERGE, || t.sandbox.is_active(&bob) == Some(false)).await);
    let (_, scrape) = get(&format!("{admin}/metrics")).await;
    t.stop().await;

    // Family name → type, from the `# TYPE` lines.
    let declared: BTreeMap<&str, &str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let names: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(
        names.len() >= 10,
        "the dashboard covers the metrics: {names:?}"
    );
    for name in &names {
        let family = [
            ("_bucket", "histogram"),
            ("_sum", "histogram"),
            ("_count", "histogram"),
            ("_total", "counter"),
        ]
        .iter()
        .find_map(|(suffix, kind)| {
            let base = name.strip_suffix(suffix)?;
            (declared.get(base) == Some(kind)).then_some(base)
        })
        .or_else(|| declared.get(name.as_str()).map(|_| name.as_str()));
        assert!(
            family.is_some(),
            "{name} is queried but not exposed; declared: {declared:?}"
        );
    }
}

/// Every `flagrelay_…` metric name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("flagrelay_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// What a person sees: the page's text, and each table row's text on its own.
struct Visible {
    all: String,
    rows: Vec<String>,
}

fn visible_text(dom: &str) -> Visible {
    fn strip(html: &str) -> String {
        let mut out = String::new();
        let mut in_tag = false;
        for c in html.chars() {
            match c {
                '<' => in_tag = true,
                '>' => {
                    in_tag = false;
                    out.push(' ');
                }
                c if !in_tag => out.push(c),
                _ => {}
            }
        }
        let decoded = out
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&#39;", "'")
            .replace("&amp;", "&");
        decoded.split_whitespace().collect::<Vec<_>>().join(" ")
    }
    let body = dom.split("<body").nth(1).unwrap_or(dom);
    Visible {
        all: strip(body).replace(" :", ":"),
        rows: body.split("<tr").skip(1).map(strip).collect(),
    }
}

/// The DOM Chromium builds for `url` (headless, a fresh profile, no network chatter).
async fn chromium_dump_dom(url: &str) -> String {
    let chromium =
        std::env::var("FLAGRELAY_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} not found: this test opens the status page in a real browser. Install it \
         with `apt-get install -y chromium` (Debian; `bash .ci/run` does it), or point \
         FLAGRELAY_TEST_CHROMIUM at a Chromium binary."
    );
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                &format!("--user-data-dir={}", profile.path().display()),
                "--dump-dom",
                url,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 90 s")
    .expect("chromium started");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("flagrelay status"),
        "chromium did not render the page ({:?}): {}\n{}",
        out.status,
        dom,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}
