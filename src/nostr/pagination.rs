//! `until` pagination of a historic REQ against relays that support neither NIP-77 nor
//! honest limits.
//!
//! Every page asks for `limit` events with `until` = the oldest timestamp seen so far,
//! inclusive, so events sharing the boundary second are not skipped; the ids already seen at
//! that second are remembered so they are not counted twice. Pagination stops only when a
//! page brings nothing new: a relay that silently caps pages below our `limit` (or below its
//! own advertised `max_limit`) is still paged through to the end. When one second holds more
//! events than a page can carry, pagination would stall; it then steps past that second and
//! records it as a gap instead of looping.

use std::collections::HashSet;

use nostr::{EventId, Filter, Timestamp};

#[derive(Debug, Clone)]
pub struct Paginator {
    base: Filter,
    limit: usize,
    until: Option<Timestamp>,
    /// Ids already received whose `created_at` equals `until`.
    boundary_seen: HashSet<EventId>,
    largest_page: usize,
    pages: u32,
    received: u64,
    new_events: u64,
    gaps: Vec<Timestamp>,
    page: PageState,
}

/// What the page in progress has brought, as far as deciding the next page needs.
#[derive(Debug, Clone, Default)]
struct PageState {
    count: usize,
    fresh: usize,
    oldest: Option<Timestamp>,
    /// Ids at `oldest` (at most [`Paginator::max_second_ids`]).
    at_oldest: HashSet<EventId>,
    /// `oldest` held more ids than that.
    overfull: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Request this filter next.
    Next(Filter),
    Done,
}

impl Paginator {
    /// `limit` is clamped to at least 2 so a page can always move past one event.
    pub fn new(base: Filter, limit: usize) -> Self {
        let until = base.until;
        Paginator {
            base,
            limit: limit.max(2),
            until,
            boundary_seen: HashSet::new(),
            largest_page: 0,
            pages: 0,
            received: 0,
            new_events: 0,
            gaps: Vec::new(),
            page: PageState::default(),
        }
    }

    /// The filter of the current page.
    /// Whether `event` answers the current page's request (its filter and `until`; the
    /// limit is no condition on an event).
    pub fn matches(&self, event: &nostr::Event) -> bool {
        self.until.is_none_or(|u| event.created_at <= u)
            && self
                .base
                .match_event(event, nostr::filter::MatchEventOptions::default())
    }

    /// The filter paged through (without the page's `until` and `limit`).
    pub fn base(&self) -> &Filter {
        &self.base
    }

    pub fn current(&self) -> Filter {
        let mut f = self.base.clone().limit(self.limit);
        if let Some(u) = self.until {
            f = f.until(u);
        }
        f
    }

    /// Start (or restart) the page for [`Paginator::current`]: whatever an abandoned page
    /// brought is forgotten.
    pub fn start_page(&mut self) {
        self.page = PageState::default();
    }

    /// Record one event of the current page (in any order). Only what deciding the next page
    /// needs is kept — counts, the oldest second and the ids at it, the latter bounded — so a
    /// relay that ignores `limit` or never ends a page cannot grow memory.
    pub fn page_event(&mut self, id: EventId, at: Timestamp) {
        let max_ids = self.max_second_ids();
        let page = &mut self.page;
        page.count += 1;
        if Some(at) != self.until || !self.boundary_seen.contains(&id) {
            page.fresh += 1;
        }
        match page.oldest {
            Some(o) if at > o => return,
            Some(o) if at == o => {}
            _ => {
                page.oldest = Some(at);
                page.at_oldest.clear();
                page.overfull = false;
            }
        }
        if page.at_oldest.len() < max_ids {
            page.at_oldest.insert(id);
        } else {
            page.overfull = true;
        }
    }

    /// Most ids remembered for one second: a second holding more than a few pages is
    /// skipped as a gap rather than remembered.
    fn max_second_ids(&self) -> usize {
        self.limit.saturating_mul(4).max(2_000)
    }

    /// The current page is complete (EOSE): decide what to request next.
    pub fn end_page(&mut self) -> Step {
        let page = std::mem::take(&mut self.page);
        self.pages += 1;
        self.received += page.count as u64;
        self.largest_page = self.largest_page.max(page.count);
        let Some(oldest) = page.oldest else {
            return Step::Done;
        };
        self.new_events += page.fresh as u64;

        if page.fresh == 0 {
            // Everything was at the boundary second and already seen. A page shorter than
            // any the relay has served means it has nothing else there or below. Otherwise
            // it may be capping pages: step past this second so older events still come.
            // Only a page as full as we asked for proves the second holds more than a page:
            // that is recorded as a gap.
            let Some(until) = self.until else {
                return Step::Done;
            };
            let possibly_capped = page.count >= self.limit || page.count == self.largest_page;
            if !possibly_capped {
                return Step::Done;
            }
            if page.count >= self.limit {
                self.gaps.push(until);
            }
            // Nothing is older than second 0.
            if until.as_secs() == 0 {
                return Step::Done;
            }
            return self.step_past(until);
        }

        if Some(oldest) != self.until {
            self.boundary_seen.clear();
        }
        self.boundary_seen.extend(page.at_oldest);
        if page.overfull || self.boundary_seen.len() > self.max_second_ids() {
            // More ids in one second than we remember: step past it, recorded as a gap.
            self.gaps.push(oldest);
            if oldest.as_secs() == 0 {
                return Step::Done;
            }
            return self.step_past(oldest);
        }
        self.until = Some(oldest);
        Step::Next(self.current())
    }

    fn step_past(&mut self, second: Timestamp) -> Step {
        self.until = Some(Timestamp::from(second.as_secs() - 1));
        self.boundary_seen.clear();
        Step::Next(self.current())
    }

    /// Record a completed page (every event received for it, in any order) and decide what
    /// to request next.
    pub fn on_page(&mut self, events: &[(EventId, Timestamp)]) -> Step {
        self.start_page();
        for (id, at) in events {
            self.page_event(*id, *at);
        }
        self.end_page()
    }

    pub fn pages(&self) -> u32 {
        self.pages
    }
    /// Events received over all pages, duplicates at boundaries included.
    pub fn received(&self) -> u64 {
        self.received
    }
    /// Distinct events received.
    pub fn new_events(&self) -> u64 {
        self.new_events
    }
    /// Seconds skipped because they held more events than one page.
    pub fn gaps(&self) -> &[Timestamp] {
        &self.gaps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A relay's answer to a filter: newest first, at most `min(limit, cap)` events.
    fn serve(store: &[(EventId, Timestamp)], f: &Filter, cap: usize) -> Vec<(EventId, Timestamp)> {
        let mut matching: Vec<_> = store
            .iter()
            .filter(|(_, t)| f.until.is_none_or(|u| *t <= u))
            .copied()
            .collect();
        matching.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        matching.truncate(f.limit.unwrap_or(usize::MAX).min(cap));
        matching
    }

    fn id(n: u32) -> EventId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        EventId::from_byte_array(b)
    }

    fn run(
        store: &[(EventId, Timestamp)],
        limit: usize,
        cap: usize,
    ) -> (BTreeSet<EventId>, Paginator) {
        let mut p = Paginator::new(Filter::new(), limit);
        let mut got = BTreeSet::new();
        let mut filter = p.current();
        for _ in 0..10_000 {
            let page = serve(store, &filter, cap);
            got.extend(page.iter().map(|(i, _)| *i));
            match p.on_page(&page) {
                Step::Next(f) => filter = f,
                Step::Done => return (got, p),
            }
        }
        panic!("pagination did not terminate");
    }

    fn all(store: &[(EventId, Timestamp)]) -> BTreeSet<EventId> {
        store.iter().map(|(i, _)| *i).collect()
    }

    #[test]
    fn pages_through_a_relay_that_caps_below_our_limit() {
        let store: Vec<_> = (0..1000)
            .map(|i| (id(i), Timestamp::from(1_000 + i as u64 / 3)))
            .collect();
        let (got, p) = run(&store, 500, 50);
        assert_eq!(got, all(&store));
        assert_eq!(p.new_events(), 1000);
        assert!(p.gaps().is_empty());
    }

    #[test]
    fn many_events_in_one_second_under_the_cap_are_not_lost() {
        // 40 events in the same second behind a relay that serves 50 per page.
        let mut store: Vec<_> = (0..40).map(|i| (id(i), Timestamp::from(5_000))).collect();
        store.extend((40..200).map(|i| (id(i), Timestamp::from(4_000 + i as u64))));
        store.extend((200..260).map(|i| (id(i), Timestamp::from(10 + i as u64 % 7))));
        let (got, p) = run(&store, 50, 50);
        assert_eq!(got, all(&store));
        assert_eq!(p.new_events(), 260);
        assert!(p.gaps().is_empty());
    }

    #[test]
    fn a_second_larger_than_a_page_is_skipped_as_a_gap_not_a_loop() {
        let mut store: Vec<_> = (0..80).map(|i| (id(i), Timestamp::from(5_000))).collect();
        store.extend((80..100).map(|i| (id(i), Timestamp::from(4_000 + i as u64))));
        let (got, p) = run(&store, 50, 50);
        assert_eq!(p.gaps(), [Timestamp::from(5_000)]);
        // Everything outside the overfull second arrives.
        for i in 80..100 {
            assert!(got.contains(&id(i)));
        }
        assert_eq!(got.len(), 50 + 20);
    }

    #[test]
    fn a_few_events_sharing_a_second_are_not_a_gap() {
        let store: Vec<_> = (0..7).map(|i| (id(i), Timestamp::from(9_000))).collect();
        let (got, p) = run(&store, 500, 500);
        assert_eq!(got, all(&store));
        assert!(p.gaps().is_empty());
        // Behind a silent cap of 30 with 45 in one second and older events: the older ones
        // still arrive. (The 15 hidden in the crowded second cannot be seen at all: a
        // known limit of REQ pagination against such relays; negentropy has none.)
        let mut store: Vec<_> = (0..45).map(|i| (id(i), Timestamp::from(9_000))).collect();
        store.extend((45..60).map(|i| (id(i), Timestamp::from(8_000 + i as u64))));
        let (got, p) = run(&store, 500, 30);
        assert!((45..60).all(|i| got.contains(&id(i))));
        assert_eq!(got.len(), 30 + 15);
        assert!(p.gaps().is_empty());
    }

    #[test]
    fn empty_and_single_event_sets_terminate() {
        let (got, p) = run(&[], 10, 10);
        assert!(got.is_empty());
        assert_eq!(p.pages(), 1);
        let one = [(id(1), Timestamp::from(7))];
        let (got, _) = run(&one, 10, 10);
        assert_eq!(got, all(&one));
    }

    #[test]
    fn a_relay_ignoring_limit_is_paged_with_bounded_memory() {
        // 10,000 events in one second, all sent on every page whatever the limit: the
        // paginator remembers a bounded number of ids, records the second as a gap and moves
        // on to the older events instead of looping or growing.
        let mut store: Vec<_> = (0..10_000)
            .map(|i| (id(i), Timestamp::from(7_000)))
            .collect();
        store.extend((10_000..10_050).map(|i| (id(i), Timestamp::from(i as u64))));
        let mut p = Paginator::new(Filter::new(), 50);
        let mut got = BTreeSet::new();
        let mut filter = p.current();
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages < 100, "no end");
            p.start_page();
            for (i, t) in serve(&store, &filter, usize::MAX).iter().chain(
                store
                    .iter()
                    .filter(|(_, t)| filter.until.is_none_or(|u| *t <= u)),
            ) {
                p.page_event(*i, *t);
                got.insert(*i);
            }
            assert!(p.page.at_oldest.len() <= p.max_second_ids());
            match p.end_page() {
                Step::Next(f) => filter = f,
                Step::Done => break,
            }
        }
        assert_eq!(p.gaps(), [Timestamp::from(7_000)]);
        assert_eq!(got, all(&store), "everything sent was taken");
    }

    #[test]
    fn an_abandoned_page_is_forgotten() {
        let mut p = Paginator::new(Filter::new(), 10);
        p.start_page();
        p.page_event(id(1), Timestamp::from(5));
        p.start_page(); // sent again after a timeout
        assert_eq!(
            p.end_page(),
            Step::Done,
            "the restarted page brought nothing"
        );
    }

    #[test]
    fn first_page_keeps_the_callers_filter() {
        let p = Paginator::new(Filter::new().since(Timestamp::from(100)), 1);
        let f = p.current();
        assert_eq!(f.limit, Some(2));
        assert_eq!(f.since, Some(Timestamp::from(100)));
        assert_eq!(f.until, None);
    }

    use proptest::prelude::*;

    proptest! {
        /// Against any store (crowded seconds included) and a relay that caps pages or ignores
        /// limits: pagination ends, remembers a bounded number of ids, and, where the relay
        /// honours our limit, misses nothing outside the seconds it records as gaps.
        #[test]
        fn prop_pagination_ends_and_misses_only_recorded_gaps(
            times in prop::collection::vec(0u64..40, 0..150),
            limit in 2usize..30,
            cap in 1usize..40,
            ignore_limit in any::<bool>(),
        ) {
            let store: Vec<_> = times.iter().enumerate()
                .map(|(i, t)| (id(i as u32), Timestamp::from(*t))).collect();
            let mut p = Paginator::new(Filter::new(), limit);
            let mut got = BTreeSet::new();
            let mut filter = p.current();
            let mut ended = false;
            for _ in 0..(store.len() * 4 + 10) {
                let page = serve(&store, &filter, if ignore_limit { usize::MAX } else { cap });
                let page: Vec<_> = if ignore_limit {
                    store.iter().filter(|(_, t)| filter.until.is_none_or(|u| *t <= u)).copied().collect()
                } else { page };
                p.start_page();
                for (i, t) in &page {
                    p.page_event(*i, *t);
                    got.insert(*i);
                }
                prop_assert!(p.page.at_oldest.len() <= p.max_second_ids());
                match p.end_page() {
                    Step::Next(f) => filter = f,
                    Step::Done => { ended = true; break; }
                }
            }
            prop_assert!(ended, "pagination did not end");
            if ignore_limit || cap >= limit {
                for (i, t) in &store {
                    prop_assert!(got.contains(i) || p.gaps().contains(t), "missed {:?} at {:?}", i, t);
                }
            }
        }
    }
}
