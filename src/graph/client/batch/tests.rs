//! Read batching against the Graph simulator's real `$batch` endpoint. Reads are made to
//! wait by holding every slot of the tenant, so which reads share a request is certain.

use std::time::Duration;

use super::super::tests::{ALICE, Fixture, client_for, fixture, numbered};
use super::{GraphClient, MAX_BATCH};
use crate::graph::{GraphApi, GraphError, GraphUser, USER_SELECT};
use crate::sim::graph::RequestRecord;
use crate::sim::graph::tests::{SECRET, TENANT};

/// Read `ids` while every slot of the tenant is held; once all of them wait, call
/// `meanwhile` and release the slots.
async fn read_after_waiting(
    client: &GraphClient,
    ids: &[String],
    meanwhile: impl FnOnce(),
) -> Vec<Result<Option<GraphUser>, GraphError>> {
    let queues = client.reads.as_ref().expect("batching is on by default");
    let held = queues.hold_slots(TENANT);
    let reads = futures::future::join_all(
        ids.iter()
            .map(|id| client.get_user(TENANT, id, USER_SELECT)),
    );
    let release = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while queues.waiting(TENANT) < ids.len() {
            assert!(tokio::time::Instant::now() < deadline, "reads never queued");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        meanwhile();
        drop(held);
    };
    tokio::join!(reads, release).0
}

fn api_requests(f: &Fixture) -> Vec<RequestRecord> {
    f.sim
        .request_log()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1.0/"))
        .collect()
}

#[tokio::test]
async fn reads_that_wait_go_out_as_batches_of_at_most_20_each_answered_by_id() {
    let f = fixture().await;
    for i in 0..25 {
        f.sim.upsert_user(TENANT, numbered(i)).unwrap();
    }
    // 25 users that exist and one that does not: 26 reads, 20 + 6.
    let mut ids: Vec<String> = (0..25).map(|i| numbered(i).id).collect();
    ids.push("dddddddd-0000-4000-8000-000000000404".into());
    let reads = read_after_waiting(&f.client, &ids, || ()).await;
    for (id, read) in ids.iter().zip(reads) {
        let user = read.unwrap();
        if id.starts_with("dddddddd") {
            assert_eq!(user, None, "a missing user in a batch reads as deleted");
        } else {
            let user = user.expect("user");
            assert_eq!(
                &user.id, id,
                "each read gets its own user, not a neighbour's"
            );
            assert_eq!(
                user.account_enabled,
                Some(true),
                "$select honoured in the batch"
            );
        }
    }
    let log = api_requests(&f);
    let batches: Vec<_> = log
        .iter()
        .filter(|r| r.path == "/v1.0/$batch" && !r.in_batch)
        .collect();
    let in_batch = log.iter().filter(|r| r.in_batch).count();
    let alone = log
        .iter()
        .filter(|r| r.path.starts_with("/v1.0/users/") && !r.in_batch)
        .count();
    assert_eq!(
        batches.len(),
        26_usize.div_ceil(MAX_BATCH),
        "26 waiting reads: 2 batches; log: {log:#?}"
    );
    assert_eq!(in_batch, 26, "every read was a request of a batch");
    assert_eq!(alone, 0, "no read was sent on its own");
}

#[tokio::test]
async fn a_read_that_finds_a_free_slot_is_sent_at_once_on_its_own() {
    let f = fixture().await;
    let alice = f.client.get_user(TENANT, ALICE, USER_SELECT).await.unwrap();
    assert!(alice.is_some());
    let log = api_requests(&f);
    assert_eq!(log.len(), 1, "{log:#?}");
    assert!(log[0].path.starts_with("/v1.0/users/") && !log[0].in_batch);
}

#[tokio::test]
async fn a_throttled_read_in_a_batch_holds_the_tenant_back_while_the_others_succeed() {
    let f = fixture().await;
    for i in 0..5 {
        f.sim.upsert_user(TENANT, numbered(i)).unwrap();
    }
    let ids: Vec<String> = (0..5).map(|i| numbered(i).id).collect();
    // Injected throttling counts the batch's requests (not the batch): one of the five.
    let reads = read_after_waiting(&f.client, &ids, || f.sim.throttle_next(1, Some(30))).await;
    let mut throttled = 0;
    for read in reads {
        match read {
            Ok(Some(_)) => {}
            Err(GraphError::Throttled {
                status: 429,
                retry_after: Some(wait),
            }) => {
                assert_eq!(wait, Duration::from_secs(30));
                throttled += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(throttled, 1);
    // The Retry-After of one answer in a batch holds every read of the tenant, unsent.
    let before = f.sim.request_log().len();
    let err = f
        .client
        .get_user(TENANT, &numbered(0).id, USER_SELECT)
        .await
        .unwrap_err();
    assert!(
        matches!(err, GraphError::Throttled { retry_after: Some(left), .. } if left > Duration::from_secs(25)),
        "{err:?}"
    );
    assert_eq!(f.sim.request_log().len(), before, "nothing sent while held");
}

#[tokio::test]
async fn a_batch_that_fails_as_a_whole_fails_each_of_its_reads_with_the_same_error() {
    let f = fixture().await;
    f.sim
        .update_faults(|x| x.api_latency = Duration::from_secs(2))
        .unwrap();
    let ids: Vec<String> = (0..3).map(|i| numbered(i).id).collect();
    // A client whose timeout the slow simulator exceeds.
    let slow = client_for(&f.server, SECRET, Duration::from_millis(500));
    for read in read_after_waiting(&slow, &ids, || ()).await {
        let err = read.unwrap_err();
        assert!(matches!(err, GraphError::Timeout), "{err:?}");
    }
}
