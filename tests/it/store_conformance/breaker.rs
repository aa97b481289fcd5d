//! The breaker's contract (invariant 27): scopes per org and global, the window and the day,
//! counts that survive restarts, atomicity across handles, releases, forgotten holds, and an
//! unreadable trip failing closed.

use std::sync::Arc;

use chrono::{Duration, Utc};
use flagrelay::policy::breaker::{BreakerConfig, GlobalLimits, LimitKind};
use flagrelay::store::{BreakerAnswer, DueKind, Store, StoreError};

use super::{Backend, ask, user};

conformance!(
    an_org_trip_holds_only_that_org_under_the_global_cap,
    the_global_cap_trips_across_orgs_and_holds_every_org,
    the_daily_cap_trips_when_each_window_is_under_its_limit,
    the_window_survives_reopening,
    a_concurrent_burst_from_several_handles_allows_exactly_the_limit,
    a_release_approves_exactly_the_held_and_wakes_them,
    a_release_of_one_org_leaves_the_other_orgs_tripped,
    a_forgotten_hold_is_neither_approved_nor_woken,
    an_unreadable_trip_is_an_error_never_untripped,
);

fn per_org(limit: u32) -> BreakerConfig {
    BreakerConfig {
        max_deactivations: limit,
        max_share: 1.0,
        ..BreakerConfig::default()
    }
}

fn allowed(answer: &BreakerAnswer) -> bool {
    matches!(answer, BreakerAnswer::Allow { approved: false })
}

/// The scope of a hold, and whether this attempt tripped it.
fn held(answer: &BreakerAnswer) -> (String, bool) {
    match answer {
        BreakerAnswer::Held { trip, newly } => (trip.scope.clone(), *newly),
        other => panic!("expected a hold, got {other:?}"),
    }
}

async fn an_org_trip_holds_only_that_org_under_the_global_cap(b: &Backend) {
    let s = b.store.as_ref();
    let config = per_org(2);
    let now = Utc::now();
    let mut a = Vec::new();
    for i in 0..3 {
        a.push(
            s.attempt_deactivation(&ask(&user(i), "a.test", &config, now))
                .await
                .unwrap(),
        );
    }
    assert!(allowed(&a[0]) && allowed(&a[1]), "{a:?}");
    assert_eq!(held(&a[2]), ("a.test".into(), true));
    for i in 10..12 {
        let answer = s
            .attempt_deactivation(&ask(&user(i), "b.test", &config, now))
            .await
            .unwrap();
        assert!(
            allowed(&answer),
            "org b is not held by org a's trip: {answer:?}"
        );
    }
    let report = s.breaker_report(&config, now).await.unwrap();
    let trips: Vec<_> = report.trips().map(|t| t.scope.as_str()).collect();
    assert_eq!(trips, ["a.test"], "{report:?}");
    let global = &report.scopes[0];
    assert_eq!((global.scope.as_str(), global.in_window), ("global", 4));
    assert_eq!(report.held.len(), 1);
    assert_eq!(report.held[0].user_id, user(2).user);
}

async fn the_global_cap_trips_across_orgs_and_holds_every_org(b: &Backend) {
    let s = b.store.as_ref();
    let config = BreakerConfig {
        global: GlobalLimits {
            max_deactivations: 3,
            ..GlobalLimits::default()
        },
        ..per_org(10)
    };
    let now = Utc::now();
    for (i, org) in ["a.test", "b.test", "c.test"].iter().enumerate() {
        let answer = s
            .attempt_deactivation(&ask(&user(i), org, &config, now))
            .await
            .unwrap();
        assert!(allowed(&answer), "{answer:?}");
    }
    let fourth = s
        .attempt_deactivation(&ask(&user(3), "d.test", &config, now))
        .await
        .unwrap();
    assert_eq!(held(&fourth), ("global".into(), true));
    // A fresh org and one with budget left are held all the same.
    for (i, org) in [(4, "e.test"), (5, "a.test")] {
        let answer = (b.reopen)()
            .await
            .attempt_deactivation(&ask(&user(i), org, &config, now))
            .await
            .unwrap();
        assert_eq!(held(&answer), ("global".into(), false), "{org}");
    }
    let report = s.breaker_report(&config, now).await.unwrap();
    assert_eq!(report.held.len(), 3, "{report:?}");
}

async fn the_daily_cap_trips_when_each_window_is_under_its_limit(b: &Backend) {
    let s = b.store.as_ref();
    let config = BreakerConfig {
        window: std::time::Duration::from_secs(3600),
        max_per_day: 3,
        ..per_org(10)
    };
    let start = Utc::now() - Duration::hours(12);
    // One deactivation every two hours: each window holds one, the day holds them all.
    for i in 0..3 {
        let at = start + Duration::hours(2 * i as i64);
        let answer = s
            .attempt_deactivation(&ask(&user(i), "a.test", &config, at))
            .await
            .unwrap();
        assert!(allowed(&answer), "{answer:?}");
    }
    let at = start + Duration::hours(6);
    match s
        .attempt_deactivation(&ask(&user(3), "a.test", &config, at))
        .await
        .unwrap()
    {
        BreakerAnswer::Held { trip, newly: true } => {
            assert_eq!(trip.scope, "a.test");
            assert_eq!(trip.limit_kind, LimitKind::Day);
            assert_eq!((trip.counted, trip.limit), (3, 3));
        }
        other => panic!("the fourth in a day is held: {other:?}"),
    }
    let report = s.breaker_report(&config, at).await.unwrap();
    let org = report.scopes.iter().find(|x| x.scope == "a.test").unwrap();
    assert_eq!((org.in_window, org.in_day), (0, 3), "{report:?}");
}

async fn the_window_survives_reopening(b: &Backend) {
    let config = per_org(3);
    let now = Utc::now();
    for i in 0..2 {
        let answer = b
            .store
            .attempt_deactivation(&ask(&user(i), "a.test", &config, now))
            .await
            .unwrap();
        assert!(allowed(&answer));
    }
    // A restart: a new handle, the first one gone.
    let restarted = (b.reopen)().await;
    let third = restarted
        .attempt_deactivation(&ask(&user(2), "a.test", &config, now))
        .await
        .unwrap();
    assert!(allowed(&third), "{third:?}");
    let fourth = restarted
        .attempt_deactivation(&ask(&user(3), "a.test", &config, now))
        .await
        .unwrap();
    assert_eq!(
        held(&fourth),
        ("a.test".into(), true),
        "no fresh budget after a restart"
    );
    drop(restarted);
    let again = (b.reopen)().await;
    let fifth = again
        .attempt_deactivation(&ask(&user(4), "a.test", &config, now))
        .await
        .unwrap();
    assert_eq!(held(&fifth), ("a.test".into(), false), "the trip is stored");
}

async fn a_concurrent_burst_from_several_handles_allows_exactly_the_limit(b: &Backend) {
    let config = per_org(5);
    let now = Utc::now();
    let handles = [b.store.clone(), (b.reopen)().await, (b.reopen)().await];
    let tasks: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(h, store)| {
            let store: Arc<dyn Store> = store.clone();
            // Each handle (a process) asks one after another; the three at once.
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..20 {
                    let k = user(h * 100 + i);
                    let answer = store
                        .attempt_deactivation(&ask(&k, "a.test", &config, now))
                        .await
                        .unwrap();
                    answers.push(answer);
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.unwrap());
    }
    let allow = answers.iter().filter(|a| allowed(a)).count();
    let newly = answers
        .iter()
        .filter(|a| matches!(a, BreakerAnswer::Held { newly: true, .. }))
        .count();
    assert_eq!(answers.len(), 60);
    assert_eq!((allow, newly), (5, 1), "{answers:?}");
    let report = b.store.breaker_report(&config, now).await.unwrap();
    assert_eq!(report.held.len(), 55);
    let org = report.scopes.iter().find(|x| x.scope == "a.test").unwrap();
    assert_eq!(org.in_window, 5, "{report:?}");
}

async fn a_release_approves_exactly_the_held_and_wakes_them(b: &Backend) {
    let s = b.store.as_ref();
    let config = per_org(1);
    let t0 = super::to_ms(Utc::now() - Duration::minutes(10));
    let t1 = t0 + Duration::minutes(5);
    let t2 = t1 + Duration::minutes(1);
    for i in 0..3 {
        s.attempt_deactivation(&ask(&user(i), "a.test", &config, t0))
            .await
            .unwrap();
    }
    let before = s
        .user(&user(1))
        .await
        .unwrap()
        .held
        .expect("user 1 is held");
    assert_eq!(before.approved_at, None);
    assert!(s.due(t1, 100).await.unwrap().is_empty());

    let release = (b.reopen)().await.release_breaker(None, t1).await.unwrap();
    assert_eq!(release.released.len(), 1, "{release:?}");
    assert_eq!(release.released[0].scope, "a.test");
    let mut approved: Vec<_> = release.approved.iter().map(|h| h.user_id.clone()).collect();
    approved.sort();
    assert_eq!(approved, [user(1).user, user(2).user]);
    assert_eq!(
        s.user(&user(1)).await.unwrap().held.unwrap().approved_at,
        Some(t1)
    );
    let due = s.due(t1, 100).await.unwrap();
    let mut woken: Vec<_> = due
        .iter()
        .map(|d| (d.key.user.clone(), d.kind, d.at))
        .collect();
    woken.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        woken,
        [
            (user(1).user, DueKind::Wake, t1),
            (user(2).user, DueKind::Wake, t1)
        ]
    );

    // Counting starts afresh: one new deactivation, then a new trip. Held after the release,
    // user 4 is not approved by it.
    let fresh = s
        .attempt_deactivation(&ask(&user(3), "a.test", &config, t2))
        .await
        .unwrap();
    assert!(allowed(&fresh), "{fresh:?}");
    let late = s
        .attempt_deactivation(&ask(&user(4), "a.test", &config, t2))
        .await
        .unwrap();
    assert_eq!(held(&late), ("a.test".into(), true));
    // The approved ones proceed past the new trip, uncounted, once each.
    for i in [1, 2] {
        let answer = s
            .attempt_deactivation(&ask(&user(i), "a.test", &config, t2))
            .await
            .unwrap();
        assert_eq!(answer, BreakerAnswer::Allow { approved: true }, "user {i}");
        assert_eq!(s.user(&user(i)).await.unwrap().held, None);
    }
    let again = s
        .attempt_deactivation(&ask(&user(1), "a.test", &config, t2))
        .await
        .unwrap();
    assert_eq!(
        held(&again),
        ("a.test".into(), false),
        "an approval is used once"
    );
    let still = s
        .attempt_deactivation(&ask(&user(4), "a.test", &config, t2))
        .await
        .unwrap();
    assert_eq!(held(&still), ("a.test".into(), false));
    let report = s.breaker_report(&config, t2).await.unwrap();
    let org = report.scopes.iter().find(|x| x.scope == "a.test").unwrap();
    assert_eq!(
        org.in_window, 1,
        "approved ones are not counted: {report:?}"
    );
    assert_eq!(org.released_at, Some(t1));
}

async fn a_release_of_one_org_leaves_the_other_orgs_tripped(b: &Backend) {
    let s = b.store.as_ref();
    let config = per_org(1);
    let now = super::to_ms(Utc::now());
    for (i, org) in [(0, "a.test"), (1, "a.test"), (10, "b.test"), (11, "b.test")] {
        s.attempt_deactivation(&ask(&user(i), org, &config, now))
            .await
            .unwrap();
    }
    let release = s.release_breaker(Some("a.test"), now).await.unwrap();
    assert_eq!(release.released.len(), 1);
    assert_eq!(release.released[0].scope, "a.test");
    assert_eq!(release.approved.len(), 1, "{release:?}");
    assert_eq!(release.approved[0].user_id, user(1).user);
    let due: Vec<_> = s
        .due(now, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.key)
        .collect();
    assert_eq!(due, [user(1)]);

    let b_held = s
        .attempt_deactivation(&ask(&user(11), "b.test", &config, now))
        .await
        .unwrap();
    assert_eq!(held(&b_held), ("b.test".into(), false));
    let approved = s
        .attempt_deactivation(&ask(&user(1), "a.test", &config, now))
        .await
        .unwrap();
    assert_eq!(approved, BreakerAnswer::Allow { approved: true });
    let report = s.breaker_report(&config, now).await.unwrap();
    let trips: Vec<_> = report.trips().map(|t| t.scope.as_str()).collect();
    assert_eq!(trips, ["b.test"]);
}

async fn a_forgotten_hold_is_neither_approved_nor_woken(b: &Backend) {
    let s = b.store.as_ref();
    let config = per_org(1);
    let now = Utc::now();
    for i in 0..3 {
        s.attempt_deactivation(&ask(&user(i), "a.test", &config, now))
            .await
            .unwrap();
    }
    s.forget_held(&user(1)).await.unwrap();
    assert_eq!(s.user(&user(1)).await.unwrap().held, None);
    assert!(s.user(&user(2)).await.unwrap().held.is_some());
    let report = s.breaker_report(&config, now).await.unwrap();
    let held: Vec<_> = report.held.iter().map(|h| h.user_id.clone()).collect();
    assert_eq!(held, [user(2).user]);
    let release = s.release_breaker(None, now).await.unwrap();
    let approved: Vec<_> = release.approved.iter().map(|h| h.user_id.clone()).collect();
    assert_eq!(approved, [user(2).user]);
    let due: Vec<_> = s
        .due(now, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.key)
        .collect();
    assert_eq!(due, [user(2)]);
}

async fn an_unreadable_trip_is_an_error_never_untripped(b: &Backend) {
    let config = per_org(10);
    let now = Utc::now();
    b.execute("UPDATE breaker_scopes SET trip = '{not a trip' WHERE scope = 'global'")
        .await;
    let answer = b
        .store
        .attempt_deactivation(&ask(&user(0), "a.test", &config, now))
        .await;
    assert!(
        matches!(answer, Err(StoreError::Corrupt { .. })),
        "{answer:?}"
    );
    assert!(matches!(
        b.store.breaker_report(&config, now).await,
        Err(StoreError::Corrupt { .. })
    ));
    let report = b.store.breaker_report(&config, now).await;
    assert!(report.is_err());
    // Nothing was counted or let through on the way.
    b.execute("UPDATE breaker_scopes SET trip = NULL WHERE scope = 'global'")
        .await;
    let report = b.store.breaker_report(&config, now).await.unwrap();
    assert_eq!(report.scopes[0].in_window, 0, "{report:?}");
}
