//! Unit tests of the scheduling policy.

use super::*;
use proptest::prelude::*;

/// One instant for every call: jobs take no time (each is charged 1 ms).
fn t0() -> Instant {
    static T0: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    *T0
}

fn class(image: &str) -> Class {
    Class {
        image: image.into(),
        vmms: "fake".into(),
        own_account: false,
    }
}

/// A scheduler with jobs queued as (id, courselab, submitter, image).
fn queue(
    policy: Policy,
    jobs: &[(JobId, &str, &str, &str)],
    labs: &[(&str, LabPolicy)],
) -> Scheduler {
    let mut s = Scheduler::new(policy);
    for &(id, lab, sub, image) in jobs {
        let policy = labs
            .iter()
            .find(|(name, _)| *name == lab)
            .map_or(LabPolicy::default(), |(_, p)| *p);
        assert!(s.push(QueuedJob {
            id,
            courselab: lab,
            submitter: sub,
            class: &class(image),
            lab: policy,
        }));
    }
    s
}

/// Starts every job (finishing each at once), in the order chosen.
fn drain(s: &mut Scheduler) -> Vec<JobId> {
    let mut order = Vec::new();
    while let Some(id) = s.next(t0(), |_| true) {
        assert!(s.finished(id, t0()));
        order.push(id);
    }
    order
}

#[test]
fn round_robin_across_submitters_oldest_first_each() {
    // "a" queues 1..=4, then "b" 5, 6 and "c" 7.
    let mut jobs = vec![];
    for id in 1..=4 {
        jobs.push((id, "lab", "a", "img"));
    }
    jobs.extend([
        (5, "lab", "b", "img"),
        (6, "lab", "b", "img"),
        (7, "lab", "c", "img"),
    ]);
    let mut s = queue(Policy::Fair, &jobs, &[]);
    assert_eq!(drain(&mut s), vec![1, 5, 7, 2, 6, 3, 4]);
}

#[test]
fn fifo_keeps_the_order_of_arrival() {
    let jobs = [
        (1, "lab", "a", "img"),
        (2, "lab", "a", "img"),
        (3, "lab", "b", "img"),
        (4, "x", "c", "img"),
    ];
    let mut s = queue(Policy::Fifo, &jobs, &[]);
    assert_eq!(drain(&mut s), vec![1, 2, 3, 4]);
}

#[test]
fn a_late_submitter_goes_before_second_jobs_of_others() {
    let mut s = queue(
        Policy::Fair,
        &[
            (1, "lab", "a", "img"),
            (2, "lab", "a", "img"),
            (3, "lab", "a", "img"),
        ],
        &[],
    );
    assert_eq!(s.next(t0(), |_| true), Some(1));
    // "a" has had a job started: a newcomer's first job comes before "a"'s
    // second, although it is younger.
    s.push(QueuedJob {
        id: 10,
        courselab: "lab",
        submitter: "late",
        class: &class("img"),
        lab: LabPolicy::default(),
    });
    assert_eq!(s.next(t0(), |_| true), Some(10));
    assert_eq!(s.next(t0(), |_| true), Some(2));
}

#[test]
fn a_submitter_starts_a_new_first_round_once_nothing_of_its_is_queued_or_running() {
    let jobs = [
        (1, "lab", "a", "img"),
        (2, "lab", "b", "img"),
        (3, "lab", "b", "img"),
    ];
    let mut s = queue(Policy::Fair, &jobs, &[]);
    assert_eq!(s.next(t0(), |_| true), Some(1));
    assert_eq!(s.next(t0(), |_| true), Some(2));
    let a = class("img");
    let job = |id, submitter| QueuedJob {
        id,
        courselab: "lab",
        submitter,
        class: &a,
        lab: LabPolicy::default(),
    };
    // "a"'s job 1 still runs: its new job 4 is its second, after "b"'s 3.
    s.push(job(4, "a"));
    assert_eq!(s.next(t0(), |_| true), Some(3));
    assert_eq!(s.next(t0(), |_| true), Some(4));
    for id in [1, 2, 3, 4] {
        assert!(s.finished(id, t0()));
    }
    // "b" keeps a job running, "a" has nothing left: "a"'s job 6 is a first
    // one again, before "b"'s job 7 (its second since job 5).
    s.push(job(5, "b"));
    assert_eq!(s.next(t0(), |_| true), Some(5));
    s.push(job(7, "b"));
    s.push(job(6, "a"));
    assert_eq!(s.next(t0(), |_| true), Some(6));
    assert_eq!(s.next(t0(), |_| true), Some(7));
}

#[test]
fn within_a_round_a_submitter_served_less_goes_first() {
    let img = class("img");
    let job = |id, submitter| QueuedJob {
        id,
        courselab: "lab",
        submitter,
        class: &img,
        lab: LabPolicy::default(),
    };
    let mut s = Scheduler::new(Policy::Fair);
    // "a" has three jobs graded, each finished before the next was queued.
    for id in 1..=3 {
        s.push(job(id, "a"));
        assert_eq!(s.next(t0(), |_| true), Some(id));
        assert!(s.finished(id, t0()));
    }
    // Both are in their first round now; "a" queued first, but "c" was
    // never served, so "c" goes first, then "b" (served once), then "a".
    s.push(job(10, "b"));
    assert_eq!(s.next(t0(), |_| true), Some(10));
    assert!(s.finished(10, t0()));
    s.push(job(11, "a"));
    s.push(job(12, "b"));
    s.push(job(13, "c"));
    assert_eq!(drain(&mut s), vec![13, 12, 11]);
    // Fifo keeps no such memory.
    let mut s = Scheduler::new(Policy::Fifo);
    s.push(job(1, "a"));
    assert_eq!(drain(&mut s), vec![1]);
    s.push(job(2, "a"));
    s.push(job(3, "c"));
    assert_eq!(drain(&mut s), vec![2, 3]);
}

#[test]
fn courselabs_take_turns() {
    let mut jobs = vec![];
    for id in 1..=4 {
        jobs.push((id, "big", if id % 2 == 0 { "x" } else { "y" }, "img"));
    }
    jobs.extend([(10, "small", "s", "img"), (11, "small", "t", "img")]);
    let mut s = queue(Policy::Fair, &jobs, &[]);
    assert_eq!(drain(&mut s), vec![1, 10, 2, 11, 3, 4]);
}

#[test]
fn weights_share_starts_between_courselabs() {
    let mut jobs = vec![];
    for id in 1..=8 {
        jobs.push((id, "heavy", "h", "img"));
    }
    for id in 101..=8 + 100 {
        jobs.push((id, "light", "l", "img"));
    }
    let heavy = LabPolicy {
        weight: 3,
        max_running: None,
    };
    let mut s = queue(Policy::Fair, &jobs, &[("heavy", heavy)]);
    let order = drain(&mut s);
    let first_eight: Vec<bool> = order[..8].iter().map(|id| *id < 100).collect();
    assert_eq!(
        first_eight.iter().filter(|heavy| **heavy).count(),
        6,
        "{order:?}"
    );
}

#[test]
fn an_idle_courselab_banks_no_share() {
    let mut jobs = vec![];
    for id in 1..=20 {
        jobs.push((id, "busy", "b", "img"));
    }
    let mut s = queue(Policy::Fair, &jobs, &[]);
    for _ in 0..10 {
        let id = s.next(t0(), |_| true).unwrap();
        s.finished(id, t0());
    }
    // Ten starts later, a new courselab gets every other start, not ten in a row.
    for id in 100..104 {
        s.push(QueuedJob {
            id,
            courselab: "new",
            submitter: &format!("n{id}"),
            class: &class("img"),
            lab: LabPolicy::default(),
        });
    }
    let order: Vec<JobId> = (0..4).filter_map(|_| s.next(t0(), |_| true)).collect();
    assert_eq!(
        order.iter().filter(|id| **id >= 100).count(),
        2,
        "{order:?}"
    );
}

#[test]
fn courselabs_share_vm_time_not_starts() {
    // One VM; "long" jobs take 120 ms, "short" ones 5 ms: both courselabs
    // get about the same VM time, so "short" starts far more jobs.
    let mut jobs = vec![];
    for id in 1..=400 {
        jobs.push((id, "long", "l", "img"));
        jobs.push((1000 + id, "short", "s", "img"));
    }
    let mut s = queue(Policy::Fair, &jobs, &[]);
    let mut now = t0();
    let (mut long_ms, mut short_ms) = (0u32, 0u32);
    for _ in 0..200 {
        let id = s.next(now, |_| true).unwrap();
        let ms: u32 = if id < 1000 { 120 } else { 5 };
        if id < 1000 {
            long_ms += ms;
        } else {
            short_ms += ms;
        }
        now += std::time::Duration::from_millis(u64::from(ms));
        assert!(s.finished(id, now));
    }
    let share = f64::from(short_ms) / f64::from(long_ms + short_ms);
    assert!(
        (0.4..0.6).contains(&share),
        "short's share of VM time {share}"
    );
}

#[test]
fn max_running_holds_a_courselab_back_until_a_job_ends() {
    let capped = LabPolicy {
        weight: 1,
        max_running: Some(1),
    };
    let mut s = queue(
        Policy::Fair,
        &[
            (1, "cap", "a", "img"),
            (2, "cap", "b", "img"),
            (3, "other", "c", "img"),
        ],
        &[("cap", capped)],
    );
    assert_eq!(s.next(t0(), |_| true), Some(1));
    assert_eq!(s.next(t0(), |_| true), Some(3));
    assert_eq!(s.next(t0(), |_| true), None, "the courselab is at its cap");
    assert_eq!(s.running_of("cap"), 1);
    assert!(s.finished(1, t0()));
    assert!(!s.finished(1, t0()), "finished twice");
    assert_eq!(s.next(t0(), |_| true), Some(2));
}

#[test]
fn a_job_that_can_start_goes_when_the_fair_choice_cannot() {
    // "a"'s job needs image x, which has no VM now; "b"'s second job can run
    // on a free VM of y: no VM idles while a job could run on it.
    let mut s = queue(
        Policy::Fair,
        &[
            (1, "lab", "b", "y"),
            (2, "lab", "a", "x"),
            (3, "lab", "b", "y"),
        ],
        &[],
    );
    assert_eq!(s.next(t0(), |_| true), Some(1));
    let mut asked = Vec::new();
    let next = s.next(t0(), |c| {
        asked.push(c.image.clone());
        c.image == "y"
    });
    assert_eq!(next, Some(3));
    asked.sort();
    assert_eq!(asked, ["x", "y"], "each class is asked once");
    assert_eq!(s.next(t0(), |c| c.image == "y"), None);
    assert_eq!(s.next(t0(), |_| true), Some(2));
}

#[test]
fn remove_and_counts() {
    let mut s = queue(
        Policy::Fair,
        &[
            (1, "lab", "a", "img"),
            (2, "lab", "a", "img"),
            (3, "lab", "b", "img"),
        ],
        &[],
    );
    assert_eq!(s.len(), 3);
    assert_eq!(s.queued_of("lab", "a"), 2);
    assert_eq!(s.queued_of("lab", "nobody"), 0);
    assert_eq!(s.oldest(), Some(1));
    assert!(!s.push(QueuedJob {
        id: 1,
        courselab: "lab",
        submitter: "a",
        class: &class("img"),
        lab: LabPolicy::default(),
    }));
    assert!(s.remove(1));
    assert!(!s.remove(1));
    assert_eq!(s.oldest(), Some(2));
    assert_eq!(drain(&mut s), vec![2, 3]);
    assert!(s.is_empty());
    assert!(
        s.labs.is_empty() && s.subs.is_empty() && s.lanes.is_empty(),
        "nothing kept for an empty queue"
    );
}

#[test]
fn a_retried_job_goes_back_to_its_place() {
    let mut s = queue(
        Policy::Fair,
        &[
            (1, "lab", "a", "img"),
            (2, "lab", "a", "img"),
            (3, "lab", "b", "img"),
        ],
        &[],
    );
    assert_eq!(s.next(t0(), |_| true), Some(1));
    s.finished(1, t0());
    s.push(QueuedJob {
        id: 1,
        courselab: "lab",
        submitter: "a",
        class: &class("img"),
        lab: LabPolicy::default(),
    });
    // "a" is in its second round, so "b" first; then "a"'s oldest, job 1.
    assert_eq!(drain(&mut s), vec![3, 1, 2]);
}

/// The model's rule: a submitter with nothing queued or running starts
/// over at round 0.
fn forget_if_idle(
    rounds: &mut HashMap<(u8, u8), u64>,
    queued: &BTreeMap<JobId, (u8, u8, u8)>,
    running: &[(JobId, u8, u8)],
    lab: u8,
    sub: u8,
) {
    let busy = queued.values().any(|&(l, o, _)| l == lab && o == sub)
        || running.iter().any(|&(_, l, o)| l == lab && o == sub);
    if !busy {
        rounds.remove(&(lab, sub));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Push { lab: u8, sub: u8, image: u8 },
    Next { allowed: u8 },
    Finish { pick: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 0u8..5, 0u8..2).prop_map(|(lab, sub, image)| Op::Push { lab, sub, image }),
        2 => (0u8..4).prop_map(|allowed| Op::Next { allowed }),
        1 => any::<u8>().prop_map(|pick| Op::Finish { pick }),
    ]
}

proptest! {
    /// Every queued job starts exactly once, caps hold, only allowed classes
    /// start, and (fair) a submitter's job never starts while another
    /// submitter of its courselab waits in an earlier round.
    #[test]
    fn every_job_starts_once_in_fair_rounds(ops in proptest::collection::vec(op(), 1..200), fifo in any::<bool>()) {
        let policy = if fifo { Policy::Fifo } else { Policy::Fair };
        let mut s = Scheduler::new(policy);
        let capped = LabPolicy { weight: 2, max_running: Some(2) };
        let mut next_id = 0;
        let mut queued: BTreeMap<JobId, (u8, u8, u8)> = BTreeMap::new();
        let mut running: Vec<(JobId, u8, u8)> = Vec::new();
        let mut started = BTreeSet::new();
        // Per (lab, sub): jobs started since its queue was last empty.
        let mut rounds: HashMap<(u8, u8), u64> = HashMap::new();
        let mut start = |s: &mut Scheduler, allowed: u8, queued: &mut BTreeMap<JobId, (u8, u8, u8)>, running: &mut Vec<(JobId, u8, u8)>, rounds: &mut HashMap<(u8, u8), u64>| -> Option<JobId> {
            let id = s.next(t0(), |c| allowed & (1 << (c.image.as_bytes()[0] - b'0')) != 0)?;
            let (lab, sub, image) = queued.remove(&id).expect("a queued job");
            assert!(allowed & (1 << image) != 0, "job {id} of a class not allowed");
            assert!(started.insert(id), "job {id} started twice");
            if lab == 0 {
                assert!(running.iter().filter(|(_, l, _)| *l == 0).count() < 2, "cap exceeded");
            }
            if policy == Policy::Fair {
                let mine = rounds.get(&(lab, sub)).copied().unwrap_or(0);
                let capped_out = |l: u8| l == 0 && running.iter().filter(|(_, x, _)| *x == 0).count() >= 2;
                for (other, &(l, o, i)) in queued.iter() {
                    if l == lab && o != sub && allowed & (1 << i) != 0 && !capped_out(l) {
                        let theirs = rounds.get(&(l, o)).copied().unwrap_or(0);
                        assert!(theirs >= mine, "job {id} of round {mine} before job {other} of round {theirs}");
                    }
                }
                *rounds.entry((lab, sub)).or_default() += 1;
            }
            running.push((id, lab, sub));
            Some(id)
        };
        for op in ops {
            match op {
                Op::Push { lab, sub, image } => {
                    next_id += 1;
                    let name = format!("lab{lab}");
                    let submitter = format!("s{sub}");
                    let policy = if lab == 0 { capped } else { LabPolicy::default() };
                    let pushed = s.push(QueuedJob { id: next_id, courselab: &name, submitter: &submitter, class: &class(&image.to_string()), lab: policy });
                    prop_assert!(pushed);
                    queued.insert(next_id, (lab, sub, image));
                }
                Op::Next { allowed } => {
                    start(&mut s, allowed, &mut queued, &mut running, &mut rounds);
                }
                Op::Finish { pick } => {
                    if !running.is_empty() {
                        let (id, lab, sub) = running.remove(usize::from(pick) % running.len());
                        prop_assert!(s.finished(id, t0()));
                        forget_if_idle(&mut rounds, &queued, &running, lab, sub);
                    }
                }
            }
            prop_assert_eq!(s.len(), queued.len());
        }
        // Drain: everything still queued starts once VMs are free.
        while !queued.is_empty() {
            while let Some((id, lab, sub)) = running.pop() {
                prop_assert!(s.finished(id, t0()));
                forget_if_idle(&mut rounds, &queued, &running, lab, sub);
            }
            prop_assert!(start(&mut s, 0b11, &mut queued, &mut running, &mut rounds).is_some(), "a queued job never starts");
        }
        prop_assert!(s.is_empty());
    }
}
