//! Where a new container goes: the hosts' state in, the chosen host out.
//! Pure, so every rule is unit-tested without a daemon.

/// What placement needs to know of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    /// It answered its last health check.
    pub up: bool,
    pub draining: bool,
    pub max_vms: usize,
    /// This server's VMs on it, including those being made.
    pub vms: usize,
    /// It holds the image (as far as its cached image list says).
    pub has_image: bool,
}

impl Candidate<'_> {
    /// Room left; negative when the host holds more than its `max_vms`.
    fn free(&self) -> i64 {
        self.max_vms as i64 - self.vms as i64
    }

    fn takes_new(&self) -> bool {
        self.up && !self.draining
    }
}

/// Where the container goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice<'a> {
    /// On `host`, which has the image.
    Place { host: &'a str, free: i64 },
    /// On `host`, after the image is streamed there from `from`.
    Stream {
        host: &'a str,
        from: &'a str,
        free: i64,
    },
    /// On `host`, after it pulls the image from the registry: no host
    /// that answers has it to stream.
    Pull { host: &'a str, free: i64 },
    /// No host takes new containers (all down or draining).
    NoHost,
    /// No host that answers has the image, and none may pull it.
    NoImage,
}

/// The host that takes new containers with the most room, ties by name.
/// `max_vms` is a weight, not a wall: when every host is full the one
/// least over its size still gets the container, since the engine's own
/// `max_vms` bounds the total and its idle VMs of other images (which only
/// it can evict) must not starve a job forever.
fn roomiest<'a, 'b>(hosts: impl Iterator<Item = &'b Candidate<'a>>) -> Option<&'b Candidate<'a>> {
    hosts.max_by(|a, b| a.free().cmp(&b.free()).then_with(|| b.name.cmp(a.name)))
}

/// The host for a new container of an image: the roomiest host taking new
/// containers that has it; else the roomiest one taking new containers,
/// with the image streamed from an up host that has it (a draining host
/// can still give it), or else pulled by it when `can_pull` (a registry is
/// set).
pub fn choose<'a>(hosts: &[Candidate<'a>], can_pull: bool) -> Choice<'a> {
    if let Some(best) = roomiest(hosts.iter().filter(|h| h.takes_new() && h.has_image)) {
        return Choice::Place {
            host: best.name,
            free: best.free(),
        };
    }
    let Some(target) = roomiest(hosts.iter().filter(|h| h.takes_new())) else {
        return Choice::NoHost;
    };
    let source = hosts
        .iter()
        .filter(|h| h.up && h.has_image)
        .min_by_key(|h| h.name);
    match source {
        Some(source) => Choice::Stream {
            host: target.name,
            from: source.name,
            free: target.free(),
        },
        None if can_pull => Choice::Pull {
            host: target.name,
            free: target.free(),
        },
        None => Choice::NoImage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, max_vms: usize, vms: usize) -> Candidate<'_> {
        Candidate {
            name,
            up: true,
            draining: false,
            max_vms,
            vms,
            has_image: true,
        }
    }

    #[test]
    fn most_free_capacity_wins_ties_by_name() {
        let hosts = [host("a", 8, 6), host("b", 16, 10), host("c", 4, 0)];
        assert_eq!(choose(&hosts, false), Choice::Place { host: "b", free: 6 });
        let tie = [host("b", 4, 1), host("a", 5, 2)];
        assert_eq!(choose(&tie, false), Choice::Place { host: "a", free: 3 });
    }

    #[test]
    fn down_and_draining_hosts_take_nothing() {
        let mut down = host("big", 100, 0);
        down.up = false;
        let mut draining = host("bigger", 200, 0);
        draining.draining = true;
        let hosts = [down.clone(), draining.clone(), host("small", 2, 1)];
        assert_eq!(
            choose(&hosts, false),
            Choice::Place {
                host: "small",
                free: 1
            }
        );
        assert_eq!(choose(&[down, draining], false), Choice::NoHost);
        assert_eq!(choose(&[], false), Choice::NoHost);
    }

    #[test]
    fn full_hosts_still_take_the_least_over() {
        let hosts = [host("a", 2, 4), host("b", 2, 3)];
        assert_eq!(
            choose(&hosts, false),
            Choice::Place {
                host: "b",
                free: -1
            }
        );
    }

    #[test]
    fn a_host_with_the_image_beats_a_roomier_one_without() {
        let mut empty = host("empty", 50, 0);
        empty.has_image = false;
        let hosts = [empty, host("busy", 4, 3)];
        assert_eq!(
            choose(&hosts, false),
            Choice::Place {
                host: "busy",
                free: 1
            }
        );
    }

    #[test]
    fn the_image_is_streamed_when_no_taking_host_has_it() {
        let mut draining = host("old", 8, 1);
        draining.draining = true;
        let mut fresh = host("fresh", 8, 0);
        fresh.has_image = false;
        let mut other = host("other", 8, 4);
        other.has_image = false;
        let hosts = [draining, fresh, other];
        assert_eq!(
            choose(&hosts, false),
            Choice::Stream {
                host: "fresh",
                from: "old",
                free: 8
            }
        );
    }

    #[test]
    fn a_down_host_is_no_source() {
        let mut down = host("down", 8, 0);
        down.up = false;
        let mut fresh = host("fresh", 8, 0);
        fresh.has_image = false;
        assert_eq!(choose(&[down, fresh], false), Choice::NoImage);
    }

    #[test]
    fn a_registry_is_pulled_from_only_when_no_up_host_has_the_image() {
        let mut down = host("down", 8, 0);
        down.up = false;
        let mut fresh = host("fresh", 8, 2);
        fresh.has_image = false;
        let mut roomier = host("roomier", 8, 0);
        roomier.has_image = false;
        roomier.draining = true;
        // The roomiest host that takes containers pulls; a draining one
        // does not, though roomier.
        assert_eq!(
            choose(&[down.clone(), fresh.clone(), roomier.clone()], true),
            Choice::Pull {
                host: "fresh",
                free: 6
            }
        );
        // A host that answers and has it streams it instead.
        let mut source = host("source", 1, 5);
        source.draining = true;
        assert_eq!(
            choose(&[fresh.clone(), source], true),
            Choice::Stream {
                host: "fresh",
                from: "source",
                free: 6
            }
        );
        // With a host that takes containers and has it, nothing moves.
        assert_eq!(
            choose(&[fresh.clone(), host("has", 4, 3)], true),
            Choice::Place {
                host: "has",
                free: 1
            }
        );
        // Nobody to pull: still no host.
        assert_eq!(choose(&[down, roomier], true), Choice::NoHost);
    }
}
