//! JSON batching through the simulator's HTTP surface: each request answered as if sent on
//! its own, the batch refused as a whole only when it is malformed.

use super::*;

fn by_id(body: &Value) -> HashMap<String, Value> {
    body["responses"]
        .as_array()
        .expect("responses")
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

async fn batch(h: &Harness, requests: Value) -> (u16, Value) {
    h.call(
        reqwest::Method::POST,
        "/$batch",
        Some(json!({ "requests": requests })),
    )
    .await
}

#[tokio::test]
async fn each_request_of_a_batch_is_answered_as_if_sent_alone() {
    let h = harness().await;
    let alice = alice().id;
    let (status, body) = batch(
        &h,
        json!([
            {"id": "a", "method": "GET", "url": format!("/users/{alice}?$select=id,accountEnabled")},
            {"id": "b", "method": "GET", "url": "users/nobody"},
            {"id": "c", "method": "GET", "url": format!("/users/{alice}/mailboxSettings")},
            {"id": "d", "method": "GET", "url": format!("/users/{alice}?$select=nonsense")},
            {"id": "e", "method": "PATCH", "url": format!("/users/{alice}")},
        ]),
    )
    .await;
    assert_eq!(
        status, 200,
        "the batch succeeds whatever its requests do: {body}"
    );
    let answers = by_id(&body);
    assert_eq!(answers.len(), 5);
    // Compared with the same requests sent alone.
    let (alone, alone_body) = h
        .get(&format!("/users/{alice}?$select=id,accountEnabled"))
        .await;
    assert_eq!(answers["a"]["status"], alone);
    assert_eq!(
        answers["a"]["body"]["accountEnabled"],
        alone_body["accountEnabled"]
    );
    assert_eq!(answers["b"]["status"], 404);
    assert_eq!(
        answers["b"]["body"]["error"]["code"],
        "Request_ResourceNotFound"
    );
    assert_eq!(
        answers["c"]["status"], 403,
        "mailbox settings need their permission"
    );
    assert_eq!(answers["d"]["status"], 400);
    assert_eq!(
        answers["e"]["status"], 400,
        "the simulator batches reads only"
    );
    let log = h.sim.request_log();
    let inner = log.iter().filter(|r| r.in_batch).count();
    let outer = log
        .iter()
        .filter(|r| r.path == "/v1.0/$batch" && !r.in_batch)
        .count();
    assert_eq!(
        (inner, outer),
        (4, 1),
        "four requests reached a route, in one batch"
    );
}

#[tokio::test]
async fn answers_come_back_in_an_order_of_their_own() {
    let h = harness().await;
    let alice = alice().id;
    let requests: Vec<Value> = (0..20)
        .map(|i| json!({"id": i.to_string(), "method": "GET", "url": format!("/users/{alice}")}))
        .collect();
    let (status, body) = batch(&h, Value::Array(requests)).await;
    assert_eq!(status, 200);
    let order: Vec<&str> = body["responses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    let sorted: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(order.len(), 20);
    assert_ne!(order, sorted, "clients must match answers by id");
}

#[tokio::test]
async fn malformed_batches_are_refused_as_a_whole() {
    let h = harness().await;
    let get = |id: &str| json!({"id": id, "method": "GET", "url": "/users/x"});
    let too_many: Vec<Value> = (0..21).map(|i| get(&i.to_string())).collect();
    let cases = [
        ("more than 20", Value::Array(too_many)),
        ("no requests", json!([])),
        ("duplicate ids", json!([get("1"), get("1")])),
        ("no url", json!([{"id": "1", "method": "GET"}])),
        (
            "nested batch",
            json!([{"id": "1", "method": "POST", "url": "/$batch"}]),
        ),
        (
            "absolute url",
            json!([{"id": "1", "method": "GET", "url": "https://graph.microsoft.com/v1.0/users/x"}]),
        ),
        (
            "dependsOn",
            json!([get("1"), {"id": "2", "method": "GET", "url": "/users/x", "dependsOn": ["1"]}]),
        ),
    ];
    for (case, requests) in cases {
        let (status, body) = batch(&h, requests).await;
        assert_eq!(status, 400, "{case}: {body}");
        assert!(body["error"]["message"].is_string(), "{case}: {body}");
    }
    let unauthenticated = h
        .http
        .post(h.url("/$batch"))
        .json(&json!({"requests": [get("1")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
}

#[tokio::test]
async fn injected_faults_count_per_request_not_per_batch() {
    let h = harness().await;
    let alice = alice().id;
    h.sim.throttle_next(1, Some(7));
    let requests: Vec<Value> = (0..4)
        .map(|i| json!({"id": i.to_string(), "method": "GET", "url": format!("/users/{alice}")}))
        .collect();
    let (status, body) = batch(&h, Value::Array(requests)).await;
    assert_eq!(
        status, 200,
        "throttling hits a request of the batch, not the batch"
    );
    let throttled: Vec<&Value> = body["responses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == 429)
        .collect();
    assert_eq!(throttled.len(), 1, "{body}");
    assert_eq!(throttled[0]["headers"]["retry-after"], "7");
}
