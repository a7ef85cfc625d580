//! A synthetic NIP-34 corpus and its oracle: repositories with announcements, state,
//! issues, patches, PRs and PR updates, NIP-22 comments and replies, statuses, reactions and
//! repo-level comments, spread over source relays — plus noise that must never reach our
//! relay (announcements not listing us, squatted `d` tags, orphans, forged signatures).
//! [`Corpus::expected`] is exactly what a correct sync delivers.

use std::collections::BTreeSet;

use nostr::{Event, EventBuilder, EventId, JsonUtil, Keys, Kind, Tag, TagKind, ToBech32};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::nostr::RelayUrl;
use crate::nostr::kinds::REPO_ANNOUNCEMENT;

#[derive(Debug, Clone)]
pub struct CorpusConfig {
    pub repos: usize,
    /// Our service, `host[:port]`: announcements list it in `clone` and `relays`.
    pub service: String,
    pub local_relay: RelayUrl,
    /// Source relays; each repository lists two of them.
    pub sources: Vec<RelayUrl>,
    pub seed: u64,
}

/// An event and the sources (indices into `CorpusConfig::sources`) that hold it.
pub struct Placed {
    pub event: Event,
    pub on: Vec<usize>,
}

pub struct Corpus {
    /// Accepted repositories' announcements (users publish them to our relay).
    pub announcements: Vec<Event>,
    /// Their owners' keys, in the same order (to announce a repository again).
    pub owners: Vec<Keys>,
    /// Related events on the sources.
    pub events: Vec<Placed>,
    /// Valid events on the sources that must not arrive.
    pub noise: Vec<Placed>,
    /// Forged events (raw JSON) a misbehaving source serves; must not arrive.
    pub forged: Vec<String>,
    /// The oracle: exactly the ids our relay must end up with.
    pub expected: BTreeSet<EventId>,
}

fn tag(name: &str, values: impl IntoIterator<Item = String>) -> Tag {
    Tag::custom(TagKind::custom(name), values)
}

pub fn generate(cfg: &CorpusConfig) -> Corpus {
    let never = std::sync::atomic::AtomicBool::new(false);
    // Without a stop, generation runs to its end.
    generate_until(cfg, &never).unwrap_or_else(|| unreachable!())
}

/// [`generate`], given up (`None`) once `stop` is set: a thousand repositories take
/// seconds of signing, and an interrupted demo must not wait for them.
pub fn generate_until(cfg: &CorpusConfig, stop: &std::sync::atomic::AtomicBool) -> Option<Corpus> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    // Real events span months, not the second this corpus is made in: spread them over the
    // last 90 days (so no second holds more events than a relay serves per page).
    let times = std::cell::RefCell::new(StdRng::seed_from_u64(cfg.seed ^ 0x7157_ca11));
    let now = nostr::Timestamp::now().as_secs();
    let sign = |b: EventBuilder, k: &Keys| -> Event {
        let at = now - times.borrow_mut().random_range(60..90 * 86_400);
        b.custom_created_at(nostr::Timestamp::from(at))
            .sign_with_keys(k)
            // Signing with a freshly generated key cannot fail.
            .unwrap_or_else(|_| unreachable!())
    };
    let n = cfg.sources.len().max(1);
    let contributors: Vec<Keys> = (0..8).map(|_| Keys::generate()).collect();
    let mut out = Corpus {
        announcements: Vec::new(),
        owners: Vec::new(),
        events: Vec::new(),
        noise: Vec::new(),
        forged: Vec::new(),
        expected: BTreeSet::new(),
    };
    for r in 0..cfg.repos {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let owner = Keys::generate();
        let maintainer = (r % 3 == 0).then(Keys::generate);
        let id = format!("repo-{r}");
        let coord = format!("30617:{}:{id}", owner.public_key().to_hex());
        let npub = owner.public_key().to_bech32().unwrap_or_default();
        let listed = [r % n, (r + 1) % n];
        let mut relays = vec![cfg.local_relay.to_string()];
        relays.extend(listed.iter().map(|i| cfg.sources[*i].to_string()));
        let mut ann = EventBuilder::new(REPO_ANNOUNCEMENT, "")
            .tag(Tag::identifier(&id))
            .tag(tag("name", [id.clone()]))
            .tag(tag(
                "clone",
                [format!("https://{}/{npub}/{id}.git", cfg.service)],
            ))
            .tag(tag("relays", relays.clone()));
        if let Some(m) = &maintainer {
            ann = ann.tag(tag("maintainers", [m.public_key().to_hex()]));
        }
        let ann = sign(ann, &owner);
        out.expected.insert(ann.id);
        out.announcements.push(ann.clone());
        out.owners.push(owner.clone());
        let place = |out: &mut Corpus, event: Event, rng: &mut StdRng| {
            let on = if rng.random_bool(0.25) {
                listed.to_vec()
            } else {
                vec![listed[rng.random_range(0..2)]]
            };
            out.expected.insert(event.id);
            out.events.push(Placed { event, on });
        };
        // The announcement is on the sources too (Layer 1 brings it back: a duplicate).
        out.events.push(Placed {
            event: ann,
            on: listed.to_vec(),
        });

        let state_author = maintainer.as_ref().unwrap_or(&owner);
        let state = EventBuilder::new(Kind::from(30618u16), "")
            .tag(Tag::identifier(&id))
            .tag(tag("refs/heads/main", [format!("{:040x}", r)]))
            .tag(tag("HEAD", ["ref: refs/heads/main".to_string()]));
        place(&mut out, sign(state, state_author), &mut rng);

        let who = |rng: &mut StdRng| &contributors[rng.random_range(0..contributors.len())];
        let mut roots: Vec<(Event, u16)> = Vec::new();
        for i in 0..2 {
            let issue = EventBuilder::new(Kind::from(1621u16), format!("issue {i} of {id}"))
                .tag(tag("a", [coord.clone()]))
                .tag(tag("p", [owner.public_key().to_hex()]))
                .tag(tag("subject", [format!("bug {i}")]));
            roots.push((sign(issue, who(&mut rng)), 1621));
        }
        let patch = EventBuilder::new(
            Kind::from(1617u16),
            format!("From 0000 Mon Sep 17\nSubject: [PATCH] fix {id}"),
        )
        .tag(tag("a", [coord.clone()]))
        .tag(tag("t", ["root".to_string()]));
        roots.push((sign(patch, who(&mut rng)), 1617));
        if r % 2 == 0 {
            let pr = EventBuilder::new(Kind::from(1618u16), format!("PR for {id}"))
                .tag(tag("a", [coord.clone()]))
                .tag(tag("c", [format!("{:040x}", r + 1)]));
            roots.push((sign(pr, who(&mut rng)), 1618));
        }
        for (root, kind) in roots {
            let rid = root.id.to_hex();
            let root_author = root.pubkey.to_hex();
            place(&mut out, root, &mut rng);
            if kind == 1618 {
                let update = EventBuilder::new(Kind::from(1619u16), "")
                    .tag(tag("a", [coord.clone()]))
                    .tag(tag("E", [rid.clone()]))
                    .tag(tag("P", [root_author.clone()]))
                    .tag(tag("c", [format!("{:040x}", r + 2)]));
                place(&mut out, sign(update, who(&mut rng)), &mut rng);
            }
            let mut last_comment = None;
            for c in 0..2 {
                let comment = EventBuilder::new(Kind::from(1111u16), format!("comment {c}"))
                    .tag(tag("E", [rid.clone()]))
                    .tag(tag("K", [kind.to_string()]))
                    .tag(tag("P", [root_author.clone()]))
                    .tag(tag("e", [rid.clone()]))
                    .tag(tag("k", [kind.to_string()]));
                let comment = sign(comment, who(&mut rng));
                last_comment = Some(comment.id);
                place(&mut out, comment, &mut rng);
            }
            if let Some(parent) = last_comment {
                let reply = EventBuilder::new(Kind::from(1111u16), "reply")
                    .tag(tag("E", [rid.clone()]))
                    .tag(tag("K", [kind.to_string()]))
                    .tag(tag("e", [parent.to_hex()]))
                    .tag(tag("k", ["1111".to_string()]));
                place(&mut out, sign(reply, who(&mut rng)), &mut rng);
            }
            let status = EventBuilder::new(Kind::from(1630u16), "")
                .tag(Tag::custom(
                    TagKind::e(),
                    [rid.clone(), String::new(), "root".into()],
                ))
                .tag(tag("p", [root_author.clone()]));
            place(&mut out, sign(status, &owner), &mut rng);
            let reaction = EventBuilder::new(Kind::Reaction, "+").tag(tag("e", [rid.clone()]));
            place(&mut out, sign(reaction, who(&mut rng)), &mut rng);
            // A forged copy of a comment: valid-looking, wrong signature.
            if r % 4 == 0 {
                let real = sign(
                    EventBuilder::new(Kind::from(1111u16), "forged").tag(tag("E", [rid.clone()])),
                    who(&mut rng),
                );
                let mut json: serde_json::Value =
                    serde_json::from_str(&real.as_json()).unwrap_or_default();
                json["content"] = "tampered after signing".into();
                out.forged.push(json.to_string());
            }
        }
        let repo_comment = EventBuilder::new(Kind::from(1111u16), format!("about {id}"))
            .tag(tag("A", [coord.clone()]))
            .tag(tag("K", ["30617".to_string()]))
            .tag(tag("a", [coord.clone()]))
            .tag(tag("k", ["30617".to_string()]));
        place(&mut out, sign(repo_comment, who(&mut rng)), &mut rng);

        // Noise around this repository.
        let squatter = Keys::generate();
        let noise = vec![
            // Same identifier, another pubkey: its state must not be taken for ours.
            sign(
                EventBuilder::new(Kind::from(30618u16), "").tag(Tag::identifier(&id)),
                &squatter,
            ),
            // An orphan: tags an event nobody has.
            sign(
                EventBuilder::new(Kind::from(1111u16), "orphan")
                    .tag(tag("E", [EventId::all_zeros().to_hex()])),
                who(&mut rng),
            ),
            // Unrelated chatter.
            sign(EventBuilder::new(Kind::TextNote, "gm"), who(&mut rng)),
        ];
        for event in noise {
            out.noise.push(Placed {
                event,
                on: listed.to_vec(),
            });
        }
        if r % 5 == 0 {
            // A repository that does not list us, with its own issue.
            let other = Keys::generate();
            let oid = format!("elsewhere-{r}");
            let other_coord = format!("30617:{}:{oid}", other.public_key().to_hex());
            let not_ours = EventBuilder::new(REPO_ANNOUNCEMENT, "")
                .tag(Tag::identifier(&oid))
                .tag(tag(
                    "clone",
                    ["https://github.com/someone/else.git".to_string()],
                ))
                .tag(tag(
                    "relays",
                    listed.iter().map(|i| cfg.sources[*i].to_string()),
                ));
            out.noise.push(Placed {
                event: sign(not_ours, &other),
                on: listed.to_vec(),
            });
            let issue =
                EventBuilder::new(Kind::from(1621u16), "not ours").tag(tag("a", [other_coord]));
            out.noise.push(Placed {
                event: sign(issue, who(&mut rng)),
                on: listed.to_vec(),
            });
            // The squatter announces the same identifier elsewhere.
            let squat = EventBuilder::new(REPO_ANNOUNCEMENT, "")
                .tag(Tag::identifier(&id))
                .tag(tag("relays", [cfg.sources[listed[0]].to_string()]));
            out.noise.push(Placed {
                event: sign(squat, &squatter),
                on: listed.to_vec(),
            });
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(repos: usize) -> CorpusConfig {
        CorpusConfig {
            repos,
            service: "127.0.0.1:7000".into(),
            local_relay: RelayUrl::parse("ws://127.0.0.1:7000").unwrap(),
            sources: [
                "ws://127.0.0.1:7001",
                "ws://127.0.0.1:7002",
                "ws://127.0.0.1:7003",
            ]
            .iter()
            .map(|u| RelayUrl::parse(u).unwrap())
            .collect(),
            seed: 7,
        }
    }

    #[test]
    fn oracle_covers_every_placed_event_and_no_noise() {
        let c = generate(&cfg(10));
        assert_eq!(c.announcements.len(), 10);
        let placed: BTreeSet<EventId> = c.events.iter().map(|p| p.event.id).collect();
        assert_eq!(
            placed, c.expected,
            "every expected event is on some source, and only those"
        );
        assert!(c.noise.iter().all(|p| !c.expected.contains(&p.event.id)));
        assert!(!c.forged.is_empty());
        // Every placed event sits on a relay its repository lists (indices in range).
        assert!(
            c.events
                .iter()
                .all(|p| !p.on.is_empty() && p.on.iter().all(|i| *i < 3))
        );
        // Some two dozen events per repository.
        assert!(
            (200..400).contains(&c.expected.len()),
            "{}",
            c.expected.len()
        );
    }
}
