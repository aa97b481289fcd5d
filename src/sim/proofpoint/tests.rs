//! Tests of the simulator's HTTP surface, spoken to with raw requests (the client's own tests
//! cover the client against it).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::*;

const ORG: &str = "example.com";
const ADMIN: &str = "admin@example.com";
const PARTNER: &str = "partner@msp.example";
const PASSWORD: &str = "correct-horse-battery";

struct Fixture {
    sim: ProofpointSim,
    server: SimServer,
    http: reqwest::Client,
}

impl Fixture {
    async fn new() -> Self {
        let sim = ProofpointSim::new();
        sim.add_org(ORG);
        sim.add_org("other.com");
        sim.add_admin(ADMIN, PASSWORD, Some(vec![ORG.into()]));
        sim.add_admin(PARTNER, PASSWORD, None);
        sim.upsert_user(
            ORG,
            json!({
                "primary_email": "ada@example.com", "is_active": true,
                "alias_emails": ["a@example.com"], "odin_settings": {"x": 1}, "future": "kept"
            }),
        )
        .unwrap();
        let server = sim
            .spawn(TcpListener::bind("127.0.0.1:0").await.unwrap())
            .await;
        Self {
            sim,
            server,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    /// A request as `ADMIN` (or `as_user`), returning status and parsed body (Null if none).
    async fn call_as(
        &self,
        as_user: Option<(&str, &str)>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path));
        if let Some((user, password)) = as_user {
            req = req.header("X-User", user).header("X-Password", password);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_as(Some((ADMIN, PASSWORD)), method, path, body)
            .await
    }
}

#[tokio::test]
async fn auth_is_checked_on_every_route() {
    let f = Fixture::new().await;
    let users = "/orgs/example.com/users";
    let (s, _) = f.call_as(None, Method::GET, users, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, body) = f
        .call_as(Some((ADMIN, "nope")), Method::GET, users, None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body["status"], 401);
    let (s, _) = f
        .call_as(Some((ADMIN, PASSWORD)), Method::GET, "/me", None)
        .await;
    assert_eq!(s, StatusCode::OK);

    // An org admin has no rights elsewhere (existing or not); a partner admin everywhere.
    for path in ["/orgs/other.com/users", "/orgs/unknown.com/users"] {
        let (s, _) = f.call(Method::GET, path, None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}");
    }
    let partner = Some((PARTNER, PASSWORD));
    let (s, _) = f
        .call_as(partner, Method::GET, "/orgs/other.com/users", None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f
        .call_as(partner, Method::GET, "/orgs/unknown.com/users", None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, body) = f
        .call_as(partner, Method::GET, "/endpoints/example.com", None)
        .await;
    assert_eq!((s, &body["stack"]), (StatusCode::OK, &json!("us1")));

    // Read-only admins read but do not write.
    f.sim.set_admin_read_only(ADMIN, true);
    let (s, _) = f.call(Method::GET, users, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = f
        .call(
            Method::PUT,
            "/orgs/example.com/settings/azure/exemptions",
            Some(json!({"emails": "a@example.com"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    let log = f.sim.request_log();
    assert!(log.iter().all(|r| r.started <= r.finished));
    assert_eq!(log[1].user.as_deref(), Some(ADMIN));
    assert!(!format!("{log:?} {:?}", f.sim).contains(PASSWORD));
}

#[tokio::test]
async fn put_replaces_the_whole_object_by_default() {
    let f = Fixture::new().await;
    let path = "/orgs/example.com/users/ADA@example.com";
    let (s, mut user) = f.call(Method::GET, path, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(user["future"], "kept");

    // A client that only knows some fields drops the others under Replace...
    let partial = json!({"primary_email": "ada@example.com", "is_active": false});
    let (s, _) = f.call(Method::PUT, path, Some(partial.clone())).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(f.sim.user_json(ORG, "ada@example.com").unwrap(), partial);

    // ...and keeps them under Merge.
    f.sim.set_put_mode(PutMode::Merge);
    let (s, _) = f.call(Method::PUT, path, Some(user.clone())).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = f.call(Method::PUT, path, Some(partial.clone())).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    user["is_active"] = json!(false);
    assert_eq!(f.sim.user_json(ORG, "ada@example.com").unwrap(), user);

    let writes = f.sim.writes();
    let last = writes.last().unwrap();
    assert_eq!(
        (last.method.as_str(), last.email.as_deref()),
        ("PUT", Some("ada@example.com"))
    );
    assert_eq!(last.target, WriteTarget::User);
}

#[tokio::test]
async fn bad_user_writes_are_refused() {
    let f = Fixture::new().await;
    let path = "/orgs/example.com/users/ada@example.com";
    let cases = [
        json!({"primary_email": "eve@example.com", "is_active": true}),
        json!({"primary_email": "ada@example.com", "is_active": "yes"}),
        json!({"primary_email": "ada@example.com", "type": "superuser"}),
        json!({"primary_email": "ada@example.com", "alias_emails": "a@example.com"}),
        json!({"primary_email": "ada@example.com", "uid": 1}),
        json!(["not", "an", "object"]),
    ];
    for body in cases {
        let (s, err) = f.call(Method::PUT, path, Some(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert!(err["error_message"].is_string(), "{err}");
    }
    let resp = f
        .http
        .put(f.url(path))
        .header("X-User", ADMIN)
        .header("X-Password", PASSWORD)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (s, _) = f
        .call(
            Method::PUT,
            "/orgs/example.com/users/ghost@example.com",
            Some(json!({"primary_email": "ghost@example.com"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(f.sim.writes().iter().all(|w| w.method == "UPSERT"));
}

#[tokio::test]
async fn create_single_and_batch_with_duplicates() {
    let f = Fixture::new().await;
    let users = "/orgs/example.com/users";
    let (s, created) = f
        .call(
            Method::POST,
            users,
            Some(json!({"primary_email": "new@example.com", "send_welcome_email": false})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(created["is_active"], true);
    assert!(created["uid"].is_u64());
    assert!(created.get("send_welcome_email").is_none(), "POST only");
    let (s, _) = f
        .call(
            Method::POST,
            users,
            Some(json!({"primary_email": "NEW@example.com"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);

    let batch = json!([{"primary_email": "b1@example.com"}, {"primary_email": "ada@example.com"}]);
    let (s, body) = f.call(Method::POST, users, Some(batch)).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(body["users"].as_array().unwrap().len(), 1);
    assert_eq!(body["errors"][0]["status"], 409);
    assert_eq!(body["errors"][0]["identifier"], "ada@example.com");

    let (s, list) = f.call(Method::GET, users, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["users"].as_array().unwrap().len(), 3);
    let (s, _) = f
        .call(
            Method::DELETE,
            "/orgs/example.com/users/b1@example.com",
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(f.sim.user(ORG, "b1@example.com").is_none());
}

#[tokio::test]
async fn exemption_endpoints() {
    let f = Fixture::new().await;
    let path = "/orgs/example.com/settings/azure/exemptions";
    let (s, _) = f
        .call(Method::PUT, path, Some(json!({"emails": "A@example.com"})))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let resp = f
        .http
        .put(f.url(path))
        .header("X-User", ADMIN)
        .header("X-Password", PASSWORD)
        .header("Content-Type", "text/plain")
        .body("b@example.com, c@example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (s, list) = f.call(Method::GET, path, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        list,
        json!([{"email": "a@example.com"}, {"email": "b@example.com"}, {"email": "c@example.com"}])
    );
    let (s, _) = f
        .call(Method::PUT, path, Some(json!({"emails": "not an address"})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let one = format!("{path}/b%40example.com");
    assert_eq!(
        f.call(Method::DELETE, &one, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        f.call(Method::DELETE, &one, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(f.sim.exemptions(ORG), ["a@example.com", "c@example.com"]);
    assert_eq!(
        f.call(Method::DELETE, path, None).await.0,
        StatusCode::NO_CONTENT
    );
    assert!(f.sim.exemptions(ORG).is_empty());

    let azure = "/orgs/example.com/settings/azure";
    let (s, settings) = f.call(Method::GET, azure, None).await;
    assert_eq!(
        (s, &settings["sync_frequency"]),
        (StatusCode::OK, &json!(24))
    );
    let (s, _) = f
        .call(Method::PUT, azure, Some(json!({"sync_frequency": 3})))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_eq!(f.sim.azure_settings(ORG).unwrap()["sync_frequency"], 3);
    let (s, _) = f
        .call(Method::PUT, azure, Some(json!({"add_users": "yes"})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn fail_next_then_recover() {
    let f = Fixture::new().await;
    f.sim.fail_next(2, 503);
    f.sim.fail_next(1, 429);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(f.call(Method::GET, "/me", None).await.0.as_u16());
    }
    assert_eq!(seen, [503, 503, 429, 200]);
    let c = f.sim.counters();
    assert_eq!(c.injected_failures, 3);
    assert_eq!(c.by_status.get(&503), Some(&2));
    assert!(f.sim.request_log().iter().take(3).all(|r| r.injected));
    assert!(f.sim.faults().fail_next.is_empty());
}

#[tokio::test]
async fn fail_for_is_a_sustained_outage_that_ends() {
    let f = Fixture::new().await;
    f.sim.fail_for(Duration::from_secs(1), 500);
    for _ in 0..3 {
        assert_eq!(f.call(Method::GET, "/me", None).await.0, 500);
    }
    let left = f.sim.faults().fail_for.expect("still in the outage");
    tokio::time::sleep(left + Duration::from_millis(20)).await;
    assert_eq!(f.call(Method::GET, "/me", None).await.0, 200);
    assert_eq!(f.sim.faults().fail_for, None);
}

#[tokio::test]
async fn license_cap_refuses_activation_beyond_it() {
    let f = Fixture::new().await;
    f.sim.set_license_cap(ORG, Some(1)).unwrap();
    f.sim
        .upsert_user(
            ORG,
            json!({"primary_email": "bob@example.com", "is_active": false}),
        )
        .unwrap();
    let bob = "/orgs/example.com/users/bob@example.com";
    let mut body = f.sim.user_json(ORG, "bob@example.com").unwrap();
    body["is_active"] = json!(true);
    let (s, err) = f.call(Method::PUT, bob, Some(body.clone())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(err["errors"][0]["identifier"], "bob@example.com");
    assert!(!f.sim.user(ORG, "bob@example.com").unwrap().is_active);

    // Functional accounts are free; freeing a license lets Bob in.
    let mut ada = f.sim.user_json(ORG, "ada@example.com").unwrap();
    ada["is_active"] = json!(false);
    let ada_path = "/orgs/example.com/users/ada@example.com";
    assert_eq!(f.call(Method::PUT, ada_path, Some(ada)).await.0, 204);
    assert_eq!(f.call(Method::PUT, bob, Some(body)).await.0, 204);
    let shared = json!({"primary_email": "shared@example.com", "type": "functional_account"});
    let (s, _) = f
        .call(Method::POST, "/orgs/example.com/users", Some(shared))
        .await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test]
async fn control_routes_and_waiting_for_state() {
    let f = Fixture::new().await;
    let control = f.server.control_url();
    let put = f
        .http
        .put(format!("{control}/orgs/example.com/users"))
        .json(&json!({"primary_email": "carol@example.com", "is_active": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    assert_eq!(put.json::<Value>().await.unwrap()["is_active"], false);

    let waiter = {
        let sim = f.sim.clone();
        tokio::spawn(async move {
            sim.wait_until_active(ORG, "carol@example.com", true, Duration::from_secs(5))
                .await
        })
    };
    let mut carol = f.sim.user_json(ORG, "carol@example.com").unwrap();
    carol["is_active"] = json!(true);
    let path = "/orgs/example.com/users/carol@example.com";
    assert_eq!(f.call(Method::PUT, path, Some(carol)).await.0, 204);
    assert!(waiter.await.unwrap());
    assert!(
        !f.sim
            .wait_until_active(ORG, "carol@example.com", false, Duration::from_millis(50))
            .await
    );

    let state: Value = f
        .http
        .get(format!("{control}/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        state["orgs"]["example.com"]["users"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(!state.to_string().contains(PASSWORD));

    let faults = format!("{control}/faults");
    let bad = f
        .http
        .post(&faults)
        .json(&json!({"fail_next": [200]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let ok = f
        .http
        .post(&faults)
        .json(&json!({"fail_next": [502], "latency": "10ms"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
    assert_eq!(f.call(Method::GET, "/me", None).await.0, 502);
    assert_eq!(f.sim.faults().latency, Duration::from_millis(10));
}

#[tokio::test]
async fn set_up_errors_are_reported() {
    let sim = ProofpointSim::new();
    assert!(matches!(
        sim.upsert_user("nowhere.com", json!({"primary_email": "a@nowhere.com"})),
        Err(SimError::Refused { status: 404, .. })
    ));
    sim.add_org("x.com");
    assert!(matches!(
        sim.upsert_user("x.com", json!({"is_active": true})),
        Err(SimError::Refused { status: 400, .. })
    ));
    assert!(sim.set_license_cap("nowhere.com", Some(1)).is_err());
}
