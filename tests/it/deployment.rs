//! The deployment files, checked without a Docker engine or a running systemd.
//!
//! `docker-compose.yml` is parsed as YAML and checked for what the README promises: the
//! broker with its management UI, serve and work with nothing per replica (so
//! `--scale work=N` works), the simulators in a profile, every secret a compose secret named
//! by a `*_file` key, and configuration keys flagrelay knows. `docker compose config` is not
//! used: no Compose client is installed here. The `Dockerfile` is checked for its stages,
//! user and health check. The systemd units are checked by `systemd-analyze verify` (offline)
//! and for the credentials-to-`*_FILE` wiring.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use flagrelay::config::Config;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// `docker-compose.yml` with YAML merge keys (`<<: *anchor`) applied.
fn compose() -> Value {
    let doc: Value = serde_saphyr::from_str(&read("docker-compose.yml"))
        .unwrap_or_else(|e| panic!("docker-compose.yml is not YAML: {e}"));
    merge_keys(doc)
}

fn merge_keys(v: Value) -> Value {
    match v {
        Value::Object(mut m) => {
            let base = m.remove("<<");
            let mut out: serde_json::Map<String, Value> = match base.map(merge_keys) {
                Some(Value::Object(b)) => b,
                Some(other) => panic!("a merge key takes a mapping, not {other}"),
                None => serde_json::Map::new(),
            };
            for (k, x) in m {
                out.insert(k, merge_keys(x));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(merge_keys).collect()),
        other => other,
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    Value::Object(m) => m["source"].as_str().unwrap().to_owned(),
                    other => panic!("unexpected list entry {other}"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A configuration document: TOML keys flagrelay knows, with values of the right types
/// (`deny_unknown_fields` everywhere). Secrets files are not read (they do not exist here).
fn parses_as_config(what: &str, figment: Figment) -> Config {
    figment
        .extract::<Config>()
        .unwrap_or_else(|e| panic!("{what}: not a flagrelay configuration: {e}"))
}

/// `FLAGRELAY_SECTION__KEY=value` variables as a nested document.
fn env_document(vars: &BTreeMap<String, String>) -> Value {
    let mut doc = serde_json::Map::new();
    for (name, value) in vars {
        let Some(path) = name.strip_prefix("FLAGRELAY_") else {
            continue;
        };
        let (section, key) = path
            .split_once("__")
            .unwrap_or_else(|| panic!("{name} is not FLAGRELAY_<SECTION>__<KEY>"));
        doc.entry(section.to_ascii_lowercase())
            .or_insert_with(|| Value::Object(Default::default()))
            .as_object_mut()
            .unwrap()
            .insert(key.to_ascii_lowercase(), Value::String(value.clone()));
    }
    Value::Object(doc)
}

/// A systemd template's variables with the instance name filled in (`%i`: the worker's admin
/// port in `flagrelay-work@.service`).
fn instantiated(vars: BTreeMap<String, String>) -> BTreeMap<String, String> {
    vars.into_iter()
        .map(|(k, v)| (k, v.replace("%i", "9091")))
        .collect()
}

#[test]
fn compose_runs_the_broker_serve_scalable_workers_and_the_simulators_in_a_profile() {
    let doc = compose();
    let services = doc["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["postgres", "rabbitmq", "serve", "work", "sim"])
    );

    let rabbit = &services["rabbitmq"];
    assert!(
        rabbit["image"].as_str().unwrap().contains("-management"),
        "management UI"
    );
    assert!(
        strings(&rabbit["ports"])
            .iter()
            .any(|p| p.ends_with(":15672")),
        "the management UI is published"
    );
    assert!(rabbit["healthcheck"]["test"].is_array());

    for (name, service) in services {
        assert!(
            service.get("container_name").is_none(),
            "{name}: container_name blocks --scale"
        );
    }
    let work = &services["work"];
    assert!(
        work.get("ports").is_none(),
        "work: host ports block --scale"
    );
    assert_eq!(work["command"][0], "work");
    assert_eq!(services["serve"]["command"][0], "serve");
    assert_eq!(strings(&services["sim"]["profiles"]), ["sim"]);
    assert_eq!(services["sim"]["command"][0], "sim");
    for name in ["serve", "work"] {
        assert_eq!(
            services[name]["depends_on"]["rabbitmq"]["condition"], "service_healthy",
            "{name} waits for the broker"
        );
        // Nothing overrides the image's HEALTHCHECK (the admin listener's /healthz).
        assert!(services[name].get("healthcheck").is_none(), "{name}");
        assert_eq!(
            services[name]["environment"]["FLAGRELAY_ADMIN__LISTEN"], "0.0.0.0:9090",
            "{name}: the admin listener on the compose network"
        );
    }
    assert_eq!(
        services["sim"]["healthcheck"]["disable"], true,
        "sim has no admin listener"
    );
    assert!(
        strings(&services["serve"]["ports"]).contains(&"8080:8080".to_owned()),
        "the webhook is published"
    );
}

/// Every secret is a compose secret file, mounted at /run/secrets/<name>, named by the
/// configuration's `*_file` key — and nothing secret is inline.
#[test]
fn compose_mounts_config_and_secrets_and_the_config_names_them_by_file() {
    let doc = compose();
    let defined: BTreeSet<String> = doc["secrets"]
        .as_object()
        .expect("top-level secrets")
        .iter()
        .map(|(name, s)| {
            let file = s["file"]
                .as_str()
                .unwrap_or_else(|| panic!("secret {name} has a file"));
            assert!(
                file.starts_with("./secrets/"),
                "{name}: {file} (git-ignored directory)"
            );
            name.clone()
        })
        .collect();
    assert!(read(".gitignore").lines().any(|l| l.trim() == "/secrets/"));

    let configs = doc["configs"].as_object().expect("top-level configs");
    for (name, c) in configs {
        let file = c["file"].as_str().unwrap();
        assert!(repo().join(file).is_file(), "config {name}: {file} exists");
    }

    // The database's own password is the postgres service's alone; flagrelay has the URL.
    let infrastructure: BTreeSet<String> = strings(&doc["services"]["postgres"]["secrets"])
        .into_iter()
        .collect();
    let flagrelay_secrets: BTreeSet<String> =
        defined.difference(&infrastructure).cloned().collect();
    for name in ["serve", "work"] {
        let service = &doc["services"][name];
        let mounted: BTreeSet<String> = strings(&service["secrets"]).into_iter().collect();
        assert_eq!(
            mounted, flagrelay_secrets,
            "{name} mounts every flagrelay secret"
        );

        let config = service["configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["target"] == "/etc/flagrelay/flagrelay.toml")
            .unwrap_or_else(|| panic!("{name} mounts flagrelay.toml"));
        let source = config["source"].as_str().unwrap();
        let path = configs[source]["file"].as_str().unwrap();
        let text = read(path);
        assert_eq!(
            service["command"][2], "/etc/flagrelay/flagrelay.toml",
            "{name} runs with the mounted config"
        );

        // The `*_file` keys point at mounted secrets, and name all of them.
        let toml: toml::Table = text.parse().unwrap();
        let mut named = BTreeSet::new();
        for (section, table) in &toml {
            for (key, value) in table.as_table().into_iter().flatten() {
                if key.ends_with("_file") {
                    let file = value.as_str().unwrap();
                    let secret = file
                        .strip_prefix("/run/secrets/")
                        .unwrap_or_else(|| panic!("{section}.{key} = {file}: not a secret"));
                    assert!(
                        mounted.contains(secret),
                        "{section}.{key}: {secret} is not mounted"
                    );
                    named.insert(secret.to_owned());
                }
                for secret_key in ["client_secret", "client_state", "password", "key", "url"] {
                    assert_ne!(key, secret_key, "{path}: {section}.{key} is inline");
                }
            }
        }
        assert_eq!(named, mounted, "{name}: every mounted secret is used");

        // The config and the service's FLAGRELAY_ variables are keys flagrelay knows.
        let env: BTreeMap<String, String> = service["environment"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        let config = parses_as_config(
            &format!("{path} + the environment of {name}"),
            Figment::from(Serialized::defaults(Config::default()))
                .merge(Toml::string(&text))
                .merge(Serialized::defaults(env_document(&instantiated(env)))),
        );
        assert_eq!(config.receiver.listen.port(), 8080);
        assert_eq!(
            config.admin.listen.map(|a| a.to_string()).as_deref(),
            Some("0.0.0.0:9090"),
            "{name}: the admin listener where the image's health check looks"
        );
        if name == "work" {
            // State lives in PostgreSQL: replicas need no shared volume.
            assert_eq!(
                config.state.url_file.as_deref(),
                Some(std::path::Path::new("/run/secrets/state_url")),
                "work: state.url_file names the compose secret with the postgres URL"
            );
            assert!(
                service["volumes"].is_null(),
                "work: no shared state volume: {:?}",
                service["volumes"]
            );
            let depends = service["depends_on"].as_object().expect("depends_on");
            assert!(depends.contains_key("postgres"), "work waits for postgres");
        }
    }
}

#[test]
fn the_image_is_multi_stage_non_root_and_health_checked() {
    let dockerfile = read("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let from = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(from >= 2, "multi-stage: {from} FROM lines");
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "non-root: {user}"
    );
    // The instruction with its `\` continuation lines.
    let start = lines
        .iter()
        .position(|l| l.starts_with("HEALTHCHECK "))
        .expect("a HEALTHCHECK");
    let end = (start..lines.len())
        .find(|&i| !lines[i].ends_with('\\'))
        .unwrap();
    let health = lines[start..=end].join(" ");
    assert!(
        health.contains(":9090/healthz"),
        "probes the admin listener: {health}"
    );
    assert!(
        health.contains("\"flagrelay\", \"healthcheck\""),
        "probes with the binary itself: {health}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("curl")),
        "no curl in the image"
    );
    assert!(
        !dockerfile.starts_with("# syntax="),
        "no frontend image pulled at build time"
    );
    assert!(
        read(".dockerignore")
            .lines()
            .any(|l| l.trim() == "secrets/"),
        "secrets/ stays out of the build context"
    );
    let exposed: BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(str::split_whitespace)
        .collect();
    assert_eq!(exposed, BTreeSet::from(["8080", "9090"]));
}

/// `Key=value` lines of a unit file, in order.
fn unit_entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not Key=value: {l}"));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[test]
fn systemd_units_are_valid_hardened_and_pass_credentials_as_files() {
    let bin = env!("CARGO_BIN_EXE_flagrelay");
    let dir = tempfile::tempdir().unwrap();
    for (file, instance) in [
        ("flagrelay-serve.service", "flagrelay-serve.service"),
        ("flagrelay-work@.service", "flagrelay-work@9091.service"),
    ] {
        let text = read(&format!("examples/systemd/{file}"));
        let entries = unit_entries(&text);
        let get = |key: &str| -> Vec<&str> {
            entries
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(get("DynamicUser"), ["yes"], "{file}");
        assert_eq!(
            get("User"),
            ["flagrelay"],
            "{file}: one uid for every instance"
        );
        for (key, value) in [
            ("ProtectSystem", "strict"),
            ("NoNewPrivileges", "yes"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
        ] {
            assert_eq!(get(key), [value], "{file}: {key}");
        }
        let exec = get("ExecStart");
        assert!(exec[0].starts_with("/usr/local/bin/flagrelay "), "{file}");

        // Every credential is handed over as a `*_FILE` variable, and every such variable
        // reads a credential.
        let credentials: BTreeSet<&str> = get("LoadCredential")
            .iter()
            .map(|c| c.split_once(':').expect("name:path").0)
            .collect();
        let env: BTreeMap<String, String> = get("Environment")
            .iter()
            .map(|e| {
                let (k, v) = e.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let from_files: BTreeSet<&str> = env
            .iter()
            .filter(|(k, _)| k.ends_with("_FILE"))
            .map(|(k, v)| {
                v.strip_prefix("%d/")
                    .unwrap_or_else(|| panic!("{file}: {k}={v} is not a credential"))
            })
            .collect();
        assert_eq!(credentials, from_files, "{file}");
        assert!(!credentials.is_empty());
        let config = parses_as_config(
            &format!("{file} environment"),
            Figment::from(Serialized::defaults(Config::default()))
                .merge(Serialized::defaults(env_document(&instantiated(env)))),
        );
        assert!(
            config.signing.key_file.is_some(),
            "{file}: signing key from a credential"
        );

        // systemd's own check, offline, with the binary this build made.
        std::fs::write(
            dir.path().join(instance),
            text.replace("/usr/local/bin/flagrelay", bin),
        )
        .unwrap();
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.path().join(instance))
            .output();
        match out {
            Ok(out) => {
                let said = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                assert!(
                    out.status.success() && said.trim().is_empty(),
                    "systemd-analyze verify {file}:\n{said}"
                );
            }
            Err(e) => panic!(
                "systemd-analyze is needed to verify the unit files ({e}); it comes with \
                 systemd (Debian: apt-get install systemd)"
            ),
        }
    }
}
