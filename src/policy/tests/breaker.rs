//! The blast-radius breaker, driven by scripted steps with injected time.

use std::time::Duration;

use chrono::Duration as Delta;

use super::now;
use crate::policy::{Breaker, BreakerConfig, Verdict};

fn config(max: u32, share: f64, minutes: u64) -> BreakerConfig {
    BreakerConfig {
        max_deactivations: max,
        max_share: share,
        window: Duration::from_secs(minutes * 60),
        ..BreakerConfig::default()
    }
}

/// Steps: (minute, known users, "allow" | "tripped" | "release").
fn run(config: BreakerConfig, steps: &[(i64, usize, &str)]) -> Breaker {
    let mut b = Breaker::new(config);
    for (i, (minute, total, expect)) in steps.iter().enumerate() {
        let t = now() + Delta::minutes(*minute);
        let got = match *expect {
            "release" => {
                b.release();
                "release"
            }
            _ => match b.attempt(t, *total) {
                Verdict::Allow => "allow",
                Verdict::Tripped(_) => "tripped",
            },
        };
        assert_eq!(
            got,
            *expect,
            "step {i} at minute {minute}: {:?}",
            b.state(t)
        );
    }
    b
}

#[test]
fn count_limit() {
    run(
        config(3, 1.0, 60),
        &[
            (0, 1000, "allow"),
            (1, 1000, "allow"),
            (2, 1000, "allow"),
            (3, 1000, "tripped"),
        ],
    );
}

#[test]
fn share_limit_of_known_users() {
    // 10% of 20 users: 2 per window.
    run(
        config(25, 0.10, 60),
        &[(0, 20, "allow"), (1, 20, "allow"), (2, 20, "tripped")],
    );
    // 10% of 5 users rounds down to 0, but one is always allowed.
    run(config(25, 0.10, 60), &[(0, 5, "allow"), (1, 5, "tripped")]);
    // The count limit still caps a large organization.
    run(
        config(2, 0.10, 60),
        &[
            (0, 10_000, "allow"),
            (1, 10_000, "allow"),
            (2, 10_000, "tripped"),
        ],
    );
    assert_eq!(config(25, 0.10, 60).limit(0), 1);
    assert_eq!(config(25, 0.10, 60).limit(100), 10);
    assert_eq!(config(25, 0.10, 60).limit(1000), 25);
}

#[test]
fn the_window_slides_with_injected_time() {
    run(
        config(2, 1.0, 60),
        &[
            (0, 100, "allow"),
            (30, 100, "allow"),
            // Minute 0 leaves the window at minute 60 exactly.
            (60, 100, "allow"),
            // Minutes 30 and 60 are still inside at minute 61.
            (61, 100, "tripped"),
        ],
    );
    run(
        config(2, 1.0, 60),
        &[
            (0, 100, "allow"),
            (10, 100, "allow"),
            (200, 100, "allow"),
            (201, 100, "allow"),
        ],
    );
}

#[test]
fn stays_tripped_until_released() {
    let b = run(
        config(1, 1.0, 60),
        &[
            (0, 100, "allow"),
            (1, 100, "tripped"),
            // Time alone does not close it.
            (10_000, 100, "tripped"),
            (10_001, 100, "release"),
            (10_002, 100, "allow"),
            (10_003, 100, "tripped"),
        ],
    );
    assert!(b.is_tripped());
    let state = b.state(now() + Delta::minutes(10_003));
    assert_eq!(state.in_window, 1);
    let trip = state.tripped.unwrap();
    assert_eq!((trip.counted, trip.limit, trip.total_users), (1, 1, 100));
    assert_eq!(trip.at, now() + Delta::minutes(10_003));
    assert!(
        trip.reason.contains("reach the limit of 1"),
        "{}",
        trip.reason
    );
    let mut b = b;
    assert!(b.release().is_some());
    assert!(b.release().is_none());
    assert_eq!(b.state(now()).in_window, 0, "release forgets the window");
    assert_eq!(*b.config(), config(1, 1.0, 60));
}

#[test]
fn default_limits() {
    assert_eq!(BreakerConfig::default(), config(25, 0.10, 60));
}
