//! A small NIP-34 fixture: one repository and events that reach it through every Layer 2 and
//! Layer 3 tag variant, plus look-alikes that must not be synced.

use std::collections::BTreeSet;

use grasp_sync::nostr::RepoCoordinate;
use grasp_sync::nostr::filters::RepoScope;
use nostr::{Event, EventBuilder, EventId, Keys, Kind, Tag, TagKind, Timestamp};

pub struct Fixture {
    pub owner: Keys,
    pub scope: RepoScope,
    pub root: Event,
    /// Events the session must deliver for this repo (Layer 2 and Layer 3), root included.
    pub expected: Vec<Event>,
    /// Events a remote may hold that no filter of this repo matches.
    pub noise: Vec<Event>,
}

fn tag(name: &str, value: impl Into<String>) -> Tag {
    Tag::custom(TagKind::custom(name), [value.into()])
}

fn sign(b: EventBuilder, k: &Keys) -> Event {
    b.sign_with_keys(k).expect("sign")
}

pub fn fixture(id: &str) -> Fixture {
    let owner = Keys::generate();
    let other = Keys::generate();
    let coord = RepoCoordinate::new(&owner.public_key().to_hex(), id).unwrap();
    let c = coord.to_string();
    let scope = RepoScope::owned(coord).unwrap();

    let state = sign(
        EventBuilder::new(Kind::from(30618), "").tag(Tag::identifier(id)),
        &owner,
    );
    let root = sign(
        EventBuilder::new(Kind::from(1621), "an issue").tag(tag("a", c.clone())),
        &other,
    );
    let r = root.id.to_hex();
    let expected = vec![
        state,
        root.clone(),
        sign(
            EventBuilder::new(Kind::from(1111), "repo comment").tag(tag("A", c.clone())),
            &other,
        ),
        sign(
            EventBuilder::new(Kind::from(1), "quote repo").tag(tag("q", c.clone())),
            &other,
        ),
        sign(
            EventBuilder::new(Kind::from(1630), "").tag(tag("e", r.clone())),
            &owner,
        ),
        sign(
            EventBuilder::new(Kind::from(1111), "reply").tag(tag("E", r.clone())),
            &other,
        ),
        sign(
            EventBuilder::new(Kind::from(1), "quote issue").tag(tag("q", r.clone())),
            &other,
        ),
    ];
    let noise = vec![
        // Same `d`, not the owner.
        sign(
            EventBuilder::new(Kind::from(30618), "").tag(Tag::identifier(id)),
            &other,
        ),
        // Another repo of the same owner.
        sign(
            EventBuilder::new(Kind::from(1111), "elsewhere").tag(tag(
                "a",
                format!("30617:{}:{id}-other", owner.public_key().to_hex()),
            )),
            &other,
        ),
        sign(EventBuilder::new(Kind::from(1), "unrelated"), &other),
    ];
    Fixture {
        owner,
        scope,
        root,
        expected,
        noise,
    }
}

/// `n` comments on `root`, `same_second` of them sharing one timestamp.
pub fn comments(root: EventId, n: usize, same_second: usize) -> Vec<Event> {
    let k = Keys::generate();
    (0..n)
        .map(|i| {
            let at = if i < same_second {
                1_700_000_000
            } else {
                1_600_000_000 + i as u64
            };
            sign(
                EventBuilder::new(Kind::from(1111), format!("c{i}"))
                    .tag(tag("E", root.to_hex()))
                    .custom_created_at(Timestamp::from(at)),
                &k,
            )
        })
        .collect()
}

/// A comment on `root` created now (`text` makes it distinct).
pub fn comment_now(root: EventId, text: &str) -> Event {
    sign(
        EventBuilder::new(Kind::from(1111), text).tag(tag("E", root.to_hex())),
        &Keys::generate(),
    )
}

pub fn ids<'a>(events: impl IntoIterator<Item = &'a Event>) -> BTreeSet<EventId> {
    events.into_iter().map(|e| e.id).collect()
}

/// The repository announcement of `f`, listing `relays`.
pub fn announcement(f: &Fixture, relays: &[String]) -> Event {
    EventBuilder::new(Kind::from(30617), "")
        .tag(Tag::identifier(f.scope.coordinate.identifier()))
        .tag(Tag::custom(
            TagKind::custom("relays"),
            relays.iter().cloned(),
        ))
        .sign_with_keys(&f.owner)
        .expect("sign")
}

/// A repository announcement by `keys` for `id`, listing `relays`, created at `at`.
pub fn announce(keys: &Keys, id: &str, relays: &[&str], at: u64) -> Event {
    sign(
        EventBuilder::new(Kind::from(30617), "")
            .tag(Tag::identifier(id))
            .tag(Tag::custom(
                TagKind::custom("relays"),
                relays.iter().map(|s| s.to_string()),
            ))
            .custom_created_at(Timestamp::from(at)),
        keys,
    )
}
