//! The container image builds from exactly what its Dockerfile copies.
//!
//! The builder stage's `COPY` lines are read from the Dockerfile and exactly those paths
//! are copied into an empty directory. There, cargo must load the manifest (every target it
//! names present: a missing `[[bench]]` file stops `docker build` before compiling), and
//! every file the compiler read when this test crate's copy of the library was built (its
//! dep-info: the sources, `include_str!` files, the migrations `sqlx::migrate!` embeds)
//! must be there too. Compiling the context again would prove the same at the cost of a
//! second full build. Where a Docker daemon answers, `docker build` itself runs too.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `(source, destination)` of each `COPY` of the first (builder) stage, relative to the
/// context and to the stage's `WORKDIR`.
fn builder_copies(dockerfile: &str) -> Vec<(String, String)> {
    let mut stages = 0;
    let mut copies = Vec::new();
    for line in dockerfile.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            stages += 1;
        }
        if stages != 1 {
            continue;
        }
        if let Some(args) = line.strip_prefix("COPY ") {
            let parts: Vec<&str> = args.split_whitespace().collect();
            assert!(
                !parts.iter().any(|p| p.starts_with("--")),
                "builder COPY with flags: {line}"
            );
            let (dest, sources) = parts.split_last().expect("COPY names a destination");
            for src in sources {
                let dest = if dest.ends_with('/') && *dest != "./" {
                    format!("{dest}{src}")
                } else if *dest == "./" {
                    (*src).to_owned()
                } else {
                    (*dest).to_owned()
                };
                copies.push(((*src).to_owned(), dest.trim_start_matches("./").to_owned()));
            }
        }
    }
    copies
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("COPY {}: {e}", from.display()));
    }
}

/// The source file of every target the manifest declares (`path`, or cargo's default).
fn manifest_targets(manifest: &str) -> Vec<PathBuf> {
    let doc: toml::Table = manifest.parse().unwrap();
    let mut paths = Vec::new();
    let lib = doc
        .get("lib")
        .and_then(|l| l.get("path"))
        .and_then(|p| p.as_str());
    paths.push(PathBuf::from(lib.unwrap_or("src/lib.rs")));
    for (kind, dir) in [
        ("bin", "src/bin"),
        ("bench", "benches"),
        ("test", "tests"),
        ("example", "examples"),
    ] {
        for t in doc
            .get(kind)
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let path = t.get("path").and_then(|p| p.as_str()).map(PathBuf::from);
            let name = t.get("name").and_then(|n| n.as_str()).unwrap_or_default();
            paths.push(path.unwrap_or_else(|| PathBuf::from(format!("{dir}/{name}.rs"))));
        }
    }
    paths
}

/// Every repository file the compiler read for the library, from the newest dep-info file
/// of the library (not of its unit tests) in this test run's target directory.
fn files_the_library_build_read() -> Vec<PathBuf> {
    let deps = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("debug/deps");
    let newest = std::fs::read_dir(&deps)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("flagrelay-")
                && p.extension().is_some_and(|x| x == "d")
        })
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            text.lines().any(|l| l == "src/lib.rs:").then_some(())?;
            // The library itself (`libflagrelay-….rlib`/`.rmeta`), not its unit-test build
            // (an executable `flagrelay-…`), which also reads test-only files such as the
            // schemas its tests `include_str!`.
            text.lines()
                .any(|l| {
                    l.split(": ")
                        .next()
                        .is_some_and(|out| out.contains("/libflagrelay-"))
                })
                .then_some(())?;
            Some((std::fs::metadata(&p).ok()?.modified().ok()?, text))
        })
        .max_by_key(|(at, _)| *at)
        .expect("the library's dep-info (built for this test crate)")
        .1;
    let root = repo().canonicalize().unwrap();
    newest
        .lines()
        .filter_map(|l| l.strip_suffix(':'))
        .filter_map(|f| repo().join(f).canonicalize().ok())
        .filter_map(|f| f.strip_prefix(&root).ok().map(Path::to_path_buf))
        .filter(|f| !f.starts_with("target"))
        .collect()
}

#[test]
fn the_build_context_holds_everything_the_build_needs() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let copies = builder_copies(&dockerfile);
    assert!(copies.iter().any(|(s, _)| s == "Cargo.lock"), "{copies:?}");
    let context = tempfile::tempdir().unwrap();
    for (src, dest) in &copies {
        copy_tree(&repo().join(src), &context.path().join(dest));
    }
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--locked",
            "--offline",
            "--no-deps",
            "--format-version",
            "1",
        ])
        .current_dir(context.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo cannot load the manifest from the image's build context:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let targets = manifest_targets(&std::fs::read_to_string(repo().join("Cargo.toml")).unwrap());
    let absent: Vec<_> = targets
        .iter()
        .filter(|t| !context.path().join(t).exists())
        .collect();
    assert!(
        absent.is_empty(),
        "Cargo.toml names targets the build context lacks (cargo stops there): {absent:?}"
    );
    let read = files_the_library_build_read();
    assert!(read.iter().any(|f| f.ends_with("lib.rs")), "{read:?}");
    let missing: Vec<_> = read
        .iter()
        .filter(|f| !context.path().join(f).exists())
        .collect();
    assert!(
        missing.is_empty(),
        "the build reads files the Dockerfile does not COPY: {missing:?}"
    );
}

#[test]
fn the_image_builds_where_a_docker_daemon_answers() {
    let daemon = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !daemon {
        eprintln!("no Docker daemon here: `docker build` not run (the context check still is)");
        return;
    }
    let out = Command::new("docker")
        .args(["build", "-q", "-t", "flagrelay:test", "."])
        .current_dir(repo())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server answering `/healthz` with `status`.
async fn health_server(status: u16) -> String {
    let app = axum::Router::new().route(
        "/healthz",
        axum::routing::get(
            move || async move { axum::http::StatusCode::from_u16(status).unwrap() },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/healthz")
}

#[tokio::test]
async fn the_healthcheck_command_exits_by_the_answer() {
    let probe = |url: String| async move {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_flagrelay"))
            .args(["healthcheck", "--url", &url, "--timeout", "2s"])
            .output()
            .await
            .unwrap()
            .status
            .success()
    };
    assert!(probe(health_server(200).await).await, "200: healthy");
    assert!(!probe(health_server(503).await).await, "503: unhealthy");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert!(
        !probe(format!("http://{closed}/healthz")).await,
        "nothing listening: unhealthy"
    );
}
