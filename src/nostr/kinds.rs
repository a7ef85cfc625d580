//! The event kinds grasp-sync reads and routes, in one place.

use nostr::Kind;

/// NIP-34 repository announcement, as a number (coordinates spell it out).
pub const REPO_ANNOUNCEMENT_NUMBER: u16 = 30617;
/// NIP-34 repository announcement (30617): the event a coordinate points at.
pub const REPO_ANNOUNCEMENT: Kind = Kind::GitRepoAnnouncement;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_constant_is_kind_30617() {
        assert_eq!(REPO_ANNOUNCEMENT, Kind::from(30617u16));
        assert_eq!(REPO_ANNOUNCEMENT.as_u16(), REPO_ANNOUNCEMENT_NUMBER);
    }
}
