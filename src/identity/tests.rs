//! Table-driven tests of the identity rules: candidates, domains, bindings, holders.

use chrono::TimeZone;

use super::*;

const ALICE: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const ROGUE: &str = "dddddddd-0000-4000-8000-00000000000d";
const BOB: &str = "bbbbbbbb-0000-4000-8000-00000000000b";

fn user(id: &str, proxies: &[&str], mail: Option<&str>, upn: Option<&str>) -> GraphUser {
    GraphUser {
        id: id.into(),
        proxy_addresses: (!proxies.is_empty())
            .then(|| proxies.iter().map(|p| (*p).to_owned()).collect()),
        mail: mail.map(str::to_owned),
        user_principal_name: upn.map(str::to_owned),
        ..Default::default()
    }
}

/// object id, address, binding by object, binding by address, expected check.
type Case<'a> = (
    &'a str,
    &'a str,
    Option<&'a Binding>,
    Option<&'a Binding>,
    BindingCheck,
);

fn domains() -> OrgDomains {
    OrgDomains::new("Example.com", &["example.org".into()])
}

fn binding(object_id: &str, address: &str) -> Binding {
    Binding {
        tenant_id: "t".into(),
        object_id: object_id.into(),
        address: address.into(),
        bound_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        how: Binding::FIRST_SEEN.into(),
    }
}

/// `candidates` then `choose_address`, rendered as one line each.
fn check(u: GraphUser, want_candidates: &[&str], want_choice: &str) {
    let got: Vec<String> = candidates(&u)
        .into_iter()
        .map(|(s, a)| format!("{s}={a}"))
        .collect();
    assert_eq!(got, want_candidates, "candidates of {u:?}");
    let choice = match choose_address(&u, &domains()) {
        Ok(c) => format!("{}={}", c.source, c.address),
        Err(e) => format!("{}: {e}", e.reason()),
    };
    assert_eq!(choice, want_choice, "choice for {u:?}");
}

#[test]
fn candidates_come_primary_smtp_then_mail_then_upn() {
    check(
        user(
            ALICE,
            &["smtp:alias@example.com", "SMTP:Alice@Example.com"],
            Some("a.mail@example.com"),
            Some("alice.upn@example.com"),
        ),
        &[
            "primary_smtp=alice@example.com",
            "mail=a.mail@example.com",
            "user_principal_name=alice.upn@example.com",
        ],
        "primary_smtp=alice@example.com",
    );
    // `smtp:` (secondary) is never primary; without `SMTP:` mail comes first.
    check(
        user(
            ALICE,
            &["smtp:alias@example.com"],
            Some("alice@example.com"),
            None,
        ),
        &["mail=alice@example.com"],
        "mail=alice@example.com",
    );
    check(
        user(
            ALICE,
            &["X500:/o=x", "sip:alice@example.com"],
            None,
            Some("alice@example.com"),
        ),
        &["user_principal_name=alice@example.com"],
        "user_principal_name=alice@example.com",
    );
    // Case and whitespace variations of one address are one candidate, first source kept.
    check(
        user(
            ALICE,
            &["SMTP: Alice@EXAMPLE.com "],
            Some("  ALICE@example.COM"),
            Some("alice@example.com\t"),
        ),
        &["primary_smtp=alice@example.com"],
        "primary_smtp=alice@example.com",
    );
}

#[test]
fn implausible_addresses_are_not_candidates() {
    for bad in [
        "",
        "   ",
        "alice",
        "@example.com",
        "alice@",
        "a@b@example.com",
        "al ice@example.com",
        "alice@exa\u{0}mple.com",
    ] {
        check(
            user(ALICE, &[], Some(bad), None),
            &[],
            "no_address: the user has no usable address (primary SMTP address, mail or UPN)",
        );
    }
    check(
        user(ALICE, &["SMTP:"], None, Some("not-an-address")),
        &[],
        "no_address: the user has no usable address (primary SMTP address, mail or UPN)",
    );
}

#[test]
fn the_first_candidate_inside_the_org_domains_is_chosen() {
    // The primary SMTP address is elsewhere: mail inside the domains wins.
    check(
        user(
            ALICE,
            &["SMTP:alice@other.net"],
            Some("alice@EXAMPLE.org"),
            Some("alice@example.com"),
        ),
        &[
            "primary_smtp=alice@other.net",
            "mail=alice@example.org",
            "user_principal_name=alice@example.com",
        ],
        "mail=alice@example.org",
    );
    // Nothing inside: refused, naming every candidate and the domains.
    check(
        user(
            ALICE,
            &["SMTP:alice@other.net"],
            None,
            Some("alice@sub.example.com"),
        ),
        &[
            "primary_smtp=alice@other.net",
            "user_principal_name=alice@sub.example.com",
        ],
        "outside_org_domains: none of the user's addresses (alice@other.net, alice@sub.example.com) is in the organization's domains (example.com, example.org)",
    );
}

#[test]
fn a_disabled_object_with_another_users_address_in_mail_is_caught() {
    // The incident: a disabled object without a mailbox, `mail` set to Bob's primary SMTP
    // address. Its own candidates put that address first (mail is all it has)...
    let mut rogue = user(
        ROGUE,
        &[],
        Some("Bob@Example.com"),
        Some("rogue@example.com"),
    );
    rogue.account_enabled = Some(false);
    let chosen = choose_address(&rogue, &domains()).unwrap();
    assert_eq!(
        (chosen.address.as_str(), chosen.source),
        ("bob@example.com", AddressSource::Mail)
    );
    // ...but Bob's binding holds the address, and Graph lists Bob as a holder too.
    let bob_binding = binding(BOB, "bob@example.com");
    let check = check_binding(ROGUE, &chosen.address, None, Some(&bob_binding));
    let BindingCheck::Conflict(conflict) = check else {
        panic!("{check:?}")
    };
    assert_eq!(conflict.reason(), "address_held_by_other");
    assert_eq!(conflict.other_object_ids(), [BOB]);
    let bob = user(
        BOB,
        &["SMTP:bob@example.com"],
        Some("bob@example.com"),
        Some("bob@example.com"),
    );
    let err = check_holders(ROGUE, &chosen.address, &[bob, rogue.clone()]).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("address bob@example.com is held by directory object {BOB}")
    );
    assert!(!err.is_transient());
}

#[test]
fn org_domains_match_exactly_and_case_insensitively() {
    let d = OrgDomains::new(
        " @Example.COM. ",
        &["example.org".into(), "EXAMPLE.com".into(), "".into()],
    );
    assert_eq!(d.as_slice(), ["example.com", "example.org"]);
    assert_eq!(d.to_string(), "example.com, example.org");
    for (address, inside) in [
        ("alice@example.com", true),
        (" Alice@EXAMPLE.org ", true),
        ("alice@sub.example.com", false),
        ("alice@example.com.evil.net", false),
        ("alice@notexample.com", false),
        ("example.com", false),
        ("a@b@example.com", false),
        ("@example.com", false),
    ] {
        assert_eq!(d.contains(address), inside, "{address}");
    }
}

#[test]
fn bindings_decide_bound_new_or_conflict() {
    let alice_at = binding(ALICE, "alice@example.com");
    let alice_old = binding(ALICE, "old@example.com");
    let bob_at = binding(BOB, "alice@example.com");
    let held = |other: &str| {
        BindingCheck::Conflict(IdentityConflict::AddressHeldByOther {
            address: "alice@example.com".into(),
            other_object_id: other.into(),
            others: vec![other.into()],
        })
    };
    let changed = BindingCheck::Conflict(IdentityConflict::AddressChanged {
        object_id: ALICE.into(),
        from: "old@example.com".into(),
        to: "alice@example.com".into(),
    });
    let upper = ALICE.to_ascii_uppercase();
    let cases: [Case<'_>; 8] = [
        (
            ALICE,
            "alice@example.com",
            Some(&alice_at),
            Some(&alice_at),
            BindingCheck::Bound,
        ),
        // Ids and addresses compare case-insensitively.
        (
            &upper,
            " Alice@Example.com",
            Some(&alice_at),
            Some(&alice_at),
            BindingCheck::Bound,
        ),
        (ALICE, "alice@example.com", None, None, BindingCheck::New),
        // One half recorded, naming exactly this pair: nothing contradicts the write.
        (
            ALICE,
            "alice@example.com",
            Some(&alice_at),
            None,
            BindingCheck::Bound,
        ),
        (
            ALICE,
            "alice@example.com",
            None,
            Some(&alice_at),
            BindingCheck::Bound,
        ),
        (ALICE, "alice@example.com", None, Some(&bob_at), held(BOB)),
        (
            ALICE,
            "alice@example.com",
            Some(&alice_old),
            None,
            changed.clone(),
        ),
        // Both contradict: the other holder wins, it names the object at risk.
        (
            ALICE,
            "alice@example.com",
            Some(&alice_old),
            Some(&bob_at),
            held(BOB),
        ),
    ];
    for (object_id, address, by_object, by_address, want) in cases {
        assert_eq!(
            check_binding(object_id, address, by_object, by_address),
            want,
            "{object_id} {address} {by_object:?} {by_address:?}"
        );
    }
    let BindingCheck::Conflict(c) = changed else {
        unreachable!()
    };
    assert_eq!(c.reason(), "address_changed");
    assert!(c.other_object_ids().is_empty());
    assert!(
        c.to_string().contains(ALICE) && c.to_string().contains("old@example.com"),
        "{c}"
    );
}

#[test]
fn holders_must_be_exactly_this_object() {
    let alice = user(ALICE, &["SMTP:alice@example.com"], None, None);
    let bob = user(BOB, &[], Some("alice@example.com"), None);
    let rogue = user(ROGUE, &[], Some("ALICE@example.com"), None);
    let mut alice_upper = alice.clone();
    alice_upper.id = ALICE.to_ascii_uppercase();
    let cases: Vec<(Vec<GraphUser>, Result<(), &str>)> = vec![
        (vec![alice.clone()], Ok(())),
        (vec![alice_upper.clone()], Ok(())),
        // Graph may repeat an object: still only this one.
        (vec![alice.clone(), alice_upper], Ok(())),
        (vec![], Err("unconfirmed")),
        (vec![bob.clone()], Err("address_held_by_other")),
        (
            vec![alice.clone(), bob.clone(), rogue.clone(), bob.clone()],
            Err("address_held_by_other"),
        ),
    ];
    for (holders, want) in cases {
        let got = check_holders(ALICE, "Alice@Example.com", &holders).map_err(|e| e.reason());
        assert_eq!(got, want, "{holders:?}");
    }
    let err = check_holders(ALICE, "Alice@Example.com", &[bob, alice, rogue]).unwrap_err();
    assert_eq!(err.other_object_ids(), [BOB, ROGUE]);
    assert_eq!(
        err.to_string(),
        format!("address alice@example.com is held by directory object {BOB} (and also {ROGUE})")
    );
    let unconfirmed = check_holders(ALICE, "alice@example.com", &[]).unwrap_err();
    assert!(unconfirmed.is_transient());
    assert_eq!(
        unconfirmed.to_string(),
        "Graph does not (yet) confirm that the object holds alice@example.com"
    );
}

#[test]
fn sources_and_bindings_serialize_as_documented() {
    let names: Vec<String> = [
        AddressSource::PrimarySmtp,
        AddressSource::Mail,
        AddressSource::UserPrincipalName,
    ]
    .iter()
    .map(|s| {
        assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        s.as_str().to_owned()
    })
    .collect();
    assert_eq!(names, ["primary_smtp", "mail", "user_principal_name"]);
    let b = binding(ALICE, "alice@example.com");
    let back: Binding = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
    assert_eq!(back, b);
    let held = IdentityConflict::AddressHeldByOther {
        address: "a@example.com".into(),
        other_object_id: BOB.into(),
        others: vec![],
    };
    assert_eq!(held.other_object_ids(), [BOB]);
    assert_eq!(IdentityConflict::NoAddress.reason(), "no_address");
    assert!(!IdentityConflict::NoAddress.is_transient());
}
