//! Identity bindings and conflicts, due work, and the decision history.

use chrono::{DateTime, Duration, Utc};
use flagrelay::identity::Binding;
use flagrelay::ids::{TenantId, UserId};
use flagrelay::policy::breaker::BreakerConfig;
use flagrelay::store::{ConflictRecord, Due, DueKind, HistoryEntry, HistoryQuery, UserState};

use super::{Backend, ask, key, to_ms, user};

conformance!(
    bindings_are_one_to_one_per_tenant_and_found_either_way,
    conflicts_are_recorded_replaced_cleared_and_cleared_by_a_binding,
    due_work_is_returned_once_in_time_order_until_due_again,
    history_is_queried_by_user_since_and_limit_and_pruned,
);

const OBJ1: &str = "AAAA0000-0000-4000-8000-000000000001";
const OBJ2: &str = "aaaa0000-0000-4000-8000-000000000002";

fn binding(tenant: &str, object: &str, address: &str, at: DateTime<Utc>) -> Binding {
    Binding {
        tenant_id: tenant.into(),
        object_id: object.into(),
        address: address.into(),
        bound_at: at,
        how: Binding::FIRST_SEEN.into(),
    }
}

async fn bindings_are_one_to_one_per_tenant_and_found_either_way(b: &Backend) {
    let s = b.store.as_ref();
    let now = to_ms(Utc::now());
    let t = TenantId::new("T-1");
    s.bind(&binding("T-1", OBJ1, "Alice@Contoso.test", now))
        .await
        .unwrap();
    let expected = binding("t-1", &OBJ1.to_ascii_lowercase(), "alice@contoso.test", now);
    assert_eq!(
        s.binding_of_object(&t, &UserId::new(OBJ1)).await.unwrap(),
        Some(expected.clone())
    );
    assert_eq!(
        s.binding_of_address(&t, " ALICE@contoso.TEST")
            .await
            .unwrap(),
        Some(expected.clone())
    );
    let other_tenant = TenantId::new("t-2");
    assert_eq!(
        s.binding_of_address(&other_tenant, "alice@contoso.test")
            .await
            .unwrap(),
        None,
        "bindings are per tenant"
    );

    // The address moves to another object: the first object's binding goes with it.
    let later = now + Duration::minutes(1);
    let mut accepted = binding("t-1", OBJ2, "alice@contoso.test", later);
    accepted.how = Binding::ACCEPTED.into();
    s.bind(&accepted).await.unwrap();
    assert_eq!(
        s.binding_of_object(&t, &UserId::new(OBJ1)).await.unwrap(),
        None
    );
    assert_eq!(
        s.binding_of_address(&t, "alice@contoso.test")
            .await
            .unwrap(),
        Some(accepted.clone())
    );
    // The object moves to another address: its old address is free.
    s.bind(&binding("t-1", OBJ2, "alice.new@contoso.test", later))
        .await
        .unwrap();
    assert_eq!(
        s.binding_of_address(&t, "alice@contoso.test")
            .await
            .unwrap(),
        None
    );
    s.bind(&binding("t-2", OBJ1, "alice@contoso.test", now))
        .await
        .unwrap();

    let all = s.bindings(None).await.unwrap();
    let pairs: Vec<_> = all
        .iter()
        .map(|b| (b.tenant_id.as_str(), b.address.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("t-1", "alice.new@contoso.test"),
            ("t-2", "alice@contoso.test")
        ]
    );
    let by_object = s.bindings(Some(OBJ2)).await.unwrap();
    assert_eq!(by_object.len(), 1);
    assert_eq!(by_object[0].address, "alice.new@contoso.test");
    let by_address = s.bindings(Some("Alice@Contoso.test")).await.unwrap();
    assert_eq!(by_address.len(), 1);
    assert_eq!(by_address[0].tenant_id, "t-2");
    assert!(
        s.bindings(Some("nobody@contoso.test"))
            .await
            .unwrap()
            .is_empty()
    );
}

fn conflict(object: &str, reason: &str, at: DateTime<Utc>) -> ConflictRecord {
    ConflictRecord {
        tenant_id: TenantId::new("t-1"),
        object_id: UserId::new(object),
        address: "alice@contoso.test".into(),
        reason: reason.into(),
        others: vec!["cccc0000-0000-4000-8000-000000000009".into()],
        detail: format!("{reason} for {object}"),
        seen_at: at,
    }
}

async fn conflicts_are_recorded_replaced_cleared_and_cleared_by_a_binding(b: &Backend) {
    let s = b.store.as_ref();
    let now = to_ms(Utc::now());
    assert!(s.conflicts().await.unwrap().is_empty());
    s.record_conflict(&conflict(
        OBJ2,
        "address_changed",
        now + Duration::seconds(5),
    ))
    .await
    .unwrap();
    s.record_conflict(&conflict(OBJ1, "address_held_by_other", now))
        .await
        .unwrap();
    let listed = s.conflicts().await.unwrap();
    assert_eq!(
        listed,
        [
            conflict(OBJ1, "address_held_by_other", now),
            conflict(OBJ2, "address_changed", now + Duration::seconds(5))
        ],
        "oldest first"
    );
    // One conflict per object: the newer replaces it.
    let newer = conflict(OBJ1, "outside_org_domains", now + Duration::seconds(10));
    s.record_conflict(&newer).await.unwrap();
    let listed = s.conflicts().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1], newer);

    s.clear_conflict(&key("T-1", OBJ2)).await.unwrap();
    assert_eq!(s.conflicts().await.unwrap(), [newer]);
    // An operator's accepted binding clears the object's conflict.
    s.bind(&binding("t-1", OBJ1, "alice@contoso.test", now))
        .await
        .unwrap();
    assert!(s.conflicts().await.unwrap().is_empty());
}

fn recheck_at(at: DateTime<Utc>) -> UserState {
    UserState {
        recheck_at: Some(at),
        ..UserState::default()
    }
}

async fn due_work_is_returned_once_in_time_order_until_due_again(b: &Backend) {
    let s = b.store.as_ref();
    let now = to_ms(Utc::now());
    let (u1, u2, u3) = (user(1), user(2), user(3));
    s.put_user(&u1, &recheck_at(now + Duration::minutes(10)), now)
        .await
        .unwrap();
    s.put_user(&u2, &recheck_at(now + Duration::minutes(5)), now)
        .await
        .unwrap();
    s.wake(&u3, now + Duration::minutes(1)).await.unwrap();
    assert!(s.due(now, 100).await.unwrap().is_empty(), "nothing due yet");
    let later = now + Duration::hours(1);
    let due = s.due(later, 100).await.unwrap();
    let expected = [
        Due {
            key: u3.clone(),
            at: now + Duration::minutes(1),
            kind: DueKind::Wake,
        },
        Due {
            key: u2.clone(),
            at: now + Duration::minutes(5),
            kind: DueKind::Recheck,
        },
        Due {
            key: u1.clone(),
            at: now + Duration::minutes(10),
            kind: DueKind::Recheck,
        },
    ];
    assert_eq!(due, expected, "oldest first");
    assert_eq!(s.due(later, 2).await.unwrap(), expected[..2], "the limit");
    assert_eq!(
        s.due(now + Duration::minutes(7), 100).await.unwrap(),
        expected[..2],
        "only what is due by then"
    );

    let other = (b.reopen)().await;
    for d in &expected {
        other.mark_queued(d, later).await.unwrap();
    }
    assert!(s.due(later, 100).await.unwrap().is_empty(), "queued once");
    // The same recheck written again keeps its mark; a moved one is due afresh.
    s.put_user(&u1, &recheck_at(now + Duration::minutes(10)), later)
        .await
        .unwrap();
    assert!(s.due(later, 100).await.unwrap().is_empty());
    s.put_user(&u1, &recheck_at(now + Duration::minutes(20)), later)
        .await
        .unwrap();
    // A user with nothing left to remember has no recheck.
    s.put_user(&u2, &recheck_at(now + Duration::minutes(30)), later)
        .await
        .unwrap();
    s.put_user(&u2, &UserState::default(), later).await.unwrap();
    s.wake(&u3, now + Duration::minutes(40)).await.unwrap();
    let again = s.due(later, 100).await.unwrap();
    assert_eq!(
        again,
        [
            Due {
                key: u1.clone(),
                at: now + Duration::minutes(20),
                kind: DueKind::Recheck,
            },
            Due {
                key: u3.clone(),
                at: now + Duration::minutes(40),
                kind: DueKind::Wake,
            },
        ]
    );
    // A wake-up and a recheck of one user are two due items.
    s.wake(&u1, now + Duration::minutes(25)).await.unwrap();
    let kinds: Vec<_> = s
        .due(later, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.key == u1)
        .map(|d| d.kind)
        .collect();
    assert_eq!(kinds, [DueKind::Recheck, DueKind::Wake]);
}

fn entry(n: usize, at: DateTime<Utc>) -> HistoryEntry {
    HistoryEntry {
        at,
        tenant_id: TenantId::new("t"),
        user_id: user(n).user,
        upn: Some(format!("user{n}@contoso.test")),
        address: Some(format!("mail{n}@contoso.test")),
        origin: "notification".into(),
        result: "applied".into(),
        action: Some("deactivate".into()),
        rule: Some(format!("rule-{n}")),
        reason: "left the company".into(),
        writes: vec!["is_active true → false".into(), "exemption added".into()],
        was_active: Some(true),
        is_active: Some(false),
        was_exempt: Some(false),
        is_exempt: None,
        dry_run: n.is_multiple_of(2),
        latency_ms: Some(42),
        trace_id: Some(format!("{n:032x}")),
        worker: "host:1".into(),
    }
}

fn query(user: Option<&str>, since: Option<DateTime<Utc>>, limit: usize) -> HistoryQuery {
    HistoryQuery {
        user: user.map(str::to_owned),
        since,
        limit,
    }
}

async fn history_is_queried_by_user_since_and_limit_and_pruned(b: &Backend) {
    let s = b.store.as_ref();
    let now = to_ms(Utc::now());
    let h = |hours: i64| now - Duration::hours(hours);
    let (a1, a2, b1) = (entry(1, h(3)), entry(1, h(2)), entry(2, h(1)));
    s.record_history(&[a1.clone(), b1.clone()]).await.unwrap();
    s.record_history(std::slice::from_ref(&a2)).await.unwrap();
    s.record_history(&[]).await.unwrap();

    let everything = s.history(&query(None, None, 100)).await.unwrap();
    assert_eq!(
        everything,
        [b1.clone(), a2.clone(), a1.clone()],
        "newest first"
    );
    let by_id = user(1).user.as_str().to_ascii_uppercase();
    assert_eq!(
        s.history(&query(Some(&by_id), None, 100)).await.unwrap(),
        [a2.clone(), a1.clone()]
    );
    assert_eq!(
        s.history(&query(Some("Mail1@Contoso.test"), None, 100))
            .await
            .unwrap(),
        [a2.clone(), a1.clone()],
        "by address"
    );
    assert_eq!(
        s.history(&query(Some("user2@contoso.test"), None, 100))
            .await
            .unwrap(),
        std::slice::from_ref(&b1),
        "by UPN"
    );
    assert_eq!(
        s.history(&query(None, Some(h(2)), 100)).await.unwrap(),
        [b1.clone(), a2.clone()],
        "since (inclusive)"
    );
    assert_eq!(
        s.history(&query(Some(&by_id), Some(h(2) + Duration::seconds(1)), 100))
            .await
            .unwrap(),
        []
    );
    assert_eq!(
        s.history(&query(None, None, 1)).await.unwrap(),
        std::slice::from_ref(&b1)
    );

    // Breaker counts: one older than any window, one recent.
    let config = BreakerConfig {
        max_share: 1.0,
        ..BreakerConfig::default()
    };
    for (n, at) in [(10, now - Duration::days(9)), (11, now)] {
        let k = user(n);
        s.attempt_deactivation(&ask(&k, "a.test", &config, at))
            .await
            .unwrap();
    }
    let pruned = s.prune(h(2) - Duration::minutes(30), now).await.unwrap();
    assert_eq!((pruned.history, pruned.deactivations), (1, 1));
    assert_eq!(
        s.history(&query(None, None, 100)).await.unwrap(),
        [b1.clone(), a2.clone()]
    );
    let report = s.breaker_report(&config, now).await.unwrap();
    let org = report.scopes.iter().find(|x| x.scope == "a.test").unwrap();
    assert_eq!(org.in_window, 1, "the recent count is kept: {report:?}");
    let again = s.prune(h(2) - Duration::minutes(30), now).await.unwrap();
    assert_eq!((again.history, again.deactivations), (0, 0));
}
